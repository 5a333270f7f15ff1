"""`xenovia up`: the environment it gives its children, and start-up when ports are taken."""

import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
from gateway_harness import (
    REPO_ROOT,
    child_environment,
    free_port,
    read_lines_until,
    stop_group,
)
from other_envoy import start_other_envoy, stop_other_envoy

from ext_proc.supervisor import GRPC_ENVIRONMENT, GatewayProcesses, StartupError


def test_children_get_the_grpc_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("GRPC_EXPERIMENTS", raising=False)
    monkeypatch.setenv("RUST_BACKTRACE", "1")
    environment = GatewayProcesses(tmp_path, port=1, admin_port=2)._child_environment()
    assert environment["GRPC_EXPERIMENTS"] == GRPC_ENVIRONMENT["GRPC_EXPERIMENTS"]
    assert environment["XENOVIA_HOME"] == str(tmp_path)
    assert "RUST_BACKTRACE" not in environment


def test_operator_grpc_settings_win(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "-event_engine_client")
    environment = GatewayProcesses(tmp_path, port=1, admin_port=2)._child_environment()
    assert environment["GRPC_EXPERIMENTS"] == "-event_engine_client"


def hold_port() -> tuple[socket.socket, int]:
    """Listen on a free loopback port, as another process would; return the socket and port."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder, holder.getsockname()[1]


def run_up(home, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = child_environment(home)
    environment.pop("XENOVIA_PORT", None)
    environment.pop("XENOVIA_ADMIN_PORT", None)
    return subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "up", *args], env=environment, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=timeout,
    )


def test_listener_port_in_use_rejected(tmp_path):
    holder, port = hold_port()
    with holder:
        result = run_up(tmp_path, "--port", str(port), "--admin-port", str(free_port()))

    assert result.returncode == 1
    assert (f"listener port {port} on 127.0.0.1 is in use by another process; "
            "choose another with --port or XENOVIA_PORT") in result.stderr
    assert "Xenovia gateway listening on" not in result.stderr
    assert "started collector" not in result.stderr


def test_admin_port_in_use_rejected(tmp_path):
    holder, admin_port = hold_port()
    with holder:
        result = run_up(tmp_path, "--port", str(free_port()), "--admin-port", str(admin_port))

    assert result.returncode == 1
    assert (f"Envoy admin port {admin_port} on 127.0.0.1 is in use by another process; "
            "choose another with --admin-port or XENOVIA_ADMIN_PORT") in result.stderr
    assert "Xenovia gateway listening on" not in result.stderr


def test_readiness_ignores_other_envoy(tmp_path, monkeypatch):
    """Another Envoy on the admin port returns 200 for /ready; start-up must not take it for ours."""
    admin_port = free_port()
    other = start_other_envoy(tmp_path / "other", admin_port)
    # Skip the port check, as if the other Envoy took the port just after it.
    monkeypatch.setattr(GatewayProcesses, "check_ports", lambda self: None, raising=False)
    gateway = GatewayProcesses(tmp_path / "home", port=free_port(), admin_port=admin_port)
    try:
        with pytest.raises(StartupError) as raised:
            gateway.start()
    finally:
        gateway.stop()
        stop_other_envoy(other)

    assert "envoy exited with status 1 during start-up" in str(raised.value)


def test_admin_port_defaults_to_free_port(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    environment = child_environment(home)
    environment.pop("XENOVIA_ADMIN_PORT", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_proc.cli", "up", "--port", str(port)], env=environment,
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        wait_for_line(process, "Xenovia gateway listening on")
        address = (home / "run" / "envoy-admin.address").read_text().strip()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{address}/server_info", timeout=5) as response:
            info = json.loads(response.read())
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            health = json.loads(response.read())
    finally:
        stop_group(process)

    assert address.startswith("127.0.0.1:")
    assert info["command_line_options"]["config_path"] == str(home / "run" / "envoy.yaml")
    assert info["state"] == "LIVE"
    assert health["status"] == "ok"


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 90.0) -> list[str]:
    """Read the process's stderr until a line contains ``text``; return the lines read."""
    lines, found = read_lines_until(process.stderr, lambda line: text in line, timeout)
    if not found:
        raise AssertionError(f"no line with {text!r} in the output:\n" + "".join(lines))
    return lines


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--workers", "0"], "expected 1 or more"),
        (["--workers", "two"], "invalid number 'two'"),
        (["--port", "70000"], "invalid port 70000"),
        (["--admin-port", "-1"], "invalid port -1"),
        (["--ext-proc-transport", "tcp", "--ext-proc-port", "0"], "invalid port 0"),
    ],
)
def test_up_rejects_invalid_numbers(arguments, message, capsys):
    from ext_proc.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["up", *arguments])

    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_up_rejects_worker_ports_past_65535(tmp_path):
    from ext_proc.cli import main

    arguments = ["--home", str(tmp_path), "up", "--no-envoy", "--ext-proc-transport", "tcp",
                 "--ext-proc-port", "65535", "--workers", "2"]

    assert main(arguments) == 2


def test_bad_worker_count_variable_spares_other_commands(tmp_path, monkeypatch, capsys):
    from ext_proc.cli import main

    monkeypatch.setenv("XENOVIA_WORKERS", "abc")

    assert main(["--home", str(tmp_path), "proxy", "list"]) == 0


def test_second_up_on_same_home_rejected(tmp_path):
    first = GatewayProcesses(tmp_path, port=free_port())
    first.claim_home()
    try:
        result = run_up(tmp_path, "--port", str(free_port()))
    finally:
        first.stop()

    assert result.returncode == 1
    assert f"another xenovia up (pid {os.getpid()}) is running with home {tmp_path}" in result.stderr
    assert "started collector" not in result.stderr
    # The lock goes with the process that held it.
    second = GatewayProcesses(tmp_path, port=free_port())
    second.claim_home()
    second.stop()


def test_same_listener_and_admin_port_rejected(tmp_path):
    port = free_port()

    result = run_up(tmp_path, "--port", str(port), "--admin-port", str(port))

    assert result.returncode == 1
    assert f"the listener and Envoy admin ports are both {port}" in result.stderr
