"""Measure one `mnist-edge serve` process's memory and CPU footprint under load.

The numbers size the Deployment's resources (deploy/k8s/README.md records a run):

    .venv/bin/python deploy/k8s/measure_footprint.py [--requests 2000] [--threads 4]

It starts `mnist-edge serve` (one worker, the shipped int8 model, on free loopback ports)
from the checkout's environment, waits for SERVING, reads /proc/<pid>/status and
/proc/<pid>/stat idle, then sends REQUESTS native Classify calls of 1..64 raw MNIST-style
images (seeded sizes, spread over THREADS client threads), and reads them again. Prints
one JSON object. Loopback only; the load is bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mnist_edge.client.client import DigitClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, VmSize (KiB) and Threads from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize", "Threads"):
            out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--max-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit-s", type=float, default=300.0)
    args = p.parse_args(argv)

    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_EDGE_")}
    cmd = [str(Path(sys.executable).with_name("mnist-edge")), "serve", "--workers", "1", "--address", address, "--metrics-address", f"127.0.0.1:{free_port()}", "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as cwd:
        server = subprocess.Popen(cmd, cwd=cwd, env=env)
        try:
            return run(server, address, args)
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)


def run(server: subprocess.Popen, address: str, args) -> int:
    started = time.monotonic()
    client = DigitClient(address, timeout=30)
    while True:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            if client.health() == "SERVING":
                break
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        if time.monotonic() - started > 60:
            raise SystemExit("not SERVING within 60s")
        time.sleep(0.05)
    serving_s = time.monotonic() - started
    time.sleep(1.0)
    idle = proc_status(server.pid)
    cpu_idle = cpu_seconds(server.pid)

    rng = np.random.default_rng(args.seed)
    sizes = rng.integers(1, args.max_images + 1, size=args.requests)
    pool = rng.integers(0, 256, size=(args.max_images, 28, 28), dtype=np.uint8)
    next_index = iter(range(args.requests))
    lock = threading.Lock()
    errors: list[str] = []
    deadline = time.monotonic() + args.time_limit_s

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                preds = client.classify(list(pool[: sizes[i]]))
                assert len(preds) == sizes[i]
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(repr(exc))

    t0 = time.monotonic()
    cpu0 = cpu_seconds(server.pid)
    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    cpu_load = cpu_seconds(server.pid) - cpu0
    loaded = proc_status(server.pid)
    client.close()
    report = {
        "command": " ".join(["mnist-edge serve --workers 1", f"--address {address}"]),
        "python": sys.version.split()[0],
        "requests": int(args.requests),
        "images": int(sizes.sum()),
        "client_threads": args.threads,
        "errors": len(errors),
        "time_to_serving_s": round(serving_s, 2),
        "idle": {"VmRSS_MiB": round(idle["VmRSS"] / 1024, 1), "VmHWM_MiB": round(idle["VmHWM"] / 1024, 1), "threads": idle["Threads"], "cpu_s_startup": round(cpu_idle, 2)},
        "after_load": {"VmRSS_MiB": round(loaded["VmRSS"] / 1024, 1), "VmHWM_MiB": round(loaded["VmHWM"] / 1024, 1), "VmSize_MiB": round(loaded["VmSize"] / 1024, 1), "threads": loaded["Threads"]},
        "load": {
            "wall_s": round(wall, 2),
            "server_cpu_s": round(cpu_load, 2),
            "server_cores_busy": round(cpu_load / wall, 2),
            "server_cpu_ms_per_request": round(1000 * cpu_load / args.requests, 3),
            "server_cpu_us_per_image": round(1e6 * cpu_load / int(sizes.sum()), 1),
            "requests_per_s": round(args.requests / wall, 1),
        },
    }
    print(json.dumps(report, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
