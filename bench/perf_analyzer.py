"""Where Triton's perf_analyzer is, and the environment it needs to start.

perf_analyzer ships inside the `tritonclient[grpc]==2.41.0` wheel (so it lives in
`.venv-triton` here). It is linked against libcudart.so.12 even for CPU-only use: pip's
`nvidia-cuda-runtime-cu12` provides that library inside the same environment, and
Debian's `libb64-0d` provides libb64.so.0d. No GPU is needed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP = (
    "apt-get install -y libb64-0d && python3 -m venv .venv-triton && "
    ".venv-triton/bin/pip install 'tritonclient[grpc,http]==2.41.0' 'nvidia-cuda-runtime-cu12==12.9.79'"
)


def find(explicit: str | None = None) -> Path | None:
    """An explicit path, MNIST_EDGE_PERF_ANALYZER, perf_analyzer on PATH, or <repo>/.venv-triton/bin."""
    for candidate in (explicit, os.environ.get("MNIST_EDGE_PERF_ANALYZER"), shutil.which("perf_analyzer"),
                      str(REPO / ".venv-triton" / "bin" / "perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def environment(binary: Path) -> dict[str, str]:
    """os.environ plus LD_LIBRARY_PATH entries for the CUDA runtime pip installed next to `binary`."""
    env = dict(os.environ)
    venv = binary.resolve().parent.parent
    libs = sorted(str(p) for p in venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib") if p.is_dir())
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    return env


def command(binary: Path, address: str, concurrency: int, requests: int, model: str = "mnist", stability_percent: int = 10, max_trials: int = 10,
            protocol: str = "grpc") -> list[str]:
    """One count-bounded measurement: `requests` per window, at most `max_trials` windows, stable
    when the last three windows' throughput and average latency are within `stability_percent`
    (this machine's noise keeps p99 from ever settling, so stability is judged on the average).
    `protocol`: "grpc", or "http" against the REST port (--http-address)."""
    return [
        str(binary), "-m", model, "-i", protocol, "-u", address, "--shape", "pixels:28,28", "-b", "1",
        "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
        "--measurement-request-count", str(requests), "--stability-percentage", str(stability_percent),
        "--max-trials", str(max_trials),
    ]
