"""Prometheus metrics, modelled on Triton's names, read from the serving counters at scrape time.

Nothing here runs per request: the servicers and the batcher update `server.stats`
counters (a few integer additions), and this collector turns them into metrics when
Prometheus scrapes `--metrics-address`. With `--workers N` the parent serves the sum
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
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from server.stats import Statistics

# A snapshot is a plain dict, so worker processes can send theirs to the parent and be summed.
Snapshot = dict[str, Any]


def snapshot(stats: Statistics, model: Any, ready: bool, queue_depth: int) -> Snapshot:
    with stats.lock:
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
        out["ready"] = min(out["ready"], s["ready"])
        for k, n in s["requests_by"].items():
            out["requests_by"][k] = out["requests_by"].get(k, 0) + n
        for name, h in s["hist"].items():
            mine = out["hist"][name]
            mine["counts"] = [a + b for a, b in zip(mine["counts"], h["counts"])]
            mine["sum"] += h["sum"]
        if s["version"] != out["version"]:
            out["version"] = f"{out['version']},{s['version']}"  # mid-reload; visible, not hidden
    return out


class ServingCollector(Collector):
    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self.source = source

    def collect(self) -> Iterable:
        s = self.source()
        if not s:
            return
        labels = {"model": s["model"], "version": s["version"]}

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=list(labels))
            c.add_metric(list(labels.values()), value)
            return c

        by = CounterMetricFamily("mnist_edge_requests", "Requests by API and gRPC status code", labels=["api", "code"])
        for key, n in sorted(s["requests_by"].items()):
            api, code = key.split("|", 1)
            by.add_metric([api, code], n)
        yield by
        yield counter("mnist_edge_inference_request_success", "Successful inference requests", s["success"])
        yield counter("mnist_edge_inference_request_failure", "Failed inference requests", s["fail"])
        yield counter("mnist_edge_inference_count", "Images inferred", s["inference_count"])
        yield counter("mnist_edge_inference_exec_count", "Batches executed", s["execution_count"])
        yield counter("mnist_edge_inference_request_duration_us", "Cumulative request duration, microseconds", s["request_ns"] / 1e3)
        yield counter("mnist_edge_inference_queue_duration_us", "Cumulative time requests waited in the queue, microseconds", s["queue_ns"] / 1e3)
        yield counter("mnist_edge_inference_compute_input_duration_us", "Cumulative request decoding time, microseconds", s["input_ns"] / 1e3)
        yield counter("mnist_edge_inference_compute_infer_duration_us", "Cumulative model time per request, microseconds", s["infer_ns"] / 1e3)
        yield counter("mnist_edge_inference_compute_output_duration_us", "Cumulative response encoding time, microseconds", s["output_ns"] / 1e3)
        for name, metric, doc in (
            ("request", "mnist_edge_request_duration_seconds", "Request duration (inference requests for the model)"),
            ("queue", "mnist_edge_queue_duration_seconds", "Time a request waited in the batcher's queue"),
            ("compute", "mnist_edge_compute_duration_seconds", "Time one batch spent in the model"),
            ("batch", "mnist_edge_batch_size", "Images per executed batch"),
        ):
            h = s["hist"][name]
            cumulative, buckets = 0, []
            for bound, count in zip(list(h["buckets"]) + [float("inf")], h["counts"]):
                cumulative += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
            fam = HistogramMetricFamily(metric, doc, labels=["model"])
            fam.add_metric([s["model"]], buckets, sum_value=h["sum"])
            yield fam
        g = GaugeMetricFamily("mnist_edge_queue_depth", "Images waiting in the batcher's queue", labels=["model"])
        g.add_metric([s["model"]], s["queue_depth"])
        yield g
        info = GaugeMetricFamily("mnist_edge_model_info", "The model being served", labels=["model", "version", "precision", "sha256"])
        info.add_metric([s["model"], s["version"], s["precision"], s["sha256"]], 1)
        yield info
        ver = GaugeMetricFamily("mnist_edge_model_version", "Version number of the model being served", labels=["model"])
        try:
            ver.add_metric([s["model"]], float(s["version"]))
        except ValueError:
            pass
        yield ver
        up = GaugeMetricFamily("mnist_edge_up", "1 while the server is SERVING")
        up.add_metric([], s["ready"])
        yield up


def start_http(address: str, source: Callable[[], Snapshot]):
    """Serve /metrics on HOST:PORT (port 0: any free port); returns (httpd, bound address)."""
    from prometheus_client import start_http_server

    host, port = address.rsplit(":", 1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServingCollector(source))
    httpd, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    return httpd, f"{host}:{httpd.server_port}"
