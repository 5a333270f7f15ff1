"""Calls that end before the gateway can govern them whole: compressed bodies, early disconnects."""

import gzip
import json
import socket
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

REDACT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "redact_pii.rego"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def test_compressed_request_body_rejected(gateway):
    access = gateway.new_proxy("compressed")
    body = gzip.compress(json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES}).encode())
    headers = {
        "authorization": f"Bearer {access.key}",
        "content-type": "application/json",
        "content-encoding": "gzip",
    }

    response = httpx.post(access.base_url + "/chat/completions", headers=headers, content=body)

    assert response.status_code == 415
    error = response.json()["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert "gzip" in error["message"]
    assert error["request_id"] == response.headers["x-xenovia-trace-id"]


def test_client_leaving_held_stream_recorded(gateway):
    access = gateway.new_proxy("leaving", "--stream-policy-mode", "hold")
    assert gateway.attach(access.proxy_id, "response", REDACT_POLICY).returncode == 0
    tag = uuid.uuid4().hex
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}).encode()
    path = access.base_url.split(str(gateway.port), 1)[1] + "/chat/completions"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {access.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Xenovia-Property-run: {tag}\r\nx-mock-chunk-delay-ms: 500\r\n\r\n"
    ).encode() + body

    # The held response takes several seconds, and the client leaves before it is released.
    with socket.create_connection(("127.0.0.1", gateway.port)) as client:
        client.sendall(request)
        time.sleep(1.0)

    deadline = time.monotonic() + 15
    rows = []
    while not rows and time.monotonic() < deadline:
        rows = gateway.traces("--property", f"run={tag}")
        time.sleep(0.2)
    assert len(rows) == 1
    assert rows[0]["error_type"] == "request_cancelled"
    assert rows[0]["stream_completed"] is False


def test_access_log_names_error_trace(gateway):
    proxy_id = gateway.cli(
        "proxy", "create", "--name", "no-credential", "--upstream-url", gateway.provider.base_url,
        "--upstream-key-env", "XENOVIA_TEST_VARIABLE_NOT_SET",
    ).stdout.strip()
    key = gateway.change_registry("key", "create", "--proxy", proxy_id).stdout.strip()
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES}

    response = httpx.post(
        gateway.base_url(proxy_id) + "/chat/completions",
        headers={"authorization": f"Bearer {key}"},
        json=payload,
    )

    assert response.status_code == 502
    trace_id = response.headers["x-xenovia-trace-id"]
    deadline = time.monotonic() + 10
    while f"trace={trace_id}" not in gateway.log_tail(400) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"trace={trace_id}" in gateway.log_tail(400)


def test_sdk_error_request_id_is_trace_id(gateway):
    access = gateway.new_proxy("request-id")
    client = openai.OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES,
            extra_headers={"X-Xenovia-Session-Id": "not-a-uuid"},
        )

    trace_id = raised.value.response.headers["x-xenovia-trace-id"]
    assert raised.value.request_id == trace_id
    assert raised.value.body["request_id"] == trace_id


def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _post_error(access, payload: dict, status: int) -> dict:
    response = httpx.post(
        access.base_url + "/chat/completions",
        headers={"authorization": f"Bearer {access.key}"},
        json=payload,
        timeout=60,
    )
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_body_too_deep_to_redact_rejected(gateway):
    # The parser accepts this depth, but redaction walks two stack frames per level.
    access = gateway.new_proxy("too-deep-to-redact")
    assert gateway.attach(access.proxy_id, "request", REDACT_POLICY).returncode == 0
    payload = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "mail bob@example.com"}],
        "metadata": {"x": _nested(600)},
    }

    error = _post_error(access, payload, 400)

    assert error["code"] == "invalid_json"
    assert "nested too deeply" in error["message"]


def test_request_flat_too_large_rejected(gateway, tmp_path):
    policy = tmp_path / "flat.rego"
    policy.write_text(
        'package xenovia.policy\n\ndeny contains "flagged" if input.request_flat["x"] == 1\n'
    )
    access = gateway.new_proxy("flat-too-large")
    assert gateway.attach(access.proxy_id, "request", policy).returncode == 0
    # A 90 KB body: 45,000 numbers 200 levels deep, each with a key of about 400 characters.
    deep_list = [0] * 45_000
    for _ in range(200):
        deep_list = [deep_list]
    payload = {"model": "gpt-4o-mini", "messages": MESSAGES, "metadata": {"x": deep_list}}

    error = _post_error(access, payload, 413)

    assert error["code"] == "request_too_large"
    assert "request_flat" in error["message"]
