"""Conversion of Trace messages into the column lists the collector inserts.

This is the collector's single write path, so every rule about what may be stored is
applied here: secrets and PII are scrubbed from every string of the trace and its steps,
bodies are kept, cut or dropped by the trace's ``body_mode``, and the cost is computed
from the price table.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter

from ext_proc.pb import trace_pb2
from ext_proc.traces.cost import PriceTable
from ext_proc.traces.scrub import Scrubber

BODY_FULL = "full"
BODY_METADATA = "metadata"
BODY_NONE = "none"
BODY_MODES = (BODY_FULL, BODY_METADATA, BODY_NONE)
DEFAULT_BODY_LIMIT = 32 * 1024

TRACE_COLUMNS = (
    "trace_id", "timestamp", "end_timestamp", "session_id", "session_turn", "session_path",
    "session_source", "parent_trace_id", "flow_id", "proxy_id", "org_id", "environment",
    "key_id", "provider", "model", "model_served", "request_type", "stream", "method", "path",
    "messages", "tools", "response_content", "tokens_in", "tokens_out", "cached_tokens",
    "reasoning_tokens", "usage_reported", "latency_ms", "ttft_ms", "overhead_ms", "policy_ms",
    "provider_ms", "status", "error_type", "error_message", "policy_outcome", "policy_rule_id",
    "policy_reason", "redacted_kinds", "dry_run", "dry_run_outcome", "intent_score",
    "intent_action", "custom_properties", "stream_completed", "finish_reason",
    "stream_policy_mode", "body_mode", "cost_usd", "price_version",
)  # fmt: skip

STEP_COLUMNS = (
    "trace_id", "step_id", "parent_trace_id", "proxy_id", "step_type", "name", "timestamp",
    "latency_ms", "status", "tool_name", "tool_args", "tool_result", "call_id", "attributes",
)  # fmt: skip

_TRACE_INDEX = {name: index for index, name in enumerate(TRACE_COLUMNS)}
_STEP_INDEX = {name: index for index, name in enumerate(STEP_COLUMNS)}
_TRACE_STRINGS = tuple(
    _TRACE_INDEX[name]
    for name in TRACE_COLUMNS
    if name
    not in (
        "timestamp", "end_timestamp", "session_turn", "stream", "tokens_in", "tokens_out",
        "cached_tokens", "reasoning_tokens", "usage_reported", "latency_ms", "ttft_ms",
        "overhead_ms", "policy_ms", "provider_ms", "status", "redacted_kinds", "dry_run",
        "intent_score", "custom_properties", "stream_completed", "cost_usd",
    )
)  # fmt: skip
_STEP_STRINGS = tuple(
    _STEP_INDEX[name]
    for name in STEP_COLUMNS
    if name not in ("timestamp", "latency_ms", "attributes")
)
_get_trace_strings = itemgetter(*_TRACE_STRINGS)
_get_step_strings = itemgetter(*_STEP_STRINGS)
_TRACE_MAPS = (_TRACE_INDEX["custom_properties"],)
_STEP_MAPS = (_STEP_INDEX["attributes"],)
_MESSAGES, _TOOLS, _RESPONSE = (_TRACE_INDEX[n] for n in ("messages", "tools", "response_content"))
_TOOL_ARGS, _TOOL_RESULT = _STEP_INDEX["tool_args"], _STEP_INDEX["tool_result"]


@dataclass
class ColumnBatch:
    """Column-oriented data for one insert into ``traces`` and one into ``trace_steps``."""

    traces: list[list]
    steps: list[list]
    trace_count: int
    step_count: int


class RowBuilder:
    """Builds insert columns from Trace messages, applying scrubbing, body mode and cost."""

    def __init__(self, prices: PriceTable, scrubber: Scrubber, default_body_limit: int) -> None:
        self.prices = prices
        self.scrubber = scrubber
        self.default_body_limit = default_body_limit or DEFAULT_BODY_LIMIT

    def build(self, traces: list[trace_pb2.Trace]) -> ColumnBatch:
        trace_rows = []
        step_rows = []
        for trace in traces:
            mode, limit = self._body_policy(trace)
            row = self._trace_row(trace, mode)
            steps = [self._step_row(trace, step) for step in trace.steps]
            if self._needs_scrub(row, steps):
                self._scrub(row, _TRACE_STRINGS, _TRACE_MAPS)
                for step_row in steps:
                    self._scrub(step_row, _STEP_STRINGS, _STEP_MAPS)
            # Cut after scrubbing, so a cut can never leave part of a secret unrecognised.
            _apply_body_mode(row, steps, mode, limit)
            trace_rows.append(row)
            step_rows.extend(steps)
        return ColumnBatch(
            traces=_transpose(trace_rows, len(TRACE_COLUMNS)),
            steps=_transpose(step_rows, len(STEP_COLUMNS)),
            trace_count=len(trace_rows),
            step_count=len(step_rows),
        )

    def _body_policy(self, trace: trace_pb2.Trace) -> tuple[str, int]:
        mode = trace.body_mode or BODY_FULL
        if mode not in BODY_MODES:
            # An unknown mode from a newer worker stores less, never more.
            mode = BODY_NONE
        return mode, trace.body_limit or self.default_body_limit

    def _trace_row(self, t: trace_pb2.Trace, mode: str) -> list:
        start_us = t.start_unix_nano // 1000
        end_us = t.end_unix_nano // 1000 if t.end_unix_nano else start_us
        tokens_in = t.tokens_in if t.HasField("tokens_in") else None
        tokens_out = t.tokens_out if t.HasField("tokens_out") else None
        cached = t.cached_tokens if t.HasField("cached_tokens") else None
        cost = self.prices.cost_usd(t.model_served or t.model, tokens_in, tokens_out, cached)
        return [
            t.trace_id, start_us, end_us, t.session_id, t.session_turn, t.session_path,
            t.session_source, t.parent_trace_id, t.flow_id, t.proxy_id, t.org_id, t.environment,
            t.key_id, t.provider, t.model, t.model_served, t.request_type, t.stream, t.method,
            t.path, t.messages, t.tools, t.response_content, tokens_in, tokens_out, cached,
            t.reasoning_tokens if t.HasField("reasoning_tokens") else None,
            t.usage_reported, t.latency_ms,
            t.ttft_ms if t.HasField("ttft_ms") else None,
            t.overhead_ms, t.policy_ms,
            t.provider_ms if t.HasField("provider_ms") else None,
            t.status, t.error_type, t.error_message, t.policy_outcome, t.policy_rule_id,
            t.policy_reason, list(t.redacted_kinds), t.dry_run, t.dry_run_outcome,
            t.intent_score if t.HasField("intent_score") else None,
            t.intent_action, dict(t.custom_properties),
            t.stream_completed if t.HasField("stream_completed") else None,
            t.finish_reason, t.stream_policy_mode, mode, cost,
            self.prices.version if cost is not None else "",
        ]  # fmt: skip

    def _step_row(self, t: trace_pb2.Trace, s: trace_pb2.Step) -> list:
        start_us = s.start_unix_nano // 1000 if s.start_unix_nano else t.start_unix_nano // 1000
        return [
            t.trace_id, s.step_id, t.trace_id, t.proxy_id, s.step_type, s.name, start_us,
            s.latency_ms, s.status, s.tool_name, s.tool_args, s.tool_result, s.call_id,
            dict(s.attributes),
        ]  # fmt: skip

    def _needs_scrub(self, row: list, steps: list[list]) -> bool:
        # One scan over the trace's joined text decides; most traces hold nothing to remove.
        parts = list(_get_trace_strings(row))
        _add_map_text(parts, row, _TRACE_MAPS)
        for step_row in steps:
            parts.extend(_get_step_strings(step_row))
            _add_map_text(parts, step_row, _STEP_MAPS)
        return self.scrubber.finds_anything("\x00".join(parts))

    def _scrub(self, row: list, string_indexes: tuple, map_indexes: tuple) -> None:
        scrub = self.scrubber.scrub
        for index in string_indexes:
            row[index] = scrub(row[index])
        for index in map_indexes:
            row[index] = {scrub(key): scrub(value) for key, value in row[index].items()}


def _add_map_text(parts: list, row: list, map_indexes: tuple) -> None:
    for index in map_indexes:
        if row[index]:
            parts.extend(row[index].keys())
            parts.extend(row[index].values())


def _apply_body_mode(row: list, steps: list[list], mode: str, limit: int) -> None:
    for index, keep in (
        (_MESSAGES, mode == BODY_FULL),
        (_TOOLS, mode != BODY_NONE),
        (_RESPONSE, mode == BODY_FULL),
    ):
        row[index] = _keep_body(row[index], keep, limit)
    for step_row in steps:
        for index in (_TOOL_ARGS, _TOOL_RESULT):
            step_row[index] = _keep_body(step_row[index], mode == BODY_FULL, limit)


def _keep_body(text: str, keep: bool, limit: int) -> str:
    if not keep or not text:
        return ""
    # A str of n characters encodes to at most 4n UTF-8 bytes.
    if len(text) * 4 <= limit:
        return text
    encoded = text.encode()
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode(errors="ignore")


def _transpose(rows: list[list], width: int) -> list[list]:
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows)]
