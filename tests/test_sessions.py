"""Session resolution against a real SQLite file and a real redis-server."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from ext_proc.sessions import (
    SOURCE_FINGERPRINT,
    SOURCE_HEADER,
    SOURCE_NEW,
    SOURCE_PREVIOUS_RESPONSE,
    SOURCE_USER,
    SessionResolver,
    make_session_resolver,
    message_fingerprint,
    sqlite_path,
)
from ext_proc.sessions.sqlite_store import SqliteSessionStore

PROXY = "proxy-a"
OTHER_PROXY = "proxy-b"
KEY = "key-1"
CHAT = "chat_completions"
RESPONSES = "responses"
# The time the expiry tests wait after a 1-second TTL.
EXPIRY_WAIT_SECONDS = 1.6

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Backend:
    kind: str
    home: Path
    redis_url: str | None

    def resolver(self, ttl_seconds: int = 1800) -> SessionResolver:
        return make_session_resolver(self.home, self.redis_url, ttl_seconds=ttl_seconds)

    def stored_state_count(self) -> int:
        if self.kind == "redis":
            with redis.Redis.from_url(self.redis_url) as client:
                return len(client.keys("*"))
        with sqlite3.connect(sqlite_path(self.home)) as db:
            turns = db.execute("SELECT count(*) FROM session_turns").fetchone()[0]
            links = db.execute("SELECT count(*) FROM session_links").fetchone()[0]
        return turns + links


@pytest.fixture(params=["sqlite", "redis"])
def backend(request, tmp_path) -> Backend:
    if request.param == "sqlite":
        return Backend("sqlite", tmp_path, None)
    url = request.getfixturevalue("redis_url")
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return Backend("redis", tmp_path, url)


async def resolve(
    resolver: SessionResolver,
    body: dict,
    *,
    request_type: str = CHAT,
    proxy_id: str = PROXY,
    key_id: str = KEY,
    header: str | None = None,
):
    return await resolver.resolve(
        proxy_id=proxy_id,
        key_id=key_id,
        header_session_id=header,
        request_type=request_type,
        body=body,
    )


async def chat_turn(
    resolver: SessionResolver, history: list[dict], text: str, proxy_id: str = PROXY
):
    """Send history plus one user message and record a reply; return the session and new history."""
    messages = [*history, {"role": "user", "content": text}]
    session = await resolve(resolver, {"messages": messages}, proxy_id=proxy_id)
    answer = {"role": "assistant", "content": f"answer to {text}", "refusal": None}
    await resolver.record_answer(
        proxy_id=proxy_id,
        key_id=KEY,
        session_id=session.session_id,
        request_type=CHAT,
        body={"messages": messages},
        response_id=f"chatcmpl-{uuid.uuid4().hex}",
        assistant_message=answer,
    )
    # Clients echo the reply back in their own key order and without null fields.
    echoed = {"content": answer["content"], "role": "assistant"}
    return session, [*messages, echoed]


async def responses_turn(resolver: SessionResolver, body: dict, output_text: str):
    session = await resolve(resolver, body, request_type=RESPONSES)
    response_id = f"resp_{uuid.uuid4().hex}"
    await resolver.record_answer(
        proxy_id=PROXY,
        key_id=KEY,
        session_id=session.session_id,
        request_type=RESPONSES,
        body=body,
        response_id=response_id,
        assistant_message={"role": "assistant", "content": output_text},
    )
    return session, response_id


def test_fingerprint_ignores_key_order_and_text_parts():
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    reordered = [
        {"content": "hi", "role": "user"},
        {"content": [{"type": "text", "text": "hello"}], "role": "assistant", "name": None},
    ]

    assert message_fingerprint(plain) == message_fingerprint(reordered)
    assert message_fingerprint(plain) != message_fingerprint(plain[:1])


def test_fingerprint_keeps_tool_calls():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    other_call = [{"role": "assistant", "content": None, "tool_calls": [{**call, "id": "c2"}]}]
    tool_reply = [{"role": "tool", "content": "42", "tool_call_id": "call_1"}]

    assert message_fingerprint(with_call) != message_fingerprint(other_call)
    assert message_fingerprint(tool_reply) != message_fingerprint(
        [{"role": "tool", "content": "42"}]
    )


def test_same_history_under_two_keys_kept_apart(backend):
    system = {"role": "system", "content": "You greet people."}
    greeting = {"role": "assistant", "content": "Hello! How can I help?"}

    async def scenario():
        resolver = backend.resolver()
        first = {}
        second = {}
        for key_id in ("key-a", "key-b"):
            body = {"messages": [system, {"role": "user", "content": "Hi"}]}
            session = await resolve(resolver, body, key_id=key_id)
            await resolver.record_answer(
                proxy_id=PROXY, key_id=key_id, session_id=session.session_id,
                request_type=CHAT, body=body, response_id=None, assistant_message=greeting,
            )
            first[key_id] = session
        for key_id in ("key-a", "key-b"):
            messages = [system, {"role": "user", "content": "Hi"}, greeting]
            body = {"messages": [*messages, {"role": "user", "content": f"I am {key_id}"}]}
            second[key_id] = await resolve(resolver, body, key_id=key_id)
        await resolver.close()
        return first, second

    first, second = asyncio.run(scenario())

    assert first["key-a"].session_id != first["key-b"].session_id
    for key_id in ("key-a", "key-b"):
        assert second[key_id].session_id == first[key_id].session_id
        assert second[key_id].source == SOURCE_FINGERPRINT
        assert second[key_id].turn == 2


def test_chat_turns_join_by_fingerprint(backend):
    async def scenario():
        resolver = backend.resolver()
        history: list[dict] = []
        sessions = []
        for text in ("one", "two", "three"):
            session, history = await chat_turn(resolver, history, text)
            sessions.append(session)
        await resolver.close()
        return sessions

    sessions = asyncio.run(scenario())

    assert len({session.session_id for session in sessions}) == 1
    assert [session.turn for session in sessions] == [1, 2, 3]
    assert [session.source for session in sessions] == [
        SOURCE_NEW,
        SOURCE_FINGERPRINT,
        SOURCE_FINGERPRINT,
    ]


def test_shared_system_prompt_does_not_join(backend):
    async def scenario():
        resolver = backend.resolver()
        system = [{"role": "system", "content": "You are terse."}]
        first, _ = await chat_turn(resolver, system, "one")
        second, _ = await chat_turn(resolver, system, "two")
        await resolver.close()
        return first, second

    first, second = asyncio.run(scenario())

    assert first.session_id != second.session_id
    assert second.source == SOURCE_NEW


def test_user_field_joins_turns(backend):
    async def scenario():
        resolver = backend.resolver()
        sessions = []
        for text in ("one", "two", "three"):
            body = {"messages": [{"role": "user", "content": text}], "user": "alice"}
            sessions.append(await resolve(resolver, body))
        other_key = await resolve(resolver, body, key_id="key-2")
        await resolver.close()
        return sessions, other_key

    sessions, other_key = asyncio.run(scenario())

    assert len({session.session_id for session in sessions}) == 1
    assert [session.turn for session in sessions] == [1, 2, 3]
    assert [session.source for session in sessions] == [SOURCE_NEW, SOURCE_USER, SOURCE_USER]
    assert other_key.session_id != sessions[0].session_id
    assert other_key.source == SOURCE_NEW


def test_concurrent_user_requests_share_session(backend):
    async def scenario():
        resolver = backend.resolver()
        body = {"messages": [{"role": "user", "content": "hi"}], "user": "bob"}
        sessions = await asyncio.gather(*(resolve(resolver, body) for _ in range(20)))
        await resolver.close()
        return sessions

    sessions = asyncio.run(scenario())

    assert len({session.session_id for session in sessions}) == 1
    assert sorted(session.turn for session in sessions) == list(range(1, 21))


def test_responses_chain_by_previous_response_id(backend):
    async def scenario():
        resolver = backend.resolver()
        first, response_id = await responses_turn(resolver, {"input": "hi"}, "hello")
        second, response_id = await responses_turn(
            resolver, {"input": "more", "previous_response_id": response_id}, "sure"
        )
        third, _ = await responses_turn(
            resolver, {"input": "again", "previous_response_id": response_id}, "ok"
        )
        await resolver.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())

    assert first.source == SOURCE_NEW
    assert second.session_id == first.session_id
    assert third.session_id == first.session_id
    assert [second.source, third.source] == [SOURCE_PREVIOUS_RESPONSE] * 2
    assert [first.turn, second.turn, third.turn] == [1, 2, 3]


def test_responses_history_joins_by_fingerprint(backend):
    async def scenario():
        resolver = backend.resolver()
        first_body = {"instructions": "Be brief.", "input": "hi"}
        first, _ = await responses_turn(resolver, first_body, "hello")
        # A stateless client resends the whole conversation as input items.
        items = [
            {"role": "user", "content": "hi"},
            {
                "type": "message",
                "role": "assistant",
                "id": "msg_1",
                "status": "completed",
                "content": [{"type": "output_text", "text": "hello", "annotations": []}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
        ]
        second = await resolve(
            resolver, {"instructions": "Be brief.", "input": items}, request_type=RESPONSES
        )
        await resolver.close()
        return first, second

    first, second = asyncio.run(scenario())

    assert second.session_id == first.session_id
    assert second.source == SOURCE_FINGERPRINT
    assert second.turn == 2


def test_header_wins_over_other_rules(backend):
    explicit = str(uuid.uuid4())

    async def scenario():
        resolver = backend.resolver()
        first, response_id = await responses_turn(
            resolver, {"input": "hi", "user": "carol"}, "hello"
        )
        body = {
            "input": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "more"},
            ],
            "previous_response_id": response_id,
            "user": "carol",
        }
        headed = [
            await resolve(resolver, body, request_type=RESPONSES, header=explicit.upper())
            for _ in range(2)
        ]
        await resolver.close()
        return first, headed

    first, headed = asyncio.run(scenario())

    assert first.session_id != explicit
    assert [session.session_id for session in headed] == [explicit, explicit]
    assert [session.source for session in headed] == [SOURCE_HEADER, SOURCE_HEADER]
    assert [session.turn for session in headed] == [1, 2]


def test_proxies_do_not_share_sessions(backend):
    explicit = str(uuid.uuid4())

    async def scenario():
        resolver = backend.resolver()
        _, history_a = await chat_turn(resolver, [], "one", proxy_id=PROXY)
        first_b, history_b = await chat_turn(resolver, [], "one", proxy_id=OTHER_PROXY)
        second_a, _ = await chat_turn(resolver, history_a, "two", proxy_id=PROXY)
        second_b, _ = await chat_turn(resolver, history_b, "two", proxy_id=OTHER_PROXY)
        first_a, response_id = await responses_turn(resolver, {"input": "x"}, "y")
        foreign = await resolve(
            resolver,
            {"input": "z", "previous_response_id": response_id},
            request_type=RESPONSES,
            proxy_id=OTHER_PROXY,
        )
        header_a = await resolve(resolver, {}, header=explicit, proxy_id=PROXY)
        header_b = await resolve(resolver, {}, header=explicit, proxy_id=OTHER_PROXY)
        await resolver.close()
        return second_a, first_b, second_b, first_a, foreign, header_a, header_b

    second_a, first_b, second_b, first_a, foreign, header_a, header_b = asyncio.run(scenario())

    assert second_a.source == SOURCE_FINGERPRINT
    assert second_b.source == SOURCE_FINGERPRINT
    assert second_b.session_id == first_b.session_id
    assert second_a.session_id != second_b.session_id
    assert foreign.session_id != first_a.session_id
    assert foreign.source == SOURCE_NEW
    assert header_a.turn == 1
    assert header_b.turn == 1


def test_concurrent_resolves_get_distinct_turns(backend):
    explicit = str(uuid.uuid4())

    async def scenario():
        resolver = backend.resolver()
        by_header = await asyncio.gather(
            *(resolve(resolver, {}, header=explicit) for _ in range(20))
        )
        _, history = await chat_turn(resolver, [], "one")
        follow_up = {"messages": [*history, {"role": "user", "content": "two"}]}
        by_fingerprint = await asyncio.gather(*(resolve(resolver, follow_up) for _ in range(20)))
        await resolver.close()
        return by_header, by_fingerprint

    by_header, by_fingerprint = asyncio.run(scenario())

    assert sorted(session.turn for session in by_header) == list(range(1, 21))
    assert len({session.session_id for session in by_fingerprint}) == 1
    assert sorted(session.turn for session in by_fingerprint) == list(range(2, 22))


WORKER_SCRIPT = """
import asyncio, json, sys
from ext_proc.sessions import make_session_resolver

async def main(spec):
    resolver = make_session_resolver(spec["home"], spec["redis_url"])
    body = {"messages": spec["messages"]}
    results = []
    for _ in range(spec["count"]):
        session = await resolver.resolve(
            proxy_id="proxy-a", key_id="key-1", header_session_id=None,
            request_type="chat_completions", body=body,
        )
        results.append([session.session_id, session.turn, session.source])
    if spec["answer"] is not None:
        await resolver.record_answer(
            proxy_id="proxy-a", key_id="key-1", session_id=results[-1][0],
            request_type="chat_completions",
            body=body, response_id=None, assistant_message=spec["answer"],
        )
    await resolver.close()
    print(json.dumps(results))

asyncio.run(main(json.loads(sys.argv[1])))
"""


def start_worker(backend: Backend, messages: list[dict], count: int, answer: dict | None):
    spec = {
        "home": str(backend.home),
        "redis_url": backend.redis_url,
        "messages": messages,
        "count": count,
        "answer": answer,
    }
    return subprocess.Popen(
        [sys.executable, "-c", WORKER_SCRIPT, json.dumps(spec)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_results(process: subprocess.Popen) -> list[list]:
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    return json.loads(stdout)


def test_two_processes_share_state(backend):
    first_question = {"role": "user", "content": "one"}
    first_answer = {"role": "assistant", "content": "answer one"}
    second_answer = {"role": "assistant", "content": "answer two"}
    follow_up = [first_question, first_answer, {"role": "user", "content": "two"}]
    third = [*follow_up, second_answer, {"role": "user", "content": "three"}]

    [[session_id, first_turn, _]] = worker_results(
        start_worker(backend, [first_question], 1, first_answer)
    )
    workers = [
        start_worker(backend, follow_up, 20, None),
        start_worker(backend, follow_up, 20, second_answer),
    ]
    concurrent = [row for worker in workers for row in worker_results(worker)]
    [last] = worker_results(start_worker(backend, third, 1, None))

    assert first_turn == 1
    assert {row[0] for row in concurrent} == {session_id}
    assert {row[2] for row in concurrent} == {SOURCE_FINGERPRINT}
    assert sorted(row[1] for row in concurrent) == list(range(2, 42))
    assert last == [session_id, 42, SOURCE_FINGERPRINT]


def test_expired_session_is_not_joined(backend):
    explicit = str(uuid.uuid4())

    async def scenario():
        resolver = backend.resolver(ttl_seconds=1)
        first, history = await chat_turn(resolver, [], "one")
        await resolve(resolver, {}, header=explicit)
        await asyncio.sleep(EXPIRY_WAIT_SECONDS)
        second, _ = await chat_turn(resolver, history, "two")
        header_again = await resolve(resolver, {}, header=explicit)
        await resolver.close()
        return first, second, header_again

    first, second, header_again = asyncio.run(scenario())

    assert second.session_id != first.session_id
    assert second.source == SOURCE_NEW
    assert second.turn == 1
    assert header_again.turn == 1


def test_expired_state_is_removed(backend):
    async def scenario():
        resolver = backend.resolver(ttl_seconds=1)
        await chat_turn(resolver, [], "one")
        await resolve(resolver, {"messages": [{"role": "user", "content": "x"}], "user": "dan"})
        stored_before = backend.stored_state_count()
        await asyncio.sleep(EXPIRY_WAIT_SECONDS)
        await resolver.purge_expired()
        await resolver.close()
        return stored_before

    stored_before = asyncio.run(scenario())

    assert stored_before > 0
    assert backend.stored_state_count() == 0


def test_redis_keys_all_have_ttl(request):
    url = request.getfixturevalue("redis_url")

    async def scenario():
        resolver = make_session_resolver("/nonexistent", url, ttl_seconds=60)
        await chat_turn(resolver, [], "ttl")
        await resolve(resolver, {"messages": [{"role": "user", "content": "x"}], "user": "eve"})
        await resolver.close()

    with redis.Redis.from_url(url) as client:
        client.flushdb()
        asyncio.run(scenario())
        ttls = {key: client.pttl(key) for key in client.keys("*")}

    assert len(ttls) >= 4
    assert all(0 < ttl <= 60_000 for ttl in ttls.values()), ttls


def test_sqlite_purges_during_writes(tmp_path):
    path = tmp_path / "sessions.sqlite3"

    async def scenario():
        resolver = SessionResolver(SqliteSessionStore(path, 1, purge_every_writes=1))
        await chat_turn(resolver, [], "one")
        await asyncio.sleep(EXPIRY_WAIT_SECONDS)
        await resolve(resolver, {"messages": [{"role": "user", "content": "x"}]})
        await resolver.close()

    asyncio.run(scenario())

    with sqlite3.connect(path) as db:
        links = db.execute("SELECT count(*) FROM session_links").fetchone()[0]
        turns = db.execute("SELECT count(*) FROM session_turns").fetchone()[0]
    assert links == 0
    assert turns == 1


def unavailable_backend(kind: str, tmp_path: Path) -> Backend:
    if kind == "redis":
        return Backend("redis", tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    # A file where the state folder should be makes the SQLite file impossible to create.
    (tmp_path / "state").write_text("not a folder")
    return Backend("sqlite", tmp_path, None)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_store_failure_falls_back_to_new_session(kind, tmp_path):
    backend = unavailable_backend(kind, tmp_path)
    explicit = str(uuid.uuid4())

    async def scenario():
        resolver = backend.resolver()
        _, history = await chat_turn(resolver, [], "one")
        follow_up = await resolve(
            resolver, {"messages": [*history, {"role": "user", "content": "2"}]}
        )
        headed = await resolve(resolver, {}, header=explicit)
        await resolver.close()
        return follow_up, headed

    follow_up, headed = asyncio.run(scenario())

    assert follow_up.source == SOURCE_NEW
    assert follow_up.turn == 1
    assert headed.session_id == explicit
    assert headed.turn == 1
