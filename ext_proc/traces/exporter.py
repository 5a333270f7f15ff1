"""Worker-side trace exporter: batches Trace messages to the collector over a Unix socket.

``submit`` only appends to a deque, so the request path pays for no I/O. A flush task on
the worker's event loop sends a batch when ``batch_size`` traces are waiting, or when the
oldest waiting trace or the previous send is ``flush_interval`` seconds old. So steady
traffic is sent in batches and a lone trace at once. While the collector is down the batch
stays queued and is retried with exponential backoff. Traces are dropped only when the
queue contains ``max_queue`` of them, or when ``shutdown`` runs out of time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import deque
from dataclasses import dataclass

import grpc

from ext_proc.pb import trace_pb2
from ext_proc.traces import GRPC_OPTIONS
from ext_proc.traces.rows import export_request_bytes

logger = logging.getLogger(__name__)

_WARNING_INTERVAL_S = 10.0
_EXPORT_METHOD = f"/{trace_pb2.DESCRIPTOR.services_by_name['TraceCollector'].full_name}/Export"
_EXPORT_TIMEOUT_S = 10.0
# Codes after which the same batch may succeed later; others mean it never will.
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


@dataclass(frozen=True)
class ExporterCounters:
    """Traces accepted by ``submit``, delivered, dropped; failed sends; traces waiting."""

    queued: int
    sent: int
    dropped: int
    retries: int
    pending: int


class TraceExporter:
    """
    Batching gRPC client of the trace collector, for one asyncio event loop.

    Usage inside the worker's loop::

        exporter = TraceExporter(collector_socket_path(home))
        exporter.start()
        exporter.submit(trace)      # per request, never blocks or raises
        await exporter.shutdown()   # on worker stop
    """

    def __init__(
        self,
        socket_path: str | os.PathLike,
        max_queue: int = 10_000,
        batch_size: int = 500,
        # Each Export call costs the collector about a millisecond of CPU in gRPC whatever
        # its size (measured on a 2-core machine), so steady traffic is sent twice a second.
        flush_interval: float = 0.5,
        retry_min_s: float = 0.05,
        retry_max_s: float = 2.0,
    ) -> None:
        self.target = f"unix:{socket_path}"
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._queue: deque[trace_pb2.Trace] = deque()
        # When the oldest trace in _queue arrived, or an earlier time.
        self._oldest_at = 0.0
        self._last_export_at = float("-inf")
        self._batch_ready: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._channel: grpc.aio.Channel | None = None
        self._closing = False
        self._queued = 0
        self._sent = 0
        self._dropped = 0
        self._retries = 0
        self._last_drop_warning = 0.0

    @property
    def counters(self) -> ExporterCounters:
        return ExporterCounters(
            queued=self._queued,
            sent=self._sent,
            dropped=self._dropped,
            retries=self._retries,
            pending=len(self._queue),
        )

    def start(self) -> None:
        """Open the channel and start the flush task on the running event loop."""
        self._batch_ready = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(self.target, options=list(GRPC_OPTIONS))
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="trace-export")

    def submit(self, trace: trace_pb2.Trace) -> None:
        """Queue one trace for export; drop it (counted) when the queue is full."""
        queue = self._queue
        if len(queue) >= self.max_queue or self._closing:
            self._drop(1)
            return
        queue.append(trace)
        self._queued += 1
        size = len(queue)
        if size == 1:
            self._oldest_at = time.monotonic()
        # Wake the flush task for the first trace (to start the flush timer) and a full batch.
        if (size == 1 or size >= self.batch_size) and self._batch_ready is not None:
            self._batch_ready.set()

    async def shutdown(self, deadline_s: float = 5.0) -> None:
        """Send what is queued within ``deadline_s``; count the rest as dropped."""
        self._closing = True
        if self._task is None:
            return
        self._batch_ready.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), deadline_s)
        except TimeoutError:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        left = len(self._queue)
        if left:
            self._queue.clear()
            self._dropped += left
            logger.warning("trace exporter stopped with %d traces unsent (dropped)", left)
        await self._channel.close()

    def _drop(self, count: int) -> None:
        self._dropped += count
        now = time.monotonic()
        if now - self._last_drop_warning >= _WARNING_INTERVAL_S:
            self._last_drop_warning = now
            logger.warning(
                "trace export queue full (%d traces): %d traces dropped so far",
                self.max_queue,
                self._dropped,
            )

    async def _flush_loop(self) -> None:
        # The request is serialized here: ExportRequest(traces=...) would copy every trace.
        export = self._channel.unary_unary(
            _EXPORT_METHOD, response_deserializer=trace_pb2.ExportResponse.FromString
        )
        delay = self.retry_min_s
        while not (self._closing and not self._queue):
            await self._wait_for_batch()
            if not self._queue:
                continue
            count = min(len(self._queue), self.batch_size)
            payload = export_request_bytes([self._queue[index] for index in range(count)])
            sent_at = self._last_export_at = time.monotonic()
            try:
                await export(payload, timeout=_EXPORT_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in _RETRYABLE:
                    self._discard(count, exc)
                    continue
                # NOTE: a call that timed out after the collector took the batch is sent
                # again, so a trace can be written twice in that case.
                self._retries += 1
                if self._retries == 1 or self._retries % 100 == 0:
                    logger.warning(
                        "trace collector %s unavailable (%s), retrying; %d traces queued",
                        self.target,
                        exc.code().name,
                        len(self._queue),
                    )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.retry_max_s)
                continue
            for _ in range(count):
                self._queue.popleft()
            # Traces left in the queue arrived after the batch was taken.
            self._oldest_at = sent_at
            self._sent += count
            delay = self.retry_min_s

    def _discard(self, count: int, exc: grpc.aio.AioRpcError) -> None:
        for _ in range(count):
            self._queue.popleft()
        self._dropped += count
        logger.error(
            "trace collector rejected a batch of %d traces (%s: %s); dropped",
            count,
            exc.code().name,
            exc.details(),
        )

    async def _wait_for_batch(self) -> None:
        # Returns when a batch is full, a send is due, or shutdown has begun.
        while not (len(self._queue) >= self.batch_size or self._closing):
            self._batch_ready.clear()
            if not self._queue:
                await self._batch_ready.wait()
                continue
            due_at = min(self._oldest_at, self._last_export_at) + self.flush_interval
            remaining = due_at - time.monotonic()
            if remaining <= 0:
                return
            try:
                await asyncio.wait_for(self._batch_ready.wait(), remaining)
            except TimeoutError:
                return
