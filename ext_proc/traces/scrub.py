"""Removal of credentials and PII from the text the collector stores.

Secrets are removed from every trace whatever the policy says: gateway keys (``xe_...``),
``Bearer`` tokens, and keys in the formats that OpenAI, Anthropic, AWS, Google, Groq,
GitHub and Slack issue. PII kinds (email, ssn) are removed with ``ext_proc.redaction``.
"""

from __future__ import annotations

import re

from ext_proc.redaction import (
    JSON_ESCAPE_BEFORE,
    LOOKALIKE_CHARACTERS,
    REDACTION_KINDS,
    decode_unicode_escapes,
    fold_lookalikes,
    redact_text,
)

SECRET_MARK = "[REDACTED_SECRET]"

# Each alternative needs a run of key characters long enough that ordinary words
# ("sk-learn", "xe_id") are left alone. A key may also start right after a JSON escape
# ("\\n", "\\u0001"), because stored messages are JSON text.
_SECRET_RE = re.compile(
    r"(?:(?<![A-Za-z0-9_-])|" + JSON_ESCAPE_BEFORE + r")(?:"
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
_BEARER_RE = re.compile(r"(?i)(?:\b|" + JSON_ESCAPE_BEFORE + r")(bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
# Cheap pre-checks, several times faster than the patterns above on text without a
# match (the usual case): each matches wherever its pattern could start.
_SECRET_HINT = re.compile(
    r"[xsAgBb](?:e_|k-|KIA|Iza|sk_|h[pousr]_|ithub_pat_|ox[abprs]-|[Ee][Aa][Rr][Ee][Rr]\s)"
)
_DASHED_PAIR = re.compile(r"-\d\d-")


# The byte check runs on a folded copy of the UTF-8 data: ASCII letters lowercased, ASCII
# digits and the first byte of each multi-byte character turned into "0", and the other
# bytes of multi-byte characters removed. The secret, email and SSN patterns are made of
# ASCII characters and digits (Python's \d takes any Unicode digit, which folds to "0"),
# so each hint below matches the folded copy wherever such a pattern could match the
# original. Folding only adds matches, which are allowed. Each hint starts with a literal,
# which lets the regex engine skip ahead quickly.
def _folded_byte(byte: int) -> int:
    if byte >= 0xC0 or ord("0") <= byte <= ord("9"):
        return ord("0")
    return ord(chr(byte).lower()) if byte < 0x80 else byte


_FOLD = bytes(_folded_byte(byte) for byte in range(256))
_FOLD_DROP = bytes(range(0x80, 0xC0))
_FOLDED_HINTS = (
    re.compile(rb"_(?:(?<=xe_)|(?<=sk_)|(?<=gh[pousr]_)|(?<=_pat_))"),
    re.compile(rb"sk-"),
    re.compile(rb"xox[abprs]-"),
    re.compile(rb"bearer"),
)
# Searched in the original data, because "a" is too common a byte to start a hint on the
# folded copy.
_AWS_GOOGLE_BYTES = re.compile(rb"A(?:KIA|Iza)")
# "@" also occurs in binary framing (inside doubles, say), so an address character must
# come before it and a domain label and a dot after it. The next label may start with a
# digit or be one letter long ("a@mx.1.example.com"), so only its first character is asked for.
_EMAIL_FOLDED = re.compile(rb"@(?<=[a-z0._%+-]@)[a-z0-]{1,63}\.[a-z0-]")
_SSN_FOLDED = re.compile(rb"-00-0000")
# Any \uXXXX escape may hide part of a match, which ``scrub`` finds in a decoded copy.
_UNICODE_ESCAPE_FOLDED = b"\\u"


# Look-alikes of "@", "." and "-" (see ``redaction.fold_lookalikes``) fold to "0" above, so
# they are searched in the original data. A dash look-alike counts only next to a digit or
# another non-ASCII character, because dashes between words are common in prose. The
# search is a plain alternation of byte strings, which the regex engine scans quickly.
def _encoded(characters) -> list[bytes]:
    return [character.encode() for character in sorted(characters)]


_SEPARATOR_LOOKALIKES = _encoded(
    character for character in LOOKALIKE_CHARACTERS if fold_lookalikes(character) in "@."
)
_DASH_LOOKALIKES = frozenset(
    _encoded(character for character in LOOKALIKE_CHARACTERS if fold_lookalikes(character) == "-")
)
_LOOKALIKE_BYTES = re.compile(
    b"|".join(re.escape(encoded) for encoded in [*_SEPARATOR_LOOKALIKES, *sorted(_DASH_LOOKALIKES)])
)


def _has_lookalike(data: bytes) -> bool:
    for match in _LOOKALIKE_BYTES.finditer(data):
        if match.group() not in _DASH_LOOKALIKES:
            return True
        start, end = match.span()
        before = data[start - 1] if start else 0x20
        after = data[end] if end < len(data) else 0x20
        # A digit or the last byte of a multi-byte character before it, a digit or the
        # first byte of a multi-byte character after it.
        if 0x30 <= before <= 0x39 or 0x80 <= before <= 0xBF:
            return True
        if 0x30 <= after <= 0x39 or after >= 0xC0:
            return True
    return False


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
        return bool(_SECRET_HINT.search(text) or self._pii_hinted(text) or "\\u" in text)

    def might_change_bytes(self, data: bytes) -> bool:
        """Return whether ``scrub`` could change a string inside UTF-8 ``data``.

        False positives are allowed. ``data`` may be a serialized message, whose framing
        bytes cannot hide a string's content because protobuf stores strings unchanged.
        """
        if self.pii_kinds - _PII_HINTS.keys():
            return True
        if _AWS_GOOGLE_BYTES.search(data):
            return True
        if _has_lookalike(data):
            return True
        folded = data.translate(_FOLD, _FOLD_DROP)
        if _UNICODE_ESCAPE_FOLDED in folded:
            return True
        if any(pattern.search(folded) for pattern in _FOLDED_HINTS):
            return True
        if "email" in self.pii_kinds and _EMAIL_FOLDED.search(folded):
            return True
        return "ssn" in self.pii_kinds and _SSN_FOLDED.search(folded) is not None

    def scrub(self, text: str) -> str:
        """Return ``text`` with secrets and PII replaced by marks.

        A value hidden by JSON ``\\uXXXX`` escapes is found in a decoded copy, and then the
        decoded text is returned (see ``redaction.decode_unicode_escapes``).
        """
        if not text:
            return text
        text = self._scrub_plain(text)
        if "\\u" not in text:
            return text
        decoded = decode_unicode_escapes(text)
        if decoded == text:
            return text
        scrubbed = self._scrub_plain(decoded)
        return scrubbed if scrubbed != decoded else text

    def _scrub_plain(self, text: str) -> str:
        if _SECRET_HINT.search(text):
            text = _SECRET_RE.sub(SECRET_MARK, text)
            text = _BEARER_RE.sub(_bearer_mark, text)
        kinds = self._pii_hinted(text)
        if kinds:
            text, _ = redact_text(text, kinds, decode_escapes=False)
        return text

    def _pii_hinted(self, text: str) -> frozenset[str]:
        text = fold_lookalikes(text)
        return frozenset(
            kind for kind in self.pii_kinds if kind not in _PII_HINTS or _PII_HINTS[kind](text)
        )


def _bearer_mark(match: re.Match) -> str:
    return f"{match.group(1)} {SECRET_MARK}"
