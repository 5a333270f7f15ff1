"""Read-side trace queries, run through the collector or straight on the store.

Every user value reaches ClickHouse as a bound parameter (``{name:Type}``), never inside
the SQL text. A reader returns column names and rows of plain JSON values, whichever
path it takes, so the CLI prints the same thing in both cases.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from ext_proc.pb import trace_pb2, trace_pb2_grpc
from ext_proc.traces import (
    CLICKHOUSE_URL_ENV,
    GRPC_OPTIONS,
    clickhouse_store_path,
    collector_socket_path,
)
from ext_proc.traces.store import StoreError, TraceStore, json_value

_PROBE_TIMEOUT_S = 1.0
_QUERY_TIMEOUT_S = 60.0

LIST_COLUMNS = (
    "timestamp", "trace_id", "proxy_id", "session_id", "session_turn", "model", "status",
    "policy_outcome", "latency_ms", "tokens_in", "tokens_out", "cost_usd",
)  # fmt: skip
BLOCK_OUTCOMES = ("block", "block_response")
# Every non-empty policy_outcome the gateway records (processor.py, response.py,
# response_stream.py). A call rejected before its policies ran (a 400, 401 or 404, or a 403
# proxy_access_denied) has "".
# A dry-run denial keeps "allow" here and records its outcome in dry_run_outcome.
POLICY_OUTCOMES = ("allow", "block", "redact", "block_response", "redact_response")
# A call gets a session turn (1 or more) only once it is authenticated and its session is
# resolved, so a trace with turn 0 never joined the session its id names.
_ADMITTED = "session_id != '' AND session_turn > 0"


class ReaderError(Exception):
    """A trace query failed; the message gives the reason."""


class CollectorReader:
    """Runs queries through a running collector's Query RPC."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}", options=list(GRPC_OPTIONS))
        self.stub = trace_pb2_grpc.TraceCollectorStub(self.channel)

    def answers(self) -> bool:
        try:
            self.stub.Stats(trace_pb2.StatsRequest(), timeout=_PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return False
        return True

    def query(self, sql: str, parameters: dict[str, str]) -> tuple[list[str], list[list]]:
        request = trace_pb2.QueryRequest(sql=sql, parameters=parameters)
        try:
            response = self.stub.Query(request, timeout=_QUERY_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise ReaderError(f"trace query failed: {error_line(exc.details() or '')}") from exc
        rows = [json.loads(row) for row in response.rows_json]
        return list(response.column_names), rows

    def close(self) -> None:
        self.channel.close()


class StoreReader:
    """Runs queries on the store opened in this process (no collector running)."""

    def __init__(self, home: Path, clickhouse_url: str | None = None) -> None:
        try:
            self.store = TraceStore.open(home, clickhouse_url, migrate_schema=True)
        except StoreError as exc:
            raise ReaderError(str(exc)) from exc

    def query(self, sql: str, parameters: dict[str, str]) -> tuple[list[str], list[list]]:
        try:
            names, rows = self.store.query(sql, parameters)
        except StoreError as exc:
            raise ReaderError(f"trace query failed: {error_line(str(exc))}") from exc
        return names, [json_value(list(row)) for row in rows]

    def close(self) -> None:
        self.store.close()


def open_reader(home: Path, clickhouse_url: str | None = None) -> CollectorReader | StoreReader:
    """Return a reader through the collector when it responds, else on the store itself."""
    socket_path = collector_socket_path(home)
    if socket_path.exists():
        reader = CollectorReader(socket_path)
        if reader.answers():
            return reader
        reader.close()
    server_url = clickhouse_url or os.environ.get(CLICKHOUSE_URL_ENV)
    if not server_url and not clickhouse_store_path(home).exists():
        # Opening the embedded store would create an empty one in a mistyped home.
        raise ReaderError(f"no trace store in {home}: check --home, or start the gateway there")
    return StoreReader(home, clickhouse_url)


_EXCEPTION_PREFIX = re.compile(r"^(?:Code: \d+\. DB::Exception: )+")
_ERROR_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?: \(version [^)]*\))?\.?\s*$")
_MAX_ERROR_CHARS = 300
READ_ONLY_MESSAGE = (
    "trace queries run read-only, so INSERT, ALTER, CREATE, DROP, TRUNCATE, SET, settings"
    " changes and the file and url table functions are rejected"
)


def error_line(message: str) -> str:
    """Shorten a ClickHouse error to its first line, without the ``Code: N.`` prefixes.

    The error name that ClickHouse puts at the end of the message (SYNTAX_ERROR,
    UNKNOWN_TABLE, ...) is kept. A write rejected by the read-only setting gets a sentence.
    """
    lines = message.strip().splitlines() or [""]
    # A server's error starts with a line about the HTTP driver, and the exception follows.
    first = next((line for line in lines if "DB::Exception:" in line), lines[0])
    if "Code: " in first:
        first = first[first.find("Code: "):]
    first = _EXCEPTION_PREFIX.sub("", first)
    name = _ERROR_NAME.search(message.strip())
    if name and name[1] == "READONLY":
        return f"{READ_ONLY_MESSAGE} (READONLY)"
    first = re.sub(r" \(version [^)]*\)", "", first).strip()
    if len(first) > _MAX_ERROR_CHARS:
        first = first[: _MAX_ERROR_CHARS - 3] + "..."
    if name and f"({name[1]})" not in first:
        first = f"{first} ({name[1]})"
    return first


def single_statement(sql: str) -> str:
    """Strip a trailing semicolon from ``sql``, or raise ValueError if it has several statements.

    The embedded engine (chDB 26.9) runs every statement of a multi-statement query. After
    one of them fails, the next query on the same connection reads a leftover result, so the
    CLI sends exactly one. Semicolons inside quotes and comments do not count.
    """
    end = None  # index of the first semicolon outside quotes and comments
    index = 0
    while index < len(sql):
        char = sql[index]
        if char in "'\"`":
            index += 1
            while index < len(sql) and sql[index] != char:
                index += 2 if sql[index] == "\\" else 1
        elif sql.startswith("--", index) or char == "#":
            newline = sql.find("\n", index)
            index = len(sql) if newline < 0 else newline
        elif sql.startswith("/*", index):
            close = sql.find("*/", index + 2)
            index = len(sql) if close < 0 else close + 1
        elif char == ";":
            if end is None:
                end = index
        elif not char.isspace() and end is not None:
            raise ValueError("the query has more than one statement. Run each on its own")
        index += 1
    statement = sql if end is None else sql[:end]
    if not statement.strip():
        raise ValueError("the query is empty")
    return statement


@dataclass
class TraceFilters:
    """Conditions shared by the list and stats queries; unset fields do not filter."""

    session: str | None = None
    proxy: str | None = None
    properties: list[tuple[str, str]] = field(default_factory=list)
    model: str | None = None
    outcome: str | None = None
    status: int | None = None
    since_us: int | None = None
    until_us: int | None = None

    def where(self) -> tuple[str, dict[str, str]]:
        """Return a WHERE clause (or "") and its parameters."""
        conditions = []
        parameters: dict[str, str] = {}
        simple = (
            ("session", "session_id = {session:String}"),
            ("proxy", "proxy_id = {proxy:String}"),
            ("model", "(model = {model:String} OR model_served = {model:String})"),
            ("outcome", "policy_outcome = {outcome:String}"),
            ("status", "status = {status:UInt16}"),
            ("since_us", "timestamp >= fromUnixTimestamp64Micro({since_us:Int64}, 'UTC')"),
            ("until_us", "timestamp < fromUnixTimestamp64Micro({until_us:Int64}, 'UTC')"),
        )
        for name, condition in simple:
            value = getattr(self, name)
            if value is not None:
                conditions.append(condition)
                parameters[name] = str(value)
        for index, (key, value) in enumerate(self.properties):
            key_name, value_name = f"property_key_{index}", f"property_value_{index}"
            conditions.append(
                f"mapContains(custom_properties, {{{key_name}:String}})"
                f" AND custom_properties[{{{key_name}:String}}] = {{{value_name}:String}}"
            )
            parameters[key_name] = key
            parameters[value_name] = value
        clause = " WHERE " + " AND ".join(conditions) if conditions else ""
        return clause, parameters


def list_traces_sql(filters: TraceFilters, limit: int, all_columns: bool) -> tuple[str, dict]:
    where, parameters = filters.where()
    columns = "*" if all_columns else ", ".join(LIST_COLUMNS)
    sql = f"SELECT {columns} FROM traces{where} ORDER BY timestamp DESC LIMIT {{limit:UInt32}}"
    return sql, {**parameters, "limit": str(limit)}


def show_trace_sql(trace_id: str) -> tuple[tuple[str, dict], tuple[str, dict]]:
    parameters = {"trace_id": trace_id}
    trace_sql = "SELECT * FROM traces WHERE trace_id = {trace_id:String} LIMIT 1"
    steps_sql = (
        "SELECT * FROM trace_steps WHERE trace_id = {trace_id:String} ORDER BY timestamp, step_id"
    )
    return (trace_sql, parameters), (steps_sql, parameters)


def sessions_sql(filters: TraceFilters, limit: int) -> tuple[str, dict]:
    where, parameters = filters.where()
    where = (where + " AND" if where else " WHERE") + f" {_ADMITTED}"
    sql = (
        "SELECT session_id, proxy_id, count() AS turns, min(timestamp) AS first_seen,"
        " max(timestamp) AS last_seen, sum(tokens_in) AS tokens_in,"
        " sum(tokens_out) AS tokens_out, sum(cost_usd) AS cost_usd"
        f" FROM traces{where} GROUP BY session_id, proxy_id"
        " ORDER BY last_seen DESC LIMIT {limit:UInt32}"
    )
    return sql, {**parameters, "limit": str(limit)}


def stats_sql(filters: TraceFilters, limit: int = 20) -> dict[str, tuple[str, dict]]:
    """Return the four stats queries by section name."""
    where, parameters = filters.where()
    and_where = where + " AND" if where else " WHERE"
    blocked = "policy_outcome IN ('" + "', '".join(BLOCK_OUTCOMES) + "')"
    limited = {**parameters, "limit": str(limit)}
    return {
        "latency_by_model": (
            "SELECT model, count() AS calls,"
            " quantilesExactInclusive(0.5, 0.95, 0.99)(latency_ms) AS latency_ms_quantiles,"
            " quantilesExactInclusive(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms_quantiles,"
            f" count(ttft_ms) AS ttft_samples FROM traces{where}"
            " GROUP BY model ORDER BY calls DESC, model",
            parameters,
        ),
        "cost_by_property": (
            "SELECT property_key, property_value, count() AS calls, sum(cost_usd) AS cost_usd"
            " FROM traces ARRAY JOIN mapKeys(custom_properties) AS property_key,"
            f" mapValues(custom_properties) AS property_value{where}"
            " GROUP BY property_key, property_value"
            " ORDER BY cost_usd DESC NULLS LAST, property_key, property_value LIMIT {limit:UInt32}",
            limited,
        ),
        "cost_by_session": (
            "SELECT session_id, count() AS turns, sum(tokens_in) AS tokens_in,"
            " sum(tokens_out) AS tokens_out, sum(cost_usd) AS cost_usd"
            f" FROM traces{and_where} {_ADMITTED} GROUP BY session_id"
            " ORDER BY cost_usd DESC NULLS LAST, session_id LIMIT {limit:UInt32}",
            limited,
        ),
        "block_rate_by_rule": (
            "SELECT policy_rule_id, countIf(" + blocked + ") AS blocked,"
            f" (SELECT count() FROM traces{where}) AS calls, blocked / calls AS block_rate"
            f" FROM traces{and_where} policy_rule_id != '' GROUP BY policy_rule_id"
            " ORDER BY block_rate DESC, policy_rule_id",
            parameters,
        ),
    }


_RELATIVE = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: datetime.datetime | None = None) -> int:
    """Return unix microseconds for ``1h``/``30m``/``2d`` (ago) or an ISO 8601 time (UTC if naive)."""
    now = now or datetime.datetime.now(datetime.UTC)
    match = _RELATIVE.match(text.strip())
    if match:
        moment = now - datetime.timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])
    else:
        try:
            moment = datetime.datetime.fromisoformat(text.strip())
        except ValueError as exc:
            raise ValueError(
                f"invalid time {text!r}: use a duration such as 30m, 1h, 2d or an ISO 8601 time"
            ) from exc
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    return (moment - epoch) // datetime.timedelta(microseconds=1)
