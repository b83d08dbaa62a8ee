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

import socket
import threading
from typing import Any, Callable, Iterable

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
    """GET /metrics over plain HTTP/1.x on one daemon thread, one short connection at a time.

    Deliberately not http.server: that module and what it imports (email, html, mimetypes,
    socketserver) cost ~1.8 MB of resident memory per worker, a tenth of the footprint budget,
    for a page a scraper fetches every few seconds. Each connection gets `timeout_s` to send
    its request line and headers; the answer is written and the connection closed.
    """

    def __init__(self, address: str, source: Callable[[], Snapshot], timeout_s: float = 2.0) -> None:
        host, port = address.rsplit(":", 1)
        self._sock = socket.create_server((host.strip("[]"), int(port)), family=socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET)
        self._sock.settimeout(0.5)  # how often the loop checks for shutdown
        self._source = source
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self.address = f"{host}:{self._sock.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed by shutdown()
            with conn:
                try:
                    self._answer(conn)
                except OSError:
                    pass  # the scraper went away

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(self._timeout_s)
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data and len(data) < 8192:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        parts = data.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            status, body, ctype = "400 Bad Request", b"expected an HTTP/1.x request line\n", "text/plain; charset=utf-8"
        elif parts[0] not in (b"GET", b"HEAD"):
            status, body, ctype = "405 Method Not Allowed", b"only GET /metrics is served here\n", "text/plain; charset=utf-8"
        elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            status, body, ctype = "404 Not Found", b"only /metrics is served here\n", "text/plain; charset=utf-8"
        else:
            status, body, ctype = "200 OK", render(self._source()).encode(), "text/plain; version=0.0.4; charset=utf-8"
        head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        conn.sendall(head if parts and parts[0] == b"HEAD" else head + body)

    def shutdown(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(2)


def start_http(address: str, source: Callable[[], Snapshot]) -> tuple[MetricsServer, str]:
    """Serve GET /metrics on HOST:PORT (port 0: any free port); returns (server, bound address)."""
    server = MetricsServer(address, source)
    return server, server.address
