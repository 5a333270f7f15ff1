"""Redaction of server-sent event streams, held whole or passing event by event.

A value to redact (an e-mail address, an SSN) can be split across the deltas of several
events, so deltas are joined per channel before they are redacted. A channel is one text
field of one choice's deltas in chat and legacy completions (content, refusal, the arguments
of one tool call, the input of one custom tool call, legacy ``function_call`` arguments), or
one Responses ``*.delta`` event stream (output text, refusal, reasoning text, tool arguments
and inputs), told apart by event type and the item and index fields of the event.

Redaction fails closed for fields and events it was not written for:

- every string in a chat delta is model text, except the fields ``role``, ``id``, ``type``
  and ``name``, which identify a part or a tool;
- every Responses event whose type ends in ``.delta`` and whose ``delta`` is a string is a
  channel, except base64 audio (``response.audio.delta``);
- every other Responses event (``.done`` events, ``response.completed``, deltas whose
  ``delta`` is an object) has all its strings redacted on their own;
- token log probabilities repeat the text token by token, so no pattern can find a value
  in them: they are emptied in held streams that had a replacement, and always in live mode;
- last, each event's bytes are redacted as text, within the event. That covers what the
  passes above leave out: tool names and ids, fields beside a choice's delta, strings in
  lists of a delta, the fields of a Responses delta event beside its ``delta``, comment
  lines, and ``event:`` and ``id:`` values.

NOTE: deltas whose ``delta`` is an object (``response.shell_call_output_content.delta``) are
redacted one event at a time, so a value split across two of them is not found.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from ext_proc import redaction
from ext_proc.sse import SseEvent, make_event, parse_event

# Delta events whose ``delta`` is not text, so they are not joined into channels.
_RESPONSES_BINARY_DELTAS = frozenset({"response.audio.delta"})
# Fields that tell the channels of one Responses delta type apart. The ``.done`` event that
# closes a channel carries the same fields as its deltas.
_RESPONSES_CHANNEL_FIELDS = (
    "item_id",
    "output_index",
    "content_index",
    "summary_index",
    "command_index",
)
# Chat delta fields that identify a part or name a tool instead of carrying model text.
_CHAT_METADATA_FIELDS = frozenset({"role", "id", "type", "name"})


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
    """Return the text slots of one choice, keyed ``("choice", index, path)``.

    The path leads from the choice to the string. Inside a list (``tool_calls``) it names
    the item by its ``index`` field, because clients join the fragments of one call by it.
    """
    index = choice.get("index", 0)
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return _string_slots(index, delta, ("delta",))
    text = choice.get("text")
    return [Slot(("choice", index, ("text",)), choice, "text")] if isinstance(text, str) else []


def _string_slots(index, holder: dict, path: tuple) -> list[Slot]:
    slots = []
    for name, value in holder.items():
        if name in _CHAT_METADATA_FIELDS:
            continue
        if isinstance(value, str):
            slots.append(Slot(("choice", index, (*path, name)), holder, name))
        elif isinstance(value, dict):
            slots.extend(_string_slots(index, value, (*path, name)))
        elif isinstance(value, list):
            for position, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                item_index = item.get("index")
                if isinstance(item_index, bool) or not isinstance(item_index, int):
                    item_index = position
                slots.extend(_string_slots(index, item, (*path, name, item_index)))
    return slots


def _put_at(holder: dict, path: tuple, text: str) -> None:
    """Append ``text`` to the string at ``path`` under ``holder``, creating the parts it lacks."""
    position = 0
    while position < len(path) - 1:
        name, following = path[position], path[position + 1]
        if isinstance(following, int):
            items = holder.get(name)
            if not isinstance(items, list):
                items = holder[name] = []
            holder = _item_with_index(items, following)
            position += 2
            continue
        child = holder.get(name)
        if not isinstance(child, dict):
            child = holder[name] = {}
        holder = child
        position += 1
    field = path[-1]
    holder[field] = (holder.get(field) or "") + text


def _item_with_index(items: list, index: int) -> dict:
    for item in items:
        if isinstance(item, dict) and item.get("index") == index:
            return item
    item = {"index": index}
    items.append(item)
    return item


def responses_channel(data: dict, delta_type: str) -> tuple:
    return (delta_type, *(data.get(name) for name in _RESPONSES_CHANNEL_FIELDS))


def _is_text_delta_type(event_type: object) -> bool:
    return (
        isinstance(event_type, str)
        and event_type.endswith(".delta")
        and event_type not in _RESPONSES_BINARY_DELTAS
    )


def _delta_type_closed_by(event_type: object) -> str | None:
    """Return the delta event type whose channel a ``.done`` event closes."""
    if not isinstance(event_type, str) or not event_type.endswith(".done"):
        return None
    return event_type.removesuffix(".done") + ".delta"


def delta_slots(request_type: str, data: dict) -> list[Slot]:
    if request_type != "responses":
        return [slot for choice in choices_of(data) for slot in choice_slots(choice)]
    event_type = data.get("type")
    if _is_text_delta_type(event_type) and isinstance(data.get("delta"), str):
        return [Slot(responses_channel(data, event_type), data, "delta")]
    return []


def drop_logprobs(value: object) -> bool:
    """Empty every ``logprobs`` field inside a parsed event; return whether one had content.

    Lists become ``[]`` and objects ``None``, the empty values the OpenAI stream types allow.
    """
    changed = False
    if isinstance(value, dict):
        for name, item in value.items():
            if name == "logprobs" and item:
                value[name] = [] if isinstance(item, list) else None
                changed = True
            elif isinstance(item, (dict, list)):
                changed = drop_logprobs(item) or changed
    elif isinstance(value, list):
        for item in value:
            changed = drop_logprobs(item) or changed
    return changed


def redact_outside_choices(data: dict, kinds: frozenset[str]) -> dict[str, int]:
    """Redact, in place, every string of a chat chunk that is not inside a choice object.

    An ``error`` object sent as a stream event, for one, carries the provider's message
    there. Returns the replacements per kind.
    """
    counts: dict[str, int] = {}
    for name, value in list(data.items()):
        if name == "choices" and isinstance(value, list):
            # Choice objects are redacted by channel; anything else in the list is not a choice.
            for position, item in enumerate(value):
                if not isinstance(item, dict):
                    value[position], found = redaction.redact_json_strings(item, kinds)
                    _add_counts(counts, found)
            continue
        data[name], found = redaction.redact_json_strings(value, kinds)
        _add_counts(counts, found)
    return counts


def redact_raw_event(event: SseEvent, kinds: frozenset[str]) -> tuple[SseEvent, dict[str, int]]:
    """Redact an event's bytes as text; return it (a new event when changed) and the counts.

    The replacement marks contain no quote or backslash, so JSON data stays valid.
    """
    text = event.raw.decode("utf-8", "replace")
    redacted, found = redaction.redact_text(text, kinds)
    if not found:
        return event, found
    return parse_event(redacted.encode()), found


def _add_counts(total: dict[str, int], found: dict[str, int]) -> None:
    for kind, count in found.items():
        total[kind] = total.get(kind, 0) + count


def redact_held_events(
    request_type: str, events: list[SseEvent], kinds: frozenset[str]
) -> tuple[list[SseEvent], dict[str, int]]:
    """Redact a whole held stream; return the events to send and the replacements per kind.

    Each channel with something to redact is redacted as a whole and carried by its first
    delta, with empty deltas after it. Responses events that are not text deltas (``.done``
    events, ``response.completed``) are redacted in place. When anything was replaced,
    token log probabilities are emptied in every event.
    """
    parsed = [event.json() for event in events]
    replacements, counts = _redact_channels(request_type, parsed, kinds)
    sent: set[tuple] = set()
    changed = []
    for position, data in enumerate(parsed):
        if data is None:
            changed.append(False)
            continue
        slots = delta_slots(request_type, data)
        event_changed = False
        for slot in slots:
            if slot.key in replacements:
                slot.holder[slot.field] = "" if slot.key in sent else replacements[slot.key]
                sent.add(slot.key)
                event_changed = True
        if request_type == "responses" and not slots:
            parsed[position], found = redaction.redact_json_strings(data, kinds)
        elif request_type != "responses":
            found = redact_outside_choices(data, kinds)
        else:
            found = {}
        if found:
            _add_counts(counts, found)
            event_changed = True
        changed.append(event_changed)
    if counts:
        changed = [drop_logprobs(data) or flag for data, flag in zip(parsed, changed, strict=True)]
    out = []
    for event, data, flag in zip(events, parsed, changed, strict=True):
        event, found = redact_raw_event(make_event(data, event.event) if flag else event, kinds)
        _add_counts(counts, found)
        out.append(event)
    return out, counts


def _redact_channels(
    request_type: str, parsed: list[dict | None], kinds: frozenset[str]
) -> tuple[dict[tuple, str], dict[str, int]]:
    """Join the deltas of every channel; return the redacted text of the channels that changed."""
    joined: dict[tuple, str] = {}
    for data in parsed:
        for slot in delta_slots(request_type, data) if data is not None else ():
            joined[slot.key] = joined.get(slot.key, "") + slot.holder[slot.field]
    counts: dict[str, int] = {}
    replacements: dict[tuple, str] = {}
    for key, text in joined.items():
        redacted, found = redaction.redact_text(text, kinds)
        if found:
            replacements[key] = redacted
            _add_counts(counts, found)
    return replacements, counts


class LiveRedactor:
    """Redact stream events as they pass, holding back the unfinished tail of each channel.

    E-mail addresses and SSNs contain no whitespace, so a channel's text up to its last
    whitespace can be redacted and released while the rest waits for the next delta. A tail
    is released when its channel ends: the chunk with the choice's ``finish_reason``, the
    Responses ``.done`` event, or ``flush`` at the end of the stream. Token log probabilities
    are emptied in every event, because they would send the held text ahead of it.
    NOTE: text without whitespace (long code tokens, CJK text) is held until its channel ends.
    """

    def __init__(self, request_type: str, kinds: frozenset[str]) -> None:
        self.request_type = request_type
        self.kinds = kinds
        self.counts: dict[str, int] = {}
        self._pending: dict[tuple, str] = {}
        # Chat choices whose finish_reason has passed, with their tails released.
        self._finished_choices: set = set()
        # Last delta event per Responses channel, the template for a synthesized delta.
        self._templates: dict[tuple, dict] = {}
        self._chunk_fields: dict = {}
        # Responses events carry sequence numbers; each synthesized delta shifts the rest by one.
        self._sequence_shift = 0

    def redact(self, event: SseEvent) -> list[SseEvent]:
        """Return the events to send in place of ``event``: itself redacted, maybe after released tails."""
        data = event.json()
        if data is None:
            out = self._flush_tails() + [event] if event.is_done_marker else [event]
        elif self.request_type == "responses":
            out = self._redact_responses_event(event, data)
        else:
            out = [self._redact_chunk(event, data)]
        return self._redact_raw(out)

    def flush(self) -> list[SseEvent]:
        """Release every held tail as synthesized delta events."""
        return self._redact_raw(self._flush_tails())

    def _redact_raw(self, events: list[SseEvent]) -> list[SseEvent]:
        out = []
        for event in events:
            event, found = redact_raw_event(event, self.kinds)
            _add_counts(self.counts, found)
            out.append(event)
        return out

    def _flush_tails(self) -> list[SseEvent]:
        if self.request_type == "responses":
            return [
                event
                for key in list(self._pending)
                for event in self._release_responses_tail(key, None)
            ]
        events = []
        for key in list(self._pending):
            choice = {"index": key[1], "finish_reason": None}
            _put_at(choice, key[2], self._release(key, "", final=True))
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
        _add_counts(self.counts, redact_outside_choices(data, self.kinds))
        self._chunk_fields = {
            name: data[name] for name in ("id", "object", "created", "model") if name in data
        }
        for choice in choices_of(data):
            final = bool(choice.get("finish_reason"))
            index = choice.get("index", 0)
            for slot in choice_slots(choice):
                if index in self._finished_choices:
                    # The choice's tail went out with its finish_reason. Text after it could
                    # complete a value whose start was already sent, so it is not sent.
                    slot.holder[slot.field] = ""
                    continue
                slot.holder[slot.field] = self._release(slot.key, slot.holder[slot.field], final)
            if final:
                for key in [key for key in self._pending if key[1] == index]:
                    _put_at(choice, key[2], self._release(key, "", final=True))
                if isinstance(index, int | str):
                    self._finished_choices.add(index)
        drop_logprobs(data)
        return make_event(data, event.event)

    # Responses events.

    def _redact_responses_event(self, event: SseEvent, data: dict) -> list[SseEvent]:
        out = []
        slots = delta_slots(self.request_type, data)
        if slots:
            slot = slots[0]
            self._templates[slot.key] = data
            slot.holder[slot.field] = self._release(slot.key, slot.holder[slot.field], final=False)
        else:
            delta_type = _delta_type_closed_by(data.get("type"))
            if delta_type is not None:
                key = responses_channel(data, delta_type)
                out.extend(self._release_responses_tail(key, data.get("sequence_number")))
            data, found = redaction.redact_json_strings(data, self.kinds)
            _add_counts(self.counts, found)
        drop_logprobs(data)
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
