"""PII redaction for the kinds a policy may name in its `redact_fields` set."""

import re
from collections.abc import Callable

__all__ = [
    "JSON_ESCAPE_BEFORE",
    "LOOKALIKE_CHARACTERS",
    "REDACTION_KINDS",
    "decode_unicode_escapes",
    "fold_lookalikes",
    "redact_json_strings",
    "redact_text",
]

REDACTION_KINDS = frozenset({"email", "ssn"})

# Look-behind alternatives that let a match start right after a JSON escape. Model text is
# often JSON (tool arguments, stored messages), where a newline is the two characters "\n"
# and a control character is "\u0001". The character before the value is then a letter or
# hex digit, which the "not preceded by" checks would reject.
JSON_ESCAPE_BEFORE = r'(?<=\\[nrtbf"/\\])|(?<=\\u[0-9A-Fa-f]{4})'

# The look-behind lets a match start only at the beginning of a run of address characters,
# so each run is scanned once and a long run of word characters, dots or @ signs stays
# linear. A run may also start after a JSON escape, but not on the escape's letter, so the
# escape stays whole. The local part has no length limit: RFC 5321 allows 64 characters,
# but a reader still sees a longer address, so it is redacted too. A top-level domain is
# letters, or an internationalized one in its ASCII (punycode) form.
_EMAIL_ADDRESS = (
    r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]{1,63}\.){1,8}(?:[A-Za-z]{2,24}|xn--[A-Za-z0-9-]{1,59})"
    r"(?![A-Za-z0-9-])"
)
_EMAIL_RE = re.compile(
    r"(?:(?<![A-Za-z0-9._%+-])(?!(?<=\\)(?:[nrtbf]|u[0-9A-Fa-f]{4}))|"
    + JSON_ESCAPE_BEFORE
    + r")"
    + _EMAIL_ADDRESS
)
# An address that follows another one, joined only by characters a local part may contain
# ("a@b.co.x@d.io"), starts after those characters: the look-behind above rejects it.
_EMAIL_AFTER_ADDRESS_RE = re.compile(_EMAIL_ADDRESS)
_ADDRESS_JOINERS = frozenset("._%+-")

# US SSN as ddd-dd-dddd. The SSA never issues area 000, 666 or 900-999, group 00 or
# serial 0000, so those are treated as other numbers (phone fragments, part numbers).
_SSN_RE = re.compile(
    r"(?:(?<![\d-])|" + JSON_ESCAPE_BEFORE + r")"
    r"(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"
)


# Characters a reader takes for "@", "." or "-", and the fullwidth letters and digits. An
# address or SSN written with them is still one to a reader (or a model), so matching runs
# on a copy where each is replaced by its ASCII twin. The mapping is one character to one,
# so a match in the copy has the same position in the original.
_LOOKALIKE_TARGETS = {
    "@": "\uff20\ufe6b",
    ".": "\u3002\uff0e\uff61\ufe52\u2024",
    "-": "\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63\uff0d",
}
_LOOKALIKE_FOLD = {
    ord(lookalike): target
    for target, lookalikes in _LOOKALIKE_TARGETS.items()
    for lookalike in lookalikes
}
# Fullwidth digits and letters (U+FF10 to U+FF5A) map onto ASCII 0x30 to 0x7A.
_LOOKALIKE_FOLD.update(
    {code: chr(code - 0xFEE0) for code in range(0xFF10, 0xFF5B) if chr(code - 0xFEE0).isalnum()}
)
LOOKALIKE_CHARACTERS = frozenset(chr(code) for code in _LOOKALIKE_FOLD)


def fold_lookalikes(text: str) -> str:
    """Return ``text`` with each look-alike of "@", ".", "-", a digit or a letter made ASCII."""
    if text.isascii():
        return text
    return text.translate(_LOOKALIKE_FOLD)


# Characters of an address's local part, the run that _EMAIL_RE's local part matches.
_LOCAL_PART_CHARACTERS = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-"
)

# Both patterns begin with look-behinds, which keep Python's re from skipping ahead to a
# likely start: a search tries the whole pattern at every position (about 50 ns per
# character). Every match contains a fixed character at a known place ("@" after the local
# part, "-" three characters in), so the span functions below find those characters with
# str.find and try the pattern only where a match could start. ``match(text, start)`` reads
# the characters before ``start``, so the look-behinds decide as in a search, and the spans
# are the ones ``finditer`` returns (tests/test_redaction.py compares them), plus addresses
# joined to the one before them.


def _email_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    position = 0
    previous_end = -1
    while (at := text.find("@", position)) >= 0:
        # A match ends its local part at this "@", so it starts inside the run of local-part
        # characters before it, and not before the previous match ended.
        start = at
        while start > position and text[start - 1] in _LOCAL_PART_CHARACTERS:
            start -= 1
        position = at + 1
        match = None
        if start == previous_end:
            match = _email_after_address(text, start, at)
        if match is None:
            match = _first_email_match(text, start, at)
        if match is not None:
            start = _start_with_joined_local_part(text, match.start(), previous_end)
            spans.append((start, match.end()))
            position = previous_end = match.end()
    return spans


def _start_with_joined_local_part(text: str, start: int, floor: int) -> int:
    # In "a@b.co-c@d.io" the look-ahead rejects "a@b.co" (a domain label may go on with
    # "-"), so the match is "b.co-c@d.io". The "a@" before it is part of the same text
    # and would leave the first local part readable, so the span takes it in.
    floor = max(floor, 0)
    if start - 2 < floor or text[start - 1] != "@":
        return start
    if text[start - 2] not in _LOCAL_PART_CHARACTERS:
        return start
    first = start - 2
    while first > floor and text[first - 1] in _LOCAL_PART_CHARACTERS:
        first -= 1
    return first


def _email_after_address(text: str, start: int, at: int) -> re.Match | None:
    first = start
    while first < at and text[first] in _ADDRESS_JOINERS:
        first += 1
    return _EMAIL_AFTER_ADDRESS_RE.match(text, first) if first < at else None


def _first_email_match(text: str, start: int, at: int) -> re.Match | None:
    for candidate in range(start, at):
        match = _EMAIL_RE.match(text, candidate)
        if match:
            return match
    return None


def _ssn_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    position = 0
    while (dash := text.find("-", position + 3)) >= 0:
        match = _SSN_RE.match(text, dash - 3)
        if match:
            spans.append(match.span())
            position = match.end()
        else:
            position = dash - 2
    return spans


_SPAN_FINDERS: dict[str, Callable[[str], list[tuple[int, int]]]] = {
    "email": _email_spans,
    "ssn": _ssn_spans,
}
_MARKS = {"email": "[REDACTED_EMAIL]", "ssn": "[REDACTED_SSN]"}


def _check_kinds(kinds: frozenset[str]) -> None:
    unknown = kinds - REDACTION_KINDS
    if unknown:
        raise ValueError(
            f"unknown redaction kinds {sorted(unknown)!r}, known: {sorted(REDACTION_KINDS)!r}"
        )


# A maximal run of backslashes before "u" and four hex digits: one backslash is an escape in
# JSON text, and more are the same escape inside JSON text nested in a JSON string (tool
# arguments inside stored messages). A surrogate pair is decoded as one character.
_UNICODE_ESCAPE_RE = re.compile(
    r"(?<!\\)\\+u(?:([dD][89abAB][0-9A-Fa-f]{2})\\+u([dD][c-fC-F][0-9A-Fa-f]{2})"
    r"|([0-9A-Fa-f]{4}))"
)


def _decoded_escape(match: re.Match) -> str:
    high, low, single = match.groups()
    if single is None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
    code = int(single, 16)
    # These must stay escaped for the text to remain valid JSON of the same meaning, and a
    # lone surrogate cannot be encoded as UTF-8.
    if code < 0x20 or code in (0x22, 0x5C) or 0xD800 <= code <= 0xDFFF:
        return match.group()
    return chr(code)


def decode_unicode_escapes(text: str) -> str:
    """Decode the JSON ``\\uXXXX`` escapes in ``text`` that JSON text does not need.

    Escapes of ``"``, backslash, control characters and lone surrogates are kept, so valid
    JSON text stays valid. A one-backslash escape keeps the value the same. A run of several
    backslashes before ``u`` (an escape in JSON text nested in a JSON string) is decoded too,
    which changes the outer string but not the value of the nested JSON text.
    """
    if "\\u" not in text:
        return text
    return _UNICODE_ESCAPE_RE.sub(_decoded_escape, text)


def _redact_plain(text: str, kinds: frozenset[str], counts: dict[str, int]) -> str:
    folded = fold_lookalikes(text)
    if folded is not text and folded != text:
        return _redact_folded(text, folded, kinds, counts)
    for kind in kinds:
        spans = _SPAN_FINDERS[kind](text)
        if spans:
            counts[kind] = counts.get(kind, 0) + len(spans)
            text = _replace_spans(text, spans, _MARKS[kind])
    return text


def _redact_folded(text: str, folded: str, kinds: frozenset[str], counts: dict[str, int]) -> str:
    """Redact ``text`` where its folded copy matches; both change in step, so spans stay aligned."""
    for kind in sorted(kinds):
        spans = _SPAN_FINDERS[kind](folded)
        if not spans:
            continue
        counts[kind] = counts.get(kind, 0) + len(spans)
        text = _replace_spans(text, spans, _MARKS[kind])
        folded = _replace_spans(folded, spans, _MARKS[kind])
    return text


def _replace_spans(text: str, spans: list[tuple[int, int]], mark: str) -> str:
    parts = []
    position = 0
    for start, end in spans:
        parts.append(text[position:start])
        parts.append(mark)
        position = end
    parts.append(text[position:])
    return "".join(parts)


def _redact(text: str, kinds: frozenset[str], counts: dict[str, int]) -> str:
    text = _redact_plain(text, kinds, counts)
    if "\\u" not in text:
        return text
    # A value written with escapes ("bob\u0040example.com") is the value itself to anyone
    # who parses the JSON, so it is matched in a decoded copy. The decoded text is returned
    # only when it had a match, so escapes in other text are left as they are.
    decoded = decode_unicode_escapes(text)
    if decoded == text:
        return text
    found: dict[str, int] = {}
    redacted = _redact_plain(decoded, kinds, found)
    if not found:
        return text
    for kind, count in found.items():
        counts[kind] = counts.get(kind, 0) + count
    return redacted


def redact_text(
    text: str, kinds: frozenset[str], decode_escapes: bool = True
) -> tuple[str, dict[str, int]]:
    """
    Replace every match of the given kinds in `text` with `[REDACTED_EMAIL]` or `[REDACTED_SSN]`.

    With `decode_escapes`, a value hidden by JSON `\\uXXXX` escapes is found as well, and the
    returned text then has those escapes decoded (see `decode_unicode_escapes`). Returns the
    new text and the number of replacements per kind (kinds with no match are left out).
    Raises ValueError for a kind outside REDACTION_KINDS.
    """
    _check_kinds(kinds)
    counts: dict[str, int] = {}
    if decode_escapes:
        return _redact(text, kinds, counts), counts
    return _redact_plain(text, kinds, counts), counts


def redact_json_strings(value: object, kinds: frozenset[str]) -> tuple[object, dict[str, int]]:
    """
    Redact every string inside a parsed JSON value (dicts, lists, strings, scalars).

    Returns a new value of the same shape and the replacement counts per kind. Object keys are
    kept as they are: only values are redacted.
    """
    _check_kinds(kinds)
    counts: dict[str, int] = {}
    if not kinds:
        return value, counts
    return _walk(value, kinds, counts), counts


def _walk(value: object, kinds: frozenset[str], counts: dict[str, int]) -> object:
    if isinstance(value, str):
        return _redact(value, kinds, counts)
    if isinstance(value, dict):
        return {key: _walk(item, kinds, counts) for key, item in value.items()}
    if isinstance(value, list):
        return [_walk(item, kinds, counts) for item in value]
    return value
