"""
OpenAI-compatible fake LLM provider for the tests, the benchmark and the `make run` demo.

It speaks HTTP/1.1 (keep-alive, Content-Length and chunked bodies) on asyncio streams alone, so
the bytes and the write boundaries of every response are under our control. It serves POST
`.../v1/chat/completions`, `.../v1/responses`, `.../v1/embeddings` and `.../v1/completions`
under any path prefix and returns 404 in the OpenAI error shape for anything else.

Request headers select a scenario per request:

    x-mock-answer: TEXT            reply with TEXT instead of DEFAULT_ANSWER
    x-mock-echo: 1                 reply with the text of the last user message
    x-mock-tool-call: NAME[;ARGS]  reply with a call of function NAME (ARGS: JSON text, default {})
    x-mock-status: CODE            fail with HTTP status CODE (300-599) and an OpenAI error body
                                   (with x-mock-echo, its message quotes the last user message)
    x-mock-no-usage: 1             leave usage out (streams also lose their usage chunk)
    x-mock-delay-ms: N             wait N ms before the first byte
    x-mock-chunk-delay-ms: N       wait N ms between stream events
    x-mock-split-event: 1          write the first content event of a stream in two flushed writes
    x-mock-truncate: 1             end a stream cleanly after two content events, without [DONE]
    x-mock-raw-event: TEXT         send TEXT as its own chunk before a stream's first event, with
                                   the escapes \\r and \\n turned into CR and LF
    x-mock-gzip: 1                 gzip the body (streams get one sync flush per event)

Every API request is counted and, unless recording is off, recorded. `GET /_mock/requests`
returns `{"count": N, "requests": [...]}`, `POST /_mock/reset` clears both and
`GET /_mock/health` returns 200. Run it with:

    python -m ext_proc.mock_provider --host 127.0.0.1 --port 0 --port-file /tmp/provider.port
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import gzip
import hashlib
import http
import itertools
import json
import logging
import os
import re
import signal
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ANSWER",
    "MockProvider",
    "MockProviderThread",
    "run_in_thread",
    "start_mock_provider",
]

DEFAULT_ANSWER = "Hello from the Xenovia mock provider."
MODEL_DATE_SUFFIX = "-2024-07-18"
SYSTEM_FINGERPRINT = "fp_xenovia_mock"
DEFAULT_MAX_RECORDED = 1000
DEFAULT_SPLIT_PAUSE_MS = 20
EMBEDDING_DIMENSIONS = 8
TRUNCATE_AFTER_CONTENT_EVENTS = 2
TOOL_ARGUMENTS_PIECE_CHARS = 8
MAX_HEAD_BYTES = 64 * 1024
STARTUP_TIMEOUT_S = 10.0

_DATED_MODEL = re.compile(r"-\d{4}-\d{2}-\d{2}$")
_WORD_PIECE = re.compile(r"\s*\S+")
_ID_PREFIX = "mock" + os.urandom(4).hex()
_id_counter = itertools.count(1)
_encode_json = json.JSONEncoder(separators=(",", ":")).encode
_DONE_EVENT = b"data: [DONE]\n\n"
_ERROR_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "unknown_url"),
    429: ("requests", "rate_limit_exceeded"),
}
_FLAG_VALUES = frozenset({"1", "true", "yes", "on"})


class _BadRequest(Exception):
    """The client sent bytes that are not a valid HTTP/1.1 request."""


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    def to_record(self) -> dict[str, Any]:
        body = self.body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.target, "headers": self.headers, "body": body}


@dataclass(slots=True)
class _Scenario:
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


def _parse_scenario(headers: dict[str, str]) -> _Scenario:
    """Parse the x-mock-* headers. Raise ValueError on a malformed number."""
    get = headers.get
    scenario = _Scenario()
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


def _echoed_text(raw: bytes) -> str:
    """Return the last user message of a raw chat request, as an error message may quote it."""
    try:
        body = json.loads(raw)
    except ValueError:
        return ""
    return _last_user_text(body.get("messages")) if isinstance(body, dict) else ""


def _pick_answer(scenario: _Scenario, user_text: Callable[[], str]) -> str:
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
    data = b"data: " + _encode_json(payload).encode() + b"\n\n"
    return b"event: " + event.encode() + b"\n" + data if event else data


def _invalid_request(message: str) -> tuple[int, dict[str, Any]]:
    logger.warning("rejected invalid request: %s", message)
    return 400, _error_body(400, message)


def _error_body(status: int, message: str) -> dict[str, Any]:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    error_type, code = _ERROR_KINDS.get(status, (default_type, None))
    error = {"message": message, "type": error_type, "param": None, "code": code}
    return {"error": error}


# -- endpoints: each returns a JSON body, or a list of (SSE event bytes, is_content) pairs -----

_Events = list[tuple[bytes, bool]]


def _chat_completions(body: dict[str, Any], scenario: _Scenario) -> dict[str, Any] | _Events:
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


def _chat_events(base, body, text, tool_call, call_id, usage) -> _Events:
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


def _responses(body: dict[str, Any], scenario: _Scenario) -> dict[str, Any] | _Events:
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


def _responses_events(response: dict[str, Any], item: dict[str, Any]) -> _Events:
    sequence = itertools.count()
    events: _Events = []

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


def _completions(body: dict[str, Any], scenario: _Scenario) -> dict[str, Any] | _Events:
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


def _embeddings(body: dict[str, Any], scenario: _Scenario) -> dict[str, Any]:
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
        vector = _embedding_vector(_encode_json(item).encode(), dimensions)
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


_ENDPOINTS: dict[str, Callable[[dict[str, Any], _Scenario], dict[str, Any] | _Events]] = {
    "chat/completions": _chat_completions,
    "responses": _responses,
    "completions": _completions,
    "embeddings": _embeddings,
}


# -- HTTP/1.1 ---------------------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """Read one request, or return None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("connection closed before the end of the request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest(f"request head is larger than {MAX_HEAD_BYTES} bytes") from exc
    lines = head.decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise _BadRequest(f"invalid request line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(f"invalid header line {line!r}")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    return _Request(request_line[0], request_line[1], request_line[2], headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked_body(reader)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest(f"invalid content-length {headers['content-length']!r}") from exc
    return await reader.readexactly(length) if length > 0 else b""


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError as exc:
            raise _BadRequest(f"invalid chunk size line {size_line!r}") from exc
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields carry nothing the mock uses
    return b"".join(parts)


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


class _Output:
    """Writes one response, either with a Content-Length body or as a chunked event stream."""

    __slots__ = ("_close", "_compressor", "_gzip", "_writer")

    def __init__(self, writer: asyncio.StreamWriter, gzip_body: bool, close: bool) -> None:
        self._writer = writer
        self._gzip = gzip_body
        self._close = close
        self._compressor: Any = None

    def _head(self, status: int, content_type: bytes, framing: bytes) -> bytes:
        head = _status_line(status) + b"content-type: " + content_type + b"\r\n" + framing
        if self._gzip:
            head += b"content-encoding: gzip\r\n"
        return head + (b"connection: close\r\n\r\n" if self._close else b"\r\n")

    async def send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = _encode_json(payload).encode()
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
        framing = b"content-length: %d\r\n" % len(body)
        self._writer.write(self._head(status, b"application/json", framing) + body)
        await self._writer.drain()

    async def start_stream(self) -> None:
        if self._gzip:
            self._compressor = zlib.compressobj(wbits=31)  # 31 selects the gzip container
        framing = b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
        self._writer.write(self._head(200, b"text/event-stream; charset=utf-8", framing))

    async def send_chunk(self, data: bytes) -> None:
        """Write data as one HTTP chunk in one write, flushed through gzip when enabled."""
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self._writer.drain()

    async def end_stream(self) -> None:
        tail = self._compressor.flush() if self._compressor is not None else b""
        framed_tail = b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b""
        self._writer.write(framed_tail + b"0\r\n\r\n")
        await self._writer.drain()


async def _send_events(out: _Output, events: _Events, scenario: _Scenario, split_pause_s: float):
    await out.start_stream()
    if scenario.raw_event is not None:
        await out.send_chunk(scenario.raw_event)
    content_sent = 0
    for position, (data, is_content) in enumerate(events):
        if scenario.truncate and content_sent >= TRUNCATE_AFTER_CONTENT_EVENTS:
            break
        if scenario.chunk_delay_ms and position:
            await asyncio.sleep(scenario.chunk_delay_ms / 1000)
        if is_content and content_sent == 0 and scenario.split_event:
            middle = len(data) // 2
            await out.send_chunk(data[:middle])
            await asyncio.sleep(split_pause_s)
            await out.send_chunk(data[middle:])
        else:
            await out.send_chunk(data)
        content_sent += is_content
    await out.end_stream()


def _wants_close(request: _Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" not in connection
    return "close" in connection


# -- server -----------------------------------------------------------------------------------


class MockProvider:
    """
    A running mock provider on an asyncio event loop. Create it with `start_mock_provider`.

    `requests` lists the recorded API requests (method, full path, lower-cased headers, body
    text), oldest first, and `request_count` counts API requests even when recording is off.
    """

    def __init__(
        self,
        *,
        latency_ms: int = 0,
        require_key: str | None = None,
        record: bool = True,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        split_pause_ms: int = DEFAULT_SPLIT_PAUSE_MS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.request_count = 0
        # Serves https with this server context, to test providers behind TLS.
        self._tls = tls
        self._latency_ms = latency_ms
        self._expected_authorization = f"Bearer {require_key}" if require_key else None
        self._record = record
        self._recorded: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_recorded)
        self._split_pause_s = split_pause_ms / 1000
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        # deque.copy runs in C under the GIL, so a reader in another thread gets a consistent list.
        return list(self._recorded.copy())

    def reset(self) -> None:
        self._recorded.clear()
        self.request_count = 0

    async def listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, ssl=self._tls
        )
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        logger.info("mock provider listening on %s", self.base_url)

    async def close(self) -> None:
        """Stop listening and drop open connections, including any response still being sent."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        logger.info("mock provider on port %d stopped", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader, writer)
                except _BadRequest as exc:
                    await _Output(writer, False, True).send_json(*_invalid_request(str(exc)))
                    break
                if request is None:
                    break
                close = _wants_close(request)
                await self._dispatch(request, writer, close)
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client disconnected mid-request, so no response can be sent
        except asyncio.CancelledError:
            # close() cancels open connections. Ending normally keeps asyncio's stream callback
            # from logging the cancellation as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _dispatch(self, request: _Request, writer: asyncio.StreamWriter, close: bool):
        path = request.target.split("?", 1)[0]
        if path.startswith("/_mock/"):
            await self._control(request.method, path, _Output(writer, False, close))
            return
        self.request_count += 1
        if self._record:
            self._recorded.append(request.to_record())
        try:
            scenario = _parse_scenario(request.headers)
        except ValueError as exc:
            await _Output(writer, False, close).send_json(*_invalid_request(str(exc)))
            return
        out = _Output(writer, scenario.gzip, close)

        delay_ms = self._latency_ms if scenario.delay_ms is None else scenario.delay_ms
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        status, result = self._answer(request, path, scenario)
        if isinstance(result, list):
            await _send_events(out, result, scenario, self._split_pause_s)
        else:
            await out.send_json(status, result)

    def _answer(self, request: _Request, path: str, scenario: _Scenario):
        """Return (status, JSON body) or (200, stream events) for an API request."""
        expected = self._expected_authorization
        if expected and request.headers.get("authorization") != expected:
            return 401, _error_body(401, "Incorrect API key provided.")
        _, marker, endpoint = path.rpartition("/v1/")
        handler = _ENDPOINTS.get(endpoint.rstrip("/")) if marker else None
        if handler is None or request.method != "POST":
            return 404, _error_body(404, f"Invalid URL ({request.method} {path})")
        if scenario.status is not None:
            message = f"Mock provider error {scenario.status} requested by x-mock-status."
            if scenario.echo:
                message += f" Request: {_echoed_text(request.body)}"
            return scenario.status, _error_body(scenario.status, message)
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _invalid_request("invalid request body: expected a JSON object")
        try:
            return 200, handler(body, scenario)
        except ValueError as exc:
            return _invalid_request(str(exc))

    async def _control(self, method: str, path: str, out: _Output) -> None:
        if method == "GET" and path == "/_mock/health":
            await out.send_json(200, {"status": "ok"})
        elif method == "GET" and path == "/_mock/requests":
            await out.send_json(200, {"count": self.request_count, "requests": self.requests})
        elif method == "POST" and path == "/_mock/reset":
            self.reset()
            await out.send_json(200, {"status": "ok"})
        else:
            await out.send_json(404, _error_body(404, f"Invalid URL ({method} {path})"))


async def start_mock_provider(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> MockProvider:
    """
    Start a mock provider on the running loop. Port 0 binds a free port.

    Options: latency_ms (delay before every response), require_key (expected bearer key),
    record (keep request records), max_recorded, split_pause_ms (pause of x-mock-split-event),
    tls (an ssl.SSLContext to serve https with).
    """
    provider = MockProvider(**options)
    await provider.listen(host, port)
    return provider


class MockProviderThread:
    """A mock provider on its own event loop in a daemon thread, for synchronous tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.provider: MockProvider | None = None
        self._thread = threading.Thread(
            target=self._run, args=(host, port, options), name="mock-provider", daemon=True
        )
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S):
            raise TimeoutError(f"mock provider did not start within {STARTUP_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def _run(self, host: str, port: int, options: dict[str, Any]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.provider = self._loop.run_until_complete(
                start_mock_provider(host, port, **options)
            )
        except (OSError, TypeError, ValueError) as exc:
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.provider.close())
        self._loop.close()

    @property
    def port(self) -> int:
        return self.provider.port

    @property
    def base_url(self) -> str:
        return self.provider.base_url

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.provider.requests

    @property
    def request_count(self) -> int:
        return self.provider.request_count

    def reset(self) -> None:
        # Clearing a deque and rebinding an int are atomic under the GIL, so no loop hop is needed.
        self.provider.reset()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(**options: Any) -> MockProviderThread:
    """Start a mock provider in a background thread; call `.stop()` on the handle when done."""
    return MockProviderThread(**options)


# -- command line -----------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ext_proc.mock_provider", description="OpenAI-compatible mock LLM provider."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 picks a free port)")
    parser.add_argument("--port-file", type=Path, help="file to write the bound port to")
    parser.add_argument(
        "--latency-ms", type=int, default=0, help="delay before every response, in ms"
    )
    parser.add_argument("--require-key", help="reject requests without 'Authorization: Bearer KEY'")
    parser.add_argument("--no-record", action="store_true", help="count requests, keep no records")
    return parser.parse_args(argv)


async def _serve_until_signal(args: argparse.Namespace) -> None:
    provider = await start_mock_provider(
        args.host,
        args.port,
        latency_ms=args.latency_ms,
        require_key=args.require_key,
        record=not args.no_record,
    )
    if args.port_file:
        # Write then rename, so a process polling the file never reads a partial port number.
        partial = args.port_file.with_name(args.port_file.name + ".tmp")
        partial.write_text(f"{provider.port}\n")
        partial.replace(args.port_file)
    # Parent processes read this exact line from stdout to learn the port.
    print(f"listening on http://{args.host}:{provider.port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await provider.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(_serve_until_signal(_parse_args(argv)))


if __name__ == "__main__":
    main()
