"""Session resolution: which session a request belongs to, and its turn in that session.

The first rule that matches wins:

1. the ``X-Xenovia-Session-Id`` header;
2. the Responses API ``previous_response_id``, through the ids of responses recorded earlier;
3. the ``user`` field, linked per API key to the session it first appeared in;
4. the fingerprint of every message but the last, linked per API key to the session whose
   answer produced that history (two clients whose conversations start alike stay apart);
5. a new random UUID.

All state is scoped by proxy id: the same session id or history on two proxies names two
independent sessions.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from dataclasses import dataclass

from .fingerprint import (
    chat_messages,
    history_lookup_fingerprint,
    message_fingerprint,
    responses_messages,
)
from .store import SessionStore, StoreError

logger = logging.getLogger(__name__)

SOURCE_HEADER = "header"
SOURCE_PREVIOUS_RESPONSE = "previous_response_id"
SOURCE_USER = "user"
SOURCE_FINGERPRINT = "fingerprint"
SOURCE_NEW = "new"

REQUEST_CHAT_COMPLETIONS = "chat_completions"
REQUEST_RESPONSES = "responses"
# Only conversational requests carry a history or produce a response worth linking.
_CONVERSATIONAL = frozenset({REQUEST_CHAT_COMPLETIONS, REQUEST_RESPONSES})

ERROR_LOG_INTERVAL_SECONDS = 60.0


@dataclass(frozen=True)
class ResolvedSession:
    session_id: str
    turn: int
    source: str


@dataclass(frozen=True)
class _RequestLinks:
    response_id: str | None
    user_ref: str | None
    fingerprint: str | None


class _ThrottledErrorLog:
    """Log the first store error, then at most one per interval with a count of the rest."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL_SECONDS) -> None:
        self._interval = interval
        self._next_at = 0.0
        self._suppressed = 0
        self.last_error = ""
        self.last_error_at = float("-inf")

    def report(self, operation: str, exc: BaseException) -> None:
        now = time.monotonic()
        self.last_error = f"session {operation} failed: {exc}"[:500]
        self.last_error_at = now
        if now < self._next_at:
            self._suppressed += 1
            return
        if self._suppressed:
            logger.error(
                "%d more session store errors were not logged in the last %.0f s",
                self._suppressed,
                self._interval,
            )
        logger.error(
            "session %s failed, continuing without the session store: %s",
            operation,
            exc,
            exc_info=not isinstance(exc, StoreError),
        )
        self._next_at = now + self._interval
        self._suppressed = 0


# /healthz reports a session store error for this long after it happened.
RECENT_ERROR_SECONDS = 60.0


class SessionResolver:
    """Assign requests to sessions and record the responses that later requests link back to.

    Every method runs on the caller's event loop. Neither ``resolve`` nor ``record_answer``
    raises on a storage failure: both log it, at most once a minute.
    """

    def __init__(self, store: SessionStore) -> None:
        self._store = store
        self._errors = _ThrottledErrorLog()

    def recent_error(self) -> str:
        """Return the last store error of the past minute, or "" when there was none."""
        if time.monotonic() - self._errors.last_error_at > RECENT_ERROR_SECONDS:
            return ""
        return self._errors.last_error

    async def resolve(
        self,
        *,
        proxy_id: str,
        key_id: str,
        header_session_id: str | None,
        request_type: str,
        body: dict | None,
    ) -> ResolvedSession:
        """Return the request's session, its new turn number and the rule that matched."""
        if header_session_id:
            return await self._resolve_explicit(proxy_id, _canonical_uuid(header_session_id))

        body = body if isinstance(body, dict) else {}
        links = _request_links(key_id, request_type, body)
        try:
            session_id, source = await self._find_session(proxy_id, links)
            turn = await self._store.next_turn(proxy_id, session_id)
        except StoreError as exc:
            # NOTE: this session is not stored, so the next request cannot find it again,
            # and its turn is reported as 1.
            self._errors.report("resolution", exc)
            return ResolvedSession(str(uuid.uuid4()), 1, SOURCE_NEW)
        return ResolvedSession(session_id, turn, source)

    async def _resolve_explicit(self, proxy_id: str, session_id: str) -> ResolvedSession:
        try:
            turn = await self._store.next_turn(proxy_id, session_id)
        except StoreError as exc:
            # The client named its session, so only the turn is lost: it is reported as 1.
            self._errors.report("turn increment", exc)
            turn = 1
        return ResolvedSession(session_id, turn, SOURCE_HEADER)

    async def _find_session(self, proxy_id: str, links: _RequestLinks) -> tuple[str, str]:
        found = await self._store.find_links(
            proxy_id,
            response_id=links.response_id,
            user_ref=links.user_ref,
            fingerprint=links.fingerprint,
        )
        if found.by_response is not None:
            return found.by_response, SOURCE_PREVIOUS_RESPONSE
        if found.by_user is not None:
            return found.by_user, SOURCE_USER

        if found.by_fingerprint is not None:
            session_id, source = found.by_fingerprint, SOURCE_FINGERPRINT
        else:
            session_id, source = str(uuid.uuid4()), SOURCE_NEW
        if links.user_ref is None:
            return session_id, source

        # A concurrent request from the same user may have bound it first; join that session.
        bound = await self._store.bind_user(proxy_id, links.user_ref, session_id)
        if bound != session_id:
            return bound, SOURCE_USER
        return session_id, source

    async def record_answer(
        self,
        *,
        proxy_id: str,
        key_id: str,
        session_id: str,
        request_type: str,
        body: dict | None,
        response_id: str | None,
        assistant_message: dict | None,
    ) -> None:
        """Link the answer's id, and the history that ends with it, to ``session_id``.

        ``assistant_message`` is the answer as a chat message (``role``, ``content``,
        optional ``tool_calls``); for the Responses API, its content is the output text.
        Errors are logged and never raised.
        """
        if request_type not in _CONVERSATIONAL:
            return
        try:
            body = body if isinstance(body, dict) else {}
            await self._store.record_links(
                proxy_id,
                session_id,
                response_ids=[response_id] if response_id else [],
                fingerprint=_scoped(
                    key_id, _answer_fingerprint(request_type, body, assistant_message)
                ),
            )
        except Exception as exc:  # noqa: BLE001 - runs after the response; must never raise
            self._errors.report("answer record", exc)

    async def purge_expired(self) -> int:
        """Delete expired state now instead of waiting for the periodic purge; return the count."""
        return await self._store.purge_expired()

    async def close(self) -> None:
        try:
            await self._store.close()
        except StoreError as exc:
            logger.warning("session store close failed: %s", exc)


def _canonical_uuid(value: str) -> str:
    # The caller has validated the header; this only folds case and braces to one spelling.
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return value


def _request_links(key_id: str, request_type: str, body: dict) -> _RequestLinks:
    response_id = None
    if request_type == REQUEST_RESPONSES:
        response_id = _non_empty_string(body.get("previous_response_id"))

    user = _non_empty_string(body.get("user"))
    user_ref = None
    if user is not None:
        # Hashing keeps raw user identifiers out of the store and makes the key unambiguous.
        user_ref = hashlib.sha256(f"{key_id}\0{user}".encode()).hexdigest()

    fingerprint = None
    if request_type in _CONVERSATIONAL:
        history = _request_messages(request_type, body)
        fingerprint = _scoped(key_id, history_lookup_fingerprint(history))
    return _RequestLinks(response_id, user_ref, fingerprint)


def _scoped(key_id: str, fingerprint: str | None) -> str | None:
    # The stored link names the key too, so only the client that recorded a history finds it.
    return None if fingerprint is None else f"{key_id}:{fingerprint}"


def _answer_fingerprint(
    request_type: str, body: dict, assistant_message: dict | None
) -> str | None:
    if not isinstance(assistant_message, dict):
        return None
    # With previous_response_id the input holds only the new turn, not the whole history.
    if request_type == REQUEST_RESPONSES and body.get("previous_response_id"):
        return None
    answer = {"role": "assistant", **assistant_message}
    return message_fingerprint([*_request_messages(request_type, body), answer])


def _request_messages(request_type: str, body: dict) -> list[dict]:
    if request_type == REQUEST_RESPONSES:
        return responses_messages(body)
    return chat_messages(body)


def _non_empty_string(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
