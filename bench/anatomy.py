"""Where a one-image request's server time goes: the floor, then mnist-edge's transport with
one piece of the work added at a time, then mnist-edge itself, interleaved like `mnist-edge bench`.

Stages (each a server of its own, pinned to CPU 0; the load generator on CPU 1):
  floor     bench/floor.py: stock 64-thread pool, echo with identity serializers
  transport mnist-edge's handler pool (server/threads.py, 4 threads), a fixed response, no parsing
  model     + the model call on one image (fixed pixels), timed in the server; at start the
            same process times the call in a tight loop, after 300 us idle and after
            writing 4 MB, so the log compares a call made between network work with one made
            right after another and with the two likeliest reasons for the difference
  protobuf  + parsing the request with protobuf and writing the response from the model's output
  handler   mnist-edge's own ModelInfer (validation, batcher, statistics) on that same bare server
  server    `mnist-edge serve` with its defaults (every service, health, reflection, metrics)

Every stage gets a fresh server for each concurrency level, so in-server timings are per level.

    python -m mnist_edge.bench.anatomy --rounds 5 --seconds 1 --concurrency 1,64
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

STAGES = ("transport", "model", "protobuf", "handler")
METHOD = "/inference.GRPCInferenceService/ModelInfer"


def call_after(runner, pixels: np.ndarray, rounds: int = 1000) -> dict[str, float]:
    """Median microseconds of one model call made right after another ("tight"), after the core
    sat idle for 300 us ("idle", about the gap between two requests at c=1), and after 4 MB of
    memory were written ("memory": the caches refilled with other data); interleaved, so drift
    hits all three alike."""
    clock = time.perf_counter_ns
    scratch = np.zeros(4 * 1024 * 1024, dtype=np.uint8)
    before = {"tight": lambda: None, "idle": lambda: time.sleep(300e-6), "memory": lambda: scratch.fill(1)}
    after: dict[str, list[int]] = {name: [] for name in before}
    for _ in range(rounds):
        for name, prepare in before.items():
            prepare()
            t0 = clock()
            runner.run(pixels)
            after[name].append(clock() - t0)
    return {name: statistics.median(ns) / 1e3 for name, ns in after.items()}


def serve(argv: list[str]) -> int:
    import grpc

    from mnist_edge.bench.floor import serve_until_signal
    from mnist_edge.protos.inference import grpc_service_pb2 as pb
    from mnist_edge.server import model_store
    from mnist_edge.server.threads import LifoThreadPool
    from mnist_edge.server.v2 import encode_infer_bytes

    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.anatomy serve")
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--model", default=None, help="models directory (default: the shipped model)")
    p.add_argument("--address", default="127.0.0.1:0")
    p.add_argument("--port-file")
    args = p.parse_args(argv)
    runner = model_store.load(args.model).runner
    runner.warm_up()
    fixed = np.zeros((1, 28, 28), dtype=np.uint8)
    probs, digits = runner.run(fixed)
    canned = encode_infer_bytes("mnist", "1", "", probs, digits)
    timings = [0, 0]  # calls, ns in the model call
    clock = time.perf_counter_ns
    loop_us = call_after(runner, fixed) if args.stage == "model" else {}

    def transport(request: bytes, context) -> bytes:
        return canned

    def model(request: bytes, context) -> bytes:
        t0 = clock()
        runner.run(fixed)
        timings[1] += clock() - t0
        timings[0] += 1
        return canned

    def protobuf(request, context) -> bytes:
        n = request.inputs[0].shape[0]
        pixels = np.frombuffer(request.raw_input_contents[0], dtype=np.uint8).reshape(n, 28, 28)
        probs, digits = runner.run(pixels)
        return encode_infer_bytes(request.model_name, "1", request.id, probs, digits)

    if args.stage == "handler":
        from mnist_edge.server.core import Core, State
        from mnist_edge.server.settings import Settings
        from mnist_edge.server.v2 import InferenceServicer, model_infer_handler

        core = Core(Settings())
        core.set_model(model_store.load(args.model))
        core.set_state(State.SERVING)
        handler = model_infer_handler(InferenceServicer(core, "anatomy"))
    else:
        fn = {"transport": transport, "model": model, "protobuf": protobuf}[args.stage]
        deserializer = pb.ModelInferRequest.FromString if args.stage == "protobuf" else None
        handler = grpc.unary_unary_rpc_method_handler(fn, request_deserializer=deserializer)
    server = grpc.server(LifoThreadPool(4), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),))
    port = server.add_insecure_port(args.address)
    code = serve_until_signal(server, f"{args.address.rsplit(':', 1)[0]}:{port}", args.port_file)
    if timings[0]:
        n = timings[0]
        print(f"model call inside the server: {timings[1] / n / 1e3:.1f} us on average ({n} requests); "
              f"the same call in a tight loop in this process: {loop_us['tight']:.1f} us (median); "
              f"after 300 us idle: {loop_us['idle']:.1f} us; after writing 4 MB: {loop_us['memory']:.1f} us", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    from mnist_edge.bench import loadgen
    from mnist_edge.bench import run as br

    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.anatomy", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--out", type=Path, default=Path("reports/anatomy"))
    p.add_argument("--model", default=None, help="models directory to serve in every stage (default: the shipped model)")
    args = p.parse_args(argv)
    loadgen.pin_to(br.LOADGEN_CPU)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = br.BenchConfig(seconds=args.seconds, max_requests=40000)
    payload = br.infer_payload(np.random.default_rng(0).integers(0, 256, (1, 28, 28), dtype=np.uint8))
    py = sys.executable
    servers = {
        "floor": br.floor_cmd(),
        **{s: [py, "-m", "mnist_edge.bench.anatomy", "serve", "--stage", s] + (["--model", args.model] if args.model else []) for s in STAGES},
        "server": br.server_cmd(cfg) + (["--model", args.model] if args.model else []),
    }
    levels = [int(c) for c in args.concurrency.split(",")]
    rows: dict[tuple[str, int], list[dict]] = {}
    model_log = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for c in levels:
            for name, cmd in servers.items():
                port_file = args.out / f"{name}.port"
                proc = br.start(cmd, port_file)
                try:
                    if name == "server":
                        br.wait_serving(proc.address)
                    method = "/bench.Echo/Echo" if name == "floor" else METHOD
                    rows.setdefault((name, c), []).append(br.measure(proc, method, payload, c, cfg, False, 1, False))
                finally:
                    proc.stop()
                if name == "model":
                    model_log.append(f"c={c}: " + port_file.with_suffix(".log").read_text().strip().splitlines()[-1])
    lines = [f"`python -m mnist_edge.bench.anatomy {' '.join(shlex.quote(a) for a in argv)}` ({args.rounds} interleaved rounds; medians of per-round ratios to the floor)", ""]
    for c in levels:
        lines += [f"c={c}", "", "| stage | p50 us | p50 / floor | req/s | req/s / floor | server CPU us/req | over the floor | errors |", "|---|---|---|---|---|---|---|---|"]
        floor = rows[("floor", c)]
        for name in servers:
            got = rows[(name, c)]
            over = statistics.median(x["server_cpu_us_per_request"] - f["server_cpu_us_per_request"] for x, f in zip(got, floor))
            lines.append(f"| {name} | {br.median_of(got, 'p50_us'):.0f} | {br.median_ratio(got, floor, 'p50_us'):.2f} | {br.median_of(got, 'throughput_rps'):,.0f} | "
                         f"{br.median_ratio(got, floor, 'throughput_rps'):.2f} | {br.median_of(got, 'server_cpu_us_per_request'):.0f} | {over:+.0f} | {sum(x['errors'] for x in got)} |")
        lines.append("")
    lines += ["In the `model` stage, per round and level:", ""] + [f"- {m}" for m in sorted(model_log, key=lambda m: int(m.split(":")[0][2:]))]
    text = "\n".join(lines) + "\n"
    (args.out / "anatomy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
