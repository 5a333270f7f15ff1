"""
OpenAI-compatible fake LLM provider for the tests, the benchmark and the `make run` demo.

It speaks HTTP/1.1 (keep-alive, Content-Length and chunked bodies) on asyncio streams alone, so
the bytes and the write boundaries of every response are under our control. It serves POST
`.../v1/chat/completions`, `.../v1/responses`, `.../v1/embeddings` and `.../v1/completions`
under any path prefix and returns 404 in the OpenAI error shape for anything else.

Request headers select a scenario per request (the answers are built in
ext_proc.mock_answers):

    x-mock-answer: TEXT            reply with TEXT instead of DEFAULT_ANSWER
    x-mock-echo: 1                 reply with the text of the last user message
    x-mock-tool-call: NAME[;ARGS]  reply with a call of function NAME (ARGS: JSON text, default {})
    x-mock-status: CODE            fail with HTTP status CODE (300-599) and an OpenAI error body
                                   (with x-mock-echo, its message quotes the last user message)
    x-mock-no-usage: 1             leave usage out (streams also lose their usage chunk)
    x-mock-delay-ms: N             wait N ms before the first byte
    x-mock-chunk-delay-ms: N       wait N ms between stream events
    x-mock-split-event: 1          write the first content event of a stream in two flushed writes
    x-mock-truncate: 1             end a stream cleanly after two content events, without [DONE]
    x-mock-raw-event: TEXT         send TEXT as its own chunk before a stream's first event, with
                                   the escapes \\r and \\n turned into CR and LF
    x-mock-gzip: 1                 gzip the body (streams get one sync flush per event)

Every API request is counted and, unless recording is off, recorded. `GET /_mock/requests`
returns `{"count": N, "requests": [...]}`, `POST /_mock/reset` clears both and
`GET /_mock/health` returns 200. Run it with:

    python -m ext_proc.mock_provider --host 127.0.0.1 --port 0 --port-file /tmp/provider.port
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gzip
import http
import json
import logging
import signal
import ssl
import sys
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ext_proc.mock_answers import (
    DEFAULT_ANSWER,
    ENDPOINTS,
    TRUNCATE_AFTER_CONTENT_EVENTS,
    Events,
    Scenario,
    echoed_text,
    encode_json,
    error_body,
    invalid_request,
    parse_scenario,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ANSWER",
    "MockProvider",
    "MockProviderThread",
    "run_in_thread",
    "start_mock_provider",
]

DEFAULT_MAX_RECORDED = 1000
DEFAULT_SPLIT_PAUSE_MS = 20
MAX_HEAD_BYTES = 64 * 1024
STARTUP_TIMEOUT_S = 10.0


class _BadRequest(Exception):
    """The client sent bytes that are not a valid HTTP/1.1 request."""


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes

    def to_record(self) -> dict[str, Any]:
        body = self.body.decode("utf-8", "replace")
        return {"method": self.method, "path": self.target, "headers": self.headers, "body": body}


# -- HTTP/1.1 ---------------------------------------------------------------------------------


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    """Read one request, or return None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("connection closed before the end of the request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest(f"request head is larger than {MAX_HEAD_BYTES} bytes") from exc
    lines = head.decode("latin-1").split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
        raise _BadRequest(f"invalid request line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise _BadRequest(f"invalid header line {line!r}")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    return _Request(request_line[0], request_line[1], request_line[2], headers, body)


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked_body(reader)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest(f"invalid content-length {headers['content-length']!r}") from exc
    return await reader.readexactly(length) if length > 0 else b""


async def _read_chunked_body(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError as exc:
            raise _BadRequest(f"invalid chunk size line {size_line!r}") from exc
        if size == 0:
            break
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailer fields carry nothing the mock uses
    return b"".join(parts)


@functools.cache
def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


class _Output:
    """Writes one response, either with a Content-Length body or as a chunked event stream."""

    __slots__ = ("_close", "_compressor", "_gzip", "_writer")

    def __init__(self, writer: asyncio.StreamWriter, gzip_body: bool, close: bool) -> None:
        self._writer = writer
        self._gzip = gzip_body
        self._close = close
        self._compressor: Any = None

    def _head(self, status: int, content_type: bytes, framing: bytes) -> bytes:
        head = _status_line(status) + b"content-type: " + content_type + b"\r\n" + framing
        if self._gzip:
            head += b"content-encoding: gzip\r\n"
        return head + (b"connection: close\r\n\r\n" if self._close else b"\r\n")

    async def send_json(self, status: int, payload: dict[str, Any]) -> None:
        body = encode_json(payload).encode()
        if self._gzip:
            body = gzip.compress(body, compresslevel=1)
        framing = b"content-length: %d\r\n" % len(body)
        self._writer.write(self._head(status, b"application/json", framing) + body)
        await self._writer.drain()

    async def start_stream(self) -> None:
        if self._gzip:
            self._compressor = zlib.compressobj(wbits=31)  # 31 selects the gzip container
        framing = b"transfer-encoding: chunked\r\ncache-control: no-cache\r\n"
        self._writer.write(self._head(200, b"text/event-stream; charset=utf-8", framing))

    async def send_chunk(self, data: bytes) -> None:
        """Write data as one HTTP chunk in one write, flushed through gzip when enabled."""
        if self._compressor is not None:
            data = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        self._writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self._writer.drain()

    async def end_stream(self) -> None:
        tail = self._compressor.flush() if self._compressor is not None else b""
        framed_tail = b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b""
        self._writer.write(framed_tail + b"0\r\n\r\n")
        await self._writer.drain()


async def _send_events(out: _Output, events: Events, scenario: Scenario, split_pause_s: float):
    await out.start_stream()
    if scenario.raw_event is not None:
        await out.send_chunk(scenario.raw_event)
    content_sent = 0
    for position, (data, is_content) in enumerate(events):
        if scenario.truncate and content_sent >= TRUNCATE_AFTER_CONTENT_EVENTS:
            break
        if scenario.chunk_delay_ms and position:
            await asyncio.sleep(scenario.chunk_delay_ms / 1000)
        if is_content and content_sent == 0 and scenario.split_event:
            middle = len(data) // 2
            await out.send_chunk(data[:middle])
            await asyncio.sleep(split_pause_s)
            await out.send_chunk(data[middle:])
        else:
            await out.send_chunk(data)
        content_sent += is_content
    await out.end_stream()


def _wants_close(request: _Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return "keep-alive" not in connection
    return "close" in connection


# -- server -----------------------------------------------------------------------------------


class MockProvider:
    """
    A running mock provider on an asyncio event loop. Create it with `start_mock_provider`.

    `requests` lists the recorded API requests (method, full path, lower-cased headers, body
    text), oldest first, and `request_count` counts API requests even when recording is off.
    """

    def __init__(
        self,
        *,
        latency_ms: int = 0,
        require_key: str | None = None,
        record: bool = True,
        max_recorded: int = DEFAULT_MAX_RECORDED,
        split_pause_ms: int = DEFAULT_SPLIT_PAUSE_MS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.request_count = 0
        # Serves https with this server context, to test providers behind TLS.
        self._tls = tls
        self._latency_ms = latency_ms
        self._expected_authorization = f"Bearer {require_key}" if require_key else None
        self._record = record
        self._recorded: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_recorded)
        self._split_pause_s = split_pause_ms / 1000
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        # deque.copy runs in C under the GIL, so a reader in another thread gets a consistent list.
        return list(self._recorded.copy())

    def reset(self) -> None:
        self._recorded.clear()
        self.request_count = 0

    async def listen(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, ssl=self._tls
        )
        self.host, self.port = self._server.sockets[0].getsockname()[:2]
        logger.info("mock provider listening on %s", self.base_url)

    async def close(self) -> None:
        """Stop listening and drop open connections, including any response still being sent."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        logger.info("mock provider on port %d stopped", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            while True:
                try:
                    request = await _read_request(reader, writer)
                except _BadRequest as exc:
                    await _Output(writer, False, True).send_json(*invalid_request(str(exc)))
                    break
                if request is None:
                    break
                close = _wants_close(request)
                await self._dispatch(request, writer, close)
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client disconnected mid-request, so no response can be sent
        except asyncio.CancelledError:
            # close() cancels open connections. Ending normally keeps asyncio's stream callback
            # from logging the cancellation as an error.
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _dispatch(self, request: _Request, writer: asyncio.StreamWriter, close: bool):
        path = request.target.split("?", 1)[0]
        if path.startswith("/_mock/"):
            await self._control(request.method, path, _Output(writer, False, close))
            return
        self.request_count += 1
        if self._record:
            self._recorded.append(request.to_record())
        try:
            scenario = parse_scenario(request.headers)
        except ValueError as exc:
            await _Output(writer, False, close).send_json(*invalid_request(str(exc)))
            return
        out = _Output(writer, scenario.gzip, close)

        delay_ms = self._latency_ms if scenario.delay_ms is None else scenario.delay_ms
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        status, result = self._answer(request, path, scenario)
        if isinstance(result, list):
            await _send_events(out, result, scenario, self._split_pause_s)
        else:
            await out.send_json(status, result)

    def _answer(self, request: _Request, path: str, scenario: Scenario):
        """Return (status, JSON body) or (200, stream events) for an API request."""
        expected = self._expected_authorization
        if expected and request.headers.get("authorization") != expected:
            return 401, error_body(401, "Incorrect API key provided.")
        _, marker, endpoint = path.rpartition("/v1/")
        handler = ENDPOINTS.get(endpoint.rstrip("/")) if marker else None
        if handler is None or request.method != "POST":
            return 404, error_body(404, f"Invalid URL ({request.method} {path})")
        if scenario.status is not None:
            message = f"Mock provider error {scenario.status} requested by x-mock-status."
            if scenario.echo:
                message += f" Request: {echoed_text(request.body)}"
            return scenario.status, error_body(scenario.status, message)
        try:
            body = json.loads(request.body)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return invalid_request("invalid request body: expected a JSON object")
        try:
            return 200, handler(body, scenario)
        except ValueError as exc:
            return invalid_request(str(exc))

    async def _control(self, method: str, path: str, out: _Output) -> None:
        if method == "GET" and path == "/_mock/health":
            await out.send_json(200, {"status": "ok"})
        elif method == "GET" and path == "/_mock/requests":
            await out.send_json(200, {"count": self.request_count, "requests": self.requests})
        elif method == "POST" and path == "/_mock/reset":
            self.reset()
            await out.send_json(200, {"status": "ok"})
        else:
            await out.send_json(404, error_body(404, f"Invalid URL ({method} {path})"))


async def start_mock_provider(
    host: str = "127.0.0.1", port: int = 0, **options: Any
) -> MockProvider:
    """
    Start a mock provider on the running loop. Port 0 binds a free port.

    Options: latency_ms (delay before every response), require_key (expected bearer key),
    record (keep request records), max_recorded, split_pause_ms (pause of x-mock-split-event),
    tls (an ssl.SSLContext to serve https with).
    """
    provider = MockProvider(**options)
    await provider.listen(host, port)
    return provider


class MockProviderThread:
    """A mock provider on its own event loop in a daemon thread, for synchronous tests."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.provider: MockProvider | None = None
        self._thread = threading.Thread(
            target=self._run, args=(host, port, options), name="mock-provider", daemon=True
        )
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S):
            raise TimeoutError(f"mock provider did not start within {STARTUP_TIMEOUT_S} s")
        if self._error is not None:
            raise self._error

    def _run(self, host: str, port: int, options: dict[str, Any]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.provider = self._loop.run_until_complete(
                start_mock_provider(host, port, **options)
            )
        except (OSError, TypeError, ValueError) as exc:
            self._error = exc
            self._started.set()
            self._loop.close()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.provider.close())
        self._loop.close()

    @property
    def port(self) -> int:
        return self.provider.port

    @property
    def base_url(self) -> str:
        return self.provider.base_url

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.provider.requests

    @property
    def request_count(self) -> int:
        return self.provider.request_count

    def reset(self) -> None:
        # Clearing a deque and rebinding an int are atomic under the GIL, so no loop hop is needed.
        self.provider.reset()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_in_thread(**options: Any) -> MockProviderThread:
    """Start a mock provider in a background thread; call `.stop()` on the handle when done."""
    return MockProviderThread(**options)


# -- command line -----------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ext_proc.mock_provider", description="OpenAI-compatible mock LLM provider."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0 picks a free port)")
    parser.add_argument("--port-file", type=Path, help="file to write the bound port to")
    parser.add_argument(
        "--latency-ms", type=int, default=0, help="delay before every response, in ms"
    )
    parser.add_argument("--require-key", help="reject requests without 'Authorization: Bearer KEY'")
    parser.add_argument("--no-record", action="store_true", help="count requests, keep no records")
    return parser.parse_args(argv)


class ListenError(Exception):
    """The mock provider could not bind its address."""


async def _serve_until_signal(args: argparse.Namespace) -> None:
    try:
        provider = await start_mock_provider(
            args.host,
            args.port,
            latency_ms=args.latency_ms,
            require_key=args.require_key,
            record=not args.no_record,
        )
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from exc
    if args.port_file:
        # Write then rename, so a process polling the file never reads a partial port number.
        partial = args.port_file.with_name(args.port_file.name + ".tmp")
        partial.write_text(f"{provider.port}\n")
        partial.replace(args.port_file)
    # Parent processes read this exact line from stdout to learn the port.
    print(f"listening on http://{args.host}:{provider.port}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await provider.close()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        asyncio.run(_serve_until_signal(_parse_args(argv)))
    except ListenError as exc:
        # One line, not a traceback: `make run` adds its hint about XENOVIA_MOCK_PORT below.
        print(f"mock provider: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
