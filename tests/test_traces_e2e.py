"""Trace rows and steps written by real traffic through the gateway into the embedded ClickHouse."""

import json
import time
import uuid
from pathlib import Path

import openai
import pytest
from conftest import wait_for_trace
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
SEED_POLICY = REPO / "policies" / "block_dangerous_tools.rego"
EMAIL = "jane.doe@example.com"


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def access(gateway):
    return gateway.new_proxy("traces")


@pytest.fixture(scope="module")
def client(access):
    return OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)


def step_types(trace: dict) -> list[str]:
    return [step["step_type"] for step in trace["steps"]]


def test_allowed_call_fills_every_field(gateway, access, client):
    session = str(uuid.uuid4())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tools=[tool("get_weather")],
        extra_headers={"X-Xenovia-Session-Id": session, "X-Xenovia-Property-team": "support"},
    )

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])

    assert trace["session_id"] == session
    assert trace["session_turn"] == 1
    assert trace["session_source"] == "header"
    assert trace["org_id"] == "org_default"
    assert trace["environment"] == "dev"
    assert trace["request_type"] == "chat_completions"
    assert trace["model"] == "gpt-4o-mini"
    assert trace["model_served"] == "gpt-4o-mini-2024-07-18"
    assert trace["stream"] is False
    assert trace["tokens_in"] > 0
    assert trace["tokens_out"] == 6
    assert trace["usage_reported"] is True
    assert trace["cost_usd"] > 0
    assert trace["provider_ms"] > 0
    assert trace["latency_ms"] >= trace["provider_ms"]
    assert 0 < trace["overhead_ms"] < trace["latency_ms"]
    assert trace["ttft_ms"] is None
    assert trace["finish_reason"] == "stop"
    assert trace["custom_properties"] == {"team": "support"}
    assert json.loads(trace["messages"])[1]["content"] == "Hi"
    assert json.loads(trace["tools"])[0]["function"]["name"] == "get_weather"
    assert trace["response_content"] == "Hello from the Xenovia mock provider."
    assert step_types(trace)[0] == "request_received"
    assert "llm" in step_types(trace)
    assert step_types(trace)[-1] == "request_finished"
    assert all(step["parent_trace_id"] == trace["trace_id"] for step in trace["steps"])
    assert len({step["step_id"] for step in trace["steps"]}) == len(trace["steps"])


def test_blocked_call_trace(gateway):
    blocked = gateway.new_proxy("traces-blocked")
    assert gateway.attach(blocked.proxy_id, "request", SEED_POLICY).returncode == 0
    client = OpenAI(api_key=blocked.key, base_url=blocked.base_url, max_retries=0)

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", tools=[tool("delete_database")],
            messages=[{"role": "user", "content": f"wipe it, mail {EMAIL}"}],
        )

    trace = wait_for_trace(gateway.home, raised.value.response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 403
    assert trace["error_type"] == "policy_block"
    assert trace["policy_outcome"] == "block"
    assert trace["policy_rule_id"] == "block_dangerous_tools.deny"
    assert trace["tokens_in"] is None
    assert trace["tokens_out"] is None
    assert trace["usage_reported"] is False
    assert trace["cost_usd"] is None
    assert "llm" not in step_types(trace)
    assert "policy" in step_types(trace)
    assert EMAIL not in json.dumps(trace)


def test_secrets_and_pii_never_stored(gateway, access, client):
    secret = "sk-proj-" + "Z" * 40
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"my key is {secret} and {access.key}, ssn 123-45-6789, {EMAIL}"}],
        extra_headers={"x-mock-echo": "1"},
    )

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])

    dumped = json.dumps(trace)
    assert secret not in dumped
    assert access.key not in dumped
    assert "123-45-6789" not in dumped
    assert EMAIL not in dumped
    assert trace["messages"]


def test_streamed_call_trace(gateway, client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "stream please"}], stream=True
    )
    chunks = list(raw.parse())

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])

    assert chunks
    assert trace["stream"] is True
    assert trace["ttft_ms"] > 0
    assert trace["stream_completed"] is True
    assert trace["finish_reason"] == "stop"
    assert trace["stream_policy_mode"] == "none"
    assert trace["tokens_out"] == 6
    assert trace["response_content"] == "Hello from the Xenovia mock provider."


def test_failed_call_trace(gateway, client):
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "fail"}],
            extra_headers={"x-mock-status": "500"},
        )

    trace = wait_for_trace(gateway.home, raised.value.response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 500
    assert trace["error_type"]
    assert trace["tokens_in"] is None
    assert trace["cost_usd"] is None


def test_tool_round_trip_steps(gateway, client):
    session = str(uuid.uuid4())
    headers = {"X-Xenovia-Session-Id": session}
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, tools=[tool("get_weather")],
        extra_headers={**headers, "x-mock-tool-call": 'get_weather;{"city": "Paris"}'},
    )
    call = first.parse().choices[0].message.tool_calls[0]
    time.sleep(0.2)
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]

    second = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, tools=[tool("get_weather")], extra_headers=headers
    )

    call_trace = wait_for_trace(gateway.home, first.headers["x-xenovia-trace-id"])
    result_trace = wait_for_trace(gateway.home, second.headers["x-xenovia-trace-id"])
    [call_step] = [s for s in call_trace["steps"] if s["step_type"] == "tool_call"]
    [result_step] = [s for s in result_trace["steps"] if s["step_type"] == "tool_result"]
    assert call_step["tool_name"] == "get_weather"
    assert json.loads(call_step["tool_args"]) == {"city": "Paris"}
    assert call_step["call_id"] == call.id
    assert call_step["status"] == "success"
    assert result_step["call_id"] == call.id
    assert result_step["tool_name"] == "get_weather"
    assert result_step["tool_result"] == '{"temperature_c": 21}'
    assert result_step["status"] == "success"
    assert 200 <= result_step["latency_ms"] < 10_000
    assert call_trace["finish_reason"] == "tool_calls"
    assert result_trace["session_turn"] == 2


def test_enrichment_headers_land(gateway, client):
    parent = str(uuid.uuid4())
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
        extra_headers={
            "X-Xenovia-Session-Path": "/support/refunds/step-2",
            "X-Xenovia-Parent-Trace-Id": parent,
            "X-Xenovia-Trace-Flow-Id": "flow-42",
        },
    )

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])

    assert trace["session_path"] == "/support/refunds/step-2"
    assert trace["parent_trace_id"] == parent
    assert trace["flow_id"] == "flow-42"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Xenovia-Parent-Trace-Id": "parent"},
        {"X-Xenovia-Session-Path": "/a b"},
        {"X-Xenovia-Session-Path": "x" * 513},
        {"X-Xenovia-Trace-Flow-Id": "flow;drop"},
    ],
    ids=["parent-not-uuid", "path-space", "path-long", "flow-punctuation"],
)
def test_malformed_enrichment_headers_rejected(gateway, client, headers):
    before = gateway.provider.request_count

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], extra_headers=headers
        )

    assert raised.value.response.json()["error"]["code"] == "invalid_header"
    assert gateway.provider.request_count == before


def test_traces_show_prints_tree(gateway, client):
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "tree"}]
    )
    trace_id = raw.headers["x-xenovia-trace-id"]
    wait_for_trace(gateway.home, trace_id)

    text = gateway.cli("traces", "show", trace_id).stdout

    assert trace_id in text
    assert "request_received" in text
    assert "request_finished" in text
