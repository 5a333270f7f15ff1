"""Builders for the ext_proc ``ProcessingResponse`` messages the service sends to Envoy."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

ProcessingResponse = ext_proc_pb2.ProcessingResponse
ProcessingMode = processing_mode_pb2.ProcessingMode

METADATA_NAMESPACE = "xenovia"
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_values(headers: ext_proc_pb2.HttpHeaders) -> dict[str, str]:
    """Return the headers of an HttpHeaders message as a dict of lower-case names.

    Envoy sends values in ``raw_value``; repeated headers are joined with commas.
    """
    values: dict[str, str] = {}
    for header in headers.headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        name = header.key
        values[name] = f"{values[name]},{value}" if name in values else value
    return values


class Mutation:
    """Collect header changes and an optional new body for one reply."""

    __slots__ = ("set_headers", "remove_headers", "body", "clear_route_cache", "add_body")

    def __init__(self) -> None:
        self.set_headers: list[tuple[str, str]] = []
        self.remove_headers: list[str] = []
        self.body: bytes | None = None
        self.clear_route_cache = False
        # Set in a headers reply to give a message that has no body one
        # (CONTINUE_AND_REPLACE); Envoy then sends no body message for it.
        self.add_body = False

    def set(self, name: str, value: str) -> None:
        self.set_headers.append((name, value))

    def remove(self, name: str) -> None:
        self.remove_headers.append(name)

    def replace_body(self, body: bytes) -> None:
        self.body = body

    def header_count_after(self, names: list[str]) -> int:
        """Return how many header entries a map with entries ``names`` has after this mutation."""
        removed = set(self.remove_headers)
        remaining = [name for name in names if name not in removed]
        present = set(remaining)
        added = {name for name, _ in self.set_headers if name not in present}
        return len(remaining) + len(added)

    def write_to(self, common: ext_proc_pb2.CommonResponse) -> None:
        """Write this mutation into ``common``, a reply's CommonResponse, in place."""
        # An empty CommonResponse must still be present, because its presence sets the oneof.
        common.SetInParent()
        if self.clear_route_cache:
            common.clear_route_cache = True
        if self.add_body:
            common.status = ext_proc_pb2.CommonResponse.CONTINUE_AND_REPLACE
        if self.set_headers or self.remove_headers:
            mutation = common.header_mutation
            for name, value in self.set_headers:
                option = mutation.set_headers.add()
                option.header.key = name
                option.header.raw_value = value.encode()
                option.append_action = _OVERWRITE
            mutation.remove_headers.extend(self.remove_headers)
        if self.body is not None:
            if self.body:
                common.body_mutation.body = self.body
            else:
                common.body_mutation.clear_body = True


def _write_metadata(reply: ProcessingResponse, values: dict[str, str]) -> None:
    reply.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(values)


def request_headers_reply(mutation: Mutation, metadata: dict[str, str] | None = None):
    reply = ProcessingResponse()
    mutation.write_to(reply.request_headers.response)
    if metadata:
        _write_metadata(reply, metadata)
    return reply


def request_body_reply(mutation: Mutation | None = None, metadata: dict[str, str] | None = None):
    reply = ProcessingResponse()
    if mutation is None:
        reply.request_body.SetInParent()
    else:
        mutation.write_to(reply.request_body.response)
    if metadata:
        _write_metadata(reply, metadata)
    return reply


def response_headers_reply(mutation: Mutation, body_mode: int | None = None):
    reply = ProcessingResponse()
    mutation.write_to(reply.response_headers.response)
    if body_mode is not None:
        reply.mode_override.response_body_mode = body_mode
    return reply


def response_body_reply(mutation: Mutation | None = None):
    reply = ProcessingResponse()
    if mutation is None:
        reply.response_body.SetInParent()
    else:
        mutation.write_to(reply.response_body.response)
    return reply


def immediate_reply(
    status: int,
    body: bytes,
    headers: dict[str, str],
    details: str,
    metadata: dict[str, str] | None = None,
):
    """Reply to the client directly; Envoy sends a JSON body only with an explicit content-type."""
    reply = ProcessingResponse()
    if metadata:
        # Envoy's access log reads the trace id from here, for replies the service writes too.
        _write_metadata(reply, metadata)
    immediate = reply.immediate_response
    # envoy.type.v3.StatusCode enum values are the HTTP status numbers themselves.
    immediate.status.code = status
    immediate.body = body
    immediate.details = details
    all_headers = {"content-type": "application/json", **headers}
    for name, value in all_headers.items():
        immediate.headers.set_headers.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
        )
    return reply


BUFFERED = ProcessingMode.BUFFERED
STREAMED = ProcessingMode.STREAMED
NONE = ProcessingMode.NONE
