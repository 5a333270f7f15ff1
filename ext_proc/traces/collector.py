"""The trace collector: the one process that owns the trace store.

Run it as ``python -m ext_proc.traces.collector --socket PATH --home HOME``. ext_proc
workers send it Trace batches over the Unix socket (TraceCollector.Export), and the CLI
reads through it (Query, Stats) while it runs. SIGTERM or SIGINT stops it: queued traces
are written within the shutdown deadline and whatever is left goes to the spool.

Export returns only after the batch is appended to a write-ahead log (``spool.WriteAheadLog``),
so an acknowledged batch also survives a kill of the collector, such as SIGKILL or the
kernel's out-of-memory killer. At start, the log that a killed collector left is moved to
the spool and replayed like the spool after an outage. The log is not fsync'd per batch,
so a power loss or kernel crash can lose acknowledged traces that the kernel had not yet
written back (on Linux, by default up to about 30 s: vm.dirty_expire_centisecs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from collections import deque
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from ext_proc.pb import trace_pb2, trace_pb2_grpc
from ext_proc.redaction import REDACTION_KINDS
from ext_proc.traces import (
    CLICKHOUSE_URL_ENV,
    GRPC_OPTIONS,
    collector_socket_path,
    home_path,
    prices_file,
    spool_path,
    wal_path,
)
from ext_proc.traces.cost import PriceTable
from ext_proc.traces.rows import DEFAULT_BODY_LIMIT, RowBuilder
from ext_proc.traces.schema import Retention
from ext_proc.traces.scrub import Scrubber
from ext_proc.traces.spool import DEFAULT_SPOOL_LIMIT_BYTES, Spool, WriteAheadLog
from ext_proc.traces.store import QueryError, StoreError, TraceStore, rows_to_json
from ext_proc.traces.writer import PendingFull, TraceWriter, WriterSettings

logger = logging.getLogger(__name__)


class CollectorAlreadyRunning(Exception):
    """Another process already listens on the collector socket."""


# Trace ids remembered to drop a batch that an exporter sends again after a timed-out
# Export call the collector had in fact accepted.
RECENT_TRACE_IDS = 200_000
COLLECTOR_NICENESS = 10


class TraceCollectorService(trace_pb2_grpc.TraceCollectorServicer):
    def __init__(self, writer: TraceWriter, spool: Spool) -> None:
        self.writer = writer
        self.spool = spool
        self._recent_ids: set[str] = set()
        self._recent_order: deque[str] = deque()

    def _remember(self, ids: list[str]) -> None:
        self._recent_ids.update(ids)
        self._recent_order.extend(ids)
        while len(self._recent_order) > RECENT_TRACE_IDS:
            self._recent_ids.discard(self._recent_order.popleft())

    async def Export(self, payload: bytes, context):
        # Export is registered without a request parser (see _handler), so the bytes the
        # exporter sent can be written as they are.
        try:
            traces = trace_pb2.ExportRequest.FromString(payload).traces
        except DecodeError:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "invalid ExportRequest: the bytes do not parse"
            )
        ids = [trace.trace_id for trace in traces]
        if self._recent_ids.isdisjoint(ids):
            fresh = traces
        else:
            fresh = [trace for trace, id_ in zip(traces, ids) if id_ not in self._recent_ids]
            ids = [trace.trace_id for trace in fresh]
        if fresh:
            # The byte check for secrets runs here, while the writer thread waits on an
            # insert, rather than in the writer's critical path.
            if len(fresh) == len(traces):
                chunk = self.writer.builder.chunk(traces, payload)
            else:
                chunk = self.writer.builder.chunk(fresh)
            try:
                self.writer.submit_chunks([chunk])
            except PendingFull:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "trace collector backlog is full; retry later",
                )
            except OSError as exc:
                logger.error("failed to append to the trace write-ahead log: %s", exc)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"trace collector failed to write its write-ahead log: {exc}; retry later",
                )
            self._remember(ids)
        return trace_pb2.ExportResponse(accepted=len(traces))

    async def Query(self, request, context):
        sql, parameters = request.sql, dict(request.parameters)
        future = self.writer.call(lambda store: store.query(sql, parameters))
        try:
            names, rows = await asyncio.wrap_future(future)
        except QueryError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except StoreError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return trace_pb2.QueryResponse(column_names=names, rows_json=rows_to_json(rows))

    async def Stats(self, request, context):
        counters = self.writer.counters
        return trace_pb2.StatsResponse(
            queued=counters.queued,
            written=counters.written,
            spooled=counters.spooled,
            dropped=counters.dropped,
            failed_batches=counters.failed_batches,
            pending=counters.pending,
            spool_batches=len(self.spool),
            spool_bytes=self.spool.size_bytes,
            replayed=counters.replayed,
        )


async def serve_collector(
    socket_path: str | os.PathLike,
    home: str | os.PathLike,
    clickhouse_url: str | None = None,
    *,
    retention: Retention | None = None,
    spool_limit_bytes: int = DEFAULT_SPOOL_LIMIT_BYTES,
    pii_kinds: frozenset[str] = REDACTION_KINDS,
    default_body_limit: int = DEFAULT_BODY_LIMIT,
    writer_settings: WriterSettings | None = None,
    shutdown_deadline_s: float = 5.0,
    ready: asyncio.Event | None = None,
) -> None:
    """
    Serve TraceCollector on ``unix:<socket_path>`` until cancelled.

    ``clickhouse_url`` (default: ``XENOVIA_CLICKHOUSE_URL``) selects a ClickHouse server;
    without it the store is the embedded chDB directory ``<home>/clickhouse``. The store
    is opened and migrated at start. When that fails the collector serves anyway and
    spools until the store can be opened. ``ready`` is set once the socket accepts calls.
    """
    home = Path(home).resolve()
    socket_path = Path(socket_path)
    url = clickhouse_url if clickhouse_url is not None else os.environ.get(CLICKHOUSE_URL_ENV)
    _claim_socket(socket_path)
    spool = Spool(spool_path(home), spool_limit_bytes)
    recovered_ids: list[str] = []
    try:
        recovered_ids = WriteAheadLog.recover(wal_path(home), spool)
    except OSError as exc:
        # The log is kept, so the next start tries again.
        logger.error("failed to move the trace write-ahead log to the spool: %s", exc)
    wal = WriteAheadLog(wal_path(home))
    builder = RowBuilder(
        PriceTable.load(prices_file(home)), Scrubber(pii_kinds), default_body_limit
    )

    def open_store() -> TraceStore:
        return TraceStore.open(home, url or "", retention or Retention())

    writer = TraceWriter(open_store, builder, spool, writer_settings or WriterSettings(), wal)
    writer.start()
    try:
        await asyncio.wrap_future(writer.call(lambda store: None))
    except StoreError as exc:
        logger.error("trace store unavailable at start, spooling until it returns: %s", exc)

    server = grpc.aio.server(options=GRPC_OPTIONS)
    service = TraceCollectorService(writer, spool)
    # The exporter retries an Export whose acknowledgement the kill cut off.
    service._remember(recovered_ids[-RECENT_TRACE_IDS:])
    server.add_generic_rpc_handlers((_handler(service),))
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    logger.info("trace collector listening on %s (spool %d batches)", socket_path, len(spool))
    if ready is not None:
        ready.set()
    try:
        # A plain wait: cancelling grpc's wait_for_termination makes server.stop re-raise.
        await asyncio.Event().wait()
    finally:
        await server.stop(grace=1.0)
        await asyncio.to_thread(writer.stop, shutdown_deadline_s)
        socket_path.unlink(missing_ok=True)


def _handler(service: TraceCollectorService) -> grpc.GenericRpcHandler:
    # As the generated add_TraceCollectorServicer_to_server, except that Export gets the
    # request's bytes.
    def unary(method, request_type=None):
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString if request_type else None,
            response_serializer=lambda response: response.SerializeToString(),
        )

    name = trace_pb2.DESCRIPTOR.services_by_name["TraceCollector"].full_name
    return grpc.method_handlers_generic_handler(
        name,
        {
            "Export": unary(service.Export),
            "Query": unary(service.Query, trace_pb2.QueryRequest),
            "Stats": unary(service.Stats, trace_pb2.StatsRequest),
        },
    )


def _claim_socket(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if not socket_path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except OSError:
        socket_path.unlink()  # left behind by a collector that died
        return
    finally:
        probe.close()
    raise CollectorAlreadyRunning(f"a trace collector already listens on {socket_path}")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.traces.collector")
    parser.add_argument("--home", help="home folder (default: $XENOVIA_HOME or ./.xenovia)")
    parser.add_argument("--socket", help="Unix socket path (default: HOME/run/collector.sock)")
    parser.add_argument(
        "--clickhouse-url",
        help=f"ClickHouse server URL (default: ${CLICKHOUSE_URL_ENV}, else chDB)",
    )
    parser.add_argument("--retention-days", type=int, default=Retention().row_days,
                        help="days a trace row is kept; 0 keeps it forever")  # fmt: skip
    parser.add_argument("--body-retention-days", type=int, default=Retention().body_days,
                        help="days bodies are kept within a row; 0 keeps them as long as the row")  # fmt: skip
    parser.add_argument("--spool-limit-mb", type=int, default=DEFAULT_SPOOL_LIMIT_BYTES // 2**20,
                        help="outage spool size limit in MiB; traces beyond it are dropped")  # fmt: skip
    parser.add_argument("--pii", default=",".join(sorted(REDACTION_KINDS)),
                        help="comma-separated PII kinds removed from stored traces")  # fmt: skip
    parser.add_argument("--body-limit", type=int, default=DEFAULT_BODY_LIMIT,
                        help="bytes kept per body when a trace sets no body_limit")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=WriterSettings().batch_size,
                        help="traces per insert")  # fmt: skip
    parser.add_argument("--flush-interval", type=float, default=WriterSettings().flush_interval_s,
                        help="seconds a trace may wait for its batch to fill")  # fmt: skip
    parser.add_argument("--idle-flush", type=float, default=WriterSettings().idle_flush_s,
                        help="write a partial batch once no trace has arrived for this many seconds")  # fmt: skip
    parser.add_argument("--shutdown-deadline", type=float, default=5.0,
                        help="seconds to write queued traces at shutdown before spooling them")  # fmt: skip
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    home = home_path(args.home)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    pii = frozenset(kind.strip() for kind in args.pii.split(",") if kind.strip())
    try:
        await serve_collector(
            args.socket or collector_socket_path(home),
            home,
            args.clickhouse_url,
            retention=Retention(args.retention_days, args.body_retention_days),
            spool_limit_bytes=args.spool_limit_mb * 2**20,
            pii_kinds=pii,
            default_body_limit=args.body_limit,
            writer_settings=WriterSettings(
                batch_size=args.batch_size,
                flush_interval_s=args.flush_interval,
                idle_flush_s=args.idle_flush,
            ),
            shutdown_deadline_s=args.shutdown_deadline,
        )
    except asyncio.CancelledError:
        logger.info("trace collector stopped")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Writing traces can wait; the workers serving requests should not.
    os.nice(COLLECTOR_NICENESS)
    # The embedded engine caches the trace schema in a __cache__ folder of the current
    # directory, so the collector works from the home's run folder. Paths given on the
    # command line are made absolute first.
    if args.socket:
        args.socket = str(Path(args.socket).resolve())
    args.home = str(home_path(args.home))
    work_dir = Path(args.home) / "run"
    work_dir.mkdir(parents=True, exist_ok=True)
    os.chdir(work_dir)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_main(args))
    except CollectorAlreadyRunning as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
