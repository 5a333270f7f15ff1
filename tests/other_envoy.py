"""Run a second, unrelated Envoy on an admin port, as another project on the machine would."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from ext_proc.supervisor import envoy_binary

ADMIN_ONLY_CONFIG = """\
admin:
  address:
    socket_address: {{ address: 127.0.0.1, port_value: {port} }}
"""


def start_other_envoy(folder: Path, admin_port: int) -> subprocess.Popen:
    """Start an Envoy with only an admin API on ``admin_port``; return once its /ready returns 200."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "other-envoy.yaml"
    config.write_text(ADMIN_ONLY_CONFIG.format(port=admin_port))
    process = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the other Envoy exited with status {process.returncode}")
        try:
            with opener.open(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as response:
                if response.status == 200:
                    return process
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise AssertionError("the other Envoy did not become ready")


def stop_other_envoy(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
