"""``make run``: start the gateway with a demo proxy and key, ready to paste into a client.

With no provider reachable offline, the demo proxy points at the mock OpenAI-compatible
provider (ext_proc/mock_provider.py), which this command starts too. Set
XENOVIA_DEMO_UPSTREAM_URL (and XENOVIA_DEMO_UPSTREAM_KEY_ENV) to use a real provider.

The demo key is kept in ``<home>/demo-key`` (mode 600) so that later runs can print it
again; keys created with ``xenovia key create`` are never stored in clear.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from ext_proc import home as home_paths
from ext_proc import keys
from ext_proc.registry import RegistryEditor
from ext_proc.supervisor import GatewayProcesses, StartupError

logger = logging.getLogger(__name__)

DEMO_PROXY_NAME = "demo"
DEFAULT_PORT = 8080
DEFAULT_MOCK_PORT = 18081


def start_mock_provider(home: Path, port: int) -> tuple[subprocess.Popen, int]:
    port_file = home_paths.run_dir(home) / "mock-provider.port"
    port_file.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_proc.mock_provider", "--host", "127.0.0.1", "--port", str(port),
         "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 15
    while not port_file.exists():
        if process.poll() is not None:
            raise StartupError(f"the mock provider exited with status {process.returncode}; "
                               f"is port {port} in use? Set XENOVIA_MOCK_PORT")
        if time.monotonic() > deadline:
            raise StartupError("the mock provider did not start within 15 s")
        time.sleep(0.05)
    return process, int(port_file.read_text())


def ensure_demo_proxy(home: Path, upstream_url: str, key_env: str | None) -> tuple[str, str]:
    """Create the demo proxy and key on the first run; point the proxy at ``upstream_url``."""
    editor = RegistryEditor(home)
    key_file = home / "demo-key"
    if key_file.exists():
        saved = json.loads(key_file.read_text())
        known = {proxy["id"] for proxy in editor.list_proxies()}
        if saved.get("proxy_id") in known:
            editor.update_proxy(saved["proxy_id"], upstream_url=upstream_url, upstream_key_env=key_env)
            return saved["proxy_id"], saved["key"]
    proxy_id = editor.create_proxy(
        name=DEMO_PROXY_NAME, upstream_url=upstream_url, upstream_key_env=key_env,
        org_id="org_demo", environment="dev", provider="openai",
    )
    key = keys.generate_key()
    editor.create_key([proxy_id], keys.hash_key(key))
    home_paths.write_json(key_file, {"proxy_id": proxy_id, "key": key}, mode=0o600)
    return proxy_id, key


def print_banner(base_url: str, key: str, upstream: str, mock: bool, home: Path) -> None:
    provider = (f"{upstream}  (MOCK provider started by make run: canned answers, tool calls, "
                "streaming; not a real model)" if mock else upstream)
    print(f"""
Xenovia Runtime is running. Paste into your OpenAI client:

    base_url = "{base_url}"
    api_key  = "{key}"

Provider behind the demo proxy: {provider}
Try it:

    from openai import OpenAI
    client = OpenAI(api_key="{key}", base_url="{base_url}")
    print(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{{"role": "user", "content": "Hello"}}]
    ).choices[0].message.content)

Traces: .venv/bin/xenovia traces list --home {home}     Stop: Ctrl-C
""", flush=True)


def _port_setting(name: str, default: int, lowest: int) -> int:
    """Read a port number from the environment variable ``name``; raise StartupError if invalid."""
    text = os.environ.get(name, str(default))
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not lowest <= port <= 65535:
        raise StartupError(f"{name} must be a port number from {lowest} to 65535, got {text!r}")
    return port


def main() -> int:
    os.environ.pop("RUST_BACKTRACE", None)
    logging.basicConfig(level=os.environ.get("XENOVIA_LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    home = home_paths.home_dir()
    home_paths.run_dir(home).mkdir(parents=True, exist_ok=True)
    upstream = os.environ.get("XENOVIA_DEMO_UPSTREAM_URL")
    mock_process = None
    try:
        port = _port_setting("XENOVIA_PORT", DEFAULT_PORT, lowest=1)
        # The admin port defaults to 0, a free port, so that make run does not collide with
        # another Envoy's admin API (9901 is every Envoy's default).
        gateway = GatewayProcesses(home, port, _port_setting("XENOVIA_ADMIN_PORT", 0, lowest=0))
        mock_port_setting = _port_setting("XENOVIA_MOCK_PORT", DEFAULT_MOCK_PORT, lowest=1)
        if upstream is None and mock_port_setting == port:
            raise StartupError(f"XENOVIA_MOCK_PORT and XENOVIA_PORT are both {port}; "
                               "set one of them to another port")
        gateway.claim_home()
        gateway.check_ports()
        if upstream is None:
            mock_process, mock_port = start_mock_provider(home, mock_port_setting)
            upstream = f"http://127.0.0.1:{mock_port}/v1"
        proxy_id, key = ensure_demo_proxy(home, upstream, os.environ.get("XENOVIA_DEMO_UPSTREAM_KEY_ENV"))
        try:
            gateway.start()
            print_banner(f"http://127.0.0.1:{port}/a/{proxy_id}/openai/v1", key, upstream,
                         mock=mock_process is not None, home=home)
            return gateway.wait()
        finally:
            gateway.stop()
    except StartupError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        if mock_process is not None:
            mock_process.terminate()
            mock_process.wait(10)


if __name__ == "__main__":
    sys.exit(main())
