import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.pop("RUST_BACKTRACE", None)

from gateway_harness import RunningGateway, free_port  # noqa: E402

from ext_proc.mock_provider import run_in_thread  # noqa: E402

PROVIDER_KEY = "sk-provider-test-credential"


@pytest.fixture(scope="session")
def provider():
    with run_in_thread() as mock:
        yield mock


@dataclass
class ProxyAccess:
    proxy_id: str
    key: str
    base_url: str


class GatewayFixture:
    """A running gateway plus helpers to create proxies and keys through the real CLI."""

    def __init__(self, running: RunningGateway, provider) -> None:
        self.running = running
        self.provider = provider

    def __getattr__(self, name):
        return getattr(self.running, name)

    def new_proxy(self, name: str = "test", *extra: str, upstream_url: str | None = None) -> ProxyAccess:
        url = upstream_url or self.provider.base_url
        proxy_id = self.running.cli(
            "proxy", "create", "--name", name, "--upstream-url", url,
            "--upstream-key-env", "XENOVIA_TEST_PROVIDER_KEY", *extra,
        ).stdout.strip()
        key = self.running.change_registry("key", "create", "--proxy", proxy_id).stdout.strip()
        return ProxyAccess(proxy_id, key, self.running.base_url(proxy_id))

    def attach(self, proxy_id: str, stage: str, path: Path, *extra: str):
        return self.running.change_registry(
            "policy", "attach", "--proxy", proxy_id, "--stage", stage, *extra, str(path), check=False
        )

    def traces(self, *args: str) -> list[dict]:
        result = self.running.cli("traces", "list", "--json", *args)
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, provider):
    home = tmp_path_factory.mktemp("home")
    running = RunningGateway(home, {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY}).start()
    try:
        yield GatewayFixture(running, provider)
    finally:
        status = running.stop()
        assert status == 0, f"gateway stopped with {status}:\n{running.log_tail()}"


def wait_for_trace(home: Path, trace_id: str, timeout: float = 15.0) -> dict:
    """Return the stored trace row (with its steps under "steps"), waiting for the exporter."""
    import time

    from ext_proc.traces import collector_socket_path
    from ext_proc.traces.queries import CollectorReader

    reader = CollectorReader(collector_socket_path(home))
    try:
        deadline = time.monotonic() + timeout
        while True:
            names, rows = reader.query(
                "SELECT * FROM traces WHERE toString(trace_id) = {trace_id:String}", {"trace_id": trace_id}
            )
            if rows:
                trace = dict(zip(names, rows[0]))
                step_names, step_rows = reader.query(
                    "SELECT * FROM trace_steps WHERE toString(trace_id) = {trace_id:String} "
                    "ORDER BY timestamp", {"trace_id": trace_id},
                )
                trace["steps"] = [dict(zip(step_names, row)) for row in step_rows]
                return trace
            if time.monotonic() > deadline:
                raise AssertionError(f"trace {trace_id} was not stored within {timeout} s")
            time.sleep(0.1)
    finally:
        reader.close()


@pytest.fixture(scope="session")
def redis_url():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server not found on PATH; install it with `make system-deps` "
            "(apt-get install redis-server)",
            pytrace=False,
        )
    port = free_port()
    command = [binary, "--save", "", "--appendonly", "no", "--port", str(port)]
    command += ["--bind", "127.0.0.1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(process, url)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_redis(process: subprocess.Popen, url: str) -> None:
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                output = process.stdout.read().decode(errors="replace")
                pytest.fail(f"redis-server exited with {process.returncode}:\n{output}")
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        pytest.fail(f"redis-server did not answer PING on {url} within 10 s")
    finally:
        client.close()


def sse_payloads(body: bytes) -> list:
    """Return the data of every SSE event in a body: parsed JSON, or the text for [DONE]."""
    payloads = []
    for event in body.decode().split("\n\n"):
        lines = [line[6:] for line in event.splitlines() if line.startswith("data: ")]
        if lines:
            data = "\n".join(lines)
            payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads
