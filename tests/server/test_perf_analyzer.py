"""Triton's perf_analyzer (a load tool nobody here wrote) against a real server.

A short, count-bounded run: perf_analyzer queries the model's metadata and config, sends
its own synthetic UINT8 [1,28,28] requests at two concurrency levels, and must finish with
a measurement; the server's own statistics must show those requests. No timing is
asserted: speed lives in `mnist-edge bench`.
"""

from __future__ import annotations

import os
import re
import subprocess

import grpc
import pytest

from helpers.servers import running_server
from mnist_edge.bench import perf_analyzer as pa
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

REQUESTS = 200


def _binary():
    found = pa.find()
    if found is None:
        message = f"perf_analyzer not found: set MNIST_EDGE_PERF_ANALYZER or, from the repository root, run: {pa.SETUP}"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no") or os.environ.get("MNIST_EDGE_PERF_ANALYZER"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _inference_count(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        stats = pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(pb.ModelStatisticsRequest(name="mnist"), timeout=10)
    return stats.model_stats[0].inference_count


@pytest.mark.parametrize("concurrency", [1, 4])
def test_perf_analyzer_measures_against_the_server(concurrency):
    binary = _binary()
    with running_server() as app:
        before = _inference_count(app.address)
        proc = subprocess.run(
            # Stability is not what this test is about: any three windows will do.
            pa.command(binary, app.address, concurrency, REQUESTS, stability_percent=1000, max_trials=5),
            capture_output=True, text=True, timeout=240, env=pa.environment(binary), check=False,
        )
        after = _inference_count(app.address)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"perf_analyzer exited {proc.returncode}:\n{out[-3000:]}"
    m = re.search(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec", proc.stdout)
    assert m, f"no measurement line in perf_analyzer's output:\n{out[-3000:]}"
    assert int(m.group(1)) == concurrency
    assert float(m.group(2)) > 0 and int(m.group(3)) > 0
    # Every request perf_analyzer counted reached the model (it sends at least one window).
    assert after - before >= REQUESTS
    # perf_analyzer read the server-side breakdown from ModelStatistics (Triton's statistics extension).
    assert re.search(r"Server:\s*\n\s*Inference count: \d+", proc.stdout), proc.stdout[-3000:]
