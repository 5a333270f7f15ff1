"""Benchmark of the trace pipeline: ``python -m ext_proc.traces.bench_export``.

Measures, on the embedded chDB store in a temporary home folder:

1. ``TraceExporter.submit`` cost in microseconds per call;
2. the collector write path in-process: ``TraceWriter.submit`` (encoding and scrub check
   of the traces) and the writer's ProtobufList inserts, in trace rows per second;
3. end to end: exporters in this process send over the Unix socket to a collector
   subprocess, timed until the collector reports every trace written;
4. with ``--rate R --seconds S``: exporters submit R traces per second for S seconds, as
   a gateway's workers do, and the collector's CPU time (user + system, from
   /proc/PID/stat) is reported per trace.

Each trace carries a 600-byte message body, one custom property and two steps.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Self

import grpc

from ext_proc.pb import trace_pb2, trace_pb2_grpc
from ext_proc.traces import collector_socket_path
from ext_proc.traces.cost import PriceTable
from ext_proc.traces.exporter import TraceExporter
from ext_proc.traces.rows import RowBuilder
from ext_proc.traces.scrub import Scrubber
from ext_proc.traces.spool import Spool
from ext_proc.traces.store import TraceStore
from ext_proc.traces.writer import TraceWriter, WriterSettings

_MESSAGE = '[{"role":"user","content":"' + "Summarise the quarterly report please. " * 15 + '"}]'


def sample_traces(count: int) -> list[trace_pb2.Trace]:
    now = time.time_ns()
    traces = []
    for index in range(count):
        trace_id = str(uuid.uuid4())
        trace = trace_pb2.Trace(
            trace_id=trace_id,
            start_unix_nano=now + index * 1000,
            end_unix_nano=now + index * 1000 + 40_000_000,
            session_id=str(uuid.uuid4()),
            session_turn=index % 7,
            proxy_id=f"proxy-{index % 8}",
            org_id="org-1",
            provider="openai",
            model="gpt-4o-mini",
            model_served="gpt-4o-mini-2024-07-18",
            request_type="chat_completions",
            method="POST",
            path="/a/proxy/openai/v1/chat/completions",
            messages=_MESSAGE,
            response_content="The report shows growth in every region.",
            tokens_in=420,
            tokens_out=35,
            usage_reported=True,
            latency_ms=40.0 + index % 100,
            overhead_ms=1.5,
            policy_ms=0.4,
            status=200,
            policy_outcome="allow",
            custom_properties={"team": f"team-{index % 5}"},
        )
        trace.steps.add(step_id=f"{trace_id}-p", step_type="policy", name="request", latency_ms=0.4)
        trace.steps.add(step_id=f"{trace_id}-l", step_type="llm", name="chat", latency_ms=38.0)
        traces.append(trace)
    return traces


def bench_submit(traces: list[trace_pb2.Trace]) -> float:
    async def run() -> float:
        exporter = TraceExporter(Path(tempfile.gettempdir()) / "absent.sock", max_queue=len(traces))
        exporter.start()
        started = time.perf_counter_ns()
        for trace in traces:
            exporter.submit(trace)
        elapsed = time.perf_counter_ns() - started
        # The queue is dropped unsent: this run only measures submit().
        await exporter.shutdown(deadline_s=0)
        return elapsed / len(traces) / 1000

    return asyncio.run(run())


def bench_write_path(home: Path, traces: list[trace_pb2.Trace], batch_size: int) -> float:
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    settings = WriterSettings(batch_size=batch_size, max_pending=len(traces))
    writer = TraceWriter(lambda: TraceStore.open(home), builder, Spool(home / "spool"), settings)
    writer.start()
    try:
        writer.call(lambda store: None).result()  # open and migrate before timing
        started = time.perf_counter()
        writer.submit(traces)
        while writer.counters.written + writer.counters.spooled < len(traces):
            time.sleep(0.001)
        elapsed = time.perf_counter() - started
        count = writer.call(lambda store: store.query("SELECT count() FROM traces", {}))
        written = count.result()[1][0][0]
    finally:
        writer.stop()
    if written != len(traces):
        raise RuntimeError(f"expected {len(traces)} rows, found {written}")
    return len(traces) / elapsed


def bench_end_to_end(home: Path, traces: list[trace_pb2.Trace], exporters: int) -> float:
    with _Collector(home) as collector:
        started = time.perf_counter()
        asyncio.run(_send_all(collector.socket_path, traces, exporters))
        collector.wait_written(len(traces))
        elapsed = time.perf_counter() - started
    return len(traces) / elapsed


def bench_steady_rate(
    home: Path, traces: list[trace_pb2.Trace], exporters: int, rate: float
) -> float:
    """Submit ``traces`` at ``rate`` per second and return the collector's CPU us per trace."""
    with _Collector(home) as collector:
        cpu_before = collector.cpu_seconds()
        asyncio.run(_send_at_rate(collector.socket_path, traces, exporters, rate))
        collector.wait_written(len(traces))
        cpu = collector.cpu_seconds() - cpu_before
    return cpu / len(traces) * 1e6


class _Collector:
    """A collector subprocess on ``home`` with a client for its Stats."""

    def __init__(self, home: Path) -> None:
        env = {key: value for key, value in os.environ.items() if key != "RUST_BACKTRACE"}
        env.pop("XENOVIA_CLICKHOUSE_URL", None)
        self.command = [sys.executable, "-m", "ext_proc.traces.collector", "--home", str(home)]
        self.env = env
        self.log_path = home / "collector.log"
        self.socket_path = collector_socket_path(home)

    def __enter__(self) -> Self:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.channel = grpc.insecure_channel(f"unix:{self.socket_path}")
        self.stub = trace_pb2_grpc.TraceCollectorStub(self.channel)
        try:
            _wait_for_collector(self.stub)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(60)

    def wait_written(self, count: int) -> None:
        while self.stub.Stats(trace_pb2.StatsRequest()).written < count:
            time.sleep(0.01)

    def cpu_seconds(self) -> float:
        # Fields 14 and 15 of /proc/PID/stat (after the parenthesised command name) are
        # user and system time in clock ticks, summed over all threads.
        stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _send_all(socket_path: Path, traces: list[trace_pb2.Trace], count: int) -> None:
    exporters = [TraceExporter(socket_path, max_queue=len(traces)) for _ in range(count)]
    for exporter in exporters:
        exporter.start()
    for index, trace in enumerate(traces):
        exporters[index % count].submit(trace)
        if index % 1000 == 999:
            await asyncio.sleep(0)  # let the flush tasks run, as a worker's loop would
    await asyncio.gather(*(exporter.shutdown(deadline_s=120) for exporter in exporters))


async def _send_at_rate(
    socket_path: Path, traces: list[trace_pb2.Trace], count: int, rate: float
) -> None:
    # Default exporter settings, as the gateway's workers use them.
    exporters = [TraceExporter(socket_path) for _ in range(count)]
    for exporter in exporters:
        exporter.start()
    started = time.perf_counter()
    sent = 0
    while sent < len(traces):
        due = min(len(traces), int((time.perf_counter() - started) * rate) + 1)
        for index in range(sent, due):
            exporters[index % count].submit(traces[index])
        sent = due
        await asyncio.sleep(0.002)
    await asyncio.gather(*(exporter.shutdown(deadline_s=120) for exporter in exporters))


def _wait_for_collector(stub: trace_pb2_grpc.TraceCollectorStub) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            stub.Stats(trace_pb2.StatsRequest(), timeout=1)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.traces.bench_export")
    parser.add_argument("--traces", type=int, default=200_000, help="traces per measurement")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=WriterSettings().batch_size,
        help="traces per insert (default: the collector's)",
    )
    parser.add_argument("--exporters", type=int, default=2, help="exporters sending end to end")
    parser.add_argument(
        "--rate",
        type=float,
        help="instead, submit this many traces per second and report the collector's CPU",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of --rate")
    args = parser.parse_args(argv)

    if args.rate:
        return _main_rate(args)
    traces = sample_traces(args.traces)
    print(f"traces per run: {args.traces} (2 steps each, {len(_MESSAGE)}-byte message)")
    print(f"submit(): {bench_submit(traces):.3f} us per call")
    with tempfile.TemporaryDirectory() as direct_home:
        rate = bench_write_path(Path(direct_home), traces, args.batch_size)
    print(
        f"write path in-process (batch {args.batch_size}): {rate:,.0f} trace rows/s"
        f" + {2 * rate:,.0f} step rows/s = {3 * rate:,.0f} rows/s"
    )
    with tempfile.TemporaryDirectory() as e2e_home:
        rate = bench_end_to_end(Path(e2e_home), traces, args.exporters)
    print(
        f"end to end, {args.exporters} exporters -> collector: {rate:,.0f} trace rows/s"
        f" ({3 * rate:,.0f} rows/s with steps)"
    )
    return 0


def _main_rate(args: argparse.Namespace) -> int:
    traces = sample_traces(max(1, int(args.rate * args.seconds)))
    with tempfile.TemporaryDirectory() as home:
        cpu_us = bench_steady_rate(Path(home), traces, args.exporters, args.rate)
    print(
        f"steady {args.rate:,.0f} traces/s for {args.seconds:g} s, {args.exporters} exporters:"
        f" collector CPU {cpu_us:,.0f} us per trace ({len(traces)} traces)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
