"""A no-op Envoy ext_proc service: the floor of what a Python grpc.aio ext_proc can cost.

It answers every message Envoy sends with an empty reply of the matching kind: no header
changes, no body changes, no metadata. Which phases reach it is set in Envoy's
processing_mode (bench/envoy_noop.yaml), so one service serves every phase variant.

    python -m bench.noop_ext_proc --socket /tmp/noop.sock
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

logger = logging.getLogger(__name__)

# Built once: the replies carry no per-request data, and grpc serialises them on send.
_REPLIES = {
    "request_headers": ext_proc_pb2.ProcessingResponse(
        request_headers=ext_proc_pb2.HeadersResponse()
    ),
    "request_body": ext_proc_pb2.ProcessingResponse(request_body=ext_proc_pb2.BodyResponse()),
    "request_trailers": ext_proc_pb2.ProcessingResponse(
        request_trailers=ext_proc_pb2.TrailersResponse()
    ),
    "response_headers": ext_proc_pb2.ProcessingResponse(
        response_headers=ext_proc_pb2.HeadersResponse()
    ),
    "response_body": ext_proc_pb2.ProcessingResponse(response_body=ext_proc_pb2.BodyResponse()),
    "response_trailers": ext_proc_pb2.ProcessingResponse(
        response_trailers=ext_proc_pb2.TrailersResponse()
    ),
}


class NoopProcessor(ext_proc_grpc.ExternalProcessorServicer):
    async def Process(self, request_iterator, context):
        async for request in request_iterator:
            yield _REPLIES[request.WhichOneof("request")]


async def serve(socket_path: Path) -> None:
    server = grpc.aio.server(
        options=[
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    )
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    socket_path.unlink(missing_ok=True)
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    logger.info("no-op ext_proc listening on unix:%s", socket_path)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1.0)
    socket_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.noop_ext_proc", description=__doc__)
    parser.add_argument("--socket", required=True, type=Path, help="Unix socket to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.socket))


if __name__ == "__main__":
    main()
