"""The benchmark: mnist-edge against its floors, measured in the same run.

Floors (docs/design.md "Where performance is measured"):
- transport floor: bench.floor, a sync grpc.server echoing the same request bytes;
- HTTP floor (for the REST rows): bench.floor --http, the REST port's own transport
  echoing the same request bytes;
- compute floor: a bare onnxruntime `session.run` in-process.

Servers run pinned to CPU 0, the load generator to CPU 1. Floor and server are
interleaved `rounds` times and every figure is judged by its median ratio to the floor
over the rounds (this machine's run-to-run noise is 15-30%). mnist-edge runs with its
default settings unless `--server-arg` says otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnist_edge.bench import floor as floor_mod
from mnist_edge.bench import httpload, loadgen
from mnist_edge.bench import perf_analyzer as pa_mod

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY = "/digits.v1.DigitClassifier/Classify"
CLASSIFY_STREAM = "/digits.v1.DigitClassifier/ClassifyStream"
SERVER_CPU = 0
LOADGEN_CPU = 1


@dataclass
class BenchConfig:
    rounds: int = 5
    seconds: float = 2.0
    max_requests: int = 40000
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    payloads: tuple[int, ...] = (1, 64, 1024)
    stream: bool = True
    cold_starts: int = 5
    server_args: tuple[str, ...] = ()
    out_dir: Path = Path("reports/bench")
    perf_analyzer: str | None = None
    minimal: bool = True  # also measure bench.minimal (parse + session.run, nothing else) at the 1-image points
    unix: bool = True  # also measure mnist-edge on a unix: socket at the 1-image points (on-device clients)
    rest: bool = True  # also measure REST (--http-address), JSON and binary, 1 image, at the lowest and highest concurrency


def _process_cpu_clock(pid: int) -> int | None:
    """clock_getcpuclockid(3) for another process (Python's time module has it only for threads)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        clock = ctypes.c_int()
        if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
            return None
        time.clock_gettime(clock.value)  # readable here (some kernels refuse other processes' clocks)
        return clock.value
    except (OSError, AttributeError):
        return None


@dataclass
class Proc:
    popen: subprocess.Popen
    address: str

    def cpu_seconds(self) -> float:
        """The server process's CPU time, its exited threads included. The process CPU clock
        counts nanoseconds; /proc/PID/stat (the fallback) counts clock ticks of 10 ms, which
        a short run (a few ms of server CPU, as in the smoke test) rounds to nothing."""
        clock = _process_cpu_clock(self.popen.pid)
        if clock is not None:
            return time.clock_gettime(clock)
        with open(f"/proc/{self.popen.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.popen.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                return self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def start(cmd: list[str], port_file: Path, cpu: int = SERVER_CPU, timeout: float = 60, cwd: Path | None = None) -> Proc:
    port_file.unlink(missing_ok=True)
    # stderr goes to a file, never an unread pipe: a full pipe would block the server's logging.
    log_path = port_file.with_suffix(".log")
    with open(log_path, "w") as log:
        p = loadgen.spawn_pinned(cmd + ["--port-file", str(port_file)], cpu, stdout=subprocess.DEVNULL, stderr=log, text=True, cwd=cwd)
    end = time.monotonic() + timeout
    while not port_file.exists():
        if p.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}: {log_path.read_text()[-2000:]}")
        if time.monotonic() > end:
            p.kill()
            raise RuntimeError(f"{' '.join(cmd)} did not open its port within {timeout}s")
        time.sleep(0.005)
    return Proc(p, port_file.read_text().strip())


def wait_serving(address: str, timeout: float = 60.0, interval: float = 0.002) -> float:
    """Poll health tightly until SERVING; return the seconds it took."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    t0 = time.perf_counter()
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.perf_counter() - t0 < timeout:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - t0
            except grpc.RpcError:
                pass
            time.sleep(interval)
    raise RuntimeError(f"{address} not SERVING within {timeout}s")


def server_cmd(cfg: BenchConfig, address: str = "127.0.0.1:0") -> list[str]:
    # Metrics stay on (the default) on a free port, so a server already running here cannot collide.
    return [sys.executable, "-m", "mnist_edge", "serve", "--address", address, "--metrics-address", "127.0.0.1:0",
            "--log-level", "warning", *cfg.server_args]


def floor_cmd() -> list[str]:
    return [sys.executable, "-m", "mnist_edge.bench.floor", "--address", "127.0.0.1:0"]


def http_floor_cmd() -> list[str]:
    return [sys.executable, "-m", "mnist_edge.bench.floor", "--http", "--address", "127.0.0.1:0"]


def free_port() -> int:
    """A port free right now (the REST server's HTTP port: its port file names the gRPC one)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rest_payloads(images: np.ndarray) -> dict[str, bytes]:
    """Whole HTTP requests for REST inference: JSON, and Triton's binary tensor data extension."""
    n = len(images)
    path = "/v2/models/mnist/infer"
    pixels = np.ascontiguousarray(images, dtype=np.uint8)
    as_json = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [n, 28, 28], "data": pixels.reshape(-1).tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [n, 28, 28], "parameters": {"binary_data_size": pixels.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return {
        "json": httpload.request_bytes(path, as_json, {"Content-Type": "application/json"}),
        "binary": httpload.request_bytes(path, head + pixels.tobytes(), {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}),
    }


def minimal_cmd() -> list[str]:
    return [sys.executable, "-m", "mnist_edge.bench.minimal", "--address", "127.0.0.1:0"]


def infer_payload(images: np.ndarray) -> bytes:
    from mnist_edge.protos.inference import grpc_service_pb2 as pb

    return pb.ModelInferRequest(
        model_name="mnist",
        inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
        raw_input_contents=[np.ascontiguousarray(images, dtype=np.uint8).tobytes()],
    ).SerializeToString()


def stream_payload(image: np.ndarray) -> bytes:
    return classify_payload(image[None])


def classify_payload(images: np.ndarray) -> bytes:
    """A native ClassifyRequest carrying `images` (uint8 [N,28,28]) as raw pixels."""
    from mnist_edge.protos.digits.v1 import digits_pb2 as pb

    return pb.ClassifyRequest(images=[pb.Image(pixels=np.ascontiguousarray(im, dtype=np.uint8).tobytes()) for im in images]).SerializeToString()


def batch_counters(address: str) -> tuple[int, int]:
    import grpc

    from mnist_edge.protos.inference import grpc_service_pb2 as pb
    from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as ch:
        s = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=10).model_stats[0]
    return s.inference_count, s.execution_count


def compute_floor(model_file: Path, images: np.ndarray, runs: int = 30) -> dict[str, float]:
    """Bare session.run in this process, pinned to the servers' CPU for the measurement."""
    from mnist_edge.server.runner import ModelRunner

    old = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if old is not None and SERVER_CPU < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {SERVER_CPU})
    try:
        runner = ModelRunner(model_file.read_bytes())
        out: dict[str, float] = {}
        for n in (1, 64, 1024):
            x = np.ascontiguousarray(images[:n])
            for _ in range(10):
                runner.run(x)
            times = []
            for _ in range(runs if n > 1 else runs * 20):
                t = time.perf_counter()
                runner.run(x)
                times.append(time.perf_counter() - t)
            out[f"batch_{n}_us"] = float(np.median(times) * 1e6)
            out[f"batch_{n}_images_per_s"] = n / float(np.median(times))
        return out
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)


def measure(proc: Proc, method: str, payload: bytes, conc: int, cfg: BenchConfig, stream: bool, images_per_request: int, stats: bool,
            http_address: str | None = None) -> dict[str, Any]:
    """One point: gRPC `method` at proc.address, or (with `http_address`) the whole HTTP request `payload` there."""
    before = batch_counters(proc.address) if stats else None
    cpu0 = proc.cpu_seconds()
    if http_address is not None:
        res = httpload.run(http_address, payload, concurrency=conc, max_requests=cfg.max_requests, max_seconds=cfg.seconds, warmup=20)
    else:
        res = loadgen.run(proc.address, method, payload, concurrency=conc, max_requests=cfg.max_requests, max_seconds=cfg.seconds, stream=stream, warmup=20)
    cpu = proc.cpu_seconds() - cpu0
    row: dict[str, Any] = {
        "requests": res.requests,
        "errors": res.errors,
        "error_codes": res.error_codes,
        "seconds": res.seconds,
        "throughput_rps": res.throughput,
        "images_per_s": res.throughput * images_per_request,
        "p50_us": res.percentile(50),
        "p90_us": res.percentile(90),
        "p99_us": res.percentile(99),
        "server_cpu_us_per_request": 1e6 * cpu / max(res.requests, 1),
        "loadgen_cpu_fraction": res.client_cpu_fraction,
        "loadgen_bound": res.client_cpu_fraction > 0.9,
    }
    if stats and before is not None:
        after = batch_counters(proc.address)
        executions = after[1] - before[1]
        row["mean_batch_size"] = (after[0] - before[0]) / executions if executions else None
    return row


def cold_start(cfg: BenchConfig, tmp: Path) -> dict[str, Any]:
    times = []
    for i in range(cfg.cold_starts):
        t0 = time.perf_counter()
        p = start(server_cmd(cfg), tmp / f"cold{i}.port")
        took = wait_serving(p.address) + 0  # health poll started once the port was open
        times.append(time.perf_counter() - t0)
        p.stop()
        del took
    return {"runs_s": times, "median_s": float(np.median(times))}


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and np.isnan(x))]
    return float(statistics.median(xs)) if xs else None


def median_of(rows: list[dict[str, Any]], key: str) -> float | None:
    """The median over rounds of one measured figure."""
    return _median([row[key] for row in rows])


def median_ratio(rows: list[dict[str, Any]], base: list[dict[str, Any]], key: str) -> float | None:
    """The median of per-round ratios of `rows` to `base` (the same rounds, in order)."""
    return _median([row[key] / b[key] for row, b in zip(rows, base) if b[key]])


def run(cfg: BenchConfig, log=print) -> dict[str, Any]:
    from mnist_edge.server import model_store
    from mnist_edge.training import data as mnist_data

    loadgen.pin_to(LOADGEN_CPU)
    tmp = cfg.out_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    test = mnist_data.load_test(offline=False)
    model = model_store.load(None)
    result: dict[str, Any] = {
        "config": {**cfg.__dict__, "out_dir": str(cfg.out_dir), "server_args": list(cfg.server_args)},
        "machine": {"cpus": os.cpu_count(), "server_cpu": SERVER_CPU, "loadgen_cpu": LOADGEN_CPU},
        "model": {"file": model.file.name, "sha256": model.sha256, "precision": model.precision},
        "server_settings": "defaults" + (f" + {' '.join(cfg.server_args)}" if cfg.server_args else "") + " (metrics and statistics on)",
        "points": {},
    }
    log("compute floor ...")
    result["compute_floor"] = compute_floor(model.file, test.images)

    scenarios: list[tuple[str, int, int, bool]] = []
    for n in cfg.payloads:
        for c in cfg.concurrency:
            scenarios.append((f"unary-{n}", n, c, False))
    if cfg.stream:
        for c in cfg.concurrency:
            scenarios.append(("stream-1", 1, c, True))
    rest_scenarios = [(f"rest-{kind}-1", kind, c) for kind in ("binary", "json") for c in sorted({min(cfg.concurrency), max(cfg.concurrency)})] if cfg.rest else []
    rest_requests = rest_payloads(test.images[:1])

    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {}
    # A short directory for the unix socket: socket paths are limited to ~107 bytes.
    sock_dir = Path(tempfile.mkdtemp(prefix="mnist-edge-bench-"))
    for r in range(cfg.rounds):
        log(f"round {r + 1}/{cfg.rounds}")
        floor = start(floor_cmd(), tmp / "floor.port")
        server = start(server_cmd(cfg), tmp / "server.port")
        minimal = start(minimal_cmd(), tmp / "minimal.port") if cfg.minimal else None
        unix = start(server_cmd(cfg, f"unix:{sock_dir / 'bench.sock'}"), tmp / "unix.port") if cfg.unix else None
        # REST: its own server (HTTP on), so the gRPC rows and their RSS are measured as deployed by default.
        rest_http = f"127.0.0.1:{free_port()}"
        rest = start(server_cmd(cfg) + ["--http-address", rest_http], tmp / "rest.port") if cfg.rest else None
        http_floor = start(http_floor_cmd(), tmp / "httpfloor.port") if cfg.rest else None
        try:
            wait_serving(server.address)
            if unix is not None:
                wait_serving(unix.address)
            if rest is not None:
                wait_serving(rest.address)
            order = [("floor", floor), ("server", server)] if r % 2 == 0 else [("server", server), ("floor", floor)]
            if minimal is not None:
                order.insert(1, ("minimal", minimal))
            if unix is not None:
                order.insert(1, ("unix", unix))
            for name, n, c, stream in scenarios:
                key = f"{name} c={c}"
                for who, proc in order:
                    if who in ("minimal", "unix") and (stream or n != 1):
                        continue
                    if stream:
                        payload = stream_payload(test.images[0])
                        method = floor_mod.STREAM if who == "floor" else CLASSIFY_STREAM
                    else:
                        payload = infer_payload(test.images[:n])
                        method = floor_mod.UNARY if who == "floor" else INFER
                    row = measure(proc, method, payload, c, cfg, stream, n, stats=who in ("server", "unix"))
                    log(f"  {key:<18} {who:<6} p50 {row['p50_us']:8.0f} us  {row['throughput_rps']:8.0f} req/s  errors {row['errors']}")
                    rounds.setdefault(key, {}).setdefault(who, []).append(row)
            for name, kind, c in rest_scenarios:
                key = f"{name} c={c}"
                pair = [("floor", http_floor, http_floor.address), ("server", rest, rest_http)]
                for who, proc, address in (pair if r % 2 == 0 else pair[::-1]):
                    row = measure(proc, "", rest_requests[kind], c, cfg, False, 1, stats=who == "server", http_address=address)
                    log(f"  {key:<18} {who:<6} p50 {row['p50_us']:8.0f} us  {row['throughput_rps']:8.0f} req/s  errors {row['errors']}")
                    rounds.setdefault(key, {}).setdefault(who, []).append(row)
            result.setdefault("peak_rss_mb", {"server": [], "floor": []})
            result["peak_rss_mb"]["server"].append(server.peak_rss_mb())
            result["peak_rss_mb"]["floor"].append(floor.peak_rss_mb())
            if rest is not None:
                result["peak_rss_mb"].setdefault("server_http_on", []).append(rest.peak_rss_mb())
        finally:
            for extra in (rest, http_floor):
                if extra is not None:
                    extra.stop()
            floor.stop()
            server.stop()
            if minimal is not None:
                minimal.stop()
            if unix is not None:
                unix.stop()

    shutil.rmtree(sock_dir, ignore_errors=True)
    for key, by in rounds.items():
        point: dict[str, Any] = {"rounds": by}
        for metric in ("p50_us", "p90_us", "p99_us", "throughput_rps", "images_per_s", "server_cpu_us_per_request", "loadgen_cpu_fraction"):
            point[f"server_{metric}"] = _median([row[metric] for row in by["server"]])
            point[f"floor_{metric}"] = _median([row[metric] for row in by["floor"]])
            ratios = [s[metric] / f[metric] for s, f in zip(by["server"], by["floor"]) if f[metric]]
            point[f"ratio_{metric}"] = _median(ratios)
            for other in ("minimal", "unix"):
                if other in by:
                    point[f"{other}_{metric}"] = _median([row[metric] for row in by[other]])
                    point[f"{other}_ratio_{metric}"] = _median([m[metric] / f[metric] for m, f in zip(by[other], by["floor"]) if f[metric]])
            if "unix" in by:  # the unix socket against loopback TCP, same server, same round
                point[f"unix_vs_tcp_{metric}"] = _median([u[metric] / t[metric] for u, t in zip(by["unix"], by["server"]) if t[metric]])
        point["mean_batch_size"] = _median([row.get("mean_batch_size") for row in by["server"]])
        point["loadgen_bound"] = any(row["loadgen_bound"] for rows in by.values() for row in rows)
        point["errors"] = sum(row["errors"] for rows in by.values() for row in rows)
        result["points"][key] = point

    log("cold start ...")
    result["cold_start"] = cold_start(cfg, tmp)
    result["peak_rss_mb"] = {k: max(v) for k, v in result.get("peak_rss_mb", {}).items()}
    result["_rounds"] = rounds
    result["targets"] = targets(result)
    del result["_rounds"]
    if cfg.perf_analyzer:
        result["perf_analyzer"] = perf_analyzer(cfg, tmp, log)
    return result


def _get(result: dict[str, Any], key: str, field_: str) -> float | None:
    return result["points"].get(key, {}).get(field_)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goals, each as measured vs budget."""
    out = []

    def add(name: str, value: float | None, op: str, budget: float) -> None:
        ok = value is not None and (value <= budget if op == "<=" else value >= budget if op == ">=" else value > budget)
        out.append({"target": name, "value": value, "op": op, "budget": budget, "met": bool(ok)})

    add("unary 1 image c=1: p50 / transport floor p50", _get(result, "unary-1 c=1", "ratio_p50_us"), "<=", 1.15)
    add("unary 1 image c=64: throughput / floor throughput", _get(result, "unary-1 c=64", "ratio_throughput_rps"), ">=", 0.85)
    add("unary 1 image c=64: p99 / floor p99", _get(result, "unary-1 c=64", "ratio_p99_us"), "<=", 1.2)
    add("unary 1 image c=16: mean executed batch size", _get(result, "unary-1 c=16", "mean_batch_size"), ">", 1.0)
    add("unary 1 image c=64: mean executed batch size", _get(result, "unary-1 c=64", "mean_batch_size"), ">", 1.0)
    best_1024 = max((p.get("server_images_per_s") or 0 for k, p in result["points"].items() if k.startswith("unary-1024")), default=None)
    compute = result.get("compute_floor", {}).get("batch_1024_images_per_s")
    add("1024 images per request: images/s / compute floor", (best_1024 / compute) if best_1024 and compute else None, ">=", 0.5)
    s, u = _get(result, "stream-1 c=1", "server_p50_us"), _get(result, "unary-1 c=1", "server_p50_us")
    add("stream c=1 p50 / unary c=1 p50", (s / u) if s and u else None, "<=", 0.8)
    add("cold start to SERVING, s (median of 5)", result.get("cold_start", {}).get("median_s"), "<=", 1.0)
    grpc_rounds = result.get("_rounds", {}).get("unary-1 c=1", {}).get("server")
    for kind, budget in (("binary", 1.2), ("json", 1.5)):
        rest_rounds = result.get("_rounds", {}).get(f"rest-{kind}-1 c=1", {}).get("server")
        if rest_rounds and grpc_rounds:
            add(f"REST {kind} 1 image c=1: p50 / gRPC ModelInfer p50 (same round)", median_ratio(rest_rounds, grpc_rounds, "p50_us"), "<=", budget)
    return out


def perf_analyzer(cfg: BenchConfig, tmp: Path, log) -> dict[str, Any]:
    """Triton's perf_analyzer against mnist-edge (server pinned to CPU 0, perf_analyzer to CPU 1)."""
    server = start(server_cmd(cfg), tmp / "pa.port")
    try:
        wait_serving(server.address)
        out: dict[str, Any] = {}
        binary = Path(cfg.perf_analyzer)
        env = pa_mod.environment(binary)
        for c in cfg.concurrency:
            cmd = pa_mod.command(binary, server.address, c, 2000, stability_percent=25)
            log(f"perf_analyzer c={c}")
            proc = loadgen.spawn_pinned(cmd, LOADGEN_CPU, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            try:
                stdout, stderr = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
            out[f"c={c}"] = {"returncode": proc.returncode, "summary": _pa_summary(stdout), "stderr": stderr[-500:]}
        return out
    finally:
        server.stop()


def _pa_summary(text: str) -> dict[str, Any]:
    import re

    m = re.search(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency ([\d.]+) usec", text)
    summary: dict[str, Any] = {"raw_tail": text.strip().splitlines()[-12:]}
    if "Failed to obtain stable measurement" in text:
        # perf_analyzer's own verdict (exit 2): its windows never agreed within the stability percentage.
        summary["unstable"] = True
    if m:
        summary.update({"throughput": float(m.group(2)), "avg_us": float(m.group(3))})
    for q in ("p50", "p99"):
        found = re.findall(rf"{q} latency: (\d+) usec", text)
        if found:
            summary[f"{q}_us"] = float(found[-1])  # the last (reported) window
    q = re.search(r"Avg request latency: (\d+) usec \(overhead (\d+) usec \+ queue (\d+) usec \+ compute input (\d+) usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)", text)
    if q:
        summary["server_breakdown_us"] = dict(zip(("avg", "overhead", "queue", "compute_input", "compute_infer", "compute_output"), map(int, q.groups())))
    return summary


def markdown(result: dict[str, Any]) -> str:
    lines = ["# mnist-edge benchmark", "", f"mnist-edge settings: {result['server_settings']}. Servers pinned to CPU {SERVER_CPU}, "
             f"load generator to CPU {LOADGEN_CPU}; {result['config']['rounds']} interleaved rounds, median ratios.", ""]
    lines += ["## Targets", "", "| target | measured | budget | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        v = "n/a" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"| {t['target']} | {v} | {t['op']} {t['budget']} | {'yes' if t['met'] else '**no**'} |")
    cf = result["compute_floor"]
    lines += ["", f"Compute floor (bare session.run, CPU {SERVER_CPU}): 1 image {cf['batch_1_us']:.1f} us; "
              f"64 images {cf['batch_64_us']:.0f} us; 1024 images {cf['batch_1024_us'] / 1000:.2f} ms = {cf['batch_1024_images_per_s']:,.0f} images/s.", ""]
    lines += ["## Points", "", "| point | p50 us (floor) | ratio | p90 us | p99 us (floor) | ratio | req/s (floor) | ratio | images/s | server CPU us/req (floor) | mean batch | loadgen CPU |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, p in result["points"].items():
        flag = " (loadgen-bound)" if p["loadgen_bound"] else ""
        mb = "-" if p["mean_batch_size"] is None else f"{p['mean_batch_size']:.1f}"
        lines.append(
            f"| {key} | {p['server_p50_us']:.0f} ({p['floor_p50_us']:.0f}) | {p['ratio_p50_us']:.2f} | {p['server_p90_us']:.0f} | "
            f"{p['server_p99_us']:.0f} ({p['floor_p99_us']:.0f}) | {p['ratio_p99_us']:.2f} | {p['server_throughput_rps']:,.0f} ({p['floor_throughput_rps']:,.0f}) | "
            f"{p['ratio_throughput_rps']:.2f} | {p['server_images_per_s']:,.0f} | {p['server_server_cpu_us_per_request']:.0f} ({p['floor_server_cpu_us_per_request']:.0f}) | {mb} | "
            f"{100 * max(p['server_loadgen_cpu_fraction'], p['floor_loadgen_cpu_fraction']):.0f}%{flag} |"
        )
    minimal = [(k, p) for k, p in result["points"].items() if "minimal_p50_us" in p]
    if minimal:
        lines += ["", "## Reference: a minimal servicer (bench/minimal.py: parse, session.run, respond; nothing else)", "",
                  "| point | p50 us | p50 ratio to floor (mnist-edge's) | p99 ratio (mnist-edge's) | req/s | throughput ratio (mnist-edge's) |",
                  "|---|---|---|---|---|---|"]
        for key, p in minimal:
            lines.append(f"| {key} | {p['minimal_p50_us']:.0f} | {p['minimal_ratio_p50_us']:.2f} ({p['ratio_p50_us']:.2f}) | "
                         f"{p['minimal_ratio_p99_us']:.2f} ({p['ratio_p99_us']:.2f}) | {p['minimal_throughput_rps']:,.0f} | "
                         f"{p['minimal_ratio_throughput_rps']:.2f} ({p['ratio_throughput_rps']:.2f}) |")
    unix = [(k, p) for k, p in result["points"].items() if "unix_p50_us" in p]
    if unix:
        lines += ["", "## mnist-edge on a unix: socket against loopback TCP (same settings, same rounds)", "",
                  "| point | unix p50 us | TCP p50 us | unix/TCP p50 | unix p99 us | unix/TCP p99 | unix req/s | unix/TCP throughput |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, p in unix:
            lines.append(f"| {key} | {p['unix_p50_us']:.0f} | {p['server_p50_us']:.0f} | {p['unix_vs_tcp_p50_us']:.2f} | {p['unix_p99_us']:.0f} | "
                         f"{p['unix_vs_tcp_p99_us']:.2f} | {p['unix_throughput_rps']:,.0f} | {p['unix_vs_tcp_throughput_rps']:.2f} |")
    cs = result["cold_start"]
    lines += ["", f"Cold start to SERVING (spawn to first SERVING health answer): median {cs['median_s']:.3f} s of {len(cs['runs_s'])}.",
              f"Peak RSS: server {result['peak_rss_mb'].get('server', float('nan')):.0f} MB, floor {result['peak_rss_mb'].get('floor', float('nan')):.0f} MB"
              + (f", server with --http-address (after the REST rows) {result['peak_rss_mb']['server_http_on']:.0f} MB." if "server_http_on" in result["peak_rss_mb"] else ".")]
    if any(k.startswith("rest-") for k in result["points"]):
        lines += ["", "REST rows (rest-*): mnist-edge with --http-address, POST /v2/models/mnist/infer on keep-alive connections "
                  "(bench/httpload.py); their floor is the HTTP floor (bench.floor --http), not the gRPC one."]
    pa = result.get("perf_analyzer")
    if pa:
        lines += ["", "## Triton perf_analyzer against mnist-edge (its own load and timing)", "",
                  "| concurrency | exit | infer/s | p50 us | p99 us | server queue us | server compute infer us |", "|---|---|---|---|---|---|---|"]
        for k, v in pa.items():
            s = v["summary"]
            br = s.get("server_breakdown_us", {})
            lines.append(f"| {k} | {v['returncode']} | {s.get('throughput', 'no stable measurement' if s.get('unstable') else 'n/a')} | {s.get('p50_us', 'n/a')} | {s.get('p99_us', 'n/a')} | "
                         f"{br.get('queue', 'n/a')} | {br.get('compute_infer', 'n/a')} |")
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "bench.json", out_dir / "bench.md"
    j.write_text(json.dumps(result, indent=2, default=float) + "\n")
    m.write_text(markdown(result))
    return j, m
