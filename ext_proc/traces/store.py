"""The trace store: one clickhouse-connect client on chDB or a ClickHouse server.

A chDB store can be opened by one process only, so only the collector (or the CLI when
no collector runs) creates a ``TraceStore``. Every call on a store must come from the
thread that opened it. The collector keeps it inside its writer thread.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import tempfile
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import clickhouse_connect
from clickhouse_connect.driver.exceptions import ClickHouseError

from ext_proc.traces import CLICKHOUSE_URL_ENV, clickhouse_dsn, clickhouse_store_path, insert_sql
from ext_proc.traces.rows import EncodedBatch
from ext_proc.traces.schema import Retention, apply_retention, migrate

logger = logging.getLogger(__name__)

# The embedded engine keeps no query log on disk; this also stops its in-memory one from
# growing in a long-running collector.
_EMBEDDED_SETTINGS = {"log_queries": 0}


class StoreError(Exception):
    """The trace store could not be opened, written or read."""


class QueryError(StoreError):
    """The store rejected a query (invalid SQL, unknown column, write in read-only mode)."""


class TraceStore:
    """Opened, migrated trace store with insert and read-only query operations."""

    def __init__(
        self, client, reader, description: str, embedded: bool, home: Path, url: str | None
    ) -> None:
        self.client = client
        self.reader = reader
        self._home = home
        self._url = url
        self.description = description
        self.embedded = embedded
        # Quoting the schema text is slow enough to show in a profile, so it is done once.
        self._fixed_settings = insert_sql.setting_list(
            {
                **insert_sql.format_schema_settings(),
                # Synchronous distributed inserts carry the token to the shards of a
                # cluster (deploy/clickhouse/cluster.sql); plain tables ignore the setting.
                "insert_distributed_sync": 1,
                # A merge builds the bloom filter indexes of the part it writes, so they are
                # not built at insert too, where they took about a third of its CPU.
                # NOTE: a part that was never merged has no index and is read whole.
                "materialize_skip_indexes_on_insert": 0,
            }
        )

    @classmethod
    def open(
        cls,
        home: Path,
        clickhouse_url: str | None = None,
        retention: Retention | None = None,
        migrate_schema: bool = True,
    ) -> TraceStore:
        """Connect, apply pending migrations, and set the TTLs when ``retention`` is given."""
        url = clickhouse_url if clickhouse_url is not None else os.environ.get(CLICKHOUSE_URL_ENV)
        try:
            client = _connect(home, url, {})
            if migrate_schema:
                migrate(client)
            if retention is not None:
                apply_retention(client, retention)
            reader = _connect(home, url, _read_only_settings(url))
        except (ClickHouseError, OSError) as exc:
            raise StoreError(f"cannot open trace store: {exc}") from exc
        description = _describe_url(url) if url else f"chdb {clickhouse_store_path(home)}"
        return cls(client, reader, description, embedded=not url, home=home, url=url)

    def insert(self, batch: EncodedBatch, token: str) -> None:
        """Insert one batch; a retry with the same ``token`` writes nothing twice."""
        try:
            if self.embedded:
                self._insert_from_file(batch, token)
            else:
                self._insert_from_body(batch, token)
        except (ClickHouseError, OSError) as exc:
            raise StoreError(f"insert failed: {exc}") from exc

    def _insert_from_file(self, batch: EncodedBatch, token: str) -> None:
        # The embedded engine reads the payload from a file, which both INSERTs share.
        with tempfile.NamedTemporaryFile(suffix=".pb") as payload:
            payload.write(batch.payload)
            payload.flush()
            path = Path(payload.name)
            if batch.trace_count:
                source = insert_sql.file_source(path, insert_sql.TRACE_STRUCTURE)
                settings = self._settings(f"{token}-traces")
                self.client.command(insert_sql.traces_select(batch, source, settings))
            if batch.step_count:
                source = insert_sql.file_source(path, insert_sql.STEP_STRUCTURE)
                settings = self._settings(f"{token}-steps")
                self.client.command(insert_sql.steps_select(batch, source, settings))

    def _insert_from_body(self, batch: EncodedBatch, token: str) -> None:
        # NOTE: format_schema_source needs a server of version 25.x or later (chDB 26.9 has
        # it). Only the embedded path is run by the tests.
        if batch.trace_count:
            source = insert_sql.input_source(insert_sql.TRACE_STRUCTURE)
            sql = insert_sql.traces_select(batch, source, self._settings(f"{token}-traces"))
            self.client.command(f"{sql} FORMAT ProtobufList", data=batch.payload)
        if batch.step_count:
            source = insert_sql.input_source(insert_sql.STEP_STRUCTURE)
            sql = insert_sql.steps_select(batch, source, self._settings(f"{token}-steps"))
            self.client.command(f"{sql} FORMAT ProtobufList", data=batch.payload)

    def _settings(self, token: str) -> str:
        token_setting = insert_sql.setting_list({"insert_deduplication_token": token})
        return f"{self._fixed_settings}, {token_setting}"

    def query(self, sql: str, parameters: dict[str, str]) -> tuple[list[str], list[tuple]]:
        """Run ``sql`` read-only with server-side bound ``parameters``.

        Raises QueryError when the store rejects the query, or when it calls a function that
        reads files or other servers, or changes settings (see _reject_outside_access).
        """
        try:
            # raw_query: query() would first send a statement ending in LIMIT 0 as a probe.
            syntax = self.reader.raw_query(
                f"EXPLAIN AST {sql}", parameters=parameters, fmt="TabSeparatedRaw"
            )
            _reject_outside_access(syntax.decode("utf-8", "replace").splitlines())
            result = self.reader.query(sql, parameters=parameters)
        except ClickHouseError as exc:
            # A query stopped part way (a result over the size limit, say) can leave unread
            # data on the connection that the next query would read, so it is replaced.
            self._reopen_reader()
            raise QueryError(str(exc)) from exc
        return list(result.column_names), result.result_rows

    def _reopen_reader(self) -> None:
        try:
            self.reader.close()
            self.reader = _connect(self._home, self._url, _read_only_settings(self._url))
        except (ClickHouseError, OSError) as exc:
            logger.warning("trace store: reopening the query connection failed: %s", exc)

    def close(self) -> None:
        self.reader.close()
        self.client.close()


def _connect(home: Path, url: str | None, settings: dict):
    if url:
        return clickhouse_connect.get_client(dsn=url, settings=settings)
    clickhouse_store_path(home).mkdir(parents=True, exist_ok=True)
    return clickhouse_connect.get_client(
        dsn=clickhouse_dsn(home), settings={**_EMBEDDED_SETTINGS, **settings}
    )


# Queries run on the collector's writer thread, so a query holds back trace writes while it
# runs: the time limit bounds that delay (the traces wait in memory and the write-ahead log).
# The memory and result limits keep one query from taking the collector's memory.
QUERY_TIME_LIMIT_SECONDS = 10
QUERY_MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024
QUERY_RESULT_LIMIT_BYTES = 64 * 1024 * 1024

# Functions that read files, run programs or reach other servers. readonly does not stop
# them, and the collector may be able to read files the caller cannot (the write-ahead log
# contains bodies before secrets are scrubbed), so a query that calls one is rejected.
_OUTSIDE_ACCESS_FUNCTIONS = frozenset({
    "file", "filecluster", "url", "urlcluster", "s3", "s3cluster", "gcs", "oss", "cosn",
    "hdfs", "hdfscluster", "remote", "remotesecure", "cluster", "clusterallreplicas", "input",
    "executable", "executablepool", "mysql", "postgresql", "sqlite", "odbc", "jdbc",
    "mongodb", "redis", "dictionary", "arrowflight", "ytsaurus", "prometheusquery",
})
_OUTSIDE_ACCESS_PREFIXES = ("azureblobstorage", "iceberg", "deltalake", "hudi", "paimon", "dict")


def _reject_outside_access(ast_lines) -> None:
    """Raise QueryError for a query whose AST (EXPLAIN AST lines) calls such a function.

    A SETTINGS clause is rejected too: on a ClickHouse server (readonly=2) it could lift the
    limits above.
    """
    for index, line in enumerate(ast_lines):
        words = line.split()
        if index == 0 and words and words[0] == "InsertQuery":
            # readonly rejects it too, but INSERT ... LIMIT 0 first meets a client-side check
            # whose message names the client library, not the reason.
            raise QueryError("queries may not write (INSERT) (READONLY)")
        if words == ["Set"]:
            raise QueryError("queries may not change settings (SETTINGS clause) (READONLY)")
        if len(words) < 2 or words[0] not in ("Function", "TableFunction"):
            continue
        name = words[1].lower()
        if name in _OUTSIDE_ACCESS_FUNCTIONS or name.startswith(_OUTSIDE_ACCESS_PREFIXES):
            raise QueryError(
                f"queries may not call {words[1]}(), which reads outside the trace store (READONLY)"
            )


def _read_only_settings(url: str | None) -> dict:
    # Queries get their own client because a session switched to readonly=1 cannot be
    # switched back. A server receives settings with every HTTP request, which readonly=1
    # forbids, so there readonly=2 (reads and setting changes, no writes or DDL) is used.
    # The limits come first: once readonly=1 is in force, no setting can change.
    return {
        "max_execution_time": QUERY_TIME_LIMIT_SECONDS,
        "max_memory_usage": QUERY_MEMORY_LIMIT_BYTES,
        "max_result_bytes": QUERY_RESULT_LIMIT_BYTES,
        "readonly": 2 if url else 1,
    }


def _describe_url(url: str) -> str:
    # Keep the host and database, never the credentials.
    parts = urlsplit(url)
    return f"clickhouse {parts.scheme}://{parts.hostname}:{parts.port}{parts.path}"


def json_value(value):
    """Convert a value from a ClickHouse result into plain JSON data."""
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.isoformat()
    if isinstance(value, (datetime.date, Decimal)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(item) for item in value]
    if isinstance(value, (bytes, bytearray)):
        return value.decode(errors="replace")
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    # UUID, IPv4Address, IPv6Address and any other value type: its text form.
    return str(value)


def rows_to_json(rows: list[tuple]) -> list[str]:
    return [json.dumps(json_value(list(row)), ensure_ascii=False) for row in rows]
