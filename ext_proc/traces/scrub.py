"""Removal of credentials and PII from the text the collector stores.

Secrets are removed from every trace whatever the policy says: gateway keys (``xe_...``),
``Bearer`` tokens, and keys in the formats that OpenAI, Anthropic, AWS, Google, Groq,
GitHub and Slack issue. PII kinds (email, ssn) are removed with ``ext_proc.redaction``.
"""

from __future__ import annotations

import re

from ext_proc.redaction import REDACTION_KINDS, redact_text

SECRET_MARK = "[REDACTED_SECRET]"

# Each alternative needs a run of key characters long enough that ordinary words
# ("sk-learn", "xe_id") are left alone.
_SECRET_RE = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"xe_[A-Za-z0-9_-]{8,}"
    r"|sk-[A-Za-z0-9_-]{16,}"
    r"|AKIA[0-9A-Z]{16}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|gsk_[A-Za-z0-9]{20,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r")"
)
_BEARER_RE = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
# Cheap pre-checks, several times faster than the patterns above on text without a
# match (the usual case): each matches wherever its pattern could start.
_SECRET_HINT = re.compile(
    r"[xsAgBb](?:e_|k-|KIA|Iza|sk_|h[pousr]_|ithub_pat_|ox[abprs]-|[Ee][Aa][Rr][Ee][Rr]\s)"
)
_DASHED_PAIR = re.compile(r"-\d\d-")
# Hints on UTF-8 bytes that match wherever a secret, email or SSN pattern could match.
# Each starts with a literal byte, which lets the regex engine skip ahead quickly over a
# whole batch. "\s" after "bearer" is dropped because it would miss Unicode spaces, and an
# SSN digit may be any multi-byte character because Python's \d takes Unicode digits.
_DIGIT_BYTES = rb"(?:[0-9]|[\xc0-\xf7][\x80-\xbf]{1,3})"
_SECRET_BYTES = (
    re.compile(rb"_(?:(?<=xe_)|(?<=sk_)|(?<=gh[pousr]_)|(?<=_pat_))"),
    re.compile(rb"-(?:(?<=sk-)|(?<=xox[abprs]-))"),
    re.compile(rb"A(?:KIA|Iza)"),
)
# "@" also occurs in binary framing, so an address character must come before it.
_EMAIL_BYTES = re.compile(rb"@(?<=[A-Za-z0-9._%+-]@)[A-Za-z0-9-]{1,63}\.[A-Za-z]{2}")
_SSN_BYTES = re.compile(rb"-" + _DIGIT_BYTES + rb"{2}-" + _DIGIT_BYTES + rb"{4}")


def _has_email_hint(text: str) -> bool:
    return "@" in text


def _has_ssn_hint(text: str) -> bool:
    # ddd-dd-dddd around each "-dd-"; dates such as 2024-07-18 fail the four-digit check.
    for match in _DASHED_PAIR.finditer(text):
        start = match.start()
        serial = text[start + 4 : start + 8]
        if (
            start >= 3
            and text[start - 3 : start].isdigit()
            and len(serial) == 4
            and serial.isdigit()
        ):
            return True
    return False


_PII_HINTS = {"email": _has_email_hint, "ssn": _has_ssn_hint}


class Scrubber:
    """Removes secrets, and the configured PII kinds, from strings."""

    def __init__(self, pii_kinds: frozenset[str] = REDACTION_KINDS) -> None:
        unknown = pii_kinds - REDACTION_KINDS
        if unknown:
            raise ValueError(
                f"unknown PII kinds {sorted(unknown)!r}; known kinds: {sorted(REDACTION_KINDS)!r}"
            )
        self.pii_kinds = pii_kinds

    def finds_anything(self, text: str) -> bool:
        """Return whether ``scrub`` could change ``text``; false positives are allowed."""
        return bool(_SECRET_HINT.search(text) or self._pii_hinted(text))

    def might_change_bytes(self, data: bytes) -> bool:
        """Return whether ``scrub`` could change a string inside UTF-8 ``data``.

        False positives are allowed. ``data`` may be a serialized message, whose framing
        bytes cannot hide a string's content because protobuf stores strings unchanged.
        """
        if self.pii_kinds - _PII_HINTS.keys():
            return True
        if any(pattern.search(data) for pattern in _SECRET_BYTES):
            return True
        if b"bearer" in data.lower():
            return True
        if "email" in self.pii_kinds and _EMAIL_BYTES.search(data):
            return True
        return "ssn" in self.pii_kinds and _SSN_BYTES.search(data) is not None

    def scrub(self, text: str) -> str:
        if not text:
            return text
        if _SECRET_HINT.search(text):
            text = _SECRET_RE.sub(SECRET_MARK, text)
            text = _BEARER_RE.sub(_bearer_mark, text)
        kinds = self._pii_hinted(text)
        if kinds:
            text, _ = redact_text(text, kinds)
        return text

    def _pii_hinted(self, text: str) -> frozenset[str]:
        return frozenset(
            kind for kind in self.pii_kinds if kind not in _PII_HINTS or _PII_HINTS[kind](text)
        )


def _bearer_mark(match: re.Match) -> str:
    return f"{match.group(1)} {SECRET_MARK}"
