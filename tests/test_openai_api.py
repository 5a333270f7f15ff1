"""Request fields built from each endpoint's body: every text the provider receives is in messages."""

import pytest

from ext_proc import openai_api
from ext_proc.errors import GatewayError
from ext_proc.openai_api import extract_fields
from ext_proc.sessions.fingerprint import message_fingerprint, responses_messages

PHRASE = "launch codes"


def contents(fields) -> str:
    return "\n".join(message["content"] for message in fields.messages)


def policy_contents(fields) -> str:
    return "\n".join(message["content"] for message in fields.policy_messages())


# Embeddings and completions.


def test_embeddings_string_input():
    fields = extract_fields("embeddings", {"model": "m", "input": PHRASE})

    assert fields.messages == [{"role": "user", "content": PHRASE}]


def test_embeddings_list_input():
    fields = extract_fields("embeddings", {"model": "m", "input": ["first", PHRASE]})

    assert fields.messages == [{"role": "user", "content": f"first\n{PHRASE}"}]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["one-array", "array-of-arrays"],
)
def test_embeddings_token_arrays(tokens, expected):
    fields = extract_fields("embeddings", {"model": "m", "input": tokens})

    assert [message["token_ids"] for message in fields.messages] == expected
    assert all(message["role"] == "user" for message in fields.messages)
    assert all(message["content"] == "" for message in fields.messages)


def test_embeddings_mixed_text_and_tokens():
    fields = extract_fields("embeddings", {"model": "m", "input": [PHRASE, [5, 6]]})

    assert fields.messages == [
        {"role": "user", "content": PHRASE},
        {"role": "user", "content": "", "token_ids": [5, 6]},
    ]


def test_completions_suffix_is_user_message():
    fields = extract_fields("completions", {"model": "m", "prompt": "def f():", "suffix": PHRASE})

    assert fields.messages == [
        {"role": "user", "content": "def f():"},
        {"role": "user", "content": PHRASE},
    ]


def test_completions_token_prompt():
    fields = extract_fields("completions", {"model": "m", "prompt": [[7, 8]], "suffix": PHRASE})

    assert fields.messages == [
        {"role": "user", "content": "", "token_ids": [7, 8]},
        {"role": "user", "content": PHRASE},
    ]


def test_completions_missing_prompt_keeps_empty_message():
    fields = extract_fields("completions", {"model": "m", "suffix": PHRASE})

    assert fields.messages == [
        {"role": "user", "content": ""},
        {"role": "user", "content": PHRASE},
    ]


# Chat completions.


def test_chat_refusal_part_in_content():
    body = {
        "messages": [
            {
                "role": "assistant",
                "content": [{"type": "text", "text": "No."}, {"type": "refusal", "refusal": PHRASE}],
            }
        ]
    }

    fields = extract_fields("chat_completions", body)

    assert fields.messages == [{"role": "assistant", "content": f"No.\n{PHRASE}"}]


def test_chat_refusal_field_in_content():
    body = {"messages": [{"role": "assistant", "content": None, "refusal": PHRASE}]}

    fields = extract_fields("chat_completions", body)

    assert fields.messages == [{"role": "assistant", "content": PHRASE}]


def test_chat_legacy_function_call_is_tool_call():
    call = {"name": "lookup", "arguments": '{"q": "x"}'}
    body = {"messages": [{"role": "assistant", "content": None, "function_call": call}]}

    fields = extract_fields("chat_completions", body)

    assert fields.messages[0]["tool_calls"] == [{"id": "", "type": "function", "function": call}]


@pytest.mark.parametrize(
    "content",
    [PHRASE, [{"type": "text", "text": PHRASE}]],
    ids=["string", "text-parts"],
)
def test_chat_prediction_is_assistant_message(content):
    body = {
        "messages": [{"role": "user", "content": "Fix the code."}],
        "prediction": {"type": "content", "content": content},
    }

    fields = extract_fields("chat_completions", body)

    assert fields.messages == [
        {"role": "user", "content": "Fix the code."},
        {"role": "assistant", "content": PHRASE},
    ]


def test_chat_tool_names_count_builtin_type():
    tools = [
        {"type": "function", "function": {"name": "lookup"}},
        {"type": "custom", "custom": {"name": "grep"}},
        {"type": "function", "name": "ok", "function": {"name": "delete_database"}},
        {"type": "web_search"},
        {"type": "web_search", "name": "harmless"},
    ]

    fields = extract_fields("chat_completions", {"tools": tools, "functions": [{"name": "old"}]})

    assert fields.tool_names == [
        "lookup",
        "grep",
        "delete_database",
        "ok",
        "web_search",
        "harmless",
        "web_search",
        "old",
    ]


# The Responses API.


def test_responses_custom_tool_call_output():
    body = {"input": [{"type": "custom_tool_call_output", "call_id": "c1", "output": PHRASE}]}

    fields = extract_fields("responses", body)

    assert fields.messages == [{"role": "tool", "content": PHRASE, "tool_call_id": "c1"}]


def test_responses_custom_tool_call_output_parts():
    output = [{"type": "input_text", "text": PHRASE}]
    body = {"input": [{"type": "custom_tool_call_output", "call_id": "c1", "output": output}]}

    fields = extract_fields("responses", body)

    assert contents(fields) == PHRASE


def test_responses_custom_tool_call():
    item = {"type": "custom_tool_call", "call_id": "c1", "name": "grep", "input": PHRASE}

    fields = extract_fields("responses", {"input": [item]})

    call = {"id": "c1", "type": "custom", "custom": {"name": "grep", "input": PHRASE}}
    assert fields.messages == [{"role": "assistant", "content": "", "tool_calls": [call]}]


def test_responses_reasoning_summary_and_content():
    item = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": PHRASE}],
        "content": [{"type": "reasoning_text", "text": "second thought"}],
        "encrypted_content": "gAAAA-opaque",
    }

    fields = extract_fields("responses", {"input": [item]})

    assert fields.messages == [{"role": "assistant", "content": f"{PHRASE}\nsecond thought"}]


def test_responses_output_message_refusal():
    item = {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "refusal", "refusal": PHRASE}],
    }

    fields = extract_fields("responses", {"input": [item]})

    assert fields.messages == [{"role": "assistant", "content": PHRASE}]


@pytest.mark.parametrize(
    ("item", "role"),
    [
        ({"type": "local_shell_call_output", "call_id": "c1", "output": PHRASE}, "tool"),
        ({"type": "shell_call_output", "call_id": "c1", "output": [{"stdout": PHRASE}]}, "tool"),
        ({"type": "mcp_call", "id": "m1", "name": "run", "arguments": "{}", "output": PHRASE}, "assistant"),
        ({"type": "file_search_call", "id": "f1", "queries": ["q"], "results": [{"text": PHRASE}]}, "assistant"),
        ({"type": "web_search_call", "id": "w1", "action": {"type": "search", "query": PHRASE}}, "assistant"),
        ({"type": "code_interpreter_call", "id": "i1", "code": PHRASE}, "assistant"),
        ({"type": "some_future_item", "payload": {"deep": [PHRASE]}}, "assistant"),
    ],
    ids=["local-shell-output", "shell-output", "mcp-call", "file-search", "web-search", "code", "unknown"],
)
def test_responses_other_items_keep_text(item, role):
    fields = extract_fields("responses", {"input": [item]})

    assert len(fields.messages) == 1
    assert fields.messages[0]["role"] == role
    assert PHRASE in fields.messages[0]["content"]


def test_responses_output_item_with_role():
    item = {"type": "function_call_output", "role": "user", "call_id": "c1", "output": PHRASE}

    fields = extract_fields("responses", {"input": [item]})

    assert fields.messages == [{"role": "tool", "content": PHRASE, "tool_call_id": "c1"}]


def test_responses_unknown_item_with_role():
    item = {"type": "note", "role": "user", "content": "Hi.", "output": PHRASE}

    fields = extract_fields("responses", {"input": [item]})

    assert fields.messages == [{"role": "user", "content": f"Hi.\n{PHRASE}"}]


def test_responses_other_items_skip_binary_and_ids():
    item = {
        "type": "image_generation_call",
        "id": "ig_1",
        "status": "completed",
        "result": "iVBORw0KGgo-base64",
        "revised_prompt": PHRASE,
    }

    fields = extract_fields("responses", {"input": [item]})

    assert fields.messages == [{"role": "assistant", "content": PHRASE}]


def test_responses_deeply_nested_item_is_read():
    payload = PHRASE
    for _ in range(5000):
        payload = [payload]

    fields = extract_fields("responses", {"input": [{"type": "future", "payload": payload}]})

    assert contents(fields) == PHRASE


def test_responses_prompt_variables():
    variables = {"city": PHRASE, "note": {"type": "input_text", "text": "more"}}
    body = {"prompt": {"id": "pmpt_1", "variables": variables}, "input": "Hi."}

    fields = extract_fields("responses", body)

    assert fields.messages == [
        {"role": "user", "content": f"{PHRASE}\nmore"},
        {"role": "user", "content": "Hi."},
    ]


def test_responses_tool_names_count_every_name():
    tools = [
        {"type": "function", "function": {"name": "delete_database"}},
        {"type": "function", "name": "ok", "function": {"name": "drop_table"}},
        {"type": "custom", "custom": {"name": "grep"}},
        {"type": "mcp", "server_label": "docs", "allowed_tools": {"tool_names": ["search"]}},
        {"type": "web_search", "name": "harmless"},
    ]

    fields = extract_fields("responses", {"tools": tools})

    assert fields.tool_names == [
        "delete_database",
        "drop_table",
        "ok",
        "grep",
        "mcp",
        "search",
        "harmless",
        "web_search",
    ]


def test_responses_session_fingerprint_unchanged():
    # Sessions hash their own mapping of the body; the new messages must not leak into it.
    body = {
        "input": [
            {"type": "message", "role": "user", "content": "Hi."},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": PHRASE},
            {"type": "reasoning", "summary": [{"type": "summary_text", "text": PHRASE}]},
        ]
    }

    fields = extract_fields("responses", body)

    assert len(fields.messages) == 3
    assert message_fingerprint(responses_messages(body)) == message_fingerprint(
        [{"role": "user", "content": "Hi."}]
    )


# Tools named only in tool_choice or function_call.


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "delete_database"}}},
         ["delete_database"]),
        ({"tool_choice": {"type": "custom", "custom": {"name": "delete_database"}}},
         ["delete_database"]),
        ({"tool_choice": {"type": "allowed_tools", "allowed_tools": {
            "mode": "auto", "tools": [{"type": "function", "function": {"name": "delete_database"}}]
        }}}, ["delete_database"]),
        ({"function_call": {"name": "delete_database"}}, ["delete_database"]),
        ({"tool_choice": "required", "function_call": "auto"}, []),
    ],
    ids=["function", "custom", "allowed-tools", "legacy-function-call", "strings"],
)
def test_chat_tool_choice_names_counted(body, expected):
    fields = extract_fields("chat_completions", body)

    assert fields.tool_names == expected


def test_chat_tool_choice_declared_tool_not_repeated():
    body = {
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
    }

    fields = extract_fields("chat_completions", body)

    assert fields.tool_names == ["lookup"]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "function", "name": "delete_database"}, ["delete_database"]),
        ({"type": "custom", "name": "delete_database"}, ["delete_database"]),
        ({"type": "mcp", "server_label": "db", "name": "delete_database"},
         ["delete_database", "mcp"]),
        ({"type": "file_search"}, ["file_search"]),
        ({"type": "allowed_tools", "mode": "required", "tools": [
            {"type": "function", "name": "delete_database"}, {"type": "web_search"}
        ]}, ["delete_database", "web_search"]),
        ("auto", []),
    ],
    ids=["function", "custom", "mcp", "built-in", "allowed-tools", "string"],
)
def test_responses_tool_choice_names_counted(choice, expected):
    fields = extract_fields("responses", {"tool_choice": choice})

    assert fields.tool_names == expected


# Tool definitions, output schemas and other text outside the conversation.


def test_chat_tool_definitions_are_system_message():
    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": f"Read the {PHRASE}.",
            "parameters": {
                "type": "object",
                "properties": {"secret_key": {"type": "string", "description": "the vault"}},
            },
        },
    }
    body = {"messages": [{"role": "user", "content": "Hi."}], "tools": [tool]}

    fields = extract_fields("chat_completions", body)
    messages = fields.policy_messages()

    assert messages[0] == {"role": "user", "content": "Hi."}
    assert messages[1]["role"] == "system"
    # Traces keep the conversation alone: the definitions are stored under tools.
    assert fields.messages == [{"role": "user", "content": "Hi."}]
    content = messages[1]["content"]
    assert f"Read the {PHRASE}." in content
    assert "secret_key" in content
    assert "the vault" in content
    assert fields.system_prompt == ""


def test_chat_response_format_description_read():
    schema = {"name": "answer", "description": PHRASE, "schema": {"type": "object"}}
    body = {"messages": [], "response_format": {"type": "json_schema", "json_schema": schema}}

    fields = extract_fields("chat_completions", body)

    assert PHRASE in policy_contents(fields)


@pytest.mark.parametrize(
    "body",
    [
        {"tools": [{"type": "function", "name": "lookup", "description": PHRASE}]},
        {"tools": [{"type": "custom", "name": "grep", "format": {
            "type": "grammar", "syntax": "lark", "definition": PHRASE
        }}]},
        {"text": {"format": {"type": "json_schema", "name": "a", "description": PHRASE}}},
    ],
    ids=["tool-description", "grammar-definition", "text-format-description"],
)
def test_responses_definitions_read(body):
    fields = extract_fields("responses", {"input": "Hi.", **body})

    assert fields.policy_messages()[-1]["role"] == "system"
    assert PHRASE in fields.policy_messages()[-1]["content"]


def test_responses_mcp_credentials_left_out():
    tool = {
        "type": "mcp",
        "server_label": "docs",
        "headers": {"Authorization": "Bearer header-secret"},
        "authorization": "oauth-secret",
    }

    fields = extract_fields("responses", {"input": "Hi.", "tools": [tool]})

    assert "docs" in policy_contents(fields)
    assert "secret" not in policy_contents(fields)


def test_responses_instructions_list_read():
    body = {
        "instructions": [{"type": "message", "role": "developer", "content": PHRASE}],
        "input": "Hi.",
    }

    fields = extract_fields("responses", body)

    assert fields.messages == [
        {"role": "developer", "content": PHRASE},
        {"role": "user", "content": "Hi."},
    ]
    assert fields.system_prompt == PHRASE


@pytest.mark.parametrize(
    ("nested", "expected"),
    [
        ([[PHRASE]], [{"role": "user", "content": PHRASE}]),
        ([[PHRASE, 7]], [{"role": "user", "content": PHRASE, "token_ids": [PHRASE, 7]}]),
        ([[[PHRASE]]], [{"role": "user", "content": PHRASE, "token_ids": [[PHRASE]]}]),
    ],
    ids=["strings", "strings-and-tokens", "deeper"],
)
@pytest.mark.parametrize("request_type", ["embeddings", "completions"])
def test_nested_prompt_text_read(request_type, nested, expected):
    key = "input" if request_type == "embeddings" else "prompt"

    fields = extract_fields(request_type, {key: nested})

    assert fields.messages == expected


@pytest.mark.parametrize("request_type", ["chat_completions", "responses"])
def test_object_content_read(request_type):
    message = {"role": "user", "content": {"type": "text", "text": PHRASE}}
    key = "messages" if request_type == "chat_completions" else "input"

    fields = extract_fields(request_type, {key: [message]})

    assert fields.messages == [{"role": "user", "content": PHRASE}]


def test_request_flat_charges_empty_containers():
    # Each empty object still costs its path: 200 copies of a 100,000-character key.
    body = {"x": {"k" * 100_000: [{}] * 200}}

    with pytest.raises(GatewayError) as raised:
        openai_api.flatten(body)

    assert raised.value.status == 413


def test_request_flat_keeps_leaves():
    body = {"model": "m", "metadata": {"a": [1, {"b": None}], "empty": {}}}

    assert openai_api.flatten(body) == {"model": "m", "metadata.a.0": 1, "metadata.a.1.b": None}
