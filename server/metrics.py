"""Prometheus metrics, modelled on Triton's names, read from the serving counters at scrape time.

Nothing here runs per request: the servicers and the batcher update `server.stats`
counters (a few integer additions), and `render` turns them into Prometheus text when
`--metrics-address` is scraped. With `--workers N` the parent serves the sum
of its workers' counters (see `server.workers`).

| metric | type | labels | Triton's counterpart |
|---|---|---|---|
| mnist_edge_requests_total | counter | api, code | (per-API request counts) |
| mnist_edge_inference_request_success_total | counter | model, version | nv_inference_request_success |
| mnist_edge_inference_request_failure_total | counter | model, version | nv_inference_request_failure |
| mnist_edge_inference_count_total | counter | model, version | nv_inference_count (images) |
| mnist_edge_inference_exec_count_total | counter | model, version | nv_inference_exec_count (batches) |
| mnist_edge_inference_request_duration_us_total | counter | model, version | nv_inference_request_duration_us |
| mnist_edge_inference_queue_duration_us_total | counter | model, version | nv_inference_queue_duration_us |
| mnist_edge_inference_compute_input_duration_us_total | counter | model, version | nv_inference_compute_input_duration_us |
| mnist_edge_inference_compute_infer_duration_us_total | counter | model, version | nv_inference_compute_infer_duration_us |
| mnist_edge_inference_compute_output_duration_us_total | counter | model, version | nv_inference_compute_output_duration_us |
| mnist_edge_request_duration_seconds | histogram | model | (request latency) |
| mnist_edge_queue_duration_seconds | histogram | model | (time in the batcher's queue) |
| mnist_edge_compute_duration_seconds | histogram | model | (one batch's model run) |
| mnist_edge_batch_size | histogram | model | (images per executed batch) |
| mnist_edge_queue_depth | gauge | model | images waiting in the queue |
| mnist_edge_model_info | gauge (1) | model, version, precision, sha256 | |
| mnist_edge_model_version | gauge | model | the version number served |
| mnist_edge_up | gauge | | 1 while SERVING |
| mnist_edge_captures_total | counter | result (kept, dropped, error) | (field capture, --capture-dir only) |
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from mnist_edge.server.stats import Statistics

# A snapshot is a plain dict, so worker processes can send theirs to the parent and be summed.
Snapshot = dict[str, Any]


# The per-version counters: a replaced version in its grace period (--previous-version-grace-s)
# reports its own under its own `version` label.
VERSION_COUNTERS = ("success", "fail", "inference_count", "execution_count", "request_ns", "queue_ns", "input_ns", "infer_ns", "output_ns")


def snapshot(stats: Statistics, model: Any, ready: bool, queue_depth: int, previous: Any = None) -> Snapshot:
    """`previous`: core.Previous (the replaced version still answering pinned calls) or None."""
    snap = _snapshot(stats, model, ready, queue_depth)
    if previous is not None:
        old = _snapshot(previous.stats, previous.model, ready, 0)
        snap["previous"] = {"version": old["version"], "precision": old["precision"], "sha256": old["sha256"],
                            **{k: old[k] for k in VERSION_COUNTERS}}
    return snap


def _snapshot(stats: Statistics, model: Any, ready: bool, queue_depth: int) -> Snapshot:
    with stats.locked():
        return {
            "model": getattr(model, "name", "mnist"),
            "version": getattr(model, "version", ""),
            "precision": getattr(model, "precision", ""),
            "sha256": getattr(model, "sha256", ""),
            "ready": 1 if ready else 0,
            "queue_depth": queue_depth,
            "requests_by": {f"{api}|{code}": n for (api, code), n in stats.requests_by.items()},
            "success": stats.success.count,
            "fail": stats.fail.count,
            "inference_count": stats.inference_count,
            "execution_count": stats.execution_count,
            "request_ns": stats.success.ns + stats.fail.ns,
            "queue_ns": stats.queue.ns,
            "input_ns": stats.compute_input.ns,
            "infer_ns": stats.compute_infer.ns,
            "output_ns": stats.compute_output.ns,
            "hist": {
                name: {"buckets": list(h.buckets), "counts": list(h.counts), "sum": h.total}
                for name, h in (("request", stats.request_hist), ("queue", stats.queue_hist), ("compute", stats.compute_hist), ("batch", stats.batch_hist))
            },
        }


def merge(snaps: list[Snapshot]) -> Snapshot:
    """Sum worker snapshots (counters and histograms add; the model identity must agree)."""
    if not snaps:
        return {}
    out = {k: v for k, v in snaps[0].items()}
    out["requests_by"] = dict(snaps[0]["requests_by"])
    out["hist"] = {k: {"buckets": v["buckets"], "counts": list(v["counts"]), "sum": v["sum"]} for k, v in snaps[0]["hist"].items()}
    for s in snaps[1:]:
        for key in ("success", "fail", "inference_count", "execution_count", "request_ns", "queue_ns", "input_ns", "infer_ns", "output_ns", "queue_depth"):
            out[key] += s[key]
        if "lane_active" in s:
            out["lane_active"] = out.get("lane_active", 0) + s["lane_active"]
        if "captures" in s:
            mine = out.setdefault("captures", {})
            out["captures"] = {k: mine.get(k, 0) + n for k, n in s["captures"].items()}
        out["ready"] = min(out["ready"], s["ready"])
        for k, n in s["requests_by"].items():
            out["requests_by"][k] = out["requests_by"].get(k, 0) + n
        for name, h in s["hist"].items():
            mine = out["hist"][name]
            mine["counts"] = [a + b for a, b in zip(mine["counts"], h["counts"])]
            mine["sum"] += h["sum"]
        if s["version"] != out["version"]:
            out["version"] = f"{out['version']},{s['version']}"  # mid-reload; visible, not hidden
        mine, theirs = out.get("previous"), s.get("previous")
        if mine and theirs and mine["version"] == theirs["version"]:
            out["previous"] = {**mine, **{k: mine[k] + theirs[k] for k in VERSION_COUNTERS}}
    return out


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _number(x: float) -> str:
    f = float(x)
    if f == float("inf"):
        return "+Inf"
    return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)


def render(s: Snapshot) -> str:
    """The Prometheus text exposition format (version 0.0.4), written directly.

    A hand-written renderer instead of prometheus_client: on a device it saves the
    library's ~4.6 MB of resident memory and ~60 ms of start-up (measured, docs/performance.md "Footprint"),
    and the format is a few lines of text. The tests parse it with prometheus_client's
    own parser.
    """
    if not s:
        return ""
    out: list[str] = []
    labels = {"model": s["model"], "version": s["version"]}

    def family(name: str, kind: str, doc: str, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, lab, value in samples:
            out.append(f"{name}{suffix}{_labels(lab)} {_number(value)}")

    family("mnist_edge_requests_total", "counter", "Requests by API and gRPC status code",
           [("", {"api": k.split("|", 1)[0], "code": k.split("|", 1)[1]}, n) for k, n in sorted(s["requests_by"].items())])
    counters = (
        ("mnist_edge_inference_request_success_total", "Successful inference requests", "success", 1),
        ("mnist_edge_inference_request_failure_total", "Failed inference requests", "fail", 1),
        ("mnist_edge_inference_count_total", "Images inferred", "inference_count", 1),
        ("mnist_edge_inference_exec_count_total", "Batches executed", "execution_count", 1),
        ("mnist_edge_inference_request_duration_us_total", "Cumulative request duration, microseconds", "request_ns", 1e3),
        ("mnist_edge_inference_queue_duration_us_total", "Cumulative time requests waited in the queue, microseconds", "queue_ns", 1e3),
        ("mnist_edge_inference_compute_input_duration_us_total", "Cumulative request decoding time, microseconds", "input_ns", 1e3),
        ("mnist_edge_inference_compute_infer_duration_us_total", "Cumulative model time per request, microseconds", "infer_ns", 1e3),
        ("mnist_edge_inference_compute_output_duration_us_total", "Cumulative response encoding time, microseconds", "output_ns", 1e3),
    )
    previous = s.get("previous")
    for name, doc, key, scale in counters:
        samples = [("", labels, s[key] / scale)]
        if previous:
            samples.append(("", {"model": s["model"], "version": previous["version"]}, previous[key] / scale))
        family(name, "counter", doc, samples)
    if "lane_active" in s:
        family("mnist_edge_inference_lane_active", "gauge",
               "Processes serving ModelInfer and Classify on the inference lane (0: on the handler threads, by --no-infer-lane or after a failed lane self-check)",
               [("", {}, s["lane_active"])])
    for key, name, doc in (
        ("request", "mnist_edge_request_duration_seconds", "Request duration (inference requests for the model)"),
        ("queue", "mnist_edge_queue_duration_seconds", "Time a request waited in the batcher's queue"),
        ("compute", "mnist_edge_compute_duration_seconds", "Time one batch spent in the model"),
        ("batch", "mnist_edge_batch_size", "Images per executed batch"),
    ):
        h = s["hist"][key]
        cumulative, samples = 0, []
        for bound, count in zip(list(h["buckets"]) + [float("inf")], h["counts"]):
            cumulative += count
            samples.append(("_bucket", {"model": s["model"], "le": "+Inf" if bound == float("inf") else repr(float(bound))}, cumulative))
        samples.append(("_sum", {"model": s["model"]}, float(h["sum"])))
        samples.append(("_count", {"model": s["model"]}, cumulative))
        family(name, "histogram", doc, samples)
    family("mnist_edge_queue_depth", "gauge", "Images waiting in the batcher's queue", [("", {"model": s["model"]}, s["queue_depth"])])
    family("mnist_edge_model_info", "gauge", "The model being served (and one replaced by a reload, in its grace period)",
           [("", {"model": s["model"], "version": m["version"], "precision": m["precision"], "sha256": m["sha256"]}, 1)
            for m in (s, previous) if m])
    try:
        version = [("", {"model": s["model"]}, float(s["version"]))]
    except ValueError:
        version = []
    family("mnist_edge_model_version", "gauge", "Version number of the model being served", version)
    family("mnist_edge_up", "gauge", "1 while the server is SERVING", [("", {}, s["ready"])])
    if "captures" in s:
        family("mnist_edge_captures_total", "counter", "Field captures: kept (written), dropped (queue full), error (write failed)",
               [("", {"result": k}, s["captures"].get(k, 0)) for k in ("kept", "dropped", "error")])
    return "\n".join(out) + "\n"


class MetricsServer:
    """GET /metrics over plain HTTP/1.x: one daemon thread, many connections at once (selectors).

    Deliberately not http.server: that module and what it imports (email, html, mimetypes,
    socketserver) cost ~1.8 MB of resident memory per worker, a tenth of the footprint budget,
    for a page a scraper fetches every few seconds; and it serves one connection at a time.

    No client can hold the endpoint (docs/limits.md): every connection has `timeout_s` in all
    to send its request and take the answer (a deadline for the whole exchange, not per byte,
    so a client dripping a byte a second is closed when it runs out), a request head larger
    than MAX_REQUEST_BYTES is refused, and at most `max_connections` are open: a new
    connection beyond that closes the oldest open one (an idle or slow client; a scrape
    takes milliseconds), so new scrapes are never refused.
    """

    MAX_REQUEST_BYTES = 8192

    def __init__(self, address: str, source: Callable[[], Snapshot], timeout_s: float = 2.0, max_connections: int = 32) -> None:
        host, port = address.rsplit(":", 1)
        self._sock = socket.create_server((host.strip("[]"), int(port)), family=socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, backlog=128)
        self._sock.setblocking(False)
        self._source = source
        self._timeout_s = timeout_s
        self._max_connections = max(1, max_connections)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._conns: dict[socket.socket, _Connection] = {}  # insertion order: oldest first
        self._stop = threading.Event()
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self.evicted = 0  # connections closed to make room for a new one
        self.expired = 0  # connections closed at their deadline
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._selector.select(0.25)  # also how often the loop checks for shutdown
            except OSError:
                return  # closed by shutdown()
            for key, mask in events:
                if key.data is None:
                    self._accept()
                elif mask & selectors.EVENT_READ:
                    self._read(key.data)
                else:
                    self._write(key.data)
            now = time.monotonic()
            for conn in [c for c in self._conns.values() if c.deadline <= now]:
                self.expired += 1
                self._close(conn)

    def _accept(self) -> None:
        for _ in range(64):  # everything waiting in the backlog, in bounded steps
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            while len(self._conns) >= self._max_connections:
                self.evicted += 1
                self._close(next(iter(self._conns.values())))
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + self._timeout_s)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Connection) -> None:
        try:
            chunk = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)  # the client went away before asking for anything
            return
        conn.data += chunk
        if b"\r\n\r\n" in conn.data or b"\n\n" in conn.data:
            self._respond(conn, conn.data)
        elif len(conn.data) > self.MAX_REQUEST_BYTES:
            self._respond(conn, b"")

    def _respond(self, conn: _Connection, request: bytes) -> None:
        conn.out = answer(request, self._source)
        self._selector.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        self._conns.pop(conn.sock, None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._selector.close()
        self._sock.close()


class _Connection:
    __slots__ = ("data", "deadline", "out", "sock")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline  # time.monotonic(): the whole exchange ends by then
        self.data = b""
        self.out = b""


def answer(request: bytes, source: Callable[[], Snapshot]) -> bytes:
    """The whole HTTP response (head and body) to one request head."""
    parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split()
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        status, body, ctype = "400 Bad Request", b"expected an HTTP/1.x request line\n", "text/plain; charset=utf-8"
    elif parts[0] not in (b"GET", b"HEAD"):
        status, body, ctype = "405 Method Not Allowed", b"only GET /metrics is served here\n", "text/plain; charset=utf-8"
    elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
        status, body, ctype = "404 Not Found", b"only /metrics is served here\n", "text/plain; charset=utf-8"
    else:
        status, body, ctype = "200 OK", render(source()).encode(), "text/plain; version=0.0.4; charset=utf-8"
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    return head if parts and parts[0] == b"HEAD" else head + body


def start_http(address: str, source: Callable[[], Snapshot]) -> tuple[MetricsServer, str]:
    """Serve GET /metrics on HOST:PORT (port 0: any free port); returns (server, bound address)."""
    server = MetricsServer(address, source)
    return server, server.address
