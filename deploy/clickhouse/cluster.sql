-- Trace store on a replicated ClickHouse cluster.
--
-- Apply once with: clickhouse-client --multiquery < cluster.sql
-- The server needs the macros {cluster}, {shard} and {replica} (config.d/macros.xml) and
-- ClickHouse Keeper. Each *_local table is a ReplicatedMergeTree on every node, and the
-- Distributed table of the same name as the embedded schema (ext_proc/traces/schema.py)
-- spreads rows by trace id, so a trace and its steps land on the same shard.
--
-- Point the collector at any node with XENOVIA_CLICKHOUSE_URL. Its migrations find these
-- tables and views and create nothing. Retention is set here, not by the collector:
-- change it with ALTER TABLE traces_local ON CLUSTER '{cluster}' MODIFY TTL ...
-- Replicated tables deduplicate inserts by insert_deduplication_token; the collector
-- inserts with insert_distributed_sync = 1 so the token reaches the shards.

CREATE TABLE IF NOT EXISTS traces_local ON CLUSTER '{cluster}'
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
    messages String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + INTERVAL 30 DAY,
    tools String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + INTERVAL 30 DAY,
    response_content String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + INTERVAL 30 DAY,
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
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/traces_local', '{replica}')
PARTITION BY toYYYYMM(timestamp)
ORDER BY (proxy_id, timestamp, trace_id)
TTL toDateTime(timestamp) + INTERVAL 90 DAY
;

CREATE TABLE IF NOT EXISTS traces ON CLUSTER '{cluster}' AS traces_local
ENGINE = Distributed('{cluster}', currentDatabase(), traces_local, cityHash64(trace_id))
;

CREATE TABLE IF NOT EXISTS trace_steps_local ON CLUSTER '{cluster}'
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
    tool_args String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + INTERVAL 30 DAY,
    tool_result String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + INTERVAL 30 DAY,
    call_id String,
    attributes Map(String, String)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/{database}/trace_steps_local', '{replica}')
PARTITION BY toYYYYMM(timestamp)
ORDER BY (trace_id, timestamp)
TTL toDateTime(timestamp) + INTERVAL 90 DAY
;

CREATE TABLE IF NOT EXISTS trace_steps ON CLUSTER '{cluster}' AS trace_steps_local
ENGINE = Distributed('{cluster}', currentDatabase(), trace_steps_local, cityHash64(trace_id))
;

CREATE VIEW IF NOT EXISTS trace_latency_by_model ON CLUSTER '{cluster}' AS
SELECT
    proxy_id,
    model,
    count() AS calls,
    quantilesExactInclusive(0.5, 0.95, 0.99)(latency_ms) AS latency_ms_p50_p95_p99,
    quantilesExactInclusive(0.5, 0.95, 0.99)(ttft_ms) AS ttft_ms_p50_p95_p99,
    count(ttft_ms) AS ttft_samples
FROM traces
GROUP BY proxy_id, model
;

CREATE VIEW IF NOT EXISTS trace_cost_by_property ON CLUSTER '{cluster}' AS
SELECT
    proxy_id,
    property_key,
    property_value,
    count() AS calls,
    sum(cost_usd) AS cost_usd
FROM traces
ARRAY JOIN mapKeys(custom_properties) AS property_key, mapValues(custom_properties) AS property_value
GROUP BY proxy_id, property_key, property_value
;

CREATE VIEW IF NOT EXISTS trace_cost_by_session ON CLUSTER '{cluster}' AS
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
WHERE session_id != '' AND session_turn > 0
GROUP BY proxy_id, session_id
;

CREATE VIEW IF NOT EXISTS trace_block_rate_by_rule ON CLUSTER '{cluster}' AS
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
;

CREATE TABLE IF NOT EXISTS schema_migrations ON CLUSTER '{cluster}'
(
    version UInt32,
    applied_at DateTime DEFAULT now()
)
ENGINE = MergeTree
ORDER BY version
;
