"""Trace pipeline: worker-side exporter, collector process, ClickHouse schema and CLI.

ext_proc workers hand ``trace_pb2.Trace`` messages to a :class:`~.exporter.TraceExporter`,
which batches them over a Unix socket to the collector (``python -m
ext_proc.traces.collector``). The collector is the only process that opens the trace
store: an embedded chDB directory under the home folder, or a ClickHouse server when
``XENOVIA_CLICKHOUSE_URL`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HOME = ".xenovia"
CLICKHOUSE_URL_ENV = "XENOVIA_CLICKHOUSE_URL"


def home_path(value: str | os.PathLike | None = None) -> Path:
    """Return the home folder: ``value``, else ``XENOVIA_HOME``, else ``./.xenovia``."""
    raw = value if value is not None else os.environ.get("XENOVIA_HOME", DEFAULT_HOME)
    return Path(raw).resolve()


def collector_socket_path(home: str | os.PathLike) -> Path:
    return Path(home) / "run" / "collector.sock"


def clickhouse_store_path(home: str | os.PathLike) -> Path:
    return Path(home) / "clickhouse"


def clickhouse_dsn(home: str | os.PathLike) -> str:
    """Return the clickhouse-connect DSN of the embedded chDB store under ``home``."""
    return "chdb://" + str(Path(clickhouse_store_path(home)).resolve())


def spool_path(home: str | os.PathLike) -> Path:
    return Path(home) / "spool"


def wal_path(home: str | os.PathLike) -> Path:
    """Return the folder of the collector's write-ahead log of accepted exports."""
    return Path(home) / "spool" / "wal"


def prices_file(home: str | os.PathLike) -> Path:
    return Path(home) / "config" / "prices.json"


# Export batches carry bodies of up to the body limit per trace, and Query results can be
# large, so both ends of the collector socket raise gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
GRPC_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
