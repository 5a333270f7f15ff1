"""Read the gateway's own timings from its stored traces, through the collector's Query RPC."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from ext_proc.pb import trace_pb2, trace_pb2_grpc
from ext_proc.traces import collector_socket_path
from ext_proc.traces.queries import CollectorReader

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_SECONDS = 30.0

_TRACES_SQL = """
SELECT
    if(stream, concat('stream ', stream_policy_mode), 'plain') AS call,
    count() AS traces,
    quantilesExactInclusive(0.5, 0.99)(policy_ms) AS policy_ms,
    quantilesExactInclusive(0.5, 0.99)(overhead_ms) AS overhead_ms,
    quantilesExactInclusive(0.5, 0.99)(latency_ms) AS latency_ms,
    countIf(status != 200) AS failed
FROM traces
WHERE has(splitByChar(',', {proxy_ids:String}), proxy_id)
GROUP BY call
ORDER BY call
"""

_STEPS_SQL = """
SELECT name, count() AS steps, quantilesExactInclusive(0.5, 0.99)(latency_ms) AS latency_ms
FROM trace_steps
WHERE has(splitByChar(',', {proxy_ids:String}), proxy_id) AND step_type = 'policy'
GROUP BY name
ORDER BY name
"""


@dataclass(frozen=True)
class CallTimings:
    """Per-trace timings of one kind of call, in milliseconds: (p50, p99)."""

    call: str
    traces: int
    failed: int
    policy_ms: tuple[float, float]
    overhead_ms: tuple[float, float]
    latency_ms: tuple[float, float]


@dataclass(frozen=True)
class TraceStats:
    calls: list[CallTimings]
    # Policy step name (request_policy, response_policy) -> (count, p50 ms, p99 ms).
    policy_steps: dict[str, tuple[int, float, float]]
    written: int
    dropped: int


def wait_for_flush(socket_path: Path) -> trace_pb2.StatsResponse:
    """Wait until the collector has no unwritten traces in memory; return its counters."""
    time.sleep(1.0)  # the workers' exporters send within 0.5 s; let them send the last batch
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = trace_pb2_grpc.TraceCollectorStub(channel)
        deadline = time.monotonic() + FLUSH_TIMEOUT_SECONDS
        while True:
            stats = stub.Stats(trace_pb2.StatsRequest(), timeout=5)
            if stats.pending == 0 or time.monotonic() > deadline:
                return stats
            time.sleep(0.2)


def read_trace_stats(home: Path, proxy_ids: list[str]) -> TraceStats:
    socket_path = collector_socket_path(home)
    counters = wait_for_flush(socket_path)
    reader = CollectorReader(socket_path)
    try:
        _, rows = reader.query(_TRACES_SQL, {"proxy_ids": ",".join(proxy_ids)})
        calls = [
            CallTimings(
                call=row[0],
                traces=int(row[1]),
                failed=int(row[5]),
                policy_ms=tuple(row[2]),
                overhead_ms=tuple(row[3]),
                latency_ms=tuple(row[4]),
            )
            for row in rows
        ]
        _, step_rows = reader.query(_STEPS_SQL, {"proxy_ids": ",".join(proxy_ids)})
        steps = {row[0]: (int(row[1]), row[2][0], row[2][1]) for row in step_rows}
    finally:
        reader.close()
    return TraceStats(calls, steps, counters.written, counters.dropped)
