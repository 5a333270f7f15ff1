"""SIGKILL of the trace collector: every acknowledged Export is stored exactly once.

The collector appends each Export to its write-ahead log before acknowledging it. A
restarted collector moves what is left to the spool and replays it with the batch tokens
that the killed one used.
"""

from __future__ import annotations

import os
import signal
import threading

import grpc
import pytest
from test_traces_support import CollectorProcess, simple_trace, wait_until

from ext_proc.pb import trace_pb2
from ext_proc.traces import spool_path, wal_path
from ext_proc.traces.cost import PriceTable
from ext_proc.traces.rows import RowBuilder
from ext_proc.traces.scrub import Scrubber
from ext_proc.traces.spool import Spool, WriteAheadLog
from ext_proc.traces.store import TraceStore
from ext_proc.traces.writer import TraceWriter, WriterSettings

pytestmark = pytest.mark.timeout(600)


def kill(collector: CollectorProcess) -> None:
    os.kill(collector.process.pid, signal.SIGKILL)
    assert collector.process.wait(30) == -signal.SIGKILL
    collector.channel.close()
    collector.channel = None


def stored_counts(collector: CollectorProcess) -> dict[str, int]:
    rows = collector.query("SELECT trace_id, count() AS n FROM traces GROUP BY trace_id")
    return {row["trace_id"]: row["n"] for row in rows}


def wait_replayed(collector: CollectorProcess) -> None:
    def replayed():
        stats = collector.stats()
        return stats.spool_batches == 0 and stats.pending == 0

    wait_until(replayed, 120, message="spool replayed")


def test_sigkill_after_acks_keeps_queued_traces(tmp_path):
    # A long flush interval and large batches keep every acknowledged trace in memory.
    collector = CollectorProcess(tmp_path, "--flush-interval", "30", "--batch-size", "50000")
    collector.start()
    acked = []
    for start in range(0, 800, 100):
        traces = [simple_trace(start + offset) for offset in range(100)]
        assert collector.export(traces) == 100
        acked += [trace.trace_id for trace in traces]
    assert collector.stats().written == 0
    kill(collector)

    with CollectorProcess(tmp_path, "--flush-interval", "0.2") as reopened:
        wait_replayed(reopened)
        counts = stored_counts(reopened)
        assert len(counts) == len(acked)
        assert set(counts) == set(acked)
        assert set(counts.values()) == {1}
        assert reopened.scalar("SELECT count() FROM trace_steps") == len(acked)
        assert "write-ahead log" in reopened.log()
    assert not list(wal_path(tmp_path).glob("*.wal"))


def test_sigkill_under_load_stores_acked_once(tmp_path):
    # Short flushes, so batches are inserted and released while Exports keep arriving.
    collector = CollectorProcess(tmp_path, "--flush-interval", "0.1", "--idle-flush", "0.05")
    collector.start()
    acked: list[str] = []
    stop_sending = threading.Event()

    def load():
        index = 0
        while not stop_sending.is_set():
            traces = [simple_trace(index + offset) for offset in range(50)]
            try:
                collector.export(traces)
            except grpc.RpcError:
                return
            acked.extend(trace.trace_id for trace in traces)
            index += 50

    sender = threading.Thread(target=load)
    sender.start()
    try:
        wait_until(lambda: collector.stats().written >= 1000, message="first batches written")
        wait_until(lambda: len(acked) >= 3000, message="3000 traces acknowledged")
        kill(collector)
    finally:
        stop_sending.set()
        sender.join()

    with CollectorProcess(tmp_path, "--flush-interval", "0.2") as reopened:
        wait_replayed(reopened)
        counts = stored_counts(reopened)
        # An Export in flight at the kill may be stored without being acknowledged.
        assert set(acked) <= set(counts)
        assert set(counts.values()) == {1}


def encoded(builder: RowBuilder, first: int, count: int):
    traces = [simple_trace(first + offset) for offset in range(count)]
    return builder.chunk(traces)


def test_recovered_batch_already_inserted_written_once(tmp_path):
    # The writer inserted a batch and was killed before releasing it from the log: the
    # recovered batch carries the same token, so its replay writes nothing.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    wal = WriteAheadLog(wal_path(tmp_path))
    inserted = [encoded(builder, 0, 20), encoded(builder, 20, 30)]
    left = encoded(builder, 50, 25)
    wal.append([chunk.payload for chunk in inserted])
    wal.append([left.payload])
    wal.mark_batch("batch-one", len(inserted))
    store = TraceStore.open(tmp_path)
    try:
        store.insert(builder.build_chunks(inserted), "batch-one")
    finally:
        store.close()
    # Killed here: the log is neither released nor closed.
    os.close(wal._fd)

    spool = Spool(spool_path(tmp_path))
    assert len(WriteAheadLog.recover(wal_path(tmp_path), spool)) == 75
    assert len(spool) == 2
    assert not list(wal_path(tmp_path).glob("*.wal"))

    writer = TraceWriter(lambda: TraceStore.open(tmp_path), builder, spool, WriterSettings())
    writer.start()
    wait_until(lambda: len(spool) == 0, message="spool replayed")
    traces = writer.call(lambda store: store.query("SELECT count() FROM traces", {})).result()
    steps = writer.call(lambda store: store.query("SELECT count() FROM trace_steps", {}))
    writer.stop()
    assert traces[1][0][0] == 75
    assert steps.result()[1][0][0] == 75


def test_recovery_ignores_incomplete_last_record(tmp_path):
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    wal = WriteAheadLog(wal_path(tmp_path))
    chunks = [encoded(builder, 0, 5), encoded(builder, 5, 5)]
    wal.append([chunk.payload for chunk in chunks])
    os.close(wal._fd)
    segment = next(wal_path(tmp_path).glob("*.wal"))
    with open(segment, "r+b") as handle:
        handle.truncate(segment.stat().st_size - 10)

    spool = Spool(spool_path(tmp_path))
    assert len(WriteAheadLog.recover(wal_path(tmp_path), spool)) == 5
    token, payload = spool.read(spool.oldest())
    assert token.startswith("wal-")
    assert len(trace_pb2.ExportRequest.FromString(payload).traces) == 5


def test_export_resent_after_recovery_written_once(tmp_path):
    # The collector logged this Export and was killed before its acknowledgement went
    # out, so the exporter sends it again to the restarted collector.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    traces = [simple_trace(index) for index in range(40)]
    wal = WriteAheadLog(wal_path(tmp_path))
    wal.append([builder.chunk(traces).payload])
    os.close(wal._fd)

    with CollectorProcess(tmp_path, "--flush-interval", "0.2") as collector:
        assert collector.export(traces) == 40
        wait_replayed(collector)
        assert collector.scalar("SELECT count() FROM traces") == 40
        assert collector.scalar("SELECT count() FROM trace_steps") == 40


def test_released_log_is_truncated_and_closed_log_removed(tmp_path):
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    wal = WriteAheadLog(wal_path(tmp_path), segment_bytes=1)
    for first in range(0, 30, 10):
        wal.append([encoded(builder, first, 10).payload])
    assert len(list(wal_path(tmp_path).glob("*.wal"))) == 3
    last = wal.mark_batch("batch", 2)
    wal.release(last)
    assert len(list(wal_path(tmp_path).glob("*.wal"))) == 1
    wal.release(wal.mark_batch("rest", 1))
    segments = list(wal_path(tmp_path).glob("*.wal"))
    assert len(segments) == 1
    assert segments[0].stat().st_size == 0
    wal.close()
    assert not list(wal_path(tmp_path).glob("*.wal"))
