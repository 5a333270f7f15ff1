"""Helpers shared by the trace pipeline tests: a real collector process and sample traces."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

from ext_proc.pb import trace_pb2, trace_pb2_grpc
from ext_proc.traces import GRPC_OPTIONS, collector_socket_path

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90.0
# Yesterday 00:00 UTC: recent enough that the row TTL keeps it (expired rows are dropped
# at insert), with a known wall-clock time for timestamp checks.
BASE_TIME = datetime.datetime.combine(
    datetime.date.today() - datetime.timedelta(days=1), datetime.time(), datetime.UTC
)
BASE_NANO = int(BASE_TIME.timestamp()) * 1_000_000_000


def iso_at(offset_us: int) -> str:
    """Return the stored form of BASE_TIME plus ``offset_us`` microseconds."""
    return (BASE_TIME + datetime.timedelta(microseconds=offset_us)).isoformat()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05, message: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting: {message or predicate}")
        time.sleep(interval)


class CollectorProcess:
    """``python -m ext_proc.traces.collector`` started on a home folder, with a client."""

    def __init__(self, home: Path, *args: str, env: dict | None = None) -> None:
        self.home = home
        self.args = args
        self.env = {k: v for k, v in os.environ.items() if k != "RUST_BACKTRACE"}
        self.env.pop("XENOVIA_CLICKHOUSE_URL", None)
        self.env.update(env or {})
        self.socket_path = collector_socket_path(home)
        self.log_path = home / f"collector-{uuid.uuid4().hex[:8]}.log"
        self.process: subprocess.Popen | None = None
        self.channel: grpc.Channel | None = None
        self.stub: trace_pb2_grpc.TraceCollectorStub | None = None

    def start(self) -> CollectorProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "ext_proc.traces.collector", "--home", str(self.home)]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [*command, *self.args], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        self.channel = grpc.insecure_channel(f"unix:{self.socket_path}", options=list(GRPC_OPTIONS))
        self.stub = trace_pb2_grpc.TraceCollectorStub(self.channel)
        wait_until(self._answers, START_TIMEOUT_S, 0.1, f"collector start; log: {self.log()}")
        return self

    def _answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"collector exited with {self.process.returncode}: {self.log()}")
        try:
            self.stub.Stats(trace_pb2.StatsRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return True

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 60.0) -> int:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"collector did not stop on SIGTERM: {self.log()}") from None

    def export(self, traces: list[trace_pb2.Trace]) -> int:
        response = self.stub.Export(trace_pb2.ExportRequest(traces=traces), timeout=30)
        return response.accepted

    def stats(self) -> trace_pb2.StatsResponse:
        return self.stub.Stats(trace_pb2.StatsRequest(), timeout=10)

    def query(self, sql: str, **parameters) -> list[dict]:
        request = trace_pb2.QueryRequest(
            sql=sql, parameters={key: str(value) for key, value in parameters.items()}
        )
        response = self.stub.Query(request, timeout=60)
        names = list(response.column_names)
        return [dict(zip(names, json.loads(row))) for row in response.rows_json]

    def scalar(self, sql: str, **parameters):
        rows = self.query(sql, **parameters)
        return next(iter(rows[0].values()))

    def wait_drained(self, expected_queued: int, timeout: float = 120.0) -> trace_pb2.StatsResponse:
        """Wait until every queued trace is written and the spool is empty."""

        def drained():
            stats = self.stats()
            done = (
                stats.queued >= expected_queued
                and stats.pending == 0
                and stats.spool_batches == 0
                and stats.written + stats.dropped >= stats.queued
            )
            return stats if done else None

        return wait_until(drained, timeout, 0.1, "collector drained")

    def __enter__(self) -> CollectorProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def simple_trace(index: int = 0, **fields) -> trace_pb2.Trace:
    """A small trace with usage on a known model and one llm step."""
    trace = trace_pb2.Trace(
        trace_id=str(uuid.uuid4()),
        start_unix_nano=BASE_NANO + index * 1_000_000,
        end_unix_nano=BASE_NANO + index * 1_000_000 + 25_000_000,
        proxy_id="proxy-a",
        session_id=str(uuid.uuid4()),
        model="gpt-4o-mini",
        tokens_in=100,
        tokens_out=10,
        usage_reported=True,
        latency_ms=25.0,
        status=200,
        policy_outcome="allow",
    )
    trace.steps.add(
        step_id=f"{trace.trace_id}-llm",
        step_type="llm",
        name="chat.completions",
        start_unix_nano=trace.start_unix_nano + 1_000_000,
        latency_ms=20.0,
        status="ok",
    )
    for name, value in fields.items():
        if name == "custom_properties":
            trace.custom_properties.update(value)
        else:
            setattr(trace, name, value)
    return trace
