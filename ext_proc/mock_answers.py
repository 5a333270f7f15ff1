"""
Response bodies of the mock provider (ext_proc.mock_provider), by scenario.

``parse_scenario`` reads the ``x-mock-*`` request headers the mock provider's docstring
lists. Each endpoint function in ``ENDPOINTS`` turns a request body and its scenario into
a JSON document, or for streams into the server-sent events to write, each with whether
it is the content event that ``x-mock-split-event`` splits.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_ANSWER = "Hello from the Xenovia mock provider."
MODEL_DATE_SUFFIX = "-2024-07-18"
SYSTEM_FINGERPRINT = "fp_xenovia_mock"
EMBEDDING_DIMENSIONS = 8
TRUNCATE_AFTER_CONTENT_EVENTS = 2
TOOL_ARGUMENTS_PIECE_CHARS = 8

_DATED_MODEL = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_WORD_PIECE = re.compile(r"\s*\S+")
_ID_PREFIX = "mock" + os.urandom(4).hex()
_id_counter = itertools.count(1)
encode_json = json.JSONEncoder(separators=(",", ":")).encode
_DONE_EVENT = b"data: [DONE]\n\n"
_ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "unknown_url"),
    429: ("requests", "rate_limit_exceeded"),
}
_FLAG_VALUES = frozenset({"1", "true", "yes", "on"})


@dataclass(slots=True)
class Scenario:
    answer: str | None = None
    echo: bool = False
    tool_call: tuple[str, str] | None = None
    status: int | None = None
    no_usage: bool = False
    delay_ms: int | None = None
    chunk_delay_ms: int = 0
    split_event: bool = False
    truncate: bool = False
    raw_event: bytes | None = None
    gzip: bool = False


def parse_scenario(headers: dict[str, str]) -> Scenario:
    """Parse the x-mock-* headers. Raise ValueError on a malformed number."""
    get = headers.get
    scenario = Scenario()
    if (answer := get("x-mock-answer")) is not None:
        # Heads are decoded as latin-1, so this recovers the UTF-8 bytes the client sent.
        scenario.answer = answer.encode("latin-1").decode("utf-8", "replace")
    if tool_call := get("x-mock-tool-call"):
        name, _, arguments = tool_call.partition(";")
        if not name.strip():
            raise ValueError(
                f"invalid x-mock-tool-call header {tool_call!r}: missing function name"
            )
        scenario.tool_call = (name.strip(), arguments.strip() or "{}")
    if status := get("x-mock-status"):
        scenario.status = _parse_int("x-mock-status", status, 300, 599)
    if delay := get("x-mock-delay-ms"):
        scenario.delay_ms = _parse_int("x-mock-delay-ms", delay, 0, 600_000)
    if chunk_delay := get("x-mock-chunk-delay-ms"):
        scenario.chunk_delay_ms = _parse_int("x-mock-chunk-delay-ms", chunk_delay, 0, 600_000)
    scenario.echo = get("x-mock-echo", "").lower() in _FLAG_VALUES
    scenario.no_usage = get("x-mock-no-usage", "").lower() in _FLAG_VALUES
    scenario.split_event = get("x-mock-split-event", "").lower() in _FLAG_VALUES
    scenario.truncate = get("x-mock-truncate", "").lower() in _FLAG_VALUES
    if raw_event := get("x-mock-raw-event"):
        scenario.raw_event = raw_event.replace("\\r", "\r").replace("\\n", "\n").encode()
    scenario.gzip = get("x-mock-gzip", "").lower() in _FLAG_VALUES
    return scenario


def _parse_int(header: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise ValueError(f"invalid {header} header {value!r}: expected an integer {low}..{high}")
    return number


# -- request content ---------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return f"{prefix}{_ID_PREFIX}{next(_id_counter):08x}"


def _served_model(requested: Any) -> str:
    model = requested if isinstance(requested, str) and requested else "gpt-4o-mini"
    return model if _DATED_MODEL.search(model) else model + MODEL_DATE_SUFFIX


def _count_words(value: Any) -> int:
    """Estimate tokens as the whitespace-separated words of message text plus one per token id."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_count_words(item) for item in value)
    if isinstance(value, dict):
        return _count_words(value.get("content")) + _count_words(value.get("text"))
    return 1 if isinstance(value, int) and not isinstance(value, bool) else 0


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = (part.get("text") for part in content if isinstance(part, dict))
        return "\n".join(text for text in parts if isinstance(text, str))
    return ""


def _last_user_text(items: Any) -> str:
    if isinstance(items, str):
        return items
    for item in reversed(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("role") == "user":
            return _text_of(item.get("content"))
    return ""


def echoed_text(raw: bytes) -> str:
    """Return the last user message of a raw chat request, as an error message may quote it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    return _last_user_text(body.get("messages")) if isinstance(body, dict) else ""


def _pick_answer(scenario: Scenario, user_text: Callable[[], str]) -> str:
    if scenario.echo:
        return user_text()
    return DEFAULT_ANSWER if scenario.answer is None else scenario.answer


def _split_words(text: str) -> list[str]:
    """Split text into pieces of one word each, with leading whitespace as OpenAI tokens have."""
    pieces = _WORD_PIECE.findall(text)
    rest = text[sum(map(len, pieces)) :]
    if rest:
        pieces.append(rest)
    return pieces


def _split_arguments(arguments: str) -> list[str]:
    step = TOOL_ARGUMENTS_PIECE_CHARS
    return [arguments[i : i + step] for i in range(0, len(arguments), step)]


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    data = b"data: " + encode_json(payload).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


def invalid_request(message: str) -> tuple[int, dict[str, Any]]:
    logger.warning("rejected invalid request: %s", message)
    return 400, error_body(400, message)


def error_body(status: int, message: str) -> dict[str, Any]:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    error_type, code = _ERROR_KINDS.get(status, (default_type, None))
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return {"error": error}


# -- endpoints: each returns a JSON body, or a list of (SSE event bytes, is_content) pairs -----

Events = list[tuple[bytes, bool]]


def _chat_completions(body: dict[str, Any], scenario: Scenario) -> dict[str, Any] | Events:
    text = _pick_answer(scenario, lambda: _last_user_text(body.get("messages")))
    tool_call = scenario.tool_call
    completion_words = _count_words(tool_call[1]) if tool_call else _count_words(text)
    usage = None if scenario.no_usage else _chat_usage(body.get("messages"), completion_words)
    base = {
        "id": _new_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": _served_model(body.get("model")),
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    call_id = _new_id("call_")
    if body.get("stream"):
        return _chat_events(base, body, text, tool_call, call_id, usage)

    message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
    if tool_call:
        function = {"name": tool_call[0], "arguments": tool_call[1]}
        message["content"] = None
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
    finish = "tool_calls" if tool_call else "stop"
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    response = {**base, "choices": [choice]}
    if usage is not None:
        response["usage"] = usage
    return response


def _chat_usage(messages: Any, completion_tokens: int) -> dict[str, Any]:
    prompt_tokens = _count_words(messages)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _stream_usage_requested(body: dict[str, Any], usage: dict[str, Any] | None) -> bool:
    return usage is not None and bool((body.get("stream_options") or {}).get("include_usage"))


def _chat_events(base, body, text, tool_call, call_id, usage) -> Events:
    base = {**base, "object": "chat.completion.chunk"}
    # OpenAI sends usage only on request, and then every chunk carries "usage": null.
    include_usage = _stream_usage_requested(body, usage)

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = {**base, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return _sse(payload)

    if tool_call:
        name, arguments = tool_call
        function = {"name": name, "arguments": ""}
        first = {"index": 0, "id": call_id, "type": "function", "function": function}
        opening = {"role": "assistant", "content": None, "tool_calls": [first], "refusal": None}
        pieces = [
            {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            for piece in _split_arguments(arguments)
        ]
    else:
        opening = {"role": "assistant", "content": "", "refusal": None}
        pieces = [{"content": piece} for piece in _split_words(text)]
    events = [(chunk(opening), False)]
    events += [(chunk(delta), True) for delta in pieces]
    events.append((chunk({}, "tool_calls" if tool_call else "stop"), False))
    if include_usage:
        events.append((_sse({**base, "choices": [], "usage": usage}), False))
    events.append((_DONE_EVENT, False))
    return events


def _responses(body: dict[str, Any], scenario: Scenario) -> dict[str, Any] | Events:
    text = _pick_answer(scenario, lambda: _last_user_text(body.get("input")))
    tool_call = scenario.tool_call
    if tool_call:
        name, arguments = tool_call
        item = {"id": _new_id("fc_"), "type": "function_call", "status": "completed"}
        item |= {"call_id": _new_id("call_"), "name": name, "arguments": arguments}
        output_words = _count_words(arguments)
    else:
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
        item = {"id": _new_id("msg_"), "type": "message", "status": "completed"}
        item |= {"role": "assistant", "content": [part]}
        output_words = _count_words(text)
    response = {
        "id": _new_id("resp_"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": _served_model(body.get("model")),
        "output": [item],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": None,
        "metadata": body.get("metadata") or {},
    }
    if not scenario.no_usage:
        response["usage"] = _responses_usage(_count_words(body.get("input")), output_words)
    if body.get("stream"):
        return _responses_events(response, item)
    return response


def _responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def _responses_events(response: dict[str, Any], item: dict[str, Any]) -> Events:
    sequence = itertools.count()
    events: Events = []

    def add(kind: str, is_content: bool = False, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        events.append((_sse(payload, event=kind), is_content))

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    add("response.created", response=started)
    add("response.in_progress", response=started)
    where = {"item_id": item["id"], "output_index": 0}
    if item["type"] == "function_call":
        add(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        for piece in _split_arguments(item["arguments"]):
            add("response.function_call_arguments.delta", True, **where, delta=piece)
        add("response.function_call_arguments.done", **where, arguments=item["arguments"])
    else:
        part = item["content"][0]
        add(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "content": []},
        )
        add("response.content_part.added", **where, content_index=0, part={**part, "text": ""})
        for piece in _split_words(part["text"]):
            add(
                "response.output_text.delta",
                True,
                **where,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        add("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
        add("response.content_part.done", **where, content_index=0, part=part)
    add("response.output_item.done", output_index=0, item=item)
    add("response.completed", response=response)
    return events


def _completions(body: dict[str, Any], scenario: Scenario) -> dict[str, Any] | Events:
    prompt = body.get("prompt")
    text = _pick_answer(scenario, lambda: prompt if isinstance(prompt, str) else _text_of(prompt))
    base = {
        "id": _new_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": _served_model(body.get("model")),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    usage = None
    if not scenario.no_usage:
        prompt_tokens, completion_tokens = _count_words(prompt), _count_words(text)
        total = prompt_tokens + completion_tokens
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        usage["total_tokens"] = total

    def choice(piece: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": piece, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    if not body.get("stream"):
        response = {**base, "choices": [choice(text, "stop")]}
        if usage is not None:
            response["usage"] = usage
        return response

    include_usage = _stream_usage_requested(body, usage)
    extra = {"usage": None} if include_usage else {}
    events = [
        (_sse({**base, "choices": [choice(piece, None)]} | extra), True)
        for piece in _split_words(text)
    ]
    events.append((_sse({**base, "choices": [choice("", "stop")]} | extra), False))
    if include_usage:
        events.append((_sse({**base, "choices": [], "usage": usage}), False))
    events.append((_DONE_EVENT, False))
    return events


def _embeddings(body: dict[str, Any], scenario: Scenario) -> dict[str, Any]:
    inputs = body.get("input")
    # A single string and a single token array are one input each.
    if isinstance(inputs, str) or (
        isinstance(inputs, list) and inputs and isinstance(inputs[0], int)
    ):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs:
        raise ValueError("invalid 'input': expected a non-empty string or array")
    dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
    if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
        raise ValueError(f"invalid 'dimensions' {dimensions!r}: expected an integer 1..4096")

    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        vector = _embedding_vector(encode_json(item).encode(), dimensions)
        if as_base64:
            packed = struct.pack(f"<{dimensions}f", *vector)
            embedding: Any = base64.b64encode(packed).decode("ascii")
        else:
            embedding = vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})

    response = {
        "object": "list",
        "data": data,
        "model": body.get("model") or "text-embedding-3-small",
    }
    if not scenario.no_usage:
        tokens = _count_words(inputs)
        response["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return response


def _embedding_vector(seed: bytes, dimensions: int) -> list[float]:
    # Multiples of 1/128 in [-1, 1) survive the float32 round trip of the base64 format exactly.
    return [(byte - 128) / 128 for byte in hashlib.shake_128(seed).digest(dimensions)]


ENDPOINTS: dict[str, Callable[[dict[str, Any], Scenario], dict[str, Any] | Events]] = {
    "chat/completions": _chat_completions,
    "responses": _responses,
    "completions": _completions,
    "embeddings": _embeddings,
}
