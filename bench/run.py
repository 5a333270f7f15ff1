"""``make bench``: the same load against the mock provider, plain Envoy, a no-op ext_proc
and the full gateway, in one process tree; prints the tables and writes bench/RESULTS.md.

    python -m bench.run [--duration 10] [--warmup 2] [--output bench/RESULTS.md]

Everything runs on 127.0.0.1 on free ports, in a temporary folder that is removed at the
end. Every process the run starts is stopped by its PID before it exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import handler_cost, policy_eval, report, ttft
from bench.load import LoadResult, Request, run_wrk
from bench.processes import (
    REPO_ROOT,
    child_environment,
    context_switches,
    cpu_seconds,
    resident_kib,
)
from bench.targets import (
    NOOP_HEADERS_ONLY,
    NOOP_PHASE_VARIANTS,
    GatewayTarget,
    MockTarget,
    NoopTarget,
    PlainEnvoyTarget,
)
from bench.trace_stats import TraceStats, read_trace_stats

logger = logging.getLogger(__name__)

SAMPLE_REQUEST = REPO_ROOT / "policies" / "samples" / "request_chat.json"
# Spaces the stream's events so that time to first token differs from the whole response.
TTFT_CHUNK_DELAY_MS = 5
TTFT_SECONDS = 6.0
TTFT_WARMUP_SECONDS = 1.0
EXPORT_BENCH_TRACES = 50_000
# Traces per second in the steady run: about what one worker serves at 8 clients.
EXPORT_STEADY_RATE = 300
CLIENTS = (1, 8)


@dataclass
class Results:
    """Everything one run measured; report.py turns it into tables."""

    duration: float
    load: dict[tuple[str, str, int], LoadResult] = field(default_factory=dict)
    ttft: dict[tuple[str, int], ttft.TtftResult] = field(default_factory=dict)
    memory_kib: dict[str, int] = field(default_factory=dict)
    # (target, call, clients) -> role -> CPU microseconds per request during the measured run.
    cpu_us: dict[tuple[str, str, int], dict[str, float]] = field(default_factory=dict)
    # The same keys -> role -> context switches per request (all threads of the role's PIDs).
    switches: dict[tuple[str, str, int], dict[str, float]] = field(default_factory=dict)
    trace_stats: TraceStats | None = None
    policy_timings: list[policy_eval.EvalTiming] = field(default_factory=list)
    export_lines: list[str] = field(default_factory=list)
    handler_costs: list[handler_cost.PhaseCost] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    # Other programs on the machine share its cores, so the report shows how busy it was.
    load_average_before: tuple[float, float, float] = field(default_factory=os.getloadavg)
    load_average_after: tuple[float, float, float] | None = None


class Bench:
    def __init__(self, work_dir: Path, duration: float, warmup: float) -> None:
        self.work_dir = work_dir
        self.duration = duration
        self.warmup = warmup
        self.results = Results(duration)
        self.mock_pid = 0
        # Role -> PIDs of the target under load, whose CPU time each run records.
        self.target_pids: dict[str, list[int]] = {}
        self.plain_body, self.stream_body = write_bodies(work_dir)
        self.headers = {
            "Content-Type": "application/json",
            "Authorization": "Bearer xe_not_checked_outside_the_gateway",
            "X-Xenovia-Property-team": "support",
        }

    def request(self, base_url: str, call: str, headers: dict[str, str] | None = None) -> Request:
        body = self.plain_body if call == "plain" else self.stream_body
        return Request(f"{base_url}/chat/completions", body, {**self.headers, **(headers or {})})

    def load(self, target: str, call: str, clients: int, request: Request) -> None:
        if self.warmup > 0:
            run_wrk(request, clients, self.warmup)
        pids = {**self.target_pids, "mock provider": [self.mock_pid]}
        before = _cpu_by_role(pids)
        switches_before = _switches_by_role(pids)
        result = run_wrk(request, clients, self.duration)
        after = _cpu_by_role(pids)
        switches_after = _switches_by_role(pids)
        self.results.load[(target, call, clients)] = result
        if result.requests:
            self.results.cpu_us[(target, call, clients)] = {
                role: (after[role] - before[role]) / result.requests * 1e6 for role in pids
            }
            self.results.switches[(target, call, clients)] = {
                role: (switches_after[role] - switches_before[role]) / result.requests
                for role in pids
            }
        report.print_load_line(target, call, clients, result)

    def ttft(self, target: str, request: Request) -> None:
        delayed = Request(
            request.url,
            request.body_file,
            {**request.headers, "x-mock-chunk-delay-ms": str(TTFT_CHUNK_DELAY_MS)},
        )
        for clients in CLIENTS:
            result = ttft.run(delayed, clients, TTFT_SECONDS, TTFT_WARMUP_SECONDS)
            self.results.ttft[(target, clients)] = result
            report.print_ttft_line(target, clients, result)

    def standard_cells(self, target: str, base_url: str, calls=("plain", "stream")) -> None:
        for call in calls:
            for clients in CLIENTS:
                self.load(target, call, clients, self.request(base_url, call))

    def run(self) -> Results:
        mock = MockTarget(self.work_dir)
        self.mock_pid = mock.child.pid
        try:
            self.standard_cells(report.MOCK, mock.base_url)
            self.ttft(report.MOCK, self.request(mock.base_url, "stream"))
            self.run_plain_envoy(mock.port)
            self.run_noop(mock.port)
            self.run_gateway(mock.base_url, workers=1)
            self.run_gateway(mock.base_url, workers=2)
        finally:
            mock.stop()
        self.results.export_lines = run_export_bench()
        self.results.policy_timings = policy_eval.measure_all()
        self.results.handler_costs = handler_cost.measure()
        self.results.load_average_after = os.getloadavg()
        return self.results

    def run_plain_envoy(self, provider_port: int) -> None:
        plain = PlainEnvoyTarget(self.work_dir, provider_port)
        self.target_pids = plain.cpu_pids()
        try:
            self.standard_cells(report.PLAIN, plain.base_url)
            self.ttft(report.PLAIN, self.request(plain.base_url, "stream"))
        finally:
            plain.stop()

    def run_noop(self, provider_port: int) -> None:
        noop = NoopTarget(self.work_dir, provider_port, NOOP_HEADERS_ONLY)
        self.target_pids = noop.cpu_pids()
        try:
            self.standard_cells(report.NOOP, noop.base_url)
            self.ttft(report.NOOP, self.request(noop.base_url, "stream"))
            self.results.memory_kib["no-op ext_proc"] = noop.service_rss_kib() or 0
        finally:
            noop.stop()
        for phases in NOOP_PHASE_VARIANTS:
            variant = NoopTarget(self.work_dir, provider_port, phases)
            self.target_pids = variant.cpu_pids()
            try:
                self.standard_cells(report.noop_label(phases), variant.base_url, calls=("plain",))
            finally:
                variant.stop()

    def run_gateway(self, provider_url: str, workers: int) -> None:
        home = self.work_dir / f"home-{workers}"
        gateway = GatewayTarget(home, provider_url, workers)
        label = report.gateway_label(workers)
        self.headers["Authorization"] = f"Bearer {gateway.key}"
        self.target_pids = gateway.cpu_pids()
        try:
            live_url = gateway.proxy_url(gateway.live_proxy_id)
            if workers == 1:
                self.standard_cells(label, gateway.base_url)
                for clients in CLIENTS:
                    self.load(label, "stream live", clients, self.request(live_url, "stream"))
                self.ttft(label, self.request(gateway.base_url, "stream"))
                self.ttft(report.live_label(label), self.request(live_url, "stream"))
                open_url = gateway.proxy_url(gateway.open_proxy_id)
                self.ttft(report.open_label(label), self.request(open_url, "stream"))
            else:
                self.load(label, "plain", 1, self.request(gateway.base_url, "plain"))
                self.load(label, "plain", 8, self.request(gateway.base_url, "plain"))
                self.load(label, "stream", 8, self.request(gateway.base_url, "stream"))
            self.record_memory(gateway, workers)
            if workers == 1:
                self.results.trace_stats = read_trace_stats(
                    home, [gateway.proxy_id, gateway.live_proxy_id]
                )
        finally:
            gateway.stop()

    def record_memory(self, gateway: GatewayTarget, workers: int) -> None:
        worker_index = 0
        for pid, role in sorted(gateway.service_processes()):
            name = f"{workers}-worker gateway: {role}"
            if role == "worker":
                name += f" {worker_index}"
                worker_index += 1
            self.results.memory_kib[name] = resident_kib(pid) or 0


def _cpu_by_role(pids: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(pid) or 0.0 for pid in group) for role, group in pids.items()}


def _switches_by_role(pids: dict[str, list[int]]) -> dict[str, int]:
    return {
        role: sum(context_switches(pid) or 0 for pid in group) for role, group in pids.items()
    }


def write_bodies(work_dir: Path) -> tuple[Path, Path]:
    """Write the plain and streamed chat request bodies (the support-chat sample, ~2.5 KB)."""
    body = json.loads(SAMPLE_REQUEST.read_text())["request"]
    plain = work_dir / "chat.json"
    plain.write_text(json.dumps({**body, "stream": False}))
    stream = work_dir / "chat_stream.json"
    stream.write_text(json.dumps({**body, "stream": True}))
    return plain, stream


def run_export_bench() -> list[str]:
    """Run ext_proc.traces.bench_export for throughput, then at a steady gateway-like rate."""
    lines = _export_bench(["--traces", str(EXPORT_BENCH_TRACES)])
    return lines + _export_bench(["--rate", str(EXPORT_STEADY_RATE), "--seconds", "10"])


def _export_bench(arguments: list[str]) -> list[str]:
    completed = subprocess.run(
        [sys.executable, "-m", "ext_proc.traces.bench_export", *arguments],
        check=False,
        env=child_environment(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
    )
    if completed.returncode != 0:
        logger.error(
            "trace export bench failed (%d): %s", completed.returncode, completed.stderr[-2000:]
        )
        return [f"failed with status {completed.returncode}"]
    return [line for line in completed.stdout.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per load run (default 10)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="unmeasured seconds before each load run (default 2)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=REPO_ROOT / "bench" / "RESULTS.md",
        help="Markdown file to write the results to",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder (configs, logs, trace store)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    work_dir = Path(tempfile.mkdtemp(prefix="xenovia-bench-"))
    try:
        results = Bench(work_dir, args.duration, args.warmup).run()
    finally:
        if args.keep:
            print(f"kept {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    text = report.render(results, previous=args.output)
    print(text)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
