"""Time to first token of streamed chat completions, per request, over keep-alive HTTP/1.1.

wrk reports only the time to the whole response, and h2load's "time to 1st byte" is
measured once per connection, not per request, so this small asyncio client measures it:
each of ``connections`` connections sends the same streamed request in a loop for a fixed
time. TTFT is the time from writing the request to reading the first non-empty chunk of
the chunked body (the first server-sent event). Headers alone do not count, because a
gateway may send them before it lets any event through.

    python -m bench.ttft --url http://127.0.0.1:8080/v1/chat/completions --body body.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from bench.load import Request


class StreamError(RuntimeError):
    """The server answered with an error status or a body that is not chunked."""


@dataclass(frozen=True)
class TtftResult:
    samples: int
    failures: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    total_p50_ms: float

    @classmethod
    def from_samples(cls, ttfts: list[float], totals: list[float], failures: int) -> TtftResult:
        if not ttfts:
            return cls(0, failures, float("nan"), float("nan"), float("nan"))
        return cls(
            len(ttfts),
            failures,
            percentile(ttfts, 50),
            percentile(ttfts, 99),
            percentile(totals, 50),
        )


def percentile(values: list[float], percent: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(percent / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def encode_request(request: Request) -> tuple[str, int, bytes]:
    url = urllib.parse.urlsplit(request.url)
    body = request.body_file.read_bytes()
    lines = [f"POST {url.path} HTTP/1.1", f"Host: {url.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return url.hostname, url.port, head + body


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def timed_request(reader, writer, payload: bytes) -> tuple[float, float]:
    """Send one request and read its whole answer; return (TTFT, total) in milliseconds."""
    began = time.perf_counter()
    writer.write(payload)
    status, headers = await _read_head(reader)
    if "chunked" not in headers.get("transfer-encoding", ""):
        await reader.readexactly(int(headers.get("content-length", "0")))
        raise StreamError(f"status {status} without a chunked body")
    first = None
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            break
        if first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    if status != 200 or first is None:
        raise StreamError(f"status {status}")
    return (first - began) * 1000, (done - began) * 1000


async def _connection_loop(host, port, payload, measure_from, deadline, ttfts, totals, failures):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            try:
                ttft, total = await timed_request(reader, writer, payload)
            except StreamError:
                failures.append(1)
                continue
            if time.perf_counter() >= measure_from:
                ttfts.append(ttft)
                totals.append(total)
    finally:
        writer.close()


async def measure(request: Request, connections: int, seconds: float, warmup: float) -> TtftResult:
    """Run ``connections`` connections for ``warmup + seconds``; keep samples after the warm-up."""
    host, port, payload = encode_request(request)
    start = time.perf_counter()
    ttfts: list[float] = []
    totals: list[float] = []
    failures: list[int] = []
    await asyncio.gather(
        *(
            _connection_loop(
                host,
                port,
                payload,
                start + warmup,
                start + warmup + seconds,
                ttfts,
                totals,
                failures,
            )
            for _ in range(connections)
        )
    )
    return TtftResult.from_samples(ttfts, totals, len(failures))


def run(request: Request, connections: int, seconds: float, warmup: float) -> TtftResult:
    return asyncio.run(measure(request, connections, seconds, warmup))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ttft",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", required=True, type=Path, help="file with the JSON request body")
    parser.add_argument("--header", action="append", default=[], help="extra header, 'Name: value'")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time, in seconds")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="unmeasured time first, in seconds"
    )
    args = parser.parse_args(argv)
    headers = {"Content-Type": "application/json"}
    for line in args.header:
        name, _, value = line.partition(":")
        headers[name.strip()] = value.strip()
    result = run(Request(args.url, args.body, headers), args.connections, args.seconds, args.warmup)
    print(json.dumps(result.__dict__))


if __name__ == "__main__":
    main()
