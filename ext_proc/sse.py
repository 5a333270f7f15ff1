"""Server-sent events: reassembly across network chunks, and the model output they carry."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ext_proc.openai_api import content_part_texts, parse_provider_json


@dataclass
class SseEvent:
    raw: bytes
    event: str = ""
    data: str = ""
    # A line that is neither a comment nor a data, event, id or retry field. Event stream
    # clients ignore it, but a client that reads the body some other way may not.
    unknown_field: bool = False

    @property
    def is_done_marker(self) -> bool:
        return self.data == "[DONE]"

    def json(self) -> dict | None:
        if not self.data or self.is_done_marker:
            return None
        try:
            value = parse_provider_json(self.data)
        except ValueError:
            # An unreadable event (NaN, an unpaired surrogate, nesting too deep, not JSON)
            # makes a governed stream fail closed.
            return None
        return value if isinstance(value, dict) else None


class SseReassembler:
    """Split a byte stream into complete events, keeping a partial event for the next chunk.

    Events end at a blank line, and lines end with CRLF, LF or CR alone, as the
    server-sent events format defines them; clients such as the openai SDK split the
    same way, so the gateway evaluates exactly the events a client will see.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._at_stream_start = True

    @property
    def pending(self) -> bytes:
        return self._pending

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buffer = self._pending + chunk if self._pending else chunk
        if self._at_stream_start:
            # The WHATWG event stream decoder strips one leading UTF-8 BOM, so clients read
            # the first event's fields behind it. A BOM cut across chunks waits for its rest.
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._pending = buffer
                return []
            self._at_stream_start = False
            buffer = buffer.removeprefix(_BOM)
        events = []
        start = 0
        for boundary in _EVENT_BOUNDARY.finditer(buffer):
            events.append(parse_event(buffer[start : boundary.end()]))
            start = boundary.end()
        self._pending = buffer[start:]
        return events


_BOM = b"\xef\xbb\xbf"
# Two line endings in a row; a CR counts alone only when no LF follows it.
_LINE_END = rb"(?:\r\n|\r(?!\n)|\n)"
_EVENT_BOUNDARY = re.compile(_LINE_END + _LINE_END)
_LINE_SPLIT = re.compile(r"\r\n|\r|\n")
# Field names of the event stream format; "data" and "event" may also stand without a colon.
_OTHER_FIELDS = ("data", "event", "id", "retry")


def parse_event(raw: bytes) -> SseEvent:
    event = SseEvent(raw)
    data_lines = []
    for line in _LINE_SPLIT.split(raw.decode("utf-8", "replace")):
        if line.startswith("data:"):
            data_lines.append(line[6:] if line[5:6] == " " else line[5:])
        elif line.startswith("event:"):
            event.event = line[6:].strip()
        elif line and not line.startswith(":") and line.partition(":")[0] not in _OTHER_FIELDS:
            event.unknown_field = True
    event.data = "\n".join(data_lines)
    return event


_RAW_LINE_SPLIT = re.compile(rb"\r\n|\r|\n")


def without_hidden_text(event: SseEvent) -> SseEvent:
    """Return the event without the text a response policy does not see.

    Comment lines are emptied (a bare ":" still keeps an idle stream open), `id` and `retry`
    lines are dropped, and so is an `event` line unless it repeats the data's `type`, as
    Responses streams do. OpenAI's own streams use none of the others, and a client may show
    them: the openai SDK passes an event name along with its data.
    """
    lines_out = []
    changed = False
    data = event.json() if event.event else None
    data_type = data.get("type") if isinstance(data, dict) else None
    for line in _RAW_LINE_SPLIT.split(event.raw.rstrip(b"\r\n")):
        name = line.partition(b":")[0].strip()
        if line.startswith(b":"):
            changed = changed or line != b":"
            lines_out.append(b":")
        elif name in (b"id", b"retry") or (name == b"event" and event.event != data_type):
            changed = True
        else:
            lines_out.append(line)
    if not changed:
        return event
    raw = b"\n".join(lines_out) + b"\n\n"
    event_name = event.event if event.event == data_type else ""
    return SseEvent(raw, event_name, event.data, event.unknown_field)


def make_event(data: dict, event: str = "") -> SseEvent:
    text = json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return SseEvent(f"{prefix}data: {text}\n\n".encode(), event, text)


@dataclass
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""

    def as_input(self) -> dict:
        try:
            arguments = json.loads(self.arguments) if self.arguments else {}
        except ValueError:
            arguments = self.arguments
        return {"id": self.id, "name": self.name, "arguments": arguments}


@dataclass
class ModelOutput:
    """The model's output, assembled from a whole body or from stream events."""

    request_type: str
    # Text of the first choice; other choices (n > 1) are kept apart so that they cannot
    # interleave with it, and policies see them all.
    content_parts: list[str] = field(default_factory=list)
    other_choices: dict[int, list[str]] = field(default_factory=dict)
    # Other text the client reads (refusals, reasoning text), kept out of `content` so that
    # the session store records the content a client sends back. Keyed by where it comes
    # from (choice and field, or output item), so that stream fragments join up.
    other_texts: dict[tuple, list[str]] = field(default_factory=dict)
    # Keyed by (choice index, call index) for chat answers, (0, output index) for Responses.
    tool_calls: dict[tuple[int, int], ToolCall] = field(default_factory=dict)
    finish_reason: str = ""
    usage: dict | None = None
    model_served: str = ""
    response_id: str = ""
    completed: bool = False

    @property
    def content(self) -> str:
        text = "".join(self.content_parts)
        for _, parts in sorted(self.other_choices.items()):
            text += "\n" + "".join(parts)
        return text

    @property
    def readable_text(self) -> str:
        """Return all the text the client reads: the content, then refusals and reasoning."""
        if not self.other_texts:
            return self.content
        others = ["".join(parts) for _, parts in sorted(self.other_texts.items(), key=repr)]
        return "\n".join([self.content, *others])

    def as_input(self) -> dict:
        return {
            "content": self.readable_text,
            "tool_calls": [call.as_input() for _, call in sorted(self.tool_calls.items())],
            "finish_reason": self.finish_reason,
            "usage": self.usage,
            "model": self.model_served,
        }

    def assistant_message(self) -> dict:
        message: dict = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for _, call in sorted(self.tool_calls.items())
            ]
        return message

    # Whole bodies.

    def add_body(self, body: dict) -> None:
        self.response_id = str(body.get("id") or "")
        self.model_served = str(body.get("model") or "")
        if isinstance(body.get("usage"), dict):
            self.usage = body["usage"]
        if self.request_type == "responses":
            self._add_response_object(body)
        elif self.request_type in ("chat_completions", "completions"):
            self._add_choices(body.get("choices"), delta=False)
        self.completed = True

    def _add_choices(self, choices, delta: bool) -> None:
        if not isinstance(choices, list):
            return
        for position, choice in enumerate(choices):
            if isinstance(choice, dict):
                self._add_choice(choice, _index(choice.get("index"), position), delta)

    def _add_choice(self, choice: dict, choice_index: int, delta: bool) -> None:
        parts = self.content_parts if choice_index == 0 else self.other_choices.setdefault(choice_index, [])
        if choice.get("finish_reason") and (choice_index == 0 or not self.finish_reason):
            self.finish_reason = str(choice["finish_reason"])
        if isinstance(choice.get("text"), str):
            parts.append(choice["text"])
        message = choice.get("delta" if delta else "message")
        if not isinstance(message, dict):
            return
        content, other = _message_texts(message)
        parts.extend(content)
        for name, text in other:
            self.other_texts.setdefault((choice_index, name), []).append(text)
        for position, call in enumerate(message.get("tool_calls") or []):
            if isinstance(call, dict):
                # A whole message lists its calls in order; a stream delta names its call's
                # index, which clients use to join the fragments of one call.
                index = _index(call.get("index"), position) if delta else position
                self._add_tool_call_delta(call, (choice_index, index))
        legacy = message.get("function_call")
        if isinstance(legacy, dict):
            # The deprecated single function call of older chat answers.
            self._add_tool_call_delta({"function": legacy}, (choice_index, LEGACY_CALL_INDEX))

    def _add_tool_call_delta(self, call: dict, key: tuple[int, int]) -> None:
        entry = self.tool_calls.setdefault(key, ToolCall())
        if call.get("id"):
            entry.id = str(call["id"])
        # Function calls carry name and arguments; custom tool calls carry name and input.
        function = call.get("function") or call.get("custom")
        function = function if isinstance(function, dict) else {}
        if isinstance(function.get("name"), str):
            # Clients join name fragments the way they join arguments, so the policy must too.
            entry.name += function["name"]
        for field_name in ("arguments", "input"):
            if isinstance(function.get(field_name), str):
                entry.arguments += function[field_name]

    def _add_response_object(self, response: dict) -> None:
        status = response.get("status")
        if status == "completed":
            self.finish_reason = "stop"
        elif status == "incomplete":
            details = response.get("incomplete_details") or {}
            reason = details.get("reason") if isinstance(details, dict) else None
            self.finish_reason = (
                "length" if reason == "max_output_tokens" else str(reason or "incomplete")
            )
        self.content_parts = []
        other_texts: dict[tuple, list[str]] = {}
        # Calls already seen in item events stay: a final object that leaves one out must
        # not hide it from the policy.
        for position, item in enumerate(response.get("output") or []):
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                texts, refusals = _part_texts(item.get("content"))
                self.content_parts.extend(texts)
                other_texts[(position, "refusal")] = refusals
            elif item.get("type") == "reasoning":
                texts, _ = _part_texts(item.get("summary"))
                other_texts[(position, "reasoning")] = texts
            elif item.get("type") in _RESPONSES_CALL_TYPES:
                seen = _call_from_item(item)
                call = self.tool_calls.setdefault((0, position), ToolCall())
                call.id, call.name = seen.id or call.id, seen.name or call.name
                call.arguments = seen.arguments or call.arguments
                self.finish_reason = "tool_calls"
        # The final object repeats what the delta events sent, so it replaces them.
        self.other_texts = other_texts

    # Stream events.

    def add_chat_chunk(self, chunk: dict) -> None:
        if chunk.get("id"):
            self.response_id = str(chunk["id"])
        if chunk.get("model"):
            self.model_served = str(chunk["model"])
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        self._add_choices(chunk.get("choices"), delta=True)

    def add_responses_event(self, event: dict) -> None:
        event_type = event.get("type", "")
        if event_type == "response.output_text.delta" and isinstance(event.get("delta"), str):
            self.content_parts.append(event["delta"])
        elif event_type in _RESPONSES_OTHER_DELTAS and isinstance(event.get("delta"), str):
            key = (_index(event.get("output_index"), -1), event_type)
            self.other_texts.setdefault(key, []).append(event["delta"])
        elif event_type in ("response.output_item.added", "response.output_item.done"):
            self._add_responses_item(event)
        elif event_type == "response.function_call_arguments.delta":
            call = self.tool_calls.get((0, _index(event.get("output_index"), -1)))
            if call is not None and isinstance(event.get("delta"), str):
                call.arguments += event["delta"]
        elif event_type in ("response.created", "response.in_progress"):
            response = event.get("response") or {}
            self.response_id = str(response.get("id") or self.response_id)
            self.model_served = str(response.get("model") or self.model_served)
        elif event_type in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response") or {}
            if isinstance(response, dict):
                self.response_id = str(response.get("id") or self.response_id)
                self.model_served = str(response.get("model") or self.model_served)
                if isinstance(response.get("usage"), dict):
                    self.usage = response["usage"]
                self._add_response_object(response)
            self.completed = event_type == "response.completed"

    def _add_responses_item(self, event: dict) -> None:
        """Track a function call from the event that opens it, so live policies see its name early.

        Calls are keyed by output index until ``response.completed`` replaces them all.
        """
        item = event.get("item")
        index = _index(event.get("output_index"), -1)
        if not isinstance(item, dict) or item.get("type") not in _RESPONSES_CALL_TYPES or index < 0:
            return
        call = self.tool_calls.setdefault((0, index), ToolCall())
        seen = _call_from_item(item)
        call.id = seen.id or call.id
        call.name = seen.name or call.name
        if seen.arguments:
            call.arguments = seen.arguments


# Text the client reads besides `content`: a refusal, and the reasoning text some
# OpenAI-compatible providers return. Policies see it as part of the output's content.
_MESSAGE_TEXT_FIELDS = ("refusal", "reasoning_content", "reasoning")
_RESPONSES_OTHER_DELTAS = frozenset({
    "response.refusal.delta",
    "response.reasoning_summary_text.delta",
    "response.reasoning_text.delta",
})


def _message_texts(message: dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Return the content texts of a chat message or delta, and its other (field, text)."""
    content, refusals = _part_texts(message.get("content"))
    other = [("refusal_part", text) for text in refusals]
    other += [
        (name, message[name]) for name in _MESSAGE_TEXT_FIELDS if isinstance(message.get(name), str)
    ]
    audio = message.get("audio")
    if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
        other.append(("audio", audio["transcript"]))
    return content, other


def _part_texts(content) -> tuple[list[str], list[str]]:
    """Return the texts of a content value (a string, or a list of strings and parts), and
    the refusals among its parts."""
    if isinstance(content, str):
        return [content], []
    texts = content_part_texts(content)
    return (
        [text for kind, text in texts if kind == "text"],
        [text for kind, text in texts if kind == "refusal"],
    )


LEGACY_CALL_INDEX = -1
MAX_INDEX = 1_000_000


def _index(value, fallback: int) -> int:
    """Return a list index sent by the provider, or ``fallback`` when it is not a sane one."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_INDEX:
        return fallback
    return value

# Responses output items that call a tool: functions, custom tools and MCP server tools.
_RESPONSES_CALL_TYPES = ("function_call", "custom_tool_call", "mcp_call")


def _call_from_item(item: dict) -> ToolCall:
    arguments = item.get("arguments", item.get("input", ""))
    return ToolCall(
        str(item.get("call_id") or item.get("id") or ""),
        str(item.get("name", "")),
        arguments if isinstance(arguments, str) else json.dumps(arguments),
    )


def is_usage_only_chunk(chunk: dict) -> bool:
    """True for the final chat chunk that carries usage and no choices."""
    return chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


@dataclass(frozen=True)
class Usage:
    tokens_in: int | None = None
    tokens_out: int | None = None
    cached: int | None = None
    reasoning: int | None = None

    @property
    def reported(self) -> bool:
        return self.tokens_in is not None or self.tokens_out is not None


def normalise_usage(usage: dict | None) -> Usage:
    """Map chat (prompt/completion) and Responses (input/output) usage names onto one shape."""
    if not isinstance(usage, dict):
        return Usage()
    tokens_in = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    tokens_out = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    in_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    out_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    cached = _int(in_details.get("cached_tokens")) if isinstance(in_details, dict) else None
    reasoning = _int(out_details.get("reasoning_tokens")) if isinstance(out_details, dict) else None
    return Usage(tokens_in, tokens_out, cached, reasoning)


# The trace's token columns are UInt32; a count beyond it is a provider's error, not usage.
_MAX_TOKEN_COUNT = 2**32 - 1


def _int(value) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_TOKEN_COUNT:
        return value
    return None
