"""Per-model counters, in Triton's terms, shared by ModelStatistics and the metrics endpoint.

A successful request and an executed batch are appended to a queue, without a lock (the
hot path); failures are counted at once. Readers take `locked()`, which folds the queue into
the counters first, so every reading is complete and consistent. Durations are
nanoseconds, as Triton reports them.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchDurations:
    count: int = 0
    compute_infer_ns: int = 0


# Buckets for histograms (seconds / images), fixed so that workers can be summed.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class Histogram:
    buckets: tuple = LATENCY_BUCKETS
    counts: list = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: the first bucket whose upper bound is >= value (Prometheus' "le").
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class SuccessRecord(NamedTuple):
    """A successful model-level request, waiting in the queue to be folded into the counters."""

    api: str
    total_ns: int
    input_ns: int  # reading and decoding the request
    output_ns: int  # encoding the response
    queue_ns: int
    infer_ns: int


class BatchRecord(NamedTuple):
    """An executed batch, waiting in the queue to be folded into the counters."""

    size: int  # images
    compute_seconds: float
    wall_ms: int  # when it ended, milliseconds since the epoch


_FOLD_AT = 4096  # records queued before a writer folds them itself (bounds the memory)


class Statistics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: collections.deque[SuccessRecord | BatchRecord] = collections.deque()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0  # images
        self.execution_count = 0  # batches
        self.last_inference_ms = 0
        self.batches: dict[int, BatchDurations] = {}
        self.requests_by: dict[tuple[str, str], int] = {}  # (api, status) -> count
        self.queue_hist = Histogram(LATENCY_BUCKETS)
        self.compute_hist = Histogram(LATENCY_BUCKETS)
        self.request_hist = Histogram(LATENCY_BUCKETS)
        self.batch_hist = Histogram(BATCH_BUCKETS)

    def record_request(
        self,
        api: str,
        status: str,
        total_ns: int,
        input_ns: int = 0,
        output_ns: int = 0,
        model_level: bool = True,
        queue_ns: int = 0,
        infer_ns: int = 0,
    ) -> None:
        """One request, recorded whole when it ends (as Triton does), so that success, queue and
        compute input/infer/output always have the same count: perf_analyzer insists on it.

        `model_level=False`: a request that was not for this model (unknown name or version):
        counted by API and status, but not in the model's success/fail statistics."""
        if status == "OK" and model_level:
            self.record_ok(api, total_ns, input_ns, output_ns, queue_ns, infer_ns)
            return
        with self.lock:
            key = (api, status)
            self.requests_by[key] = self.requests_by.get(key, 0) + 1
            if model_level:
                self.request_hist.observe(total_ns / 1e9)
                self.fail.add(total_ns)

    def record_ok(self, api: str, total_ns: int, input_ns: int, output_ns: int, queue_ns: int, infer_ns: int) -> None:
        """A successful model-level request: queued for the next `locked()` (deque appends are
        thread-safe), so the call path takes no lock and does no arithmetic."""
        self._enqueue(SuccessRecord(api, total_ns, input_ns, output_ns, queue_ns, infer_ns))

    def _enqueue(self, record: SuccessRecord | BatchRecord) -> None:
        self._pending.append(record)
        if len(self._pending) > _FOLD_AT:  # nobody has read for a while: fold here, bounding the queue
            with self.locked():
                pass

    @contextlib.contextmanager
    def locked(self):
        """Hold the lock with every queued record folded into the counters: for readers."""
        with self.lock:
            self._fold()
            yield self

    def _fold(self) -> None:
        """Under the lock: move every queued record into the counters (off the call path)."""
        pending = self._pending
        while True:
            try:
                rec = pending.popleft()
            except IndexError:
                return
            if type(rec) is BatchRecord:
                self.execution_count += 1
                self.inference_count += rec.size
                self.last_inference_ms = max(self.last_inference_ms, rec.wall_ms)
                self.compute_hist.observe(rec.compute_seconds)
                self.batch_hist.observe(rec.size)
                b = self.batches.get(rec.size)
                if b is None:
                    b = self.batches[rec.size] = BatchDurations()
                b.count += 1
                b.compute_infer_ns += int(rec.compute_seconds * 1e9)
                continue
            key = (rec.api, "OK")
            self.requests_by[key] = self.requests_by.get(key, 0) + 1
            self.request_hist.observe(rec.total_ns / 1e9)
            self.queue_hist.observe(rec.queue_ns / 1e9)
            self.success.add(rec.total_ns)
            self.queue.add(rec.queue_ns)
            self.compute_input.add(rec.input_ns)
            self.compute_infer.add(rec.infer_ns)
            self.compute_output.add(rec.output_ns)

    def record_batch(self, size: int, compute_seconds: float) -> None:
        """An executed batch: queued like `record_ok`."""
        self._enqueue(BatchRecord(size, compute_seconds, int(time.time() * 1000)))
