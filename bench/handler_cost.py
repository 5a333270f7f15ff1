"""Time the gateway's own Python work for each ext_proc message of a call, without gRPC or Envoy.

One ``Exchange`` per call receives the four messages Envoy sends for a plain chat call:
request headers, the buffered request body, response headers and the buffered response
body. Then ``finish()`` builds and queues the trace, as when the gRPC stream ends.
The home has the bench policies attached at both stages and the default SQLite session
store. The trace exporter is the real one, not started: ``submit()`` queues the trace,
and the queue is emptied after every call, so no collector is needed.

This is the part of the added latency that the service itself decides; the rest is gRPC,
Envoy and the machine.

    python -m bench.handler_cost --calls 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2

from bench.targets import (
    PROVIDER_KEY,
    PROVIDER_KEY_ENV,
    REQUEST_POLICY,
    RESPONSE_POLICY,
    run_cli,
)
from ext_proc.gateway import Gateway, Settings
from ext_proc.processor import Exchange
from ext_proc.sessions import make_session_resolver
from ext_proc.traces.exporter import TraceExporter

SAMPLE_REQUEST = (
    Path(__file__).resolve().parent.parent / "policies" / "samples" / "request_chat.json"
)
PHASES = ("request headers", "request body", "response headers", "response body", "trace")
# The mock provider's reply to a plain chat call: one short choice and usage.
ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1767225600,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Your order ships on Monday."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 412, "completion_tokens": 9, "total_tokens": 421},
}


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    p50_us: float
    p99_us: float


def _headers(values: dict[str, str]) -> ext_proc_pb2.HttpHeaders:
    message = ext_proc_pb2.HttpHeaders()
    for name, value in values.items():
        message.headers.headers.append(base_pb2.HeaderValue(key=name, raw_value=value.encode()))
    return message


def _messages(proxy_id: str, key: str, body: bytes, answer: bytes):
    """Return a function that makes the four messages of one call, with a new request id."""
    request_headers = {
        ":method": "POST",
        ":scheme": "http",
        ":authority": "127.0.0.1:8080",
        ":path": f"/a/{proxy_id}/openai/v1/chat/completions",
        "content-type": "application/json",
        "content-length": str(len(body)),
        "authorization": f"Bearer {key}",
        "user-agent": "OpenAI/Python 3.51.0",
        "x-xenovia-property-team": "support",
        "x-forwarded-proto": "http",
    }
    response_headers = _headers(
        {
            ":status": "200",
            "content-type": "application/json",
            "content-length": str(len(answer)),
        }
    )
    request_body = ext_proc_pb2.ProcessingRequest(
        request_body=ext_proc_pb2.HttpBody(body=body, end_of_stream=True)
    )
    response_body = ext_proc_pb2.ProcessingRequest(
        response_body=ext_proc_pb2.HttpBody(body=answer, end_of_stream=True)
    )

    def make():
        headers = _headers({**request_headers, "x-request-id": str(uuid.uuid4())})
        return (
            ext_proc_pb2.ProcessingRequest(request_headers=headers),
            request_body,
            ext_proc_pb2.ProcessingRequest(response_headers=response_headers),
            response_body,
        )

    return make


def _prepare_home(home: Path) -> tuple[str, str]:
    proxy_id = run_cli(
        home,
        "proxy",
        "create",
        "--name",
        "bench",
        "--upstream-url",
        "http://127.0.0.1:9/v1",
        "--upstream-key-env",
        PROVIDER_KEY_ENV,
    )
    run_cli(
        home, "policy", "attach", "--proxy", proxy_id, "--stage", "request", str(REQUEST_POLICY)
    )
    run_cli(
        home, "policy", "attach", "--proxy", proxy_id, "--stage", "response", str(RESPONSE_POLICY)
    )
    key = run_cli(home, "key", "create", "--proxy", proxy_id)
    return proxy_id, key


async def _measure(
    home: Path, proxy_id: str, key: str, calls: int, warmup: int
) -> list[list[float]]:
    sessions = make_session_resolver(home)
    exporter = TraceExporter(str(home / "no-collector.sock"))
    gateway = Gateway(Settings(home=home), sessions, exporter)
    body = json.dumps(json.loads(SAMPLE_REQUEST.read_text())["request"]).encode()
    make = _messages(proxy_id, key, body, json.dumps(ANSWER).encode())
    timings: list[list[float]] = [[] for _ in PHASES]
    clock = time.perf_counter
    try:
        for index in range(warmup + calls):
            exchange = Exchange(gateway)
            durations = []
            for message in make():
                began = clock()
                reply = await exchange.handle(message)
                durations.append(clock() - began)
                if reply.WhichOneof("response") == "immediate_response":
                    raise RuntimeError(f"the gateway rejected the call: {reply.immediate_response}")
            began = clock()
            exchange.finish(cancelled=False)
            durations.append(clock() - began)
            exporter._queue.clear()
            if index >= warmup:
                for phase, seconds in zip(timings, durations):
                    phase.append(seconds * 1e6)
    finally:
        await sessions.close()
    return timings


def measure(calls: int = 3000, warmup: int = 300) -> list[PhaseCost]:
    """Return the p50 and p99 microseconds of each phase, and of the whole call last."""
    os.environ.setdefault(PROVIDER_KEY_ENV, PROVIDER_KEY)
    with tempfile.TemporaryDirectory(prefix="xenovia-handler-cost-") as folder:
        home = Path(folder)
        proxy_id, key = _prepare_home(home)
        timings = asyncio.run(_measure(home, proxy_id, key, calls, warmup))
    totals = [sum(values) for values in zip(*timings)]
    return [
        PhaseCost(phase, _percentile(values, 50), _percentile(values, 99))
        for phase, values in [*zip(PHASES, timings), ("whole call", totals)]
    ]


def _percentile(values: list[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.handler_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--calls", type=int, default=3000, help="measured calls (default 3000)")
    args = parser.parse_args(argv)
    for cost in measure(args.calls):
        print(f"{cost.phase:18} p50 {cost.p50_us:8.1f} us   p99 {cost.p99_us:8.1f} us")


if __name__ == "__main__":
    main()
