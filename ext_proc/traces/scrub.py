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
# digits and the first byte of each multi-byte character turned into "0" (three first
# bytes become marks instead, see below), and the other bytes of multi-byte characters
# removed. The secret, email and SSN patterns are made of
# ASCII characters and digits (Python's \d takes any Unicode digit, which folds to "0"),
# so each hint below matches the folded copy wherever such a pattern could match the
# original. Folding only adds matches, which are allowed. Each hint starts with a literal,
# which lets the regex engine skip ahead quickly.
#
# Look-alikes of "@", "." and "-" and the fullwidth letters and digits (see
# ``redaction.fold_lookalikes``) start with one of three bytes, which fold to marks of their
# own: 0xEF (fullwidth forms) to "~", 0xE2 and 0xE3 (dashes, full stops, and much other
# punctuation and kana) to "^". The hints accept a mark where such a character could stand.
_FULLWIDTH_LEAD = 0xEF
_PUNCTUATION_LEADS = (0xE2, 0xE3)
if {character.encode()[0] for character in LOOKALIKE_CHARACTERS} - {
    _FULLWIDTH_LEAD,
    *_PUNCTUATION_LEADS,
}:
    raise RuntimeError("a look-alike character starts with a byte the folded hints do not mark")


def _folded_byte(byte: int) -> int:
    if byte == _FULLWIDTH_LEAD:
        return ord("~")
    if byte in _PUNCTUATION_LEADS:
        return ord("^")
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
# come before it and a domain label and a dot after it. A dash or full-stop look-alike
# ("^") may stand wherever "-" or "." may. The next label may start with a digit or be
# one letter long ("a@mx.1.example.com"), so only its first character is asked for.
# One pattern per character that may stand for "@" (or "-"), each starting with it: a
# pattern that starts with a character class is scanned about ten times slower.
_EMAIL_FOLDED = tuple(
    re.compile(at + rb"(?<=[a-z0~^._%+-]" + at + rb")[a-z0~^-]{1,63}[.^~][a-z0~^-]")
    for at in (rb"@", rb"~")
)
_SSN_FOLDED = tuple(
    re.compile(dash + rb"[0~]{2}[-^~][0~]{4}") for dash in (rb"-", rb"\^", rb"~")
)
# Any \uXXXX escape may hide part of a match, which ``scrub`` finds in a decoded copy.
_UNICODE_ESCAPE_FOLDED = b"\\u"


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
        folded = data.translate(_FOLD, _FOLD_DROP)
        if _UNICODE_ESCAPE_FOLDED in folded:
            return True
        if any(pattern.search(folded) for pattern in _FOLDED_HINTS):
            return True
        if "email" in self.pii_kinds and any(hint.search(folded) for hint in _EMAIL_FOLDED):
            return True
        return "ssn" in self.pii_kinds and any(hint.search(folded) for hint in _SSN_FOLDED)

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
