"""Store outages, spool replay, deduplication and shutdown of the collector, all for real.

The embedded store is made to fail by marking a table's data directory immutable
(``chattr +i``, which also stops root): the engine then cannot create the directory of a
new part, so inserts fail exactly as on a read-only or broken disk.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from test_traces_support import CollectorProcess, simple_trace, wait_until

from ext_proc.pb import trace_pb2
from ext_proc.traces import spool_path
from ext_proc.traces.cost import PriceTable
from ext_proc.traces.rows import RowBuilder
from ext_proc.traces.scrub import Scrubber
from ext_proc.traces.spool import Spool
from ext_proc.traces.store import TraceStore
from ext_proc.traces.writer import TraceWriter, WriterSettings

pytestmark = pytest.mark.timeout(600)


def table_directory(collector: CollectorProcess, table: str) -> Path:
    rows = collector.query(
        "SELECT data_paths FROM system.tables WHERE database = currentDatabase()"
        " AND name = {table:String}",
        table=table,
    )
    return Path(rows[0]["data_paths"][0])


@contextmanager
def immutable(*directories: Path):
    for directory in directories:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield
    finally:
        for directory in directories:
            subprocess.run(["chattr", "-i", str(directory)], check=True)


def counts(collector: CollectorProcess, table: str) -> tuple[int, int]:
    row = collector.query(f"SELECT count() AS n, uniqExact(trace_id, step_id) AS u FROM {table}")[0]
    return row["n"], row["u"]


def trace_counts(collector: CollectorProcess) -> tuple[int, int]:
    row = collector.query("SELECT count() AS n, uniqExact(trace_id) AS u FROM traces")[0]
    return row["n"], row["u"]


def send(collector: CollectorProcess, total: int, batch: int = 50) -> list[str]:
    ids = []
    for start in range(0, total, batch):
        traces = [simple_trace(start + offset) for offset in range(min(batch, total - start))]
        collector.export(traces)
        ids += [trace.trace_id for trace in traces]
    return ids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_store_outage_spools_and_replays_once(tmp_path):
    with CollectorProcess(tmp_path, "--flush-interval", "0.05") as collector:
        send(collector, 200)
        collector.wait_drained(200)
        directories = [table_directory(collector, name) for name in ("traces", "trace_steps")]

        with immutable(*directories):
            send(collector, 300)
            stats = wait_until(lambda: (s := collector.stats()).spooled >= 300 and s)
            assert stats.failed_batches >= 1
            assert stats.spool_batches >= 1
            assert trace_counts(collector) == (200, 200)
            send(collector, 100)

        stats = collector.wait_drained(600)
        assert stats.dropped == 0
        assert stats.replayed >= 300
        assert trace_counts(collector) == (600, 600)
        assert counts(collector, "trace_steps") == (600, 600)


def test_partial_batch_replay_is_deduplicated(tmp_path):
    # Only the steps table fails: each batch's traces are written, then the batch is
    # spooled; its replay must not write those traces a second time.
    with CollectorProcess(tmp_path, "--flush-interval", "0.05") as collector:
        send(collector, 10)
        collector.wait_drained(10)
        steps_directory = table_directory(collector, "trace_steps")

        with immutable(steps_directory):
            send(collector, 200)
            wait_until(lambda: collector.stats().spooled >= 200)
            assert trace_counts(collector)[0] >= 200

        stats = collector.wait_drained(210)
        assert stats.dropped == 0
        assert trace_counts(collector) == (210, 210)
        assert counts(collector, "trace_steps") == (210, 210)


def test_same_token_written_once(tmp_path):
    store = TraceStore.open(tmp_path)
    try:
        builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
        batch = builder.build([simple_trace(index) for index in range(5)])
        store.insert(batch, "token-a")
        store.insert(batch, "token-a")
        traces = store.query("SELECT count() FROM traces", {})[1][0][0]
        steps = store.query("SELECT count() FROM trace_steps", {})[1][0][0]
        assert (traces, steps) == (5, 5)
        store.insert(batch, "token-b")
        assert store.query("SELECT count() FROM traces", {})[1][0][0] == 10
    finally:
        store.close()


def test_unreachable_server_spools_then_replays_after_restart(tmp_path):
    url = f"http://default:secret@127.0.0.1:{free_port()}/default"
    down = CollectorProcess(tmp_path, env={"XENOVIA_CLICKHOUSE_URL": url}).start()
    try:
        send(down, 300)
        stats = wait_until(lambda: (s := down.stats()).spooled >= 300 and s)
        assert stats.written == 0
        assert stats.dropped == 0
        with pytest.raises(grpc.RpcError) as raised:
            down.query("SELECT 1")
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "secret" not in down.log()
    finally:
        assert down.stop() == 0
    assert list(spool_path(tmp_path).glob("*.batch"))

    with CollectorProcess(tmp_path) as collector:
        wait_until(lambda: collector.stats().spool_batches == 0)
        assert trace_counts(collector) == (300, 300)
        assert counts(collector, "trace_steps") == (300, 300)
    assert not list(spool_path(tmp_path).glob("*.batch"))


def test_shutdown_under_load_keeps_every_trace(tmp_path):
    # A long flush interval and large batches leave most traces in memory at SIGTERM.
    collector = CollectorProcess(tmp_path, "--flush-interval", "30", "--batch-size", "50000")
    collector.start()
    sent = []
    stop_sending = threading.Event()

    def load():
        index = 0
        while not stop_sending.is_set():
            traces = [simple_trace(index + offset) for offset in range(200)]
            try:
                collector.export(traces)
            except grpc.RpcError:
                return
            sent.extend(trace.trace_id for trace in traces)
            index += 200

    sender = threading.Thread(target=load)
    sender.start()
    wait_until(lambda: len(sent) >= 5000)
    stop_sending.set()
    sender.join()
    assert collector.stop() == 0
    assert "trace writer stopped" in collector.log()

    with CollectorProcess(tmp_path) as reopened:
        wait_until(lambda: reopened.stats().spool_batches == 0)
        assert trace_counts(reopened) == (len(sent), len(sent))


def test_spool_limit_drops_and_counts(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/default"
    with CollectorProcess(
        tmp_path, "--spool-limit-mb", "1", env={"XENOVIA_CLICKHOUSE_URL": url}
    ) as down:
        big = "x" * 20_000
        for _ in range(10):
            down.export([simple_trace(index, messages=big) for index in range(10)])
        stats = wait_until(lambda: (s := down.stats()).spooled + s.dropped >= 100 and s)
        assert stats.dropped > 0
        assert stats.spool_bytes <= 1024 * 1024
        assert "trace spool" in down.log() and "is full" in down.log()


def test_replay_moves_invalid_spool_files_aside(tmp_path, caplog):
    # One spooled payload does not decode, one decodes in Python but the store rejects
    # it (a string field sent as a varint), and the batch after them is still replayed.
    builder = RowBuilder(PriceTable.builtin(), Scrubber(), 0)
    good = builder.chunk([simple_trace(index) for index in range(10)])
    wrong_type = b"\x08\x05" + simple_trace(10).SerializeToString()
    rejected = b"\x0a" + _VarintBytes(len(wrong_type)) + wrong_type
    assert len(trace_pb2.ExportRequest.FromString(rejected).traces) == 1
    spool = Spool(spool_path(tmp_path))
    spool.append("undecodable", b"\xff\xff\xff")
    spool.append("rejected", rejected)
    spool.append("good", good.payload)
    files = sorted(spool.directory.glob("*.batch"))

    settings = WriterSettings(retry_min_s=0.05, retry_max_s=0.2)
    writer = TraceWriter(lambda: TraceStore.open(tmp_path), builder, spool, settings)
    writer.start()
    try:
        wait_until(lambda: len(spool) == 0, 60, message="spool replayed")
        count = writer.call(lambda store: store.query("SELECT count() FROM traces", {}))
        assert count.result(60)[1][0][0] == 10
    finally:
        writer.stop()
    assert writer.counters.quarantined_batches == 2
    assert files[0].with_suffix(".corrupt").read_bytes()
    assert files[1].with_suffix(".corrupt").read_bytes()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(files[0]) in error and "does not decode" in error for error in errors)
    assert any(str(files[1]) in error and "rejects its content" in error for error in errors)
