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
        """Return whether ``scrub`` would change ``text``; one pass over a joined trace."""
        if _SECRET_RE.search(text) or _BEARER_RE.search(text):
            return True
        if not self.pii_kinds:
            return False
        _, counts = redact_text(text, self.pii_kinds)
        return bool(counts)

    def scrub(self, text: str) -> str:
        if not text:
            return text
        text = _SECRET_RE.sub(SECRET_MARK, text)
        text = _BEARER_RE.sub(_bearer_mark, text)
        if self.pii_kinds:
            text, _ = redact_text(text, self.pii_kinds)
        return text


def _bearer_mark(match: re.Match) -> str:
    return f"{match.group(1)} {SECRET_MARK}"
