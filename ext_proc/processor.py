"""One governed HTTP exchange: the ext_proc messages of a single request, in order.

Envoy opens one gRPC stream per HTTP request and sends, as configured in envoy/:
request headers, the buffered request body, response headers, then the response body
(buffered, or streamed chunk by chunk for server-sent events). ``Exchange.handle`` replies
to each message. ``Exchange.finish`` records the trace once, however the exchange ended
(completed, rejected, or cut off by Envoy resetting the stream).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid

from ext_proc import envoy_messages as msgs
from ext_proc import errors, json_text, openai_api, policy, redaction
from ext_proc.envoy_messages import Mutation
from ext_proc.errors import GatewayError
from ext_proc.gateway import PolicyUnavailable
from ext_proc.keys import digests_equal, hash_key, is_well_formed, key_fingerprint
from ext_proc.openai_api import RequestFields
from ext_proc.response import ResponseHandler
from ext_proc.trace_builder import build_trace, minimal_trace

logger = logging.getLogger(__name__)

SESSION_HEADER = "x-xenovia-session-id"
TRACE_HEADER = "x-xenovia-trace-id"
SESSION_PATH_HEADER = "x-xenovia-session-path"
PARENT_TRACE_HEADER = "x-xenovia-parent-trace-id"
FLOW_ID_HEADER = "x-xenovia-trace-flow-id"
KEY_HEADER = "x-xenovia-key"
HEALTH_PATHS = ("/healthz", "/health")
MAX_SESSION_PATH_CHARS = 512
MAX_FLOW_ID_CHARS = 128
# Envoy's default max_headers_count, which envoy/envoy.yaml keeps. Envoy applies it to the
# request after this service's header changes as well, pseudo-headers included.
MAX_REQUEST_HEADERS = 100

# Client headers that never reach the provider: our own, the client's credentials, and
# accept-encoding so that providers send uncompressed bodies the gateway can inspect.
_STRIPPED_PREFIX = "x-xenovia-"
# Header names that carry a credential of some service or the client's address, whatever
# the vendor prefix: x-goog-api-key, anthropic-api-key, x-auth-token, true-client-ip, ...
# x-forwarded-proto stays: Envoy routes on it, and it names no one.
_CREDENTIAL_OR_CLIENT = re.compile(
    r"auth|token|secret|api-key|apikey|subscription-key|cookie|client-ip|connecting-ip|"
    r"real-ip|forwarded(?!-proto$)|^via$"
)
_STRIPPED_HEADERS = (
    "authorization", "proxy-authorization", "cookie", "x-api-key", "api-key",
    "openai-organization", "openai-project", "accept-encoding",
    "forwarded", "x-forwarded-for", "x-forwarded-host", "x-real-ip",
)  # fmt: skip


def parse_uuid(value: str) -> str | None:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


class Exchange:
    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.trace_id = str(uuid.uuid4())
        self.start_ns = time.time_ns()
        self.start = time.perf_counter()
        self.overhead_s = 0.0
        self.finished = False

        self.method = ""
        self.path = ""
        self.route_proxy_id = ""
        self.is_health_check = False
        self.request_type = ""
        self.proxy = None
        self.key = None
        self.headers: dict[str, str] = {}
        self.properties: dict[str, str] = {}
        self.session_id = ""
        self.header_session_id: str | None = None
        self.session_turn = 0
        self.session_source = ""
        self.session_path = ""
        self.parent_trace_id = ""
        self.flow_id = ""

        self.body_text = ""
        self.body: dict | None = None
        # The body before request redaction, when redaction changed it.
        self.client_body: dict | None = None
        self.fields: RequestFields | None = None
        self.stream_usage_injected = False

        self.status = 0
        self.error_code = ""
        self.error_message = ""
        # Empty until the request-stage policy (or its absence) lets the request through.
        self.policy_outcome = ""
        self.policy_rule_id = ""
        self.policy_reason = ""
        self.policy_ms = 0.0
        self.redacted_kinds: set[str] = set()
        self.dry_run = False
        self.dry_run_outcome = ""
        self.upstream_sent: float | None = None
        self.upstream_sent_ns = 0
        self.provider_ms: float | None = None
        self.steps: list[tuple] = []
        self.response: ResponseHandler | None = None
        # Stage -> the engine (None: no policy) or the PolicyUnavailable it raised, taken once.
        self._engines: dict[str, object] = {}

    # Dispatch.

    async def handle(self, request) -> msgs.ProcessingResponse:
        began = time.perf_counter()
        try:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                return self._on_request_headers(request.request_headers)
            if kind == "request_body":
                return await self._on_request_body(request.request_body)
            if kind == "response_headers":
                return self._on_response_headers(request.response_headers)
            if kind == "response_body":
                return await self._on_response_body(request.response_body)
            # Trailers are not requested in envoy/; reply to them anyway so Envoy never waits.
            reply = msgs.ProcessingResponse()
            getattr(reply, kind).SetInParent()
            return reply
        except GatewayError as exc:
            return self.reject(exc, details=exc.code)
        except RecursionError:
            return self._reject_too_deep(request.WhichOneof("request"))
        except Exception as exc:
            logger.exception("trace %s: failed to process %s", self.trace_id, request.WhichOneof("request"))
            return self.reject(
                GatewayError(500, errors.INTERNAL_ERROR, "the gateway failed to process the request",
                             errors.SERVER),
                details=f"internal_error:{type(exc).__name__}",
            )
        finally:
            self.overhead_s += time.perf_counter() - began

    def _reject_too_deep(self, kind: str) -> msgs.ProcessingResponse:
        """Fail closed on JSON nested deeper than the gateway's recursive walks can go.

        The parser accepts about 990 levels, but redaction recurses twice per level and
        stops at about 480.
        """
        logger.warning("trace %s: %s nested too deeply to process", self.trace_id, kind)
        if self.response is not None and kind.startswith("response"):
            return self.response.block_nested_too_deeply()
        return self.reject(
            GatewayError(
                400, errors.INVALID_JSON,
                "request body is nested too deeply for the gateway to check; "
                "send JSON with fewer levels of nesting",
            ),
            details=errors.INVALID_JSON,
        )

    def reject(self, error: GatewayError, details: str) -> msgs.ProcessingResponse:
        """Reply to the client with an error; the request is never sent upstream afterwards."""
        self.status = error.status
        self.error_code = error.code
        self.error_message = error.message
        if error.code in (errors.POLICY_BLOCK, errors.POLICY_ERROR):
            body = errors.policy_block_body(self.trace_id, error.code)
        else:
            body = error.body(self.trace_id)
        self.finished = True
        # OpenAI SDKs take an error's request_id from x-request-id, so it names the trace too.
        headers = {**self.trace_headers(), "x-request-id": self.trace_id}
        return msgs.immediate_reply(error.status, body, headers, details, {"trace_id": self.trace_id})

    def trace_headers(self) -> dict[str, str]:
        if not self.session_id:
            self.session_id = str(uuid.uuid4())
        return {SESSION_HEADER: self.session_id, TRACE_HEADER: self.trace_id}

    # Request headers: route, auth, session header, properties, upstream.

    def _on_request_headers(self, message) -> msgs.ProcessingResponse:
        headers = msgs.header_values(message)
        self.headers = headers
        # Envoy generates x-request-id for every request from outside (a client's own value
        # is replaced), so using it as the trace id lets Envoy's own error replies carry it.
        request_id = parse_uuid(headers.get("x-request-id", ""))
        if request_id is not None:
            self.trace_id = request_id
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        self.steps.append(("request_received", "request_received", time.time_ns(), 0.0, "ok", {}))
        if self.path.split("?", 1)[0] in HEALTH_PATHS:
            return self._health()

        route = openai_api.parse_route(self.path)
        if route is not None:
            self.route_proxy_id = route.proxy_id
        if "upgrade" in headers:
            # Envoy would hold an upgraded connection open with no policy ever applied.
            raise GatewayError(400, errors.INVALID_HEADER, "protocol upgrades are not supported")
        if route is None:
            raise GatewayError(
                404, errors.ENDPOINT_NOT_SUPPORTED,
                f"no route for {self.path[:200]!r}; use /a/<proxy_id>/openai/v1/...", errors.NOT_FOUND,
            )
        self._authenticate(headers, route.proxy_id)
        self._read_enrichment_headers(headers)
        self.properties = openai_api.parse_properties(headers)
        self.request_type = openai_api.ENDPOINTS.get(route.rest, "")
        if not self.request_type:
            raise GatewayError(
                404, errors.ENDPOINT_NOT_SUPPORTED,
                f"endpoint {route.rest or '/'!r} is not served by this gateway; supported: "
                + ", ".join(openai_api.ENDPOINTS), errors.NOT_FOUND,
            )
        if self.method != "POST":
            raise GatewayError(
                405, errors.METHOD_NOT_ALLOWED, f"{route.rest} accepts POST, got {self.method}"
            )
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            # Policies read the body as JSON text, so a compressed body could not be checked.
            raise GatewayError(
                415, errors.UNSUPPORTED_CONTENT_ENCODING,
                f"compressed request bodies are not supported (Content-Encoding: {encoding[:64]}); "
                "send the JSON body uncompressed",
            )
        if message.end_of_stream:
            raise GatewayError(400, errors.INVALID_JSON, "request body is empty; expected a JSON object")
        return self._route_upstream(route, headers, [h.key for h in message.headers.headers])

    def _read_enrichment_headers(self, headers: dict[str, str]) -> None:
        raw_session = headers.get(SESSION_HEADER)
        if raw_session is not None:
            session = parse_uuid(raw_session.strip())
            if session is None:
                raise GatewayError(
                    400, errors.INVALID_SESSION_ID,
                    f"X-Xenovia-Session-Id must be a UUID, got {raw_session[:64]!r}",
                )
            self.session_id = self.header_session_id = session
        raw_parent = headers.get(PARENT_TRACE_HEADER)
        if raw_parent is not None:
            parent = parse_uuid(raw_parent.strip())
            if parent is None:
                raise GatewayError(
                    400, errors.INVALID_HEADER,
                    f"X-Xenovia-Parent-Trace-Id must be a UUID, got {raw_parent[:64]!r}",
                )
            self.parent_trace_id = parent
        self.session_path = _checked_label(
            headers.get(SESSION_PATH_HEADER), "X-Xenovia-Session-Path", MAX_SESSION_PATH_CHARS, "/"
        )
        self.flow_id = _checked_label(
            headers.get(FLOW_ID_HEADER), "X-Xenovia-Trace-Flow-Id", MAX_FLOW_ID_CHARS, ""
        )

    def _authenticate(self, headers: dict[str, str], proxy_id: str) -> None:
        token = headers.get(KEY_HEADER)
        if token is None:
            authorization = headers.get("authorization")
            if authorization is None:
                raise GatewayError(
                    401, errors.MISSING_API_KEY,
                    "missing API key: send Authorization: Bearer xe_... or X-Xenovia-Key",
                    errors.AUTHENTICATION,
                )
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer":
                raise _invalid_key("Authorization header must use the Bearer scheme")
        token = token.strip()
        if not token.startswith("xe_"):
            raise _invalid_key("API key must start with xe_")
        if not is_well_formed(token):
            raise _invalid_key("API key is malformed")
        key_hash = hash_key(token)
        key = self.gateway.registry.keys_by_hash.get(key_hash)
        if key is None or not digests_equal(key.sha256, key_hash):
            logger.info("trace %s: unknown key %s", self.trace_id, key_fingerprint(key_hash))
            raise _invalid_key("API key is not valid")
        if key.revoked:
            logger.info("trace %s: revoked key %s used", self.trace_id, key.id)
            raise _invalid_key("API key has been revoked")
        self.key = key
        if proxy_id not in key.proxy_ids:
            raise GatewayError(
                403, errors.PROXY_ACCESS_DENIED,
                f"this API key is not allowed to use proxy {proxy_id}", errors.PERMISSION,
            )
        proxy = self.gateway.registry.proxies.get(proxy_id)
        if proxy is None:
            raise GatewayError(404, errors.PROXY_NOT_FOUND, f"proxy {proxy_id} not found", errors.NOT_FOUND)
        self.proxy = proxy

    def _route_upstream(self, route, headers: dict[str, str], names: list[str]) -> msgs.ProcessingResponse:
        upstream = self.proxy.upstream
        forbidden = self.gateway.address_check.error_for(upstream.host, upstream.port)
        if forbidden:
            logger.error("trace %s: upstream of proxy %s rejected: %s", self.trace_id, self.proxy.id, forbidden)
            raise GatewayError(502, errors.UPSTREAM_FORBIDDEN, "the proxy's upstream address is not allowed",
                               errors.UPSTREAM)
        mutation = Mutation()
        for name in headers:
            if name.startswith(":"):
                # Pseudo-headers cannot be removed (Envoy rejects and counts it), and
                # :authority, the one the pattern matches, is set below.
                continue
            if name.startswith(_STRIPPED_PREFIX) or name in _STRIPPED_HEADERS or _CREDENTIAL_OR_CLIENT.search(name):
                mutation.remove(name)
        if self.proxy.upstream_key_env:
            credential = os.environ.get(self.proxy.upstream_key_env)
            if not credential:
                logger.error(
                    "trace %s: provider credential variable %s is not set for proxy %s",
                    self.trace_id, self.proxy.upstream_key_env, self.proxy.id,
                )
                raise GatewayError(
                    502, errors.UPSTREAM_CREDENTIAL_MISSING,
                    "the proxy's provider credential is not configured", errors.UPSTREAM,
                )
            mutation.set("authorization", f"Bearer {credential}")
        mutation.set(":path", upstream.target_path(route.rest) + route.query)
        mutation.set(":authority", upstream.authority)
        # The route in envoy/ picks the TLS or plain-text upstream cluster from this header.
        # The service always sets it, so a value sent by the client has no effect.
        mutation.set("x-xenovia-upstream", upstream.scheme)
        mutation.clear_route_cache = True
        count = mutation.header_count_after(names)
        if count > MAX_REQUEST_HEADERS:
            # Envoy would reject the mutated request with a bare 503 and reset this stream.
            # 400, not 431: envoy/ rewrites every 431 body as one of its own local replies.
            raise GatewayError(
                400, errors.TOO_MANY_HEADERS,
                f"the request has too many headers: with the gateway's own it would have {count}, "
                f"and at most {MAX_REQUEST_HEADERS} are allowed; send fewer headers",
            )
        return msgs.request_headers_reply(mutation, {"trace_id": self.trace_id})

    def _health(self) -> msgs.ProcessingResponse:
        self.status = 200
        self.finished = True
        self.is_health_check = True
        health = {
            "status": "ok",
            "proxies": len(self.gateway.registry.proxies),
            "registry_version": self.gateway.watcher.version,
        }
        if self.gateway.watcher.error:
            # The gateway still serves, with the last registry that loaded, so the status
            # stays 200 for probes. Changes made since (revoked keys included) are not in
            # force until the files load again, which monitoring should see.
            health["status"] = "degraded"
            health["registry_error"] = self.gateway.watcher.error
        session_error = self.gateway.sessions.recent_error()
        if session_error:
            # Calls still go through, each in a new session (or the header's) at turn 1.
            health["status"] = "degraded"
            health["session_store_error"] = session_error
        policy_errors = self.gateway.policy_errors()
        if policy_errors:
            # Calls at those stages are denied with policy_error until the files compile.
            health["status"] = "degraded"
            health["policy_errors"] = policy_errors
        body = json.dumps(health).encode()
        return msgs.immediate_reply(200, body, self.trace_headers(), "health")

    # Request body: session, request-stage policy, redaction, stream usage.

    async def _on_request_body(self, message) -> msgs.ProcessingResponse:
        raw = bytes(message.body)
        self.body = openai_api.parse_json_body(raw)
        self.body_text = raw.decode("utf-8")
        self.fields = openai_api.extract_fields(self.request_type, self.body)
        await self._resolve_session()

        mutation = Mutation()
        changed = self._apply_request_policy()
        self._take_response_engine()
        if self.fields.stream and self.request_type in ("chat_completions", "completions"):
            changed = self._request_stream_usage() or changed
        if changed:
            new_body = json_text.compact(self.body).encode()
            mutation.replace_body(new_body)
            mutation.set("content-length", str(len(new_body)))
        self.upstream_sent = time.perf_counter()
        self.upstream_sent_ns = time.time_ns()
        return msgs.request_body_reply(mutation, {"trace_id": self.trace_id, "session_id": self.session_id})

    async def _resolve_session(self) -> None:
        resolved = await self.gateway.sessions.resolve(
            proxy_id=self.proxy.id,
            key_id=self.key.id,
            header_session_id=self.header_session_id,
            request_type=self.request_type,
            body=self.body,
        )
        self.session_id = resolved.session_id
        self.session_turn = resolved.turn
        self.session_source = resolved.source

    def _apply_request_policy(self) -> bool:
        """Evaluate the request-stage policy; raise on a block, return True when the body changed."""
        decision = self.evaluate_policy("request", None)
        self.policy_outcome = "allow"
        if decision is None:
            return False
        if decision.outcome == "deny":
            self.policy_outcome = "block"
            code = errors.POLICY_ERROR if decision.error else errors.POLICY_BLOCK
            raise GatewayError(403, code, errors.POLICY_BLOCK_MESSAGE, errors.POLICY_VIOLATION)
        if not decision.redact_fields:
            return False
        # Every string of the body reaches the provider (tool descriptions, `user`, metadata,
        # a predicted output), so all of them are redacted, not only the conversation.
        # The client keeps its own unredacted copy of the history and resends it, so the
        # session links of this response are computed from the body as the client sent it.
        client_body = self.body
        redacted, counts = redaction.redact_json_strings(client_body, decision.redact_fields)
        found_kinds = {kind for kind, count in counts.items() if count}
        if not found_kinds:
            return False
        self.body = redacted
        self.policy_outcome = "redact"
        self.redacted_kinds |= found_kinds
        self.client_body = client_body
        self.fields = openai_api.extract_fields(self.request_type, self.body)
        return True

    def _request_stream_usage(self) -> bool:
        options = self.body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        self.body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        self.stream_usage_injected = True
        return True

    def policy_engine(self, stage: str) -> policy.PolicyEngine | None:
        """Return the stage's engine as it was when this exchange first requested it.

        Raises PolicyUnavailable, as Gateway.policy_engine does, on every later request too.
        """
        if stage not in self._engines:
            try:
                self._engines[stage] = self.gateway.policy_engine(self.proxy, stage)
            except PolicyUnavailable as exc:
                self._engines[stage] = exc
        found = self._engines[stage]
        if isinstance(found, PolicyUnavailable):
            raise found
        return found

    def _take_response_engine(self) -> None:
        """Take the response stage's engine once the request is let through.

        A call in flight when its proxy's policies change, or the proxy is deleted, is then
        governed by the policies it started with. A response policy that does not compile
        would block the response, so the request is blocked now, before the provider is called.
        """
        try:
            self.policy_engine("response")
        except PolicyUnavailable:
            self.evaluate_policy("response", None)  # records the deny step and its error
            self.policy_outcome = "block_response"
            raise GatewayError(
                403, errors.POLICY_ERROR, errors.POLICY_BLOCK_MESSAGE, errors.POLICY_VIOLATION
            ) from None

    def evaluate_policy(self, stage: str, output: dict | None):
        """Evaluate the proxy's policy for a stage and record the outcome; None when none is attached.

        A policy that fails to compile or to evaluate denies (fail closed).
        """
        began = time.perf_counter()
        try:
            engine = self.policy_engine(stage)
        except PolicyUnavailable as exc:
            rule_id = f"{exc.policy_name}.error"
            self._record_policy(stage, "deny", rule_id, str(exc), began)
            return policy.Decision(outcome="deny", rule_id=rule_id, error=str(exc))
        if engine is None:
            return None
        document = self.policy_input(stage, output, engine.required_fields, engine.request_keys)
        decision = engine.evaluate(document)
        if decision.outcome == "deny":
            reason = decision.error or "; ".join(decision.reasons) or "denied"
            self._record_policy(stage, "deny", decision.rule_id, reason, began)
        else:
            self._record_policy(stage, "allow", "", "", began)
            if decision.dry_run_denied:
                self.dry_run = True
                self.dry_run_outcome = "block" if stage == "request" else "block_response"
                self.policy_rule_id = decision.dry_run_rule_id
                self.policy_reason = "; ".join(decision.dry_run_reasons) or "denied (dry run)"
        return decision

    def _record_policy(self, stage: str, verdict: str, rule_id: str, reason: str, began: float) -> None:
        elapsed_ms = (time.perf_counter() - began) * 1000
        self.policy_ms += elapsed_ms
        if verdict == "deny":
            self.policy_rule_id = rule_id
            self.policy_reason = reason
        self.steps.append(("policy", f"{stage}_policy", time.time_ns(), elapsed_ms, verdict,
                           {"stage": stage, "rule_id": rule_id}))

    def policy_input(
        self,
        stage: str,
        output: dict | None,
        required: frozenset[str] | None,
        request_keys: frozenset[str] | None = None,
    ) -> str:
        """Build the policy input document as JSON, with only the fields the policy reads.

        ``request`` contains only the body keys the policy reads when it reads fixed keys.
        Otherwise it is the client's own JSON text spliced in, never re-encoded.
        """
        fields = self.fields or RequestFields()
        values = {
            "agent_id": lambda: self.proxy.id,
            "org_id": lambda: self.proxy.org_id,
            "request_type": lambda: self.request_type,
            "provider": lambda: self.proxy.provider,
            "model": lambda: fields.model,
            "stream": lambda: fields.stream,
            "messages": fields.policy_messages,
            "tools": lambda: fields.tools,
            "tool_names": lambda: fields.tool_names,
            "system_prompt": lambda: fields.system_prompt,
            "request_flat": lambda: openai_api.flatten(self.body or {}),
            "http_headers": lambda: openai_api.policy_headers(self.headers),
            "intent_action": lambda: "",
            "intent_score": lambda: None,
            "session_id": lambda: self.session_id,
            "session_turn": lambda: self.session_turn,
            "properties": lambda: self.properties,
            "stage": lambda: stage,
        }
        document = {
            name: produce()
            for name, produce in values.items()
            if required is None or name in required or name == "stage"
        }
        if request_keys is not None and (required is None or "request" in required):
            body = self.body or {}
            document["request"] = {key: body[key] for key in request_keys if key in body}
        text = json_text.compact(document)
        if request_keys is None and (required is None or "request" in required) and self.body_text:
            text = text[:-1] + ',"request":' + self.body_text + "}"
        if stage == "response" and (required is None or "output" in required):
            # Tool-call arguments in the output are parsed leniently and may contain NaN. The
            # json module writes it as NaN, which the engine rejects, so the policy fails closed.
            output_text = json.dumps(output, separators=(",", ":"), ensure_ascii=False)
            text = text[:-1] + ',"output":' + output_text + "}"
        return text

    # Response: delegated to ResponseHandler, which handles buffered and streamed bodies.

    def _on_response_headers(self, message) -> msgs.ProcessingResponse:
        if self.upstream_sent is not None:
            self.provider_ms = (time.perf_counter() - self.upstream_sent) * 1000
        headers = msgs.header_values(message)
        self.status = int(headers.get(":status", "0") or 0)
        self.response = ResponseHandler(self, headers)
        reply = self.response.on_headers(end_of_stream=message.end_of_stream)
        if message.end_of_stream:
            self.finished = True
        return reply

    async def _on_response_body(self, message) -> msgs.ProcessingResponse:
        if self.response is None:
            return msgs.response_body_reply()
        reply = self.response.on_body(bytes(message.body), message.end_of_stream)
        if (message.end_of_stream or self.response.ended) and not self.finished:
            self.finished = True
            # Recorded before the reply, so that the client's next call, whichever worker
            # takes it, finds its session.
            await self._record_answer()
        return reply

    async def _record_answer(self) -> None:
        output = self.response.output if self.response else None
        if output is None or self.status >= 400 or self.proxy is None or self.response.blocked:
            return
        await self.gateway.sessions.record_answer(
            proxy_id=self.proxy.id,
            key_id=self.key.id,
            session_id=self.session_id,
            request_type=self.request_type,
            body=self.client_body if self.client_body is not None else self.body,
            response_id=output.response_id or None,
            assistant_message=output.assistant_message(),
        )

    # End of the exchange.

    def finish(self, cancelled: bool) -> None:
        """Record the trace; called once when the gRPC stream ends, however it ended.

        Health checks are not traced, so that probes do not fill the trace table.
        """
        if self.is_health_check:
            return
        if self.response is not None:
            self.response.on_cancel() if cancelled and not self.finished else None
        if cancelled and not self.error_code:
            # The side stream ended before the exchange did: the client went away or the
            # provider's connection broke, so the response did not reach the client whole.
            self.error_code = errors.REQUEST_CANCELLED
            self.error_message = "the request ended before the whole response had passed the gateway"
        if not self.session_id:
            self.session_id = str(uuid.uuid4())
        try:
            trace = build_trace(self, cancelled)
        except Exception:
            # Every exchange is recorded: what failed to convert is left out, not the trace.
            logger.exception("trace %s: failed to build the trace record", self.trace_id)
            trace = minimal_trace(self, cancelled)
        self.gateway.exporter.submit(trace)
        logger.debug("trace %s: status %s outcome %s", self.trace_id, self.status, self.policy_outcome)


def _invalid_key(message: str) -> GatewayError:
    return GatewayError(401, errors.INVALID_API_KEY, message, errors.AUTHENTICATION)


def _checked_label(value: str | None, header: str, max_chars: int, extra: str) -> str:
    """Validate a free-form label header: printable ASCII word characters, bounded length."""
    if value is None:
        return ""
    value = value.strip()
    allowed = extra + "-_.:"
    if (
        not value
        or len(value) > max_chars
        or not value.isascii()
        or not all(c.isalnum() or c in allowed for c in value)
    ):
        raise GatewayError(
            400, errors.INVALID_HEADER,
            f"{header} must be 1 to {max_chars} letters, digits or {allowed!r}, got {value[:64]!r}",
        )
    return value
