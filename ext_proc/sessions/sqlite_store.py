"""The embedded session store: one SQLite file that every service process on the host shares.

Each statement runs in its own short autocommit transaction in WAL mode, so readers do not
block writers, and a writer waits for another writer at most the busy timeout. Turn increments and link binds
are single ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` statements, which makes them
atomic across processes. Statements take tens of microseconds, so they run inline on the
caller's event loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from .store import LINK_FINGERPRINT, LINK_RESPONSE, LINK_USER, LinkedSessions, StoreError

logger = logging.getLogger(__name__)

# NOTE: a writer that finds the file locked blocks the event loop for up to this long.
DEFAULT_BUSY_TIMEOUT_MS = 1000
DEFAULT_PURGE_EVERY_WRITES = 500
DEFAULT_PURGE_INTERVAL_SECONDS = 60.0
# Rows deleted per table and purge. It is larger than the rows the writes between two
# purges can add, so expired state never piles up, and small enough to keep each delete short.
PURGE_BATCH_ROWS = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS session_turns (
    proxy_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    turn INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (proxy_id, session_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS session_turns_expiry ON session_turns (expires_at);
CREATE TABLE IF NOT EXISTS session_links (
    proxy_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    link TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (proxy_id, kind, link)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS session_links_expiry ON session_links (expires_at);
"""

# An expired counter restarts at 1, so a session id reused after expiry starts over.
_NEXT_TURN = """
INSERT INTO session_turns (proxy_id, session_id, turn, expires_at) VALUES (?1, ?2, 1, ?3)
ON CONFLICT (proxy_id, session_id) DO UPDATE SET
    turn = CASE WHEN session_turns.expires_at <= ?4 THEN 1 ELSE session_turns.turn + 1 END,
    expires_at = excluded.expires_at
RETURNING turn
"""

_FIND_LINK = """
SELECT session_id FROM session_links
WHERE proxy_id = ?1 AND kind = ?2 AND link = ?3 AND expires_at > ?4
"""

# Reading the user link also slides its expiry, in the same statement.
_TOUCH_USER_LINK = f"""
UPDATE session_links SET expires_at = ?3
WHERE proxy_id = ?1 AND kind = '{LINK_USER}' AND link = ?2 AND expires_at > ?4
RETURNING session_id
"""

_BIND_USER = f"""
INSERT INTO session_links (proxy_id, kind, link, session_id, expires_at)
VALUES (?1, '{LINK_USER}', ?2, ?3, ?4)
ON CONFLICT (proxy_id, kind, link) DO UPDATE SET
    session_id = CASE WHEN session_links.expires_at <= ?5
        THEN excluded.session_id ELSE session_links.session_id END,
    expires_at = excluded.expires_at
RETURNING session_id
"""

_UPSERT_LINKS = """
INSERT INTO session_links (proxy_id, kind, link, session_id, expires_at) VALUES {rows}
ON CONFLICT (proxy_id, kind, link) DO UPDATE SET
    session_id = excluded.session_id,
    expires_at = excluded.expires_at
"""

_PURGE = {
    "session_turns": """
        DELETE FROM session_turns WHERE (proxy_id, session_id) IN (
            SELECT proxy_id, session_id FROM session_turns WHERE expires_at <= ?1 LIMIT ?2)
    """,
    "session_links": """
        DELETE FROM session_links WHERE (proxy_id, kind, link) IN (
            SELECT proxy_id, kind, link FROM session_links WHERE expires_at <= ?1 LIMIT ?2)
    """,
}


@contextlib.contextmanager
def _translate_errors(operation: str) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        # OSError: the state folder cannot be created.
        raise StoreError(f"session store {operation} failed: {exc}") from exc


class SqliteSessionStore:
    """Session state in an SQLite file, with one lazily opened connection per process."""

    def __init__(
        self,
        path: str | os.PathLike,
        ttl_seconds: float,
        *,
        busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS,
        purge_every_writes: int = DEFAULT_PURGE_EVERY_WRITES,
        purge_interval_seconds: float = DEFAULT_PURGE_INTERVAL_SECONDS,
    ) -> None:
        self.path = Path(path)
        self._ttl = ttl_seconds
        self._busy_timeout_ms = busy_timeout_ms
        self._purge_every_writes = purge_every_writes
        self._purge_interval = purge_interval_seconds
        self._connection: sqlite3.Connection | None = None
        self._connection_pid: int | None = None
        self._inherited: list[sqlite3.Connection] = []
        self._writes_since_purge = 0
        self._last_purge = time.monotonic()

    def _db(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._connection is not None and self._connection_pid == pid:
            return self._connection
        if self._connection is not None:
            # SQLite forbids using a connection across fork(). Closing it in the child could
            # disturb the parent's file locks, so it is only kept from being collected.
            self._inherited.append(self._connection)
        self._connection = self._open()
        self._connection_pid = pid
        return self._connection

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            connection.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            connection.execute("PRAGMA journal_mode = WAL")
            # With WAL, NORMAL loses at most the last commits on power loss, never integrity.
            connection.execute("PRAGMA synchronous = NORMAL")
            connection.executescript(_SCHEMA)
        except sqlite3.Error:
            connection.close()
            raise
        return connection

    async def find_links(
        self,
        proxy_id: str,
        *,
        response_id: str | None,
        user_ref: str | None,
        fingerprint: str | None,
    ) -> LinkedSessions:
        now = time.time()
        with _translate_errors("lookup"):
            db = self._db()
            by_user = None
            if user_ref is not None:
                row = db.execute(_TOUCH_USER_LINK, (proxy_id, user_ref, now + self._ttl, now))
                by_user = _first_value(row)
                self._note_write()
            return LinkedSessions(
                by_response=self._find(db, proxy_id, LINK_RESPONSE, response_id, now),
                by_user=by_user,
                by_fingerprint=self._find(db, proxy_id, LINK_FINGERPRINT, fingerprint, now),
            )

    @staticmethod
    def _find(
        db: sqlite3.Connection, proxy_id: str, kind: str, link: str | None, now: float
    ) -> str | None:
        if link is None:
            return None
        return _first_value(db.execute(_FIND_LINK, (proxy_id, kind, link, now)))

    async def bind_user(self, proxy_id: str, user_ref: str, session_id: str) -> str:
        now = time.time()
        with _translate_errors("user bind"):
            row = self._db().execute(
                _BIND_USER, (proxy_id, user_ref, session_id, now + self._ttl, now)
            )
            bound = _first_value(row)
        self._note_write()
        return bound

    async def next_turn(self, proxy_id: str, session_id: str) -> int:
        now = time.time()
        with _translate_errors("turn increment"):
            row = self._db().execute(_NEXT_TURN, (proxy_id, session_id, now + self._ttl, now))
            turn = _first_value(row)
        self._note_write()
        return turn

    async def record_links(
        self,
        proxy_id: str,
        session_id: str,
        *,
        response_ids: list[str],
        fingerprint: str | None,
    ) -> None:
        expires_at = time.time() + self._ttl
        links = [(LINK_RESPONSE, response_id) for response_id in response_ids]
        if fingerprint is not None:
            links.append((LINK_FINGERPRINT, fingerprint))
        if not links:
            return
        rows = ", ".join(["(?, ?, ?, ?, ?)"] * len(links))
        params = [
            value
            for kind, link in links
            for value in (proxy_id, kind, link, session_id, expires_at)
        ]
        with _translate_errors("link record"):
            self._db().execute(_UPSERT_LINKS.format(rows=rows), params)
        self._note_write()

    async def purge_expired(self) -> int:
        with _translate_errors("purge"):
            return self._purge()

    def _purge(self) -> int:
        now = time.time()
        db = self._db()
        removed = 0
        for statement in _PURGE.values():
            removed += db.execute(statement, (now, PURGE_BATCH_ROWS)).rowcount
        self._writes_since_purge = 0
        self._last_purge = time.monotonic()
        if removed:
            logger.debug("session store purged %d expired rows from %s", removed, self.path)
        return removed

    def _note_write(self) -> None:
        self._writes_since_purge += 1
        due_by_count = self._writes_since_purge >= self._purge_every_writes
        if not due_by_count and time.monotonic() - self._last_purge < self._purge_interval:
            return
        try:
            self._purge()
        except sqlite3.Error as exc:
            # The next write retries; failing the request that happened to trigger it would
            # turn housekeeping into an outage.
            self._writes_since_purge = 0
            self._last_purge = time.monotonic()
            logger.warning("session store purge failed on %s: %s", self.path, exc)

    async def close(self) -> None:
        if self._connection is not None and self._connection_pid == os.getpid():
            self._connection.close()
        self._connection = None
        self._connection_pid = None


def _first_value(cursor: sqlite3.Cursor):
    # fetchall() steps a RETURNING statement to its end, which is what commits its write.
    rows = cursor.fetchall()
    return rows[0][0] if rows else None
