"""The home folder: every file the gateway reads or writes lives under it.

Layout (``XENOVIA_HOME``, default ``./.xenovia``)::

    config/proxies.json             proxies and their policy attachments (a ConfigMap)
    config/policy.<proxy>.<stage>.<name>.rego  attached policies (same ConfigMap)
    secrets/keys.json               key hashes and scopes (a Secret)
    run/                            Unix sockets of the running gateway
    state/                          session store
    clickhouse/, spool/             embedded trace store and its outage spool

ConfigMap and Secret volumes are flat folders, hence no subfolders under config/ and
secrets/.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

DEFAULT_HOME = ".xenovia"


def home_dir(value: str | os.PathLike | None = None) -> Path:
    raw = value if value is not None else os.environ.get("XENOVIA_HOME", DEFAULT_HOME)
    return Path(raw).resolve()


def proxies_file(home: Path) -> Path:
    return home / "config" / "proxies.json"


def keys_file(home: Path) -> Path:
    return home / "secrets" / "keys.json"


def policy_file(home: Path, proxy_id: str, stage: str, name: str) -> Path:
    return home / "config" / f"policy.{proxy_id}.{stage}.{name}.rego"


def run_dir(home: Path) -> Path:
    return home / "run"


def ext_proc_socket(home: Path, worker: int) -> Path:
    return run_dir(home) / f"ext_proc.{worker}.sock"


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` so that readers see the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_json(path: Path, document: dict, mode: int = 0o644) -> None:
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    write_atomically(path, text.encode(), mode)
