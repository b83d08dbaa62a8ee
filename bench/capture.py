"""Field capture's cost and bounds (docs/field-loop.md), measured on real `mnist-edge serve` processes.

Each round starts three servers side by side: capture off, capture on with
`--capture-dir D --capture-below 0.9 --capture-sample 0.05 --capture-max-mb 1`, and capture
pointed at a regular file (unusable). Each image of the set (three times over) is sent to all
three in turn, the order rotating, one image per native Classify call (encoded, so the
original bytes are kept too): every variant sees the same moments of a noisy machine.
Reported per variant, medians over rounds: per-call latency (median and p90, client side),
the server's VmRSS after the calls, calls answered, and for the capture folder its size and
the PNG + JSON pairs in it.

    python -m mnist_edge.bench.capture --rounds 5
    python -m mnist_edge.bench.capture --pngs photos/   # your own PNG/JPEG files instead of typeset digits
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIGIT_STYLES = ((40, 0.0, 0), (32, 12.0, 2), (44, -10.0, 1))


def digit_png(digit: int, size: int = 40, angle: float = 0.0, stroke: int = 0, canvas: int = 64) -> bytes:
    """A typeset digit (Pillow's built-in font), dark ink on light paper, as a PNG: a style
    MNIST does not have, which the shipped model reads with low confidence more often."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    image = Image.new("L", (canvas, canvas), 235)
    draw = ImageDraw.Draw(image)
    draw.text((canvas / 2, canvas / 2), str(digit), fill=20, font=font, anchor="mm", stroke_width=stroke, stroke_fill=20)
    if angle:
        image = image.rotate(angle, fillcolor=235)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def digit_pngs() -> list[tuple[int, bytes]]:
    """30 PNGs, each digit in three styles, with its true label."""
    return [(d, digit_png(d, size, angle, stroke)) for size, angle, stroke in DIGIT_STYLES for d in range(10)]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(flags: list[str], tmp: Path) -> tuple[subprocess.Popen, str]:
    port_file = tmp / f"port-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "mnist_edge", "serve", "--address", "127.0.0.1:0", "--metrics-address", "", "--log-level", "warning",
           "--port-file", str(port_file), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 60
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > end:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.02)
    return proc, port_file.read_text().strip()


def run_round(variants: dict[str, list[str]], pngs: list[bytes], repeats: int, tmp: Path) -> dict[str, dict]:
    """Start one server per variant, then send each image to every server in turn (the order
    rotating per image), so all variants see the same moments of a noisy machine."""
    from mnist_edge.client.client import DigitClient

    procs: dict[str, subprocess.Popen] = {}
    clients: dict[str, DigitClient] = {}
    try:
        for name, flags in variants.items():
            procs[name], address = _start(flags, tmp)
            clients[name] = DigitClient(address, timeout=30)
        for client in clients.values():
            end = time.monotonic() + 60
            while client.health(timeout=2) != "SERVING":
                if time.monotonic() > end:
                    raise RuntimeError("server never SERVING")
                time.sleep(0.05)
            client.classify([pngs[0]])  # warm-up, not timed
        names = list(variants)
        latencies: dict[str, list[float]] = {n: [] for n in names}
        answered = dict.fromkeys(names, 0)
        k = 0
        for _ in range(repeats):
            for png in pngs:
                k += 1
                for name in names[k % len(names):] + names[: k % len(names)]:
                    t0 = time.perf_counter()
                    prediction = clients[name].classify([png])[0]
                    latencies[name].append(time.perf_counter() - t0)
                    answered[name] += 0 if prediction.error else 1
        time.sleep(0.5)  # the writers finish what is queued
        rss = {name: _rss_mb(proc.pid) for name, proc in procs.items()}
    finally:
        for client in clients.values():
            client.close()
        errors = {}
        for name, proc in procs.items():
            proc.terminate()
            try:
                errors[name] = proc.communicate(timeout=20)[1]
            except subprocess.TimeoutExpired:
                proc.kill()
                errors[name] = proc.communicate()[1]
    out = {}
    for name in names:
        lat = sorted(latencies[name])
        out[name] = {
            "calls": len(lat), "answered": answered[name], "rss_mb": rss[name],
            "p50_ms": 1e3 * statistics.median(lat), "p90_ms": 1e3 * lat[int(0.9 * (len(lat) - 1))],
            "warned_unusable": "capture_unusable" in errors[name],
        }
    return out


def folder_facts(d: Path) -> dict:
    if not d.is_dir():
        return {}
    pngs = {p.name[: -len(".png")] for p in d.glob("*/*.png") if ".orig." not in p.name}
    sidecars = [p for p in d.glob("*/*.json")]
    jsons = {p.name[: -len(".json")] for p in sidecars}
    complete = all({"digit", "probabilities", "model"} <= json.loads(p.read_text()).keys() and json.loads(p.read_text())["model"].get("version") for p in sidecars)
    return {"bytes": sum(p.stat().st_size for p in d.rglob("*") if p.is_file()), "pairs": len(pngs & jsons), "unpaired": len(pngs ^ jsons), "sidecars_complete": complete}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mnist_edge.bench.capture", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="times the PNG set is sent per server")
    ap.add_argument("--pngs", type=Path, help="a folder of image files to send (default: 30 typeset digits)")
    ap.add_argument("--out", type=Path, help="write the per-round figures here as JSON")
    args = ap.parse_args(argv)
    if args.pngs:
        pngs = [p.read_bytes() for p in sorted(args.pngs.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".pgm")]
    else:
        pngs = [png for _, png in digit_pngs()]
    rows: dict[str, list[dict]] = {"off": [], "on": [], "unusable": []}
    with tempfile.TemporaryDirectory(prefix="capture-bench-") as tmp_name:
        tmp = Path(tmp_name)
        blocker = tmp / "a-regular-file"
        blocker.write_text("not a folder")
        for r in range(args.rounds):
            variants = {
                "off": [],
                "on": ["--capture-dir", str(tmp / f"captures-{r}"), "--capture-below", "0.9", "--capture-sample", "0.05", "--capture-max-mb", "1"],
                "unusable": ["--capture-dir", str(blocker), "--capture-below", "0.9", "--capture-sample", "0.05", "--capture-max-mb", "1"],
            }
            results = run_round(variants, pngs, args.repeats, tmp)
            for name, row in results.items():
                if name == "on":
                    row.update(folder_facts(tmp / f"captures-{r}"))
                rows[name].append(row)
                print(f"round {r + 1} {name:8} " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"\n{len(pngs)} images x {args.repeats}, {args.rounds} rounds; medians over rounds")
    print(f"{'variant':10} {'p50 ms':>8} {'p90 ms':>8} {'RSS MB':>8} {'answered':>10}")
    for name, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("p50_ms", "p90_ms", "rss_mb")}
        answered = f"{sum(r['answered'] for r in rs)}/{sum(r['calls'] for r in rs)}"
        print(f"{name:10} {med['p50_ms']:8.2f} {med['p90_ms']:8.2f} {med['rss_mb']:8.1f} {answered:>10}")
    on = rows["on"]
    print(f"capture folder (on): max {max(r.get('bytes', 0) for r in on)} bytes, pairs {[r.get('pairs') for r in on]}, "
          f"unpaired {sum(r.get('unpaired', 0) for r in on)}, sidecars complete {all(r.get('sidecars_complete') for r in on)}")
    print(f"unusable path: warned at start in every round {all(r['warned_unusable'] for r in rows['unusable'])}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
