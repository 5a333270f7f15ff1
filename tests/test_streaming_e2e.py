"""Streams end to end: pass-through, usage, truncation, split events, gzip, redacted deltas."""

import json
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import sse_payloads, wait_for_trace
from openai import OpenAI

from ext_proc.mock_provider import DEFAULT_ANSWER

REDACT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "redact_pii.rego"
MESSAGES = [{"role": "user", "content": "Say hello."}]
LONG_ANSWER = " ".join(f"word{i:03d}" for i in range(60)) + "."


def client_for(access, **headers) -> OpenAI:
    return OpenAI(
        api_key=access.key, base_url=access.base_url, default_headers=headers, max_retries=0
    )


def stream_chat(access, headers=None, **options):
    """Stream a chat completion with the SDK; return (raw response, list of chunks)."""
    raw = client_for(access).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers or {}, **options
    )
    return raw, list(raw.parse())


def raw_stream(access, headers=None, body=None) -> httpx.Response:
    payload = body or {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
    all_headers = {"authorization": f"Bearer {access.key}", **(headers or {})}
    return httpx.post(
        access.base_url + "/chat/completions", headers=all_headers, json=payload, timeout=30
    )


def content_of(chunks) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)


@pytest.fixture(scope="module")
def access(gateway):
    return gateway.new_proxy("streaming")


def test_stream_arrives_complete_and_in_order(gateway, access):
    raw, chunks = stream_chat(access, {"x-mock-answer": LONG_ANSWER})

    assert content_of(chunks) == LONG_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert uuid.UUID(raw.headers["x-xenovia-session-id"])
    assert uuid.UUID(raw.headers["x-xenovia-trace-id"])


def test_stream_headers_arrive_before_body(access):
    client = client_for(access)
    headers = {"x-mock-chunk-delay-ms": "50"}

    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers=headers
    ) as response:
        assert uuid.UUID(response.headers["x-xenovia-trace-id"])
        assert uuid.UUID(response.headers["x-xenovia-session-id"])
        chunks = list(response.parse())

    assert content_of(chunks) == DEFAULT_ANSWER


def test_stream_trace_records_usage_and_outcome(gateway, access):
    gateway.provider.reset()

    raw, chunks = stream_chat(access)

    assert all(chunk.choices and chunk.choices[0] for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    sent = json.loads(gateway.provider.requests[-1]["body"])
    assert sent["stream_options"] == {"include_usage": True}
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["stream"] is True
    assert trace["tokens_in"] > 0
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())
    assert trace["usage_reported"] is True
    assert trace["stream_completed"] is True
    assert trace["finish_reason"] == "stop"
    assert trace["stream_policy_mode"] == "none"
    assert trace["ttft_ms"] > 0
    assert trace["status"] == 200
    assert trace["model_served"] == "gpt-4o-mini-2024-07-18"


def test_stream_usage_chunk_kept_when_client_asks(gateway, access):
    raw, chunks = stream_chat(access, stream_options={"include_usage": True})

    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == len(DEFAULT_ANSWER.split())
    assert content_of(chunks[:-1]) == DEFAULT_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())


def test_usage_chunk_removed_from_raw_bytes(access):
    response = raw_stream(access)

    payloads = sse_payloads(response.content)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert all(chunk["choices"] for chunk in chunks)
    assert not any(chunk.get("usage") for chunk in chunks)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_missing_usage_recorded_as_null(gateway, access, stream):
    headers = {"x-mock-no-usage": "1"}
    client = client_for(access)

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=stream, extra_headers=headers
    )
    parsed = raw.parse()
    if stream:
        assert content_of(list(parsed)) == DEFAULT_ANSWER
    else:
        assert parsed.choices[0].message.content == DEFAULT_ANSWER

    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["tokens_in"] is None
    assert trace["tokens_out"] is None
    assert trace["usage_reported"] is False
    assert trace["status"] == 200


def test_truncated_stream_recorded_incomplete(gateway, access):
    client = client_for(access)
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, extra_headers={"x-mock-truncate": "1"}
    )
    received = []

    with pytest.raises(openai.APIError) as raised:
        # One by one, so that the chunks before the error event are kept.
        for chunk in raw.parse():
            received.append(chunk)  # noqa: PERF402

    assert raised.value.body["code"] == "stream_incomplete"
    assert content_of(received) == "Hello from"
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["stream_completed"] is False
    assert trace["error_type"] == "stream_incomplete"


def test_truncated_stream_ends_with_error_event(access):
    response = raw_stream(access, {"x-mock-truncate": "1"})

    payloads = sse_payloads(response.content)
    assert payloads[-1]["error"]["code"] == "stream_incomplete"
    assert payloads[-1]["error"]["request_id"] == response.headers["x-xenovia-trace-id"]
    assert "[DONE]" not in payloads


def test_split_event_reassembled(gateway, access):
    raw, chunks = stream_chat(access, {"x-mock-split-event": "1", "x-mock-answer": LONG_ANSWER})

    assert content_of(chunks) == LONG_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["stream_completed"] is True
    assert trace["tokens_out"] == len(LONG_ANSWER.split())


def test_gzip_stream_decoded(gateway, access):
    raw, chunks = stream_chat(access, {"x-mock-gzip": "1", "x-mock-answer": LONG_ANSWER})

    assert content_of(chunks) == LONG_ANSWER
    assert all(chunk.choices for chunk in chunks)
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["stream_completed"] is True
    assert trace["tokens_out"] == len(LONG_ANSWER.split())


def test_gzip_plain_answer_recorded(gateway, access):
    client = client_for(access)

    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-gzip": "1"}
    )

    assert raw.parse().choices[0].message.content == DEFAULT_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())
    assert trace["finish_reason"] == "stop"


def test_stream_tool_call_passes_whole(gateway, access):
    arguments = json.dumps({"query": "weather in Paris", "units": "metric"})
    raw, chunks = stream_chat(access, {"x-mock-tool-call": f"lookup;{arguments}"})

    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "lookup"
    assert "".join(call.function.arguments or "" for call in deltas) == arguments
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["finish_reason"] == "tool_calls"
    tool_steps = [step for step in trace["steps"] if step["step_type"] == "tool_call"]
    assert [step["tool_name"] for step in tool_steps] == ["lookup"]


def test_streamed_provider_error_passes_through(gateway, access):
    response = raw_stream(access, {"x-mock-status": "429"})

    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert uuid.UUID(response.headers["x-xenovia-trace-id"])
    assert uuid.UUID(response.headers["x-xenovia-session-id"])
    with pytest.raises(openai.RateLimitError):
        stream_chat(access, {"x-mock-status": "429"})


# Redaction of the text deltas that are not message content. The mock sends the events of
# x-mock-raw-event before its own stream, with an address cut mid-word across two events.

EMAIL = "jane.doe@example.com"


@pytest.fixture(scope="module", params=["hold", "live"])
def redacting(request, gateway):
    access = gateway.new_proxy(
        f"stream-redact-{request.param}", "--stream-policy-mode", request.param
    )
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0
    return access


def sse_text(payloads: list[dict]) -> str:
    return "".join(f"data: {json.dumps(payload)}\\n\\n" for payload in payloads)


def chat_delta_chunk(delta: dict) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": None}
    return {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [choice],
    }


def raw_responses_stream(access, raw_event: str) -> httpx.Response:
    return httpx.post(
        access.base_url + "/responses",
        headers={"authorization": f"Bearer {access.key}", "x-mock-raw-event": raw_event},
        json={"model": "gpt-4o-mini", "input": "Say hello.", "stream": True},
        timeout=30,
    )


def test_streamed_refusal_redacted(gateway, redacting):
    pieces = ["I will not mail ja", "ne.doe@example.com about it."]
    raw_event = sse_text([chat_delta_chunk({"refusal": piece}) for piece in pieces])

    response = raw_stream(redacting, {"x-mock-raw-event": raw_event})

    assert response.status_code == 200
    assert b"doe@example.com" not in response.content
    chunks = [payload for payload in sse_payloads(response.content) if payload != "[DONE]"]
    refusal = "".join(chunk["choices"][0]["delta"].get("refusal") or "" for chunk in chunks)
    assert refusal == "I will not mail [REDACTED_EMAIL] about it."
    assert content_of_payloads(chunks) == DEFAULT_ANSWER
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact_response"
    assert trace["redacted_kinds"] == ["email"]


def test_streamed_legacy_function_call_redacted(gateway, redacting):
    first = {"function_call": {"name": "send_mail", "arguments": '{"to": "ja'}}
    second = {"function_call": {"arguments": 'ne.doe@example.com", "subject": "access"}'}}
    raw_event = sse_text([chat_delta_chunk(first), chat_delta_chunk(second)])

    response = raw_stream(redacting, {"x-mock-raw-event": raw_event})

    assert response.status_code == 200
    assert b"doe@example.com" not in response.content
    chunks = [payload for payload in sse_payloads(response.content) if payload != "[DONE]"]
    calls = [chunk["choices"][0]["delta"].get("function_call") or {} for chunk in chunks]
    assert calls[0]["name"] == "send_mail"
    arguments = "".join(call.get("arguments") or "" for call in calls)
    assert json.loads(arguments) == {"to": "[REDACTED_EMAIL]", "subject": "access"}
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact_response"
    assert EMAIL not in json.dumps(trace, default=str)


@pytest.mark.parametrize(
    ("delta_type", "channel"),
    [
        ("response.refusal.delta", {"content_index": 0}),
        ("response.custom_tool_call_input.delta", {}),
        ("response.reasoning_summary_text.delta", {"summary_index": 0}),
    ],
)
def test_streamed_responses_deltas_redacted(redacting, delta_type, channel):
    pieces = ["contact ja", "ne.doe@example.com today"]
    where = {"item_id": "item_raw", "output_index": 1, **channel}
    events = [
        {"type": delta_type, **where, "delta": piece, "sequence_number": 100 + number}
        for number, piece in enumerate(pieces)
    ]
    done = {"type": delta_type.removesuffix(".delta") + ".done", **where, "sequence_number": 102}
    raw_event = sse_text([*events, done])

    response = raw_responses_stream(redacting, raw_event)

    assert response.status_code == 200
    assert b"doe@example.com" not in response.content
    payloads = sse_payloads(response.content)
    deltas = [payload["delta"] for payload in payloads if payload["type"] == delta_type]
    assert "".join(deltas) == "contact [REDACTED_EMAIL] today"
    assert payloads[-1]["type"] == "response.completed"


def content_of_payloads(chunks: list[dict]) -> str:
    return "".join(
        chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]
    )
