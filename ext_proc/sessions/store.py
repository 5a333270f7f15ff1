"""The storage contract behind session resolution, shared by the SQLite and Redis stores.

A store keeps two kinds of state, each scoped by proxy id and each with an expiry:

- a turn counter per session, incremented atomically, whose expiry slides on every turn;
- links from something a later request carries to the session it belongs to: a response
  id, a user reference (``key_id`` and the ``user`` field, hashed together) or the
  fingerprint of a history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

LINK_RESPONSE = "response"
LINK_USER = "user"
LINK_FINGERPRINT = "fingerprint"


class StoreError(Exception):
    """A session store could not read or write its state; the cause is chained."""


@dataclass(frozen=True)
class LinkedSessions:
    """The sessions a request's links point to; None where a link is absent or unknown."""

    by_response: str | None = None
    by_user: str | None = None
    by_fingerprint: str | None = None


class SessionStore(Protocol):
    async def find_links(
        self,
        proxy_id: str,
        *,
        response_id: str | None,
        user_ref: str | None,
        fingerprint: str | None,
    ) -> LinkedSessions:
        """Look up every given link in one pass and refresh the user link's expiry."""
        ...

    async def bind_user(self, proxy_id: str, user_ref: str, session_id: str) -> str:
        """Link ``user_ref`` to ``session_id`` unless it is linked already.

        Returns the session the user is linked to afterwards, so that concurrent first
        requests from one user agree on a single session.
        """
        ...

    async def next_turn(self, proxy_id: str, session_id: str) -> int:
        """Increment the session's turn counter and return the new value (1 if new or expired)."""
        ...

    async def record_links(
        self,
        proxy_id: str,
        session_id: str,
        *,
        response_ids: list[str],
        fingerprint: str | None,
    ) -> None: ...

    async def purge_expired(self) -> int:
        """Delete expired state the backend does not expire by itself; return the count."""
        ...

    async def close(self) -> None: ...
