"""Session resolution through the real gateway, on each store and with two worker processes."""

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PROVIDER_KEY, GatewayFixture, wait_for_trace
from gateway_harness import RunningGateway
from openai import OpenAI

CONCURRENT_CALLS = 20


@pytest.fixture(scope="module", params=["sqlite", "redis", "sqlite-two-workers"])
def gateway(request, tmp_path_factory, provider, redis_url):
    environment = {"XENOVIA_TEST_PROVIDER_KEY": PROVIDER_KEY}
    if request.param == "redis":
        environment["XENOVIA_REDIS_URL"] = redis_url
    workers = 2 if request.param == "sqlite-two-workers" else 1
    running = RunningGateway(tmp_path_factory.mktemp(request.param), environment, workers).start()
    try:
        yield GatewayFixture(running, provider)
    finally:
        assert running.stop() == 0, running.log_tail()


def chat(client: OpenAI, messages: list[dict], **extra):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages, **extra)
    completion = raw.parse()
    return raw.headers["x-xenovia-session-id"], raw.headers["x-xenovia-trace-id"], completion


def turns_of(gateway, trace_ids: list[str]) -> list[int]:
    return [wait_for_trace(gateway.home, trace_id)["session_turn"] for trace_id in trace_ids]


def converse(client: OpenAI, turns: int, **extra) -> tuple[list[str], list[str]]:
    """Hold a conversation that resends its history, as chat clients do."""
    messages = [{"role": "system", "content": "You are terse."}]
    sessions, traces = [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn} {uuid.uuid4()}"})
        session, trace, completion = chat(client, messages, **extra)
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
        sessions.append(session)
        traces.append(trace)
    return sessions, traces


def test_history_fingerprint_joins_turns(gateway):
    access = gateway.new_proxy("fingerprint")
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)

    sessions, traces = converse(client, 3)

    assert len(set(sessions)) == 1
    assert turns_of(gateway, traces) == [1, 2, 3]
    assert wait_for_trace(gateway.home, traces[2])["session_source"] == "fingerprint"


def test_user_field_joins_turns(gateway):
    access = gateway.new_proxy("user-field")
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)
    user = f"customer-{uuid.uuid4()}"

    results = [chat(client, [{"role": "user", "content": f"New topic {i}"}], user=user) for i in range(3)]

    assert len({session for session, _, _ in results}) == 1
    assert turns_of(gateway, [trace for _, trace, _ in results]) == [1, 2, 3]


def test_previous_response_id_joins_responses_chain(gateway):
    access = gateway.new_proxy("responses-chain")
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)

    first = client.responses.with_raw_response.create(model="gpt-4o-mini", input="Hello")
    second = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="And then?", previous_response_id=first.parse().id
    )
    third = client.responses.with_raw_response.create(
        model="gpt-4o-mini", input="Finally?", previous_response_id=second.parse().id
    )

    sessions = {raw.headers["x-xenovia-session-id"] for raw in (first, second, third)}
    assert len(sessions) == 1
    traces = [raw.headers["x-xenovia-trace-id"] for raw in (first, second, third)]
    assert turns_of(gateway, traces) == [1, 2, 3]
    assert wait_for_trace(gateway.home, traces[1])["session_source"] == "previous_response_id"


def test_explicit_header_wins(gateway):
    access = gateway.new_proxy("header-wins")
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)
    user = f"customer-{uuid.uuid4()}"
    first_session, _, _ = chat(client, [{"role": "user", "content": "hi"}], user=user)
    explicit = str(uuid.uuid4())

    session, trace, _ = chat(
        client, [{"role": "user", "content": "hi again"}], user=user,
        extra_headers={"X-Xenovia-Session-Id": explicit},
    )

    assert session == explicit
    assert session != first_session
    stored = wait_for_trace(gateway.home, trace)
    assert stored["session_id"] == explicit
    assert stored["session_source"] == "header"


def test_proxies_with_same_history_get_different_sessions(gateway):
    first = gateway.new_proxy("tenant-a")
    second = gateway.new_proxy("tenant-b")
    shared = [{"role": "user", "content": f"identical {uuid.uuid4()}"}]
    client_a = OpenAI(api_key=first.key, base_url=first.base_url, max_retries=0)
    client_b = OpenAI(api_key=second.key, base_url=second.base_url, max_retries=0)
    session_a, _, answer = chat(client_a, shared)
    history = shared + [{"role": "assistant", "content": answer.choices[0].message.content},
                        {"role": "user", "content": "next"}]

    session_b, _, _ = chat(client_b, history)
    session_a_again, _, _ = chat(client_a, history)

    assert session_b != session_a
    assert session_a_again == session_a


def test_same_uuid_on_two_proxies_counts_separately(gateway):
    first = gateway.new_proxy("uuid-a")
    second = gateway.new_proxy("uuid-b")
    shared = str(uuid.uuid4())
    headers = {"X-Xenovia-Session-Id": shared}
    message = [{"role": "user", "content": "hi"}]

    _, trace_a, _ = chat(OpenAI(api_key=first.key, base_url=first.base_url, default_headers=headers), message)
    _, trace_b, _ = chat(OpenAI(api_key=second.key, base_url=second.base_url, default_headers=headers), message)

    assert turns_of(gateway, [trace_a, trace_b]) == [1, 1]


def test_concurrent_calls_get_distinct_turns(gateway):
    access = gateway.new_proxy("concurrent")
    session = str(uuid.uuid4())
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0,
                    default_headers={"X-Xenovia-Session-Id": session})

    def call(index: int) -> str:
        return chat(client, [{"role": "user", "content": f"call {index}"}])[1]

    with ThreadPoolExecutor(max_workers=CONCURRENT_CALLS) as pool:
        traces = list(pool.map(call, range(CONCURRENT_CALLS)))

    assert sorted(turns_of(gateway, traces)) == list(range(1, CONCURRENT_CALLS + 1))


def test_policy_input_carries_resolved_session(gateway, tmp_path):
    access = gateway.new_proxy("session-policy")
    policy = tmp_path / "turn_limit.rego"
    policy.write_text(
        "package xenovia.policy\n\n"
        "deny contains \"only two turns per session\" if {\n"
        "    input.session_turn > 2\n"
        "}\n"
    )
    assert gateway.attach(access.proxy_id, "request", policy).returncode == 0
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)

    converse(client, 2)

    import openai

    with pytest.raises(openai.PermissionDeniedError):
        converse(client, 3)


def test_redacted_history_still_joins_turns(gateway, tmp_path):
    # The provider receives the redacted history, but the client resends its own copy, so
    # the response must be linked to the history as the client sent it.
    access = gateway.new_proxy("session-redact")
    policy = tmp_path / "redact_email.rego"
    policy.write_text('package xenovia.policy\n\nredact_fields := {"email"}\n')
    assert gateway.attach(access.proxy_id, "request", policy).returncode == 0
    client = OpenAI(api_key=access.key, base_url=access.base_url, max_retries=0)

    sessions, traces = converse_with_email(client)

    assert len(set(sessions)) == 1
    assert turns_of(gateway, traces) == [1, 2, 3]
    trace = wait_for_trace(gateway.home, traces[2])
    assert trace["session_source"] == "fingerprint"
    assert trace["policy_outcome"] == "redact"


def converse_with_email(client: OpenAI) -> tuple[list[str], list[str]]:
    messages = [{"role": "system", "content": "You are terse."}]
    sessions, traces = [], []
    for turn in range(3):
        content = f"Question {turn} {uuid.uuid4()}, reply to jane.doe{turn}@example.com"
        messages.append({"role": "user", "content": content})
        session, trace, completion = chat(client, messages)
        messages.append({"role": "assistant", "content": completion.choices[0].message.content})
        sessions.append(session)
        traces.append(trace)
    return sessions, traces
