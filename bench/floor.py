"""The transport floor: the least a Python gRPC server can do for a request.

One process, `grpc.server` with a thread pool (grpcio's sync API, as mnist-edge uses),
one unary method and one bidirectional stream that return the request bytes unchanged
(identity serializers: no protobuf at all). Whatever mnist-edge costs above this is
the price of parsing, validation, batching, the model and the response.

`--http`: the HTTP floor, measured the same way: the HTTP transport mnist-edge's REST APIs
run on (server/http.py: httptools, a thread per keep-alive connection) answering every
POST with its own body, no routing, no JSON.

    python -m mnist_edge.bench.floor --address 127.0.0.1:0 --port-file /tmp/floor.port
    python -m mnist_edge.bench.floor --http --address 127.0.0.1:0 --port-file /tmp/httpfloor.port
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

import grpc

UNARY = "/bench.Echo/Echo"
STREAM = "/bench.Echo/EchoStream"


def sync_server(threads: int = 64) -> grpc.Server:
    """grpcio's sync server as the reference servers run it: a thread pool, 64 MiB messages."""
    return grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ])


def create_server(address: str = "127.0.0.1:0", threads: int = 64) -> tuple[grpc.Server, str]:
    server = sync_server(threads)

    def echo(request: bytes, context) -> bytes:
        return request

    def echo_stream(requests, context):
        yield from requests

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "EchoStream": grpc.stream_stream_rpc_method_handler(echo_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(address)
    host = address.rsplit(":", 1)[0]
    return server, f"{host}:{port}"


class HttpEcho:
    """The HTTP floor: server.http's transport with a handler that returns the request body."""

    def __init__(self, address: str) -> None:
        from mnist_edge.server.http import HttpServer, Response

        def echo(request):
            return Response(200, request.body, [("Content-Type", request.headers.get("content-type", "application/octet-stream"))])

        self._server = HttpServer(address, echo)
        self.address = self._server.address

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float):
        self._server.stop(grace)
        done = threading.Event()  # as grpc.Server.stop returns: an event, set once stopped
        done.set()
        return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.floor", description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--port-file", default=None)
    p.add_argument("--threads", type=int, default=64, help="thread pool size (a stock ThreadPoolExecutor, as reference servers run it)")
    p.add_argument("--http", action="store_true", help="the HTTP floor instead of the gRPC one")
    args = p.parse_args(argv)
    if args.http:
        echo = HttpEcho(args.address)
        return serve_until_signal(echo, echo.address, args.port_file)
    server, address = create_server(args.address, args.threads)
    return serve_until_signal(server, address, args.port_file)


def serve_until_signal(server: grpc.Server, address: str, port_file: str | None) -> int:
    """Start `server`, publish `address` to `port_file` atomically, serve until SIGTERM/SIGINT."""
    server.start()
    if port_file:
        tmp = f"{port_file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(address + "\n")
        os.replace(tmp, port_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(1).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
