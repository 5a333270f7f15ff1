"""SIGKILL of the trace collector: every acknowledged Export is stored exactly once.

The collector appends each Export to its write-ahead log before acknowledging it. A
restarted collector moves what is left to the spool and replays it with the batch tokens
that the killed one used.
"""

from __future__ import annotations

import os
import struct
import signal
import threading
import time
from pathlib import Path

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


def start_export_load(collector) -> tuple[list[str], threading.Event, threading.Thread]:
    """Export batches of 50 traces until the event is set; acknowledged ids go to the list."""
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
    return acked, stop_sending, sender


def collector_under_load(tmp_path):
    """Start a collector and the export load; return them once 3000 traces are acknowledged.

    Flushes are short, so batches are inserted and released while Exports keep arriving.
    """
    collector = CollectorProcess(tmp_path, "--flush-interval", "0.1", "--idle-flush", "0.05")
    collector.start()
    acked, stop_sending, sender = start_export_load(collector)
    try:
        wait_until(lambda: collector.stats().written >= 1000, message="first batches written")
        wait_until(lambda: len(acked) >= 3000, message="3000 traces acknowledged")
    except BaseException:
        stop_sending.set()
        raise
    return collector, acked, stop_sending, sender


def test_sigkill_under_load_stores_acked_once(tmp_path):
    collector, acked, stop_sending, sender = collector_under_load(tmp_path)
    try:
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


def spooled_batches(spool: Spool) -> dict[str, int]:
    """Return the number of traces of each spooled batch, by token."""
    batches = {}
    for path in sorted(spool.directory.glob("*.batch")):
        token, payload = spool.read(path)
        batches[token] = len(trace_pb2.ExportRequest.FromString(payload).traces)
    return batches


def test_recovery_skips_undecodable_export(tmp_path, caplog):
    # The record's checksum matches, but its body is not an ExportRequest.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    wal = WriteAheadLog(wal_path(tmp_path))
    wal.append([encoded(builder, 0, 5).payload, b"\xff\xff\xff", encoded(builder, 5, 5).payload])
    os.close(wal._fd)
    segment = next(wal_path(tmp_path).glob("*.wal"))
    original = segment.read_bytes()

    spool = Spool(spool_path(tmp_path))
    assert len(WriteAheadLog.recover(wal_path(tmp_path), spool)) == 10
    assert list(spooled_batches(spool).values()) == [10]
    assert not list(wal_path(tmp_path).glob("*.wal"))
    assert segment.with_suffix(".corrupt").read_bytes() == original
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "export 1 " in errors[0]
    assert str(segment) in errors[0]


def test_collector_starts_with_undecodable_export(tmp_path):
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    traces = [simple_trace(index) for index in range(20)]
    wal = WriteAheadLog(wal_path(tmp_path))
    wal.append([builder.chunk(traces).payload, b"\xff\xff\xff"])
    os.close(wal._fd)

    with CollectorProcess(tmp_path, "--flush-interval", "0.2") as collector:
        wait_replayed(collector)
        assert collector.scalar("SELECT count() FROM traces") == 20
        assert "does not decode" in collector.log()
    assert len(list(wal_path(tmp_path).glob("*.corrupt"))) == 1


def damaged_log(tmp_path, builder: RowBuilder) -> tuple[Path, list[int]]:
    """Write exports 0-1, batch b1 of them, exports 2-3, batch b2 of them and export 4.

    Return the segment and the offset of each of the seven records."""
    wal = WriteAheadLog(wal_path(tmp_path))
    wal.append([encoded(builder, 0, 3).payload, encoded(builder, 3, 4).payload])
    wal.mark_batch("b1", 2)
    wal.append([encoded(builder, 7, 5).payload, encoded(builder, 12, 6).payload])
    wal.mark_batch("b2", 2)
    wal.append([encoded(builder, 18, 8).payload])
    os.close(wal._fd)
    segment = next(wal_path(tmp_path).glob("*.wal"))
    data = segment.read_bytes()
    offsets = []
    offset = 0
    while offset < len(data):
        offsets.append(offset)
        (length,) = struct.unpack_from(">I", data, offset + 13)
        offset += 21 + length
    assert len(offsets) == 7
    return segment, offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("record", "field_offset"),
    [(3, 30), (3, 0), (3, 16), (6, 30)],
    ids=["body", "magic", "length", "last-record-body"],
)
def test_recovery_skips_only_damaged_export(tmp_path, caplog, record, field_offset):
    # Export 2 (record 3) or export 4 (record 6, the last one) has one flipped byte: only
    # its traces are lost, and batch b2 after it keeps its token.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    segment, offsets = damaged_log(tmp_path, builder)
    flip_byte(segment, offsets[record] + field_offset)

    spool = Spool(spool_path(tmp_path))
    WriteAheadLog.recover(wal_path(tmp_path), spool)
    batches = spooled_batches(spool)
    if record == 3:
        assert batches.pop("b1") == 7
        assert batches.pop("b2") == 6
        assert list(batches.values()) == [8]
        where = "in the middle"
    else:
        assert batches == {"b1": 7, "b2": 11}
        where = "at the end"
    assert segment.with_suffix(".corrupt").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert where in errors[0]
    assert f"at offset {offsets[record]} " in errors[0]
    if record == 3:
        assert f"skipped {offsets[4] - offsets[3]} damaged bytes" in errors[0]


def test_recovery_damaged_batch_record(tmp_path, caplog):
    # Batch b1's record is damaged. The writer recorded b2 only after it had finished
    # b1, so b1's exports are stored or spooled already and are not spooled again.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    segment, offsets = damaged_log(tmp_path, builder)
    flip_byte(segment, offsets[2] + 25)

    spool = Spool(spool_path(tmp_path))
    assert len(WriteAheadLog.recover(wal_path(tmp_path), spool)) == 19
    batches = spooled_batches(spool)
    assert batches.pop("b2") == 11
    assert list(batches.values()) == [8]
    assert "have no batch record" in caplog.text


def stopped_with_export_record(collector: CollectorProcess) -> tuple[Path, int]:
    """Stop the collector (SIGSTOP) when its log has an export record with batch records
    after it; return the segment and the record's offset."""
    for _ in range(200):
        os.kill(collector.process.pid, signal.SIGSTOP)
        for segment in wal_path(collector.home).glob("*.wal"):
            data = segment.read_bytes()
            offset = data.find(b"XTW1", len(data) // 4)
            while offset != -1 and data[offset + 4] != 1:
                offset = data.find(b"XTW1", offset + 1)
            if offset != -1 and data.find(b"XTW1\x02", offset) != -1:
                return segment, offset
        os.kill(collector.process.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("no export record with a batch record after it in the log")


def test_recovery_after_damage_under_load_stores_once(tmp_path):
    # A killed collector's log with a flipped byte in a middle record: the traces of
    # that record are lost, the rest is stored once.
    collector, acked, stop_sending, sender = collector_under_load(tmp_path)
    try:
        segment, damaged = stopped_with_export_record(collector)
    finally:
        stop_sending.set()
    flip_byte(segment, damaged + 30)
    os.kill(collector.process.pid, signal.SIGKILL)
    os.kill(collector.process.pid, signal.SIGCONT)
    assert collector.process.wait(30) == -signal.SIGKILL
    collector.channel.close()
    collector.channel = None
    sender.join()

    with CollectorProcess(tmp_path, "--flush-interval", "0.2") as reopened:
        wait_replayed(reopened)
        counts = stored_counts(reopened)
        assert set(counts.values()) == {1}
        lost = set(acked) - set(counts)
        # Only the damaged record's export (50 traces) is lost.
        assert len(lost) <= 50
        assert "in the middle" in reopened.log()
