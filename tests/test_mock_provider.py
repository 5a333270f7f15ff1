"""Drive the mock provider with the real openai SDK and with raw sockets, without the gateway."""

import base64
import gzip
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import openai
import pytest

from ext_proc.mock_provider import DEFAULT_ANSWER, run_in_thread

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the team"},
]
PROMPT_WORDS = 8
ANSWER_WORDS = 6
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def provider():
    # A long split pause keeps the two halves of a split event in separate reads even on a
    # loaded machine.
    handle = run_in_thread(split_pause_ms=300)
    yield handle
    handle.stop()


@pytest.fixture(autouse=True)
def clean_records(provider):
    provider.reset()


@pytest.fixture
def client(provider):
    return openai.OpenAI(base_url=provider.base_url, api_key="sk-test", max_retries=0)


def chat(client, stream=False, headers=None, **params):
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=stream, extra_headers=headers, **params
    )


def raw_request(provider, method, path, body=None, headers=None):
    """Send one request over http.client and return (status, headers, raw body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", provider.port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"content-type": "application/json", **(headers or {})}
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def sse_data(raw: bytes) -> list[str]:
    """Return the data fields of an SSE body, in order."""
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def stream_request(model="gpt-4o-mini", **extra):
    return {"model": model, "messages": MESSAGES, "stream": True, **extra}


# -- chat completions -------------------------------------------------------------------------


def test_chat_non_stream(client):
    completion = chat(client)

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert completion.choices[0].message.content == DEFAULT_ANSWER
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == PROMPT_WORDS
    assert completion.usage.completion_tokens == ANSWER_WORDS
    assert completion.usage.total_tokens == PROMPT_WORDS + ANSWER_WORDS


def test_dated_model_kept(client):
    completion = client.chat.completions.create(model="gpt-4o-2024-08-06", messages=MESSAGES)

    assert completion.model == "gpt-4o-2024-08-06"


def test_chat_stream_without_usage(client, provider):
    chunks = list(chat(client, stream=True))

    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(contents) == DEFAULT_ANSWER
    assert len(contents) == ANSWER_WORDS
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    _, _, raw = raw_request(provider, "POST", "/v1/chat/completions", stream_request())
    assert b'"usage"' not in raw
    assert raw.endswith(b"data: [DONE]\n\n")


def test_chat_stream_include_usage(client, provider):
    chunks = list(chat(client, stream=True, stream_options={"include_usage": True}))

    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == PROMPT_WORDS
    assert chunks[-1].usage.completion_tokens == ANSWER_WORDS
    assert chunks[-2].choices[0].finish_reason == "stop"
    body = stream_request(stream_options={"include_usage": True})
    _, _, raw = raw_request(provider, "POST", "/v1/chat/completions", body)
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    assert all("usage" in payload for payload in payloads)
    assert all(payload["usage"] is None for payload in payloads[:-1])
    assert payloads[-1]["usage"]["total_tokens"] == PROMPT_WORDS + ANSWER_WORDS


def test_tool_call_non_stream(client):
    headers = {"x-mock-tool-call": 'get_weather;{"city": "Paris"}'}

    completion = chat(client, headers=headers)

    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls[0].function.name == "get_weather"
    assert message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert message.tool_calls[0].id.startswith("call_")


def test_tool_call_stream_reassembled_by_sdk(client, provider):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    headers = {"x-mock-tool-call": f"get_weather;{arguments}"}

    with client.chat.completions.stream(
        model="gpt-4o-mini", messages=MESSAGES, extra_headers=headers
    ) as stream:
        final = stream.get_final_completion()

    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert call.function.arguments == arguments
    _, _, raw = raw_request(provider, "POST", "/v1/chat/completions", stream_request(), headers)
    argument_deltas = [e for e in sse_data(raw) if '"arguments":"' in e and '"name"' not in e]
    assert len(argument_deltas) > 1


def test_tool_call_without_arguments(client):
    completion = chat(client, headers={"x-mock-tool-call": "lookup"})

    assert completion.choices[0].message.tool_calls[0].function.arguments == "{}"


# -- responses, embeddings, completions -------------------------------------------------------


def test_responses_non_stream(client):
    response = client.responses.create(
        model="gpt-4o-mini", input="Say hello to the team", previous_response_id="resp_earlier"
    )

    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == DEFAULT_ANSWER
    assert response.output[0].type == "message"
    assert response.previous_response_id == "resp_earlier"
    assert response.usage.input_tokens == 5
    assert response.usage.output_tokens == ANSWER_WORDS


def test_responses_stream_events(client):
    stream = client.responses.create(model="gpt-4o-mini", input="Say hello", stream=True)
    events = list(stream)

    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") == ANSWER_WORDS
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_ANSWER
    assert events[-1].response.usage.output_tokens == ANSWER_WORDS
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_responses_stream_helper(client):
    with client.responses.stream(model="gpt-4o-mini", input="Say hello") as stream:
        final = stream.get_final_response()

    assert final.output_text == DEFAULT_ANSWER
    assert final.usage.total_tokens == 2 + ANSWER_WORDS


def test_responses_tool_call_stream(client):
    headers = {"x-mock-tool-call": 'get_weather;{"city": "Oslo"}'}

    with client.responses.stream(model="m", input="weather?", extra_headers=headers) as stream:
        final = stream.get_final_response()

    assert final.output[0].type == "function_call"
    assert final.output[0].name == "get_weather"
    assert final.output[0].arguments == '{"city": "Oslo"}'


def test_embeddings_float(client):
    result = client.embeddings.create(model="text-embedding-3-small", input=["one two", "three"])

    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) == 8 for item in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens == 3
    assert result.model == "text-embedding-3-small"


def test_embeddings_base64_matches_float(client):
    floats = client.embeddings.create(model="text-embedding-3-small", input="one two")
    encoded = client.embeddings.create(
        model="text-embedding-3-small", input="one two", encoding_format="base64"
    )

    raw = base64.b64decode(encoded.data[0].embedding)
    assert list(struct.unpack("<8f", raw)) == floats.data[0].embedding


def test_completions_non_stream(client):
    result = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="one two three")

    assert result.object == "text_completion"
    assert result.choices[0].text == DEFAULT_ANSWER
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.prompt_tokens == 3
    assert result.usage.completion_tokens == ANSWER_WORDS


def test_completions_stream(client):
    chunks = list(
        client.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="one two",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_ANSWER
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.completion_tokens == ANSWER_WORDS


# -- scenario headers -------------------------------------------------------------------------


def test_answer_header(client):
    completion = chat(client, headers={"x-mock-answer": "Custom reply here"})

    assert completion.choices[0].message.content == "Custom reply here"
    assert completion.usage.completion_tokens == 3


def test_echo_returns_last_user_message(client):
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "my email is [REDACTED]"}]},
    ]

    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, extra_headers={"x-mock-echo": "1"}
    )

    assert completion.choices[0].message.content == "my email is [REDACTED]"


def test_echo_responses_input(client):
    response = client.responses.create(
        model="m", input="echo me please", extra_headers={"x-mock-echo": "1"}
    )

    assert response.output_text == "echo me please"


def test_status_header_rate_limit(client):
    with pytest.raises(openai.RateLimitError) as caught:
        chat(client, headers={"x-mock-status": "429"})

    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.type == "requests"


def test_status_header_server_error(client):
    with pytest.raises(openai.InternalServerError) as caught:
        chat(client, headers={"x-mock-status": "500"})

    assert caught.value.body["type"] == "server_error"
    assert set(caught.value.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("value", ["lots", "200", "600"])
def test_status_header_invalid_value(client, value):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, headers={"x-mock-status": value})

    assert "x-mock-status" in caught.value.message


def test_tool_call_header_without_name(client):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, headers={"x-mock-tool-call": ';{"a": 1}'})

    assert "x-mock-tool-call" in caught.value.message


def test_embeddings_invalid_input_is_400(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="text-embedding-3-small", input=[])

    assert "'input'" in caught.value.message


def test_no_usage_non_stream(client, provider):
    completion = chat(client, headers={"x-mock-no-usage": "1"})

    assert completion.usage is None
    _, _, raw = raw_request(
        provider, "POST", "/v1/chat/completions", {"model": "m"}, {"x-mock-no-usage": "1"}
    )
    assert "usage" not in json.loads(raw)


def test_no_usage_stream(client):
    chunks = list(
        chat(
            client,
            stream=True,
            headers={"x-mock-no-usage": "1"},
            stream_options={"include_usage": True},
        )
    )

    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)


def test_delay_headers_still_answer(client):
    headers = {"x-mock-delay-ms": "30", "x-mock-chunk-delay-ms": "5"}

    completion = chat(client, headers=headers)
    chunks = list(chat(client, stream=True, headers=headers))

    assert completion.choices[0].message.content == DEFAULT_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_gzip_non_stream(client, provider):
    headers = {"x-mock-gzip": "1", "accept-encoding": "gzip"}

    status, response_headers, raw = raw_request(
        provider, "POST", "/v1/chat/completions", {"model": "m", "messages": MESSAGES}, headers
    )

    assert status == 200
    assert response_headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(raw))["choices"][0]["message"]["content"] == DEFAULT_ANSWER
    assert chat(client, headers={"x-mock-gzip": "1"}).choices[0].message.content == DEFAULT_ANSWER


def test_gzip_stream(client, provider):
    status, response_headers, raw = raw_request(
        provider, "POST", "/v1/chat/completions", stream_request(), {"x-mock-gzip": "1"}
    )

    assert status == 200
    assert response_headers["content-encoding"] == "gzip"
    assert sse_data(gzip.decompress(raw))[-1] == "[DONE]"
    chunks = list(chat(client, stream=True, headers={"x-mock-gzip": "1"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_ANSWER


def test_gzip_stream_flushes_every_event(provider):
    chunks = read_raw_stream(provider, {"x-mock-gzip": "1"})

    decompressor = zlib.decompressobj(wbits=31)
    for chunk in chunks[:-1]:
        assert decompressor.decompress(chunk).endswith(b"\n\n")


def test_truncate_ends_without_done(client, provider):
    chunks = list(chat(client, stream=True, headers={"x-mock-truncate": "1"}))

    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert contents == ["Hello", " from"]
    assert all(c.choices[0].finish_reason is None for c in chunks)
    _, _, raw = raw_request(
        provider, "POST", "/v1/chat/completions", stream_request(), {"x-mock-truncate": "1"}
    )
    assert b"[DONE]" not in raw
    assert raw.endswith(b"\n\n")


def test_split_event_arrives_in_two_writes(provider):
    chunks = read_raw_stream(provider, {"x-mock-split-event": "1"}, watch_partial=True)

    partial = [chunk for chunk in chunks if not chunk.endswith(b"\n\n")]
    assert len(partial) == 1
    body = b"".join(chunks)
    events = sse_data(body)
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["object"] == "chat.completion.chunk" for event in events[:-1])


def read_raw_stream(provider, headers, watch_partial=False):
    """
    Stream a chat completion over a raw socket and return the HTTP chunks of its body.

    With watch_partial, also assert that some recv ended in the middle of an SSE event, that
    is, the provider flushed half an event and the rest came in a later read.
    """
    body = json.dumps(stream_request()).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    )
    with socket.create_connection(("127.0.0.1", provider.port), timeout=10) as sock:
        sock.sendall(head.encode() + body)
        received = b""
        saw_partial_event = False
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = sock.recv(65536)
            assert data, "connection closed before the end of the chunked body"
            received += data
            chunks = decode_complete_chunks(received.partition(b"\r\n\r\n")[2])
            stream = b"".join(chunks)
            if stream and not stream.endswith(b"\n\n"):
                saw_partial_event = True
    if watch_partial:
        assert saw_partial_event
    return decode_complete_chunks(received.partition(b"\r\n\r\n")[2])


def decode_complete_chunks(raw: bytes) -> list[bytes]:
    chunks = []
    while b"\r\n" in raw:
        size_line, _, rest = raw.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        chunks.append(rest[:size])
        raw = rest[size + 2 :]
    return chunks


# -- HTTP behaviour ---------------------------------------------------------------------------


def test_keep_alive_serves_several_requests(provider):
    connection = http.client.HTTPConnection("127.0.0.1", provider.port, timeout=10)
    body = json.dumps({"model": "m", "messages": MESSAGES})
    try:
        statuses, sockets = [], []
        for _ in range(3):
            connection.request("POST", "/v1/chat/completions", body=body)
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
            sockets.append(connection.sock)
    finally:
        connection.close()

    assert statuses == [200, 200, 200]
    assert sockets[0] is not None
    assert all(sock is sockets[0] for sock in sockets)


def test_chunked_request_body(provider):
    connection = http.client.HTTPConnection("127.0.0.1", provider.port, timeout=10)
    pieces = [b'{"model": "m", ', b'"messages": [{"role": "user", "content": "chunked hi"}]}']
    try:
        connection.request(
            "POST",
            "/v1/chat/completions",
            body=iter(pieces),
            headers={"x-mock-echo": "1", "transfer-encoding": "chunked"},
            encode_chunked=True,
        )
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()

    assert payload["choices"][0]["message"]["content"] == "chunked hi"


def test_path_prefix_and_recording(provider):
    prefixed = openai.OpenAI(
        base_url=f"http://127.0.0.1:{provider.port}/openai/v1", api_key="sk-test", max_retries=0
    )

    chat(prefixed, headers={"X-Custom-Header": "Value"})

    records = provider.requests
    assert len(records) == 1
    assert records[0]["method"] == "POST"
    assert records[0]["path"] == "/openai/v1/chat/completions"
    assert records[0]["headers"]["x-custom-header"] == "Value"
    assert records[0]["headers"]["authorization"] == "Bearer sk-test"
    assert json.loads(records[0]["body"])["messages"] == MESSAGES


def test_recording_over_http_and_reset(client, provider):
    chat(client)
    client.embeddings.create(model="text-embedding-3-small", input="x")

    _, _, raw = raw_request(provider, "GET", "/_mock/requests")
    listed = json.loads(raw)
    reset_status, _, _ = raw_request(provider, "POST", "/_mock/reset")
    _, _, raw_after = raw_request(provider, "GET", "/_mock/requests")

    assert listed["count"] == 2
    assert [r["path"] for r in listed["requests"]] == ["/v1/chat/completions", "/v1/embeddings"]
    assert reset_status == 200
    assert json.loads(raw_after) == {"count": 0, "requests": []}


def test_reset_from_python(client, provider):
    chat(client)

    provider.reset()

    assert provider.requests == []
    assert provider.request_count == 0


def test_health(provider):
    status, _, raw = raw_request(provider, "GET", "/_mock/health")

    assert status == 200
    assert json.loads(raw) == {"status": "ok"}


def test_unknown_path_is_404(client, provider):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.list()
    status, _, raw = raw_request(provider, "POST", "/v1/images/generations", {"model": "m"})

    assert caught.value.status_code == 404
    assert status == 404
    assert set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}


def test_invalid_json_body_is_400(provider):
    connection = http.client.HTTPConnection("127.0.0.1", provider.port, timeout=10)
    try:
        connection.request("POST", "/v1/chat/completions", body=b"{not json")
        response = connection.getresponse()
        payload = json.loads(response.read())
    finally:
        connection.close()

    assert response.status == 400
    assert payload["error"]["type"] == "invalid_request_error"


def test_require_key():
    with run_in_thread(require_key="sk-right") as keyed:
        wrong = openai.OpenAI(base_url=keyed.base_url, api_key="sk-wrong", max_retries=0)
        right = openai.OpenAI(base_url=keyed.base_url, api_key="sk-right", max_retries=0)

        with pytest.raises(openai.AuthenticationError) as caught:
            chat(wrong)
        completion = chat(right)

    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong" not in caught.value.message
    assert completion.choices[0].message.content == DEFAULT_ANSWER


def test_no_record_still_counts():
    with run_in_thread(record=False) as unrecorded:
        client = openai.OpenAI(base_url=unrecorded.base_url, api_key="k", max_retries=0)
        chat(client)
        chat(client)

        assert unrecorded.request_count == 2
        assert unrecorded.requests == []


def test_command_line_prints_port(tmp_path):
    port_file = tmp_path / "port"
    command = [sys.executable, "-m", "ext_proc.mock_provider", "--port", "0"]
    command += ["--port-file", str(port_file)]
    env = {key: value for key, value in os.environ.items() if key != "RUST_BACKTRACE"}
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        line = process.stdout.readline().strip()
        port = int(line.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/_mock/health")
        status = connection.getresponse().status
        connection.close()
    finally:
        process.terminate()
        return_code = process.wait(timeout=10)

    assert line == f"listening on http://127.0.0.1:{port}"
    assert port_file.read_text().strip() == str(port)
    assert status == 200
    assert return_code == 0
