"""Stream events the way clients split them: line endings and unreadable data."""

import json
from pathlib import Path

import httpx2 as httpx
import pytest
from conftest import wait_for_trace

REPO = Path(__file__).resolve().parent.parent
DROP_TABLE_POLICY = REPO / "policies" / "response_block_drop_table.rego"
STREAM_BODY = json.dumps({"model": "gpt-4o-mini", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]})


def drop_table_chunk(ending: str) -> str:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{
        "index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                              "function": {"name": "drop_table", "arguments": "{}"}}]},
        "finish_reason": None}]}
    return "data: " + json.dumps(chunk) + ending


def stream(access, raw_event: str) -> httpx.Response:
    return httpx.post(
        access.base_url + "/chat/completions", content=STREAM_BODY, timeout=30,
        headers={"authorization": f"Bearer {access.key}", "content-type": "application/json",
                 "x-mock-raw-event": raw_event.replace("\r", "\\r").replace("\n", "\\n")},
    )


@pytest.fixture(scope="module", params=["hold", "live"])
def guarded(request, gateway):
    access = gateway.new_proxy(f"parsing-{request.param}", "--stream-policy-mode", request.param)
    assert gateway.attach(access.proxy_id, "response", DROP_TABLE_POLICY).returncode == 0
    return access


@pytest.mark.parametrize("ending", ["\r\r", "\n\r\n", "\r\n\r\n"], ids=["cr-cr", "lf-crlf", "crlf-crlf"])
def test_event_endings_still_evaluated(guarded, ending):
    response = stream(guarded, drop_table_chunk(ending))

    assert "drop_table" not in response.text
    if response.status_code == 200:
        assert '"code":"policy_block"' in response.text
    else:
        assert response.status_code == 403


def test_unreadable_event_blocked_under_policy(gateway, guarded):
    response = stream(guarded, "data: {not json\n\n")

    assert "{not json" not in response.text
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block_response"
    assert trace["error_type"] == "policy_error"


def test_unreadable_event_passes_without_policy(gateway):
    open_access = gateway.new_proxy("parsing-open")

    response = stream(open_access, "data: {not json\n\n")

    assert response.status_code == 200
    assert "{not json" in response.text
