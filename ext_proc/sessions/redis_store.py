"""The shared session store on Redis, for gateways that run on more than one host.

Every key carries a TTL, so Redis drops expired state by itself. A turn is ``INCR`` plus
``PEXPIRE`` in one MULTI/EXEC transaction, which is atomic and slides the expiry. Each
method costs one round trip.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import redis.asyncio as redis_asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from .store import LINK_FINGERPRINT, LINK_RESPONSE, LINK_USER, LinkedSessions, StoreError

KEY_PREFIX = "xenovia:session"
DEFAULT_SOCKET_TIMEOUT_SECONDS = 1.0
# One quick retry reconnects a pooled connection the server closed while idle. The
# redis-py 8.1 default (10 retries, up to 1 s apart) would hold a request for seconds.
_RETRIES = 1
_RETRY_BACKOFF_BASE_SECONDS = 0.01
_RETRY_BACKOFF_CAP_SECONDS = 0.05
_TURN = "turn"


def session_key(proxy_id: str, kind: str, value: str) -> str:
    # The length prefix keeps a proxy id that contains ':' from reaching another proxy's keys.
    return f"{KEY_PREFIX}:{len(proxy_id)}:{proxy_id}:{kind}:{value}"


@contextlib.contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StoreError(f"session store {operation} failed: {exc}") from exc


class RedisSessionStore:
    """Session state in Redis, with one lazily created client per process."""

    def __init__(
        self,
        url: str,
        ttl_seconds: float,
        *,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT_SECONDS,
    ) -> None:
        self._url = url
        self._ttl_ms = max(1, int(ttl_seconds * 1000))
        self._socket_timeout = socket_timeout
        self._client: redis_asyncio.Redis | None = None
        self._client_pid: int | None = None

    def _redis(self) -> redis_asyncio.Redis:
        # A client created before fork() shares its sockets with the parent; start afresh.
        if self._client is None or self._client_pid != os.getpid():
            self._client = redis_asyncio.Redis.from_url(
                self._url,
                decode_responses=True,
                socket_timeout=self._socket_timeout,
                socket_connect_timeout=self._socket_timeout,
                retry=Retry(
                    ExponentialWithJitterBackoff(
                        cap=_RETRY_BACKOFF_CAP_SECONDS, base=_RETRY_BACKOFF_BASE_SECONDS
                    ),
                    _RETRIES,
                ),
            )
            self._client_pid = os.getpid()
        return self._client

    async def find_links(
        self,
        proxy_id: str,
        *,
        response_id: str | None,
        user_ref: str | None,
        fingerprint: str | None,
    ) -> LinkedSessions:
        lookups = {
            LINK_RESPONSE: response_id,
            LINK_USER: user_ref,
            LINK_FINGERPRINT: fingerprint,
        }
        present = [kind for kind, link in lookups.items() if link is not None]
        if not present:
            return LinkedSessions()

        with _translate_errors("lookup"):
            pipe = self._redis().pipeline(transaction=False)
            for kind in present:
                key = session_key(proxy_id, kind, lookups[kind])
                if kind == LINK_USER:
                    pipe.getex(key, px=self._ttl_ms)
                else:
                    pipe.get(key)
            found = dict(zip(present, await pipe.execute(), strict=True))
        return LinkedSessions(
            by_response=found.get(LINK_RESPONSE),
            by_user=found.get(LINK_USER),
            by_fingerprint=found.get(LINK_FINGERPRINT),
        )

    async def bind_user(self, proxy_id: str, user_ref: str, session_id: str) -> str:
        key = session_key(proxy_id, LINK_USER, user_ref)
        with _translate_errors("user bind"):
            pipe = self._redis().pipeline(transaction=True)
            pipe.set(key, session_id, nx=True, px=self._ttl_ms)
            pipe.get(key)
            _, bound = await pipe.execute()
        return bound or session_id

    async def next_turn(self, proxy_id: str, session_id: str) -> int:
        key = session_key(proxy_id, _TURN, session_id)
        with _translate_errors("turn increment"):
            pipe = self._redis().pipeline(transaction=True)
            pipe.incr(key)
            pipe.pexpire(key, self._ttl_ms)
            turn, _ = await pipe.execute()
        return int(turn)

    async def record_links(
        self,
        proxy_id: str,
        session_id: str,
        *,
        response_ids: list[str],
        fingerprint: str | None,
    ) -> None:
        keys = [session_key(proxy_id, LINK_RESPONSE, response_id) for response_id in response_ids]
        if fingerprint is not None:
            keys.append(session_key(proxy_id, LINK_FINGERPRINT, fingerprint))
        if not keys:
            return
        with _translate_errors("link record"):
            pipe = self._redis().pipeline(transaction=False)
            for key in keys:
                pipe.set(key, session_id, px=self._ttl_ms)
            await pipe.execute()

    async def purge_expired(self) -> int:
        # Every key has a TTL, so Redis has nothing left to purge.
        return 0

    async def close(self) -> None:
        if self._client is not None and self._client_pid == os.getpid():
            with _translate_errors("close"):
                await self._client.aclose()
        self._client = None
        self._client_pid = None
