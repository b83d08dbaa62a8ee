"""How big and how heavy is a server-only install? `python -m mnist_edge.bench.footprint --out DIR`.

Measured in one run, from a fresh virtual environment installed the way a device installs
(`pip install --no-index --find-links WHEELHOUSE mnist-edge`, no extras):

(a) install size: site-packages without pip and setuptools, per distribution (from each
    RECORD), biggest first;
(b) memory per worker: `mnist-edge serve` (1 worker, pinned to CPU 0) idle once SERVING and
    after a few thousand ModelInfer requests of 1..256 images (VmRSS, VmHWM, Pss from /proc),
    against a baseline measured the same way in the same run: a bare Python process of the
    same venv that imports grpc, numpy and onnxruntime and runs an InferenceSession of the
    same int8 file with the server's session options and the same request sizes;
(c) cold start: process spawn to the first SERVING answer of a tight (2 ms) health poll,
    median of 5;
(d) pinned to one core: single-image ModelInfer throughput and p50 (server on CPU 0,
    closed-loop load generator on CPU 1);
(e) with --experiments (the default): what stands between the server and the goals, each
    measured: the RSS and time of every import the server makes, onnxruntime's memory options
    (enable_cpu_mem_arena, enable_mem_pattern) with their per-request cost, the RSS of handler
    threads, and glibc malloc tuning (MALLOC_ARENA_MAX, a fixed mmap threshold) on the loaded
    server.

Goals (issue 7): install <= 200 MB; loaded worker RSS <= 20 MB above the baseline; cold
start <= 1 s. WHEELHOUSE is --wheelhouse, else MNIST_EDGE_WHEELHOUSE, else <repo>/wheelhouse
(built with `pip wheel` from the repository when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
INFER = "/inference.GRPCInferenceService/ModelInfer"
SERVER_CPU, LOADGEN_CPU = 0, 1
EXCLUDED_DISTS = ("pip", "setuptools", "wheel")
GOALS = {"install_mb": 200.0, "rss_above_baseline_mb": 20.0, "cold_start_s": 1.0}


@dataclass
class FootprintConfig:
    out_dir: Path = Path("reports/footprint")
    wheelhouse: Path | None = None
    venv_dir: Path | None = None  # default: OUT/venv (recreated)
    load_requests: int = 3000
    load_max_images: int = 256
    load_concurrency: int = 8
    cold_starts: int = 5
    pinned_seconds: float = 3.0
    pinned_max_requests: int = 20000
    pinned_concurrency: tuple[int, ...] = (1, 4)
    experiments: bool = True
    seed: int = 0


# ---------------------------------------------------------------- environment

def wheelhouse(cfg: FootprintConfig, log=print) -> Path:
    path = (cfg.wheelhouse or Path(os.environ.get("MNIST_EDGE_WHEELHOUSE") or REPO / "wheelhouse")).resolve()
    if not any(path.glob("mnist_edge-*.whl")):
        log(f"building the wheelhouse {path} (pip wheel {REPO})")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(path), str(REPO)], check=True)
    return path


def base_python() -> str:
    candidate = getattr(sys, "_base_executable", None)
    if candidate and Path(candidate).exists():
        return candidate
    return shutil.which("python3") or sys.executable


def clean_env(**extra: str) -> dict[str, str]:
    """No PYTHONPATH, venv, pip configuration or MNIST_EDGE_* settings leaking in."""
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONUSERBASE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PIP_", "MNIST_EDGE_", "MALLOC_"))}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONNOUSERSITE="1")
    env.update(extra)
    return env


def install(venv: Path, wheels: Path) -> dict[str, Any]:
    """A fresh venv with the server-only install; returns timings and the venv's paths."""
    if venv.exists():
        shutil.rmtree(venv)
    t0 = time.perf_counter()
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, env=clean_env(), capture_output=True)
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "mnist-edge"],
                          env=clean_env(), capture_output=True, text=True, cwd=venv)
    if proc.returncode != 0:
        raise RuntimeError(f"pip install --no-index --find-links {wheels} mnist-edge failed (a stale wheelhouse? rebuild it with "
                           f"`{sys.executable} -m pip wheel --wheel-dir {wheels} {REPO}`):\n{proc.stderr[-2000:]}")
    site = next((venv / "lib").glob("python3*/site-packages"))
    return {"venv": str(venv), "site_packages": str(site), "install_s": time.perf_counter() - t0}


def site_packages_size(site: Path) -> dict[str, Any]:
    """Bytes in site-packages without pip/setuptools, and per distribution (RECORD), biggest first."""
    owner: dict[Path, str] = {}
    for record in site.glob("*.dist-info/RECORD"):
        name = record.parent.name.split("-")[0].replace("_", "-").lower()
        for line in record.read_text().splitlines():
            rel = line.rsplit(",", 2)[0]
            p = (site / rel).resolve()
            if p.is_relative_to(site.resolve()):
                owner[p] = name
    sizes: dict[str, dict[str, int]] = {}
    total = excluded = 0
    for root, _dirs, files in os.walk(site):
        for fn in files:
            p = Path(root, fn)
            st = p.lstat()
            name = owner.get(p.resolve(), "(not in any RECORD)")
            if name in EXCLUDED_DISTS or fn == "distutils-precedence.pth" or "_distutils_hack" in p.parts:
                excluded += st.st_size
                continue
            total += st.st_size
            entry = sizes.setdefault(name, {"bytes": 0, "files": 0, "disk_bytes": 0})
            entry["bytes"] += st.st_size
            entry["disk_bytes"] += st.st_blocks * 512
            entry["files"] += 1
    packages = sorted(({"name": k, **v} for k, v in sizes.items()), key=lambda e: -e["bytes"])
    return {
        "bytes": total,
        "mb": total / MB,
        "disk_mb": sum(e["disk_bytes"] for e in packages) / MB,
        "excluded_pip_setuptools_bytes": excluded,
        "packages": packages,
    }


# ---------------------------------------------------------------- /proc

def proc_mem(pid: int) -> dict[str, float]:
    """MB figures (and the thread count) of a live process."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "VmSize"):
                out[key] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out[key] = int(value)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    out["Pss"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


# ---------------------------------------------------------------- the server

@dataclass
class Server:
    popen: subprocess.Popen
    address: str
    log_path: Path
    spawned_at: float
    serving_at: float = 0.0

    def mem(self) -> dict[str, float]:
        return proc_mem(self.popen.pid)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def start_server(venv: Path, tmp: Path, tag: str, extra_env: dict[str, str] | None = None, args: tuple[str, ...] = (), timeout: float = 60) -> Server:
    """Spawn `mnist-edge serve` pinned to CPU 0 and return once a 2 ms health poll sees SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mnist_edge.bench.loadgen import spawn_pinned

    port_file, log_path = tmp / f"{tag}.port", tmp / f"{tag}.log"
    port_file.unlink(missing_ok=True)
    cmd = [str(venv / "bin" / "mnist-edge"), "serve", "--address", "127.0.0.1:0", "--port-file", str(port_file),
           "--metrics-address", "127.0.0.1:0", *args]
    log = log_path.open("w")
    t0 = time.perf_counter()
    p = spawn_pinned(cmd, SERVER_CPU, stdout=subprocess.DEVNULL, stderr=log, env=clean_env(**(extra_env or {})), cwd=tmp)
    log.close()
    end = t0 + timeout
    while not port_file.exists():
        if p.poll() is not None:
            raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}: {log_path.read_text()[-2000:]}")
        if time.perf_counter() > end:
            p.kill()
            raise RuntimeError(f"no port file from {' '.join(cmd)} within {timeout}s")
        time.sleep(0.001)
    address = port_file.read_text().strip()
    server = Server(p, address, log_path, t0)
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    server.serving_at = time.perf_counter()
                    return server
            except grpc.RpcError:
                pass
            if p.poll() is not None or time.perf_counter() > end:
                server.stop()
                raise RuntimeError(f"{address} never SERVING: {log_path.read_text()[-2000:]}")
            time.sleep(0.002)


class Payloads:
    """Pre-serialized ModelInferRequest bytes of the first n test images, per n."""

    def __init__(self, images):
        from mnist_edge.bench.run import infer_payload

        self.images, self._make, self._cache = images, infer_payload, {}

    def __call__(self, n: int) -> bytes:
        if n not in self._cache:
            self._cache[n] = self._make(self.images[:n])
        return self._cache[n]


def request_sizes(cfg: FootprintConfig) -> list[int]:
    rng = random.Random(cfg.seed)
    return [rng.randint(1, cfg.load_max_images) for _ in range(cfg.load_requests)]


def drive(address: str, payloads: Payloads, sizes: list[int], concurrency: int) -> dict[str, Any]:
    """Send every size once, `concurrency` callers at a time (sync gRPC, identity serializers)."""
    import grpc

    from mnist_edge.bench import loadgen

    it, lock = iter(sizes), threading.Lock()
    errors: dict[str, int] = {}
    ch = grpc.insecure_channel(address, options=loadgen.channel_options())
    call = ch.unary_unary(INFER, request_serializer=None, response_deserializer=None)

    def worker() -> None:
        while True:
            with lock:
                n = next(it, None)
            if n is None:
                return
            try:
                call(payloads(n), timeout=60)
            except grpc.RpcError as exc:
                with lock:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ch.close()
    return {"requests": len(sizes), "images": sum(sizes), "errors": errors, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------- bare-Python helpers (run in the fresh venv)

BASELINE = r"""
import json, sys, time
import grpc, numpy as np, onnxruntime as ort
path, opts = sys.argv[1], json.loads(sys.argv[2])
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
so.add_session_config_entry("session.intra_op.allow_spinning", "0")
so.log_severity_level = 3
so.enable_cpu_mem_arena = opts.get("arena", True)
so.enable_mem_pattern = opts.get("mem_pattern", True)
for k, v in opts.get("config", {}).items():
    so.add_session_config_entry(k, v)
sess = ort.InferenceSession(open(path, "rb").read(), so, providers=["CPUExecutionProvider"])
def x(n):  # a fresh input per call, as a server decoding a request has
    return np.zeros((n, 28, 28), np.uint8)
for n in (1, 8, 64):  # the server's warm-up
    sess.run(["probabilities", "digit"], {"pixels": x(n)})
print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        for n in cmd["sizes"]:
            sess.run(["probabilities", "digit"], {"pixels": x(n)})
        print("done", flush=True)
    elif cmd["op"] == "time":
        res = {}
        for n, reps in cmd["batches"]:
            ts = []
            xn = x(n)
            for _ in range(reps):
                t = time.perf_counter()
                sess.run(["probabilities", "digit"], {"pixels": xn})
                ts.append(time.perf_counter() - t)
            ts.sort()
            res[str(n)] = ts[len(ts) // 2] * 1e6
        print(json.dumps(res), flush=True)
"""

IMPORTS = r"""
import importlib, json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
rows = [{"module": "(interpreter)", "rss_mb": rss(), "ms": 0.0}]
for m in sys.argv[1:]:
    t = time.perf_counter()
    importlib.import_module(m)
    rows.append({"module": m, "rss_mb": rss(), "ms": (time.perf_counter() - t) * 1e3})
print(json.dumps(rows))
"""

THREADS = r"""
import json, sys, threading, time
from concurrent import futures
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
n = int(sys.argv[1])
import grpc, numpy, onnxruntime  # the same process shape as a worker
time.sleep(0.2)
before = rss()
go = threading.Event()
def task():
    b = bytearray(200_000)  # a thread that allocates (as a handler decoding a request does)
    go.wait()
ex = futures.ThreadPoolExecutor(max_workers=n)
fs = [ex.submit(task) for _ in range(n)]
time.sleep(0.5)
print(json.dumps({"threads": n, "rss_before_mb": before, "rss_after_mb": rss()}))
go.set()
ex.shutdown()
"""


ALLOC = r"""
import json, time
ts = []
for _ in range(200):
    bytearray(200_704)
for _ in range(20000):  # a 256-image request body: allocated, zeroed, freed
    t = time.perf_counter_ns(); b = bytearray(200_704); del b; ts.append(time.perf_counter_ns() - t)
ts.sort()
print(json.dumps({"median_us": ts[len(ts) // 2] / 1e3, "p10_us": ts[len(ts) // 10] / 1e3}))
"""


class Baseline:
    """The bare process: grpc + numpy + onnxruntime and one session of the same file."""

    def __init__(self, venv: Path, model: Path, opts: dict | None = None) -> None:
        from mnist_edge.bench.loadgen import spawn_pinned

        self.p = spawn_pinned([str(venv / "bin" / "python"), "-c", BASELINE, str(model), json.dumps(opts or {})], SERVER_CPU,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=clean_env(), cwd=venv)
        self._expect("ready")

    def _expect(self, word: str) -> str:
        line = self.p.stdout.readline()
        if not line or (word and line.strip() != word):
            raise RuntimeError(f"baseline process said {line!r}, expected {word!r}")
        return line

    def run(self, sizes: list[int]) -> None:
        self.p.stdin.write(json.dumps({"op": "run", "sizes": sizes}) + "\n")
        self.p.stdin.flush()
        self._expect("done")

    def time(self, batches: list[tuple[int, int]]) -> dict[str, float]:
        self.p.stdin.write(json.dumps({"op": "time", "batches": batches}) + "\n")
        self.p.stdin.flush()
        return json.loads(self._expect(""))

    def mem(self) -> dict[str, float]:
        return proc_mem(self.p.pid)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


def shipped_model(site: Path) -> Path:
    manifest = json.loads((site / "mnist_edge" / "models" / "manifest.json").read_text())
    return site / "mnist_edge" / "models" / manifest["models"]["int8"]["file"]


def _run_json(venv: Path, code: str, *args: str, env: dict | None = None) -> Any:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code, *args], capture_output=True, text=True, env=env or clean_env(), cwd=venv, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- measurements

def latency(address: str, payloads: Payloads, seconds: float = 1.5) -> dict[str, float]:
    """p50 of single-image and 256-image ModelInfer, one caller (the per-request cost of a setting)."""
    from mnist_edge.bench import loadgen

    out = {}
    for n in (1, 256):
        r = loadgen.run(address, INFER, payloads(n), concurrency=1, max_requests=5000, max_seconds=seconds, warmup=20)
        out[f"p50_us_{n}"] = r.percentile(50)
    r = loadgen.run(address, INFER, payloads(1), concurrency=32, max_requests=50000, max_seconds=seconds, warmup=20)
    out["rps_1_image_32_callers"] = r.throughput
    return out


def memory(cfg: FootprintConfig, venv: Path, model: Path, tmp: Path, payloads: Payloads, log=print, extra_env: dict | None = None,
           tag: str = "rss", args: tuple[str, ...] = (), concurrency: int | None = None, measure_latency: bool = False) -> dict[str, Any]:
    """Worker and baseline, idle and loaded, the same request sizes."""
    sizes = request_sizes(cfg)
    server = start_server(venv, tmp, tag, extra_env=extra_env, args=args)
    lat = None
    try:
        time.sleep(0.3)
        idle = server.mem()
        load = drive(server.address, payloads, sizes, concurrency or cfg.load_concurrency)
        loaded = server.mem()
        time.sleep(1.0)
        after = server.mem()
        if measure_latency:
            lat = latency(server.address, payloads)
    finally:
        rc = server.stop()
    base = Baseline(venv, model)
    try:
        time.sleep(0.3)
        b_idle = base.mem()
        base.run(sizes)
        b_loaded = base.mem()
    finally:
        base.close()
    log(f"  worker idle {idle['VmRSS']:.1f} MB, loaded {loaded['VmRSS']:.1f} MB (HWM {loaded['VmHWM']:.1f}); baseline idle {b_idle['VmRSS']:.1f}, loaded {b_loaded['VmRSS']:.1f} MB")
    return {
        "server_env": extra_env or {},
        "server_args": list(args),
        "latency": lat,
        "load": load,
        "worker": {"idle": idle, "loaded": loaded, "loaded_plus_1s": after, "exit_code": rc},
        "baseline": {"idle": b_idle, "loaded": b_loaded},
        "worker_minus_baseline_mb": {
            "idle_rss": idle["VmRSS"] - b_idle["VmRSS"],
            "loaded_rss": loaded["VmRSS"] - b_loaded["VmRSS"],
            "loaded_hwm": loaded["VmHWM"] - b_loaded["VmHWM"],
        },
    }


def cold_start(cfg: FootprintConfig, venv: Path, tmp: Path) -> dict[str, Any]:
    runs, loads = [], []
    for i in range(cfg.cold_starts):
        s = start_server(venv, tmp, f"cold{i}")
        runs.append(s.serving_at - s.spawned_at)
        ev = {e.get("event"): e for e in s.events()}
        s.stop()
        if "serving" in ev:
            loads.append(ev["serving"].get("load_seconds"))
    return {"runs_s": runs, "median_s": statistics.median(runs), "model_load_s": loads, "model_load_median_s": statistics.median(loads) if loads else None}


def pinned(cfg: FootprintConfig, venv: Path, tmp: Path, payloads: Payloads) -> dict[str, Any]:
    """Single-image ModelInfer, server on CPU 0, load generator (this process) on CPU 1."""
    from mnist_edge.bench import loadgen

    server = start_server(venv, tmp, "pinned")
    old = os.sched_getaffinity(0)
    out: dict[str, Any] = {"server_cpu": SERVER_CPU, "loadgen_cpu": LOADGEN_CPU if (os.cpu_count() or 1) > 1 else None}
    try:
        loadgen.pin_to(LOADGEN_CPU)
        for c in cfg.pinned_concurrency:
            r = loadgen.run(server.address, INFER, payloads(1), concurrency=c, max_requests=cfg.pinned_max_requests, max_seconds=cfg.pinned_seconds, warmup=50)
            out[f"c={c}"] = {"requests": r.requests, "errors": r.errors, "throughput_rps": r.throughput, "p50_us": r.percentile(50),
                             "p99_us": r.percentile(99), "loadgen_cpu_fraction": r.client_cpu_fraction}
        out["worker_after"] = server.mem()
    finally:
        os.sched_setaffinity(0, old)
        server.stop()
    return out


def experiments(cfg: FootprintConfig, venv: Path, model: Path, tmp: Path, payloads: Payloads, log=print) -> dict[str, Any]:
    out: dict[str, Any] = {}
    mods = ["numpy", "google.protobuf.message", "grpc", "onnxruntime", "PIL.Image",
            "grpc_health.v1.health", "grpc_reflection.v1alpha.reflection", "protos.inference.grpc_service_pb2",
            "protos.digits.v1.digits_pb2", "imaging.normalize", "server.runner", "server.app", "server.metrics"]
    rows = _run_json(venv, IMPORTS, *mods)
    for prev, row in zip(rows, rows[1:]):
        row["delta_mb"] = row["rss_mb"] - prev["rss_mb"]
    out["imports"] = rows
    log("  imports: " + ", ".join(f"{r['module']} +{r.get('delta_mb', 0):.1f} MB/{r['ms']:.0f} ms" for r in rows[1:]))

    # onnxruntime memory options: RSS after the same load, and the per-request cost.
    sizes = request_sizes(cfg)
    variants = {
        "default (arena on, mem pattern on)": {},
        "enable_cpu_mem_arena=False": {"arena": False},
        "enable_mem_pattern=False": {"mem_pattern": False},
        "arena off + mem pattern off": {"arena": False, "mem_pattern": False},
    }
    ort_rows = {}
    for name, opts in variants.items():
        b = Baseline(venv, model, opts)
        try:
            idle = b.mem()
            b.run(sizes)
            loaded = b.mem()
            timing = b.time([(1, 3000), (64, 300), (256, 100)])
        finally:
            b.close()
        ort_rows[name] = {"idle_rss_mb": idle["VmRSS"], "loaded_rss_mb": loaded["VmRSS"], "loaded_hwm_mb": loaded["VmHWM"],
                          "median_us": timing}
        log(f"  ort {name}: loaded {loaded['VmRSS']:.1f} MB (HWM {loaded['VmHWM']:.1f}); batch 1 {timing['1']:.1f} us, 256 {timing['256']:.0f} us")
    out["onnxruntime_options"] = ort_rows

    th = [_run_json(venv, THREADS, str(n)) for n in (8, 128)]
    out["threads"] = [{**t, "delta_mb": t["rss_after_mb"] - t["rss_before_mb"], "mb_per_thread": (t["rss_after_mb"] - t["rss_before_mb"]) / t["threads"]} for t in th]
    log("  threads: " + ", ".join(f"{t['threads']} threads +{t['delta_mb']:.1f} MB" for t in out["threads"]))

    # The real worker under the same load with one setting changed at a time, then all together.
    # glibc: per-thread malloc arenas and the dynamic mmap threshold keep freed request buffers.
    many = 4 * cfg.load_concurrency
    queue = ("--max-queue", str(many * cfg.load_max_images))  # room for every caller's largest request: no RESOURCE_EXHAUSTED
    variants = {
        "defaults": ({}, (), None),
        "MALLOC_MMAP_THRESHOLD_=131072": ({"MALLOC_MMAP_THRESHOLD_": "131072"}, (), None),
        "--metrics-address '' (metrics off)": ({}, ("--metrics-address", ""), None),
        "--no-reflection": ({}, ("--no-reflection",), None),
        "--handler-threads 16": ({}, ("--handler-threads", "16"), None),
        f"{many} callers, --handler-threads 4 (default), {' '.join(queue)}": ({}, queue, many),
        f"{many} callers, --handler-threads 16, {' '.join(queue)}": ({}, ("--handler-threads", "16", *queue), many),
        "--metrics-address '' + --no-reflection": ({}, ("--metrics-address", "", "--no-reflection"), None),
    }
    malloc = {}
    for name, (env, args, conc) in variants.items():
        m = memory(cfg, venv, model, tmp, payloads, log=lambda s: None, extra_env=env, tag="variant", args=args, concurrency=conc, measure_latency=True)
        malloc[name] = {"idle_rss_mb": m["worker"]["idle"]["VmRSS"], "loaded_rss_mb": m["worker"]["loaded"]["VmRSS"],
                        "loaded_hwm_mb": m["worker"]["loaded"]["VmHWM"], "threads": m["worker"]["loaded"]["Threads"],
                        "seconds": m["load"]["seconds"], "callers": conc or cfg.load_concurrency, "errors": m["load"]["errors"],
                        "baseline_loaded_mb": m["baseline"]["loaded"]["VmRSS"],
                        "worker_minus_baseline_loaded_mb": m["worker_minus_baseline_mb"]["loaded_rss"], **(m["latency"] or {})}
        r = malloc[name]
        log(f"  server {name}: idle {r['idle_rss_mb']:.1f}, loaded {r['loaded_rss_mb']:.1f} MB (minus baseline {r['worker_minus_baseline_loaded_mb']:.1f}), "
            f"{r['threads']:.0f} threads; p50 1 image {r['p50_us_1']:.0f} us, 256 images {r['p50_us_256']:.0f} us; 32 callers {r['rps_1_image_32_callers']:.0f} req/s")
    out["server_variants"] = malloc
    out["large_allocation_us"] = {name: _run_json(venv, ALLOC, env=clean_env(**env)) for name, env in
                                  {"default": {}, "MALLOC_MMAP_THRESHOLD_=131072": {"MALLOC_MMAP_THRESHOLD_": "131072"}}.items()}
    log("  200 KB allocation: " + ", ".join(f"{k} {v['median_us']:.1f} us" for k, v in out["large_allocation_us"].items()))
    return out


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(name: str, value: float | None, budget: float) -> None:
        rows.append({"goal": name, "value": value, "budget": budget, "met": value is not None and value <= budget})

    add("server-only install, MB (site-packages without pip/setuptools)", result["install"]["size"]["mb"], GOALS["install_mb"])
    if "memory" in result:
        add("worker RSS loaded minus baseline loaded, MB", result["memory"]["worker_minus_baseline_mb"]["loaded_rss"], GOALS["rss_above_baseline_mb"])
    if "cold_start" in result:
        add("cold start to SERVING, s (median)", result["cold_start"]["median_s"], GOALS["cold_start_s"])
    return rows


def run(cfg: FootprintConfig, log=print) -> dict[str, Any]:
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    wheels = wheelhouse(cfg, log)
    venv = (cfg.venv_dir or cfg.out_dir / "venv").resolve()
    log(f"fresh venv {venv} from {wheels}")
    inst = install(venv, wheels)
    site = Path(inst["site_packages"])
    inst["size"] = site_packages_size(site)
    log(f"  install: {inst['size']['mb']:.1f} MB in site-packages (pip/setuptools excluded)")
    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "wheelhouse": str(wheels),
        "install": inst,
    }
    model = shipped_model(site)
    result["model"] = {"file": model.name, "bytes": model.stat().st_size}
    from mnist_edge.training import data as mnist_data

    payloads = Payloads(mnist_data.load_test(offline=True).images)
    with tempfile.TemporaryDirectory(prefix="footprint-") as t:
        tmp = Path(t)
        log("memory: worker vs baseline")
        result["memory"] = memory(cfg, venv, model, tmp, payloads, log)
        log("cold start")
        result["cold_start"] = cold_start(cfg, venv, tmp)
        log(f"  median {result['cold_start']['median_s']:.3f} s")
        log("pinned to one core")
        result["pinned"] = pinned(cfg, venv, tmp, payloads)
        if cfg.experiments:
            log("experiments")
            result["experiments"] = experiments(cfg, venv, model, tmp, payloads, log)
    result["goals"] = goals(result)
    return result


# ---------------------------------------------------------------- report

def markdown(r: dict[str, Any]) -> str:
    size = r["install"]["size"]
    lines = ["# mnist-edge footprint (server-only install)", "", "## Goals", "", "| goal | measured | budget | met |", "|---|---|---|---|"]
    for g in r["goals"]:
        v = "n/a" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"| {g['goal']} | {v} | <= {g['budget']} | {'yes' if g['met'] else '**no**'} |")
    lines += ["", f"## Install: {size['mb']:.1f} MB (on disk {size['disk_mb']:.1f} MB; pip/setuptools excluded)", "", "| distribution | MB | files |", "|---|---|---|"]
    for p in size["packages"]:
        lines.append(f"| {p['name']} | {p['bytes'] / MB:.2f} | {p['files']} |")
    m = r.get("memory")
    if m:
        w, b, d = m["worker"], m["baseline"], m["worker_minus_baseline_mb"]
        lines += ["", f"## Memory per worker (1 worker pinned to CPU {SERVER_CPU}; load: {m['load']['requests']} ModelInfer requests of 1..{max(1, r['config']['load_max_images'])} images, "
                  f"{r['config']['load_concurrency']} callers, {m['load']['seconds']:.1f} s, errors {m['load']['errors'] or 'none'})", "",
                  "| process | idle VmRSS | loaded VmRSS | loaded VmHWM | loaded Pss | threads |", "|---|---|---|---|---|---|",
                  f"| mnist-edge serve | {w['idle']['VmRSS']:.1f} | {w['loaded']['VmRSS']:.1f} | {w['loaded']['VmHWM']:.1f} | {w['loaded'].get('Pss', float('nan')):.1f} | {w['loaded']['Threads']:.0f} |",
                  f"| baseline (grpc + numpy + onnxruntime + session) | {b['idle']['VmRSS']:.1f} | {b['loaded']['VmRSS']:.1f} | {b['loaded']['VmHWM']:.1f} | {b['loaded'].get('Pss', float('nan')):.1f} | {b['loaded']['Threads']:.0f} |",
                  f"| **worker minus baseline** | {d['idle_rss']:.1f} | **{d['loaded_rss']:.1f}** | {d['loaded_hwm']:.1f} | | |"]
    cs = r.get("cold_start")
    if cs:
        lines += ["", f"## Cold start: median {cs['median_s']:.3f} s (runs {', '.join(f'{x:.3f}' for x in cs['runs_s'])}); "
                  f"of which model load + verify + warm-up {cs['model_load_median_s'] if cs['model_load_median_s'] is not None else float('nan'):.3f} s"]
    pn = r.get("pinned")
    if pn:
        lines += ["", f"## Pinned to one core (server CPU {pn['server_cpu']}, load generator CPU {pn['loadgen_cpu']}): single-image ModelInfer", "",
                  "| concurrency | req/s | p50 us | p99 us | load generator CPU |", "|---|---|---|---|---|"]
        for k, v in pn.items():
            if k.startswith("c="):
                lines.append(f"| {k[2:]} | {v['throughput_rps']:,.0f} | {v['p50_us']:.0f} | {v['p99_us']:.0f} | {100 * v['loadgen_cpu_fraction']:.0f}% |")
    ex = r.get("experiments")
    if ex:
        lines += ["", "## What the memory and start-up time go to", "", "### Imports (in the server's order, one process)", "", "| module | +RSS MB | ms |", "|---|---|---|"]
        for row in ex["imports"][1:]:
            lines.append(f"| {row['module']} | {row['delta_mb']:.1f} | {row['ms']:.0f} |")
        lines += ["", "### onnxruntime memory options (bare session, same load)", "", "| options | idle RSS | loaded RSS | loaded HWM | batch 1 us | batch 64 us | batch 256 us |", "|---|---|---|---|---|---|---|"]
        for name, row in ex["onnxruntime_options"].items():
            t = row["median_us"]
            lines.append(f"| {name} | {row['idle_rss_mb']:.1f} | {row['loaded_rss_mb']:.1f} | {row['loaded_hwm_mb']:.1f} | {t['1']:.1f} | {t['64']:.0f} | {t['256']:.0f} |")
        lines += ["", "### Handler threads", ""]
        for t in ex["threads"]:
            lines.append(f"- {t['threads']} pool threads (each allocating 200 KB once): +{t['delta_mb']:.1f} MB, {t['mb_per_thread'] * 1024:.0f} KB per thread")
        lines += ["", "### The worker with one setting changed (same load; baseline re-measured each time)", "",
                  "| setting | callers | idle RSS | loaded RSS | loaded HWM | threads | minus baseline | p50 1 image us | p50 256 images us | 1-image req/s, 32 callers |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in ex["server_variants"].items():
            lines.append(f"| {name} | {row['callers']} | {row['idle_rss_mb']:.1f} | {row['loaded_rss_mb']:.1f} | {row['loaded_hwm_mb']:.1f} | {row['threads']:.0f} | "
                         f"{row['worker_minus_baseline_loaded_mb']:.1f} | {row['p50_us_1']:.0f} | {row['p50_us_256']:.0f} | {row['rps_1_image_32_callers']:,.0f} |")
        la = ex.get("large_allocation_us")
        if la:
            lines += ["", "A 200 KB allocation (a 256-image request body), allocate + zero + free: " +
                      ", ".join(f"{k}: median {v['median_us']:.1f} us" for k, v in la.items()) + "."]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m = out_dir / "footprint.json", out_dir / "footprint.md"
    j.write_text(json.dumps(result, indent=2, default=str) + "\n")
    m.write_text(markdown(result))
    return j, m


def main(argv: list[str] | None = None) -> int:
    d = FootprintConfig()
    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.footprint", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=d.out_dir, help="directory for footprint.json, footprint.md and the venv")
    p.add_argument("--wheelhouse", type=Path, default=None, help="wheels to install from (default: MNIST_EDGE_WHEELHOUSE or <repo>/wheelhouse)")
    p.add_argument("--venv", type=Path, default=None, help="where to create the fresh venv (default: OUT/venv; recreated)")
    p.add_argument("--requests", type=int, default=d.load_requests, help="requests in the memory load")
    p.add_argument("--max-images", type=int, default=d.load_max_images, help="largest request of the memory load (sizes uniform in 1..N)")
    p.add_argument("--concurrency", type=int, default=d.load_concurrency, help="callers in the memory load")
    p.add_argument("--cold-starts", type=int, default=d.cold_starts)
    p.add_argument("--seconds", type=float, default=d.pinned_seconds, help="time bound per pinned throughput point")
    p.add_argument("--experiments", action=argparse.BooleanOptionalAction, default=d.experiments, help="also measure what the memory and start-up go to")
    a = p.parse_args(argv)
    cfg = FootprintConfig(out_dir=a.out, wheelhouse=a.wheelhouse, venv_dir=a.venv, load_requests=a.requests, load_max_images=a.max_images,
                          load_concurrency=a.concurrency, cold_starts=a.cold_starts, pinned_seconds=a.seconds, experiments=a.experiments)
    result = run(cfg, log=lambda s: print(s, file=sys.stderr))
    j, m = write(result, a.out)
    print(m.read_text())
    print(f"wrote {j} and {m}", file=sys.stderr)
    return 0 if all(g["met"] for g in result["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
