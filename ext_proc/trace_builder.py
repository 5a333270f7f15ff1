"""Turn a finished exchange into the ``Trace`` record sent to the collector."""

from __future__ import annotations

import json
import os
import time
from collections import OrderedDict

from ext_proc import json_text
from ext_proc.pb import trace_pb2
from ext_proc.sse import normalise_usage

# Tool calls the model made, by call id, so that the next request carrying the tool's
# result can be matched to its call: call_id -> (trace_id, end time in ns, tool name).
# NOTE: this map lives in one worker process; with several workers, a result that lands
# on another worker is recorded without its call's latency.
_TOOL_CALLS: OrderedDict[str, tuple[str, int, str]] = OrderedDict()
_MAX_TOOL_CALLS = 10000


def build_trace(exchange, cancelled: bool) -> trace_pb2.Trace:
    end_ns = time.time_ns()
    latency_ms = (time.perf_counter() - exchange.start) * 1000
    proxy = exchange.proxy
    response = exchange.response
    output = response.output if response is not None else None
    usage = normalise_usage(output.usage if output is not None else None)

    org_id = proxy.org_id if proxy else ""
    if not org_id and exchange.key is not None:
        org_id = exchange.key.org_id
    trace = trace_pb2.Trace(
        trace_id=exchange.trace_id,
        start_unix_nano=exchange.start_ns,
        end_unix_nano=end_ns,
        session_id=exchange.session_id,
        session_turn=exchange.session_turn,
        session_path=exchange.session_path,
        session_source=exchange.session_source,
        parent_trace_id=exchange.parent_trace_id,
        flow_id=exchange.flow_id,
        # Before authentication succeeds this is the proxy id the URL named.
        proxy_id=proxy.id if proxy else exchange.route_proxy_id,
        org_id=org_id,
        environment=proxy.environment if proxy else "",
        key_id=exchange.key.id if exchange.key else "",
        provider=proxy.provider if proxy else "",
        model=exchange.fields.model if exchange.fields else "",
        model_served=output.model_served if output is not None else "",
        request_type=exchange.request_type,
        stream=bool(exchange.fields and exchange.fields.stream),
        method=exchange.method,
        path=exchange.path.split("?", 1)[0][:512],
        usage_reported=usage.reported,
        latency_ms=latency_ms,
        overhead_ms=exchange.overhead_s * 1000,
        policy_ms=exchange.policy_ms,
        status=_status(exchange, cancelled),
        error_type=exchange.error_code,
        error_message=exchange.error_message[:1024],
        policy_outcome=exchange.policy_outcome,
        policy_rule_id=exchange.policy_rule_id,
        policy_reason=exchange.policy_reason[:1024],
        redacted_kinds=sorted(exchange.redacted_kinds),
        dry_run=exchange.dry_run,
        dry_run_outcome=exchange.dry_run_outcome,
        intent_action="",
        finish_reason=output.finish_reason if output is not None else "",
        stream_policy_mode=response.stream_mode if response is not None else "none",
    )
    trace.custom_properties.update(exchange.properties)
    _set_optional(trace, "tokens_in", usage.tokens_in)
    _set_optional(trace, "tokens_out", usage.tokens_out)
    _set_optional(trace, "cached_tokens", usage.cached)
    _set_optional(trace, "reasoning_tokens", usage.reasoning)
    _set_optional(trace, "provider_ms", exchange.provider_ms)
    if response is not None:
        _set_optional(trace, "ttft_ms", response.ttft_ms if response.is_stream else None)
        if response.is_stream:
            trace.stream_completed = bool(response.stream_completed)
    if proxy is not None:
        _set_bodies(trace, exchange, output, proxy)
    _add_steps(trace, exchange, output, end_ns, latency_ms)
    return trace


def minimal_trace(exchange, cancelled: bool) -> trace_pb2.Trace:
    """Build a trace of the ids and outcome alone, for when ``build_trace`` failed."""
    proxy = exchange.proxy
    return trace_pb2.Trace(
        trace_id=exchange.trace_id,
        start_unix_nano=exchange.start_ns,
        end_unix_nano=time.time_ns(),
        session_id=exchange.session_id,
        proxy_id=proxy.id if proxy else exchange.route_proxy_id,
        key_id=exchange.key.id if exchange.key else "",
        request_type=exchange.request_type,
        latency_ms=(time.perf_counter() - exchange.start) * 1000,
        status=_status(exchange, cancelled),
        error_type=exchange.error_code or "trace_incomplete",
        policy_outcome=exchange.policy_outcome,
        policy_rule_id=exchange.policy_rule_id,
    )


def _status(exchange, cancelled: bool) -> int:
    if exchange.status:
        return exchange.status
    # 499: the client went away before any status was known.
    return 499 if cancelled else 0


def _set_optional(trace, name: str, value) -> None:
    if value is not None:
        setattr(trace, name, value)


def _set_bodies(trace, exchange, output, proxy) -> None:
    if hasattr(trace, "body_mode"):
        trace.body_mode = proxy.body_mode
        trace.body_limit = proxy.body_limit
    if proxy.body_mode != "full":
        return
    limit = proxy.body_limit
    if exchange.fields is not None:
        trace.messages = _json_text(exchange.fields.messages)[:limit]
        trace.tools = _json_text(exchange.fields.tools)[:limit]
    if output is not None:
        trace.response_content = output.readable_text[:limit]


def _step_id() -> str:
    # A random version 4 UUID in text form, without building a uuid.UUID (three times slower).
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


def _json_text(value) -> str:
    return json_text.compact(value) if value else ""


def _add_steps(trace, exchange, output, end_ns: int, latency_ms: float) -> None:
    for step_type, name, start_ns, step_ms, status, attributes in exchange.steps:
        trace.steps.append(
            trace_pb2.Step(
                step_id=_step_id(), step_type=step_type, name=name, start_unix_nano=start_ns,
                latency_ms=step_ms, status=status, attributes=attributes,
            )
        )
    _add_tool_result_steps(trace, exchange)
    response = exchange.response
    upstream_status = response.status if response is not None else exchange.status
    # Tool calls of an answer the response policy blocked are kept as evidence.
    blocked = trace.policy_outcome == "block_response"
    if exchange.provider_ms is not None:
        trace.steps.append(
            trace_pb2.Step(
                step_id=_step_id(), step_type="llm", name=trace.model or "llm",
                start_unix_nano=exchange.upstream_sent_ns, latency_ms=exchange.provider_ms,
                status="ok" if upstream_status < 400 else "error",
                attributes={"model_served": trace.model_served, "status": str(upstream_status)},
            )
        )
    if output is not None and upstream_status < 400:
        for _, call in sorted(output.tool_calls.items()):
            trace.steps.append(
                trace_pb2.Step(
                    step_id=_step_id(), step_type="tool_call", name=call.name,
                    start_unix_nano=end_ns, status="blocked" if blocked else "success",
                    tool_name=call.name, tool_args=call.arguments, call_id=call.id,
                )
            )
            if not blocked:
                _remember_tool_call(call.id, trace.trace_id, end_ns, call.name)
    trace.steps.append(
        trace_pb2.Step(
            step_id=_step_id(), step_type="request_finished", name="request_finished",
            start_unix_nano=end_ns, latency_ms=latency_ms, status=str(trace.status),
        )
    )


def _add_tool_result_steps(trace, exchange) -> None:
    if exchange.fields is None:
        return
    for message in exchange.fields.messages:
        call_id = message.get("tool_call_id")
        if message.get("role") != "tool" or not call_id:
            continue
        issued = _TOOL_CALLS.pop(call_id, None)
        latency_ms = (exchange.start_ns - issued[1]) / 1e6 if issued else 0.0
        content = message.get("content", "")
        trace.steps.append(
            trace_pb2.Step(
                step_id=_step_id(), step_type="tool_result", name=issued[2] if issued else "",
                start_unix_nano=exchange.start_ns, latency_ms=latency_ms,
                status="error" if _looks_like_error(content) else "success",
                tool_name=issued[2] if issued else "", tool_result=content, call_id=call_id,
                attributes={"call_trace_id": issued[0]} if issued else {},
            )
        )


def _looks_like_error(content: str) -> bool:
    try:
        value = json.loads(content)
    except ValueError:
        return False
    return isinstance(value, dict) and ("error" in value or value.get("status") == "error")


def _remember_tool_call(call_id: str, trace_id: str, end_ns: int, name: str) -> None:
    if not call_id:
        return
    _TOOL_CALLS[call_id] = (trace_id, end_ns, name)
    while len(_TOOL_CALLS) > _MAX_TOOL_CALLS:
        _TOOL_CALLS.popitem(last=False)
