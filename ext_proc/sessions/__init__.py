"""Session resolution for the ext_proc workers.

Usage, from a worker's event loop::

    resolver = make_session_resolver(home, os.environ.get("XENOVIA_REDIS_URL"))
    session = await resolver.resolve(
        proxy_id=proxy_id,
        key_id=key_id,
        header_session_id=header_value,
        request_type="chat_completions",
        body=request_json,
    )
    ...  # forward the request, set X-Xenovia-Session-Id to session.session_id
    await resolver.record_answer(
        proxy_id=proxy_id,
        key_id=key_id,
        session_id=session.session_id,
        request_type="chat_completions",
        body=request_json,
        response_id=response_json["id"],
        assistant_message=response_json["choices"][0]["message"],
    )
    await resolver.close()
"""

from __future__ import annotations

import os
from pathlib import Path

from .fingerprint import message_fingerprint
from .redis_store import RedisSessionStore
from .resolver import (
    SOURCE_FINGERPRINT,
    SOURCE_HEADER,
    SOURCE_NEW,
    SOURCE_PREVIOUS_RESPONSE,
    SOURCE_USER,
    ResolvedSession,
    SessionResolver,
)
from .sqlite_store import SqliteSessionStore
from .store import StoreError

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "SOURCE_FINGERPRINT",
    "SOURCE_HEADER",
    "SOURCE_NEW",
    "SOURCE_PREVIOUS_RESPONSE",
    "SOURCE_USER",
    "ResolvedSession",
    "SessionResolver",
    "StoreError",
    "make_session_resolver",
    "message_fingerprint",
    "sqlite_path",
]

DEFAULT_TTL_SECONDS = 1800


def sqlite_path(home: str | os.PathLike) -> Path:
    return Path(home) / "state" / "sessions.sqlite3"


def make_session_resolver(
    home: str | os.PathLike,
    redis_url: str | None = None,
    ttl_seconds: int = DEFAULT_TTL_SECONDS,
) -> SessionResolver:
    """Create a resolver on Redis when ``redis_url`` is given, else on the SQLite file in ``home``.

    The caller reads ``XENOVIA_REDIS_URL``; this function does not look at the environment.
    ``ttl_seconds`` is the sliding expiry of every session, turn counter and link. Nothing
    connects until the first call, so the resolver may be created before worker processes fork.
    """
    if redis_url:
        return SessionResolver(RedisSessionStore(redis_url, ttl_seconds))
    return SessionResolver(SqliteSessionStore(sqlite_path(home), ttl_seconds))
