"""`mnist-edge bench` end to end at a tiny size: it runs, and its report holds every figure.

No speed is asserted here (docs/design.md: speed lives in bench/, never in timed tests); this
proves the benchmark itself works: floors and servers start and stop, every point has a
floor and a server measurement, the targets are all evaluated, and the Markdown renders.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


def test_bench_runs_small_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge", "bench", "--rounds", "1", "--seconds", "0.2", "--max-requests", "60",
         "--concurrency", "1,4", "--payloads", "1,64", "--cold-starts", "1", "--out", str(out), "--perf-analyzer", "none"],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rest = {f"rest-{kind}-1 c={c}" for kind in ("binary", "json") for c in (1, 4)}  # REST: the lowest and highest concurrency
    assert set(result["points"]) == {"unary-1 c=1", "unary-1 c=4", "unary-64 c=1", "unary-64 c=4", "stream-1 c=1", "stream-1 c=4"} | rest
    for key, point in result["points"].items():
        assert len(point["rounds"]["floor"]) == 1 and len(point["rounds"]["server"]) == 1, key
        assert point["errors"] == 0, (key, point["rounds"])
        for field in ("ratio_p50_us", "ratio_p99_us", "ratio_throughput_rps", "server_server_cpu_us_per_request"):
            assert point[field] is not None and math.isfinite(point[field]) and point[field] > 0, (key, field)
        if key.startswith("unary-1 "):
            assert point["minimal_ratio_p50_us"] > 0  # the reference servicer was measured too
            assert point["unix_vs_tcp_p50_us"] > 0 and point["unix_ratio_throughput_rps"] > 0  # and the unix socket
        if key.startswith(("unary", "rest")):
            assert point["mean_batch_size"] >= 1
    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == 10
    measured = [name for name in targets if name.startswith(("unary 1 image c=1:", "stream", "cold start", "REST"))]
    assert len(measured) == 5 and all(targets[name]["value"] is not None for name in measured), targets
    assert result["peak_rss_mb"]["server_http_on"] > 0
    assert all(targets[name]["value"] is None and not targets[name]["met"] for name in targets if "c=64" in name)  # not measured: not met
    assert result["cold_start"]["median_s"] > 0 and result["compute_floor"]["batch_1_us"] > 0
    md = (out / "bench.md").read_text()
    assert "## Targets" in md and "| unary-64 c=4 |" in md and "minimal servicer" in md and "unix: socket" in md


def test_anatomy_runs_small_and_reports_every_stage(tmp_path):
    """`python -m mnist_edge.bench.anatomy`: every stage server starts, answers, and lands in the table."""
    out = tmp_path / "anatomy"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge.bench.anatomy", "--rounds", "1", "--seconds", "0.2", "--concurrency", "1,4", "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "anatomy.md").read_text()
    for stage in ("floor", "transport", "model", "protobuf", "handler", "server"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {stage} |")]
        assert len(rows) == 2 and all(row.endswith("| 0 |") for row in rows), rows  # one per level, no errors
    assert "model call inside the server:" in text and "tight loop" in text and "after 300 us idle" in text and "after writing 4 MB" in text


def test_ab_compares_a_revision_with_the_working_tree_and_cleans_up(tmp_path):
    """`python -m mnist_edge.bench.ab`: a git revision runs from a temporary worktree (removed afterwards),
    "." from the working tree with its own flags, both against the floor, every row filled."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("needs the git repository (bench.ab checks revisions out of it)")
    before = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True, check=True).stdout
    out = tmp_path / "ab"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge.bench.ab", "--rounds", "2", "--seconds", "0.2", "--max-requests", "60", "--concurrency", "1,4",
         "--out", str(out), "head=HEAD", "narrow=. --handler-threads 2"],
        capture_output=True, text=True, timeout=600, check=False, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "ab.md").read_text()
    assert "- head: revision HEAD" in text and "- narrow: the working tree with --handler-threads 2" in text
    for name in ("floor", "head", "narrow"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 2 and all(row.endswith("| 0 |") for row in rows), rows  # one per level, no errors
    rounds = json.loads((out / "ab.json").read_text())
    assert {len(v) for v in rounds.values()} == {2} and len(rounds) == 6
    after = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert after == before  # the temporary worktree is gone


def test_ab_drives_the_native_classify_with_api_native(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "ab"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge.bench.ab", "--rounds", "1", "--seconds", "0.2", "--max-requests", "60", "--concurrency", "1",
         "--api", "native", "--images", "2", "--out", str(out), "lane=.", "pool=. --no-infer-lane"],
        capture_output=True, text=True, timeout=600, check=False, cwd=root,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "ab.md").read_text()
    assert "native Classify, 2 image(s) per request" in text
    for name in ("floor", "lane", "pool"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {name} |")]
        assert len(rows) == 1 and rows[0].endswith("| 0 |"), rows


def test_ab_refuses_a_malformed_variant_and_an_unknown_revision_before_starting_anything():
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "mnist_edge.bench.ab", "no-revision-here"], capture_output=True, text=True, timeout=60, check=False, cwd=root)
    assert proc.returncode == 2 and "expected NAME=REV [server flags...]" in proc.stderr
    if (root / ".git").exists():
        proc = subprocess.run([sys.executable, "-m", "mnist_edge.bench.ab", "x=no-such-revision"], capture_output=True, text=True, timeout=60, check=False, cwd=root)
        assert proc.returncode == 2 and "variant 'x': 'no-such-revision' is not a commit" in proc.stderr, proc.stderr[-2000:]
