"""bench/footprint.py on small settings: the measurement machinery works end to end and reports
every figure; the server-only install fits the 200 MB goal (a size, not a timing: asserted).

Uses the wheelhouse the server-only install test uses (MNIST_EDGE_WHEELHOUSE or <repo>/wheelhouse,
built by scripts/test); nothing is fetched from an index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mnist_edge.bench import footprint

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

REPO = Path(__file__).resolve().parents[2]


def _wheelhouse() -> Path:
    configured = os.environ.get("MNIST_EDGE_WHEELHOUSE")
    path = Path(configured) if configured else REPO / "wheelhouse"
    if path.is_dir() and any(path.glob("mnist_edge-*.whl")):
        return path
    msg = f"no wheelhouse with the mnist-edge wheel at {path}: build it with `.venv/bin/python -m pip wheel --wheel-dir wheelhouse .`"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("footprint")
    cfg = footprint.FootprintConfig(
        out_dir=out, wheelhouse=_wheelhouse(), load_requests=40, load_max_images=8, load_concurrency=2,
        cold_starts=1, pinned_seconds=0.3, pinned_max_requests=200, pinned_concurrency=(1,), experiments=False,
    )
    r = footprint.run(cfg, log=lambda m: None)
    footprint.write(r, out)
    return r, out


def test_install_size_within_goal(result):
    r, _ = result
    size = r["install"]["size"]
    names = [p["name"] for p in size["packages"]]
    assert {"onnxruntime", "numpy", "grpcio", "mnist-edge"} <= set(names)
    assert not {"pip", "setuptools", "torch", "onnx"} & set(names), names
    assert sum(p["bytes"] for p in size["packages"]) == size["bytes"]
    assert [p["bytes"] for p in size["packages"]] == sorted((p["bytes"] for p in size["packages"]), reverse=True)
    assert size["mb"] <= footprint.GOALS["install_mb"], f"server-only install is {size['mb']:.1f} MB: {size['packages'][:5]}"


def test_memory_figures_are_measured(result):
    r, _ = result
    m = r["memory"]
    assert m["load"]["requests"] == 40 and not m["load"]["errors"]
    for who in ("worker", "baseline"):
        for when in ("idle", "loaded"):
            fig = m[who][when]
            assert fig["VmRSS"] > 10 and fig["VmHWM"] >= fig["VmRSS"] - 0.01, (who, when, fig)
    assert m["worker"]["exit_code"] == 0  # SIGTERM: clean shutdown
    assert set(m["worker_minus_baseline_mb"]) == {"idle_rss", "loaded_rss", "loaded_hwm"}


def test_cold_start_and_pinned_figures(result):
    r, _ = result
    cs = r["cold_start"]
    assert len(cs["runs_s"]) == 1 and cs["median_s"] > 0
    p = r["pinned"]["c=1"]
    assert p["requests"] > 0 and p["errors"] == 0 and p["p50_us"] > 0


def test_goals_and_reports_written(result):
    r, out = result
    assert [g["goal"].split(",")[0] for g in r["goals"]] == [
        "server-only install", "worker RSS loaded minus baseline loaded", "cold start to SERVING",
    ]
    data = json.loads((out / "footprint.json").read_text())
    assert data["install"]["size"]["bytes"] == r["install"]["size"]["bytes"]
    md = (out / "footprint.md").read_text()
    assert "## Goals" in md and "worker minus baseline" in md and "onnxruntime" in md
