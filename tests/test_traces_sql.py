"""``xenovia traces sql``, the wait of ``traces show``, and small and long values in tables."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid

import httpx2 as httpx
import pytest
from gateway_harness import REPO_ROOT, child_environment
from test_traces_cli import json_lines
from test_traces_support import CollectorProcess, simple_trace

from ext_proc.traces import commands
from ext_proc.traces.commands import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_OK, add_traces_parser

pytestmark = pytest.mark.timeout(300)

EMBEDDING = "text-embedding-3-small"
LONG_VALUE = "v" * 512
WRITES = (
    "INSERT INTO traces (trace_id) VALUES ('x')",
    "DROP TABLE traces",
    "DROP VIEW trace_latency_by_model",
    "ALTER TABLE traces DELETE WHERE 1",
    "ALTER TABLE traces ADD COLUMN x UInt8",
    "CREATE TABLE t (x UInt8) ENGINE = Memory",
    "TRUNCATE TABLE traces",
    "SET readonly = 0",
    "SELECT 1 SETTINGS readonly = 0",
    "SELECT * FROM file('/etc/hostname', 'LineAsString')",
    "SELECT file('/etc/hostname')",
    "SELECT 1 SETTINGS max_execution_time = 0",
    "INSERT INTO traces SELECT * FROM traces LIMIT 0",
)


def build_traces():
    chat = simple_trace(0, proxy_id="p-sql", custom_properties={"note": LONG_VALUE})
    # One input token of an embeddings model: 0.02 USD per 1M tokens.
    embedding = simple_trace(
        1, proxy_id="p-sql", model=EMBEDDING, request_type="embeddings", tokens_in=1,
        tokens_out=0,
    )
    return [chat, embedding]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("sql-home")
    traces = build_traces()
    with CollectorProcess(home, "--flush-interval", "0.05") as collector:
        collector.export(traces)
        collector.wait_drained(len(traces))
        yield home, collector, traces


def run_cli(capsys, home_dir, *argv) -> tuple[int, str]:
    code, output, _ = run_cli_err(capsys, home_dir, *argv)
    return code, output


def run_cli_err(capsys, home_dir, *argv) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="xenovia")
    add_traces_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["traces", "--home", str(home_dir), *argv])
    code = args.handler(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli(home_dir, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "--home", str(home_dir), "traces", *argv],
        capture_output=True, text=True, timeout=120, env=child_environment(home_dir),
        cwd=REPO_ROOT,
    )


def test_sql_reads_views_through_the_collector(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(
        capsys, home_dir, "sql",
        "SELECT model, calls FROM trace_latency_by_model WHERE proxy_id = 'p-sql' ORDER BY model",
    )
    assert code == EXIT_OK
    lines = output.splitlines()
    assert lines[0].split() == ["model", "calls"]
    assert [line.split() for line in lines[1:]] == [["gpt-4o-mini", "1"], [EMBEDDING, "1"]]

    code, output = run_cli(
        capsys, home_dir, "sql", "SELECT * FROM trace_cost_by_property", "--json"
    )
    assert code == EXIT_OK
    [row] = json_lines(output)
    assert row["property_key"] == "note"
    assert row["property_value"] == LONG_VALUE


def test_sql_with_no_rows(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "sql", "SELECT * FROM traces WHERE 0")
    assert (code, output) == (EXIT_OK, "(no rows)\n")
    code, output = run_cli(capsys, home_dir, "sql", "SELECT * FROM traces WHERE 0", "--json")
    assert (code, output) == (EXIT_OK, "")


@pytest.mark.parametrize("statement", WRITES)
def test_sql_rejects_writes(home, statement):
    home_dir, collector, traces = home
    result = cli(home_dir, "sql", statement)

    assert result.returncode == EXIT_FAILED
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "read-only" in result.stderr
    assert "(READONLY)" in result.stderr
    assert collector.scalar("SELECT count() FROM traces") == len(traces)
    assert collector.scalar("SELECT count() FROM trace_latency_by_model") == len(traces)


def test_sql_error_is_one_line(home):
    home_dir, _, _ = home
    result = cli(home_dir, "sql", "SELEC * FROM traces")
    assert result.returncode == EXIT_FAILED
    assert result.stderr.startswith("xenovia traces: trace query failed: Syntax error")
    assert result.stderr.rstrip().endswith("(SYNTAX_ERROR)")
    assert result.stderr.count("\n") == 1, result.stderr

    result = cli(home_dir, "sql", "SELECT * FROM no_such_table")
    assert result.returncode == EXIT_FAILED
    assert "(UNKNOWN_TABLE)" in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


def test_sql_runs_one_statement(home, capsys):
    home_dir, collector, traces = home
    for statement in ("SELECT 1; SELECT 2", "SELECT 1; DROP TABLE traces"):
        code, output, error = run_cli_err(capsys, home_dir, "sql", statement)
        assert (code, output) == (EXIT_FAILED, "")
        assert error == (
            "xenovia traces: the query has more than one statement. Run each on its own\n"
        )
    code, output = run_cli(capsys, home_dir, "sql", "SELECT ';' AS s, count() AS n FROM traces;")
    assert code == EXIT_OK
    assert output.splitlines()[1].split() == [";", str(len(traces))]


def test_sql_without_collector_reads_the_store(tmp_path, capsys):
    traces = build_traces()
    with CollectorProcess(tmp_path) as collector:
        collector.export(traces)
        collector.wait_drained(len(traces))

    code, output = run_cli(capsys, tmp_path, "sql", "SELECT count() AS n FROM traces", "--json")
    assert (code, json_lines(output)) == (EXIT_OK, [{"n": len(traces)}])
    code, _, error = run_cli_err(capsys, tmp_path, "sql", "DROP TABLE traces")
    assert code == EXIT_FAILED
    assert "(READONLY)" in error
    code, output = run_cli(capsys, tmp_path, "sql", "SELECT count() AS n FROM traces", "--json")
    assert json_lines(output) == [{"n": len(traces)}]


def test_sql_without_store(tmp_path):
    result = cli(tmp_path / "typo", "sql", "SELECT 1")
    assert result.returncode == EXIT_FAILED
    assert "no trace store" in result.stderr
    assert not (tmp_path / "typo").exists()


def test_list_prints_small_costs(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "list", "--model", EMBEDDING)
    header, row = output.splitlines()
    assert code == EXIT_OK
    assert row.split()[header.split().index("cost_usd")] == "0.00000002"


def test_stats_cuts_long_property_values(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "stats", "--proxy", "p-sql")
    assert code == EXIT_OK
    assert LONG_VALUE not in output
    assert max(len(line) for line in output.splitlines()) < 160

    _, output = run_cli(capsys, home_dir, "stats", "--proxy", "p-sql", "--json")
    [row] = json.loads(output)["cost_by_property"]
    assert row["property_value"] == LONG_VALUE


def test_show_waits_for_a_trace_on_its_way(tmp_path, capsys):
    # The collector writes a lone trace only after a second, as a gateway's exporter and
    # collector deliver a trace about a second after the response.
    with CollectorProcess(tmp_path, "--flush-interval", "1.0", "--idle-flush", "1.0") as collector:
        trace = simple_trace(0)
        collector.export([trace])
        code, output = run_cli(capsys, tmp_path, "show", trace.trace_id)
        assert code == EXIT_OK
        assert output.startswith(f"trace {trace.trace_id}")

        missing = str(uuid.uuid4())
        started = time.monotonic()
        code, _, error = run_cli_err(capsys, tmp_path, "show", missing)
        waited = time.monotonic() - started
        assert code == EXIT_NOT_FOUND
        assert "try again" in error
        assert commands.SHOW_WAIT_S <= waited < commands.SHOW_WAIT_S + 10


def test_sql_and_show_while_gateway_runs(gateway):
    access = gateway.new_proxy("sql")
    response = httpx.post(
        f"{access.base_url}/embeddings",
        headers={"Authorization": f"Bearer {access.key}"},
        json={"model": EMBEDDING, "input": "hi"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-xenovia-trace-id"]

    show = gateway.cli("traces", "show", trace_id, "--json", check=False)
    assert show.returncode == EXIT_OK, show.stderr
    assert json.loads(show.stdout)["trace_id"] == trace_id

    result = gateway.cli(
        "traces", "sql", "--json",
        f"SELECT calls FROM trace_latency_by_model WHERE proxy_id = '{access.proxy_id}'",
        check=False,
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert json_lines(result.stdout) == [{"calls": 1}]
    dropped = gateway.cli("traces", "sql", "DROP TABLE traces", check=False)
    assert dropped.returncode == EXIT_FAILED
    assert "(READONLY)" in dropped.stderr


def test_endless_query_stopped_and_writes_resume(tmp_path):
    # Queries run on the collector's writer thread, so one that never ends would hold back
    # every trace write behind it.
    with CollectorProcess(tmp_path, "--flush-interval", "0.05") as collector:
        began = time.monotonic()
        result = cli(tmp_path, "sql", "SELECT count() FROM system.numbers")
        took = time.monotonic() - began

        assert result.returncode == EXIT_FAILED
        assert "TIMEOUT_EXCEEDED" in result.stderr
        assert took < 30
        trace = simple_trace(7, proxy_id="p-after-timeout")
        collector.export([trace])
        collector.wait_drained(1, timeout=30)
        assert collector.scalar("SELECT count() FROM traces") == 1


def test_memory_hungry_query_stopped(home):
    home_dir, collector, traces = home
    # About 2 GB of strings in one array, over the 1 GB limit of a query.
    result = cli(home_dir, "sql", "SELECT length(groupArray(repeat('a', 1000000))) FROM numbers(2000)")

    assert result.returncode == EXIT_FAILED
    assert "MEMORY_LIMIT_EXCEEDED" in result.stderr
    assert collector.scalar("SELECT count() FROM traces") == len(traces)


def test_query_after_result_limit_works(home):
    home_dir, collector, traces = home
    too_big = cli(home_dir, "sql", "SELECT number FROM numbers(100000000)")
    assert too_big.returncode == EXIT_FAILED
    assert "TOO_MANY_ROWS_OR_BYTES" in too_big.stderr

    after = cli(home_dir, "sql", "SELECT 1 AS one", "--json")

    assert after.returncode == EXIT_OK, after.stderr
    assert json.loads(after.stdout) == {"one": 1}


def test_uuid_and_address_values_printed(home):
    home_dir, _, _ = home
    query = "SELECT toUUID('00000000-0000-0000-0000-000000000001') AS u, toIPv4('1.2.3.4') AS ip"

    result = cli(home_dir, "sql", query, "--json")

    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout) == {"u": "00000000-0000-0000-0000-000000000001", "ip": "1.2.3.4"}
