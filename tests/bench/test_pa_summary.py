"""Reading perf_analyzer's output: a measurement, and its own "no stable measurement" verdict."""

from __future__ import annotations

from mnist_edge.bench.run import _pa_summary

STABLE = """Request concurrency: 1
  Client:
    p50 latency: 530 usec
    p99 latency: 1377 usec
  Server:
    Avg request latency: 220 usec (overhead 0 usec + queue 97 usec + compute input 57 usec + compute infer 100 usec + compute output 30 usec)

Inferences/Second vs. Client Average Batch Latency
Concurrency: 1, throughput: 1670.25 infer/sec, latency 597 usec
"""

UNSTABLE = """Request concurrency: 64
Failed to obtain stable measurement within 10 measurement windows for concurrency 64. Please try to increase the --measurement-request-count.
Failed to obtain stable measurement.
"""


def test_a_measurement_is_read_with_the_servers_breakdown():
    s = _pa_summary(STABLE)
    assert (s["throughput"], s["p50_us"], s["p99_us"]) == (1670.25, 530.0, 1377.0)
    assert s["server_breakdown_us"]["compute_infer"] == 100
    assert "unstable" not in s


def test_perf_analyzers_no_stable_measurement_is_reported_as_such():
    s = _pa_summary(UNSTABLE)
    assert s["unstable"] is True and "throughput" not in s
