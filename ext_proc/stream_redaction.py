"""Redaction of server-sent event streams, held whole or passing event by event.

A value to redact (an e-mail address, an SSN) can be split across the deltas of several
events, so deltas are joined per channel before they are redacted. A channel is the text of
one choice (chat and legacy completions) or of one Responses output part, or the arguments
of one tool call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ext_proc import redaction
from ext_proc.sse import SseEvent, make_event

_RESPONSES_TEXT_DELTA = "response.output_text.delta"
_RESPONSES_ARGUMENTS_DELTA = "response.function_call_arguments.delta"
# The Responses events that close a channel, with the delta event type of that channel.
_RESPONSES_CHANNEL_END = {
    "response.output_text.done": _RESPONSES_TEXT_DELTA,
    "response.function_call_arguments.done": _RESPONSES_ARGUMENTS_DELTA,
}


@dataclass
class Slot:
    """One delta string inside a parsed event: ``holder[field]`` belongs to channel ``key``."""

    key: tuple
    holder: dict
    field: str


def choices_of(data: dict) -> list[dict]:
    choices = data.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def choice_slots(choice: dict) -> list[Slot]:
    index = choice.get("index", 0)
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        text = choice.get("text")
        return [Slot(("text", index), choice, "text")] if isinstance(text, str) else []
    slots = []
    if isinstance(delta.get("content"), str):
        slots.append(Slot(("text", index), delta, "content"))
    for call in delta.get("tool_calls") or []:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            slots.append(Slot(("args", index, call.get("index", 0)), function, "arguments"))
    return slots


def responses_channel(data: dict, delta_type: str) -> tuple:
    if delta_type == _RESPONSES_TEXT_DELTA:
        return ("text", data.get("item_id"), data.get("content_index"))
    return ("args", data.get("item_id"))


def delta_slots(request_type: str, data: dict) -> list[Slot]:
    if request_type != "responses":
        return [slot for choice in choices_of(data) for slot in choice_slots(choice)]
    event_type = data.get("type")
    if event_type in (_RESPONSES_TEXT_DELTA, _RESPONSES_ARGUMENTS_DELTA) and isinstance(
        data.get("delta"), str
    ):
        return [Slot(responses_channel(data, event_type), data, "delta")]
    return []


def _add_counts(total: dict[str, int], found: dict[str, int]) -> None:
    for kind, count in found.items():
        total[kind] = total.get(kind, 0) + count


def redact_held_events(
    request_type: str, events: list[SseEvent], kinds: frozenset[str]
) -> tuple[list[SseEvent], dict[str, int]]:
    """Redact a whole held stream; return the events to send and the replacements per kind.

    Each channel with something to redact is redacted as a whole and carried by its first
    delta, with empty deltas after it. Responses events that repeat whole texts (``.done``
    events, ``response.completed``) are redacted in place.
    """
    parsed = [(event, event.json()) for event in events]
    joined: dict[tuple, str] = {}
    for _, data in parsed:
        for slot in delta_slots(request_type, data) if data is not None else ():
            joined[slot.key] = joined.get(slot.key, "") + slot.holder[slot.field]
    counts: dict[str, int] = {}
    replacements: dict[tuple, str] = {}
    for key, text in joined.items():
        redacted, found = redaction.redact_text(text, kinds)
        if found:
            replacements[key] = redacted
            _add_counts(counts, found)

    out = []
    sent: set[tuple] = set()
    for event, data in parsed:
        if data is None:
            out.append(event)
            continue
        slots = delta_slots(request_type, data)
        changed = False
        for slot in slots:
            if slot.key in replacements:
                slot.holder[slot.field] = "" if slot.key in sent else replacements[slot.key]
                sent.add(slot.key)
                changed = True
        if request_type == "responses" and not slots:
            data, found = redaction.redact_json_strings(data, kinds)
            if found:
                _add_counts(counts, found)
                changed = True
        out.append(make_event(data, event.event) if changed else event)
    return out, counts


class LiveRedactor:
    """Redact stream events as they pass, holding back the unfinished tail of each channel.

    E-mail addresses and SSNs contain no whitespace, so a channel's text up to its last
    whitespace can be redacted and released while the rest waits for the next delta. A tail
    is released when its channel ends: the chunk with the choice's ``finish_reason``, the
    Responses ``.done`` event, or ``flush`` at the end of the stream.
    NOTE: text without whitespace (long code tokens, CJK text) is held until its channel ends.
    """

    def __init__(self, request_type: str, kinds: frozenset[str]) -> None:
        self.request_type = request_type
        self.kinds = kinds
        self.counts: dict[str, int] = {}
        self._pending: dict[tuple, str] = {}
        # Last delta event per Responses channel, the template for a synthesized delta.
        self._templates: dict[tuple, dict] = {}
        self._chunk_fields: dict = {}
        # Responses events carry sequence numbers; each synthesized delta shifts the rest by one.
        self._sequence_shift = 0

    def redact(self, event: SseEvent) -> list[SseEvent]:
        """Return the events to send in place of ``event``: itself redacted, maybe after released tails."""
        data = event.json()
        if data is None:
            return self.flush() + [event] if event.is_done_marker else [event]
        if self.request_type == "responses":
            return self._redact_responses_event(event, data)
        return [self._redact_chunk(event, data)]

    def flush(self) -> list[SseEvent]:
        """Release every held tail as synthesized delta events."""
        if self.request_type == "responses":
            return [
                event
                for key in list(self._pending)
                for event in self._release_responses_tail(key, None)
            ]
        events = []
        for key in list(self._pending):
            choice = {"index": key[1], "finish_reason": None}
            self._put_tail(choice, key, self._release(key, "", final=True))
            events.append(make_event({**self._chunk_fields, "choices": [choice]}))
        return events

    def _release(self, key: tuple, text: str, final: bool) -> str:
        pending = self._pending.pop(key, "") + text
        cut = len(pending) if final else _after_last_space(pending)
        if cut < len(pending):
            self._pending[key] = pending[cut:]
        released, found = redaction.redact_text(pending[:cut], self.kinds)
        _add_counts(self.counts, found)
        return released

    # Chat and legacy completions chunks.

    def _redact_chunk(self, event: SseEvent, data: dict) -> SseEvent:
        self._chunk_fields = {
            name: data[name] for name in ("id", "object", "created", "model") if name in data
        }
        for choice in choices_of(data):
            final = bool(choice.get("finish_reason"))
            for slot in choice_slots(choice):
                slot.holder[slot.field] = self._release(slot.key, slot.holder[slot.field], final)
            if final:
                index = choice.get("index", 0)
                for key in [key for key in self._pending if key[1] == index]:
                    self._put_tail(choice, key, self._release(key, "", final=True))
        return make_event(data, event.event)

    def _put_tail(self, choice: dict, key: tuple, text: str) -> None:
        if self.request_type != "chat_completions":
            choice["text"] = choice.get("text", "") + text
            return
        delta = choice.setdefault("delta", {})
        if key[0] == "text":
            delta["content"] = (delta.get("content") or "") + text
        else:
            delta.setdefault("tool_calls", []).append(
                {"index": key[2], "function": {"arguments": text}}
            )

    # Responses events.

    def _redact_responses_event(self, event: SseEvent, data: dict) -> list[SseEvent]:
        out = []
        slots = delta_slots(self.request_type, data)
        if slots:
            slot = slots[0]
            self._templates[slot.key] = data
            slot.holder[slot.field] = self._release(slot.key, slot.holder[slot.field], final=False)
        else:
            delta_type = _RESPONSES_CHANNEL_END.get(data.get("type"))
            if delta_type is not None:
                key = responses_channel(data, delta_type)
                out.extend(self._release_responses_tail(key, data.get("sequence_number")))
            data, found = redaction.redact_json_strings(data, self.kinds)
            _add_counts(self.counts, found)
        self._shift_sequence(data)
        out.append(make_event(data, event.event))
        return out

    def _release_responses_tail(self, key: tuple, next_sequence: int | None) -> list[SseEvent]:
        """Synthesize a delta event carrying a channel's tail, numbered before the event that ends it."""
        template = self._templates.get(key)
        if key not in self._pending or template is None:
            return []
        tail = dict(copy.deepcopy(template), delta=self._release(key, "", final=True))
        if isinstance(next_sequence, int):
            tail["sequence_number"] = next_sequence + self._sequence_shift
            self._sequence_shift += 1
        elif isinstance(tail.get("sequence_number"), int):
            tail["sequence_number"] += 1
        return [make_event(tail, tail.get("type", ""))]

    def _shift_sequence(self, data: dict) -> None:
        number = data.get("sequence_number")
        if self._sequence_shift and isinstance(number, int):
            data["sequence_number"] = number + self._sequence_shift


def _after_last_space(text: str) -> int:
    for position in range(len(text) - 1, -1, -1):
        if text[position].isspace():
            return position + 1
    return 0
