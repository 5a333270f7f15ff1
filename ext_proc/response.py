"""The response half of an exchange: headers, buffered bodies and server-sent event streams.

How a response body is handled is decided when its headers arrive:

- errors and plain JSON answers are buffered, parsed for usage and checked by the
  response-stage policy, which can still replace them with a 403;
- streams with no response policy pass through chunk by chunk, observed but not held;
- streams under a response policy are held whole until evaluated (``hold``, the default,
  fail closed), or evaluated event by event as they pass (``live``), in which case a block
  ends the stream with an SSE error event because the headers have already been sent.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

from ext_proc import envoy_messages as msgs
from ext_proc import errors, redaction
from ext_proc.envoy_messages import Mutation
from ext_proc.sse import ModelOutput, SseEvent, SseReassembler, encode_event, is_usage_only_chunk

logger = logging.getLogger(__name__)

_SSE_TYPE = "text/event-stream"


class ResponseHandler:
    def __init__(self, exchange, headers: dict[str, str]) -> None:
        self.exchange = exchange
        self.status = exchange.status
        self.content_type = headers.get("content-type", "").lower()
        self.gzip = headers.get("content-encoding", "").lower() in ("gzip", "x-gzip")
        self.had_content_length = "content-length" in headers
        self.is_stream = self.content_type.startswith(_SSE_TYPE) and self.status < 400
        self.output = ModelOutput(exchange.request_type) if exchange.request_type else None
        self.stream_mode = "none"
        self.stream_completed: bool | None = None
        self.ttft_ms: float | None = None
        self.ended = False
        self.blocked = False
        self._engine = None
        self._decompressor = None
        self._reassembler = SseReassembler()
        self._redact_kinds: frozenset[str] = frozenset()
        self._live_pending_text = ""
        self._live_held_arguments: dict[int, str] = {}
        self._saw_done = False

    # Headers.

    def on_headers(self, end_of_stream: bool) -> msgs.ProcessingResponse:
        mutation = Mutation()
        for name, value in self.exchange.trace_headers().items():
            mutation.set(name, value)
        if end_of_stream or self.exchange.proxy is None:
            return msgs.response_headers_reply(mutation)
        if not self.is_stream:
            return msgs.response_headers_reply(mutation, msgs.BUFFERED)

        self._engine = self._response_engine()
        if self._engine is not None and self.exchange.proxy.stream_policy_mode == "hold":
            self.stream_mode = "hold"
            return msgs.response_headers_reply(mutation, msgs.BUFFERED)
        self.stream_mode = "live" if self._engine is not None else "none"
        mutation.remove("content-length")
        if self.gzip:
            # Streamed chunks are decoded here and sent on uncompressed.
            self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            mutation.remove("content-encoding")
        return msgs.response_headers_reply(mutation, msgs.STREAMED)

    def _response_engine(self):
        try:
            return self.exchange.gateway.policy_engine(self.exchange.proxy, "response")
        except Exception:  # compile errors fail closed when the body is evaluated
            return _BrokenEngine()

    # Bodies.

    def on_body(self, chunk: bytes, end_of_stream: bool) -> msgs.ProcessingResponse:
        if not self.is_stream:
            return self._on_buffered(chunk)
        if self.stream_mode in ("none", "live"):
            return self._on_stream_chunk(chunk, end_of_stream)
        return self._on_held_stream(chunk)

    def on_cancel(self) -> None:
        if self.is_stream and self.stream_completed is None:
            self.stream_completed = False

    def _mark_first_byte(self) -> None:
        if self.ttft_ms is None:
            self.ttft_ms = (time.perf_counter() - self.exchange.start) * 1000

    # Buffered JSON answers and errors.

    def _on_buffered(self, body: bytes) -> msgs.ProcessingResponse:
        self._mark_first_byte()
        decoded = self._decode_whole(body)
        if self.status >= 400:
            return self._on_error_body(decoded)
        try:
            document = json.loads(decoded) if decoded else None
        except ValueError:
            document = None
        if isinstance(document, dict) and self.output is not None:
            self.output.add_body(document)
        engine = self._response_engine() if self.exchange.proxy else None
        if engine is None:
            return msgs.response_body_reply()
        if not isinstance(document, dict):
            return self._block_response(errors.POLICY_ERROR, "response body is not a JSON object")
        decision = self.exchange.evaluate_policy("response", self.output.as_input())
        if decision.outcome == "deny":
            return self._block_response(errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK)
        if not decision.redact_fields:
            return msgs.response_body_reply()
        redacted, counts = redaction.redact_json_strings(document, decision.redact_fields)
        if not self._record_redaction(counts):
            return msgs.response_body_reply()
        self.output = ModelOutput(self.exchange.request_type)
        self.output.add_body(redacted)
        new_body = json.dumps(redacted, separators=(",", ":"), ensure_ascii=False).encode()
        return self._replace_whole_body(new_body)

    def _decode_whole(self, body: bytes) -> bytes:
        if not self.gzip:
            return body
        try:
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        except zlib.error:
            logger.warning("trace %s: provider sent an invalid gzip body", self.exchange.trace_id)
            return b""

    def _replace_whole_body(self, new_body: bytes) -> msgs.ProcessingResponse:
        mutation = Mutation()
        mutation.replace_body(new_body)
        if self.had_content_length or self.gzip:
            mutation.set("content-length", str(len(new_body)))
        if self.gzip:
            mutation.remove("content-encoding")
        return msgs.response_body_reply(mutation)

    def _on_error_body(self, body: bytes) -> msgs.ProcessingResponse:
        """Pass OpenAI-shaped provider errors through; wrap anything else in that shape."""
        try:
            document = json.loads(body)
        except ValueError:
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict):
            self.exchange.error_code = str(error.get("code") or error.get("type") or "upstream_error")
            self.exchange.error_message = str(error.get("message", ""))[:1024]
            return msgs.response_body_reply()
        text = body.decode("utf-8", "replace").strip()[:300]
        self.exchange.error_code = errors.UPSTREAM_UNAVAILABLE if self.status >= 500 else "upstream_error"
        self.exchange.error_message = text
        message = f"upstream returned HTTP {self.status}" + (f": {text}" if text else "")
        new_body = errors.error_body(message, errors.UPSTREAM, self.exchange.error_code, self.exchange.trace_id)
        mutation = Mutation()
        mutation.replace_body(new_body)
        mutation.set("content-type", "application/json")
        mutation.set("content-length", str(len(new_body)))
        mutation.remove("content-encoding")
        return msgs.response_body_reply(mutation)

    def _block_response(self, code: str, reason: str = "") -> msgs.ProcessingResponse:
        self.blocked = True
        self.exchange.policy_outcome = "block_response"
        if reason:
            self.exchange.policy_reason = reason
            self.exchange.policy_rule_id = self.exchange.policy_rule_id or "response.error"
        error = errors.GatewayError(403, code, errors.POLICY_BLOCK_MESSAGE, errors.POLICY_VIOLATION)
        return self.exchange.reject(error, details=f"response_{code}")

    def _record_redaction(self, counts: dict[str, int]) -> bool:
        kinds = {kind for kind, count in counts.items() if count}
        if not kinds:
            return False
        self.exchange.redacted_kinds |= kinds
        if self.exchange.policy_outcome in ("allow", "redact"):
            self.exchange.policy_outcome = "redact_response"
        return True

    # Streams held whole (hold mode).

    def _on_held_stream(self, body: bytes) -> msgs.ProcessingResponse:
        decoded = self._decode_whole(body)
        events = self._reassembler.feed(decoded)
        trailing = self._reassembler.pending
        kept = []
        for event in events:
            if self._observe_event(event):
                kept.append(event)
        self._mark_first_byte()
        self.stream_completed = self._stream_done()

        decision = self.exchange.evaluate_policy("response", self.output.as_input())
        if decision.outcome == "deny":
            return self._block_response(errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK)
        if decision.redact_fields:
            kept = self._redact_held_events(kept, decision.redact_fields)
        out = b"".join(event.raw for event in kept) + trailing
        if not self.stream_completed:
            out += self._incomplete_event()
        if out == decoded:
            return msgs.response_body_reply()
        return self._replace_whole_body(out)

    def _redact_held_events(self, events: list[SseEvent], kinds: frozenset[str]) -> list[SseEvent]:
        """Redact the whole answer, then put it back into the events.

        A value can be split across deltas, so the text is redacted as a whole; the first
        delta event then carries all of it and later deltas carry empty strings.
        """
        content, counts = redaction.redact_text(self.output.content, kinds)
        arguments = {}
        for index, call in self.output.tool_calls.items():
            arguments[index], found = redaction.redact_text(call.arguments, kinds)
            for kind, count in found.items():
                counts[kind] = counts.get(kind, 0) + count
        if not self._record_redaction(counts):
            return events
        rewriter = _DeltaRewriter(self.exchange.request_type, content, arguments)
        rewritten = [rewriter.rewrite(event, kinds) for event in events]
        self.output.content_parts = [content]
        for index, text in arguments.items():
            self.output.tool_calls[index].arguments = text
        return rewritten

    # Streams passed chunk by chunk (no response policy, or live mode).

    def _on_stream_chunk(self, chunk: bytes, end_of_stream: bool) -> msgs.ProcessingResponse:
        if self.ended:
            # The stream was already ended with an error event: drop what the provider still sends.
            return self._chunk_reply(b"")
        if chunk:
            self._mark_first_byte()
        decoded = self._decompressor.decompress(chunk) if self._decompressor else chunk
        # Bytes held back from the previous chunk must now be sent ahead of this one.
        changed = self._decompressor is not None or bool(self._reassembler.pending)
        events = self._reassembler.feed(decoded)
        out = []
        for event in events:
            if self.blocked:
                changed = True
                break
            if not self._observe_event(event):
                changed = True
                continue
            if self.stream_mode == "live":
                evaluated = self._evaluate_live(event)
                changed = changed or evaluated is not event
                event = evaluated
            out.append(event.raw)
        if end_of_stream:
            out.append(self._reassembler.pending)
            self.stream_completed = self._stream_done() and not self.blocked
            if not self.stream_completed and not self.blocked:
                out.append(self._incomplete_event())
                changed = True
        elif self._reassembler.pending:
            # A partial event is held until the rest of it arrives.
            changed = True
        if not changed:
            return msgs.response_body_reply()
        return self._chunk_reply(b"".join(out))

    def _chunk_reply(self, body: bytes) -> msgs.ProcessingResponse:
        mutation = Mutation()
        mutation.replace_body(body)
        return msgs.response_body_reply(mutation)

    def _observe_event(self, event: SseEvent) -> bool:
        """Add an event to the assembled output; return False when it must not reach the client."""
        if event.is_done_marker:
            self._saw_done = True
            return True
        data = event.json()
        if data is None or self.output is None:
            return True
        if self.exchange.request_type == "responses":
            self.output.add_responses_event(data)
            return True
        self.output.add_chat_chunk(data)
        # The usage-only chunk is removed when the gateway asked for it on the client's behalf.
        return not (self.exchange.stream_usage_injected and is_usage_only_chunk(data))

    def _stream_done(self) -> bool:
        if self.exchange.request_type == "responses":
            return self.output is not None and self.output.completed
        return self._saw_done

    def _incomplete_event(self) -> bytes:
        self.exchange.error_code = errors.STREAM_INCOMPLETE
        self.exchange.error_message = "provider ended the stream before it was complete"
        return errors.sse_error_event(
            "the provider ended the stream before the answer was complete",
            errors.UPSTREAM, errors.STREAM_INCOMPLETE, self.exchange.trace_id,
        )

    def _evaluate_live(self, event: SseEvent) -> SseEvent | None:
        data = event.json()
        if data is None and not event.is_done_marker:
            return event
        decision = self.exchange.evaluate_policy("response", self.output.as_input())
        if decision.outcome == "deny":
            self.blocked = True
            self.ended = True
            self.stream_completed = False
            self.exchange.policy_outcome = "block_response"
            self.exchange.error_code = errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK
            body = errors.sse_error_event(
                errors.POLICY_BLOCK_MESSAGE, errors.POLICY_VIOLATION, self.exchange.error_code,
                self.exchange.trace_id,
            )
            return SseEvent(body)
        if decision.redact_fields:
            self._redact_kinds = decision.redact_fields
        if self._redact_kinds and data is not None:
            return self._redact_live_event(event, data)
        if self._redact_kinds and event.is_done_marker and self._live_pending_text:
            flush, counts = redaction.redact_text(self._live_pending_text, self._redact_kinds)
            self._live_pending_text = ""
            self._record_redaction(counts)
            return SseEvent(encode_event(_text_delta_chunk(flush)) + event.raw)
        return event

    def _redact_live_event(self, event: SseEvent, data: dict) -> SseEvent:
        """Redact a passing chat chunk, holding back a trailing partial word.

        E-mail addresses and SSNs contain no whitespace, so text up to the last whitespace
        can be redacted and released while the rest waits for the next delta.
        """
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return event
        choice = choices[0]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
        if delta is None:
            return event
        finishing = bool(choice.get("finish_reason"))
        counts: dict[str, int] = {}
        if isinstance(delta.get("content"), str):
            self._live_pending_text += delta["content"]
            cut = len(self._live_pending_text) if finishing else _last_space(self._live_pending_text)
            release, self._live_pending_text = self._live_pending_text[:cut], self._live_pending_text[cut:]
            delta["content"], counts = redaction.redact_text(release, self._redact_kinds)
        for call in delta.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                index = call.get("index", 0)
                self._live_held_arguments[index] = self._live_held_arguments.get(index, "") + function["arguments"]
                function["arguments"] = ""
        if finishing and self._live_held_arguments:
            released = []
            for index, text in sorted(self._live_held_arguments.items()):
                redacted, found = redaction.redact_text(text, self._redact_kinds)
                for kind, count in found.items():
                    counts[kind] = counts.get(kind, 0) + count
                released.append({"index": index, "function": {"arguments": redacted}})
            delta["tool_calls"] = released
            self._live_held_arguments = {}
        self._record_redaction(counts)
        return SseEvent(encode_event(data), event.event, event.data)


def _last_space(text: str) -> int:
    for position in range(len(text) - 1, -1, -1):
        if text[position].isspace():
            return position + 1
    return 0


def _text_delta_chunk(text: str) -> dict:
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}


class _DeltaRewriter:
    """Rewrite held stream events so that their deltas add up to the redacted answer."""

    def __init__(self, request_type: str, content: str, arguments: dict[int, str]) -> None:
        self.request_type = request_type
        self.content = content
        self.arguments = dict(arguments)
        self.content_sent = False

    def rewrite(self, event: SseEvent, kinds: frozenset[str]) -> SseEvent:
        data = event.json()
        if data is None:
            return event
        if self.request_type == "responses":
            changed = self._rewrite_responses_event(data, kinds)
        else:
            changed = self._rewrite_chat_chunk(data)
        if not changed:
            return event
        return SseEvent(encode_event(data, event.event), event.event)

    def _take_content(self) -> str:
        if self.content_sent:
            return ""
        self.content_sent = True
        return self.content

    def _rewrite_chat_chunk(self, data: dict) -> bool:
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return False
        choice = choices[0]
        changed = False
        holder = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
        if holder is not None and isinstance(holder.get("content"), str):
            holder["content"] = self._take_content()
            changed = True
        if isinstance(choice.get("text"), str):
            choice["text"] = self._take_content()
            changed = True
        for call in (holder or {}).get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                function["arguments"] = self.arguments.pop(call.get("index", 0), "")
                changed = True
        return changed

    def _rewrite_responses_event(self, data: dict, kinds: frozenset[str]) -> bool:
        if data.get("type") == "response.output_text.delta":
            data["delta"] = self._take_content()
            return True
        if data.get("type") == "response.function_call_arguments.delta":
            data["delta"] = ""
            return True
        redacted, counts = redaction.redact_json_strings(data, kinds)
        if any(counts.values()):
            data.clear()
            data.update(redacted)
            return True
        return False


class _BrokenEngine:
    """Stands in for a response policy that does not compile, so streams are held and denied."""
