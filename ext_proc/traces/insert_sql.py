"""SQL that turns a batch of serialized Trace messages into rows of ``traces`` and ``trace_steps``.

The collector sends each batch as one ProtobufList payload (the bytes of an ExportRequest,
length-prefixed) and ClickHouse parses it, so no per-row work is done in Python. The
SELECTs below apply the body mode and limit and compute the cost from a per-batch price
list. ``RowBuilder`` has scrubbed the messages before they are encoded.
"""

from __future__ import annotations

import struct
from pathlib import Path

from clickhouse_connect.driver.binding import format_str
from google.protobuf.descriptor import FieldDescriptor

from ext_proc.pb import trace_pb2
from ext_proc.traces.rows import BODY_FULL, BODY_MODES, STEP_COLUMNS, TRACE_COLUMNS, EncodedBatch

_MESSAGE_NAME = "Trace"
_SCALAR_TYPES = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_DOUBLE: "double",
}

_STEP_STRUCTURE = (
    "step_id String, step_type String, name String, start_unix_nano Int64, latency_ms Float64,"
    " status String, tool_name String, tool_args String, tool_result String, call_id String,"
    " attributes Map(String, String)"
)
# Each INSERT declares only the fields it reads, so the parser skips the rest.
TRACE_STRUCTURE = (
    "trace_id String, start_unix_nano Int64, end_unix_nano Int64, session_id String,"
    " session_turn UInt32, session_path String, session_source String, parent_trace_id String,"
    " flow_id String, proxy_id String, org_id String, environment String, key_id String,"
    " provider String, model String, model_served String, request_type String, stream Bool,"
    " method String, path String, messages String, tools String, response_content String,"
    " tokens_in Nullable(UInt32), tokens_out Nullable(UInt32), cached_tokens Nullable(UInt32),"
    " reasoning_tokens Nullable(UInt32), usage_reported Bool, latency_ms Float64,"
    " ttft_ms Nullable(Float64), overhead_ms Float64, policy_ms Float64,"
    " provider_ms Nullable(Float64), status UInt32, error_type String, error_message String,"
    " policy_outcome String, policy_rule_id String, policy_reason String,"
    " redacted_kinds Array(String), dry_run Bool, dry_run_outcome String,"
    " intent_score Nullable(Float64), intent_action String,"
    " custom_properties Map(String, String), stream_completed Nullable(Bool),"
    " finish_reason String, stream_policy_mode String,"
    " body_mode String, body_limit UInt32"
)
STEP_STRUCTURE = (
    "trace_id String, start_unix_nano Int64, proxy_id String,"
    f" steps Array(Tuple({_STEP_STRUCTURE})), body_mode String, body_limit UInt32"
)

# An empty body_mode means full, and an unknown mode from a newer worker stores the least.
_MODE = (
    f"multiIf(body_mode = '', '{BODY_FULL}',"
    f" body_mode IN ({', '.join(format_str(mode) for mode in BODY_MODES)}), body_mode, 'none')"
)


def format_schema_settings() -> dict[str, str]:
    """Return the settings that hand ClickHouse the Trace schema as text, not as a file."""
    return {
        "format_schema_source": "string",
        "format_schema": schema_text(),
        "format_schema_message_name": _MESSAGE_NAME,
    }


def setting_list(settings: dict[str, str | int]) -> str:
    """Return ``name = value, ...`` for the SETTINGS clause of an INSERT.

    Settings written into the statement cost nothing extra. Passed to clickhouse-connect
    instead, they make its chDB client run a SET before and after the query for each one.
    """
    return ", ".join(
        f"{name} = {value if isinstance(value, int) else format_str(value)}"
        for name, value in settings.items()
    )


def schema_text() -> str:
    """Return the .proto text of Step and Trace, written from the compiled descriptors.

    The compiled module is used because protos/ is not part of an installed package.
    """
    messages = [_message_text(trace_pb2.Step.DESCRIPTOR), _message_text(trace_pb2.Trace.DESCRIPTOR)]
    return 'syntax = "proto3";\n\n' + "\n".join(messages)


def _message_text(descriptor) -> str:
    lines = [f"message {descriptor.name} {{"]
    for field in descriptor.fields:
        lines.append(f"  {_field_type(field)} {field.name} = {field.number};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _field_type(field) -> str:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        message = field.message_type
        if message.GetOptions().map_entry:
            key, value = (_SCALAR_TYPES[item.type] for item in message.fields)
            return f"map<{key}, {value}>"
        return f"repeated {message.name}" if field.is_repeated else message.name
    name = _SCALAR_TYPES[field.type]
    if field.is_repeated:
        return f"repeated {name}"
    return f"optional {name}" if field.has_presence else name


def _keep_body(column: str, keep: str) -> str:
    # The cut keeps the whole characters inside the first _limit bytes, as Python's
    # encoded[:limit].decode(errors="ignore") does. A character fits when the next one
    # starts at or before byte _limit + 1, and lengthUTF8 counts the start bytes.
    cut = f"substringUTF8({column}, 1, lengthUTF8(substring({column}, 2, _limit)))"
    return f"if(({keep}) AND {column} != '', if(length({column}) <= _limit, {column}, {cut}), '')"


def _floats(values: list[float]) -> str:
    # Bit patterns keep every price exact, because a decimal literal would be parsed again.
    bits = ", ".join(str(struct.unpack("<Q", struct.pack("<d", value))[0]) for value in values)
    return f"arrayMap(x -> reinterpretAsFloat64(x), CAST([{bits}], 'Array(UInt64)'))"


def _cost(batch: EncodedBatch) -> str:
    names = ", ".join(format_str(name) for name in batch.price_names)
    cached = "least(ifNull(cached_tokens, 0), ifNull(tokens_in, 0))"
    total = (
        f"(ifNull(tokens_in, 0) - {cached}) * {_floats(batch.price_input)}[_price]"
        f" + {cached} * {_floats(batch.price_cached)}[_price]"
        f" + ifNull(tokens_out, 0) * {_floats(batch.price_output)}[_price]"
    )
    price = (
        f"indexOf(CAST([{names}], 'Array(String)'), if(model_served != '', model_served, model))"
    )
    return (
        f"if(({price} AS _price) = 0 OR (tokens_in IS NULL AND tokens_out IS NULL),"
        f" NULL, ({total}) / 1000000)"
    )


def traces_select(batch: EncodedBatch, source: str, settings: str = "") -> str:
    """Return ``INSERT INTO traces SELECT ...`` reading the batch from ``source``.

    ``source`` is ``file_source`` or ``input_source`` of ``TRACE_STRUCTURE``; ``settings``
    is empty or a ``setting_list``.
    """
    expressions = {name: name for name in TRACE_COLUMNS}
    expressions.update(
        timestamp="fromUnixTimestamp64Micro(intDiv(start_unix_nano, 1000), 'UTC')",
        end_timestamp=(
            "fromUnixTimestamp64Micro(intDiv(if(end_unix_nano != 0, end_unix_nano,"
            " start_unix_nano), 1000), 'UTC')"
        ),
        messages=_keep_body("messages", "_mode = 'full'"),
        tools=_keep_body("tools", "_mode != 'none'"),
        response_content=_keep_body("response_content", "_mode = 'full'"),
        body_mode="_mode",
        cost_usd="_cost",
        price_version=f"if(_cost IS NULL, '', {format_str(batch.price_version)})",
    )
    selected = ", ".join(expressions[name] for name in TRACE_COLUMNS)
    return (
        f"INSERT INTO traces ({', '.join(TRACE_COLUMNS)}) {_settings_clause(settings)}"
        f" SELECT {selected} FROM (SELECT *, {_MODE} AS _mode,"
        f" if(body_limit = 0, {batch.default_body_limit}, body_limit) AS _limit,"
        f" {_cost(batch)} AS _cost FROM {source})"
    )


def steps_select(batch: EncodedBatch, source: str, settings: str = "") -> str:
    """Return ``INSERT INTO trace_steps SELECT ...`` reading the batch from ``source``.

    ``source`` is ``file_source`` or ``input_source`` of ``STEP_STRUCTURE``; ``settings``
    is empty or a ``setting_list``.
    """

    def step(field: str) -> str:
        return f"tupleElement(_step, '{field}')"

    expressions = {name: step(name) for name in STEP_COLUMNS}
    expressions.update(
        trace_id="trace_id",
        parent_trace_id="trace_id",
        proxy_id="proxy_id",
        timestamp=(
            f"fromUnixTimestamp64Micro(intDiv(if({step('start_unix_nano')} != 0,"
            f" {step('start_unix_nano')}, start_unix_nano), 1000), 'UTC')"
        ),
        tool_args=_keep_body(step("tool_args"), "_mode = 'full'"),
        tool_result=_keep_body(step("tool_result"), "_mode = 'full'"),
    )
    selected = ", ".join(expressions[name] for name in STEP_COLUMNS)
    return (
        f"INSERT INTO trace_steps ({', '.join(STEP_COLUMNS)}) {_settings_clause(settings)}"
        f" SELECT {selected} FROM (SELECT trace_id, proxy_id, start_unix_nano, steps,"
        f" {_MODE} AS _mode, if(body_limit = 0, {batch.default_body_limit}, body_limit) AS _limit"
        f" FROM {source}) ARRAY JOIN steps AS _step"
    )


def _settings_clause(settings: str) -> str:
    return f"SETTINGS {settings}" if settings else ""


def file_source(path: Path, structure: str) -> str:
    return f"file({format_str(str(path))}, 'ProtobufList', {format_str(structure)})"


def input_source(structure: str) -> str:
    return f"input({format_str(structure)})"
