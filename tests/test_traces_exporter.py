"""TraceExporter against a real collector process over its Unix socket."""

from __future__ import annotations

import asyncio
import time

import pytest
from test_traces_support import CollectorProcess, simple_trace

from ext_proc.traces import collector_socket_path
from ext_proc.traces.exporter import TraceExporter

pytestmark = pytest.mark.timeout(300)


async def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the exporter")
        await asyncio.sleep(0.02)


def test_queue_bound_drops_and_counts(tmp_path):
    async def scenario():
        exporter = TraceExporter(tmp_path / "absent.sock", max_queue=10, batch_size=5)
        exporter.start()
        for index in range(15):
            exporter.submit(simple_trace(index))
        counters = exporter.counters
        assert counters.queued == 10
        assert counters.dropped == 5
        assert counters.pending == 10
        await wait_for(lambda: exporter.counters.retries >= 1)
        await exporter.shutdown(deadline_s=0.2)
        return exporter.counters

    counters = asyncio.run(scenario())
    assert counters.sent == 0
    assert counters.dropped == 15
    assert counters.pending == 0


def test_retries_until_collector_starts(tmp_path):
    socket_path = collector_socket_path(tmp_path)
    collector = CollectorProcess(tmp_path, "--flush-interval", "0.05")

    async def scenario():
        exporter = TraceExporter(socket_path, batch_size=40, flush_interval=0.01, retry_max_s=0.2)
        exporter.start()
        traces = [simple_trace(index) for index in range(100)]
        for trace in traces:
            exporter.submit(trace)
        await wait_for(lambda: exporter.counters.retries >= 3)
        assert exporter.counters.sent == 0
        await asyncio.to_thread(collector.start)
        await wait_for(lambda: exporter.counters.sent == 100)
        await exporter.shutdown()
        return exporter.counters, [trace.trace_id for trace in traces]

    try:
        counters, ids = asyncio.run(scenario())
        assert counters.dropped == 0
        collector.wait_drained(100)
        rows = collector.query("SELECT trace_id FROM traces")
        assert sorted(row["trace_id"] for row in rows) == sorted(ids)
    finally:
        collector.stop()


def test_shutdown_sends_partial_batch(tmp_path):
    with CollectorProcess(tmp_path) as collector:

        async def scenario():
            exporter = TraceExporter(collector.socket_path, batch_size=1000, flush_interval=30)
            exporter.start()
            for index in range(7):
                exporter.submit(simple_trace(index))
            await exporter.shutdown(deadline_s=10)
            return exporter.counters

        counters = asyncio.run(scenario())
        assert counters.sent == 7
        assert counters.dropped == 0
        collector.wait_drained(7)
        assert collector.scalar("SELECT count() FROM traces") == 7


def test_submit_after_shutdown_is_dropped(tmp_path):
    async def scenario():
        exporter = TraceExporter(tmp_path / "absent.sock")
        exporter.start()
        await exporter.shutdown(deadline_s=0.1)
        exporter.submit(simple_trace())
        return exporter.counters

    counters = asyncio.run(scenario())
    assert counters.queued == 0
    assert counters.dropped == 1


def test_lone_trace_sent_before_flush_interval(tmp_path):
    with CollectorProcess(tmp_path) as collector:

        async def scenario():
            exporter = TraceExporter(collector.socket_path, batch_size=1000, flush_interval=600)
            exporter.start()
            exporter.submit(simple_trace())
            # Counted before shutdown, because shutdown sends whatever is queued.
            await wait_for(lambda: exporter.counters.sent == 1)
            counters = exporter.counters
            await exporter.shutdown(deadline_s=10)
            return counters

        counters = asyncio.run(scenario())
        assert counters.sent == 1
        assert counters.pending == 0
