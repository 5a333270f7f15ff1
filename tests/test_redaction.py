import json
import random
import re

import pytest

from ext_proc import redaction
from ext_proc.redaction import (
    REDACTION_KINDS,
    decode_unicode_escapes,
    redact_json_strings,
    redact_text,
)
from ext_proc.response import _drop_redacted_logprobs
from ext_proc.sse import SseEvent, make_event, parse_event
from ext_proc.stream_redaction import LiveRedactor, redact_held_events

BOTH = frozenset({"email", "ssn"})


def test_known_kinds():
    assert REDACTION_KINDS == frozenset({"email", "ssn"})


def test_email_redacted():
    text, counts = redact_text("write to ops@acme-example.com or a.b+tag@mail.example.co.uk.", BOTH)
    assert text == "write to [REDACTED_EMAIL] or [REDACTED_EMAIL]."
    assert counts == {"email": 2}


def test_ssn_redacted():
    text, counts = redact_text("SSN 123-45-6789, again: 123-45-6789", BOTH)
    assert text == "SSN [REDACTED_SSN], again: [REDACTED_SSN]"
    assert counts == {"ssn": 2}


@pytest.mark.parametrize(
    "text",
    [
        "000-12-3456",
        "666-12-3456",
        "912-34-5678",
        "123-00-4567",
        "123-45-0000",
        "1123-45-6789",
        "123-45-67890",
        "call 555-123-4567",
        "part 123-45-6789-01",
    ],
)
def test_ssn_false_positives_kept(text):
    assert redact_text(text, BOTH) == (text, {})


def test_only_requested_kinds():
    source = "mail me@example.com, ssn 123-45-6789"
    assert redact_text(source, frozenset({"ssn"}))[0] == "mail me@example.com, ssn [REDACTED_SSN]"
    assert redact_text(source, frozenset({"email"}))[0] == "mail [REDACTED_EMAIL], ssn 123-45-6789"
    assert redact_text(source, frozenset()) == (source, {})


def test_not_an_email_kept():
    for text in ("@handle", "a@b", "user@localhost", "price: 5 @ $3"):
        assert redact_text(text, BOTH) == (text, {}), text


def test_long_word_run_is_linear():
    text = "a" * 200_000 + " @ " + "b" * 200_000
    assert redact_text(text, BOTH) == (text, {})


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="phone"):
        redact_text("x", frozenset({"phone"}))


def test_nested_json_redacted():
    value = {
        "messages": [
            {"role": "user", "content": "I am jane@example.org, SSN 078-05-1120"},
            {"role": "assistant", "content": "Noted."},
        ],
        "tool_calls": [{"arguments": {"to": "bob@example.com", "count": 3, "ok": True}}],
        "ok@example.com": None,
    }
    redacted, counts = redact_json_strings(value, BOTH)
    assert redacted == {
        "messages": [
            {"role": "user", "content": "I am [REDACTED_EMAIL], SSN [REDACTED_SSN]"},
            {"role": "assistant", "content": "Noted."},
        ],
        "tool_calls": [{"arguments": {"to": "[REDACTED_EMAIL]", "count": 3, "ok": True}}],
        "ok@example.com": None,
    }
    assert counts == {"email": 2, "ssn": 1}
    assert value["messages"][0]["content"].startswith("I am jane@")


def test_json_scalars_and_strings():
    assert redact_json_strings("x@example.com", BOTH) == ("[REDACTED_EMAIL]", {"email": 1})
    assert redact_json_strings(42, BOTH) == (42, {})
    assert redact_json_strings(None, BOTH) == (None, {})
    assert redact_json_strings(["a", 1.5], frozenset()) == (["a", 1.5], {})


def test_long_local_part_redacted():
    for local in ("a" * 65, "first.last." * 20, "x" * 5000):
        text, counts = redact_text(f"mail {local}@example.com now", BOTH)
        assert text == "mail [REDACTED_EMAIL] now", local[:20]
        assert counts == {"email": 1}


def test_long_run_before_at_sign_is_linear():
    text = "a" * 200_000 + "@" + "b" * 200_000 + " x.y@" * 1000
    assert redact_text(text, BOTH) == (text, {})


# Pieces that make up addresses, SSNs, near misses and JSON escapes when joined at random.
_SPAN_PIECES = [
    "a", "Zq", "0", "7", ".", "-", "_", "%", "+", "@", " ", "\\", "\\n", "\\u0041", "u",
    "example", ".com", ".io", "xn--p1ai", "mx.1", "123", "45", "6789", "000", "666", "900",
    "00", "0000", "2024-07-18", "@@", "..", "\"", "123-45-", "-45-6789", "078-05-1120",
    "a@b.co", "x@d.io",
]


def test_span_finders_agree_with_finditer():
    generator = random.Random(20261205)
    cases = [
        "".join(generator.choice(_SPAN_PIECES) for _ in range(generator.randint(0, 24)))
        for _ in range(20_000)
    ]
    cases += ["bob@example.com", "a@b.co x@y.org", "123-45-6789-123-45-6789", "1234-56-7890"]
    joined = 0
    for text in cases:
        emails = [match.span() for match in redaction._EMAIL_RE.finditer(text)]
        ssns = [match.span() for match in redaction._SSN_RE.finditer(text)]
        found = redaction._email_spans(text)
        assert redaction._ssn_spans(text) == ssns, text
        extra = 0
        for before, (start, end) in zip([(0, 0), *found], found):
            match = redaction._EMAIL_RE.match(text, start)
            if match and match.end() == end:
                continue
            at = text.find("@", start, end)
            match = redaction._EMAIL_RE.match(text, at + 1)
            if at - start >= 1 and match and match.end() == end:
                # A local part and "@" taken in before an address that starts after them.
                assert re.fullmatch(r"[A-Za-z0-9._%+-]+", text[start:at]), text
                continue
            assert re.fullmatch(redaction._EMAIL_ADDRESS, text[start:end]), text
            # Otherwise the address is joined to the one before it.
            extra += 1
            assert before[1] > 0, text
            assert set(text[before[1] : start]) <= set("._%+-"), text
        if extra == 0 and all(text.count("@", *span) == 1 for span in found):
            assert found == emails, text
        joined += extra
    assert joined > 100


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a@b.co.x@d.io", "[REDACTED_EMAIL].[REDACTED_EMAIL]"),
        ("a@b.co+x@d.io", "[REDACTED_EMAIL]+[REDACTED_EMAIL]"),
        ("a@b.co_x@d.io", "[REDACTED_EMAIL]_[REDACTED_EMAIL]"),
        ("a@b.co..%x@d.io y", "[REDACTED_EMAIL]..%[REDACTED_EMAIL] y"),
        ('{"to":"a@b.co.x@d.io"}', '{"to":"[REDACTED_EMAIL].[REDACTED_EMAIL]"}'),
        ("a@b.co. not an address", "[REDACTED_EMAIL]. not an address"),
        ("to john.smith@corp.com-jane@x.io now", "to [REDACTED_EMAIL] now"),
        ("a@b.co-c@d.io", "[REDACTED_EMAIL]"),
        ("ping @bob@example.com", "ping @[REDACTED_EMAIL]"),
    ],
)
def test_joined_addresses_redacted(text, expected):
    assert redact_text(text, BOTH)[0] == expected


# JSON text: escapes before a value, and values written with \uXXXX escapes.


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"line\nbob@example.com", r"line\n[REDACTED_EMAIL]"),
        (r"\tbob@example.com", r"\t[REDACTED_EMAIL]"),
        (r"say \"bob@example.com\"", r"say \"[REDACTED_EMAIL]\""),
        (r"dir\\nbob@example.com", r"dir\\[REDACTED_EMAIL]"),
        (r"\u0001bob@example.com", r"\u0001[REDACTED_EMAIL]"),
        (r"\abob@example.com", r"\[REDACTED_EMAIL]"),
        (r"\u0001123-45-6789", r"\u0001[REDACTED_SSN]"),
        (r"\u000b123-45-6789", r"\u000b[REDACTED_SSN]"),
        (r"ssn\n123-45-6789", r"ssn\n[REDACTED_SSN]"),
    ],
)
def test_value_after_json_escape_redacted(text, expected):
    assert redact_text(text, BOTH)[0] == expected


def test_escaped_values_in_tool_arguments_redacted():
    arguments = r'{"to":"bob\u0040example.com","ssn":"123\u002d45\u002d6789","n":"\u00e9"}'

    redacted, counts = redact_text(arguments, BOTH)

    assert counts == {"email": 1, "ssn": 1}
    assert json.loads(redacted) == {"to": "[REDACTED_EMAIL]", "ssn": "[REDACTED_SSN]", "n": "é"}


def test_escapes_kept_without_match():
    text = r'{"sign":"\u0040","note":"caf\u00e9 \ud83d\ude00"}'
    assert redact_text(text, BOTH) == (text, {})


def test_escape_decoding_off():
    text = r"bob\u0040example.com"
    assert redact_text(text, BOTH, decode_escapes=False) == (text, {})


def test_decoded_escapes_keep_json_valid():
    text = r'{"a":"\u0022\u005c\u0001\ud800x\u0041\ud83d\ude00\\u0042"}'

    decoded = decode_unicode_escapes(text)

    assert decoded == r'{"a":"\u0022\u005c\u0001\ud800xA😀B"}'
    assert json.loads(decoded)["a"] == '"\\\x01\ud800xA😀B'


def test_nested_escape_in_json_string_redacted():
    arguments = r'{"to":"bob\u0040example.com"}'
    messages = json.dumps([{"tool_calls": [{"function": {"arguments": arguments}}]}])

    redacted, counts = redact_text(messages, BOTH)

    assert counts == {"email": 1}
    inner = json.loads(redacted)[0]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(inner) == {"to": "[REDACTED_EMAIL]"}


def test_escaped_value_in_parsed_json_redacted():
    body = {"tool_calls": [{"function": {"arguments": r'{"to":"bob\u0040example.com"}'}}]}

    redacted, counts = redact_json_strings(body, BOTH)

    assert counts == {"email": 1}
    assert redacted["tool_calls"][0]["function"]["arguments"] == '{"to":"[REDACTED_EMAIL]"}'


# Streams: every text delta kind, with an address cut mid-word across events.

EMAIL = "jane.doe@example.com"
PIECES = ["Write to ja", "ne.doe@exa", "mple.com for", " access, or call the desk."]
REDACTED = "Write to [REDACTED_EMAIL] for access, or call the desk."
DONE = SseEvent(b"data: [DONE]\n\n", data="[DONE]")
EMAIL_ONLY = frozenset({"email"})

# Where each chat delta kind puts its text, and how to read it back from a delta.
CHAT_KINDS = {
    "refusal": (lambda piece: {"refusal": piece}, lambda delta: delta.get("refusal")),
    "function_call": (
        lambda piece: {"function_call": {"arguments": piece}},
        lambda delta: (delta.get("function_call") or {}).get("arguments"),
    ),
    "custom_tool_input": (
        lambda piece: {"tool_calls": [{"index": 0, "custom": {"input": piece}}]},
        lambda delta: "".join(
            (call.get("custom") or {}).get("input") or "" for call in delta.get("tool_calls") or []
        ),
    ),
    "unknown_field": (
        lambda piece: {"reasoning_content": piece},
        lambda delta: delta.get("reasoning_content"),
    ),
}


def chat_chunk(delta: dict, finish_reason=None, **choice_fields) -> SseEvent:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, **choice_fields}
    return make_event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})


def chat_stream(kind: str) -> list[SseEvent]:
    wrap = CHAT_KINDS[kind][0]
    return [chat_chunk(wrap(piece)) for piece in PIECES]


def chat_text(events: list[SseEvent], kind: str) -> str:
    read = CHAT_KINDS[kind][1]
    parts = []
    for event in events:
        data = event.json()
        for choice in (data or {}).get("choices") or []:
            parts.append(read(choice.get("delta") or {}) or "")
    return "".join(parts)


def sent_bytes(events: list[SseEvent]) -> bytes:
    return b"".join(event.raw for event in events)


def run_live(request_type: str, events: list[SseEvent]) -> tuple[list[SseEvent], LiveRedactor]:
    redactor = LiveRedactor(request_type, EMAIL_ONLY)
    sent = [out for event in events for out in redactor.redact(event)]
    return sent, redactor


@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_held_chat_delta_redacted(kind):
    events = chat_stream(kind) + [chat_chunk({}, "stop"), DONE]

    redacted, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)

    assert chat_text(redacted, kind) == REDACTED
    assert b"doe@exa" not in sent_bytes(redacted)
    assert counts == {"email": 1}


@pytest.mark.parametrize("finish", [True, False], ids=["finish-chunk", "done-marker"])
@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_live_chat_delta_redacted(kind, finish):
    events = chat_stream(kind) + ([chat_chunk({}, "stop")] if finish else []) + [DONE]

    sent, redactor = run_live("chat_completions", events)

    assert chat_text(sent, kind) == REDACTED
    assert b"doe@exa" not in sent_bytes(sent)
    assert sent[-1].is_done_marker
    assert redactor.counts == {"email": 1}


def test_live_tool_tail_keeps_call_index():
    events = [
        chat_chunk({"tool_calls": [{"index": 2, "function": {"arguments": piece}}]})
        for piece in ['{"to": "ja', 'ne.doe@example.com"}']
    ]

    sent, _ = run_live("chat_completions", events + [chat_chunk({}, "tool_calls")])

    calls = [
        call
        for event in sent
        for call in event.json()["choices"][0]["delta"].get("tool_calls") or []
    ]
    assert {call["index"] for call in calls} == {2}
    assert "".join(call["function"]["arguments"] for call in calls) == '{"to": "[REDACTED_EMAIL]"}'


def test_channels_of_one_choice_kept_apart():
    events = [
        chat_chunk({"content": "mail ja", "refusal": "ask bo"}),
        chat_chunk({"content": "ne@example.com", "refusal": "b@example.org please"}),
    ]

    redacted, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)

    assert chat_text(redacted, "refusal") == "ask [REDACTED_EMAIL] please"
    content = "".join(event.json()["choices"][0]["delta"]["content"] for event in redacted)
    assert content == "mail [REDACTED_EMAIL]"
    assert counts == {"email": 2}


def test_live_legacy_completion_text_redacted():
    def choice_event(text, finish_reason=None):
        choice = {"index": 0, "text": text, "finish_reason": finish_reason}
        return make_event({"id": "cmpl", "object": "text_completion", "choices": [choice]})

    sent, redactor = run_live("completions", [choice_event(piece) for piece in PIECES] + [DONE])

    text = "".join(choice["text"] for e in sent if e.json() for choice in e.json()["choices"])
    assert text == REDACTED
    assert redactor.counts == {"email": 1}


def chat_logprobs(token: str) -> dict:
    return {"content": [{"token": token, "logprob": -0.1, "bytes": None, "top_logprobs": []}]}


def test_held_logprobs_dropped_when_redacted():
    events = [chat_chunk({"content": piece}, logprobs=chat_logprobs(piece)) for piece in PIECES]

    redacted, _ = redact_held_events("chat_completions", events, EMAIL_ONLY)

    assert b"doe@exa" not in sent_bytes(redacted)
    assert all(event.json()["choices"][0]["logprobs"] is None for event in redacted)


def test_held_logprobs_kept_without_match():
    events = [chat_chunk({"content": "plain"}, logprobs=chat_logprobs("plain"))]

    redacted, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)

    assert counts == {}
    assert redacted[0] is events[0]


def test_live_logprobs_dropped():
    events = [chat_chunk({"content": piece}, logprobs=chat_logprobs(piece)) for piece in PIECES]

    sent, _ = run_live("chat_completions", events + [DONE])

    assert b"ne.doe" not in sent_bytes(sent)


# Responses delta event types, the channel fields of their events, and the field of their
# .done event that repeats the whole text. Names as in the openai-python stream event types.
RESPONSES_KINDS = {
    "response.refusal.delta": ({"content_index": 0}, "refusal"),
    "response.custom_tool_call_input.delta": ({}, "input"),
    "response.mcp_call_arguments.delta": ({}, "arguments"),
    "response.reasoning_summary_text.delta": ({"summary_index": 0}, "text"),
    "response.reasoning_text.delta": ({"content_index": 0}, "text"),
    "response.audio.transcript.delta": ({}, None),
    "response.future_text.delta": ({}, "text"),
}


def responses_stream(delta_type: str) -> list[SseEvent]:
    fields, done_field = RESPONSES_KINDS[delta_type]
    where = {"item_id": "item_1", "output_index": 0, **fields}
    if delta_type == "response.audio.transcript.delta":
        where = {}
    events = [
        {"type": delta_type, **where, "delta": piece, "sequence_number": number}
        for number, piece in enumerate(PIECES, start=1)
    ]
    done = {"type": delta_type.removesuffix(".delta") + ".done", **where}
    if done_field:
        done[done_field] = "".join(PIECES)
    done["sequence_number"] = len(PIECES) + 1
    completed = {
        "type": "response.completed",
        "response": {"id": "resp_1", "status": "completed", "output": [{"text": "".join(PIECES)}]},
        "sequence_number": len(PIECES) + 2,
    }
    return [make_event(data, data["type"]) for data in [*events, done, completed]]


def responses_deltas(events: list[SseEvent], delta_type: str) -> str:
    return "".join(e.json()["delta"] for e in events if e.json()["type"] == delta_type)


@pytest.mark.parametrize("delta_type", RESPONSES_KINDS)
def test_held_responses_delta_redacted(delta_type):
    events = responses_stream(delta_type)

    redacted, counts = redact_held_events("responses", events, EMAIL_ONLY)

    assert responses_deltas(redacted, delta_type) == REDACTED
    assert b"doe@exa" not in sent_bytes(redacted)
    assert counts["email"] >= 2


@pytest.mark.parametrize("delta_type", RESPONSES_KINDS)
def test_live_responses_delta_redacted(delta_type):
    sent, redactor = run_live("responses", responses_stream(delta_type))

    assert responses_deltas(sent, delta_type) == REDACTED
    assert b"doe@exa" not in sent_bytes(sent)
    numbers = [event.json()["sequence_number"] for event in sent]
    assert numbers == list(range(1, len(sent) + 1))
    done_type = delta_type.removesuffix(".delta") + ".done"
    kinds_in_order = [event.json()["type"] for event in sent]
    assert kinds_in_order.index(done_type) > max(
        position for position, kind in enumerate(kinds_in_order) if kind == delta_type
    )
    assert redactor.counts["email"] >= 2


def test_object_delta_redacted_per_event():
    data = {
        "type": "response.shell_call_output_content.delta",
        "delta": {"stdout": f"owner {EMAIL}\n", "stderr": ""},
        "sequence_number": 1,
    }
    events = [make_event(data, data["type"])]

    held, _ = redact_held_events("responses", events, EMAIL_ONLY)
    live, _ = run_live("responses", events)

    for sent in (held, live):
        assert sent[0].json()["delta"]["stdout"] == "owner [REDACTED_EMAIL]\n"


def test_audio_delta_not_held_in_live_mode():
    data = {"type": "response.audio.delta", "delta": "QUJDRA==", "sequence_number": 1}

    sent, _ = run_live("responses", [make_event(data, data["type"])])

    assert sent[0].json()["delta"] == "QUJDRA=="


def test_responses_text_logprobs_dropped():
    data = {
        "type": "response.output_text.delta",
        "item_id": "msg_1",
        "output_index": 0,
        "content_index": 0,
        "delta": EMAIL + " ",
        "logprobs": [{"token": "jane", "logprob": -0.1, "top_logprobs": []}],
        "sequence_number": 1,
    }
    events = [make_event(data, data["type"])]

    held, _ = redact_held_events("responses", events, EMAIL_ONLY)
    live, _ = run_live("responses", events)

    for sent in (held, live):
        assert sent[0].json()["logprobs"] == []
        assert b"jane" not in sent_bytes(sent)


ESCAPED_PIECES = ['{"to": "bob\\u00', '40example.com", "ssn": "123\\u002d45', '\\u002d6789"}']


def tool_arguments(events: list[SseEvent]) -> str:
    return "".join(
        call["function"]["arguments"]
        for event in events
        if event.json()
        for call in event.json()["choices"][0]["delta"].get("tool_calls") or []
    )


@pytest.mark.parametrize("mode", ["held", "live"])
def test_split_escape_in_stream_redacted(mode):
    events = [
        chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        for piece in ESCAPED_PIECES
    ] + [chat_chunk({}, "tool_calls"), DONE]

    if mode == "held":
        sent, counts = redact_held_events("chat_completions", events, BOTH)
    else:
        redactor = LiveRedactor("chat_completions", BOTH)
        sent = [out for event in events for out in redactor.redact(event)]
        counts = redactor.counts

    assert counts == {"email": 1, "ssn": 1}
    arguments = json.loads(tool_arguments(sent))
    assert arguments == {"to": "[REDACTED_EMAIL]", "ssn": "[REDACTED_SSN]"}
    assert b"example.com" not in sent_bytes(sent)


def test_live_escape_release_keeps_following_text():
    pieces = ["mail bob\\u0040exa", "mple.com now ", "and more text"]
    events = [chat_chunk({"content": piece}) for piece in pieces] + [chat_chunk({}, "stop")]

    sent, redactor = run_live("chat_completions", events)

    content = "".join(event.json()["choices"][0]["delta"].get("content") or "" for event in sent)
    assert content == "mail [REDACTED_EMAIL] now and more text"
    assert redactor.counts == {"email": 1}


def buffered_choice(index: int, content: str) -> dict:
    tokens = [
        {"token": piece, "logprob": -0.1, "bytes": None, "top_logprobs": []}
        for piece in content.split("@")
    ]
    return {
        "index": index,
        "message": {"role": "assistant", "content": content},
        "logprobs": {"content": tokens, "refusal": None},
        "finish_reason": "stop",
    }


def test_buffered_logprobs_dropped_per_redacted_choice():
    body = {"choices": [buffered_choice(0, "mail bob@example.com"), buffered_choice(1, "plain")]}
    redacted, counts = redact_json_strings(body, BOTH)

    _drop_redacted_logprobs(body, redacted)

    assert counts == {"email": 1}
    assert redacted["choices"][0]["logprobs"] is None
    assert redacted["choices"][1]["logprobs"] == body["choices"][1]["logprobs"]
    assert body["choices"][0]["logprobs"]["content"][1]["token"] == "example.com"


def test_buffered_responses_logprobs_dropped():
    part = {"type": "output_text", "text": "mail bob@example.com", "logprobs": [{"token": "bob"}]}
    body = {"object": "response", "output": [{"type": "message", "content": [part]}]}
    redacted, _ = redact_json_strings(body, BOTH)

    _drop_redacted_logprobs(body, redacted)

    assert redacted["output"][0]["content"][0]["logprobs"] == []


def error_event() -> SseEvent:
    return make_event({"error": {"message": "contact jane.doe@example.com", "type": "server_error"}})


def test_held_error_event_redacted():
    events = chat_stream("refusal") + [error_event(), DONE]

    redacted, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)

    assert b"doe@exa" not in sent_bytes(redacted)
    assert redacted[-2].json()["error"]["message"] == "contact [REDACTED_EMAIL]"
    assert counts == {"email": 2}


def test_live_error_event_redacted():
    sent, redactor = run_live("chat_completions", chat_stream("refusal") + [error_event(), DONE])

    assert b"doe@exa" not in sent_bytes(sent)
    assert any(
        (event.json() or {}).get("error", {}).get("message") == "contact [REDACTED_EMAIL]"
        for event in sent
    )
    assert redactor.counts == {"email": 2}


def test_top_level_chunk_field_redacted():
    chunk = make_event({"id": "c1", "note": "from jane.doe@example.com", "choices": []})

    redacted, counts = redact_held_events("chat_completions", [chunk, DONE], EMAIL_ONLY)

    assert redacted[0].json()["note"] == "from [REDACTED_EMAIL]"
    assert counts == {"email": 1}


@pytest.mark.parametrize("choices", ["jane.doe@example.com", [1, "jane.doe@example.com", None]])
def test_malformed_choices_redacted(choices):
    chunk = make_event({"id": "c1", "choices": choices})

    held, held_counts = redact_held_events("chat_completions", [chunk, DONE], EMAIL_ONLY)
    live, redactor = run_live("chat_completions", [chunk, DONE])

    assert b"doe@exa" not in sent_bytes(held)
    assert b"doe@exa" not in sent_bytes(live)
    assert held_counts == {"email": 1}
    assert redactor.counts == {"email": 1}


def tool_name_chunk(name: str) -> SseEvent:
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": name}}
    return chat_chunk({"role": "assistant", "tool_calls": [call]})


def extra_field_chunk() -> SseEvent:
    return chat_chunk({"content": "hi"}, message={"content": "copy to jane.doe@example.com"})


@pytest.mark.parametrize("mode", ["held", "live"])
def test_tool_name_redacted(mode):
    events = [tool_name_chunk("mail_jane.doe@example.com"), chat_chunk({}, "tool_calls"), DONE]

    if mode == "held":
        sent, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)
    else:
        sent, redactor = run_live("chat_completions", events)
        counts = redactor.counts

    call = sent[0].json()["choices"][0]["delta"]["tool_calls"][0]
    assert call["function"]["name"] == "[REDACTED_EMAIL]"
    assert call["id"] == "call_1"
    assert counts == {"email": 1}


@pytest.mark.parametrize("mode", ["held", "live"])
def test_choice_field_beside_delta_redacted(mode):
    events = [extra_field_chunk(), chat_chunk({}, "stop"), DONE]

    if mode == "held":
        sent, counts = redact_held_events("chat_completions", events, EMAIL_ONLY)
    else:
        sent, redactor = run_live("chat_completions", events)
        counts = redactor.counts

    choice = sent[0].json()["choices"][0]
    assert choice["message"]["content"] == "copy to [REDACTED_EMAIL]"
    # Live mode keeps "hi" back until the channel ends, so the content is read across events.
    content = "".join(
        choice["delta"].get("content") or ""
        for event in sent
        for choice in (event.json() or {}).get("choices") or []
    )
    assert content == "hi"
    assert counts == {"email": 1}


def test_legacy_choice_field_beside_text_redacted():
    choice = {"index": 0, "text": "hello", "note": "jane.doe@example.com", "finish_reason": "stop"}
    event = make_event({"id": "cmpl", "object": "text_completion", "choices": [choice]})

    sent, redactor = run_live("completions", [event, DONE])

    sent_choice = sent[0].json()["choices"][0]
    assert sent_choice["note"] == "[REDACTED_EMAIL]"
    assert sent_choice["text"] == "hello"
    assert redactor.counts == {"email": 1}


# Shapes the structured passes do not parse; the pass over each event's bytes redacts them.

SSN = "123-45-6789"
RAW_SHAPES = {
    "delta_string_list": (
        "chat_completions",
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":"a ","annotations":["bob@example.com"]}}]}\n\n',
    ),
    "delta_content_list": (
        "chat_completions",
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"content":["bob@example.com"]}}]}\n\n',
    ),
    "responses_delta_extra_field": (
        "responses",
        b'data: {"type":"response.output_text.delta","item_id":"i1","output_index":0,'
        b'"content_index":0,"delta":"a ","extra":"bob@example.com 123-45-6789"}\n\n',
    ),
    "responses_logprobs": (
        "responses",
        b'data: {"type":"response.output_text.delta","item_id":"i1","output_index":0,'
        b'"content_index":0,"delta":"a ","logprobs":[{"token":"bob@example.com"}]}\n\n',
    ),
    "comment_and_fields": (
        "chat_completions",
        b": note bob@example.com\nevent: bob@example.com\nid: 123-45-6789\n"
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a "}}]}\n\n',
    ),
    "comment_only": ("chat_completions", b": bob@example.com 123-45-6789\n\n"),
}


@pytest.mark.parametrize("mode", ["held", "live"])
@pytest.mark.parametrize("shape", RAW_SHAPES)
def test_unparsed_event_text_redacted(shape, mode):
    request_type, raw = RAW_SHAPES[shape]
    events = [parse_event(raw), DONE]

    if mode == "held":
        sent, counts = redact_held_events(request_type, events, BOTH)
    else:
        redactor = LiveRedactor(request_type, BOTH)
        sent = [out for event in events for out in redactor.redact(event)]
        counts = redactor.counts

    body = sent_bytes(sent)
    assert b"bob@example.com" not in body
    assert SSN.encode() not in body
    if not (shape == "responses_logprobs" and mode == "live"):
        # Live mode empties every logprobs field before anything could match in it.
        assert counts.get("email", 0) >= 1
    for event in sent:
        if event.data and not event.is_done_marker:
            assert isinstance(json.loads(event.data), dict)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("mail bob\uff20example.com now", "mail [REDACTED_EMAIL] now"),
        ("mail bob@example\u3002com now", "mail [REDACTED_EMAIL] now"),
        ("mail \uff42\uff4f\uff42@example.com now", "mail [REDACTED_EMAIL] now"),
        ("ssn 123\u201045\u20106789 here", "ssn [REDACTED_SSN] here"),
        ("ssn \uff11\uff12\uff13\u2013\uff14\uff15\u2013\uff16\uff17\uff18\uff19", "ssn [REDACTED_SSN]"),
        ("caf\u00e9 \u2014 bob@example.com \u2014 123-45-6789", "caf\u00e9 \u2014 [REDACTED_EMAIL] \u2014 [REDACTED_SSN]"),
    ],
)
def test_lookalike_characters_redacted(text, expected):
    redacted, counts = redact_text(text, BOTH)

    assert redacted == expected
    assert sum(counts.values()) == expected.count("[REDACTED_")


def test_lookalikes_without_match_kept():
    text = "years 2010\u20132015 \u2014 see \uff21\uff22\uff23"

    assert redact_text(text, BOTH) == (text, {})


def test_live_text_after_finish_dropped():
    events = [
        chat_chunk({"content": "write bob@exa"}, "stop"),
        chat_chunk({"content": "mple.com now"}),
        DONE,
    ]

    sent, _ = run_live("chat_completions", events)

    assert b"mple.com" not in sent_bytes(sent)
    content = "".join(
        choice["delta"].get("content") or ""
        for event in sent
        for choice in (event.json() or {}).get("choices") or []
    )
    assert content == "write bob@exa"


def test_punycode_domain_redacted():
    redacted, counts = redact_text("mail bob@example.xn--p1ai now", BOTH)

    assert redacted == "mail [REDACTED_EMAIL] now"
    assert counts == {"email": 1}
