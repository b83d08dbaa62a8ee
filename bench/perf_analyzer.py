"""Where Triton's perf_analyzer is, and the environment it needs to start.

perf_analyzer ships inside the `tritonclient[grpc]==2.41.0` wheel (so it lives in
`.venv-triton` here). It is linked against libcudart.so.12 even for CPU-only use: pip's
`nvidia-cuda-runtime-cu12` provides that library inside the same environment, and
Debian's `libb64-0d` provides libb64.so.0d. No GPU is needed.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
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


@functools.cache
def input_data() -> Path:
    """perf_analyzer's --input-data: one request with `pixels` only (a stroke, UINT8 28x28).

    The model lists two inputs, `pixels` and the BYTES `image`, both optional, and a request
    sends one of them. Given no data, perf_analyzer makes random data for every input it is
    told of, `image` included, and the server refuses a request carrying both; given this
    file it sends `pixels` alone."""
    pixels = [0] * 784
    for row in range(6, 22):
        pixels[row * 28 + 13] = pixels[row * 28 + 14] = 255
    path = Path(tempfile.mkdtemp(prefix="mnist-edge-pa-")) / "pixels.json"
    path.write_text(json.dumps({"data": [{"pixels": {"content": pixels, "shape": [28, 28]}}]}))
    return path


def command(binary: Path, address: str, concurrency: int, requests: int, model: str = "mnist", stability_percent: int = 10, max_trials: int = 10,
            protocol: str = "grpc") -> list[str]:
    """One count-bounded measurement: `requests` per window, at most `max_trials` windows, stable
    when the last three windows' throughput and average latency are within `stability_percent`
    (this machine's noise keeps p99 from ever settling, so stability is judged on the average).
    `protocol`: "grpc", or "http" against the REST port (--http-address)."""
    return [
        str(binary), "-m", model, "-i", protocol, "-u", address, "--input-data", str(input_data()), "-b", "1",
        "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
        "--measurement-request-count", str(requests), "--stability-percentage", str(stability_percent),
        "--max-trials", str(max_trials),
    ]
