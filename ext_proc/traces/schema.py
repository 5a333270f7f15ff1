"""ClickHouse schema of the trace store, as numbered migrations.

The collector applies the migrations in order at start, on the embedded chDB store and on
a ClickHouse server alike, and records each applied version in ``schema_migrations``. A
released migration is never edited: a change to the schema is a new entry at the end of
``MIGRATIONS``.

``traces`` holds one immutable row per governed call and ``trace_steps`` one row per
step. Both are plain MergeTree tables written once per row, so reads never need
``FINAL``. Retention is a row TTL on both tables plus a column TTL on the bodies.
``apply_retention`` sets both from the collector's settings at every start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from clickhouse_connect.driver.exceptions import DatabaseError

logger = logging.getLogger(__name__)

DEFAULT_ROW_RETENTION_DAYS = 90
DEFAULT_BODY_RETENTION_DAYS = 30
# Dedup hashes kept per table. A spooled batch is replayed before any later batch, so it
# only has to outlive the batches spooled ahead of it.
DEDUP_WINDOW = 10_000

BODY_COLUMNS = ("messages", "tools", "response_content")
STEP_BODY_COLUMNS = ("tool_args", "tool_result")

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version UInt32,
    applied_at DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY version
"""

_CREATE_TRACES = f"""
CREATE TABLE IF NOT EXISTS traces
(
    trace_id String,
    timestamp DateTime64(6, 'UTC'),
    end_timestamp DateTime64(6, 'UTC'),
    session_id String,
    session_turn UInt32,
    session_path String,
    session_source LowCardinality(String),
    parent_trace_id String,
    flow_id String,
    proxy_id LowCardinality(String),
    org_id LowCardinality(String),
    environment LowCardinality(String),
    key_id String,
    provider LowCardinality(String),
    model LowCardinality(String),
    model_served LowCardinality(String),
    request_type LowCardinality(String),
    stream Bool,
    method LowCardinality(String),
    path String,
    messages String CODEC(ZSTD(3)),
    tools String CODEC(ZSTD(3)),
    response_content String CODEC(ZSTD(3)),
    tokens_in Nullable(UInt32),
    tokens_out Nullable(UInt32),
    cached_tokens Nullable(UInt32),
    reasoning_tokens Nullable(UInt32),
    usage_reported Bool,
    latency_ms Float64,
    ttft_ms Nullable(Float64),
    overhead_ms Float64,
    policy_ms Float64,
    provider_ms Nullable(Float64),
    status UInt16,
    error_type LowCardinality(String),
    error_message String,
    policy_outcome LowCardinality(String),
    policy_rule_id LowCardinality(String),
    policy_reason String,
    redacted_kinds Array(LowCardinality(String)),
    dry_run Bool,
    dry_run_outcome LowCardinality(String),
    intent_score Nullable(Float64),
    intent_action LowCardinality(String),
    custom_properties Map(String, String),
    stream_completed Nullable(Bool),
    finish_reason LowCardinality(String),
    stream_policy_mode LowCardinality(String),
    body_mode LowCardinality(String),
    cost_usd Nullable(Float64),
    price_version LowCardinality(String),
    INDEX idx_session_id session_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_key_id key_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_property_keys mapKeys(custom_properties) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_property_values mapValues(custom_properties) TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (proxy_id, timestamp, trace_id)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}
"""

_CREATE_STEPS = f"""
CREATE TABLE IF NOT EXISTS trace_steps
(
    trace_id String,
    step_id String,
    parent_trace_id String,
    proxy_id LowCardinality(String),
    step_type LowCardinality(String),
    name String,
    timestamp DateTime64(6, 'UTC'),
    latency_ms Float64,
    status LowCardinality(String),
    tool_name LowCardinality(String),
    tool_args String CODEC(ZSTD(3)),
    tool_result String CODEC(ZSTD(3)),
    call_id String,
    attributes Map(String, String)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (trace_id, timestamp)
SETTINGS non_replicated_deduplication_window = {DEDUP_WINDOW}
"""

# Percentiles are exact (quantilesExactInclusive, the same interpolation as numpy's
# default) so dashboards and the CLI agree with hand computation.
# NOTE: exact quantiles keep every value of a group in memory; filter by time on large stores.
_VIEW_LATENCY = """
CREATE VIEW IF NOT EXISTS trace_latency_by_model AS
SELECT
    proxy_id,
    model,
    count() AS calls,
    quantilesExactInclusive(0.5, 0.95, 0.99)(latency_ms) AS latency_ms_p50_p95_p99,
    quantilesExactInclusive(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms_p50_p95_p99,
    count(ttft_ms) AS ttft_samples
FROM traces
GROUP BY proxy_id, model
"""

_VIEW_COST_BY_PROPERTY = """
CREATE VIEW IF NOT EXISTS trace_cost_by_property AS
SELECT
    proxy_id,
    property_key,
    property_value,
    count() AS calls,
    sum(cost_usd) AS cost_usd
FROM traces
ARRAY JOIN mapKeys(custom_properties) AS property_key, mapValues(custom_properties) AS property_value
GROUP BY proxy_id, property_key, property_value
"""

_VIEW_COST_BY_SESSION = """
CREATE VIEW IF NOT EXISTS trace_cost_by_session AS
SELECT
    proxy_id,
    session_id,
    count() AS turns,
    min(timestamp) AS first_seen,
    max(timestamp) AS last_seen,
    sum(tokens_in) AS tokens_in,
    sum(tokens_out) AS tokens_out,
    sum(cost_usd) AS cost_usd
FROM traces
WHERE session_id != ''
GROUP BY proxy_id, session_id
"""

# Calls rejected before a session was resolved (turn 0) carry a session id of their own
# but are not sessions, so the view leaves them out.
_VIEW_COST_BY_SESSION_ADMITTED = _VIEW_COST_BY_SESSION.replace(
    "CREATE VIEW IF NOT EXISTS", "CREATE OR REPLACE VIEW"
).replace("WHERE session_id != ''", "WHERE session_id != '' AND session_turn > 0")

_VIEW_BLOCK_RATE = """
CREATE VIEW IF NOT EXISTS trace_block_rate_by_rule AS
SELECT
    rules.proxy_id AS proxy_id,
    rules.policy_rule_id AS policy_rule_id,
    rules.blocked AS blocked,
    totals.calls AS calls,
    rules.blocked / totals.calls AS block_rate
FROM
(
    SELECT proxy_id, policy_rule_id, countIf(policy_outcome IN ('block', 'block_response')) AS blocked
    FROM traces
    WHERE policy_rule_id != ''
    GROUP BY proxy_id, policy_rule_id
) AS rules
INNER JOIN
(
    SELECT proxy_id, count() AS calls FROM traces GROUP BY proxy_id
) AS totals ON rules.proxy_id = totals.proxy_id
"""

MIGRATIONS: list[tuple[int, str]] = [
    (1, _CREATE_TRACES),
    (2, _CREATE_STEPS),
    (3, _VIEW_LATENCY),
    (4, _VIEW_COST_BY_PROPERTY),
    (5, _VIEW_COST_BY_SESSION),
    (6, _VIEW_BLOCK_RATE),
    (7, _VIEW_COST_BY_SESSION_ADMITTED),
]


@dataclass(frozen=True)
class Retention:
    """Days kept: whole rows, and the body columns within them. 0 keeps them forever."""

    row_days: int = DEFAULT_ROW_RETENTION_DAYS
    body_days: int = DEFAULT_BODY_RETENTION_DAYS

    def __post_init__(self) -> None:
        for name in ("row_days", "body_days"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"retention {name} must be a whole number >= 0, got {value!r}")


def applied_versions(client) -> set[int]:
    client.command(_MIGRATIONS_TABLE)
    result = client.query("SELECT version FROM schema_migrations")
    return {row[0] for row in result.result_rows}


def migrate(client) -> list[int]:
    """Apply the migrations this store lacks, in order; return the versions applied."""
    done = applied_versions(client)
    applied = []
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        client.command(sql)
        client.insert("schema_migrations", [[version]], column_names=["version"])
        applied.append(version)
        logger.info("applied trace store migration %d", version)
    return applied


def apply_retention(client, retention: Retention) -> None:
    """Set the row and body TTLs, without rewriting existing parts."""
    if _is_distributed(client):
        logger.info("traces is a Distributed table: retention is set on the cluster's local tables")
        return
    tables = (("traces", BODY_COLUMNS), ("trace_steps", STEP_BODY_COLUMNS))
    for table, body_columns in tables:
        if retention.row_days:
            ttl = f"toDateTime(timestamp) + INTERVAL {retention.row_days} DAY"
            _alter(client, f"ALTER TABLE {table} MODIFY TTL {ttl}")
        else:
            _alter(client, f"ALTER TABLE {table} REMOVE TTL")
        for column in body_columns:
            _alter(client, _column_ttl_sql(table, column, retention.body_days))


def _is_distributed(client) -> bool:
    result = client.query(
        "SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'traces'"
    )
    return bool(result.result_rows) and result.result_rows[0][0] == "Distributed"


def _column_ttl_sql(table: str, column: str, days: int) -> str:
    if not days:
        return f"ALTER TABLE {table} MODIFY COLUMN {column} REMOVE TTL"
    ttl = f"toDateTime(timestamp) + INTERVAL {days} DAY"
    return f"ALTER TABLE {table} MODIFY COLUMN {column} String CODEC(ZSTD(3)) TTL {ttl}"


def _alter(client, sql: str) -> None:
    try:
        client.command(sql, settings={"materialize_ttl_after_modify": 0})
    except DatabaseError as exc:
        # REMOVE TTL fails when there is no TTL to remove, which is the wanted state.
        if "cannot remove" not in str(exc):
            raise
