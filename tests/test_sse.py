"""Assembly of model output from whole bodies and stream events, as policies see it."""

import json

from ext_proc.sse import ModelOutput, SseEvent, SseReassembler


def names(output: ModelOutput) -> list[str]:
    return [call["name"] for call in output.as_input()["tool_calls"]]


def test_every_choice_is_assembled():
    output = ModelOutput("chat_completions")

    output.add_body({"choices": [
        {"index": 0, "message": {"content": "first"}, "finish_reason": "stop"},
        {"index": 1, "message": {"content": "second", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "drop_table", "arguments": "{}"}}
        ]}, "finish_reason": "tool_calls"},
    ]})

    assert output.content == "first\nsecond"
    assert names(output) == ["drop_table"]
    assert output.finish_reason == "stop"


def test_stream_choices_do_not_overwrite_each_other():
    output = ModelOutput("chat_completions")

    for index, name in ((0, "search"), (1, "drop_table")):
        output.add_chat_chunk({"choices": [{"index": index, "delta": {"tool_calls": [
            {"index": 0, "id": f"c{index}", "function": {"name": name, "arguments": ""}}
        ]}}]})

    assert sorted(names(output)) == ["drop_table", "search"]


def test_custom_and_legacy_calls_are_seen():
    output = ModelOutput("chat_completions")

    output.add_body({"choices": [{"index": 0, "message": {
        "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "drop_table", "input": "x"}}],
        "function_call": {"name": "delete_database", "arguments": "{}"},
    }}]})

    assert sorted(names(output)) == ["delete_database", "drop_table"]
    custom = next(call for call in output.as_input()["tool_calls"] if call["name"] == "drop_table")
    assert custom["arguments"] == "x"


def test_responses_tool_items_are_seen_early():
    output = ModelOutput("responses")

    output.add_responses_event({"type": "response.output_item.added", "output_index": 0,
                                "item": {"type": "custom_tool_call", "call_id": "c1", "name": "drop_table"}})
    output.add_responses_event({"type": "response.output_item.added", "output_index": 1,
                                "item": {"type": "mcp_call", "id": "m1", "name": "delete_database",
                                         "arguments": "{}"}})

    assert names(output) == ["drop_table", "delete_database"]


def test_reassembler_keeps_partial_event():
    reassembler = SseReassembler()
    event = b"data: " + json.dumps({"a": 1}).encode() + b"\n\n"

    first = reassembler.feed(event[:10])
    second = reassembler.feed(event[10:])

    assert first == []
    assert [e.json() for e in second] == [{"a": 1}]
    assert reassembler.pending == b""


def test_events_split_on_every_line_ending():
    reassembler = SseReassembler()

    events = reassembler.feed(b'data: {"a": 1}\r\rdata: {"b": 2}\n\r\ndata: {"c": 3}\r\n\r\n')

    assert [event.json() for event in events] == [{"a": 1}, {"b": 2}, {"c": 3}]


BOM = "\ufeff".encode()
STREAM = b'data: {"a": 1}\n\ndata: {"b": 2}\n\n'


def test_leading_bom_stripped():
    events = SseReassembler().feed(BOM + STREAM)

    assert [event.json() for event in events] == [{"a": 1}, {"b": 2}]
    assert events[0].raw == b'data: {"a": 1}\n\n'


def test_bom_split_across_chunks_stripped():
    for cut in range(1, len(BOM) + 1):
        reassembler = SseReassembler()
        data = BOM + STREAM

        events = reassembler.feed(data[:cut]) + reassembler.feed(data[cut:])

        assert [event.json() for event in events] == [{"a": 1}, {"b": 2}], cut


def test_only_first_bom_stripped():
    reassembler = SseReassembler()

    first = reassembler.feed(BOM + BOM + STREAM)
    later = reassembler.feed(BOM + STREAM)

    assert [event.json() for event in first] == [None, {"b": 2}]
    assert [event.json() for event in later] == [None, {"b": 2}]


def test_stream_without_bom_unchanged():
    reassembler = SseReassembler()

    first = reassembler.feed(b"\xef")
    rest = reassembler.feed(b"x\n\n" + STREAM)

    assert first == []
    assert rest[0].raw == b"\xefx\n\n"
    assert [event.json() for event in rest][1:] == [{"a": 1}, {"b": 2}]


def test_message_calls_with_same_index_both_kept():
    output = ModelOutput("chat_completions")

    output.add_body({"choices": [{"index": 0, "message": {"tool_calls": [
        {"index": 0, "function": {"name": "drop_table", "arguments": "{}"}},
        {"index": 0, "function": {"name": "search", "arguments": "{}"}},
    ]}}]})

    assert names(output) == ["drop_table", "search"]


def test_call_index_cannot_reach_another_choice():
    output = ModelOutput("chat_completions")

    output.add_chat_chunk({"choices": [
        {"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"name": "drop_table"}}]}},
        {"index": 0, "delta": {"tool_calls": [{"index": 1000, "function": {"name": "search"}}]}},
    ]})

    assert sorted(names(output)) == ["drop_table", "search"]


def test_name_fragments_are_joined():
    output = ModelOutput("chat_completions")

    for fragment in ("drop_", "table"):
        output.add_chat_chunk({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"name": fragment}}]}}]})

    assert names(output) == ["drop_table"]


def test_final_response_keeps_calls_seen_earlier():
    output = ModelOutput("responses")
    output.add_responses_event({"type": "response.output_item.added", "output_index": 0,
                                "item": {"type": "function_call", "call_id": "c1", "name": "drop_table"}})

    output.add_responses_event({"type": "response.completed", "response": {
        "status": "completed", "output": [{"type": "message", "content": [{"text": "hi"}]}]}})

    assert names(output) == ["drop_table"]


def test_deeply_nested_event_unreadable():
    data = '{"a":' * 5000 + '"x"' + "}" * 5000
    event = SseEvent(f"data: {data}\n\n".encode(), data=data)

    assert event.json() is None


def test_refusal_and_reasoning_reach_policy_not_session():
    output = ModelOutput("chat_completions")
    output.add_body({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": None, "refusal": "I refuse: SECRET",
        "reasoning_content": "thinking about SECRET",
    }}]})

    assert "I refuse: SECRET" in output.as_input()["content"]
    assert "thinking about SECRET" in output.as_input()["content"]
    assert "I refuse: SECRET" in output.readable_text
    # Clients send the message back with its content only, so only that is recorded.
    assert output.assistant_message()["content"] == ""


def test_streamed_refusal_and_content_parts_seen():
    output = ModelOutput("chat_completions")
    for delta in ({"refusal": "no, "}, {"refusal": "SECRET"}, {"content": [{"type": "text", "text": "PART"}]}):
        output.add_chat_chunk({"choices": [{"index": 0, "delta": delta}]})

    assert "no, SECRET" in output.as_input()["content"]
    assert output.content == "PART"


def test_responses_refusal_and_reasoning_seen():
    output = ModelOutput("responses")
    output.add_responses_event({"type": "response.refusal.delta", "delta": "SECRET"})
    assert "SECRET" in output.as_input()["content"]

    output.add_responses_event({"type": "response.completed", "response": {"status": "completed", "output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "REASONED"}]},
        {"type": "message", "content": [{"type": "refusal", "refusal": "REFUSED"}]},
    ]}})

    assert "REASONED" in output.as_input()["content"]
    assert "REFUSED" in output.as_input()["content"]
    assert output.content == ""


def test_hidden_text_removed_from_event():
    from ext_proc.sse import parse_event, without_hidden_text

    raw = b': comment SECRET\nid: SECRET\nretry: 100\nevent: SECRET\ndata: {"a": 1}\n\n'
    cleaned = without_hidden_text(parse_event(raw))

    assert cleaned.raw == b':\ndata: {"a": 1}\n\n'
    assert cleaned.event == ""
    assert cleaned.data == '{"a": 1}'


def test_responses_event_name_kept():
    from ext_proc.sse import parse_event, without_hidden_text

    raw = b'event: response.created\ndata: {"type": "response.created"}\n\n'
    event = parse_event(raw)

    assert without_hidden_text(event) is event
