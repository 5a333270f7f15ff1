"""Provider responses that no OpenAI endpoint returns are governed like any other.

The provider here is a small HTTP server whose response each test sets through ``Script``
(status, headers and body bytes), so that each case sends exactly what a broken or hostile
provider would.
"""

import http.server
import json
import threading
import uuid
import zlib
from dataclasses import dataclass, field

import httpx2 as httpx
import pytest
from conftest import wait_for_trace

MESSAGES = [{"role": "user", "content": "Clean up the database."}]
DENY_DROP_TABLE = (
    "package xenovia.policy\n\n"
    'deny contains "the answer mentions DROP TABLE" if {\n'
    '    contains(input.output.content, "DROP TABLE")\n'
    "}\n"
)
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Run DROP TABLE users;"},
            "finish_reason": "stop",
        }
    ],
}


@dataclass
class Script:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    calls: int = 0


class _ScriptedProvider(http.server.BaseHTTPRequestHandler):
    script = Script()

    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        script = type(self).script
        script.calls += 1
        self.send_response(script.status)
        for name, value in script.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(script.body)))
        self.end_headers()
        self.wfile.write(script.body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def provider_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedProvider)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def proxies(gateway, provider_url, tmp_path_factory):
    """One proxy without policies and one per stream mode with a response policy."""
    policy = tmp_path_factory.mktemp("policies") / "deny_drop_table.rego"
    policy.write_text(DENY_DROP_TABLE)
    open_proxy = gateway.new_proxy("scripted-open", upstream_url=provider_url)
    governed = {"open": open_proxy}
    for mode in ("hold", "live"):
        access = gateway.new_proxy(
            f"scripted-{mode}", "--stream-policy-mode", mode, upstream_url=provider_url
        )
        assert gateway.attach(access.proxy_id, "response", policy).returncode == 0
        governed[mode] = access
    return governed


def answer_with(status=200, headers=None, body=b"") -> Script:
    _ScriptedProvider.script = Script(status, headers or {}, body)
    return _ScriptedProvider.script


def post(access, stream=False, extra_headers=None) -> httpx.Response:
    headers = {"authorization": f"Bearer {access.key}", **(extra_headers or {})}
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}
    return httpx.post(
        access.base_url + "/chat/completions", headers=headers, json=payload, timeout=30
    )


def error_of(response) -> dict:
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["request_id"] == response.headers["x-xenovia-trace-id"]
    assert uuid.UUID(response.headers["x-xenovia-session-id"])
    return error


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("body", [b"", b'{"moved": true}'])
def test_provider_redirect_not_passed_on(gateway, proxies, status, body):
    answer_with(status, {"location": "http://127.0.0.1:9/elsewhere"}, body)

    response = post(proxies["open"])

    assert response.status_code == 502
    assert "location" not in response.headers
    error = error_of(response)
    assert error["code"] == "upstream_redirect"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 502
    assert trace["error_type"] == "upstream_redirect"


@pytest.mark.parametrize("mode", ["hold", "live"])
def test_bodiless_answer_blocked_under_policy(proxies, mode):
    answer_with(200, {"content-type": "application/json"})

    response = post(proxies[mode])

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_error"


def test_bodiless_answer_passes_without_policy(proxies):
    answer_with(200, {"content-type": "application/json"})

    response = post(proxies["open"])

    assert response.status_code == 200
    assert response.content == b""


def test_json_labelled_as_stream_checked_as_json(proxies):
    # The client did not ask for a stream, so it reads the body as JSON whatever its type.
    body = json.dumps(ANSWER).encode() + b"\n\n"
    answer_with(200, {"content-type": "text/event-stream"}, body)

    response = post(proxies["hold"])

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_block"


@pytest.mark.parametrize("mode", ["hold", "live"])
def test_unknown_event_field_blocked(proxies, mode):
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}
    body = (
        b'{"note": "DROP TABLE users"}\n'
        + b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    )
    answer_with(200, {"content-type": "text/event-stream"}, body)

    response = post(proxies[mode], stream=True)

    assert b"DROP TABLE" not in response.content
    if mode == "hold":
        assert response.status_code == 403
        assert error_of(response)["code"] == "policy_error"
    else:
        assert b'"code":"policy_error"' in response.content


def test_stream_in_unknown_encoding_blocked_under_policy(proxies):
    chunk = {"choices": [{"index": 0, "delta": {"content": "DROP TABLE users"}}]}
    body = zlib.compress(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
    answer_with(200, {"content-type": "text/event-stream", "content-encoding": "deflate"}, body)

    response = post(proxies["hold"], stream=True)

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_error"


def test_stream_in_unknown_encoding_untouched_without_policy(proxies):
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}
    events = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    body = zlib.compress(events)
    answer_with(200, {"content-type": "text/event-stream", "content-encoding": "deflate"}, body)

    with httpx.Client() as client:
        headers = {"authorization": f"Bearer {proxies['open'].key}"}
        payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        url = proxies["open"].base_url + "/chat/completions"
        with client.stream("POST", url, headers=headers, json=payload, timeout=30) as response:
            raw = b"".join(response.iter_raw())

    assert response.status_code == 200
    assert response.headers["content-encoding"] == "deflate"
    assert zlib.decompress(raw) == events


def test_too_many_request_headers_rejected(gateway, proxies):
    answer_with(200, {"content-type": "application/json"}, json.dumps(ANSWER).encode())
    script = _ScriptedProvider.script
    # Few enough for Envoy to accept from the client, too many once the gateway adds its own.
    extra = {f"x-filler-{index}": "1" for index in range(88)}
    session = str(uuid.uuid4())

    response = post(proxies["open"], extra_headers={**extra, "x-xenovia-session-id": session})

    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "too_many_headers"
    assert "at most 100" in error["message"]
    assert script.calls == 0
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 400
    assert trace["error_type"] == "too_many_headers"
    assert trace["session_id"] == session == response.headers["x-xenovia-session-id"]


@pytest.mark.parametrize("field_name", ["refusal", "reasoning_content"])
def test_refusal_text_checked_by_policy(proxies, field_name):
    message = {"role": "assistant", "content": None, field_name: "Run DROP TABLE users;"}
    body = {**ANSWER, "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    answer_with(200, {"content-type": "application/json"}, json.dumps(body).encode())

    response = post(proxies["hold"])

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_block"


@pytest.mark.parametrize("mode", ["hold", "live"])
def test_streamed_refusal_checked_by_policy(proxies, mode):
    chunk = {"choices": [{"index": 0, "delta": {"refusal": "Run DROP TABLE users;"}}]}
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    answer_with(200, {"content-type": "text/event-stream"}, body)

    response = post(proxies[mode], stream=True)

    assert b"DROP TABLE" not in response.content


@pytest.mark.parametrize("mode", ["hold", "live"])
@pytest.mark.parametrize(
    "line", [b": DROP TABLE users", b"id: DROP TABLE users", b"event: DROP TABLE users"]
)
def test_event_metadata_text_not_passed(proxies, mode, line):
    chunk = {"choices": [{"index": 0, "delta": {"content": "Hello"}}]}
    body = line + b"\ndata: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    answer_with(200, {"content-type": "text/event-stream"}, body)

    response = post(proxies[mode], stream=True)

    assert response.status_code == 200
    assert b"DROP TABLE" not in response.content
    assert b'"Hello"' in response.content


def test_status_beyond_599_not_passed_on(gateway, proxies):
    answer_with(600, {"content-type": "application/json"}, json.dumps(ANSWER).encode())

    response = post(proxies["open"])

    assert response.status_code == 502
    assert b"DROP TABLE" not in response.content
    assert error_of(response)["code"] == "upstream_invalid_status"
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 502


def test_broken_response_policy_blocks_before_provider(gateway, provider_url, tmp_path):
    from ext_proc import home as home_paths

    access = gateway.new_proxy("broken-response", upstream_url=provider_url)
    policy = tmp_path / "gate.rego"
    policy.write_text(DENY_DROP_TABLE)
    assert gateway.attach(access.proxy_id, "response", policy).returncode == 0
    policy_file = home_paths.policy_file(gateway.home, access.proxy_id, "response", "gate")
    home_paths.write_atomically(policy_file, b"package xenovia.policy\n\ndeny := {\n")
    gateway.wait_for_reload()
    script = answer_with(200, {"content-type": "application/json"}, json.dumps(ANSWER).encode())

    response = post(access)

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_error"
    # The response could not have been released, so the provider was never called.
    assert script.calls == 0
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["policy_rule_id"] == "gate.error"


LENIENT_ANSWERS = {
    "nan outside content": json.dumps({**ANSWER, "score": float("nan")}).encode(),
    "infinity": json.dumps({**ANSWER, "created": float("inf")}).encode(),
    "unpaired surrogate": json.dumps(ANSWER).encode().replace(b"users;", b"users \\ud800"),
}


@pytest.mark.parametrize("body", LENIENT_ANSWERS.values(), ids=LENIENT_ANSWERS.keys())
def test_lenient_json_answer_blocked_under_policy(proxies, body):
    answer_with(200, {"content-type": "application/json"}, body)

    response = post(proxies["hold"])

    assert response.status_code == 403
    assert error_of(response)["code"] == "policy_error"


@pytest.mark.parametrize("mode", ["hold", "live"])
def test_lenient_json_event_blocked_under_policy(proxies, mode):
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": "Hi"}}], "x": float("nan")})
    answer_with(200, {"content-type": "text/event-stream"}, f"data: {chunk}\n\n".encode())

    response = post(proxies[mode], stream=True)

    assert b"NaN" not in response.content
    if mode == "hold":
        assert response.status_code == 403
    else:
        assert b'"code":"policy_error"' in response.content


def test_unpaired_surrogate_answer_traced_without_policy(gateway, proxies):
    answer_with(200, {"content-type": "application/json"}, LENIENT_ANSWERS["unpaired surrogate"])

    response = post(proxies["open"])

    assert response.status_code == 200
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["status"] == 200
    assert trace["error_type"] == ""
    assert trace["messages"]
    health = httpx.get(proxies["open"].base_url.split("/a/")[0] + "/healthz", timeout=10).json()
    assert "session_store_error" not in health


def test_usage_beyond_token_column_traced(gateway, proxies):
    usage = {"prompt_tokens": 2**32, "completion_tokens": 2, "total_tokens": 2**32 + 2}
    body = json.dumps({**ANSWER, "usage": usage}).encode()
    answer_with(200, {"content-type": "application/json"}, body)

    response = post(proxies["open"])

    assert response.status_code == 200
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["error_type"] == ""
    assert trace["tokens_in"] is None
    assert trace["tokens_out"] == 2
    assert trace["messages"]


def test_lenient_json_error_passes_without_policy(proxies):
    body = b'{"error":{"message":"bad","type":"invalid_request_error","code":null,"param":NaN}}'
    answer_with(400, {"content-type": "application/json", "x-request-id": "req_provider1"}, body)

    response = post(proxies["open"])

    assert response.status_code == 400
    assert response.content == body
    assert response.headers["x-request-id"] == "req_provider1"
