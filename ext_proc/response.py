"""The response half of an exchange: headers, buffered bodies and server-sent event streams.

How a response body is handled is decided when its headers arrive:

- errors and plain JSON answers are buffered, parsed for usage and checked by the
  response-stage policy, which can still replace them with a 403;
- streams with no response policy pass through chunk by chunk, observed but not held;
- streams under a response policy are held whole until evaluated (``hold``, the default,
  fail closed), or evaluated event by event as they pass (``live``), in which case a block
  ends the stream with an SSE error event because the headers have already been sent.

The stream handling lives in ``response_stream``.
"""

from __future__ import annotations

import json
import logging
import time
import zlib

from ext_proc import envoy_messages as msgs
from ext_proc import errors, policy, redaction
from ext_proc.envoy_config import DEFAULT_MAX_BODY_BYTES
from ext_proc.envoy_messages import Mutation
from ext_proc.openai_api import parse_provider_json
from ext_proc.response_stream import StreamBodies
from ext_proc.sse import ModelOutput, SseReassembler
from ext_proc.stream_redaction import drop_logprobs

logger = logging.getLogger(__name__)

_SSE_TYPE = "text/event-stream"
_READABLE_ENCODINGS = ("", "identity", "gzip", "x-gzip")


class ResponseHandler(StreamBodies):
    def __init__(self, exchange, headers: dict[str, str]) -> None:
        self.exchange = exchange
        self.status = exchange.status
        self.content_type = headers.get("content-type", "").lower()
        self.encoding = headers.get("content-encoding", "").strip().lower()
        self.gzip = self.encoding in ("gzip", "x-gzip")
        self.had_content_length = "content-length" in headers
        self.location = headers.get("location", "")
        # An event stream the client did not request is read whole, as the client reads it.
        stream_requested = exchange.fields is not None and exchange.fields.stream
        self.is_stream = (
            self.content_type.startswith(_SSE_TYPE) and self.status < 400 and stream_requested
        )
        self.output = ModelOutput(exchange.request_type) if exchange.request_type else None
        self.stream_mode = "none"
        self.stream_completed: bool | None = None
        self.ttft_ms: float | None = None
        # True once a live block has ended the stream: later chunks are dropped.
        self.ended = False
        self.blocked = False
        self._decompressor = None
        self._reassembler = SseReassembler()
        self._live_redactor = None
        self._saw_done = False

    # Headers.

    def on_headers(self, end_of_stream: bool) -> msgs.ProcessingResponse:
        mutation = Mutation()
        for name, value in self.exchange.trace_headers().items():
            mutation.set(name, value)
        if 300 <= self.status < 400:
            # A client that followed the redirect would send its request to the provider's
            # chosen host directly, past request redaction, the response policy and the trace.
            return self._reject_status(
                errors.UPSTREAM_REDIRECT,
                f"the upstream returned a redirect (HTTP {self.status}), which the gateway "
                "does not follow or pass on; check the proxy's upstream URL",
            )
        if self.status >= 600:
            # Not an HTTP status a client knows how to read, so not one the gateway passes on.
            return self._reject_status(
                errors.UPSTREAM_INVALID_STATUS,
                f"the upstream returned HTTP {self.status}, which is not a valid status",
            )
        if end_of_stream and self.status >= 400:
            return self._add_error_body(mutation)
        if self.exchange.proxy is None:
            return msgs.response_headers_reply(mutation)
        if end_of_stream:
            if self._response_engine() is not None:
                # Treated as an empty body: the policy has nothing to evaluate, so it is blocked.
                return self._block_response(
                    errors.POLICY_ERROR, "the provider's response has no body"
                )
            return msgs.response_headers_reply(mutation)
        if self.encoding not in _READABLE_ENCODINGS:
            if self._response_engine() is not None:
                return self._block_response(
                    errors.POLICY_ERROR,
                    f"the provider's response has Content-Encoding {self.encoding[:64]}, "
                    "which the gateway cannot decode",
                )
            # Passed on untouched, since a body the gateway changed would no longer decode.
            logger.info(
                "trace %s: response with Content-Encoding %s passed on unread",
                self.exchange.trace_id, self.encoding[:64],
            )
            return msgs.response_headers_reply(mutation)
        if not self.is_stream:
            return msgs.response_headers_reply(mutation, msgs.BUFFERED)

        has_policy = self._response_engine() is not None
        # Dry-run policies never block, so holding the stream for them would only delay it.
        enforcing = any(
            not attachment.dry_run
            for attachment in self.exchange.proxy.policies.get("response", ())
        )
        if has_policy and enforcing and self.exchange.proxy.stream_policy_mode == "hold":
            # In BUFFERED mode Envoy holds the response headers until the service replies to
            # the body, so a block still becomes a 403 before any byte reaches the client.
            self.stream_mode = "hold"
            return msgs.response_headers_reply(mutation, msgs.BUFFERED)
        self.stream_mode = "live" if has_policy else "none"
        mutation.remove("content-length")
        if self.gzip:
            # Streamed chunks are decoded here and sent on uncompressed.
            self._decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
            mutation.remove("content-encoding")
        return msgs.response_headers_reply(mutation, msgs.STREAMED)

    def _reject_status(self, code: str, message: str) -> msgs.ProcessingResponse:
        """Reply 502 in place of a provider response whose status is not passed on."""
        logger.warning(
            "trace %s: provider returned HTTP %d (Location %r); returning 502 %s",
            self.exchange.trace_id, self.status, self.location[:200], code,
        )
        error = errors.GatewayError(502, code, message, errors.UPSTREAM)
        return self.exchange.reject(error, details=code)

    def _response_engine(self):
        try:
            return self.exchange.policy_engine("response")
        except policy.PolicyCompileError:
            # evaluate_policy reports the compile error and denies when the body arrives.
            return _BROKEN_ENGINE

    # Bodies.

    def on_body(self, chunk: bytes, end_of_stream: bool) -> msgs.ProcessingResponse:
        if not self.is_stream:
            return self._on_buffered(chunk)
        if self.stream_mode in ("none", "live"):
            return self._on_stream_chunk(chunk, end_of_stream)
        return self._on_held_stream(chunk)

    def on_cancel(self) -> None:
        if self.is_stream and self.stream_completed is None:
            # Events that are not held pass as they come, so once the service has seen the
            # stream's end (the [DONE] event) the whole stream was passed on, even if the side
            # stream closed before Envoy's end-of-stream message. A held one was never released.
            released = self.stream_mode in ("none", "live")
            self.stream_completed = released and self._stream_done()
        if self._live_redactor is not None:
            self._redact_output(self._live_redactor.kinds)

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
            document = parse_provider_json(decoded) if decoded else None
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
            return self._block_response(
                errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK
            )
        if not decision.redact_fields:
            return msgs.response_body_reply()
        redacted, counts = redaction.redact_json_strings(document, decision.redact_fields)
        if not self._record_redaction(counts):
            return msgs.response_body_reply()
        _drop_redacted_logprobs(document, redacted)
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

    def _add_error_body(self, mutation: Mutation) -> msgs.ProcessingResponse:
        """Give a bodiless error (Envoy rejected the request, say) the OpenAI error body."""
        code = errors.GATEWAY_ERROR if self.exchange.upstream_sent is None else "upstream_error"
        self.exchange.error_code = self.exchange.error_code or code
        body = errors.error_body(
            f"request failed with HTTP {self.status}", errors.INVALID_REQUEST
            if self.status < 500 else errors.SERVER, code, self.exchange.trace_id,
        )
        mutation.add_body = True
        mutation.replace_body(body)
        mutation.set("content-type", "application/json")
        mutation.set("content-length", str(len(body)))
        mutation.set("x-request-id", self.exchange.trace_id)
        return msgs.response_headers_reply(mutation)

    def _on_error_body(self, body: bytes) -> msgs.ProcessingResponse:
        """Pass OpenAI-shaped provider errors through; wrap anything else in that shape."""
        governed = self.exchange.proxy is not None and self._response_engine() is not None
        try:
            # A governed error body may be redacted and encoded again, which NaN or an
            # unpaired surrogate would break, so only strict JSON is read as JSON then.
            # Otherwise the body passes as sent, whatever a lenient parser reads in it.
            document = parse_provider_json(body) if governed else json.loads(body)
        except (ValueError, RecursionError):
            document = None
        error = document.get("error") if isinstance(document, dict) else None
        if isinstance(error, dict) and error.get("type") == errors.GATEWAY_ERROR:
            # Envoy's own reply (local_reply_config), after the request went upstream: the
            # provider could not be reached.
            document = None
            body = str(error.get("message", "")).encode()
            error = None
        if isinstance(error, dict):
            self.exchange.error_code = str(
                error.get("code") or error.get("type") or "upstream_error"
            )
            self.exchange.error_message = str(error.get("message", ""))[:1024]
            # The whole body, not only the message, since any of its fields can quote the request.
            kinds = self._error_redaction_kinds(body.decode("utf-8", "replace"))
            redacted, counts = redaction.redact_json_strings(document, kinds)
            if not self._record_redaction(counts):
                return msgs.response_body_reply()
            return self._replace_whole_body(
                json.dumps(redacted, separators=(",", ":"), ensure_ascii=False).encode()
            )
        text = body.decode("utf-8", "replace").strip()
        # Redacted before it is cut, so that no value is left half-matched at the cut.
        text, counts = redaction.redact_text(text, self._error_redaction_kinds(text))
        self._record_redaction(counts)
        text = text[:300]
        if self.exchange.upstream_sent is None:
            # Envoy replied before the request reached the provider (a body over the
            # buffer limit gives 413), so this is not the provider's error.
            source, error_type = "the gateway", errors.INVALID_REQUEST
            code = errors.REQUEST_TOO_LARGE if self.status == 413 else errors.GATEWAY_ERROR
        else:
            source, error_type = "the upstream", errors.UPSTREAM
            code = errors.UPSTREAM_UNAVAILABLE if self.status >= 500 else "upstream_error"
            if self.status in (502, 503, 504):
                source = "the gateway could not reach the upstream and"
        self.exchange.error_code = code
        self.exchange.error_message = text
        message = f"{source} returned HTTP {self.status}" + (f": {text}" if text else "")
        if code == errors.REQUEST_TOO_LARGE:
            limit_mib = DEFAULT_MAX_BODY_BYTES // (1024 * 1024)
            message = f"the request body is larger than the gateway's limit of {limit_mib} MiB"
        new_body = errors.error_body(message, error_type, code, self.exchange.trace_id)
        mutation = Mutation()
        mutation.replace_body(new_body)
        mutation.set("content-type", "application/json")
        mutation.set("content-length", str(len(new_body)))
        # The body is the gateway's, so its request id is too (OpenAI SDKs read this header).
        mutation.set("x-request-id", self.exchange.trace_id)
        mutation.remove("content-encoding")
        return msgs.response_body_reply(mutation)

    def _error_redaction_kinds(self, message: str) -> frozenset[str]:
        """Return the kinds the response policy redacts from output whose content is ``message``.

        A provider's error body can quote the request, so the response policy is evaluated
        on it. Only its redaction is applied: a deny keeps the provider's status. A policy that
        fails to compile or evaluate redacts every kind.
        """
        engine = self._response_engine() if self.exchange.proxy else None
        if engine is None:
            return frozenset()
        if engine is _BROKEN_ENGINE:
            return redaction.REDACTION_KINDS
        output = ModelOutput(self.exchange.request_type, content_parts=[message])
        document = self.exchange.policy_input(
            "response", output.as_input(), engine.required_fields, engine.request_keys
        )
        decision = engine.evaluate(document)
        return redaction.REDACTION_KINDS if decision.error else decision.redact_fields

    def block_nested_too_deeply(self) -> msgs.ProcessingResponse:
        return self._block_response(errors.POLICY_ERROR, "response is nested too deeply to check")

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
        if self.exchange.policy_outcome in ("", "allow", "redact"):
            self.exchange.policy_outcome = "redact_response"
        return True


def _drop_redacted_logprobs(original: dict, redacted: dict) -> None:
    """Empty the token log probabilities of each choice that redaction changed.

    Tokens repeat the text piece by piece ("bob", "@", "example"), so no pattern finds a value
    in them. A body without ``choices`` (a Responses object) loses all of them.
    """
    before = original.get("choices")
    after = redacted.get("choices")
    if not isinstance(before, list) or not isinstance(after, list):
        drop_logprobs(redacted)
        return
    for old_choice, new_choice in zip(before, after, strict=True):
        if old_choice != new_choice:
            drop_logprobs(new_choice)


# Stands in for a response policy that does not compile, so that the answer is still
# evaluated (and denied) instead of passing unchecked.
_BROKEN_ENGINE = object()
