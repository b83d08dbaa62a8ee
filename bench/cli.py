"""`mnist-edge bench`: mnist-edge against the transport and compute floors, in one run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mnist_edge.bench import perf_analyzer
from mnist_edge.bench.run import BenchConfig, run, write


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    d = BenchConfig()
    p = argparse.ArgumentParser(prog="mnist-edge bench", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved floor/server rounds (median ratio is reported)")
    p.add_argument("--seconds", type=float, default=d.seconds, help="time bound per point and round")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="count bound per point and round")
    p.add_argument("--concurrency", type=_ints, default=d.concurrency, help="closed-loop concurrency levels")
    p.add_argument("--payloads", type=_ints, default=d.payloads, help="images per unary request")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=d.stream, help="also measure ClassifyStream ping-pong")
    p.add_argument("--cold-starts", type=int, default=d.cold_starts, help="cold starts to time")
    p.add_argument("--server-arg", action="append", default=[], help="extra `mnist-edge serve` argument (repeatable), e.g. --server-arg=--workers=2")
    p.add_argument("--minimal", action=argparse.BooleanOptionalAction, default=d.minimal, help="also measure bench.minimal (a bare parse + session.run servicer) at the 1-image points")
    p.add_argument("--unix", action=argparse.BooleanOptionalAction, default=d.unix, help="also measure mnist-edge on a unix: socket at the 1-image points")
    p.add_argument("--rest", action=argparse.BooleanOptionalAction, default=d.rest, help="also measure REST (--http-address), JSON and binary, 1 image")
    p.add_argument("--out", type=Path, default=d.out_dir, help="directory for bench.json and bench.md")
    p.add_argument("--perf-analyzer", default=None, help="path to Triton's perf_analyzer, or none (default: MNIST_EDGE_PERF_ANALYZER, PATH, or .venv-triton)")
    args = p.parse_args(argv)
    found = None if args.perf_analyzer == "none" else perf_analyzer.find(args.perf_analyzer)
    pa = str(found) if found else None
    cfg = BenchConfig(
        rounds=args.rounds, seconds=args.seconds, max_requests=args.max_requests, concurrency=args.concurrency,
        payloads=args.payloads, stream=args.stream, cold_starts=args.cold_starts, server_args=tuple(args.server_arg),
        out_dir=args.out, perf_analyzer=pa, minimal=args.minimal, unix=args.unix, rest=args.rest,
    )
    result = run(cfg, log=lambda m: print(m, file=sys.stderr))
    j, m = write(result, args.out)
    print(m.read_text())
    print(f"wrote {j} and {m}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
