"""Trace store schema: migrations, retention, views, and the cluster DDL in deploy/."""

from __future__ import annotations

import re
from pathlib import Path

import clickhouse_connect
import pytest

from ext_proc.traces import clickhouse_dsn
from ext_proc.traces.schema import MIGRATIONS, Retention, apply_retention, migrate

pytestmark = pytest.mark.timeout(300)

CLUSTER_SQL = Path(__file__).resolve().parents[1] / "deploy" / "clickhouse" / "cluster.sql"
VIEWS = ("trace_latency_by_model", "trace_cost_by_property", "trace_cost_by_session",
         "trace_block_rate_by_rule")  # fmt: skip


@pytest.fixture
def client(tmp_path):
    client = clickhouse_connect.get_client(dsn=clickhouse_dsn(tmp_path))
    yield client
    client.close()


def cluster_statements() -> list[str]:
    text = "\n".join(
        line for line in CLUSTER_SQL.read_text().splitlines() if not line.startswith("--")
    )
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def create_query(client, table: str) -> str:
    return client.query(
        "SELECT create_table_query FROM system.tables WHERE database = currentDatabase()"
        " AND name = {table:String}",
        parameters={"table": table},
    ).result_rows[0][0]


def test_migrations_apply_once_in_order(client):
    assert migrate(client) == [version for version, _ in MIGRATIONS]
    assert migrate(client) == []
    versions = [row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows]
    assert sorted(versions) == [version for version, _ in MIGRATIONS]


def test_views_answer_on_empty_store(client):
    migrate(client)
    for view in VIEWS:
        assert client.query(f"SELECT * FROM {view}").result_rows == []


def test_session_view_leaves_out_rejected_calls(client):
    migrate(client)
    client.command(
        "INSERT INTO traces (trace_id, session_id, session_turn, proxy_id) VALUES "
        "(generateUUIDv4(), 'sess-admitted', 1, 'prx_a'), "
        "(generateUUIDv4(), 'sess-admitted', 2, 'prx_a'), "
        "(generateUUIDv4(), 'sess-rejected', 0, 'prx_a')"
    )

    rows = client.query("SELECT session_id, turns FROM trace_cost_by_session").result_rows

    assert rows == [("sess-admitted", 2)]


def test_retention_sets_and_removes_ttls(client):
    migrate(client)
    apply_retention(client, Retention(row_days=7, body_days=2))
    traces = create_query(client, "traces")
    assert "TTL toDateTime(timestamp) + toIntervalDay(7)" in traces
    assert "`messages` String CODEC(ZSTD(3)) TTL toDateTime(timestamp) + toIntervalDay(2)" in traces
    assert "`tool_args` String CODEC(ZSTD(3)) TTL" in create_query(client, "trace_steps")

    apply_retention(client, Retention(row_days=0, body_days=0))
    apply_retention(client, Retention(row_days=0, body_days=0))
    assert " TTL " not in create_query(client, "traces")


def test_retention_rejects_negative_days():
    with pytest.raises(ValueError):
        Retention(row_days=-1)


def test_tables_deduplicate_without_replication(client):
    migrate(client)
    for table in ("traces", "trace_steps"):
        assert "non_replicated_deduplication_window = 10000" in create_query(client, table)


def test_cluster_ddl_parses(client):
    statements = cluster_statements()
    assert len(statements) == 9
    for statement in statements:
        formatted = client.query("SELECT formatQuery({sql:String})", parameters={"sql": statement})
        assert formatted.result_rows[0][0].startswith("CREATE"), statement[:80]


def _columns(create_sql: str) -> list[str]:
    body = create_sql[create_sql.index("(") + 1 : create_sql.index("\n)")]
    return [
        line.split()[0]
        for line in body.splitlines()
        if line.strip() and not line.strip().startswith("INDEX")
    ]


def test_cluster_tables_have_embedded_columns(client):
    migrate(client)
    statements = {re.search(r"EXISTS (\w+)", s)[1]: s for s in cluster_statements()}
    for table in ("traces", "trace_steps"):
        embedded = [row[0] for row in client.query(f"DESCRIBE TABLE {table}").result_rows]
        assert _columns(statements[f"{table}_local"]) == embedded, table
        assert "ReplicatedMergeTree" in statements[f"{table}_local"]
        assert "Distributed('{cluster}'" in statements[table]
    for view in VIEWS:
        assert view in statements
