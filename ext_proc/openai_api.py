"""Fields the gateway reads from OpenAI-format requests: route, endpoint and body.

The four governed endpoints map onto one set of fields (model, stream, messages, tools,
tool names, system prompt), so a policy written against ``input.tool_names`` works for
chat completions and the Responses API alike.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ext_proc import errors, json_text
from ext_proc.errors import GatewayError

ROUTE_PATTERN = re.compile(r"^/a/([A-Za-z0-9_-]{1,64})/openai/v1(/[^?#]*)?(\?.*)?$")

# Governed endpoint paths (after /openai/v1) and the request_type each one records.
ENDPOINTS = {
    "/chat/completions": "chat_completions",
    "/responses": "responses",
    "/embeddings": "embeddings",
    "/completions": "completions",
}

MAX_PROPERTIES = 20
MAX_PROPERTY_KEY_CHARS = 64
MAX_PROPERTY_VALUE_CHARS = 512
RESERVED_PROPERTY_PREFIX = "policy_"
PROPERTY_HEADER_PREFIX = "x-xenovia-property-"

# Headers whose values never reach a policy or a trace.
SECRET_HEADERS = frozenset(
    {"authorization", "x-xenovia-key", "proxy-authorization", "cookie", "x-api-key", "api-key"}
)


@dataclass(frozen=True)
class Route:
    proxy_id: str
    rest: str
    query: str


def parse_route(path: str) -> Route | None:
    match = ROUTE_PATTERN.match(path)
    if match is None:
        return None
    return Route(match.group(1), match.group(2) or "", match.group(3) or "")


def parse_properties(headers: dict[str, str]) -> dict[str, str]:
    """Collect ``X-Xenovia-Property-<name>`` headers; raise GatewayError on a broken limit."""
    properties = {}
    for name, value in headers.items():
        if not name.startswith(PROPERTY_HEADER_PREFIX):
            continue
        key = name[len(PROPERTY_HEADER_PREFIX) :]
        if not key:
            raise _property_error("property header X-Xenovia-Property- has no property name")
        if len(key) > MAX_PROPERTY_KEY_CHARS:
            raise _property_error(
                f"property name {key[:80]!r} is longer than {MAX_PROPERTY_KEY_CHARS} characters"
            )
        if key.startswith(RESERVED_PROPERTY_PREFIX):
            raise _property_error(
                f"property name {key!r} uses the reserved prefix {RESERVED_PROPERTY_PREFIX!r}"
            )
        if len(value) > MAX_PROPERTY_VALUE_CHARS:
            raise _property_error(
                f"property {key!r} value is longer than {MAX_PROPERTY_VALUE_CHARS} characters"
            )
        properties[key] = value
    if len(properties) > MAX_PROPERTIES:
        raise _property_error(
            f"{len(properties)} X-Xenovia-Property headers sent; at most {MAX_PROPERTIES} allowed"
        )
    return properties


def _property_error(message: str) -> GatewayError:
    return GatewayError(400, errors.INVALID_PROPERTY, message)


def policy_headers(headers: dict[str, str]) -> dict[str, str]:
    """Return the request headers a policy may see: secret values replaced, pseudo headers dropped."""
    visible = {}
    for name, value in headers.items():
        if name.startswith(":"):
            continue
        visible[name] = "[REDACTED]" if name in SECRET_HEADERS else value
    return visible


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        # Parsers disagree on which duplicate wins, so the policy could check one value
        # while the provider uses the other.
        raise ValueError(f"duplicate key {duplicate[:80]!r}")
    return document


def _reject_large_number(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


# regorus stores integers in 64 bits and reads larger ones as doubles, so a policy would
# compare 2**64 as equal to 2**64 - 1 while the provider reads the exact digits.
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _reject_large_int(text: str) -> int:
    # 2**64 has 20 digits, so a longer integer is out of range before int() parses it.
    value = int(text) if len(text) <= 21 else None
    if value is None or not _INT_MIN <= value <= _INT_MAX:
        raise ValueError(f"integer {text[:40]} is out of the 64-bit range")
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_body(body: bytes) -> dict:
    """Parse a request body; raise GatewayError 400 unless it is a strict JSON object.

    Strict means UTF-8 without a byte-order mark, no duplicate keys, no NaN or infinite
    numbers, no integers beyond 64 bits and no unpaired surrogates: anything another JSON
    parser (or the policy engine) could read differently from this one is rejected,
    because the body is forwarded as sent.
    """
    if not body:
        raise GatewayError(400, errors.INVALID_JSON, "request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("byte-order mark before the JSON text")
        document = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_reject_large_number,
            parse_int=_reject_large_int,
            object_pairs_hook=_unique_keys,
        )
        if _SURROGATE_ESCAPE.search(body):
            _check_encodable(document)
    except (ValueError, UnicodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise GatewayError(400, errors.INVALID_JSON, f"request body is not valid JSON: {reason}") from exc
    if not isinstance(document, dict):
        raise GatewayError(400, errors.INVALID_JSON, "request body must be a JSON object")
    return document


_SURROGATE_ESCAPE_TEXT = re.compile(r"\\u[dD][89a-fA-F]")


def parse_provider_json(text: str | bytes) -> Any:
    """Parse JSON from a provider; raise ValueError for what a policy could not govern.

    That is NaN and infinite numbers (the json module reads them, most other parsers do not),
    unpaired surrogate escapes (the text cannot be encoded again) and nesting too deep to
    parse. Duplicate keys are accepted here, unlike in requests: the last value wins.
    """
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_reject_large_number)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    pattern = _SURROGATE_ESCAPE if isinstance(text, bytes) else _SURROGATE_ESCAPE_TEXT
    if pattern.search(text):
        _check_encodable(value)
    return value


def _check_encodable(value: Any) -> None:
    if isinstance(value, str):
        value.encode("utf-8")
    elif isinstance(value, dict):
        for key, item in value.items():
            key.encode("utf-8")
            _check_encodable(item)
    elif isinstance(value, list):
        for item in value:
            _check_encodable(item)


@dataclass
class RequestFields:
    """Normalised view of one request body, shared by policies, sessions and traces."""

    model: str = ""
    stream: bool = False
    messages: list[dict] = field(default_factory=list)
    tools: list = field(default_factory=list)
    tool_names: list[str] = field(default_factory=list)
    system_prompt: str = ""
    # Tool definitions and output schemas: the model reads their text as instructions.
    definitions: list = field(default_factory=list)
    _definitions_message: dict | None = field(default=None, repr=False, compare=False)

    def policy_messages(self) -> list[dict]:
        """Return the messages, then one system message with the definitions as JSON text.

        Built only for the policy input, so that traces store the conversation alone, and
        once per request, although both stages' policies may read it.
        """
        if not self.definitions:
            return self.messages
        if self._definitions_message is None:
            text = json_text.compact(self.definitions)
            if any(f'"{key}"' in text for key in _SECRET_KEYS):
                # Rare (MCP tools): rebuilt without the credentials, which are not model text.
                text = json_text.compact(_without_keys(self.definitions, _SECRET_KEYS))
            self._definitions_message = {"role": "system", "content": text}
        return [*self.messages, self._definitions_message]


def extract_fields(request_type: str, body: dict) -> RequestFields:
    model = body.get("model")
    fields = RequestFields(model=model if isinstance(model, str) else "")
    fields.stream = body.get("stream") is True
    definitions: list = []
    if request_type == "chat_completions":
        fields.messages = _chat_messages(body)
        # Legacy "functions" are tools too: providers that still accept them call them.
        fields.tools = _list(body.get("tools")) + _list(body.get("functions"))
        fields.tool_names = _tool_names(fields.tools)
        _add_chosen_names(fields.tool_names, body.get("tool_choice"))
        _add_chosen_names(fields.tool_names, body.get("function_call"))
        definitions = [fields.tools, body.get("response_format")]
    elif request_type == "responses":
        fields.messages = _responses_messages(body)
        fields.tools = _list(body.get("tools"))
        fields.tool_names = _tool_names(fields.tools)
        _add_chosen_names(fields.tool_names, body.get("tool_choice"))
        text = body.get("text")
        definitions = [fields.tools, text.get("format") if isinstance(text, dict) else None]
    elif request_type == "completions":
        fields.messages = _prompt_messages(body.get("prompt")) or [{"role": "user", "content": ""}]
        if isinstance(body.get("suffix"), str):
            fields.messages.append({"role": "user", "content": body["suffix"]})
    elif request_type == "embeddings":
        fields.messages = _prompt_messages(body.get("input"))
    for message in fields.messages:
        if message.get("role") in ("system", "developer"):
            fields.system_prompt = message.get("content", "")
            break
    fields.definitions = [item for item in definitions if item]
    return fields


def _add_chosen_names(names: list[str], choice: Any) -> None:
    """Add the tool names a ``tool_choice`` or legacy ``function_call`` names to ``names``.

    A provider may call a tool that is only named here and never declared, so the policy
    must see it. ``allowed_tools`` choices add every tool they list.
    """
    if not isinstance(choice, dict):
        return
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools")
        # Chat nests the list under "allowed_tools"; Responses puts it on the choice.
        listed = _list(choice.get("tools"))
        if isinstance(allowed, dict):
            listed = listed + _list(allowed.get("tools"))
        chosen = _tool_names(listed)
    else:
        chosen = _tool_names([choice])
    names.extend(name for name in chosen if name not in names)


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _text_of(content: Any) -> str:
    """Flatten OpenAI content (a string or a list of parts) to text.

    A part contributes its ``text`` and its ``refusal``, whatever its ``type``, so that
    text parts, refusal parts and summary parts are all read.
    """
    if isinstance(content, str):
        return content
    return "\n".join(text for _, text in content_part_texts(content))


def content_part_texts(content: Any) -> list[tuple[str, str]]:
    """Return ("text" or "refusal", text) for each text of a list of content parts, in order.

    A bare string in the list is a text. A single part sent without its list counts as a
    list of one, because providers that accept it read its text.
    """
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        return []
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(("text", part))
        elif isinstance(part, dict):
            for kind in ("text", "refusal"):
                if isinstance(part.get(kind), str):
                    texts.append((kind, part[kind]))
    return texts


def _prompt_messages(prompt: Any) -> list[dict]:
    """Map a completions prompt or an embeddings input to user messages.

    The strings are joined into one message. A token array cannot be read as text without
    the model's tokenizer, so each one becomes a message with empty content and the ids
    under ``token_ids``.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    items = _list(prompt)
    if items and all(isinstance(item, int) for item in items):
        return [{"role": "user", "content": "", "token_ids": items}]
    messages = []
    texts = [item for item in items if isinstance(item, str)]
    if texts:
        messages.append({"role": "user", "content": "\n".join(texts)})
    for item in items:
        if not isinstance(item, list):
            continue
        if all(isinstance(token, int) for token in item):
            messages.append({"role": "user", "content": "", "token_ids": item})
        elif all(isinstance(text, str) for text in item):
            messages.append({"role": "user", "content": "\n".join(item)})
        else:
            # A nested list mixing text and other values: its strings at any depth are the
            # content, and token_ids keeps the list so token checks still apply.
            text = "\n".join(_strings_in(item, frozenset()))
            messages.append({"role": "user", "content": text, "token_ids": item})
    return messages


def _chat_messages(body: dict) -> list[dict]:
    messages = []
    for message in _list(body.get("messages")):
        if not isinstance(message, dict):
            continue
        content = _text_of(message.get("content"))
        if isinstance(message.get("refusal"), str):
            content = f"{content}\n{message['refusal']}" if content else message["refusal"]
        entry = {"role": str(message.get("role", "")), "content": content}
        if isinstance(message.get("tool_calls"), list):
            entry["tool_calls"] = message["tool_calls"]
        if isinstance(message.get("function_call"), dict):
            # The legacy single call an assistant message may carry instead of tool_calls.
            legacy = {"id": "", "type": "function", "function": message["function_call"]}
            entry["tool_calls"] = [*entry.get("tool_calls", []), legacy]
        if isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        messages.append(entry)
    prediction = body.get("prediction")
    if isinstance(prediction, dict) and "content" in prediction:
        # Predicted output is text the model reads as a draft of its response.
        messages.append({"role": "assistant", "content": _text_of(prediction["content"])})
    return messages


def _tool_names(tools: list) -> list[str]:
    """List every name each tool carries, and its type unless that is function or custom.

    Every name the entry carries counts, whichever block its type selects, so that a provider
    reading another block than the policy cannot call an unchecked tool. A built-in tool
    (web_search, ...) is what its type says, even when it also carries a name. An MCP tool
    adds every name in its allowed_tools list.
    """
    names = []
    for tool in tools:
        if not isinstance(tool, dict):
            continue
        found: list[str] = []
        for holder in (tool.get("function"), tool.get("custom"), tool):
            name = holder.get("name") if isinstance(holder, dict) else None
            if isinstance(name, str) and name and name not in found:
                found.append(name)
        tool_type = tool.get("type")
        if isinstance(tool_type, str) and (not found or tool_type not in ("function", "custom")):
            if tool_type not in found:
                found.append(tool_type)
        names.extend(found)
        allowed = tool.get("allowed_tools")
        if isinstance(allowed, dict):
            allowed = allowed.get("tool_names")
        if isinstance(allowed, list):
            names.extend(name for name in allowed if isinstance(name, str))
    return names


def _responses_messages(body: dict) -> list[dict]:
    messages = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    for item in _list(instructions):
        # Instructions given as a list of input items are read like input items.
        if isinstance(item, dict):
            message = _responses_item_message(item)
            if message is not None:
                messages.append(message)
    prompt = body.get("prompt")
    if isinstance(prompt, dict) and isinstance(prompt.get("variables"), dict):
        # The provider substitutes these values into a stored prompt template.
        text = _text_of(list(prompt["variables"].values()))
        if text:
            messages.append({"role": "user", "content": text})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    for item in _list(items):
        if isinstance(item, dict):
            message = _responses_item_message(item)
            if message is not None:
                messages.append(message)
    return messages


def _responses_item_message(item: dict) -> dict | None:
    item_type = item.get("type", "message")
    if item_type == "message":
        return {"role": str(item.get("role", "user")), "content": _text_of(item.get("content"))}

    if item_type in ("function_call_output", "custom_tool_call_output"):
        return {
            "role": "tool",
            "content": _text_of(item.get("output")),
            "tool_call_id": str(item.get("call_id", "")),
        }

    if item_type in ("function_call", "custom_tool_call"):
        # Chat's shape: {"type": "function", "function": {name, arguments}}, and the same
        # with "custom" and "input" for a custom tool.
        if item_type == "function_call":
            kind, text_field = "function", "arguments"
        else:
            kind, text_field = "custom", "input"
        call = {
            "id": str(item.get("call_id", "")),
            "type": kind,
            kind: {"name": item.get("name", ""), text_field: item.get(text_field, "")},
        }
        return {"role": "assistant", "content": "", "tool_calls": [call]}

    if item_type == "reasoning":
        texts = (_text_of(item.get("summary")), _text_of(item.get("content")))
        return {"role": "assistant", "content": "\n".join(text for text in texts if text)}

    # Built-in tool calls, their outputs, item types added after this code was written and
    # any item with unexpected keys: every string they carry counts, so that no text reaches
    # the provider unchecked.
    skipped = _IMAGE_RESULT_KEYS if item_type == "image_generation_call" else _NON_TEXT_KEYS
    text = "\n".join(_strings_in(item, skipped))
    if not text:
        return None

    if str(item_type).endswith("_output") and isinstance(item.get("call_id"), str):
        return {"role": "tool", "content": text, "tool_call_id": item["call_id"]}
    role = item.get("role")
    return {"role": role if isinstance(role, str) else "assistant", "content": text}


# Keys of Responses input items whose strings are identifiers, states or base64 data
# (images, files, encrypted reasoning), never text the model reads.
_NON_TEXT_KEYS = frozenset(
    {
        "type", "id", "call_id", "role", "status",
        "encrypted_content", "image_url", "file_data", "file_id",
    }
)
# An image generation call's result is the base64 image.
_IMAGE_RESULT_KEYS = _NON_TEXT_KEYS | {"result"}
# Keys of an MCP tool definition whose values are credentials sent to the MCP server. The
# model never reads them, so they stay out of the policy input.
_SECRET_KEYS = frozenset({"headers", "authorization"})


def _without_keys(value: Any, skipped: frozenset[str]) -> Any:
    """Return a copy of a JSON value without the entries under the keys in ``skipped``."""
    if isinstance(value, dict):
        return {
            key: _without_keys(item, skipped) for key, item in value.items() if key not in skipped
        }
    if isinstance(value, list):
        return [_without_keys(item, skipped) for item in value]
    return value


def _strings_in(value: Any, skipped: frozenset[str]) -> list[str]:
    """Collect the strings in a value in document order, without recursion.

    Values under a key in ``skipped`` are left out at any depth.
    """
    strings = []
    pending: list[Any] = [value]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            entries = [item for key, item in value.items() if key not in skipped]
            entries.reverse()
            pending.extend(entries)
        elif isinstance(value, list):
            pending.extend(reversed(value))
    return strings


# Every leaf's key repeats its whole path, so a deep or wide body flattens into far more
# text than it contains (an 800 KB body 300 levels deep gave 248 MB). Beyond this many
# characters of paths in all, the policy input is not built and the request is rejected.
MAX_FLAT_KEY_CHARS = 16 * 1024 * 1024


def flatten(document: Any) -> dict:
    """Flatten nested objects and lists to one level with dotted keys (``messages.0.role``).

    Raises GatewayError 413 when the paths built, empty objects' included, would exceed
    MAX_FLAT_KEY_CHARS characters in all.
    """
    out: dict = {}
    budget = [MAX_FLAT_KEY_CHARS]
    _flatten_into(document, "", out, budget)
    return out


def _flatten_into(document: Any, prefix: str, out: dict, budget: list[int]) -> None:
    if isinstance(document, dict):
        items = document.items()
    elif isinstance(document, list):
        items = enumerate(document)
    else:
        out[prefix[:-1]] = document
        return
    for key, value in items:
        path = f"{prefix}{key}."
        # Every path built is charged, an empty object's too, so the work stays bounded.
        budget[0] -= len(path)
        if budget[0] < 0:
            raise GatewayError(
                413, errors.REQUEST_TOO_LARGE,
                f"the request has too many nested values for request_flat, the policy input "
                f"that lists every value by its path: the paths would exceed "
                f"{MAX_FLAT_KEY_CHARS:,} characters; send fewer or less deeply nested values",
            )
        _flatten_into(value, path, out, budget)
