"""The HTTP/1.1 transport behind `--http-address`: sockets, parsing, limits; no routes.

Parsing is httptools (llhttp, the parser uvicorn uses); this module only moves bytes and
enforces the limits a small device needs so that no client can hold the port:

- one thread per connection, so a request runs the model on the thread that read it
  (no hand-off, as on the gRPC inference lane); keep-alive and pipelining;
- TCP_NODELAY on every connection;
- a whole-request read deadline (`read_timeout_s`, from a request's first byte to its
  last): a slow sender gets 408 and is closed; an idle keep-alive connection is closed
  after `idle_timeout_s`;
- at most `max_connections` open: a new connection evicts the connection idle longest;
  when none is idle the newcomer gets 503 with Retry-After;
- bodies over `max_body_bytes` get 413 before they are read (after decompression too:
  gzip and deflate request bodies are inflated with the same cap); any other
  Content-Encoding is 415;
- TLS with the gRPC port's certificate flags (handshake on the connection's thread, under
  the read deadline).

The application is one function, `handler(Request) -> Response`; this module imports
nothing of the server, so the stack is loaded only when `--http-address` is set.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

log = logging.getLogger("mnist_edge.server.http")

RECV_BYTES = 65536
MAX_HEADER_BYTES = 64 * 1024
REASONS = {
    100: "Continue", 200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large", 415: "Unsupported Media Type",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 504: "Gateway Timeout",
}


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes
    received_ns: int  # time.perf_counter_ns() when its first byte arrived


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    close: bool = False  # close the connection after this response


def json_error(status: int, message: str, headers: list[tuple[str, str]] | None = None, close: bool = False) -> Response:
    """`{"error": "..."}` with at most 300 characters of message."""
    if len(message) > 300:
        message = message[:297] + "..."
    return Response(status, json.dumps({"error": message}).encode(), [("Content-Type", "application/json"), *(headers or [])], close)


class _Refused(Exception):
    """A request the transport answers itself (and then closes the connection)."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class _Messages:
    """httptools callbacks: collects complete requests (several when a client pipelines)."""

    def __init__(self, parser_ref: list, max_body: int) -> None:
        self._parser_ref = parser_ref
        self.max_body = max_body
        self.done: collections.deque[tuple[Request, bool]] = collections.deque()
        self.headers_done = False
        self.expect_continue = False
        self.started = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.header_bytes = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.size = 0
        self.method = ""
        self.keep_alive = True
        self.first_ns = 0

    def on_message_begin(self) -> None:
        self.started = True
        self.headers_done = False
        self.expect_continue = False
        self.first_ns = self.first_ns or time.perf_counter_ns()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_HEADER_BYTES:
            raise _Refused(json_error(431, f"the request target is over {MAX_HEADER_BYTES} bytes", close=True))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if self.header_bytes > MAX_HEADER_BYTES:
            raise _Refused(json_error(431, f"the request's headers are over {MAX_HEADER_BYTES} bytes", close=True))
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        parser = self._parser_ref[0]
        self.method = parser.get_method().decode("ascii", "replace")
        self.keep_alive = parser.should_keep_alive()
        self.headers_done = True
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise _Refused(json_error(413, f"the request body is {length} bytes, over the limit of {self.max_body} bytes (--max-message-bytes)", close=True))
        self.expect_continue = self.headers.get("expect", "").lower() == "100-continue"

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_body:
            raise _Refused(json_error(413, f"the request body is over the limit of {self.max_body} bytes (--max-message-bytes)", close=True))
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        path, _, query = self.url.decode("latin-1").partition("?")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.done.append((Request(self.method, path, query, self.headers, body, self.first_ns), self.keep_alive))
        self.started = False
        self.headers_done = False
        self._reset()


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate request body, inflated to at most `limit` bytes."""
    if encoding == "gzip":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == "deflate":
        # RFC 9110's deflate is the zlib format; some clients send raw deflate.
        d = zlib.decompressobj(zlib.MAX_WBITS if body[:1] and (body[0] & 0x0F) == 8 else -zlib.MAX_WBITS)
    else:
        raise _Refused(json_error(415, f"Content-Encoding {encoding!r} not supported, expected gzip, deflate or identity", close=False))
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise _Refused(json_error(400, f"the {encoding} request body could not be inflated: {exc}")) from None
    if len(out) > limit or d.unconsumed_tail:
        raise _Refused(json_error(413, f"the inflated request body is over the limit of {limit} bytes (--max-message-bytes)", close=True))
    return out


class _Connection:
    __slots__ = ("closed", "idle_since", "peer", "sock")

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock = sock
        self.peer = peer
        self.idle_since: float | None = time.monotonic()  # None while a request is being read or answered
        self.closed = False

    def close(self) -> None:
        """Wake the connection's thread (its recv returns) and let it close the socket."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HttpServer:
    def __init__(
        self,
        address: str,
        handler: Callable[[Request], Response],
        *,
        max_connections: int = 256,
        read_timeout_s: float = 30.0,
        idle_timeout_s: float = 60.0,
        max_body_bytes: int = 16 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        reuseport: bool = False,
        closing: Callable[[], bool] = lambda: False,
    ) -> None:
        self.handler = handler
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_body_bytes = max_body_bytes
        self.ssl_context = ssl_context
        # True while the server drains or stops: answers carry `Connection: close`, so keep-alive
        # clients reconnect (to another replica) instead of staying on this one.
        self.closing = closing
        host, port = address.rsplit(":", 1)
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self._sock.bind((bare, int(port)))
        except OSError:
            self._sock.close()
            raise
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._stopping = False
        self._idle_done = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # -- accepting -----------------------------------------------------------------
    def start(self) -> None:
        self._sock.listen(1024)
        self._thread = threading.Thread(target=self._accept_loop, name="http-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, peer = self._sock.accept()
            except OSError:
                return  # the listening socket was shut down by stop()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, peer)
            with self._lock:
                if self._stopping:
                    sock.close()
                    continue
                if len(self._connections) >= self.max_connections and not self._evict_idle():
                    self._refuse_busy(sock)
                    continue
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="http-conn", daemon=True).start()

    def _evict_idle(self) -> bool:
        """Close the connection idle longest to make room; False when every one is busy."""
        idle = [c for c in self._connections if c.idle_since is not None and not c.closed]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest.close()
        self._connections.discard(oldest)
        return True

    def _refuse_busy(self, sock: socket.socket) -> None:
        if self.ssl_context is None:  # a TLS client could not read a plaintext answer
            r = json_error(503, f"too many connections (--http-max-connections {self.max_connections}), all busy; retry shortly", [("Retry-After", "1")], close=True)
            try:
                sock.setblocking(False)
                sock.send(self._head(r, False) + r.body)
            except OSError:
                pass
        sock.close()

    # -- one connection ------------------------------------------------------------
    def _serve(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            if self.ssl_context is not None:
                sock.settimeout(self.read_timeout_s)
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
                conn.sock = sock
            self._requests(conn, sock)
        except (OSError, ssl.SSLError):
            pass  # the peer went away, a TLS handshake failed, or stop() closed us
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._idle_done.notify_all()
            try:
                sock.close()
            except OSError:
                pass

    def _requests(self, conn: _Connection, sock: socket.socket) -> None:
        parser_ref: list = []
        messages = _Messages(parser_ref, self.max_body_bytes)
        parser = httptools.HttpRequestParser(messages)
        parser_ref.append(parser)
        deadline = 0.0
        continued = False
        while True:
            if not messages.started:
                conn.idle_since = time.monotonic()
                sock.settimeout(self.idle_timeout_s)
                deadline = 0.0
                continued = False
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._send(sock, json_error(408, f"the request was not received within {self.read_timeout_s:g}s (--http-read-timeout-s)", close=True), False)
                    return
                sock.settimeout(remaining)
            try:
                data = sock.recv(RECV_BYTES)
            except TimeoutError:
                if messages.started:
                    self._send(sock, json_error(408, f"the request was not received within {self.read_timeout_s:g}s (--http-read-timeout-s)", close=True), False)
                return  # an idle keep-alive connection timed out
            if not data or conn.closed:
                return
            if conn.idle_since is not None:
                conn.idle_since = None
                deadline = time.monotonic() + self.read_timeout_s
                messages.first_ns = time.perf_counter_ns()
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as exc:
                refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
                self._send(sock, refused.response if refused else json_error(400, "malformed HTTP request", close=True), False)
                return
            except _Refused as exc:
                self._send(sock, exc.response, False)
                return
            except httptools.HttpParserUpgrade:
                self._send(sock, json_error(400, "protocol upgrades are not supported: this port speaks HTTP/1.1", close=True), False)
                return
            except httptools.HttpParserError as exc:
                self._send(sock, json_error(400, f"malformed HTTP request: {exc}", close=True), False)
                return
            if messages.started and not messages.done and messages.headers_done and messages.expect_continue and not continued:
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                continued = True
            while messages.done:
                request, keep_alive = messages.done.popleft()
                response = self._answer(request)
                close = response.close or not keep_alive or self._stopping or self.closing() or conn.closed
                self._send(sock, response, not close, request.method == "HEAD")
                if close:
                    return
            if not messages.started:
                conn.idle_since = time.monotonic()

    def _answer(self, request: Request) -> Response:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        try:
            if encoding not in ("", "identity"):
                request.body = _inflate(request.body, encoding, self.max_body_bytes)
            return self.handler(request)
        except _Refused as exc:
            return exc.response
        except Exception:  # a bug answers 500 and the connection goes on
            log.exception("unexpected error answering %s %s", request.method, request.path)
            return json_error(500, f"internal error answering {request.method} {request.path}; the server logged the traceback")

    @staticmethod
    def _head(response: Response, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Status')}", f"Content-Length: {len(response.body)}"]
        lines += [f"{k}: {v}" for k, v in response.headers]
        if not keep_alive:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, sock: socket.socket, response: Response, keep_alive: bool, head_only: bool = False) -> None:
        head = self._head(response, keep_alive)
        sock.sendall(head if head_only else head + response.body)

    # -- stopping ------------------------------------------------------------------
    def stop(self, grace_s: float) -> None:
        """Stop accepting, close idle connections now, let requests being answered finish
        (up to `grace_s`), then close whatever is left."""
        with self._lock:
            self._stopping = True
            for c in list(self._connections):
                if c.idle_since is not None:
                    c.close()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        end = time.monotonic() + grace_s
        with self._lock:
            while self._connections and time.monotonic() < end:
                for c in list(self._connections):
                    if c.idle_since is not None:
                        c.close()  # became idle after answering
                self._idle_done.wait(min(0.05, max(0.0, end - time.monotonic())))
            for c in list(self._connections):
                c.close()
        if self._thread is not None:
            self._thread.join(2)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)


def server_ssl_context(cert: str, key: str, client_ca: str | None) -> ssl.SSLContext:
    """TLS from the same files as the gRPC port (--tls-cert, --tls-key, --tls-client-ca)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
