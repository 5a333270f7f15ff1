"""The governed endpoints besides chat (Responses, embeddings, completions) and the refused ones."""

import json
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import wait_for_trace
from openai import OpenAI

from ext_proc.mock_provider import DEFAULT_ANSWER

REPO = Path(__file__).resolve().parent.parent
DROP_TABLE_POLICY = REPO / "policies" / "response_block_drop_table.rego"
REDACT_POLICY = REPO / "policies" / "redact_pii.rego"
EMAIL = "jane.doe@example.com"
EMAIL_ANSWER = f"Write to {EMAIL} for access, or call the desk."
REDACTED_ANSWER = "Write to [REDACTED_EMAIL] for access, or call the desk."
MODES = ["hold", "live"]
BLOCK_POLICY = """package xenovia.policy

deny contains sprintf("tool %q is not permitted", [name]) if {
    some name in input.tool_names
    name in {"web_search", "drop_table"}
}

deny contains "the prompt asks for forbidden things" if {
    some message in input.messages
    contains(message.content, "forbidden")
}

deny contains "embeddings of forbidden text are not allowed" if {
    input.request_type == "embeddings"
    contains(input.request.input, "forbidden")
}
"""
PHRASE_POLICY = """package xenovia.policy

deny contains "the request mentions launch codes" if {
    some message in input.messages
    contains(lower(message.content), "launch codes")
}
"""
FUNCTION_TOOL = {
    "type": "function",
    "name": "lookup",
    "parameters": {"type": "object", "properties": {}},
}


def client_for(access) -> OpenAI:
    return OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)


def assert_openai_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    assert error["request_id"] == response.headers["x-xenovia-trace-id"]
    assert uuid.UUID(response.headers["x-xenovia-session-id"])


def responses_text(events) -> str:
    return "".join(event.delta for event in events if event.type == "response.output_text.delta")


@pytest.fixture(scope="module")
def access(gateway):
    return gateway.new_proxy("endpoints")


def proxy_with_request_policy(gateway, tmp_path_factory, name: str, policy_name: str, text: str):
    access = gateway.new_proxy(name)
    policy = tmp_path_factory.mktemp("policy") / f"{policy_name}.rego"
    policy.write_text(text)
    assert gateway.attach(access.proxy_id, "request", policy).returncode == 0
    return access


@pytest.fixture(scope="module")
def guarded(gateway, tmp_path_factory):
    return proxy_with_request_policy(
        gateway, tmp_path_factory, "endpoints-guarded", "endpoint_guard", BLOCK_POLICY
    )


@pytest.fixture(scope="module")
def phrase_guarded(gateway, tmp_path_factory):
    return proxy_with_request_policy(
        gateway, tmp_path_factory, "endpoints-phrase", "phrase_guard", PHRASE_POLICY
    )


def post_json(access, path: str, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {access.key}"}
    return httpx.post(access.base_url + path, headers=headers, json=body, timeout=30)


# The Responses API.


def test_responses_plain_traced(gateway, access):
    raw = client_for(access).responses.with_raw_response.create(
        model="gpt-4o-mini", input="Say hello.", tools=[FUNCTION_TOOL, {"type": "web_search"}]
    )

    assert raw.parse().output_text == DEFAULT_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "responses"
    assert trace["path"].endswith("/openai/v1/responses")
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())
    assert trace["finish_reason"] == "stop"
    assert trace["stream_policy_mode"] == "none"
    assert [tool.get("name", tool["type"]) for tool in json.loads(trace["tools"])] == [
        "lookup",
        "web_search",
    ]


def test_responses_streamed_traced(gateway, access):
    raw = client_for(access).responses.with_raw_response.create(
        model="gpt-4o-mini", input="Say hello.", stream=True
    )

    events = list(raw.parse())

    assert responses_text(events) == DEFAULT_ANSWER
    assert events[-1].type == "response.completed"
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "responses"
    assert trace["stream"] is True
    assert trace["stream_completed"] is True
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())
    assert trace["ttft_ms"] > 0


@pytest.mark.parametrize(
    "tools",
    [
        [{"type": "web_search"}],
        [{"type": "function", "name": "drop_table", "parameters": {"type": "object"}}],
    ],
    ids=["built-in-by-type", "function-by-name"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_responses_request_policy_blocks_tools(gateway, guarded, tools, stream):
    before = gateway.provider.request_count

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client_for(guarded).responses.create(
            model="gpt-4o-mini", input="Search.", tools=tools, stream=stream
        )

    assert gateway.provider.request_count == before
    response = raised.value.response
    assert response.json()["error"]["code"] == "policy_block"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "responses"
    assert trace["policy_outcome"] == "block"
    assert trace["status"] == 403


def test_responses_allowed_tool_passes(guarded):
    response = client_for(guarded).responses.create(
        model="gpt-4o-mini", input="Look up.", tools=[FUNCTION_TOOL]
    )

    assert response.output_text == DEFAULT_ANSWER


@pytest.mark.parametrize("mode", MODES)
def test_responses_stream_tool_call_blocked(gateway, mode):
    access = gateway.new_proxy(f"responses-drop-{mode}", "--stream-policy-mode", mode)
    assert gateway.attach(access.proxy_id, "response", DROP_TABLE_POLICY).returncode == 0
    headers = {
        "authorization": f"Bearer {access.key}",
        "x-mock-tool-call": 'drop_table;{"table": "users"}',
    }
    body = {"model": "gpt-4o-mini", "input": "Clean up.", "stream": True}

    streamed = httpx.post(access.base_url + "/responses", headers=headers, json=body, timeout=30)
    plain = httpx.post(
        access.base_url + "/responses", headers=headers, json={**body, "stream": False}, timeout=30
    )

    assert_openai_error(plain, 403, "policy_block")
    assert b"drop_table" not in streamed.content
    if mode == "hold":
        assert_openai_error(streamed, 403, "policy_block")
    else:
        assert streamed.status_code == 200
        last = streamed.content.decode().strip().split("\n\n")[-1]
        assert json.loads(last.removeprefix("data: "))["error"]["code"] == "policy_block"
    trace = wait_for_trace(gateway.home, streamed.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["stream_policy_mode"] == mode


@pytest.mark.parametrize("mode", MODES)
def test_responses_stream_redacted(gateway, mode):
    access = gateway.new_proxy(f"responses-redact-{mode}", "--stream-policy-mode", mode)
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0

    raw = client_for(access).responses.with_raw_response.create(
        model="gpt-4o-mini",
        input="Who do I ask?",
        stream=True,
        extra_headers={"x-mock-answer": EMAIL_ANSWER},
    )
    events = list(raw.parse())
    plain = httpx.post(
        access.base_url + "/responses",
        json={"model": "gpt-4o-mini", "input": "Who?", "stream": True},
        headers={"authorization": f"Bearer {access.key}", "x-mock-answer": EMAIL_ANSWER},
        timeout=30,
    )

    assert responses_text(events) == REDACTED_ANSWER
    assert events[-1].response.output_text == REDACTED_ANSWER
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert plain.status_code == 200
    assert EMAIL.encode() not in plain.content
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "redact_response"
    assert trace["redacted_kinds"] == ["email"]
    assert EMAIL not in json.dumps(trace, default=str)


@pytest.mark.parametrize("mode", MODES)
def test_responses_stream_arguments_redacted(gateway, mode):
    access = gateway.new_proxy(f"responses-args-{mode}", "--stream-policy-mode", mode)
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0
    arguments = json.dumps({"to": EMAIL, "subject": "access request"})

    events = list(
        client_for(access).responses.create(
            model="gpt-4o-mini",
            input="Mail them.",
            stream=True,
            extra_headers={"x-mock-tool-call": f"send_mail;{arguments}"},
        )
    )

    expected = {"to": "[REDACTED_EMAIL]", "subject": "access request"}
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads("".join(deltas)) == expected
    assert json.loads(done[0].arguments) == expected
    assert json.loads(events[-1].response.output[0].arguments) == expected
    assert [event.sequence_number for event in events] == list(range(len(events)))


def test_responses_plain_redacted(gateway):
    access = gateway.new_proxy("responses-redact-plain")
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0

    response = client_for(access).responses.create(
        model="gpt-4o-mini", input="Who do I ask?", extra_headers={"x-mock-answer": EMAIL_ANSWER}
    )

    assert response.output_text == REDACTED_ANSWER


@pytest.mark.parametrize(
    "item",
    [
        {"type": "custom_tool_call_output", "call_id": "call_1", "output": "the launch codes"},
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "Launch codes are next."}],
        },
    ],
    ids=["custom-tool-output", "reasoning-summary"],
)
def test_responses_phrase_policy_reads_items(gateway, phrase_guarded, item):
    before = gateway.provider.request_count
    body = {"model": "gpt-4o-mini", "input": [{"role": "user", "content": "Go on."}, item]}

    response = post_json(phrase_guarded, "/responses", body)

    assert_openai_error(response, 403, "policy_block")
    assert gateway.provider.request_count == before


def test_responses_tool_name_in_function_block(gateway, guarded):
    before = gateway.provider.request_count
    tool = {"type": "function", "name": "ok", "function": {"name": "drop_table"}}
    body = {"model": "gpt-4o-mini", "input": "Clean up.", "tools": [tool]}

    response = post_json(guarded, "/responses", body)

    assert_openai_error(response, 403, "policy_block")
    assert gateway.provider.request_count == before


@pytest.mark.parametrize(
    ("path", "choice"),
    [
        ("/chat/completions", {"tool_choice": {"type": "function", "function": {"name": "drop_table"}}}),
        ("/chat/completions", {"function_call": {"name": "drop_table"}}),
        ("/responses", {"tool_choice": {"type": "function", "name": "drop_table"}}),
    ],
    ids=["chat-tool-choice", "chat-function-call", "responses-tool-choice"],
)
def test_tool_named_only_in_choice_blocked(gateway, guarded, path, choice):
    before = gateway.provider.request_count
    if path == "/responses":
        body = {"model": "gpt-4o-mini", "input": "Clean up.", **choice}
    else:
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Clean up."}], **choice}

    response = post_json(guarded, path, body)

    assert_openai_error(response, 403, "policy_block")
    assert gateway.provider.request_count == before


# Embeddings and completions.


def test_embeddings_traced(gateway, access):
    raw = client_for(access).embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first text", "second text"]
    )

    assert len(raw.parse().data) == 2
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "embeddings"
    assert trace["tokens_in"] == 4
    assert trace["status"] == 200


def test_embeddings_governed(gateway, guarded):
    before = gateway.provider.request_count

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client_for(guarded).embeddings.create(model="text-embedding-3-small", input="forbidden")

    assert gateway.provider.request_count == before
    trace = wait_for_trace(gateway.home, raised.value.response.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "embeddings"
    assert trace["policy_outcome"] == "block"


@pytest.mark.parametrize(
    "text_input",
    ["launch codes", ["weather", "Launch codes"]],
    ids=["string", "list"],
)
def test_embeddings_phrase_policy_reads_input(gateway, phrase_guarded, text_input):
    model = "text-embedding-3-small"
    allowed = post_json(phrase_guarded, "/embeddings", {"model": model, "input": "weather"})
    before = gateway.provider.request_count

    response = post_json(phrase_guarded, "/embeddings", {"model": model, "input": text_input})

    assert allowed.status_code == 200, allowed.text
    assert_openai_error(response, 403, "policy_block")
    assert gateway.provider.request_count == before
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "embeddings"
    assert trace["policy_outcome"] == "block"


def test_completions_phrase_policy_reads_suffix(gateway, phrase_guarded):
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "def f():", "suffix": "return 1"}
    allowed = post_json(phrase_guarded, "/completions", body)
    before = gateway.provider.request_count

    response = post_json(phrase_guarded, "/completions", {**body, "suffix": "# launch codes"})

    assert allowed.status_code == 200, allowed.text
    assert_openai_error(response, 403, "policy_block")
    assert gateway.provider.request_count == before


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_completions_traced(gateway, access, stream):
    raw = client_for(access).completions.with_raw_response.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello.", stream=stream
    )

    parsed = raw.parse()
    if stream:
        chunks = list(parsed)
        assert all(chunk.choices for chunk in chunks)
        text = "".join(chunk.choices[0].text for chunk in chunks)
    else:
        text = parsed.choices[0].text
    assert text == DEFAULT_ANSWER
    trace = wait_for_trace(gateway.home, raw.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "completions"
    assert trace["tokens_out"] == len(DEFAULT_ANSWER.split())
    assert trace["usage_reported"] is True
    assert trace["finish_reason"] == "stop"


def test_completions_governed(gateway, guarded):
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client_for(guarded).completions.create(
            model="gpt-3.5-turbo-instruct", prompt="a forbidden prompt"
        )

    trace = wait_for_trace(gateway.home, raised.value.response.headers["x-xenovia-trace-id"])
    assert trace["request_type"] == "completions"
    assert trace["policy_outcome"] == "block"


@pytest.mark.parametrize("mode", MODES)
def test_completions_stream_redacted(gateway, mode):
    access = gateway.new_proxy(f"completions-redact-{mode}", "--stream-policy-mode", mode)
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0

    stream = client_for(access).completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt="Who?",
        stream=True,
        extra_headers={"x-mock-answer": EMAIL_ANSWER},
    )

    assert "".join(chunk.choices[0].text for chunk in stream) == REDACTED_ANSWER


# Refused paths and health.


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/images/generations"),
        ("POST", "/audio/speech"),
        ("POST", "/audio/transcriptions"),
        ("GET", "/files"),
        ("POST", "/files"),
        ("POST", "/batches"),
        ("GET", "/models"),
        ("GET", "/models/gpt-4o-mini"),
    ],
)
def test_ungoverned_paths_refused(gateway, access, method, path):
    before = gateway.provider.request_count
    headers = {"authorization": f"Bearer {access.key}", "content-type": "application/json"}

    response = httpx.request(
        method, access.base_url + path, headers=headers, content=b"{}", timeout=30
    )

    assert_openai_error(response, 404, "endpoint_not_supported")
    assert gateway.provider.request_count == before


def test_images_refused_through_sdk(access):
    with pytest.raises(openai.NotFoundError):
        client_for(access).images.generate(prompt="a cat", model="dall-e-3")


def test_health_answers_without_key(gateway):
    for path in ("/healthz", "/health"):
        response = httpx.get(gateway.url + path, timeout=10)

        assert response.status_code == 200
        assert response.json()["status"] == "ok"


@pytest.mark.parametrize("status", [400, 401, 404, 429, 500, 503])
def test_provider_errors_keep_openai_shape(access, status):
    headers = {"authorization": f"Bearer {access.key}", "x-mock-status": str(status)}
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    response = httpx.post(
        access.base_url + "/chat/completions", headers=headers, json=body, timeout=30
    )

    assert response.status_code == status
    assert response.json()["error"]["message"]
    assert uuid.UUID(response.headers["x-xenovia-trace-id"])
    assert uuid.UUID(response.headers["x-xenovia-session-id"])
