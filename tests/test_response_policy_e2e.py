"""Response-stage policies end to end: blocks and redaction of plain and streamed answers."""

import http.server
import json
import threading
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import sse_payloads, wait_for_trace
from openai import OpenAI

from ext_proc.sse import SseEvent, make_event
from ext_proc.stream_redaction import LiveRedactor, redact_held_events

REPO = Path(__file__).resolve().parent.parent
DROP_TABLE_POLICY = REPO / "policies" / "response_block_drop_table.rego"
REDACT_POLICY = REPO / "policies" / "redact_pii.rego"
MESSAGES = [{"role": "user", "content": "Clean up the database."}]
DROP_TABLE_CALL = 'drop_table;{"table": "customers", "cascade": true}'
EMAIL = "jane.doe@example.com"
EMAIL_ANSWER = f"Write to {EMAIL} for access, or call the desk."
REDACTED_ANSWER = "Write to [REDACTED_EMAIL] for access, or call the desk."
BLOCK_BODY_KEYS = {
    "message": "request blocked by policy",
    "type": "policy_violation",
    "code": "policy_block",
}
MODES = ["hold", "live"]


def client_for(access) -> OpenAI:
    return OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)


def raw_chat(access, headers, stream, messages=MESSAGES) -> httpx.Response:
    payload = {"model": "gpt-4o-mini", "messages": messages, "stream": stream}
    all_headers = {"authorization": f"Bearer {access.key}", **headers}
    return httpx.post(
        access.base_url + "/chat/completions", headers=all_headers, json=payload, timeout=30
    )


def content_of(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def tool_deltas(chunks) -> list:
    return [
        call
        for chunk in chunks
        if chunk.choices
        for call in chunk.choices[0].delta.tool_calls or []
    ]


def assert_rule(trace, policy_name):
    assert trace["policy_rule_id"].startswith(policy_name)
    assert trace["policy_rule_id"].endswith(".deny")


def assert_block_body(response):
    assert response.status_code == 403, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "error": {**BLOCK_BODY_KEYS, "request_id": response.headers["x-xenovia-trace-id"]}
    }
    assert uuid.UUID(response.headers["x-xenovia-session-id"])


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policies")
    (folder / "deny_word.rego").write_text(
        "package xenovia.policy\n\n"
        'deny contains "the answer mentions classified material" if {\n'
        '    contains(input.output.content, "classified")\n'
        "}\n"
    )
    (folder / "deny_argument.rego").write_text(
        "package xenovia.policy\n\n"
        'deny contains "the tool call targets production" if {\n'
        "    some call in input.output.tool_calls\n"
        '    contains(call.name, "deploy")\n'
        '    call.arguments.target == "production"\n'
        "}\n"
    )
    return folder


@pytest.fixture(scope="module")
def drop_table(gateway):
    """Proxies with the drop_table response policy: one plain-stream default (hold), one live."""
    proxies = {}
    for mode in MODES:
        access = gateway.new_proxy(f"drop-{mode}", "--stream-policy-mode", mode)
        assert gateway.attach(access.proxy_id, "response", DROP_TABLE_POLICY).returncode == 0
        proxies[mode] = access
    return proxies


@pytest.fixture(scope="module")
def redacting(gateway):
    proxies = {}
    for mode in MODES:
        access = gateway.new_proxy(f"redact-{mode}", "--stream-policy-mode", mode)
        assert gateway.attach(access.proxy_id, "request", REDACT_POLICY).returncode == 0
        assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0
        proxies[mode] = access
    return proxies


# Blocks.


def test_plain_tool_call_blocked(gateway, drop_table):
    access = drop_table["hold"]
    before = gateway.provider.request_count

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client_for(access).chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            extra_headers={"x-mock-tool-call": DROP_TABLE_CALL},
        )

    assert gateway.provider.request_count == before + 1
    response = raised.value.response
    assert_block_body(response)
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["status"] == 403
    assert_rule(trace, "response_block_drop_table")
    assert trace["policy_reason"] == "the model called drop_table"
    assert trace["stream_policy_mode"] == "none"


def test_plain_other_tool_call_allowed(drop_table):
    completion = client_for(drop_table["hold"]).chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-tool-call": "list_tables"}
    )

    assert completion.choices[0].message.tool_calls[0].function.name == "list_tables"


def test_held_stream_blocked_before_any_byte(gateway, drop_table):
    access = drop_table["hold"]
    before = gateway.provider.request_count

    # The pause between events gives Envoy time to send headers early, were it not holding them.
    headers = {"x-mock-tool-call": DROP_TABLE_CALL, "x-mock-chunk-delay-ms": "20"}

    response = raw_chat(access, headers, stream=True)

    assert_block_body(response)
    assert b"drop_table" not in response.content
    assert gateway.provider.request_count == before + 1
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["status"] == 403
    assert trace["stream_policy_mode"] == "hold"
    assert_rule(trace, "response_block_drop_table")


def test_held_stream_sdk_raises_permission_denied(drop_table):
    client = client_for(drop_table["hold"])

    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-mock-tool-call": DROP_TABLE_CALL},
        )


def test_live_stream_blocked_with_error_event(gateway, drop_table):
    client = client_for(drop_table["live"])
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-call": DROP_TABLE_CALL},
    )
    received = []

    with pytest.raises(openai.APIError) as raised:
        # One by one, so that the chunks before the error event are kept.
        for chunk in raw.parse():
            received.append(chunk)  # noqa: PERF402

    assert raised.value.body["code"] == "policy_block"
    assert raised.value.body["type"] == "policy_violation"
    assert not [
        call
        for call in tool_deltas(received)
        if call.function and call.function.name == "drop_table"
    ]
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["stream_policy_mode"] == "live"
    assert trace["stream_completed"] is False
    assert trace["error_type"] == "policy_block"
    assert_rule(trace, "response_block_drop_table")


def test_live_stream_block_raw_bytes(drop_table):
    response = raw_chat(drop_table["live"], {"x-mock-tool-call": DROP_TABLE_CALL}, stream=True)

    assert response.status_code == 200
    assert b"drop_table" not in response.content
    assert b"customers" not in response.content
    payloads = sse_payloads(response.content)
    assert payloads[-1] == {
        "error": {**BLOCK_BODY_KEYS, "request_id": response.headers["x-xenovia-trace-id"]}
    }
    assert "[DONE]" not in payloads


@pytest.mark.parametrize("mode", MODES)
def test_stream_other_tool_call_allowed(drop_table, mode):
    arguments = json.dumps({"schema": "public"})
    stream = client_for(drop_table[mode]).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-call": f"list_tables;{arguments}"},
    )

    deltas = tool_deltas(list(stream))

    assert deltas[0].function.name == "list_tables"
    assert "".join(call.function.arguments or "" for call in deltas) == arguments


@pytest.mark.parametrize("mode", MODES)
def test_stream_text_passes_under_policy(gateway, drop_table, mode):
    answer = " ".join(f"token{i}" for i in range(40))
    raw = client_for(drop_table[mode]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-mock-answer": answer}
    )

    chunks = list(raw.parse())

    assert content_of(chunks) == answer
    assert all(chunk.choices for chunk in chunks)
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["stream_policy_mode"] == mode
    assert trace["stream_completed"] is True
    assert trace["policy_outcome"] == "allow"
    assert trace["tokens_out"] == 40
    assert trace["ttft_ms"] > 0
    policy_steps = [step for step in trace["steps"] if step["name"] == "response_policy"]
    assert len(policy_steps) == 1
    if mode == "live":
        assert int(policy_steps[0]["attributes"]["evaluations"]) > 40


@pytest.mark.parametrize("mode", MODES)
def test_truncated_stream_under_policy(gateway, drop_table, mode):
    response = raw_chat(drop_table[mode], {"x-mock-truncate": "1"}, stream=True)

    assert response.status_code == 200
    payloads = sse_payloads(response.content)
    assert payloads[-1]["error"]["code"] == "stream_incomplete"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["stream_completed"] is False
    assert trace["error_type"] == "stream_incomplete"
    assert trace["stream_policy_mode"] == mode


def test_live_split_event_still_evaluated(gateway, policy_dir):
    access = gateway.new_proxy("split-live", "--stream-policy-mode", "live")
    assert (
        gateway.attach(access.proxy_id, "response", policy_dir / "deny_word.rego").returncode == 0
    )
    headers = {"x-mock-split-event": "1", "x-mock-answer": "classified material follows here"}

    response = raw_chat(access, headers, stream=True)

    assert response.status_code == 200
    # The split event carries the first word; no half of it may reach the client.
    assert b"classi" not in response.content
    assert b"fied" not in response.content
    assert sse_payloads(response.content)[-1]["error"]["code"] == "policy_block"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"


def test_live_split_tool_arguments_evaluated(gateway, policy_dir):
    access = gateway.new_proxy("split-args", "--stream-policy-mode", "live")
    assert (
        gateway.attach(access.proxy_id, "response", policy_dir / "deny_argument.rego").returncode
        == 0
    )
    arguments = json.dumps({"target": "production"})
    headers = {"x-mock-split-event": "1", "x-mock-tool-call": f"deploy;{arguments}"}

    blocked = raw_chat(access, headers, stream=True)
    allowed = client_for(access).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={**headers, "x-mock-tool-call": 'deploy;{"target": "staging"}'},
    )

    assert sse_payloads(blocked.content)[-1]["error"]["code"] == "policy_block"
    assert b"production" not in blocked.content
    deltas = tool_deltas(list(allowed))
    assert "".join(call.function.arguments or "" for call in deltas) == '{"target": "staging"}'


def test_gzip_tool_call_blocked(gateway, drop_table):
    headers = {"x-mock-gzip": "1", "x-mock-tool-call": DROP_TABLE_CALL}

    plain = raw_chat(drop_table["hold"], headers, stream=False)
    held = raw_chat(drop_table["hold"], headers, stream=True)
    live = raw_chat(drop_table["live"], headers, stream=True)

    assert_block_body(plain)
    assert_block_body(held)
    assert live.status_code == 200
    assert b"drop_table" not in live.content
    assert sse_payloads(live.content)[-1]["error"]["code"] == "policy_block"


@pytest.mark.parametrize("mode", MODES)
def test_gzip_stream_passes_under_policy(drop_table, mode):
    stream = client_for(drop_table[mode]).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-gzip": "1", "x-mock-answer": EMAIL_ANSWER},
    )

    assert content_of(list(stream)) == EMAIL_ANSWER


# Redaction.


def test_request_redaction_hides_email_from_provider(gateway, redacting):
    gateway.provider.reset()
    messages = [{"role": "user", "content": f"My address is {EMAIL}, please remember it."}]

    raw = client_for(redacting["hold"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, extra_headers={"x-mock-echo": "1"}
    )

    seen = gateway.provider.requests[-1]["body"]
    assert EMAIL not in seen
    assert "[REDACTED_EMAIL]" in seen
    assert (
        raw.parse().choices[0].message.content
        == "My address is [REDACTED_EMAIL], please remember it."
    )
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact"
    assert trace["redacted_kinds"] == ["email"]
    assert EMAIL not in json.dumps(trace, default=str)


def test_request_redaction_covers_every_body_field(gateway, redacting):
    gateway.provider.reset()
    ssn = "123-45-6789"
    tool = {
        "type": "function",
        "function": {"name": "notify", "description": f"mails {EMAIL}", "parameters": {}},
    }
    payload = {
        "model": "gpt-4o-mini",
        "messages": MESSAGES,
        "user": EMAIL,
        "metadata": {"owner": EMAIL},
        "prediction": {"type": "content", "content": f"SSN {ssn}"},
        "tools": [tool],
    }
    headers = {"authorization": f"Bearer {redacting['hold'].key}"}

    response = httpx.post(
        redacting["hold"].base_url + "/chat/completions", headers=headers, json=payload, timeout=30
    )

    assert response.status_code == 200
    seen = json.loads(gateway.provider.requests[-1]["body"])
    assert EMAIL not in json.dumps(seen)
    assert ssn not in json.dumps(seen)
    assert seen["user"] == "[REDACTED_EMAIL]"
    assert seen["metadata"] == {"owner": "[REDACTED_EMAIL]"}
    assert seen["prediction"]["content"] == "SSN [REDACTED_SSN]"
    assert seen["tools"][0]["function"]["description"] == "mails [REDACTED_EMAIL]"
    assert seen["tools"][0]["function"]["name"] == "notify"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["redacted_kinds"] == ["email", "ssn"]


def test_lookalike_address_redacted_both_ways(gateway, redacting):
    gateway.provider.reset()
    lookalike = "jane.doe\uff20example\u3002com"
    messages = [{"role": "user", "content": f"Write to {lookalike} today."}]

    raw = client_for(redacting["hold"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, extra_headers={"x-mock-echo": "1"}
    )

    assert lookalike not in gateway.provider.requests[-1]["body"]
    assert raw.parse().choices[0].message.content == "Write to [REDACTED_EMAIL] today."
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert lookalike not in json.dumps(trace, default=str, ensure_ascii=False)


@pytest.mark.parametrize("mode", MODES)
def test_streamed_request_redaction(gateway, redacting, mode):
    gateway.provider.reset()
    messages = [{"role": "user", "content": f"Reach me at {EMAIL} today."}]

    stream = client_for(redacting[mode]).chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True, extra_headers={"x-mock-echo": "1"}
    )

    assert content_of(list(stream)) == "Reach me at [REDACTED_EMAIL] today."
    assert EMAIL not in gateway.provider.requests[-1]["body"]


def test_plain_answer_redacted(gateway, redacting):
    raw = client_for(redacting["hold"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-answer": EMAIL_ANSWER}
    )

    assert raw.parse().choices[0].message.content == REDACTED_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact_response"
    assert trace["redacted_kinds"] == ["email"]
    assert EMAIL not in json.dumps(trace, default=str)


@pytest.mark.parametrize("mode", MODES)
def test_streamed_answer_redacted(gateway, redacting, mode):
    raw = client_for(redacting[mode]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-answer": EMAIL_ANSWER},
    )

    chunks = list(raw.parse())

    assert content_of(chunks) == REDACTED_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact_response"
    assert trace["redacted_kinds"] == ["email"]
    assert trace["stream_policy_mode"] == mode
    assert trace["stream_completed"] is True
    assert EMAIL not in json.dumps(trace, default=str)


@pytest.mark.parametrize("mode", MODES)
def test_streamed_answer_raw_bytes_redacted(redacting, mode):
    response = raw_chat(
        redacting[mode], {"x-mock-answer": EMAIL_ANSWER, "x-mock-split-event": "1"}, stream=True
    )

    assert EMAIL.encode() not in response.content
    assert b"jane" not in response.content
    payloads = sse_payloads(response.content)
    assert payloads[-1] == "[DONE]"
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    assert text == REDACTED_ANSWER


@pytest.mark.parametrize("mode", MODES)
def test_streamed_tool_arguments_redacted(redacting, mode):
    arguments = json.dumps({"to": EMAIL, "subject": "access"})
    stream = client_for(redacting[mode]).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-call": f"send_mail;{arguments}"},
    )

    deltas = tool_deltas(list(stream))

    assert deltas[0].function.name == "send_mail"
    joined = "".join(call.function.arguments or "" for call in deltas)
    assert json.loads(joined) == {"to": "[REDACTED_EMAIL]", "subject": "access"}


COMMENT_EVENTS = {
    "comment_only": (f": keep-alive for {EMAIL}\\n\\n", b""),
    "comment_and_event_name": (
        f": note {EMAIL}\\nevent: {EMAIL}\\ndata: {{\"choices\": []}}\\n\\n",
        # An event name that does not repeat the data's type is dropped under a policy.
        b'"choices"',
    ),
}


@pytest.mark.parametrize("shape", COMMENT_EVENTS)
@pytest.mark.parametrize("mode", MODES)
def test_streamed_comment_lines_redacted(redacting, mode, shape):
    raw_event, expected = COMMENT_EVENTS[shape]

    response = raw_chat(redacting[mode], {"x-mock-raw-event": raw_event}, stream=True)

    assert response.status_code == 200
    assert EMAIL.encode() not in response.content
    assert b"event:" not in response.content
    assert expected in response.content
    assert sse_payloads(response.content)[-1] == "[DONE]"


def test_live_text_after_finish_dropped(redacting):
    finished = '{"choices":[{"index":0,"delta":{"content":"jane.doe@exa"},"finish_reason":"stop"}]}'
    rest = '{"choices":[{"index":0,"delta":{"content":"mple.com"}}]}'
    raw_event = f"data: {finished}\\n\\ndata: {rest}\\n\\n"

    response = raw_chat(redacting["live"], {"x-mock-raw-event": raw_event}, stream=True)

    assert response.status_code == 200
    assert EMAIL.encode() not in response.content
    assert b"mple.com" not in response.content


@pytest.mark.parametrize("mode", MODES)
def test_streamed_tool_name_redacted(redacting, mode):
    response = raw_chat(
        redacting[mode], {"x-mock-tool-call": f'notify_{EMAIL};{{"ok": true}}'}, stream=True
    )

    assert EMAIL.encode() not in response.content
    payloads = sse_payloads(response.content)
    names = [
        call["function"].get("name")
        for payload in payloads[:-1]
        for call in payload["choices"][0]["delta"].get("tool_calls") or []
        if call.get("function", {}).get("name")
    ]
    assert names == ["[REDACTED_EMAIL]"]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "held"])
def test_gzip_answer_redacted(redacting, stream):
    response = raw_chat(
        redacting["hold"], {"x-mock-gzip": "1", "x-mock-answer": EMAIL_ANSWER}, stream=stream
    )

    assert response.status_code == 200
    assert "content-encoding" not in response.headers
    if stream:
        payloads = sse_payloads(response.content)
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    else:
        text = response.json()["choices"][0]["message"]["content"]
    assert text == REDACTED_ANSWER


def test_live_gzip_answer_redacted(redacting):
    stream = client_for(redacting["live"]).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-gzip": "1", "x-mock-answer": EMAIL_ANSWER},
    )

    assert content_of(list(stream)) == REDACTED_ANSWER


# Dry run.


@pytest.mark.parametrize("mode", MODES)
def test_dry_run_records_without_blocking(gateway, mode):
    access = gateway.new_proxy(f"dry-{mode}", "--stream-policy-mode", mode)
    assert (
        gateway.attach(access.proxy_id, "response", DROP_TABLE_POLICY, "--dry-run").returncode == 0
    )
    client = client_for(access)

    plain = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-tool-call": DROP_TABLE_CALL}
    )
    streamed = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-call": DROP_TABLE_CALL},
    )

    assert plain.parse().choices[0].message.tool_calls[0].function.name == "drop_table"
    assert tool_deltas(list(streamed.parse()))[0].function.name == "drop_table"
    for raw in (plain, streamed):
        trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
        assert trace["status"] == 200
        assert trace["policy_outcome"] == "allow"
        assert trace["dry_run"] is True
        assert trace["dry_run_outcome"] == "block_response"
        assert_rule(trace, "response_block_drop_table")
    streamed_trace = wait_for_trace(gateway.home, streamed.headers["x-xenovia-trace-id"])
    # A dry-run policy cannot block, so the stream is never held for it.
    assert streamed_trace["stream_policy_mode"] == "live"


def test_request_dry_run_records_block(gateway):
    access = gateway.new_proxy("dry-request")
    policy = REPO / "policies" / "block_dangerous_tools.rego"
    assert gateway.attach(access.proxy_id, "request", policy, "--dry-run").returncode == 0
    tools = [
        {
            "type": "function",
            "function": {"name": "delete_database", "parameters": {"type": "object"}},
        }
    ]

    raw = client_for(access).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=tools
    )

    assert raw.parse().choices[0].message.content
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["status"] == 200
    assert trace["dry_run"] is True
    assert trace["dry_run_outcome"] == "block"
    assert_rule(trace, "block_dangerous_tools")


# Policy tooling.


def test_policy_test_cli_response_block(gateway, tmp_path):
    document = {
        "request_type": "chat_completions",
        "model": "gpt-4o-mini",
        "output": {
            "content": "",
            "tool_calls": [{"id": "call_1", "name": "drop_table", "arguments": {}}],
            "finish_reason": "tool_calls",
            "usage": None,
            "model": "gpt-4o-mini",
        },
    }
    input_file = tmp_path / "input.json"
    input_file.write_text(json.dumps(document))

    result = gateway.cli(
        "policy",
        "test",
        str(DROP_TABLE_POLICY),
        "--input",
        str(input_file),
        "--stage",
        "response",
        check=False,
    )

    assert result.returncode == 1
    assert "outcome: block_response" in result.stdout
    assert "reason: the model called drop_table" in result.stdout


def test_policy_test_cli_redact_and_allow(gateway, tmp_path):
    input_file = tmp_path / "input.json"
    input_file.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "tool_names": []})
    )

    redact = gateway.cli(
        "policy", "test", str(REDACT_POLICY), "--input", str(input_file), check=False
    )
    allow = gateway.cli(
        "policy",
        "test",
        str(DROP_TABLE_POLICY),
        "--input",
        str(input_file),
        "--stage",
        "request",
        check=False,
    )

    assert redact.returncode == 0
    assert "outcome: redact" in redact.stdout
    assert "redact_fields: email, ssn" in redact.stdout
    assert allow.returncode == 0
    assert "outcome: allow" in allow.stdout


# The mock splits text only at whitespace, so these check addresses cut mid-word directly.


def chat_chunk(delta: dict, finish_reason=None) -> SseEvent:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return make_event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})


SPLIT_PIECES = ["Write to ja", "ne.doe@exa", "mple.com for", " access, or call the desk."]


def joined_content(events) -> str:
    parts = []
    for event in events:
        data = event.json()
        if data and data.get("choices"):
            parts.append(data["choices"][0]["delta"].get("content") or "")
    return "".join(parts)


def test_held_redaction_joins_split_address():
    events = [chat_chunk({"content": piece}) for piece in SPLIT_PIECES]
    events.append(chat_chunk({}, "stop"))

    redacted, counts = redact_held_events("chat_completions", events, frozenset({"email"}))

    assert joined_content(redacted) == REDACTED_ANSWER
    assert counts == {"email": 1}


@pytest.mark.parametrize("finish", [True, False], ids=["finish-chunk", "done-marker"])
def test_live_redaction_joins_split_address(finish):
    redactor = LiveRedactor("chat_completions", frozenset({"email"}))
    events = [chat_chunk({"content": piece}) for piece in SPLIT_PIECES]
    if finish:
        events.append(chat_chunk({}, "stop"))
    events.append(SseEvent(b"data: [DONE]\n\n", data="[DONE]"))

    sent = [out for event in events for out in redactor.redact(event)]

    assert joined_content(sent) == REDACTED_ANSWER
    assert b"jane" not in b"".join(event.raw for event in sent)
    assert sent[-1].is_done_marker
    assert redactor.counts == {"email": 1}


def test_live_redaction_flushes_cut_stream():
    redactor = LiveRedactor("chat_completions", frozenset({"email"}))
    sent = [
        out for piece in SPLIT_PIECES[:3] for out in redactor.redact(chat_chunk({"content": piece}))
    ]

    sent += redactor.flush()

    assert joined_content(sent) == "Write to [REDACTED_EMAIL] for"


# Values behind JSON escapes: \uXXXX in tool arguments, and escapes before a key.

ESCAPED_ARGUMENTS = r'{"to":"bob\u0040example.com","ssn":"123\u002d45\u002d6789"}'
REDACTED_ARGUMENTS = {"to": "[REDACTED_EMAIL]", "ssn": "[REDACTED_SSN]"}


def test_plain_escaped_tool_arguments_redacted(gateway, redacting):
    raw = client_for(redacting["hold"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-mock-tool-call": f"send_mail;{ESCAPED_ARGUMENTS}"},
    )

    call = raw.parse().choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == REDACTED_ARGUMENTS
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["redacted_kinds"] == ["email", "ssn"]
    assert "example.com" not in json.dumps(trace, default=str)


@pytest.mark.parametrize("mode", MODES)
def test_streamed_escaped_tool_arguments_redacted(redacting, mode):
    stream = client_for(redacting[mode]).chat.completions.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-mock-tool-call": f"send_mail;{ESCAPED_ARGUMENTS}"},
    )

    joined = "".join(call.function.arguments or "" for call in tool_deltas(list(stream)))

    assert json.loads(joined) == REDACTED_ARGUMENTS


@pytest.fixture(scope="module")
def full_bodies(gateway):
    return gateway.new_proxy("full-bodies", "--body-mode", "full")


def test_trace_scrubs_escaped_tool_arguments(gateway, full_bodies):
    raw = client_for(full_bodies).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=MESSAGES,
        extra_headers={"x-mock-tool-call": f"send_mail;{ESCAPED_ARGUMENTS}"},
    )

    call = raw.parse().choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments)["to"] == "bob@example.com"
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    stored = json.dumps(trace, default=str)
    assert "example.com" not in stored
    assert "u002d6789" not in stored
    assert "[REDACTED_EMAIL]" in stored


def test_trace_scrubs_secrets_after_escapes(gateway, full_bodies):
    secrets = [
        "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
        "Bearer tok_abcdefghijklmnop",
        "xe_" + "k" * 24,
        "sk-tabbedabcdefghijklmnopqrstu",
    ]
    content = (
        f"my key is\n{secrets[0]}\n{secrets[1]}\n{secrets[2]}\t{secrets[3]} ssn\x01123-45-6789"
    )
    raw = client_for(full_bodies).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}]
    )

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    stored = json.dumps(trace, default=str)
    for secret in secrets:
        assert secret.split()[-1] not in stored, secret
    assert "123-45-6789" not in stored
    assert "[REDACTED_SSN]" in trace["messages"]
    assert trace["messages"].count("[REDACTED_SECRET]") == 4


@pytest.fixture(scope="module")
def redacting_answers_only(gateway):
    # No request-stage policy, so the provider receives the address and its error quotes it.
    access = gateway.new_proxy("redact-errors")
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0
    return access


def provider_error_quoting_email(access) -> openai.BadRequestError:
    """Return the error of a call whose provider fails with 400 and quotes the user message."""
    messages = [{"role": "user", "content": f"Mail {EMAIL} the report."}]
    headers = {"x-mock-status": "400", "x-mock-echo": "1"}
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(access).chat.completions.create(
            model="gpt-4o-mini", messages=messages, extra_headers=headers
        )
    return raised.value


def test_provider_error_quoting_request_redacted(gateway, redacting_answers_only):
    error = provider_error_quoting_email(redacting_answers_only)

    message = error.body["message"]
    assert EMAIL not in message
    assert "Mail [REDACTED_EMAIL] the report." in message
    trace = wait_for_trace(gateway.home, error.response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 400
    assert trace["policy_outcome"] == "redact_response"
    assert trace["redacted_kinds"] == ["email"]


def test_provider_error_kept_without_response_policy(gateway):
    error = provider_error_quoting_email(gateway.new_proxy("errors-unredacted"))

    assert EMAIL in error.body["message"]


class _ErrorProvider(http.server.BaseHTTPRequestHandler):
    """A provider that fails every call with 400 and the body the test puts in ``body``."""

    body = b""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(400)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def error_provider():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ErrorProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def error_proxy(gateway, error_provider, body: bytes, policy: Path):
    """Return a proxy to ``error_provider``, failing with ``body``, with ``policy`` on responses."""
    _ErrorProvider.body = body
    base_url = f"http://127.0.0.1:{error_provider.server_address[1]}/v1"
    access = gateway.new_proxy("raw-errors", upstream_url=base_url)
    assert gateway.attach(access.proxy_id, "response", policy).returncode == 0
    return access


def error_message_through(gateway, error_provider, body: bytes, policy: Path) -> str:
    access = error_proxy(gateway, error_provider, body, policy)
    with pytest.raises(openai.BadRequestError) as raised:
        client_for(access).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    return raised.value.body["message"]


def test_text_error_redacted_before_cut(gateway, error_provider):
    body = b"a" * 290 + b" 123-45-6789 and more text after the number"

    message = error_message_through(gateway, error_provider, body, REDACT_POLICY)

    assert "123-45-67" not in message
    # The message is cut at 300 characters, which here falls inside the mark.
    assert "[REDACTED" in message


def test_error_fields_seen_by_policy(gateway, error_provider, tmp_path):
    # The policy redacts only when the content it sees holds an "@", so it must see the
    # whole body, not the message alone.
    policy = tmp_path / "redact_when_at.rego"
    policy.write_text(
        'package xenovia.policy\n\nredact_fields := {"email"} if contains(input.output.content, "@")\n'
    )
    body = json.dumps({"error": {"message": "ok", "details": EMAIL}}).encode()

    response = raw_chat(error_proxy(gateway, error_provider, body, policy), {}, stream=False)

    assert response.status_code == 400
    assert EMAIL not in response.text
    assert response.json()["error"]["details"] == "[REDACTED_EMAIL]"
