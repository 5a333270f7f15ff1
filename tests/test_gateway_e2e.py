"""End to end through real Envoy, the ext_proc service and the collector, with the openai SDK."""

import json
import subprocess
import sys
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from conftest import PROVIDER_KEY, wait_for_trace
from gateway_harness import free_port
from openai import OpenAI

REPO = Path(__file__).resolve().parent.parent
SEED_POLICY = REPO / "policies" / "block_dangerous_tools.rego"
OLDER_FORM_POLICY = REPO / "policies" / "block_dangerous_tools_v0.rego"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def tool(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


def client_for(access, **headers) -> OpenAI:
    return OpenAI(api_key=access.key, base_url=access.base_url, default_headers=headers, max_retries=0)


def raw_post(access, path="/chat/completions", headers=None, body=None, key=True):
    all_headers = {"content-type": "application/json", **(headers or {})}
    if key:
        all_headers.setdefault("authorization", f"Bearer {access.key}")
    payload = body if body is not None else json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    return httpx.post(access.base_url + path, headers=all_headers, content=payload, timeout=30)


def assert_trace_headers(response, session_id=None):
    assert uuid.UUID(response.headers["x-xenovia-trace-id"])
    assert uuid.UUID(response.headers["x-xenovia-session-id"])
    if session_id is not None:
        assert response.headers["x-xenovia-session-id"] == session_id


def assert_openai_error(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["type"]
    assert error["request_id"] == response.headers["x-xenovia-trace-id"]
    # OpenAI SDKs take an error's request_id from this header.
    assert response.headers.get("x-request-id") == error["request_id"]
    assert_trace_headers(response)


@pytest.fixture(scope="module")
def access(gateway):
    return gateway.new_proxy("core")


def test_allowed_call_returns_answer_and_headers(gateway, access):
    session = str(uuid.uuid4())
    client = client_for(access, **{
        "X-Xenovia-Session-Id": session,
        "X-Xenovia-Property-environment": "dev",
        "X-Xenovia-Property-workflow": "docs-quickstart",
    })

    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    completion = raw.parse()

    assert completion.choices[0].message.content == "Hello from the Xenovia mock provider."
    assert completion.model == "gpt-4o-mini-2024-07-18"
    assert raw.headers["x-xenovia-session-id"] == session
    assert uuid.UUID(raw.headers["x-xenovia-trace-id"])


def test_session_minted_when_absent(access):
    response = raw_post(access)

    assert response.status_code == 200
    assert_trace_headers(response)


def test_malformed_session_rejected_before_provider(gateway, access):
    before = gateway.provider.request_count

    response = raw_post(access, headers={"X-Xenovia-Session-Id": "not-a-uuid"})

    assert_openai_error(response, 400, "invalid_session_id")
    assert gateway.provider.request_count == before
    with pytest.raises(openai.BadRequestError):
        client_for(access, **{"X-Xenovia-Session-Id": "1234"}).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer"},
        {"authorization": "Basic dXNlcjpwYXNz"},
        {"authorization": "Bearer sk-not-a-xenovia-key-0123456789012345678901234567"},
        {"authorization": "Bearer xe_short"},
        {"authorization": "Bearer xe_" + "A" * 43},
    ],
    ids=["missing", "empty-bearer", "basic", "no-xe-prefix", "malformed", "unknown"],
)
def test_bad_keys_rejected_with_401(gateway, access, headers):
    before = gateway.provider.request_count

    response = raw_post(access, headers=headers, key=False)

    assert response.status_code == 401
    assert_openai_error(response, 401, response.json()["error"]["code"])
    assert response.json()["error"]["code"] in ("missing_api_key", "invalid_api_key")
    assert gateway.provider.request_count == before


def test_sdk_raises_authentication_error(access):
    client = OpenAI(api_key="xe_" + "B" * 43, base_url=access.base_url, max_retries=0)

    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_key_for_other_proxy_gets_403(gateway, access):
    other = gateway.new_proxy("other")

    response = raw_post(access, headers={"authorization": f"Bearer {other.key}"}, key=False)

    assert_openai_error(response, 403, "proxy_access_denied")
    with pytest.raises(openai.PermissionDeniedError):
        OpenAI(api_key=other.key, base_url=access.base_url, max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES
        )


def test_x_xenovia_key_header_accepted(access):
    response = raw_post(access, headers={"X-Xenovia-Key": access.key}, key=False)

    assert response.status_code == 200, response.text


def test_revoked_key_gets_401(gateway):
    revoked = gateway.new_proxy("revoked")
    entries = [json.loads(line) for line in gateway.cli("key", "list", "--json").stdout.splitlines()]
    key_id = next(entry["id"] for entry in entries if entry["proxies"] == [revoked.proxy_id])
    assert raw_post(revoked).status_code == 200

    gateway.change_registry("key", "revoke", key_id)

    assert_openai_error(raw_post(revoked), 401, "invalid_api_key")
    again = gateway.cli("key", "revoke", key_id, check=False)
    assert again.returncode == 2
    assert "already revoked" in again.stderr


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({f"X-Xenovia-Property-p{i}": "v" for i in range(21)}, "at most 20"),
        ({"X-Xenovia-Property-" + "k" * 65: "v"}, "longer than 64"),
        ({"X-Xenovia-Property-team": "v" * 513}, "longer than 512"),
        ({"X-Xenovia-Property-policy_override": "1"}, "reserved prefix"),
    ],
    ids=["count", "key-length", "value-length", "reserved-prefix"],
)
def test_property_limits_rejected(gateway, access, headers, fragment):
    before = gateway.provider.request_count

    response = raw_post(access, headers=headers)

    assert_openai_error(response, 400, "invalid_property")
    assert fragment in response.json()["error"]["message"]
    assert gateway.provider.request_count == before


def test_property_limits_allow_boundary(access):
    headers = {f"X-Xenovia-Property-p{i}": "v" * 512 for i in range(19)}
    headers["X-Xenovia-Property-" + "k" * 64] = "v"

    assert raw_post(access, headers=headers).status_code == 200


def test_unsupported_endpoint_gets_404(gateway, access):
    response = httpx.get(access.base_url + "/models", headers={"authorization": f"Bearer {access.key}"})

    assert_openai_error(response, 404, "endpoint_not_supported")


def test_invalid_json_body_gets_400(gateway, access):
    before = gateway.provider.request_count

    response = raw_post(access, body="{not json")

    assert_openai_error(response, 400, "invalid_json")
    assert gateway.provider.request_count == before


@pytest.mark.parametrize("policy_file", [SEED_POLICY, OLDER_FORM_POLICY], ids=["rego-v1", "older-form"])
def test_request_policy_blocks_tool(gateway, policy_file):
    blocked = gateway.new_proxy("policy")
    attached = gateway.attach(blocked.proxy_id, "request", policy_file)
    assert attached.returncode == 0, attached.stderr
    client = client_for(blocked)
    before = gateway.provider.request_count

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=[tool("search"), tool("delete_database")]
        )

    assert gateway.provider.request_count == before
    response = raised.value.response
    assert response.json() == {
        "error": {
            "message": "request blocked by policy",
            "type": "policy_violation",
            "code": "policy_block",
            "request_id": response.headers["x-xenovia-trace-id"],
        }
    }
    assert_trace_headers(response)
    allowed = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[tool("search")])
    assert allowed.choices[0].message.content
    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])
    assert trace["policy_outcome"] == "block"
    assert trace["status"] == 403
    assert trace["policy_rule_id"].endswith(".deny")
    if policy_file == OLDER_FORM_POLICY:
        assert trace["policy_reason"] == "delete_database is not permitted"


def test_policy_attached_while_running_takes_effect(gateway):
    access = gateway.new_proxy("live-attach")
    client = client_for(access)
    tools = [tool("delete_database")]
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=tools)

    assert gateway.attach(access.proxy_id, "request", SEED_POLICY).returncode == 0

    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=tools)
    gateway.change_registry("policy", "detach", "--proxy", access.proxy_id, "--stage", "request")
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=tools)


def test_broken_policy_refused_and_old_one_kept(gateway, tmp_path):
    access = gateway.new_proxy("broken-policy")
    assert gateway.attach(access.proxy_id, "request", SEED_POLICY).returncode == 0
    broken = tmp_path / "broken.rego"
    broken.write_text("package xenovia.policy\n\ndeny if {\n    input.model == \"x\"\n\n")

    result = gateway.cli("policy", "attach", "--proxy", access.proxy_id, "--stage", "request",
                         str(broken), check=False)

    assert result.returncode != 0
    assert "broken.rego:" in result.stderr
    assert "line" in result.stderr or ":6" in result.stderr or ":5" in result.stderr
    client = client_for(access)
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[tool("delete_database")])
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)


def test_provider_sees_its_credential_not_the_key(gateway, access):
    gateway.provider.reset()

    raw_post(access, headers={"X-Xenovia-Session-Id": str(uuid.uuid4()), "X-Xenovia-Property-a": "b",
                              "X-Xenovia-Key": access.key})

    seen = gateway.provider.requests[-1]
    assert seen["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert access.key not in json.dumps(seen)
    assert not [name for name in seen["headers"] if name.startswith("x-xenovia")]
    assert seen["path"] == "/v1/chat/completions"


def test_client_cannot_choose_upstream_or_trace_id(gateway, access):
    gateway.provider.reset()
    chosen_trace = str(uuid.uuid4())

    response = raw_post(access, headers={
        "host": "169.254.169.254",
        "x-xenovia-upstream": "https",
        "x-envoy-original-path": "/elsewhere",
        "X-Xenovia-Trace-Id": chosen_trace,
    })

    assert response.status_code == 200, response.text
    assert response.headers["x-xenovia-trace-id"] != chosen_trace
    assert gateway.provider.request_count == 1
    assert gateway.provider.requests[-1]["headers"]["host"].startswith("127.0.0.1:")


def test_path_prefix_maps_to_upstream(gateway, provider):
    prefixed = gateway.new_proxy("prefix", upstream_url=provider.base_url.replace("/v1", "/openai/v1"))
    provider.reset()

    response = raw_post(prefixed, path="/chat/completions?trace=1")

    assert response.status_code == 200
    assert provider.requests[-1]["path"] == "/openai/v1/chat/completions?trace=1"


@pytest.mark.parametrize(
    "url",
    ["http://169.254.169.254/v1", "http://metadata.google.internal/v1", "http://[fe80::1]:8000/v1",
     "http://100.100.100.200/v1", "ftp://example.com/v1"],
)
def test_forbidden_upstream_refused_at_create(gateway, url):
    result = gateway.cli("proxy", "create", "--name", "bad", "--upstream-url", url, check=False)

    assert result.returncode != 0
    assert "error:" in result.stderr
    assert result.stdout == ""


def test_provider_errors_pass_through_with_headers(gateway, access):
    response = raw_post(access, headers={"x-mock-status": "429"})

    assert response.status_code == 429
    assert_trace_headers(response)
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    with pytest.raises(openai.InternalServerError):
        client_for(access).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
        )


def test_unreachable_upstream_gets_openai_error(gateway):
    dead = gateway.new_proxy("dead", upstream_url="http://127.0.0.1:9/v1")

    response = raw_post(dead)

    assert_openai_error(response, 503, "upstream_unavailable")


def test_trace_row_has_fields_and_no_secret(gateway, access):
    session = str(uuid.uuid4())
    response = raw_post(access, headers={"X-Xenovia-Session-Id": session, "X-Xenovia-Property-team": "docs"})
    trace_id = response.headers["x-xenovia-trace-id"]

    trace = wait_for_trace(gateway.home, trace_id)

    assert trace["trace_id"] == trace_id
    assert trace["session_id"] == session
    assert trace["proxy_id"] == access.proxy_id
    assert trace["org_id"] == "org_default"
    assert trace["provider"] == "openai"
    assert trace["model"] == "gpt-4o-mini"
    assert trace["model_served"] == "gpt-4o-mini-2024-07-18"
    assert trace["request_type"] == "chat_completions"
    assert trace["tokens_in"] > 0
    assert trace["tokens_out"] == 6
    assert trace["latency_ms"] > 0
    assert trace["overhead_ms"] > 0
    assert trace["status"] == 200
    assert trace["policy_outcome"] == "allow"
    assert trace["policy_rule_id"] == ""
    assert trace["policy_reason"] == ""
    assert trace["custom_properties"] == {"team": "docs"}
    assert trace["key_id"].startswith("key_")
    dumped = json.dumps(trace)
    assert access.key not in dumped
    assert PROVIDER_KEY not in dumped


def test_rejected_requests_are_traced(gateway, access):
    response = raw_post(access, headers={"X-Xenovia-Property-policy_x": "1"})

    trace = wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])

    assert trace["status"] == 400
    assert trace["error_type"] == "invalid_property"


def test_traces_list_cli_prints_json_lines(gateway, access):
    session = str(uuid.uuid4())
    response = raw_post(access, headers={"X-Xenovia-Session-Id": session})
    wait_for_trace(gateway.home, response.headers["x-xenovia-trace-id"])

    rows = gateway.traces("--session", session, "--proxy", access.proxy_id, "--limit", "5")

    assert len(rows) == 1
    assert rows[0]["trace_id"] == response.headers["x-xenovia-trace-id"]


def test_second_policy_adds_to_stage(gateway):
    access = gateway.new_proxy("two-policies")
    assert gateway.attach(access.proxy_id, "request", SEED_POLICY).returncode == 0

    attached = gateway.attach(access.proxy_id, "request", REPO / "policies" / "redact_pii.rego", "--dry-run")

    assert attached.returncode == 0, attached.stderr
    listed = [json.loads(line) for line in gateway.cli("policy", "list", "--proxy", access.proxy_id,
                                                      "--json").stdout.splitlines()]
    assert {(row["name"], row["dry_run"]) for row in listed} == {
        ("block_dangerous_tools", False), ("redact_pii", True)
    }
    with pytest.raises(openai.PermissionDeniedError):
        client_for(access).chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, tools=[tool("delete_database")]
        )


def test_detach_by_name_keeps_others(gateway, tmp_path):
    access = gateway.new_proxy("detach-one")
    other = tmp_path / "deny_search.rego"
    other.write_text('package xenovia.policy\n\ndeny if "search" in input.tool_names\n')
    assert gateway.attach(access.proxy_id, "request", SEED_POLICY).returncode == 0
    assert gateway.attach(access.proxy_id, "request", other).returncode == 0

    gateway.change_registry("policy", "detach", "--proxy", access.proxy_id, "--stage", "request",
                            "--name", "deny_search")

    client = client_for(access)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[tool("search")])
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[tool("delete_database")])


def test_client_address_not_forwarded(gateway, access):
    gateway.provider.reset()

    raw_post(access, headers={"x-forwarded-for": "203.0.113.9"})

    seen = gateway.provider.requests[-1]["headers"]
    assert "x-forwarded-for" not in seen
    assert "x-envoy-external-address" not in seen
    assert "x-xenovia-upstream" not in seen


def test_second_gateway_on_busy_port_fails(gateway, tmp_path):
    from gateway_harness import REPO_ROOT, child_environment

    result = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "up", "--port", str(gateway.port),
         "--admin-port", str(free_port())],
        env=child_environment(tmp_path / "second"), capture_output=True, text=True, timeout=120,
        cwd=REPO_ROOT,
    )

    assert result.returncode != 0
    assert gateway.health()["status"] == "ok"


def test_home_accepted_after_subcommand(gateway):
    result = subprocess.run(
        [sys.executable, "-m", "ext_proc.cli", "proxy", "list", "--json", "--home", str(gateway.home)],
        capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_oversized_body_gets_openai_413(gateway, access):
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (33 << 20)}]})
    before = gateway.provider.request_count

    response = raw_post(access, body=body)

    assert_openai_error(response, 413, "request_too_large")
    assert "limit of 32 MiB" in response.json()["error"]["message"]
    assert gateway.provider.request_count == before


@pytest.mark.parametrize(
    "body",
    [
        '{"model":"m","messages":[{"role":"user","content":"\\ud800"}]}',
        '{"model":"m","tools":[],"tools":[],"messages":[]}',
        '{"model":"m","temperature":1e999,"messages":[]}',
        '{"model":"m","seed":18446744073709551616,"messages":[]}',
        '{"model":"m","seed":-9223372036854775809,"messages":[]}',
        "[" * 3000 + "]" * 3000,
    ],
    ids=[
        "lone-surrogate", "duplicate-key", "infinite-number", "integer-beyond-64-bits",
        "negative-integer-beyond-64-bits", "deep-nesting",
    ],
)
def test_ambiguous_json_rejected(gateway, access, body):
    before = gateway.provider.request_count

    response = raw_post(access, body=body)

    assert_openai_error(response, 400, "invalid_json")
    assert gateway.provider.request_count == before


def test_utf16_body_rejected(gateway, access):
    body = json.dumps({"model": "m", "messages": []}).encode("utf-16")

    response = raw_post(access, body=body)

    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize(
    "tools",
    [
        {"tools": [{"type": "custom", "custom": {"name": "delete_database"}}]},
        {"functions": [{"name": "delete_database", "parameters": {}}]},
    ],
    ids=["custom-tool", "legacy-functions"],
)
def test_other_tool_forms_blocked(gateway, tools):
    blocked = gateway.new_proxy("tool-forms")
    assert gateway.attach(blocked.proxy_id, "request", SEED_POLICY).returncode == 0
    before = gateway.provider.request_count

    response = raw_post(blocked, body=json.dumps({"model": "m", "messages": MESSAGES, **tools}))

    assert response.status_code == 403
    assert gateway.provider.request_count == before


def test_upgrade_request_rejected(access):
    response = raw_post(access, headers={"upgrade": "websocket", "connection": "upgrade"})

    assert_openai_error(response, 400, "invalid_header")


def test_client_credentials_not_forwarded(gateway, access):
    gateway.provider.reset()

    raw_post(access, headers={"proxy-authorization": "Basic c2VjcmV0", "cookie": "session=secret",
                              "forwarded": "for=203.0.113.9", "x-forwarded-host": "evil.example"})

    seen = gateway.provider.requests[-1]["headers"]
    for name in ("proxy-authorization", "cookie", "forwarded", "x-forwarded-host"):
        assert name not in seen


def test_worker_down_gets_503_then_recovers(provider, tmp_path):
    from gateway_harness import RunningGateway, run_cli

    home = tmp_path / "down"
    running = RunningGateway(home, {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY}).start()
    try:
        proxy_id = run_cli(home, "proxy", "create", "--name", "down", "--upstream-url",
                           provider.base_url).stdout.strip()
        key = run_cli(home, "key", "create", "--proxy", proxy_id).stdout.strip()
        running.wait_for_reload()
        worker = subprocess.run(["pgrep", "-f", f"ext_proc.server --home {home} "],
                                capture_output=True, text=True).stdout.split()
        assert len(worker) == 1
        subprocess.run(["kill", "-9", worker[0]], check=True)

        url = f"{running.base_url(proxy_id)}/chat/completions"
        body = json.dumps({"model": "m", "messages": MESSAGES})
        response = httpx.post(url, headers={"authorization": f"Bearer {key}"}, content=body, timeout=30)

        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/json")
        assert response.json()["error"]["request_id"] == response.headers["x-xenovia-trace-id"]
        assert uuid.UUID(response.headers["x-xenovia-session-id"])
        running.wait_for_reload(timeout=30)
        recovered = httpx.post(url, headers={"authorization": f"Bearer {key}"}, content=body, timeout=30)
        assert recovered.status_code == 200
    finally:
        running.stop()


def test_tcp_transport_to_workers(provider, tmp_path):
    from gateway_harness import RunningGateway, run_cli

    home = tmp_path / "tcp"
    running = RunningGateway(home, {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY,
                                    "XENOVIA_EXT_PROC_TRANSPORT": "tcp"}).start()
    try:
        proxy_id = run_cli(home, "proxy", "create", "--name", "tcp", "--upstream-url",
                           provider.base_url).stdout.strip()
        key = run_cli(home, "key", "create", "--proxy", proxy_id).stdout.strip()
        running.wait_for_reload()

        client = OpenAI(api_key=key, base_url=running.base_url(proxy_id), max_retries=0)
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

        assert completion.choices[0].message.content
        assert "socket_address" in (home / "run" / "envoy.yaml").read_text()
    finally:
        assert running.stop() == 0


def test_broken_registry_file_keeps_last_good(gateway):
    access = gateway.new_proxy("broken-file")
    proxies_file = gateway.home / "config" / "proxies.json"
    good = proxies_file.read_text()
    try:
        proxies_file.write_text(good[: len(good) // 2])
        import time

        time.sleep(1.5)

        assert raw_post(access).status_code == 200
        assert "registry reload failed" in gateway.log_tail(200)
    finally:
        proxies_file.write_text(good)
        gateway.wait_for_reload()


def test_children_stop_when_up_is_killed(tmp_path):
    import time

    from gateway_harness import RunningGateway

    home = tmp_path / "orphans"
    running = RunningGateway(home).start()

    def survivors() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
        return found.stdout.split()

    assert len(survivors()) >= 3
    running.process.kill()
    running.process.wait()
    deadline = time.monotonic() + 20
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.2)

    assert survivors() == []


def test_vendor_credentials_not_forwarded(gateway, access):
    gateway.provider.reset()
    sent = {"x-goog-api-key": "g", "anthropic-api-key": "a", "x-auth-token": "t",
            "true-client-ip": "203.0.113.9", "x-forwarded-port": "443", "via": "1.1 proxy"}

    raw_post(access, headers=sent)

    seen = gateway.provider.requests[-1]["headers"]
    for name in sent:
        assert name not in seen


def test_health_reports_unreachable_session_store(provider, tmp_path):
    from gateway_harness import RunningGateway, free_port, run_cli

    home = tmp_path / "no-redis"
    # Nothing listens on this port, so every session store call fails.
    environment = {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY,
                   "XENOVIA_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    running = RunningGateway(home, environment).start()
    try:
        proxy_id = run_cli(home, "proxy", "create", "--name", "no-redis", "--upstream-url",
                           provider.base_url).stdout.strip()
        key = run_cli(home, "key", "create", "--proxy", proxy_id).stdout.strip()
        running.wait_for_reload()
        assert running.health()["status"] == "ok"

        client = OpenAI(api_key=key, base_url=running.base_url(proxy_id), max_retries=0)
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

        assert completion.choices[0].message.content
        health = running.health()
        assert health["status"] == "degraded"
        assert "session" in health["session_store_error"]
    finally:
        assert running.stop() == 0


def test_stalled_service_gets_timeout_message(gateway):
    import os
    import re
    import signal

    access = gateway.new_proxy("stalled")
    started = re.findall(r"started ext_proc worker 0 \(pid (\d+)\)", gateway.log_tail(400))
    worker = int(started[-1])
    # A stopped worker accepts the stream but never replies, so Envoy's 10 s message
    # timeout ends it.
    os.kill(worker, signal.SIGSTOP)
    try:
        response = raw_post(access)
    finally:
        os.kill(worker, signal.SIGCONT)

    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "gateway_error"
    assert "did not answer in time" in error["message"]
    assert response.headers["x-xenovia-trace-id"] == error["request_id"]
    assert raw_post(access).status_code == 200


def _envoy_counter(gateway, name: str) -> int:
    address = (gateway.home / "run" / "envoy-admin.address").read_text().strip()
    stats = httpx.get(f"http://{address}/stats?filter={name}", timeout=10).text
    return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if name in line)


def test_forwarded_call_has_no_rejected_mutation(gateway, access):
    before = _envoy_counter(gateway, "rejected_header_mutations")

    response = raw_post(access, headers={"x-auth-token": "t0ken-of-the-client"})

    assert response.status_code == 200
    assert gateway.provider.requests[-1]["headers"].get("x-auth-token") is None
    assert _envoy_counter(gateway, "rejected_header_mutations") == before
