"""API keys: ``xe_`` plus 32 random bytes, stored only as a SHA-256 hash.

A key carries enough entropy that a fast hash is safe to store, so lookups hash the
presented key once and compare the digests in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "xe_"
KEY_RANDOM_BYTES = 32
# base64url of 32 bytes without padding is 43 characters; longer keys are accepted so
# that keys minted with more entropy later keep working.
_KEY_PATTERN = re.compile(r"xe_[A-Za-z0-9_-]{43,128}")


def generate_key() -> str:
    raw = secrets.token_bytes(KEY_RANDOM_BYTES)
    return KEY_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def is_well_formed(key: str) -> bool:
    return _KEY_PATTERN.fullmatch(key) is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def digests_equal(left: str, right: str) -> bool:
    return hmac.compare_digest(left.encode(), right.encode())


def key_fingerprint(key_hash: str) -> str:
    """Return the part of a key's SHA-256 that logs may show (8 hex characters)."""
    return key_hash[:8]
