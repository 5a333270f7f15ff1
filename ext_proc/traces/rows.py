"""Preparation of Trace batches for the collector's insert.

This is the collector's single write path, so every rule about what may be stored is
applied here or in the SQL of ``insert_sql``: secrets and PII are scrubbed from every
string of the trace and its steps (here, in Python), bodies are kept, cut or dropped by
the trace's ``body_mode`` and the cost is computed from the price table (in ClickHouse,
from the prices this module resolves per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from google.protobuf.internal.encoder import _VarintBytes

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

# Every string field that becomes a string column; redacted_kinds (an array of kind
# names) and body_mode (stored as one of BODY_MODES) are left out.
_TRACE_STRINGS = tuple(
    field.name
    for field in trace_pb2.Trace.DESCRIPTOR.fields
    if field.type == field.TYPE_STRING and not field.is_repeated and field.name != "body_mode"
)
_STEP_STRINGS = tuple(
    field.name
    for field in trace_pb2.Step.DESCRIPTOR.fields
    if field.type == field.TYPE_STRING and not field.is_repeated
)

# The tag of ExportRequest.traces: field 1, length-delimited.
_TRACES_TAG = b"\x0a"


@dataclass(frozen=True)
class TraceChunk:
    """Traces as the bytes of an ExportRequest, with the counts and models a batch needs.

    The collector keeps the bytes an exporter sent and passes them on to ClickHouse
    unchanged, unless the scrubber's byte check (``needs_scrub``) matched.
    """

    payload: bytes
    trace_count: int
    step_count: int
    models: frozenset[str]
    needs_scrub: bool


def export_request_bytes(traces: Sequence[trace_pb2.Trace]) -> bytes:
    """Return the bytes of ``ExportRequest(traces=traces)``, without copying the traces."""
    return _envelope([trace.SerializeToString() for trace in traces])


@dataclass
class EncodedBatch:
    """One batch as a ProtobufList payload, with the prices of the models it names."""

    payload: bytes
    trace_count: int
    step_count: int
    default_body_limit: int
    price_version: str
    price_names: list[str]
    price_input: list[float]
    price_output: list[float]
    price_cached: list[float]


class RowBuilder:
    """Scrubs Trace messages and encodes them, with their prices, for one insert."""

    def __init__(self, prices: PriceTable, scrubber: Scrubber, default_body_limit: int) -> None:
        self.prices = prices
        self.scrubber = scrubber
        self.default_body_limit = default_body_limit or DEFAULT_BODY_LIMIT

    def chunk(self, traces: Sequence[trace_pb2.Trace], payload: bytes | None = None) -> TraceChunk:
        """Return the chunk of ``traces``, whose ExportRequest bytes are ``payload`` if given."""
        if payload is None:
            payload = export_request_bytes(traces)
        return TraceChunk(
            payload=payload,
            trace_count=len(traces),
            step_count=sum(len(trace.steps) for trace in traces),
            models=frozenset(trace.model_served or trace.model for trace in traces),
            # One scan over the whole chunk, because most chunks contain nothing to remove.
            needs_scrub=self.scrubber.might_change_bytes(payload),
        )

    def build(self, traces: Sequence[trace_pb2.Trace]) -> EncodedBatch:
        return self.build_chunks([self.chunk(traces)])

    def build_chunks(self, chunks: Sequence[TraceChunk]) -> EncodedBatch:
        payload = b"".join(self._scrubbed_payload(chunk) for chunk in chunks)
        names, inputs, outputs, cached = self._prices(
            frozenset().union(*(chunk.models for chunk in chunks))
        )
        return EncodedBatch(
            # ClickHouse reads a ProtobufList envelope with a length prefix.
            payload=_VarintBytes(len(payload)) + payload,
            trace_count=sum(chunk.trace_count for chunk in chunks),
            step_count=sum(chunk.step_count for chunk in chunks),
            default_body_limit=self.default_body_limit,
            price_version=self.prices.version,
            price_names=names,
            price_input=inputs,
            price_output=outputs,
            price_cached=cached,
        )

    def _scrubbed_payload(self, chunk: TraceChunk) -> bytes:
        if not chunk.needs_scrub:
            return chunk.payload
        encoded = []
        for trace in trace_pb2.ExportRequest.FromString(chunk.payload).traces:
            data = trace.SerializeToString()
            if self.scrubber.might_change_bytes(data):
                data = self._scrubbed(trace).SerializeToString()
            encoded.append(data)
        return _envelope(encoded)

    def _scrubbed(self, trace: trace_pb2.Trace) -> trace_pb2.Trace:
        self._scrub_fields(trace, _TRACE_STRINGS, "custom_properties")
        for step in trace.steps:
            self._scrub_fields(step, _STEP_STRINGS, "attributes")
        return trace

    def _scrub_fields(self, message, string_fields: tuple, map_field: str) -> None:
        scrub = self.scrubber.scrub
        for name in string_fields:
            value = getattr(message, name)
            if value:
                setattr(message, name, scrub(value))
        entries = getattr(message, map_field)
        if entries:
            scrubbed = {scrub(key): scrub(value) for key, value in entries.items()}
            entries.clear()
            entries.update(scrubbed)

    def _prices(self, models: frozenset[str]) -> tuple[list, list, list, list]:
        names, inputs, outputs, cached = [], [], [], []
        for name in models:
            price = self.prices.lookup(name)
            if price is None:
                continue
            names.append(name)
            inputs.append(price.input)
            outputs.append(price.output)
            cached.append(price.cached_input if price.cached_input is not None else price.input)
        return names, inputs, outputs, cached


def _envelope(encoded: list[bytes]) -> bytes:
    # The same bytes as ExportRequest(traces=...).SerializeToString().
    parts = []
    for data in encoded:
        parts.append(_TRACES_TAG)
        parts.append(_VarintBytes(len(data)))
        parts.append(data)
    return b"".join(parts)
