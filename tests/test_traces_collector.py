"""Collector write path on the embedded store, over a real Unix-socket gRPC connection."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from test_traces_support import BASE_NANO, CollectorProcess, iso_at, simple_trace, wait_until

from ext_proc.pb import trace_pb2
from ext_proc.traces.cost import PRICE_TABLE_VERSION

pytestmark = pytest.mark.timeout(300)

SECRETS = (
    "xe_live_0123456789abcdef",
    "sk-proj-ABCDEFGHIJKLMNOPQRST123456",
    "sk-ant-api03-abcdefghijklmnopqrstuv",
    "AKIAABCDEFGHIJKLMNOP",
    "eyJhbGciOiJIUzI1NiJ9.payload.signature",
)
EMAIL = "jane.doe@example.com"
SSN = "123-45-6789"


@pytest.fixture(scope="module")
def collector(tmp_path_factory):
    home = tmp_path_factory.mktemp("collector-home")
    with CollectorProcess(home, "--flush-interval", "0.05") as process:
        yield process


def full_trace() -> trace_pb2.Trace:
    trace = trace_pb2.Trace(
        trace_id=str(uuid.uuid4()),
        start_unix_nano=BASE_NANO + 123_456_000,
        end_unix_nano=BASE_NANO + 923_456_000,
        session_id=str(uuid.uuid4()),
        session_turn=3,
        session_path="/support/refunds",
        session_source="header",
        parent_trace_id=str(uuid.uuid4()),
        flow_id="flow-7",
        proxy_id="proxy-full",
        org_id="org-1",
        environment="prod",
        key_id="a1b2c3d4",
        provider="openai",
        model="gpt-4o",
        model_served="gpt-4o-2024-08-06",
        request_type="chat_completions",
        stream=True,
        method="POST",
        path="/a/proxy-full/openai/v1/chat/completions",
        messages='[{"role":"user","content":"hello"}]',
        tools='[{"type":"function","function":{"name":"lookup"}}]',
        response_content="hi there",
        tokens_in=1000,
        tokens_out=200,
        cached_tokens=400,
        reasoning_tokens=50,
        usage_reported=True,
        latency_ms=800.5,
        ttft_ms=120.25,
        overhead_ms=3.5,
        policy_ms=1.25,
        provider_ms=795.0,
        status=200,
        error_type="",
        error_message="",
        policy_outcome="redact",
        policy_rule_id="pii-rule",
        policy_reason="email found",
        redacted_kinds=["email", "ssn"],
        dry_run=True,
        dry_run_outcome="block",
        intent_score=0.875,
        intent_action="allow",
        custom_properties={"team": "payments", "tier": "gold"},
        stream_completed=True,
        finish_reason="stop",
        stream_policy_mode="hold",
        body_mode="full",
        body_limit=4096,
    )
    trace.steps.add(
        step_id="step-1",
        step_type="tool_call",
        name="lookup",
        start_unix_nano=BASE_NANO + 200_000_000,
        latency_ms=12.5,
        status="success",
        tool_name="lookup",
        tool_args='{"id": 7}',
        tool_result='{"ok": true}',
        call_id="call_1",
        attributes={"attempt": "1"},
    )
    trace.steps.add(
        step_id="step-2",
        step_type="llm",
        name="chat.completions",
        start_unix_nano=BASE_NANO + 300_000_000,
        latency_ms=500.0,
        status="ok",
    )
    return trace


def read_trace(collector: CollectorProcess, trace_id: str) -> dict:
    rows = collector.query("SELECT * FROM traces WHERE trace_id = {id:String}", id=trace_id)
    assert len(rows) == 1
    return rows[0]


def read_steps(collector: CollectorProcess, trace_id: str) -> list[dict]:
    return collector.query(
        "SELECT * FROM trace_steps WHERE trace_id = {id:String} ORDER BY timestamp", id=trace_id
    )


def export_and_wait(collector: CollectorProcess, traces: list[trace_pb2.Trace]) -> None:
    target = collector.stats().queued + len(traces)
    assert collector.export(traces) == len(traces)
    collector.wait_drained(target)


def test_every_column_round_trips(collector):
    trace = full_trace()
    export_and_wait(collector, [trace])
    row = read_trace(collector, trace.trace_id)

    expected_strings = (
        "trace_id", "session_id", "session_path", "session_source", "parent_trace_id", "flow_id",
        "proxy_id", "org_id", "environment", "key_id", "provider", "model", "model_served",
        "request_type", "method", "path", "messages", "tools", "response_content", "error_type",
        "error_message", "policy_outcome", "policy_rule_id", "policy_reason", "dry_run_outcome",
        "intent_action", "finish_reason", "stream_policy_mode", "body_mode",
    )  # fmt: skip
    for name in expected_strings:
        assert row[name] == getattr(trace, name), name
    for name in ("session_turn", "tokens_in", "tokens_out", "cached_tokens", "reasoning_tokens",
                 "status"):  # fmt: skip
        assert row[name] == getattr(trace, name), name
    for name in (
        "latency_ms",
        "ttft_ms",
        "overhead_ms",
        "policy_ms",
        "provider_ms",
        "intent_score",
    ):
        assert row[name] == pytest.approx(getattr(trace, name)), name
    for name in ("stream", "usage_reported", "dry_run", "stream_completed"):
        assert row[name] is True, name
    assert row["timestamp"] == iso_at(123_456)
    assert row["end_timestamp"] == iso_at(923_456)
    assert row["redacted_kinds"] == ["email", "ssn"]
    assert row["custom_properties"] == {"team": "payments", "tier": "gold"}
    # gpt-4o-2024-08-06 is priced as gpt-4o: 600 uncached in, 400 cached in, 200 out.
    assert row["cost_usd"] == pytest.approx((600 * 2.50 + 400 * 1.25 + 200 * 10.00) / 1e6)
    assert row["price_version"] == PRICE_TABLE_VERSION


def test_steps_round_trip(collector):
    trace = full_trace()
    export_and_wait(collector, [trace])
    steps = read_steps(collector, trace.trace_id)

    assert [step["step_id"] for step in steps] == ["step-1", "step-2"]
    tool = steps[0]
    assert tool["trace_id"] == trace.trace_id
    assert tool["parent_trace_id"] == trace.trace_id
    assert tool["proxy_id"] == "proxy-full"
    assert tool["step_type"] == "tool_call"
    assert tool["name"] == "lookup"
    assert tool["timestamp"] == iso_at(200_000)
    assert tool["latency_ms"] == 12.5
    assert tool["status"] == "success"
    assert tool["tool_name"] == "lookup"
    assert tool["tool_args"] == '{"id": 7}'
    assert tool["tool_result"] == '{"ok": true}'
    assert tool["call_id"] == "call_1"
    assert tool["attributes"] == {"attempt": "1"}
    assert steps[1]["step_type"] == "llm"


def test_missing_usage_and_unknown_model_stay_null(collector):
    no_usage = simple_trace(model="gpt-4o")
    for name in ("tokens_in", "tokens_out"):
        no_usage.ClearField(name)
    no_usage.usage_reported = False
    unknown_model = simple_trace(model="acme-llm-9000")
    export_and_wait(collector, [no_usage, unknown_model])

    row = read_trace(collector, no_usage.trace_id)
    for name in ("tokens_in", "tokens_out", "cached_tokens", "reasoning_tokens", "cost_usd",
                 "ttft_ms", "provider_ms", "intent_score", "stream_completed"):  # fmt: skip
        assert row[name] is None, name
    assert row["price_version"] == ""
    unknown = read_trace(collector, unknown_model.trace_id)
    assert unknown["tokens_in"] == 100
    assert unknown["cost_usd"] is None


def test_secrets_and_pii_removed_from_traces_and_steps(collector):
    dirty = " ".join(SECRETS[:4]) + f" Authorization: Bearer {SECRETS[4]} mail {EMAIL} ssn {SSN}"
    trace = simple_trace(
        messages=json.dumps([{"role": "user", "content": dirty}]),
        tools=dirty,
        response_content=dirty,
        error_message=dirty,
        policy_reason=dirty,
        session_path=f"/users/{EMAIL}",
        path=f"/a/proxy-a/openai/v1/chat/completions?key={SECRETS[0]}",
        custom_properties={"owner": EMAIL, "token": SECRETS[1]},
    )
    trace.steps.add(
        step_id="tool",
        step_type="tool_call",
        name=f"call for {EMAIL}",
        tool_name="send",
        tool_args=dirty,
        tool_result=dirty,
        attributes={"auth": f"Bearer {SECRETS[4]}", "ssn": SSN},
    )
    export_and_wait(collector, [trace])

    stored = json.dumps(
        [read_trace(collector, trace.trace_id), read_steps(collector, trace.trace_id)]
    )
    for secret in (*SECRETS, EMAIL, SSN):
        assert secret not in stored, secret
    assert "[REDACTED_SECRET]" in stored
    assert "[REDACTED_EMAIL]" in stored
    assert "[REDACTED_SSN]" in stored
    steps = read_steps(collector, trace.trace_id)
    tool = next(step for step in steps if step["step_id"] == "tool")
    assert tool["attributes"]["auth"] == "Bearer [REDACTED_SECRET]"
    assert tool["attributes"]["ssn"] == "[REDACTED_SSN]"


def test_body_modes(collector):
    def with_bodies(mode: str, limit: int = 0) -> trace_pb2.Trace:
        trace = simple_trace(
            messages="é" * 50,
            tools="T" * 40,
            response_content="R" * 40,
            body_mode=mode,
            body_limit=limit,
        )
        trace.steps.add(
            step_id="tool", step_type="tool_call", tool_args="A" * 40, tool_result="B" * 40
        )
        return trace

    full = with_bodies("full", limit=11)
    metadata = with_bodies("metadata")
    none = with_bodies("none")
    unset = with_bodies("")
    export_and_wait(collector, [full, metadata, none, unset])

    def bodies(trace):
        row = read_trace(collector, trace.trace_id)
        tool = next(s for s in read_steps(collector, trace.trace_id) if s["step_id"] == "tool")
        return row, tool

    row, tool = bodies(full)
    assert row["messages"] == "é" * 5  # 11 bytes cut on a character boundary
    assert row["tools"] == "T" * 11
    assert row["response_content"] == "R" * 11
    assert tool["tool_args"] == "A" * 11
    assert tool["tool_result"] == "B" * 11

    row, tool = bodies(metadata)
    assert row["body_mode"] == "metadata"
    assert (row["messages"], row["response_content"]) == ("", "")
    assert row["tools"] == "T" * 40
    assert (tool["tool_args"], tool["tool_result"]) == ("", "")

    row, tool = bodies(none)
    assert (row["messages"], row["tools"], row["response_content"]) == ("", "", "")
    assert (tool["tool_args"], tool["tool_result"]) == ("", "")

    row, _ = bodies(unset)
    assert row["body_mode"] == "full"
    assert row["messages"] == "é" * 50


def test_query_is_read_only(collector):
    with pytest.raises(grpc.RpcError) as raised:
        collector.query("DROP TABLE traces")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        collector.query("INSERT INTO traces (trace_id) VALUES ('x')")
    assert collector.scalar("SELECT count() FROM system.tables WHERE name = 'traces'") == 1


def test_query_binds_parameters(collector):
    trace = simple_trace(session_path="it's a \\ path")
    export_and_wait(collector, [trace])
    rows = collector.query(
        "SELECT trace_id FROM traces WHERE session_path = {path:String}", path="it's a \\ path"
    )
    assert [row["trace_id"] for row in rows] == [trace.trace_id]


def test_stats_counts_exported_traces(collector):
    before = collector.stats()
    traces = [simple_trace(index) for index in range(25)]
    collector.export(traces)
    stats = wait_until(lambda: (s := collector.stats()).written >= before.written + 25 and s)
    assert stats.queued == before.queued + 25
    assert stats.dropped == 0
    assert stats.failed_batches == 0


def test_export_sent_twice_is_written_once(collector):
    trace = full_trace()
    export_and_wait(collector, [trace])

    assert collector.export([trace]) == 1
    export_and_wait(collector, [simple_trace(0)])

    assert len(collector.query("SELECT trace_id FROM traces WHERE trace_id = {id:String}",
                               id=trace.trace_id)) == 1


def test_mixed_export_scrubs_only_dirty_traces(collector):
    clean = [simple_trace(index, messages=f"plain text {index}") for index in range(3)]
    dirty = simple_trace(9, messages=f"key {SECRETS[0]} mail {EMAIL}")
    export_and_wait(collector, [clean[0], dirty, *clean[1:]])

    stored = read_trace(collector, dirty.trace_id)
    assert SECRETS[0] not in stored["messages"]
    assert EMAIL not in stored["messages"]
    assert "[REDACTED_SECRET]" in stored["messages"]
    for index, trace in enumerate(clean):
        assert read_trace(collector, trace.trace_id)["messages"] == f"plain text {index}"
        assert len(read_steps(collector, trace.trace_id)) == 1


def test_partly_resent_export_writes_new_traces(collector):
    first = simple_trace(0)
    export_and_wait(collector, [first])
    second = simple_trace(1)

    assert collector.export([first, second]) == 2
    export_and_wait(collector, [simple_trace(2)])

    rows = collector.query(
        "SELECT trace_id FROM traces WHERE trace_id IN ({a:String}, {b:String})",
        a=first.trace_id,
        b=second.trace_id,
    )
    assert sorted(row["trace_id"] for row in rows) == sorted([first.trace_id, second.trace_id])
    assert len(read_steps(collector, second.trace_id)) == 1


def test_idle_flush_writes_partial_batch(tmp_path):
    # The flush interval alone would hold the trace for longer than the wait below.
    with CollectorProcess(tmp_path, "--flush-interval", "600", "--idle-flush", "0.2") as process:
        trace = simple_trace()
        assert process.export([trace]) == 1
        process.wait_drained(1, timeout=60)
        assert len(read_steps(process, trace.trace_id)) == 1
