"""Overload with large requests: goodput and peak memory, the inference lane against the thread pool.

Many callers each keep one large ModelInfer in flight (32 x 1,024 images by default: far more
than --max-queue holds at once). Each round starts a fresh server in each mode, pinned to CPU 0
with the load generator on CPU 1, in rotating order: the default (the inference lane) and
--no-infer-lane (the thread pool, which leaves excess calls waiting unread). Per mode it
reports the answered images per second (goodput: only OK answers count), the calls refused
and how, and the server's peak resident memory (VmHWM) against its idle size before the load.
The comparison is the median over rounds of the per-round ratio, lane / pool.

    python -m mnist_edge.bench.overload --rounds 3 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mnist_edge.bench import loadgen
from mnist_edge.bench.run import infer_payload, start, wait_serving

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MODES = {"lane": [], "pool": ["--no-infer-lane"]}


def rss_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(mode: str, payload: bytes, images: int, args, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "mnist_edge", "serve", "--address", "127.0.0.1:0", "--metrics-address", "", "--log-level", "warning",
           *MODES[mode], *args.server_arg]
    proc = start(cmd, tmp / f"{mode}.port")
    try:
        wait_serving(proc.address)
        time.sleep(0.2)
        idle = rss_mb(proc.popen.pid, "VmRSS")
        load = loadgen.run(proc.address, METHOD, payload, concurrency=args.concurrency, channels=min(args.concurrency, 8),
                           max_requests=args.max_requests, max_seconds=args.seconds, warmup=2)
        peak = rss_mb(proc.popen.pid, "VmHWM")
    finally:
        proc.stop()
    return {
        "mode": mode,
        "ok": load.requests,
        "refused": load.error_codes,
        "seconds": round(load.seconds, 3),
        "goodput_images_s": round(load.requests * images / load.seconds) if load.seconds else 0,
        "p99_ms": round(load.percentile(99) / 1e3, 1) if load.requests else None,
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.overload", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="load per mode and round (bounded by time and by --max-requests)")
    p.add_argument("--max-requests", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--images", type=int, default=1024, help="images per request")
    p.add_argument("--server-arg", action="append", default=[], help="extra `mnist-edge serve` argument for both modes (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows and summary here")
    args = p.parse_args(argv)
    loadgen.pin_to(1)
    rng = np.random.default_rng(0)
    payload = infer_payload(rng.integers(0, 256, (args.images, 28, 28), dtype=np.uint8))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        for r in range(args.rounds):
            order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
            for mode in order:
                row = measure(mode, payload, args.images, args, Path(tmp))
                row["round"] = r
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    by_round = {r: {row["mode"]: row for row in rows if row["round"] == r} for r in range(args.rounds)}
    ratios = [b["lane"]["goodput_images_s"] / b["pool"]["goodput_images_s"] for b in by_round.values() if b["pool"]["goodput_images_s"]]
    extra = [b["lane"]["peak_rss_mb"] - b["pool"]["peak_rss_mb"] for b in by_round.values()]
    summary = {
        "command": " ".join(["python -m mnist_edge.bench.overload", *(argv if argv is not None else sys.argv[1:])]),
        "goodput_ratio_lane_to_pool_median": round(statistics.median(ratios), 3) if ratios else None,
        "goodput_ratio_per_round": [round(x, 3) for x in ratios],
        "peak_rss_lane_minus_pool_mb_per_round": [round(x, 1) for x in extra],
        "peak_rss_lane_minus_pool_mb_max": round(max(extra), 1) if extra else None,
    }
    lines = ["| round | mode | OK | refused | goodput (images/s) | p99 (ms) | idle RSS (MB) | peak RSS (MB) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(row["refused"].items())) or "none"
        lines.append(f"| {row['round']} | {row['mode']} | {row['ok']} | {refused} | {row['goodput_images_s']:,} | {row['p99_ms']} | {row['idle_rss_mb']} | {row['peak_rss_mb']} |")
    print("\n".join(lines))
    print(json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
