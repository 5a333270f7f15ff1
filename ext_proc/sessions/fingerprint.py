"""Conversation histories in one canonical form, and their SHA-256 fingerprints.

Chat Completions and Responses API requests describe the same conversation in different
shapes. Both are reduced here to chat-style messages that keep only ``role``, ``content``,
``tool_calls`` and ``tool_call_id``, so that a history hashes the same whichever API,
key order or text-part layout the client used.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ext_proc import json_text

# Content parts that carry plain text, in the Chat Completions and Responses API shapes.
_TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})


def message_fingerprint(messages: list[dict]) -> str:
    """Return the hex SHA-256 of the canonical JSON of ``messages``."""
    canonical = [normalize_message(message) for message in messages]
    encoded = json_text.compact_sorted(canonical)
    # surrogatepass: text from a lenient parser may contain an unpaired surrogate.
    return hashlib.sha256(encoded.encode("utf-8", "surrogatepass")).hexdigest()


def normalize_message(message: dict) -> dict:
    normalized: dict[str, Any] = {
        "role": message.get("role"),
        "content": _normalize_content(message.get("content")),
    }
    tool_calls = message.get("tool_calls")
    if tool_calls:
        normalized["tool_calls"] = [_normalize_tool_call(call) for call in tool_calls]
    if message.get("tool_call_id") is not None:
        normalized["tool_call_id"] = message["tool_call_id"]
    return normalized


def _normalize_content(content: Any) -> Any:
    # A client may echo an assistant turn as a string, as null, or as a list of text parts:
    # all of these describe the same message.
    if content in (None, "", []):
        return None
    if not isinstance(content, list):
        return content
    parts = [part for part in content if isinstance(part, dict)]
    if len(parts) == len(content) and all(part.get("type") in _TEXT_PART_TYPES for part in parts):
        return "".join(str(part.get("text", "")) for part in parts)
    return [_normalize_part(part) for part in content]


def _normalize_part(part: Any) -> Any:
    if isinstance(part, dict) and part.get("type") in _TEXT_PART_TYPES:
        return {"type": "text", "text": part.get("text")}
    return part


def _normalize_tool_call(call: Any) -> Any:
    if not isinstance(call, dict):
        return call
    function = call.get("function") or {}
    return {
        "id": call.get("id"),
        "type": call.get("type", "function"),
        "function": {"name": function.get("name"), "arguments": function.get("arguments")},
    }


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [message for message in messages if isinstance(message, dict)]


def responses_messages(body: dict) -> list[dict]:
    """Build chat-style messages from a Responses API ``instructions`` and ``input``."""
    messages: list[dict] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})

    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        for item in items:
            message = _responses_item_message(item)
            if message is not None:
                messages.append(message)
    return messages


def _responses_item_message(item: Any) -> dict | None:
    if not isinstance(item, dict):
        return None
    item_type = item.get("type", "message")
    if item_type == "message" and "role" in item:
        return {"role": item["role"], "content": item.get("content")}
    if item_type == "function_call":
        function = {"name": item.get("name"), "arguments": item.get("arguments")}
        call = {"id": item.get("call_id"), "type": "function", "function": function}
        return {"role": "assistant", "content": None, "tool_calls": [call]}
    if item_type == "function_call_output":
        return {"role": "tool", "content": item.get("output"), "tool_call_id": item.get("call_id")}
    # Reasoning items, item references and built-in tool calls are left out: the gateway
    # never records them, so hashing them would only stop histories from matching.
    return None


def history_lookup_fingerprint(messages: list[dict]) -> str | None:
    """Fingerprint everything but the last message, or None when it cannot match anything.

    Only histories that end with a recorded model reply are stored, so a prefix without an
    assistant message (a first turn, or a shared system prompt) cannot match. Looking it up
    anyway would only cost a query.
    """
    prefix = messages[:-1]
    if not any(message.get("role") == "assistant" for message in prefix):
        return None
    return message_fingerprint(prefix)
