"""Server-sent event streams of a response: held whole, or passed on chunk by chunk.

``StreamBodies`` is the streaming half of ``response.ResponseHandler`` and works on that
handler's state (exchange, output, stream_mode, reassembler, decompressor).
"""

from __future__ import annotations

import logging
import zlib

from ext_proc import envoy_messages as msgs
from ext_proc import errors, redaction
from ext_proc.envoy_messages import Mutation
from ext_proc.policy import Decision
from ext_proc.sse import SseEvent, is_usage_only_chunk, parse_event, without_hidden_text
from ext_proc.stream_redaction import LiveRedactor, redact_held_events

logger = logging.getLogger(__name__)


_UNREADABLE = "the provider sent a stream event that is not valid JSON or has an unknown field"


def _unreadable(event: SseEvent) -> bool:
    if event.unknown_field:
        return True
    return bool(event.data) and event.json() is None and not event.is_done_marker


class StreamBodies:
    # Streams held whole (hold mode): Envoy sends the whole body in one message.

    def _on_held_stream(self, body: bytes) -> msgs.ProcessingResponse:
        self._mark_first_byte()
        decoded = self._decode_whole(body)
        # SSE clients never dispatch a partial event at the end of a body, so it is dropped.
        # Held streams always have a response policy.
        events = [
            without_hidden_text(event)
            for event in self._reassembler.feed(decoded)
            if self._observe_event(event)
        ]
        self.stream_completed = self._stream_done()
        if any(_unreadable(event) for event in events):
            # A client may read data the gateway cannot, so the answer is not released.
            return self._block_response(errors.POLICY_ERROR, _UNREADABLE)

        decision = self._evaluate()
        if decision is not None and decision.outcome == "deny":
            return self._block_response(
                errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK
            )
        if decision is not None and decision.redact_fields:
            events, counts = redact_held_events(
                self.exchange.request_type, events, decision.redact_fields
            )
            if self._record_redaction(counts):
                self._redact_output(decision.redact_fields)
        if not self.stream_completed:
            events.append(self._incomplete_event())
        out = b"".join(event.raw for event in events)
        if out == decoded:
            return msgs.response_body_reply()
        return self._replace_whole_body(out)

    def _evaluate(self):
        """Evaluate the response policy on the output so far; None once the proxy has no policy."""
        return self.exchange.evaluate_policy("response", self.output.as_input())

    # Streams passed chunk by chunk (no response policy, or live mode).

    def _on_stream_chunk(self, chunk: bytes, end_of_stream: bool) -> msgs.ProcessingResponse:
        if self.ended:
            # A live block already ended the stream with an error event.
            return self._chunk_reply(b"")
        if chunk:
            self._mark_first_byte()
        try:
            decoded = self._decompressor.decompress(chunk) if self._decompressor else chunk
        except zlib.error as exc:
            logger.warning(
                "trace %s: provider sent an invalid gzip stream: %s", self.exchange.trace_id, exc
            )
            self.ended = True
            self.stream_completed = False
            return self._chunk_reply(self._incomplete_event().raw)
        held_before = bool(self._reassembler.pending)
        events = self._reassembler.feed(decoded)
        # A partial event is held back until the rest of it arrives, and the reply to that
        # later chunk carries the whole event.
        changed = self._decompressor is not None or held_before or bool(self._reassembler.pending)
        out: list[SseEvent] = []
        for event in events:
            if not self._observe_event(event):
                changed = True
                continue
            if self.stream_mode != "live":
                out.append(event)
                continue
            sent = self._evaluate_live(event)
            changed = changed or len(sent) != 1 or sent[0] is not event
            out.extend(sent)
            if self.ended:
                break
        if end_of_stream and not self.ended:
            tail = self._finish_stream()
            changed = changed or bool(tail)
            out.extend(tail)
        if not changed:
            return msgs.response_body_reply()
        return self._chunk_reply(b"".join(event.raw for event in out))

    def _finish_stream(self) -> list[SseEvent]:
        """Return the events to append when the provider ends the stream."""
        tail = []
        partial = self._reassembler.pending
        if partial and parse_event(partial).is_done_marker:
            # A final [DONE] without its blank line still ends the stream properly.
            self._saw_done = True
            tail.append(SseEvent(b"data: [DONE]\n\n", data="[DONE]"))
        elif partial and self.stream_mode == "none":
            # Nothing evaluates this stream, so the provider's unterminated last event passes,
            # ended with the blank line that keeps a following error event separate.
            tail.append(SseEvent(partial.rstrip(b"\r\n") + b"\n\n"))
        if self._live_redactor is not None:
            tail.extend(self._live_redactor.flush())
            self._record_redaction(self._live_redactor.counts)
            self._redact_output(self._live_redactor.kinds)
        self.stream_completed = self._stream_done()
        if not self.stream_completed:
            tail.append(self._incomplete_event())
        return tail

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

    def _incomplete_event(self) -> SseEvent:
        self.exchange.error_code = errors.STREAM_INCOMPLETE
        self.exchange.error_message = "provider ended the stream before it was complete"
        return SseEvent(
            errors.sse_error_event(
                "the provider ended the stream before the answer was complete",
                errors.UPSTREAM,
                errors.STREAM_INCOMPLETE,
                self.exchange.trace_id,
            )
        )

    # Live mode: each complete event is evaluated before it is sent.

    def _evaluate_live(self, event: SseEvent) -> list[SseEvent]:
        """Return the events to send for ``event``: itself, redacted events, or an error event."""
        event = without_hidden_text(event)
        if _unreadable(event):
            # A client may read data the gateway cannot, so it is not let through.
            return [self._end_with_block(Decision(outcome="deny", error=_UNREADABLE))]
        # An event without data (comment lines, an event name) is evaluated as well, because
        # its text reaches the client and the policy may ask for redaction.
        decision = self._evaluate()
        self._merge_live_policy_steps()
        if decision is not None and decision.outcome == "deny":
            return [self._end_with_block(decision)]
        if decision is not None and decision.redact_fields and self._live_redactor is None:
            self._live_redactor = LiveRedactor(self.exchange.request_type, decision.redact_fields)
        if self._live_redactor is None:
            return [event]
        sent = self._live_redactor.redact(event)
        self._record_redaction(self._live_redactor.counts)
        return sent

    def _merge_live_policy_steps(self) -> None:
        """Keep one trace step for all the evaluations of a live stream, not one per event.

        The step keeps the first start time, the summed latency, the last verdict and rule,
        and counts the evaluations.
        """
        steps = self.exchange.steps
        if len(steps) < 2 or steps[-1][1] != "response_policy" or steps[-2][1] != "response_policy":
            return
        first, last = steps[-2], steps.pop()
        evaluations = int(first[5].get("evaluations", "1")) + 1
        attributes = {**last[5], "evaluations": str(evaluations)}
        steps[-1] = (first[0], first[1], first[2], first[3] + last[3], last[4], attributes)

    def _end_with_block(self, decision) -> SseEvent:
        self.blocked = True
        self.ended = True
        self.stream_completed = False
        code = errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK
        self.exchange.policy_outcome = "block_response"
        self.exchange.error_code = code
        self.exchange.error_message = "the response policy ended the stream"
        if decision.error and not self.exchange.policy_reason:
            self.exchange.policy_reason = decision.error
        body = errors.sse_error_event(
            errors.POLICY_BLOCK_MESSAGE, errors.POLICY_VIOLATION, code, self.exchange.trace_id
        )
        return SseEvent(body)

    def _redact_output(self, kinds: frozenset[str]) -> None:
        """Redact the assembled output too, so traces and the session store never keep the values."""
        if self.output is None:
            return
        content, _ = redaction.redact_text(self.output.content, kinds)
        self.output.content_parts = [content]
        self.output.other_texts = {
            key: [redaction.redact_text("".join(parts), kinds)[0]]
            for key, parts in self.output.other_texts.items()
        }
        self.output.other_choices = {}
        for call in self.output.tool_calls.values():
            call.arguments, _ = redaction.redact_text(call.arguments, kinds)
