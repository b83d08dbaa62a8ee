"""Compare versions or settings of mnist-edge, interleaved, against the floor in the same run.

Each variant is NAME=REV followed by server flags: REV is a git revision (checked out into a
temporary worktree, removed afterwards) or "." for the working tree as it is. Every round
starts the transport floor, then each variant in turn (which one goes first rotates), pinned
to CPU 0 with the load generator on CPU 1 (as `mnist-edge bench` does), and drives each with
the same closed loop at every concurrency level. The table gives medians over rounds, each
variant's median per-round ratio to the floor, and its median per-round ratio to the first
variant: on this noisy machine, a difference no larger than the spread between rounds is
not a difference.

    python -m mnist_edge.bench.ab --rounds 5 --seconds 2 "before=HEAD~1" "after=."
    python -m mnist_edge.bench.ab "four=. --handler-threads 4" "sixteen=. --handler-threads 16"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLOOR = "floor"


@dataclass
class Variant:
    name: str
    rev: str
    args: list[str]
    cwd: Path | None = None  # the worktree holding `rev`; None for the working tree


def parse_variant(text: str) -> Variant:
    words = shlex.split(text)
    if not words or "=" not in words[0]:
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=REV [server flags...], e.g. 'before=HEAD~1' or 'wide=. --handler-threads 16'")
    name, rev = words[0].split("=", 1)
    if not name or not rev or name == FLOOR:
        raise argparse.ArgumentTypeError(f"variant {text!r}: NAME and REV must not be empty, and NAME must not be {FLOOR!r}")
    return Variant(name, rev, words[1:])


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive whole numbers separated by commas, e.g. 1,4,64")
    return levels


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def resolve(variants: list[Variant]) -> dict[str, str]:
    """Each revision other than "." -> its commit; ValueError naming the variant if one is not."""
    commits: dict[str, str] = {}
    for v in variants:
        if v.rev == "." or v.rev in commits:
            continue
        try:
            commits[v.rev] = _git("rev-parse", "--verify", "--quiet", f"{v.rev}^{{commit}}")
        except (subprocess.CalledProcessError, FileNotFoundError):
            raise ValueError(f"variant {v.name!r}: {v.rev!r} is not a commit of the git repository here "
                             "(run from inside the repository, or use '.' for the working tree)") from None
    return commits


def checkout(variants: list[Variant], commits: dict[str, str], tmp: Path) -> list[Path]:
    """A detached worktree per distinct revision other than "."; returns them for removal."""
    made: dict[str, Path] = {}
    try:
        for v in variants:
            if v.rev == ".":
                continue
            if v.rev not in made:
                path = tmp / f"rev-{commits[v.rev][:12]}"
                _git("worktree", "add", "--detach", str(path), commits[v.rev])
                made[v.rev] = path
            v.cwd = made[v.rev]
    except BaseException:
        remove(list(made.values()))
        raise
    return list(made.values())


def remove(trees: list[Path]) -> None:
    for tree in trees:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], check=False, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    from mnist_edge.bench import loadgen
    from mnist_edge.bench import run as br

    p = argparse.ArgumentParser(prog="python -m mnist_edge.bench.ab", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("variants", nargs="+", type=parse_variant, metavar="NAME=REV [FLAGS...]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="length of each measurement")
    p.add_argument("--max-requests", type=int, default=40000, help="cap on requests per measurement")
    p.add_argument("--concurrency", type=parse_levels, default="1,64", help="closed-loop callers, e.g. 1,4,64")
    p.add_argument("--images", type=int, default=1, help="images per request")
    p.add_argument("--api", choices=("v2", "native"), default="v2", help="v2: ModelInfer; native: the native API's unary Classify (raw pixels)")
    p.add_argument("--out", type=Path, default=Path("reports/ab"))
    args = p.parse_args(argv)
    names = [v.name for v in args.variants]
    if len(set(names)) != len(names):
        p.error(f"variant names must differ, got {names}")
    try:
        commits = resolve(args.variants)
    except ValueError as exc:
        p.error(str(exc))
    levels = args.concurrency
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    loadgen.pin_to(br.LOADGEN_CPU)
    cfg = br.BenchConfig(seconds=args.seconds, max_requests=args.max_requests)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 28, 28), dtype=np.uint8)
    payload, api_method = (br.infer_payload(images), br.INFER) if args.api == "v2" else (br.classify_payload(images), br.CLASSIFY)
    rows: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mnist-edge-ab-") as tmp:
        trees = checkout(args.variants, commits, Path(tmp))
        try:
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
                # The floor opens each round (every ratio is to the floor of its own round); the
                # variants take turns going first, so none is always measured right after it.
                turn = args.variants[r % len(args.variants):] + args.variants[: r % len(args.variants)]
                servers = [(FLOOR, br.floor_cmd(), None)] + [(v.name, br.server_cmd(cfg) + v.args, v.cwd) for v in turn]
                for name, cmd, cwd in servers:
                    proc = br.start(cmd, out / f"{name}.port", cwd=cwd)
                    try:
                        if name != FLOOR:
                            br.wait_serving(proc.address)
                        method = "/bench.Echo/Echo" if name == FLOOR else api_method
                        for c in levels:
                            rows.setdefault((name, c), []).append(br.measure(proc, method, payload, c, cfg, False, args.images, name != FLOOR))
                    finally:
                        proc.stop()
        finally:
            remove(trees)
    text = report(args, argv if argv is not None else sys.argv[1:], levels, rows)
    (out / "ab.md").write_text(text)
    (out / "ab.json").write_text(json.dumps({f"{name} c={c}": got for (name, c), got in rows.items()}, indent=1))
    print(text)
    return 0


def report(args, argv: list[str], levels: list[int], rows: dict[tuple[str, int], list[dict]]) -> str:
    from mnist_edge.bench.run import median_of, median_ratio

    first = args.variants[0].name
    lines = [f"`python -m mnist_edge.bench.ab {' '.join(shlex.quote(a) for a in argv)}`", "",
             f"{args.rounds} interleaved rounds, {'ModelInfer' if args.api == 'v2' else 'native Classify'}, {args.images} image(s) per request; medians over rounds; ratios are medians of per-round ratios.", ""]
    for v in args.variants:
        lines.append(f"- {v.name}: {'the working tree' if v.rev == '.' else 'revision ' + v.rev}{' with ' + ' '.join(v.args) if v.args else ''}")
    for c in levels:
        floor = rows[(FLOOR, c)]
        base = rows[(first, c)]
        lines += ["", f"c={c}", "",
                  f"| server | p50 us | p99 us | req/s | server CPU us/req | mean batch | loadgen CPU | p50 / floor | req/s / floor | p99 / floor | p50 / {first} | req/s / {first} | errors |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name in [FLOOR] + [v.name for v in args.variants]:
            got = rows[(name, c)]
            batches = [x["mean_batch_size"] for x in got if x.get("mean_batch_size")]
            batch = f"{statistics.median(batches):.2f}" if batches else "-"
            vs_first = "- | -" if name == FLOOR else f"{median_ratio(got, base, 'p50_us'):.2f} | {median_ratio(got, base, 'throughput_rps'):.2f}"
            lines.append(
                f"| {name} | {median_of(got, 'p50_us'):.0f} | {median_of(got, 'p99_us'):.0f} | {median_of(got, 'throughput_rps'):,.0f} | "
                f"{median_of(got, 'server_cpu_us_per_request'):.0f} | {batch} | {median_of(got, 'loadgen_cpu_fraction'):.0%} | "
                f"{median_ratio(got, floor, 'p50_us'):.2f} | {median_ratio(got, floor, 'throughput_rps'):.2f} | {median_ratio(got, floor, 'p99_us'):.2f} | "
                f"{vs_first} | {sum(x['errors'] for x in got)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
