"""``python -m ext_proc.mock_provider`` run as a command."""

from __future__ import annotations

import socket
import subprocess
import sys

from gateway_harness import REPO_ROOT, child_environment


def test_port_in_use_one_line(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.mock_provider", "--port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
            env=child_environment(tmp_path),
        )
    finally:
        listener.close()

    assert result.returncode == 1
    assert result.stderr.startswith(f"mock provider: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.endswith("address already in use\n")
    assert result.stderr.count("\n") == 1
