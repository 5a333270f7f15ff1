"""`xenovia up --no-envoy`: workers and collector for an Envoy the operator runs.

The tests speak the ext_proc gRPC protocol to each worker, as Envoy's ext_proc filter does.
"""

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from gateway_harness import REPO_ROOT, child_environment, free_port
from gateway_harness import stop_group
from test_supervisor import wait_for_line

from ext_proc.envoy_config import render_envoy_config
from ext_proc.supervisor import envoy_binary

RUNNING_LINE = "running without Envoy"


def start_without_envoy(home, *args: str) -> tuple[subprocess.Popen, list[str]]:
    """Start `xenovia up --no-envoy`; return the process and the endpoints it printed."""
    environment = child_environment(home)
    process = subprocess.Popen(
        [sys.executable, "-m", "ext_proc.cli", "up", "--no-envoy", *args], env=environment,
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        lines = wait_for_line(process, RUNNING_LINE)
    except AssertionError:
        stop_group(process)
        raise
    printed = [line.rstrip("\n") for line in lines if line.strip().startswith("- endpoint:")]
    # Indented as under lb_endpoints in envoy/envoy.yaml, so that they paste there as printed.
    assert all(line.startswith("        - endpoint:") for line in printed), printed
    return process, [line.strip() for line in printed]


def grpc_target(endpoint_line: str) -> str:
    """Turn a printed Envoy endpoint line into a gRPC target."""
    pipe = re.search(r"pipe: \{ path: (\S+) \}", endpoint_line)
    if pipe:
        return f"unix:{pipe.group(1)}"
    tcp = re.search(r"socket_address: \{ address: (\S+), port_value: (\d+) \}", endpoint_line)
    return f"{tcp.group(1)}:{tcp.group(2)}"


def health_over_ext_proc(target: str) -> tuple[int, dict]:
    """Send the request headers of GET /healthz to a worker; return its immediate reply."""
    headers = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":method", raw_value=b"GET"),
        base_pb2.HeaderValue(key=":path", raw_value=b"/healthz"),
        base_pb2.HeaderValue(key=":authority", raw_value=b"127.0.0.1"),
    ])
    request = ext_proc_pb2.ProcessingRequest(
        request_headers=ext_proc_pb2.HttpHeaders(headers=headers, end_of_stream=True)
    )
    with grpc.insecure_channel(target) as channel:
        stub = ext_proc_grpc.ExternalProcessorStub(channel)
        replies = stub.Process(iter([request]), timeout=10)
        reply = next(replies)
        replies.cancel()
    return reply.immediate_response.status.code, json.loads(reply.immediate_response.body)


def test_workers_answer_on_unix_sockets(tmp_path):
    home = tmp_path / "home"
    # The listener port is taken: without Envoy, nothing may need it.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        process, endpoints = start_without_envoy(
            home, "--workers", "2", "--port", str(busy_port)
        )
    try:
        answers = [health_over_ext_proc(grpc_target(line)) for line in endpoints]
        envoy_config_written = (home / "run" / "envoy.yaml").exists()
    finally:
        stop_group(process)

    assert endpoints == [
        f"- endpoint: {{ address: {{ pipe: {{ path: {home / 'run' / f'ext_proc.{index}.sock'} }} }} }}"
        for index in range(2)
    ]
    for status, body in answers:
        assert status == 200
        assert body["status"] == "ok"
    assert not envoy_config_written
    assert process.returncode == 0


def test_workers_answer_on_fixed_tcp_ports(tmp_path):
    first_port = free_port()
    process, endpoints = start_without_envoy(
        tmp_path / "home", "--ext-proc-transport", "tcp", "--ext-proc-port", str(first_port)
    )
    try:
        status, body = health_over_ext_proc(f"127.0.0.1:{first_port}")
    finally:
        stop_group(process)

    assert endpoints == [
        f"- endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {first_port} }} }} }}"
    ]
    assert status == 200
    assert body["status"] == "ok"


def test_ext_proc_port_needs_tcp(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "up", "--no-envoy", "--ext-proc-port", "9000",
         "--ext-proc-transport", "unix"],
        env=child_environment(tmp_path), cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=60,
    )

    assert result.returncode == 2
    assert result.stderr == "error: --ext-proc-port needs --ext-proc-transport tcp\n"


def test_ext_proc_port_in_use_rejected(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.cli", "up", "--no-envoy",
             "--ext-proc-transport", "tcp", "--ext-proc-port", str(port)],
            env=child_environment(tmp_path), cwd=REPO_ROOT, capture_output=True, text=True,
            timeout=60,
        )

    assert result.returncode == 1
    assert (f"ext_proc worker 0 port {port} on 127.0.0.1 is in use by another process; "
            "choose another with --ext-proc-port") in result.stderr


def test_own_envoy_uses_printed_endpoints(tmp_path):
    """An Envoy the operator runs, with the printed endpoints, serves /healthz through the workers."""
    home = tmp_path / "home"
    process, endpoints = start_without_envoy(home)
    port = free_port()
    config = tmp_path / "own-envoy.yaml"
    rendered = render_envoy_config(listen_port=port, admin_port=0, ext_proc_endpoints=[])
    config.write_text(rendered.replace("      - lb_endpoints:\n",
                                       "      - lb_endpoints:\n        " + endpoints[0] + "\n"))
    envoy = subprocess.Popen(
        [envoy_binary(), "-c", str(config), "--disable-hot-restart", "--log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        health = wait_for_health(f"http://127.0.0.1:{port}/healthz", envoy)
    finally:
        envoy.terminate()
        envoy.wait(10)
        stop_group(process)

    assert health["status"] == "ok"
    assert "registry_version" in health


def wait_for_health(url: str, envoy: subprocess.Popen, timeout: float = 30.0) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert envoy.poll() is None, f"Envoy exited with status {envoy.returncode}"
        try:
            with opener.open(url, timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
