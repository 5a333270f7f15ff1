"""PII redaction for the kinds a policy may name in its `redact_fields` set."""

import re
from collections.abc import Callable

__all__ = ["REDACTION_KINDS", "redact_json_strings", "redact_text"]

REDACTION_KINDS = frozenset({"email", "ssn"})

# The look-behind lets a match start only at the beginning of a run of address characters,
# so each run is scanned once and a long run of word characters, dots or @ signs stays
# linear. The local part has no length limit: RFC 5321 allows 64 characters, but a reader
# still sees a longer address, so it is redacted too.
_EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}"
    r"(?![A-Za-z0-9-])"
)

# US SSN as ddd-dd-dddd. The SSA never issues area 000, 666 or 900-999, group 00 or
# serial 0000, so those are treated as other numbers (phone fragments, part numbers).
_SSN_RE = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")


def _redact_email(text: str) -> tuple[str, int]:
    if "@" not in text:
        return text, 0
    return _EMAIL_RE.subn("[REDACTED_EMAIL]", text)


def _redact_ssn(text: str) -> tuple[str, int]:
    if "-" not in text:
        return text, 0
    return _SSN_RE.subn("[REDACTED_SSN]", text)


_REDACTORS: dict[str, Callable[[str], tuple[str, int]]] = {
    "email": _redact_email,
    "ssn": _redact_ssn,
}


def _check_kinds(kinds: frozenset[str]) -> None:
    unknown = kinds - REDACTION_KINDS
    if unknown:
        raise ValueError(
            f"unknown redaction kinds {sorted(unknown)!r}, known: {sorted(REDACTION_KINDS)!r}"
        )


def _redact(text: str, kinds: frozenset[str], counts: dict[str, int]) -> str:
    for kind in kinds:
        text, found = _REDACTORS[kind](text)
        if found:
            counts[kind] = counts.get(kind, 0) + found
    return text


def redact_text(text: str, kinds: frozenset[str]) -> tuple[str, dict[str, int]]:
    """
    Replace every match of the given kinds in `text` with `[REDACTED_EMAIL]` or `[REDACTED_SSN]`.

    Returns the new text and the number of replacements per kind (kinds with no match are
    left out). Raises ValueError for a kind outside REDACTION_KINDS.
    """
    _check_kinds(kinds)
    counts: dict[str, int] = {}
    return _redact(text, kinds, counts), counts


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
