"""``xenovia traces`` commands over a known data set, with figures computed by hand."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
from gateway_harness import REPO_ROOT, child_environment
from test_traces_support import BASE_TIME, CollectorProcess, simple_trace

from ext_proc.cli import EXIT_BROKEN_PIPE
from ext_proc.traces.commands import EXIT_NOT_FOUND, EXIT_OK, add_traces_parser

pytestmark = pytest.mark.timeout(300)

PROXY = "p-stats"
MINI = "gpt-4o-mini"
FULL = "gpt-4o"
# tokens_in=1000, tokens_out=100 at the built-in prices (USD per 1M tokens).
COST = {MINI: (1000 * 0.15 + 100 * 0.60) / 1e6, FULL: (1000 * 2.50 + 100 * 10.00) / 1e6}

# (model, latency_ms, ttft_ms, properties, session, outcome, rule)
ROWS = [
    (MINI, 10.0, 5.0, {"team": "a"}, "s1", "allow", ""),
    (MINI, 20.0, 6.0, {"team": "a"}, "s1", "block", "r1"),
    (MINI, 30.0, None, {"team": "b"}, "s1", "allow", ""),
    (MINI, 40.0, 8.0, {"team": "b", "env": "x"}, "s2", "redact", "r1"),
    (MINI, 100.0, 9.0, {}, "s2", "block", "r1"),
    (FULL, 50.0, None, {"team": "a"}, "s3", "block_response", "r2"),
    (FULL, 70.0, None, {}, "s3", "allow", ""),
    ("acme-unknown", 15.0, None, {"team": "a"}, "s3", "allow", ""),
]


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    if low + 1 >= len(ordered):
        return ordered[low]
    return ordered[low] + (position - low) * (ordered[low + 1] - ordered[low])


def build_traces():
    traces = []
    turns: dict[str, int] = {}
    for index, (model, latency, ttft, properties, session, outcome, rule) in enumerate(ROWS):
        turns[session] = turns.get(session, 0) + 1
        trace = simple_trace(
            index,
            proxy_id=PROXY,
            model=model,
            latency_ms=latency,
            tokens_in=1000,
            tokens_out=100,
            session_id=session,
            session_turn=turns[session],
            policy_outcome=outcome,
            policy_rule_id=rule,
            custom_properties=properties,
        )
        if ttft is not None:
            trace.ttft_ms = ttft
        traces.append(trace)
    other = simple_trace(
        99, proxy_id="p-other", model=MINI, latency_ms=999.0, session_id="s9", session_turn=1
    )
    other.custom_properties["team"] = "a"
    return traces, other


FAST_PROXY = "p-fast"
REASON = "delete_database is not permitted"


def build_fast_traces():
    """A block under 1 ms with a reason, and a call rejected before it joined a session."""
    fast = simple_trace(
        50, proxy_id=FAST_PROXY, latency_ms=0.627254, session_id="s8", session_turn=1,
        policy_outcome="block", policy_rule_id="tools.deny", policy_reason=REASON,
        custom_properties={"team": "c"},
    )
    fast.ttft_ms = 0.4
    fast.steps[0].latency_ms = 0.5
    rejected = simple_trace(
        51, proxy_id=FAST_PROXY, session_id="s7", session_turn=0, status=401, policy_outcome=""
    )
    return fast, rejected


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cli-home")
    traces, other = build_traces()
    fast = build_fast_traces()
    with CollectorProcess(home, "--flush-interval", "0.05") as collector:
        collector.export([*traces, other, *fast])
        collector.wait_drained(len(traces) + 1 + len(fast))
        yield home, collector, traces


def run_cli(capsys, home_dir, *argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="xenovia")
    add_traces_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["traces", "--home", str(home_dir), *argv])
    code = args.handler(args)
    return code, capsys.readouterr().out


def json_lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_stats_latency_matches_hand_computation(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "stats", "--proxy", PROXY, "--json")
    assert code == EXIT_OK
    stats = json.loads(output)
    by_model = {row["model"]: row for row in stats["latency_by_model"]}

    mini = [row for row in ROWS if row[0] == MINI]
    latencies = [row[1] for row in mini]
    ttfts = [row[2] for row in mini if row[2] is not None]
    assert by_model[MINI]["calls"] == 5
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert by_model[MINI][f"latency_ms_{name}"] == pytest.approx(quantile(latencies, q))
        assert by_model[MINI][f"ttft_ms_{name}"] == pytest.approx(quantile(ttfts, q))
    assert by_model[MINI]["ttft_samples"] == 4
    assert by_model[FULL]["latency_ms_p50"] == pytest.approx(60.0)
    assert by_model[FULL]["ttft_ms_p50"] is None
    assert set(by_model) == {MINI, FULL, "acme-unknown"}


def test_stats_cost_by_property_and_session(home, capsys):
    home_dir, _, _ = home
    _, output = run_cli(capsys, home_dir, "stats", "--proxy", PROXY, "--json")
    stats = json.loads(output)

    expected_property: dict[tuple[str, str], float] = {}
    expected_session: dict[str, float] = {}
    for model, _, _, properties, session, _, _ in ROWS:
        cost = COST.get(model, 0.0)
        for key, value in properties.items():
            expected_property[(key, value)] = expected_property.get((key, value), 0.0) + cost
        expected_session[session] = expected_session.get(session, 0.0) + cost
    by_property = {(r["property_key"], r["property_value"]): r for r in stats["cost_by_property"]}
    assert set(by_property) == set(expected_property)
    for key, cost in expected_property.items():
        assert by_property[key]["cost_usd"] == pytest.approx(cost), key
    assert by_property[("team", "a")]["calls"] == 4
    by_session = {row["session_id"]: row for row in stats["cost_by_session"]}
    assert set(by_session) == set(expected_session)
    for session, cost in expected_session.items():
        assert by_session[session]["cost_usd"] == pytest.approx(cost), session
    assert by_session["s3"]["turns"] == 3
    assert by_session["s3"]["tokens_in"] == 3000


def test_stats_block_rate_by_rule(home, capsys):
    home_dir, _, _ = home
    _, output = run_cli(capsys, home_dir, "stats", "--proxy", PROXY, "--json")
    rules = {row["policy_rule_id"]: row for row in json.loads(output)["block_rate_by_rule"]}
    assert set(rules) == {"r1", "r2"}
    assert rules["r1"]["blocked"] == 2
    assert rules["r1"]["calls"] == len(ROWS)
    assert rules["r1"]["block_rate"] == pytest.approx(2 / len(ROWS))
    assert rules["r2"]["block_rate"] == pytest.approx(1 / len(ROWS))


def test_stats_text_output(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "stats")
    assert code == EXIT_OK
    assert "== latency by model" in output
    assert "latency_ms_p95" in output
    assert "== block rate by rule" in output


def test_list_filters_and_json_lines(home, capsys):
    home_dir, _, traces = home
    code, output = run_cli(capsys, home_dir, "list", "--proxy", PROXY, "--json", "--limit", "100")
    assert code == EXIT_OK
    rows = json_lines(output)
    assert sorted(row["trace_id"] for row in rows) == sorted(t.trace_id for t in traces)
    assert rows[0]["timestamp"] >= rows[-1]["timestamp"]
    assert {"trace_id", "session_id", "tokens_in", "custom_properties", "cost_usd"} <= set(rows[0])

    _, output = run_cli(capsys, home_dir, "list", "--property", "team=b", "--json")
    assert len(json_lines(output)) == 2
    _, output = run_cli(capsys, home_dir, "list", "--model", FULL, "--outcome", "allow", "--json")
    assert [row["latency_ms"] for row in json_lines(output)] == [70.0]
    _, output = run_cli(capsys, home_dir, "list", "--session", "s1", "--limit", "2", "--json")
    assert len(json_lines(output)) == 2
    _, output = run_cli(capsys, home_dir, "list", "--status", "500", "--json")
    assert json_lines(output) == []
    _, output = run_cli(capsys, home_dir, "list", "--since", "1h", "--json")
    assert json_lines(output) == []
    since = BASE_TIME.isoformat()
    _, output = run_cli(capsys, home_dir, "list", "--since", since, "--limit", "100", "--json")
    assert len(json_lines(output)) == len(ROWS) + 3


def test_list_text_table(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "list", "--proxy", PROXY, "--limit", "3")
    lines = output.splitlines()
    assert code == EXIT_OK
    assert lines[0].split()[:3] == ["timestamp", "trace_id", "proxy_id"]
    assert len(lines) == 4


def test_show_prints_steps_as_tree(home, capsys):
    home_dir, _, traces = home
    trace_id = traces[0].trace_id
    code, output = run_cli(capsys, home_dir, "show", trace_id)
    assert code == EXIT_OK
    assert output.startswith(f"trace {trace_id}")
    assert "└─ llm chat.completions" in output

    code, output = run_cli(capsys, home_dir, "show", trace_id, "--json")
    shown = json.loads(output)
    assert shown["trace_id"] == trace_id
    assert [step["step_type"] for step in shown["steps"]] == ["llm"]

    code, _ = run_cli(capsys, home_dir, "show", "no-such-trace")
    assert code == EXIT_NOT_FOUND


def test_sessions(home, capsys):
    home_dir, _, _ = home
    code, output = run_cli(capsys, home_dir, "sessions", "--proxy", PROXY, "--json")
    assert code == EXIT_OK
    sessions = {row["session_id"]: row for row in json_lines(output)}
    assert set(sessions) == {"s1", "s2", "s3"}
    assert sessions["s1"]["turns"] == 3
    assert sessions["s1"]["tokens_out"] == 300
    assert sessions["s1"]["cost_usd"] == pytest.approx(3 * COST[MINI])
    assert sessions["s1"]["first_seen"] < sessions["s1"]["last_seen"]
    code, output = run_cli(capsys, home_dir, "sessions")
    assert "s9" in output


def test_invalid_arguments(home, capsys):
    home_dir, _, _ = home
    code, _ = run_cli(capsys, home_dir, "list", "--property", "novalue")
    assert code == 1
    code, _ = run_cli(capsys, home_dir, "list", "--since", "yesterday")
    assert code == 1


def test_cli_reads_store_without_collector(tmp_path, capsys):
    traces, _ = build_traces()
    with CollectorProcess(tmp_path) as collector:
        collector.export(traces)
        collector.wait_drained(len(traces))
    code, output = run_cli(capsys, tmp_path, "list", "--limit", "100", "--json")
    assert code == EXIT_OK
    assert len(json_lines(output)) == len(ROWS)


def test_missing_store_reported_not_created(tmp_path):
    import subprocess
    import sys

    home = tmp_path / "typo"

    result = subprocess.run([sys.executable, "-m", "ext_proc.cli", "--home", str(home), "traces", "list"],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1
    assert "no trace store" in result.stderr
    assert not home.exists()


def test_list_rejects_unknown_outcome(home, capsys):
    home_dir, _, _ = home
    with pytest.raises(SystemExit) as raised:
        run_cli(capsys, home_dir, "list", "--outcome", "dry_run")
    assert raised.value.code == 2
    assert "invalid choice: 'dry_run'" in capsys.readouterr().err


def test_list_accepts_every_recorded_outcome(home, capsys):
    home_dir, _, _ = home
    for outcome in ("allow", "block", "redact", "block_response", "redact_response"):
        code, output = run_cli(capsys, home_dir, "list", "--outcome", outcome, "--json")
        assert code == EXIT_OK, outcome
        assert {row["policy_outcome"] for row in json_lines(output)} <= {outcome}
    _, output = run_cli(capsys, home_dir, "list", "--outcome", "block_response", "--json")
    assert [row["session_id"] for row in json_lines(output)] == ["s3"]


def test_sessions_leave_out_turn_zero(home, capsys):
    home_dir, _, _ = home
    _, listed = run_cli(capsys, home_dir, "list", "--proxy", FAST_PROXY, "--json")
    _, sessions = run_cli(capsys, home_dir, "sessions", "--proxy", FAST_PROXY, "--json")
    _, stats = run_cli(capsys, home_dir, "stats", "--proxy", FAST_PROXY, "--json")

    assert sorted(row["session_id"] for row in json_lines(listed)) == ["s7", "s8"]
    assert [row["session_id"] for row in json_lines(sessions)] == ["s8"]
    assert [row["session_id"] for row in json.loads(stats)["cost_by_session"]] == ["s8"]


def test_latencies_print_two_decimals(home, capsys):
    home_dir, _, _ = home
    _, listed = run_cli(capsys, home_dir, "list", "--proxy", FAST_PROXY, "--outcome", "block")
    _, stats = run_cli(capsys, home_dir, "stats", "--proxy", FAST_PROXY)

    header, row = listed.splitlines()
    assert row.split()[header.split().index("latency_ms")] == "0.63"
    stats_header, stats_row = stats.splitlines()[1:3]
    assert stats_row.split()[stats_header.split().index("ttft_ms_p50")] == "0.40"


def test_show_prints_properties_reason_and_latency(home, capsys):
    home_dir, _, _ = home
    _, listed = run_cli(capsys, home_dir, "list", "--proxy", FAST_PROXY, "--outcome", "block", "--json")
    trace_id = json_lines(listed)[0]["trace_id"]

    code, output = run_cli(capsys, home_dir, "show", trace_id)

    assert code == EXIT_OK
    assert f"  policy_reason: {REASON}" in output
    assert '  custom_properties: {"team": "c"}' in output
    assert "  latency_ms: 0.63" in output
    assert "  ttft_ms: 0.40" in output
    assert "└─ llm chat.completions [0.50 ms, ok]" in output


def test_closed_stdout_exits_quietly(home):
    home_dir, _, _ = home
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ext_proc.cli", "--home", str(home_dir), "traces", "list"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            env=child_environment(home_dir), cwd=REPO_ROOT,
        )
    finally:
        os.close(write_end)

    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE
