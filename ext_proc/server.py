"""The ext_proc gRPC service: one worker process, one asyncio loop, one Unix socket.

Run by ``xenovia up`` (several workers are several processes, each on its own socket):
``python -m ext_proc.server --socket PATH --home HOME``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc

from ext_proc import home as home_paths
from ext_proc.gateway import Gateway, Settings
from ext_proc.processor import Exchange
from ext_proc.sessions import make_session_resolver
from ext_proc.traces import collector_socket_path
from ext_proc.traces.exporter import TraceExporter

logger = logging.getLogger(__name__)

# Bodies reach the service whole (buffered), so the gRPC receive limit must exceed the
# largest request Envoy buffers (envoy/ sets 32 MiB). grpc's 4 MiB default would fail
# large requests with a 500.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SHUTDOWN_GRACE_SECONDS = 5.0


class ExternalProcessor(ext_proc_grpc.ExternalProcessorServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def Process(self, request_iterator, context):
        exchange = Exchange(self.gateway)
        debug = logger.isEnabledFor(logging.DEBUG)
        try:
            async for request in request_iterator:
                reply = await exchange.handle(request)
                if debug:
                    logger.debug("trace %s: %s -> %s", exchange.trace_id,
                                 request.WhichOneof("request"), reply)
                yield reply
        finally:
            # Envoy ends the side stream, by a reset or by closing its side, when the HTTP
            # request is done or ends early. An exchange that had not finished ended early.
            exchange.finish(cancelled=not exchange.finished)


def grpc_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Accept Envoy's HTTP/2 keepalive pings instead of replying to them with GOAWAY.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


async def serve(
    socket_path: Path | None, home: Path, collector_socket: Path | None = None, tcp: str | None = None
) -> None:
    settings = Settings.from_environment(home)
    sessions = make_session_resolver(home, settings.redis_url)
    exporter = TraceExporter(str(collector_socket or collector_socket_path(home)))
    exporter.start()
    gateway = Gateway(settings, sessions, exporter)
    gateway.start()

    server = grpc.aio.server(options=grpc_options())
    ext_proc_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(gateway), server)
    if socket_path is not None:
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        address = f"unix:{socket_path}"
    else:
        address = tcp
    server.add_insecure_port(address)
    await server.start()
    logger.info("ext_proc worker %d listening on %s", os.getpid(), address)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()

    logger.info("ext_proc worker %d stopping", os.getpid())
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    await gateway.stop()
    await exporter.shutdown(SHUTDOWN_GRACE_SECONDS)
    await sessions.close()
    if socket_path is not None:
        socket_path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ext_proc.server", description=__doc__)
    listen = parser.add_mutually_exclusive_group(required=True)
    listen.add_argument("--socket", type=Path, help="Unix socket to listen on")
    listen.add_argument("--tcp", metavar="HOST:PORT", help="TCP address to listen on instead")
    parser.add_argument("--home", type=Path, default=None, help="home folder (default XENOVIA_HOME)")
    parser.add_argument("--collector-socket", type=Path, default=None, help="trace collector socket")
    parser.add_argument("--log-level", default=os.environ.get("XENOVIA_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    # regorus attaches a Rust backtrace to every error when this is set, which makes a
    # failing policy evaluation about ten times slower.
    os.environ.pop("RUST_BACKTRACE", None)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )
    asyncio.run(
        serve(args.socket, home_paths.home_dir(args.home), args.collector_socket, tcp=args.tcp)
    )


if __name__ == "__main__":
    main()
