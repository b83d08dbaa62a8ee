"""Client-side balancing and failover: one DigitClient over two `mnist-edge serve` processes.

Load comes from a few threads (bounded in count and time, loopback only). Midway one server is
SIGKILLed (no drain: connections reset under calls in flight) and then started again on the
same port. What must hold: no call fails (every call returns predictions, the right digits for
its images), thanks to round-robin over both targets and gRPC's retry of UNAVAILABLE built into
client/client.py; and traffic returns to the restarted server, seen in its own ModelStatistics
success count (Open Inference Protocol), which starts at zero in the new process and grows.

The victim runs with --max-queue-delay-us, so each of its calls waits 50 ms (200 ms for the
large requests) in its batcher: the threads spend nearly all their time in calls on the victim
(a call on the other server takes ~2-10 ms), so the kill reliably lands on calls in flight
there, which is what the retry policy has to rescue.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time

import grpc
import numpy as np

from helpers.servers import REPO, health_status, start_cli_server, wait_for
from mnist_edge.client.client import DigitClient
from mnist_edge.protos.inference import grpc_service_pb2 as v2
from mnist_edge.protos.inference import grpc_service_pb2_grpc as v2_grpc

MAX_CALLS = 20_000  # hard bounds on the load, whatever happens
MAX_SECONDS = 60.0


def slow_flags(delay_ms: int) -> tuple[str, ...]:
    """Flags that make every call linger `delay_ms` in the victim's batcher (the batch never fills)."""
    return ("--max-queue-delay-us", str(delay_ms * 1000), "--max-batch-size", "2048")


def golden() -> tuple[np.ndarray, list[int]]:
    """The manifest's golden images (chosen with a large top-1 margin) and their digits."""
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    images = np.stack([np.frombuffer(base64.b64decode(g["pixels"]), np.uint8).reshape(28, 28) for g in manifest["golden"]])
    return images, [int(g["digit"]) for g in manifest["golden"]]


def successes(address: str) -> int:
    """The server's own count of successful inference requests (ModelStatistics)."""
    with grpc.insecure_channel(address) as ch:
        stats = v2_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(v2.ModelStatisticsRequest(name="mnist"), timeout=5)
    return stats.model_stats[0].inference_stats.success.count


class Load:
    """Threads calling classify with `sizes` golden images each, until stopped or bounded."""

    def __init__(self, client: DigitClient, threads: int, sizes: tuple[int, int]) -> None:
        self.client = client
        self.sizes = sizes
        self.images, self.digits = golden()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0
        self.in_flight = 0
        self.failures: list[str] = []
        self.deadline = time.monotonic() + MAX_SECONDS
        self.threads = [threading.Thread(target=self._run, args=(seed,), daemon=True) for seed in range(threads)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.calls >= MAX_CALLS:
                    return
                self.calls += 1
                self.in_flight += 1
            picks = [rng.randrange(len(self.digits)) for _ in range(rng.randint(*self.sizes))]
            try:
                predictions = self.client.classify(list(self.images[picks]), timeout=10)
                got = [p.digit for p in predictions]
                if got != [self.digits[i] for i in picks]:
                    self.failures.append(f"wrong answer: {got} for {[self.digits[i] for i in picks]}")
            except Exception as exc:  # noqa: BLE001 - every failure is recorded and fails the test
                self.failures.append(f"{type(exc).__name__}: {exc}")
            finally:
                with self.lock:
                    self.in_flight -= 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def count(self) -> int:
        with self.lock:
            return self.calls


def failover(tmp_path, *, threads: int, sizes: tuple[int, int], restart: bool, delay_ms: int = 50, options=()) -> Load:
    servers = []
    try:
        for extra in ((), slow_flags(delay_ms)):
            proc, address = start_cli_server(tmp_path, "--log-level", "warning", *extra)
            servers.append([proc, address])
        for _, address in servers:
            wait_for(lambda a=address: health_status(a) == "SERVING", timeout=60)
        (_, fast), (victim, slow) = servers

        with DigitClient([fast, slow], timeout=10, options=list(options)) as client, Load(client, threads, sizes) as load:
            # Round-robin: both replicas take traffic.
            wait_for(lambda: successes(fast) >= 10 and successes(slow) >= 10, timeout=30)

            with load.lock:
                in_flight = load.in_flight
            victim.kill()  # SIGKILL: no drain; connections and the calls in flight on them reset
            victim.wait(timeout=10)
            assert in_flight > 0, "no call was in flight when the replica died"
            killed_at = load.count()
            wait_for(lambda: load.count() >= killed_at + 50, timeout=30)  # the load goes on, on one replica

            if restart:
                restarted, address = start_cli_server(tmp_path, "--address", slow, "--log-level", "warning", *slow_flags(delay_ms))
                servers[1][0] = restarted
                assert address == slow
                wait_for(lambda: health_status(slow) == "SERVING", timeout=60)
                before = successes(slow)
                assert before < 10, "a new process: its counters start from zero"
                # The client reconnects (subchannel backoff) and round-robin sends it traffic again.
                wait_for(lambda: successes(slow) >= before + 50, timeout=40, interval=0.2)
        assert load.calls < MAX_CALLS, "the load ran out of its call budget before the checks were done"
        return load
    finally:
        for proc, _ in servers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except Exception:  # noqa: BLE001 - last resort in a teardown
                    proc.kill()


def test_no_call_fails_when_a_replica_is_killed_and_traffic_returns_after_restart(tmp_path):
    load = failover(tmp_path, threads=4, sizes=(16, 64), restart=True)
    assert load.failures == [], f"{len(load.failures)} of {load.calls} calls failed, e.g. {load.failures[:5]}"


# Requests larger than gRPC's per-call retry buffer (grpc.per_rpc_retry_buffer_size, 256 KiB by
# default: about 330 raw images) are committed once sent, so gRPC cannot replay them on another
# replica when theirs dies. DigitClient raises that buffer to its message limit. 400 raw images = 313 KiB.
LARGE = (400, 400)


def test_large_requests_survive_a_killed_replica(tmp_path):
    load = failover(tmp_path, threads=3, sizes=LARGE, restart=False, delay_ms=200)
    assert load.failures == [], f"{len(load.failures)} of {load.calls} calls failed, e.g. {load.failures[:2]}"
