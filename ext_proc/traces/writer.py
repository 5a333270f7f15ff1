"""The collector's writer thread: batches traces into the store, spools them in outages.

One thread owns the store and does all of its work: inserts, spool replay and the
read-only queries of the Query RPC. clickhouse-connect is blocking, and a chDB client is
kept on the thread that opened it.

While one batch is inserted, a second thread builds the next full batch. The embedded
engine releases the GIL during a query, so the two run at the same time.

Order is kept across an outage. Once a batch has failed, later batches go straight to the
spool, and the spool is replayed oldest first before new batches are written again.

With a write-ahead log, every queued chunk is appended to it before ``submit_chunks``
returns, each batch's token is recorded in it before the insert, and the chunks are
released from it once the batch is written, spooled or dropped. So a chunk that was
queued survives a kill of the process (see ``spool.WriteAheadLog``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from google.protobuf.message import DecodeError

from ext_proc.pb import trace_pb2
from ext_proc.traces.rows import RowBuilder, TraceChunk
from ext_proc.traces.spool import Spool, SpoolCorrupt, WriteAheadLog
from ext_proc.traces.store import StoreError, TraceStore

logger = logging.getLogger(__name__)

_ERROR_LOG_INTERVAL_S = 10.0
_COUNTER_LOG_INTERVAL_S = 60.0
# ClickHouse error names (the message ends with the name in brackets) that mean the
# inserted data is invalid, rather than that the store is unavailable. Each name is in
# the error code list of chDB 4.4.
# NOTE: a batch rejected with an error not listed here is retried until it is stored.
_CONTENT_ERRORS = frozenset(
    {
        "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_NUMBER",
        "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME",
        "CANNOT_CONVERT_TYPE",
        "INCORRECT_DATA",
        "TOO_LARGE_STRING_SIZE",
        "UNKNOWN_PROTOBUF_FORMAT",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    }
)


@dataclass
class WriterCounters:
    """Traces by fate since start (cumulative), plus current backlog in memory."""

    queued: int = 0
    written: int = 0
    spooled: int = 0
    dropped: int = 0
    failed_batches: int = 0
    replayed: int = 0
    # Spool files moved aside because they do not decode or the store rejects them.
    quarantined_batches: int = 0
    pending: int = 0


@dataclass(frozen=True)
class WriterSettings:
    # Larger inserts make fewer parts for the engine to write and merge. One run of
    # bench_export --traces 200000 on a shared 2-core machine wrote 37,000 traces/s with
    # batches of 5000 and 45,000 with 10,000.
    batch_size: int = 10_000
    # A batch's two INSERTs cost the embedded engine about 30 ms of CPU whatever their size
    # (measured on a 2-core machine), and a new part to merge later. So traces are
    # batched for up to two seconds rather than written as they come.
    flush_interval_s: float = 2.0
    # A partial batch is also written once no trace has arrived for idle_flush_s, if the
    # previous batch was taken at least half a flush interval before. A lone trace is
    # then stored sooner, while steady traffic still gets the full interval: an exporter
    # sends it every 0.5 s, less than idle_flush_s.
    idle_flush_s: float = 0.75
    max_pending: int = 100_000
    retry_min_s: float = 0.2
    retry_max_s: float = 10.0


class PendingFull(Exception):
    """The writer's in-memory backlog is full; the caller should retry later."""


class TraceWriter:
    """Thread that writes queued traces in batches and replays the spool after outages."""

    def __init__(
        self,
        open_store: Callable[[], TraceStore],
        builder: RowBuilder,
        spool: Spool,
        settings: WriterSettings = WriterSettings(),
        wal: WriteAheadLog | None = None,
    ) -> None:
        self.open_store = open_store
        self.wal = wal
        self.builder = builder
        self.spool = spool
        self.settings = settings
        self.counters = WriterCounters()
        self._store: TraceStore | None = None
        self._pending: deque[TraceChunk] = deque()
        self._pending_count = 0
        # The batch taken from _pending ahead of its turn, with its build in progress.
        self._next: tuple[list[TraceChunk], concurrent.futures.Future] | None = None
        self._build_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="trace-builder"
        )
        self._jobs: deque[tuple[Callable, concurrent.futures.Future]] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")
        self._oldest_pending_at = 0.0
        self._newest_pending_at = 0.0
        self._last_batch_at = float("-inf")
        self._retry_at = 0.0
        self._retry_delay = settings.retry_min_s
        self._last_error_log: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="trace-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, traces: Sequence[trace_pb2.Trace]) -> None:
        """Queue traces for writing; raise PendingFull when the backlog has no room."""
        size = self.settings.batch_size
        chunks = [
            self.builder.chunk(traces[start : start + size])
            for start in range(0, len(traces), size)
        ]
        self.submit_chunks(chunks)

    def submit_chunks(self, chunks: Sequence[TraceChunk]) -> None:
        """
        Queue encoded traces for writing; raise PendingFull when the backlog has no room.

        With a write-ahead log the chunks are appended to it first, and an OSError from
        the log is raised with none of the chunks queued.
        """
        count = sum(chunk.trace_count for chunk in chunks)
        with self._condition:
            if self._stopping or self._pending_count + count > self.settings.max_pending:
                raise PendingFull
            if self.wal is not None:
                # Appended under the lock, so log order is queue order, which is the
                # order in which mark_batch counts the chunks.
                self.wal.append([chunk.payload for chunk in chunks])
            self._newest_pending_at = time.monotonic()
            first = not self._pending
            if first:
                self._oldest_pending_at = self._newest_pending_at
            self._pending.extend(chunks)
            self._pending_count += count
            self.counters.queued += count
            self.counters.pending = self._pending_count
            # The first chunk sets a flush time, which can be sooner than the writer's wait.
            if first or self._pending_count >= self.settings.batch_size:
                self._condition.notify()

    def call(self, function: Callable[[TraceStore], object]) -> concurrent.futures.Future:
        """Run ``function(store)`` on the writer thread; the future holds its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._condition:
            self._jobs.append((function, future))
            self._condition.notify()
        return future

    def stop(self, deadline_s: float = 5.0) -> None:
        """Write what is queued within ``deadline_s``, spool the rest, close the store."""
        with self._condition:
            self._stopping = True
            self._deadline = time.monotonic() + deadline_s
            self._condition.notify()
        self._thread.join()

    def _run(self) -> None:
        next_counter_log = time.monotonic() + _COUNTER_LOG_INTERVAL_S
        last_logged = asdict(self.counters)
        while True:
            jobs, batch, finished = self._wait_for_work()
            for function, future in jobs:
                self._run_job(function, future)
            if batch:
                self._write_or_spool(batch)
            elif self.spool.oldest() is not None and time.monotonic() >= self._retry_at:
                self._replay_oldest()
            if finished:
                break
            if time.monotonic() >= next_counter_log:
                next_counter_log = time.monotonic() + _COUNTER_LOG_INTERVAL_S
                last_logged = self._log_counters(last_logged)
        self._fail_waiting_jobs()
        self._build_executor.shutdown(wait=True)
        if self.wal is not None:
            self.wal.close()
        if self._store is not None:
            self._store.close()
        logger.info("trace writer stopped: %s", asdict(self.counters))

    def _wait_for_work(self) -> tuple[list, list[TraceChunk], bool]:
        settings = self.settings
        with self._condition:
            while True:
                now = time.monotonic()
                due = bool(self._pending) and (
                    self._pending_count >= settings.batch_size
                    or now >= self._flush_at()
                    or self._stopping
                )
                replay_due = self.spool.oldest() is not None and now >= self._retry_at
                if self._next is not None or due or self._jobs or replay_due or self._stopping:
                    break
                timeout = settings.flush_interval_s
                if self._pending:
                    timeout = self._flush_at() - now
                if self.spool.oldest() is not None:
                    timeout = min(timeout, self._retry_at - now)
                self._condition.wait(max(timeout, 0.001))
            jobs = list(self._jobs)
            self._jobs.clear()
            batch = []
            if self._next is not None:
                batch = self._next[0]
            elif due:
                batch = self._take_batch()
            finished = self._stopping and not self._pending
            if finished and self.spool.oldest() is not None and not self._past_deadline():
                # Give replay a chance before closing when the store is back.
                finished = time.monotonic() < self._retry_at
            return jobs, batch, finished

    def _flush_at(self) -> float:
        settings = self.settings
        idle_at = max(
            self._newest_pending_at + settings.idle_flush_s,
            self._last_batch_at + settings.flush_interval_s / 2,
        )
        return min(self._oldest_pending_at + settings.flush_interval_s, idle_at)

    def _past_deadline(self) -> bool:
        return time.monotonic() >= self._deadline

    def _run_job(self, function: Callable, future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function(self._ensure_store()))
        except Exception as exc:  # noqa: BLE001 (the caller receives it through the future)
            future.set_exception(exc)

    def _fail_waiting_jobs(self) -> None:
        with self._condition:
            jobs = list(self._jobs)
            self._jobs.clear()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(StoreError("trace collector is stopping"))

    def _ensure_store(self) -> TraceStore:
        if self._store is None:
            self._store = self.open_store()
            logger.info("trace store opened: %s", self._store.description)
        return self._store

    def _take_batch(self) -> list[TraceChunk]:
        # Takes whole chunks up to batch_size traces. A chunk is never split, so a batch
        # can contain one chunk more.
        batch, count = [], 0
        while self._pending and count < self.settings.batch_size:
            chunk = self._pending.popleft()
            batch.append(chunk)
            count += chunk.trace_count
        self._pending_count -= count
        self.counters.pending = self._pending_count
        self._oldest_pending_at = self._last_batch_at = time.monotonic()
        return batch

    def _write_or_spool(self, batch: list[TraceChunk]) -> None:
        token = uuid.uuid4().hex
        prebuilt = None
        if self._next is not None and self._next[0] is batch:
            prebuilt = self._next[1]
            self._next = None
        if self.wal is None:
            self._insert_or_spool(batch, token, prebuilt)
            return
        # Batches are taken and written in queue order, so the batch is the next
        # len(batch) chunks of the log.
        last = self.wal.mark_batch(token, len(batch))
        self._insert_or_spool(batch, token, prebuilt)
        try:
            self.wal.release(last)
        except OSError as exc:
            self._log_error_limited("failed to release trace write-ahead log entries: %s", exc)

    def _insert_or_spool(
        self, batch: list[TraceChunk], token: str, prebuilt: concurrent.futures.Future | None
    ) -> None:
        store_usable = self.spool.oldest() is None and time.monotonic() >= self._retry_at
        if store_usable and not (self._stopping and self._past_deadline()):
            try:
                self._insert(batch, token, prebuilt, build_next=True)
                self.counters.written += _count(batch)
                self._retry_delay = self.settings.retry_min_s
                return
            except StoreError as exc:
                self.counters.failed_batches += 1
                self._note_failure(exc, _count(batch))
        self._spool(batch, token)

    def _insert(
        self,
        chunks: list[TraceChunk],
        token: str,
        prebuilt: concurrent.futures.Future | None = None,
        build_next: bool = False,
    ) -> None:
        store = self._ensure_store()
        batch = prebuilt.result() if prebuilt is not None else self.builder.build_chunks(chunks)
        if build_next:
            self._build_next_batch()
        store.insert(batch, token)

    def _build_next_batch(self) -> None:
        # Only a full batch is taken early: a partial one waits for flush_interval_s.
        with self._condition:
            if self._next is not None or self._pending_count < self.settings.batch_size:
                return
            batch = self._take_batch()
            self._next = (batch, self._build_executor.submit(self.builder.build_chunks, batch))

    def _spool(self, batch: list[TraceChunk], token: str) -> None:
        # Chunks hold ExportRequest bytes, so joined they are one ExportRequest.
        payload = b"".join(chunk.payload for chunk in batch)
        try:
            stored = self.spool.append(token, payload)
        except OSError as exc:
            logger.error("cannot write to trace spool %s: %s", self.spool.directory, exc)
            stored = False
        if stored:
            self.counters.spooled += _count(batch)
            return
        self.counters.dropped += _count(batch)
        self._log_error_limited(
            "trace spool %s is full (%d bytes, limit %d): dropped %d traces, %d in total",
            self.spool.directory,
            self.spool.size_bytes,
            self.spool.limit_bytes,
            _count(batch),
            self.counters.dropped,
        )

    def _replay_oldest(self) -> None:
        path = self.spool.oldest()
        try:
            token, payload = self.spool.read(path)
        except (SpoolCorrupt, OSError) as exc:
            logger.error("moving unreadable spool file aside: %s", exc)
            self.spool.quarantine(path)
            return
        try:
            traces = trace_pb2.ExportRequest.FromString(payload).traces
        except DecodeError as exc:
            self._quarantine(path, f"its payload does not decode as an ExportRequest ({exc})")
            return
        chunk = self.builder.chunk(traces, payload)
        try:
            self._insert([chunk], token)
        except StoreError as exc:
            if _rejects_content(exc):
                self._quarantine(path, f"the trace store rejects its content: {exc}")
                return
            self._note_failure(exc, chunk.trace_count)
            return
        self.spool.remove(path)
        count = chunk.trace_count
        self.counters.written += count
        self.counters.replayed += count
        self._retry_delay = self.settings.retry_min_s
        if self.spool.oldest() is None:
            logger.info("trace spool replayed; %d traces in total", self.counters.replayed)

    def _quarantine(self, path: Path, reason: str) -> None:
        # Retrying would block every later batch behind this one, so it is moved aside.
        logger.error(
            "moving spool file %s aside as %s, because %s",
            path,
            path.with_suffix(".corrupt"),
            reason,
        )
        self.spool.quarantine(path)
        self.counters.quarantined_batches += 1

    def _note_failure(self, exc: Exception, count: int) -> None:
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.settings.retry_max_s)
        self._log_error_limited("trace store unavailable, spooling %d traces: %s", count, exc)

    def _log_error_limited(self, message: str, *args) -> None:
        # Rate-limited per message, so one kind of error cannot hide another.
        now = time.monotonic()
        if now - self._last_error_log.get(message, float("-inf")) >= _ERROR_LOG_INTERVAL_S:
            self._last_error_log[message] = now
            logger.error(message, *args)

    def _log_counters(self, last_logged: dict) -> dict:
        current = asdict(self.counters)
        if current != last_logged:
            logger.info("trace writer counters: %s", current)
        return current


def _rejects_content(exc: StoreError) -> bool:
    """Tell whether the store failed an insert for the data, so a retry would fail too."""
    return any(f"({name})" in str(exc) for name in _CONTENT_ERRORS)


def _count(batch: list[TraceChunk]) -> int:
    return sum(chunk.trace_count for chunk in batch)
