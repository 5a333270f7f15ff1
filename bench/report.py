"""Turn one benchmark run into Markdown tables, a machine description and target checks."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from bench.load import LoadResult
from bench.processes import envoy_binary
from bench.targets import (
    COLLECTOR_ROLE,
    ENVOY_ROLE,
    NOOP_PHASE_VARIANTS,
    SERVICE_ROLE,
    NoopPhases,
)

MOCK = "mock provider, direct"
PLAIN = "plain Envoy"
NOOP = "no-op ext_proc: request headers"
# A hand-written section at the end of the output file that a new run keeps as it is.
ANALYSIS_HEADING = "## Analysis"

# Targets for the gateway; every added time is measured against plain Envoy.
ADDED_P50_MAX_MS = 1.0
ADDED_P99_MAX_MS = 2.0
THROUGHPUT_RATIO_MIN = 0.35
TTFT_ADDED_MAX_MS = 1.5
POLICY_EVAL_MAX_US = 50.0
SERVICE_MEMORY_MAX_MB = 150.0
# Two workers count as faster than one only beyond the spread between runs of one setup.
SCALING_MIN_GAIN = 0.1


def noop_label(phases: NoopPhases) -> str:
    return f"no-op ext_proc: {phases.label}"


def gateway_label(workers: int) -> str:
    return f"gateway, {workers} worker{'s' if workers > 1 else ''}"


def live_label(label: str) -> str:
    return f"{label}, live stream policy"


def open_label(label: str) -> str:
    return f"{label}, no response policy"


GATEWAY = gateway_label(1)
GATEWAY_2 = gateway_label(2)


def print_load_line(target: str, call: str, clients: int, result: LoadResult) -> None:
    print(
        f"{target:<42} {call:<12} c={clients}  {result.requests_per_second:9.1f} req/s  "
        f"p50 {result.p50_ms:7.3f} ms  p99 {result.p99_ms:7.3f} ms  "
        f"errors {result.failures}",
        flush=True,
    )


def print_ttft_line(target: str, clients: int, result) -> None:
    print(
        f"{target:<42} TTFT         c={clients}  p50 {result.ttft_p50_ms:7.3f} ms  "
        f"p99 {result.ttft_p99_ms:7.3f} ms  ({result.samples} requests, "
        f"{result.failures} failed)",
        flush=True,
    )


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _baseline_call(call: str) -> str:
    return "stream" if call.startswith("stream") else call


def _added(results, target: str, call: str, clients: int) -> tuple[float, float, float] | None:
    """Return (added p50, added p99, throughput ratio) of a cell over plain Envoy."""
    cell = results.load.get((target, call, clients))
    base = results.load.get((PLAIN, _baseline_call(call), clients))
    if cell is None or base is None:
        return None
    ratio = cell.requests_per_second / base.requests_per_second if base.requests_per_second else 0
    return cell.p50_ms - base.p50_ms, cell.p99_ms - base.p99_ms, ratio


# Sections.


def machine_section(results) -> list[str]:
    after = results.load_average_after
    rows = [
        ["CPU", _cpu_model()],
        ["Cores (online)", str(os.cpu_count())],
        ["Memory", _memory_total()],
        ["Kernel", platform.release()],
        ["Envoy", _command_output([envoy_binary(), "--version"]).split("version:")[-1].strip()],
        ["Python", sys.version.split()[0]],
        ["wrk", _command_output(["wrk", "--version"]).splitlines()[0]],
        [
            "Load average (1, 5, 15 min) before the run",
            ", ".join(f"{value:.2f}" for value in results.load_average_before),
        ],
        [
            "Load average after the run",
            ", ".join(f"{value:.2f}" for value in after) if after else "-",
        ],
    ]
    return ["## Machine", ""] + _table(["", ""], rows)


def load_section(results) -> list[str]:
    rows = []
    for (target, call, clients), cell in results.load.items():
        added = None if target == PLAIN else _added(results, target, call, clients)
        rows.append(
            [
                target,
                call,
                str(clients),
                f"{cell.requests_per_second:,.0f}",
                _fmt(cell.p50_ms, 3),
                _fmt(cell.p99_ms, 3),
                _signed(added[0]) if added else "-",
                _signed(added[1]) if added else "-",
                _fmt(added[2]) if added else "-",
                str(cell.failures),
            ]
        )
    header = [
        "System",
        "Call",
        "Clients",
        "req/s",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "added p99 ms",
        "x plain Envoy req/s",
        "errors",
    ]
    return [
        "## Throughput and latency (wrk)",
        "",
        (
            "Added times and the throughput ratio compare with plain Envoy on the same call and "
            "client count. `stream live` is the same streamed call on a proxy whose response "
            "policy runs event by event instead of holding the answer."
        ),
        "",
    ] + _table(header, rows)


def ttft_section(results) -> list[str]:
    rows = []
    for (target, clients), cell in results.ttft.items():
        base = results.ttft.get((PLAIN, clients))
        added = base is not None and target != PLAIN
        rows.append(
            [
                target,
                str(clients),
                _fmt(cell.ttft_p50_ms, 3),
                _fmt(cell.ttft_p99_ms, 3),
                _signed(cell.ttft_p50_ms - base.ttft_p50_ms) if added else "-",
                _signed(cell.ttft_p99_ms - base.ttft_p99_ms) if added else "-",
                _fmt(cell.total_p50_ms, 1),
                str(cell.samples),
                str(cell.failures),
            ]
        )
    header = [
        "System",
        "Clients",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "added p50 ms",
        "added p99 ms",
        "whole answer p50 ms",
        "requests",
        "failed",
    ]
    return [
        "## Streamed time to first token (bench/ttft.py)",
        "",
        (
            "The mock provider spaces the stream's events 5 ms apart "
            "(`x-mock-chunk-delay-ms: 5`), so the first event arrives well before the whole "
            "answer."
        ),
        "",
    ] + _table(header, rows)


def phase_section(results) -> list[str]:
    """Attribute the added latency to ext_proc phases with the no-op variants."""
    labels = [NOOP] + [noop_label(phases) for phases in NOOP_PHASE_VARIANTS] + [GATEWAY]
    rows = []
    previous = 0.0
    for label in labels:
        one = _added(results, label, "plain", 1)
        eight = _added(results, label, "plain", 8)
        if one is None:
            continue
        rows.append(
            [
                label,
                _signed(one[0]),
                _signed(one[0] - previous),
                _signed(one[1]),
                _fmt(eight[2]) if eight else "-",
            ]
        )
        previous = one[0]
    header = [
        "Configuration (plain calls)",
        "added p50 ms, 1 client",
        "step over the row above",
        "added p99 ms, 1 client",
        "x plain Envoy req/s, 8 clients",
    ]
    lines = [
        "## Where the added time goes, per ext_proc phase",
        "",
        (
            "Each no-op row sends Envoy one more ext_proc phase than the row above; the service "
            "answers every message with an empty reply. The gateway sends request headers, the "
            "buffered request body, response headers and the buffered response body for plain "
            "calls."
        ),
        "",
    ]
    lines += _table(header, rows)
    stats = results.trace_stats
    if stats:
        lines += [
            "",
            (
                "Time spent inside the gateway's Python handlers per request (trace column "
                "`overhead_ms`: the sum over all ext_proc messages of one request, without gRPC "
                "transport and without building the trace), and its policy share (`policy_ms`: "
                "building the policy input plus evaluation, both stages):"
            ),
            "",
        ]
        rows = [
            [
                c.call,
                str(c.traces),
                _fmt(c.overhead_ms[0], 3),
                _fmt(c.overhead_ms[1], 3),
                _fmt(c.policy_ms[0], 3),
                _fmt(c.policy_ms[1], 3),
                str(c.failed),
            ]
            for c in stats.calls
        ]
        lines += _table(
            [
                "Call (1-worker run)",
                "traces",
                "overhead p50 ms",
                "overhead p99 ms",
                "policy p50 ms",
                "policy p99 ms",
                "status != 200",
            ],
            rows,
        )
        lines += [
            "",
            (
                "Traces with a status other than 200 are requests that wrk cut off when a "
                "run ended; `stream none` is a cut-off stream whose mode was never decided."
            ),
        ]
    if results.handler_costs:
        lines += [
            "",
            (
                "The same handlers timed alone, message by message, on an idle loop "
                "(`bench/handler_cost.py`: one plain call at a time, no gRPC, no Envoy; "
                "`trace` is building and queueing the trace when the stream ends):"
            ),
            "",
        ]
        lines += _table(
            ["Message", "p50 us", "p99 us"],
            [[c.phase, _fmt(c.p50_us, 0), _fmt(c.p99_us, 0)] for c in results.handler_costs],
        )
    return lines


def cpu_section(results) -> list[str]:
    roles = ["mock provider", ENVOY_ROLE, SERVICE_ROLE, COLLECTOR_ROLE]
    rows = []
    for (target, call, clients), by_role in results.cpu_us.items():
        cells = [_fmt(by_role[role], 0) if role in by_role else "-" for role in roles]
        rows.append([target, call, str(clients), *cells, _fmt(sum(by_role.values()), 0)])
    header = ["System", "Call", "Clients", *(f"{role} us" for role in roles), "total us"]
    lines = [
        "## CPU time per request",
        "",
        (
            "User plus system CPU time of each process during the measured run (from "
            "/proc/<pid>/stat, 10 ms ticks), divided by the requests wrk completed. wrk's own CPU "
            "time is not counted. With two cores, 2,000,000 us of CPU per second is all there "
            "is, so the total bounds the 8-client throughput."
        ),
        "",
    ] + _table(header, rows)
    switch_rows = []
    for (target, call, clients), by_role in results.switches.items():
        cells = [_fmt(by_role[role], 1) if role in by_role else "-" for role in roles]
        switch_rows.append([target, call, str(clients), *cells, _fmt(sum(by_role.values()), 1)])
    if switch_rows:
        lines += [
            "",
            (
                "Context switches per request in the same runs (voluntary and involuntary, all "
                "threads, from /proc/<pid>/task/*/status). Each one is a thread that went to "
                "sleep waiting, or was preempted, and had to be woken again:"
            ),
            "",
        ]
        lines += _table(["System", "Call", "Clients", *roles, "total"], switch_rows)
    return lines


def policy_section(results) -> list[str]:
    lines = ["## Policy evaluation", ""]
    stats = results.trace_stats
    if stats and stats.policy_steps:
        rows = [
            [name, str(count), _fmt(p50 * 1000, 0), _fmt(p99 * 1000, 0)]
            for name, (count, p50, p99) in stats.policy_steps.items()
        ]
        lines += [
            (
                "From the gateway's traces (policy steps of the 1-worker run; input build "
                "plus evaluation):"
            ),
            "",
        ]
        lines += _table(["Step", "count", "p50 us", "p99 us"], rows) + [""]
    rows = [
        [t.stage, t.policy, str(t.input_bytes), t.outcome, _fmt(t.p50_us, 0), _fmt(t.p99_us, 0)]
        for t in results.policy_timings
    ]
    lines += [
        (
            "`PolicyEngine.evaluate()` alone on the sample inputs in policies/samples/ "
            "(bench/policy_eval.py, 5000 calls):"
        ),
        "",
    ]
    lines += _table(["Stage", "Policy", "input bytes", "outcome", "p50 us", "p99 us"], rows)
    return lines


def export_section(results) -> list[str]:
    lines = [
        "## Trace export",
        "",
        (
            "`python -m ext_proc.traces.bench_export --traces 50000`, then "
            "`--rate 300 --seconds 10` for the collector's CPU at a steady rate "
            "(embedded chDB in a temporary home):"
        ),
        "",
        "```",
    ]
    lines += results.export_lines + ["```"]
    if results.trace_stats:
        lines += [
            "",
            (
                f"The 1-worker gateway run stored {results.trace_stats.written:,} traces "
                f"and dropped {results.trace_stats.dropped}."
            ),
        ]
    return lines


def memory_section(results) -> list[str]:
    rows = [[name, _fmt(kib / 1024, 1)] for name, kib in results.memory_kib.items()]
    return ["## Resident memory after the load (VmRSS)", ""] + _table(["Process", "MB"], rows)


def targets_section(results) -> list[str]:
    checks = []

    one = _added(results, GATEWAY, "plain", 1)
    if one:
        checks.append(
            (
                f"1 client: added p50 <= {ADDED_P50_MAX_MS} ms",
                f"{one[0]:.2f} ms",
                one[0] <= ADDED_P50_MAX_MS,
            )
        )
        checks.append(
            (
                f"1 client: added p99 <= {ADDED_P99_MAX_MS} ms",
                f"{one[1]:.2f} ms",
                one[1] <= ADDED_P99_MAX_MS,
            )
        )
    floor = _added(results, NOOP, "plain", 1)
    if one and floor:
        checks.append(
            (
                "1 client: added p50 within 10% of the no-op floor",
                f"{one[0]:.2f} ms vs floor {floor[0]:.2f} ms",
                one[0] <= floor[0] * 1.1,
            )
        )

    eight = _added(results, GATEWAY, "plain", 8)
    if eight:
        checks.append(
            (
                f"8 clients, 1 worker: >= {THROUGHPUT_RATIO_MIN}x plain Envoy req/s",
                f"{eight[2]:.2f}x",
                eight[2] >= THROUGHPUT_RATIO_MIN,
            )
        )
    eight_two = _added(results, GATEWAY_2, "plain", 8)
    if eight and eight_two:
        one_worker = results.load[(GATEWAY, "plain", 8)].requests_per_second
        two_workers = results.load[(GATEWAY_2, "plain", 8)].requests_per_second
        checks.append(
            (
                f"8 clients: 2 workers at least {SCALING_MIN_GAIN:.0%} faster than 1",
                f"{two_workers:,.0f} vs {one_worker:,.0f} req/s",
                two_workers >= one_worker * (1 + SCALING_MIN_GAIN),
            )
        )

    for label in (open_label(GATEWAY), live_label(GATEWAY), GATEWAY):
        cell, base = results.ttft.get((label, 1)), results.ttft.get((PLAIN, 1))
        if cell and base:
            added = cell.ttft_p50_ms - base.ttft_p50_ms
            checks.append(
                (
                    f"TTFT added <= {TTFT_ADDED_MAX_MS} ms ({label}, 1 client, p50)",
                    f"{added:.2f} ms",
                    added <= TTFT_ADDED_MAX_MS,
                )
            )
    for timing in results.policy_timings:
        checks.append(
            (
                f"policy evaluate() <= {POLICY_EVAL_MAX_US:.0f} us ({timing.stage}, p50)",
                f"{timing.p50_us:.0f} us",
                timing.p50_us <= POLICY_EVAL_MAX_US,
            )
        )

    workers = [kib for name, kib in results.memory_kib.items() if ": worker " in name]
    if workers:
        largest = max(workers) / 1024
        checks.append(
            (
                f"service memory <= {SERVICE_MEMORY_MAX_MB:.0f} MB (largest worker)",
                f"{largest:.0f} MB",
                largest <= SERVICE_MEMORY_MAX_MB,
            )
        )

    rows = [[name, value, "met" if ok else "**not met**"] for name, value, ok in checks]
    return ["## Targets", ""] + _table(["Target", "Measured", "Result"], rows)


def render(results, previous: Path | None = None) -> str:
    when = datetime.datetime.fromtimestamp(results.started).strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Benchmark results",
        "",
        (
            f"Written by `make bench` (`python -m bench.run`) on {when}: wrk with one thread, "
            f"{results.duration:.0f} s per run after a warm-up, all processes on this machine. "
            "The request is the support-chat sample of policies/samples/request_chat.json "
            "(about 2.5 KB, gpt-4o-mini); the answer is the mock provider's short default answer. "
            "Envoy runs with `--concurrency 1` in every configuration. The gateway has "
            "policies/bench_request.rego and policies/bench_response.rego attached, tracing on "
            "(embedded chDB) and the default SQLite session store. How the run works: "
            "bench/README.md."
        ),
        "",
    ]
    for section in (
        machine_section(results),
        targets_section(results),
        load_section(results),
        ttft_section(results),
        phase_section(results),
        cpu_section(results),
        policy_section(results),
        export_section(results),
        memory_section(results),
    ):
        lines += section + [""]
    text = "\n".join(lines)
    analysis = _kept_analysis(previous)
    return text + ("\n" + analysis if analysis else "")


def _kept_analysis(previous: Path | None) -> str:
    if previous is None or not previous.exists():
        return ""
    text = previous.read_text()
    index = text.find("\n" + ANALYSIS_HEADING)
    return text[index + 1 :] if index >= 0 else ""


def _cpu_model() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def _memory_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _command_output(command: list[str]) -> str:
    try:
        completed = subprocess.run(command, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return (completed.stdout + completed.stderr).strip() or "unknown"
