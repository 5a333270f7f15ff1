"""Client-facing errors in the OpenAI error shape.

Every response the gateway writes itself carries a JSON body
``{"error": {"message", "type", "code", "request_id"}}`` so that each OpenAI SDK raises its
usual exception for the status (400 BadRequestError, 401 AuthenticationError, 403
PermissionDeniedError, 404 NotFoundError, ...). Policy blocks keep the platform's exact body
``{"error": {"message": "request blocked by policy", "type": "policy_violation", "code":
"policy_block"}}``: users match on it, and the rule and reason go to the trace, never to the
client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Error types, as the OpenAI API names them where one fits.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
POLICY_VIOLATION = "policy_violation"
UPSTREAM = "upstream_error"
SERVER = "server_error"

# Machine-readable codes, reused in traces (error_type) and tests.
INVALID_SESSION_ID = "invalid_session_id"
INVALID_HEADER = "invalid_header"
INVALID_PROPERTY = "invalid_property"
INVALID_JSON = "invalid_json"
MISSING_API_KEY = "missing_api_key"
INVALID_API_KEY = "invalid_api_key"
PROXY_ACCESS_DENIED = "proxy_access_denied"
PROXY_NOT_FOUND = "proxy_not_found"
ENDPOINT_NOT_SUPPORTED = "endpoint_not_supported"
METHOD_NOT_ALLOWED = "method_not_allowed"
UNSUPPORTED_CONTENT_ENCODING = "unsupported_content_encoding"
POLICY_BLOCK = "policy_block"
POLICY_ERROR = "policy_error"
UPSTREAM_FORBIDDEN = "upstream_forbidden"
UPSTREAM_CREDENTIAL_MISSING = "upstream_credential_missing"
UPSTREAM_UNAVAILABLE = "upstream_unavailable"
UPSTREAM_REDIRECT = "upstream_redirect"
UPSTREAM_INVALID_STATUS = "upstream_invalid_status"
TOO_MANY_HEADERS = "too_many_headers"
STREAM_INCOMPLETE = "stream_incomplete"
REQUEST_CANCELLED = "request_cancelled"
REQUEST_TOO_LARGE = "request_too_large"
GATEWAY_ERROR = "gateway_error"
INTERNAL_ERROR = "internal_error"

POLICY_BLOCK_MESSAGE = "request blocked by policy"


@dataclass(frozen=True)
class GatewayError(Exception):
    """A request the gateway answers itself, with this status and error body."""

    status: int
    code: str
    message: str
    type: str = INVALID_REQUEST

    def body(self, request_id: str) -> bytes:
        return error_body(self.message, self.type, self.code, request_id)


def error_body(message: str, error_type: str, code: str, request_id: str) -> bytes:
    payload = {
        "error": {
            "message": message,
            "type": error_type,
            "code": code,
            "request_id": request_id,
        }
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def policy_block_body(request_id: str, code: str = POLICY_BLOCK) -> bytes:
    return error_body(POLICY_BLOCK_MESSAGE, POLICY_VIOLATION, code, request_id)


def sse_error_event(message: str, error_type: str, code: str, request_id: str) -> bytes:
    """Build the SSE event that ends a stream the gateway cuts short."""
    return b"data: " + error_body(message, error_type, code, request_id) + b"\n\n"
