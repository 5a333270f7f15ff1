"""Compact JSON text of values parsed from request bodies, written with orjson.

orjson writes the same text as ``json.dumps(value, separators=(",", ":"),
ensure_ascii=False)`` for strings, integers within 64 bits, booleans, null, lists and
string-keyed dicts, about ten times faster. Two differences matter here:

- Integers beyond 64 bits raise in orjson, so ``compact`` falls back to the standard
  library for them. ``parse_json_body`` rejects them, so request values never take that
  path; other callers may.
- orjson writes NaN and infinities as ``null``, where the standard library writes ``NaN``,
  which is not JSON. Only pass values from ``openai_api.parse_json_body``, which rejects
  them, or values built from strings. The policy input's ``output`` is encoded with the
  standard library, because tool-call arguments in it are parsed by ``json.loads``, which
  accepts NaN.

Floats can be spelt differently (``1e-7`` for the standard library's ``1e-07``): the same
number either way.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def compact(value: Any) -> str:
    """Return ``value`` as compact JSON text, with non-ASCII characters left unescaped."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def compact_sorted(value: Any) -> str:
    """Return ``value`` as compact JSON text with the keys of every object sorted."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
