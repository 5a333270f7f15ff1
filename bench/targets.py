"""The systems under load: the mock provider, plain Envoy, Envoy with the no-op ext_proc,
and the full gateway started with ``xenovia up``.

Each target serves POST <base>/chat/completions and stops every process it started.
"""

from __future__ import annotations

import logging
import signal
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.processes import (
    REPO_ROOT,
    ChildProcess,
    StartError,
    child_environment,
    children_of,
    envoy_binary,
    free_port,
    http_ok,
    resident_kib,
    wait_until,
)
from ext_proc.supervisor import GRPC_ENVIRONMENT

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
POLICY_DIR = BENCH_DIR.parent / "policies"
REQUEST_POLICY = POLICY_DIR / "bench_request.rego"
RESPONSE_POLICY = POLICY_DIR / "bench_response.rego"
# Plain Envoy and the no-op routes match this literal proxy id; the gateway makes its own.
PLAIN_PROXY_ID = "prx_bench"
PROVIDER_KEY_ENV = "XENOVIA_BENCH_PROVIDER_KEY"
PROVIDER_KEY = "sk-bench-provider-credential"
# Roles under which the report sums CPU time per request.
ENVOY_ROLE = "Envoy"
SERVICE_ROLE = "ext_proc"
COLLECTOR_ROLE = "collector"


class MockTarget:
    """The mock provider, started once and used directly and as every Envoy's upstream."""

    name = "mock provider"

    def __init__(self, work_dir: Path) -> None:
        port_file = work_dir / "provider.port"
        self.child = ChildProcess(
            "mock provider",
            [
                sys.executable,
                "-m",
                "ext_proc.mock_provider",
                "--port",
                "0",
                "--port-file",
                str(port_file),
                "--no-record",
            ],
            work_dir / "provider.log",
        )
        wait_until(port_file.exists, "mock provider", [self.child])
        self.port = int(port_file.read_text())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.child.stop()


def _start_envoy(
    name: str, template: Path, values: dict, work_dir: Path, others: list[ChildProcess]
) -> tuple[ChildProcess, int]:
    listen_port, admin_port = free_port(), free_port()
    config = string.Template(template.read_text()).substitute(
        values, listen_port=listen_port, admin_port=admin_port
    )
    config_path = work_dir / f"{name}.yaml"
    config_path.write_text(config)
    envoy = ChildProcess(
        name,
        [
            envoy_binary(),
            "-c",
            str(config_path),
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--concurrency",
            "1",
        ],
        work_dir / f"{name}.log",
    )
    wait_until(lambda: http_ok(f"http://127.0.0.1:{admin_port}/ready"), name, [envoy, *others])
    return envoy, listen_port


class PlainEnvoyTarget:
    """Envoy with the gateway's listener, route and cluster settings and no ext_proc."""

    name = "plain Envoy"

    def __init__(self, work_dir: Path, provider_port: int) -> None:
        self.envoy, port = _start_envoy(
            "envoy-plain",
            BENCH_DIR / "envoy_plain.yaml",
            {"proxy_id": PLAIN_PROXY_ID, "provider_port": provider_port},
            work_dir,
            [],
        )
        self.base_url = f"http://127.0.0.1:{port}/a/{PLAIN_PROXY_ID}/openai/v1"

    def cpu_pids(self) -> dict[str, list[int]]:
        """Return the PIDs whose CPU time counts as this target's, by role."""
        return {ENVOY_ROLE: [self.envoy.pid]}

    def stop(self) -> None:
        self.envoy.stop()


@dataclass(frozen=True)
class NoopPhases:
    """The ext_proc phases Envoy sends to the no-op service, as Envoy processing_mode values."""

    label: str
    request_body_mode: str = "NONE"
    response_header_mode: str = "SKIP"
    response_body_mode: str = "NONE"


NOOP_HEADERS_ONLY = NoopPhases("request headers")
NOOP_PHASE_VARIANTS = (
    NoopPhases("+ request body (buffered)", request_body_mode="BUFFERED"),
    NoopPhases("+ response headers", request_body_mode="BUFFERED", response_header_mode="SEND"),
    NoopPhases(
        "+ response body (buffered)",
        request_body_mode="BUFFERED",
        response_header_mode="SEND",
        response_body_mode="BUFFERED",
    ),
)


class NoopTarget:
    """Plain Envoy plus the no-op Python ext_proc, with the given phases sent to it."""

    def __init__(self, work_dir: Path, provider_port: int, phases: NoopPhases) -> None:
        self.name = f"no-op ext_proc: {phases.label}"
        socket_path = work_dir / "noop.sock"
        socket_path.unlink(missing_ok=True)
        self.service = ChildProcess(
            "no-op ext_proc",
            [sys.executable, "-m", "bench.noop_ext_proc", "--socket", str(socket_path)],
            work_dir / "noop.log",
            # The floor runs with the gRPC settings `xenovia up` gives the gateway's workers.
            dict(GRPC_ENVIRONMENT),
        )
        try:
            wait_until(socket_path.exists, "no-op ext_proc", [self.service])
            values = {
                "proxy_id": PLAIN_PROXY_ID,
                "provider_port": provider_port,
                "ext_proc_socket": socket_path,
                "request_body_mode": phases.request_body_mode,
                "response_header_mode": phases.response_header_mode,
                "response_body_mode": phases.response_body_mode,
            }
            self.envoy, port = _start_envoy(
                "envoy-noop", BENCH_DIR / "envoy_noop.yaml", values, work_dir, [self.service]
            )
        except StartError:
            self.service.stop()
            raise
        self.base_url = f"http://127.0.0.1:{port}/a/{PLAIN_PROXY_ID}/openai/v1"

    def service_rss_kib(self) -> int | None:
        return resident_kib(self.service.pid)

    def cpu_pids(self) -> dict[str, list[int]]:
        return {ENVOY_ROLE: [self.envoy.pid], SERVICE_ROLE: [self.service.pid]}

    def stop(self) -> None:
        self.envoy.stop()
        self.service.stop()


def run_cli(home: Path, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "--home", str(home), *args],
        check=False,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    if completed.returncode != 0:
        raise StartError(
            f"xenovia {' '.join(args)} failed ({completed.returncode}): {completed.stderr[-2000:]}"
        )
    return completed.stdout.strip()


class GatewayTarget:
    """The full gateway (``xenovia up``) in a fresh home, with the bench policies attached.

    Three proxies share one key: ``proxy_id`` holds streamed answers until the response
    policy has run (the default, ``hold``), ``live_proxy_id`` evaluates them event by event,
    and ``open_proxy_id`` has the request policy only, so its streams pass without holding.
    """

    def __init__(self, home: Path, provider_url: str, workers: int) -> None:
        self.name = f"gateway, {workers} worker{'s' if workers > 1 else ''}"
        self.home = home
        self.workers = workers
        home.mkdir(parents=True, exist_ok=True)
        self.proxy_id = self._create_proxy("bench", provider_url)
        self.live_proxy_id = self._create_proxy(
            "bench-live", provider_url, "--stream-policy-mode", "live"
        )
        self.open_proxy_id = self._create_proxy("bench-open", provider_url, stages=("request",))
        self.key = run_cli(
            home, "key", "create", "--proxy", self.proxy_id, "--proxy", self.live_proxy_id,
            "--proxy", self.open_proxy_id,
        )
        port, admin_port = free_port(), free_port()
        self.child = ChildProcess(
            self.name,
            [
                sys.executable,
                "-m",
                "ext_proc.cli",
                "--home",
                str(home),
                "up",
                "--port",
                str(port),
                "--admin-port",
                str(admin_port),
                "--workers",
                str(workers),
            ],
            home / "gateway.log",
            {"XENOVIA_HOME": str(home), PROVIDER_KEY_ENV: PROVIDER_KEY},
        )
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{self.url}/healthz"), self.name, [self.child])
        self.base_url = self.proxy_url(self.proxy_id)

    def _create_proxy(
        self, name: str, provider_url: str, *options: str, stages=("request", "response")
    ) -> str:
        proxy_id = run_cli(
            self.home,
            "proxy",
            "create",
            "--name",
            name,
            "--upstream-url",
            provider_url,
            "--upstream-key-env",
            PROVIDER_KEY_ENV,
            *options,
        )
        for stage, path in (("request", REQUEST_POLICY), ("response", RESPONSE_POLICY)):
            if stage not in stages:
                continue
            run_cli(
                self.home, "policy", "attach", "--proxy", proxy_id, "--stage", stage, str(path)
            )
        return proxy_id

    def proxy_url(self, proxy_id: str) -> str:
        return f"{self.url}/a/{proxy_id}/openai/v1"

    def cpu_pids(self) -> dict[str, list[int]]:
        pids: dict[str, list[int]] = {ENVOY_ROLE: [], SERVICE_ROLE: [], COLLECTOR_ROLE: []}
        for pid, command in children_of(self.child.pid):
            if "ext_proc.server" in command:
                pids[SERVICE_ROLE].append(pid)
            elif "ext_proc.traces.collector" in command:
                pids[COLLECTOR_ROLE].append(pid)
            elif " -c " in command and "envoy" in command:
                pids[ENVOY_ROLE].append(pid)
        return pids

    def service_processes(self) -> list[tuple[int, str]]:
        """Return (pid, role) of the ext_proc workers and the trace collector."""
        found = []
        for pid, command in children_of(self.child.pid):
            if "ext_proc.server" in command:
                found.append((pid, "worker"))
            elif "ext_proc.traces.collector" in command:
                found.append((pid, "collector"))
        return found

    def stop(self) -> None:
        # `xenovia up` stops its collector, workers and Envoy on SIGINT, in reverse order.
        status = self.child.stop(signal.SIGINT)
        if status != 0:
            logger.warning(
                "%s exited with status %s:\n%s", self.name, status, self.child.log_tail()
            )
