"""Dynamic batching with no batching thread: the caller that finds the batcher idle runs.

Policy (docs/design.md "Processes and speed"):
- a request runs at once when the batcher is idle: the calling thread itself runs the
  model, so an unloaded server adds no thread hand-off to a call;
- requests that arrive while a batch runs wait in a FIFO queue; when the batch ends,
  the running thread hands the "leader" role to the oldest waiting request, whose
  thread takes every queued image up to `max_batch_size` and runs them as one batch;
- `max_queue_delay_us` is extra time a leader may wait for more requests to fill a
  batch (0 by default);
- a request larger than `max_batch_size` runs alone, never split;
- the queue is bounded in images (`max_queue`): a request that would overflow it is
  refused at once with RESOURCE_EXHAUSTED, without waiting;
- a request whose deadline passes (or whose caller cancels) while queued is dropped
  before compute, with DEADLINE_EXCEEDED (or CANCELLED).

The inference lane (server/lane.py) hands over several requests at once from one thread
(`infer_group`): they are cut into batches by the same rules, the queue limit counts the
whole group before any of it runs, and expired ones are dropped before their batch.

Each request keeps its own slot: results are cut from the batch output by offset and
handed to exactly the request that owns them. Knows nothing about gRPC.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from mnist_edge.server.errors import Cancelled, DeadlineExceeded, ResourceExhausted

RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class Result(NamedTuple):
    probabilities: np.ndarray
    digits: np.ndarray
    tag: object  # of the model that ran
    queue_s: float  # this request's wait in the queue
    compute_s: float  # the run of the batch that carried it


class GroupRequest(NamedTuple):
    """One request of a group handed over together (`Batcher.infer_group`)."""

    pixels: np.ndarray  # uint8 [N,28,28]
    deadline: float | None  # on the batcher's clock
    arrived: float  # on the batcher's clock: its queue time counts from here

_QUEUED, _LEADER, _RUNNING, _DONE = range(4)
_MAX_WAIT_S = 3600.0  # re-checked after this long; far below threading.TIMEOUT_MAX


class _Pending:
    __slots__ = ("pixels", "n", "deadline", "is_cancelled", "wake", "state", "result", "error", "enqueued")

    def __init__(self, pixels: np.ndarray, deadline: float | None, is_cancelled: Callable[[], bool] | None, now: float) -> None:
        self.pixels = pixels
        self.n = int(pixels.shape[0])
        self.deadline = deadline
        self.is_cancelled = is_cancelled
        # Made only when the request has to wait: a lock held until the request may go on (its
        # result is ready or it must lead). A plain lock is the cheapest wake-up Python has.
        self.wake: threading.Lock | None = None
        self.state = _QUEUED
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.enqueued = now


@dataclass
class BatchStats:
    """Counters the metrics layer reads; updated under the batcher's lock."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    rejected_full: int = 0
    expired: int = 0
    cancelled: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    batch_sizes: collections.Counter = field(default_factory=collections.Counter)

    @property
    def mean_batch_size(self) -> float:
        return self.images / self.batches if self.batches else 0.0


def _full(waiting: int, adding: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"server queue is full: {waiting} images waiting, this request adds {adding}, limit {limit} (--max-queue); retry later"
    )


class Batcher:
    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int = 256,
        max_queue: int = 4096,
        max_queue_delay_us: int = 0,
        clock: Callable[[], float] = time.monotonic,
        on_batch: Callable[[int, float], None] | None = None,  # (images, compute seconds) per executed batch
    ) -> None:
        self._run = run
        self._tag: object = None
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self._clock = clock
        self._lock = threading.Lock()
        self._arrival = threading.Condition(self._lock)
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_images = 0
        self._busy = False
        self.stats = BatchStats()
        self._on_batch = on_batch

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def set_runner(self, run: RunFn, tag: object = None) -> None:
        """Swap the model function; batches already running finish on the old one.

        `tag` (e.g. the model's version) comes back with every result computed by `run`.
        """
        self._run, self._tag = run, tag

    def infer(
        self,
        pixels: np.ndarray,
        deadline: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        *,
        requests: int = 1,
        gather: bool = True,
    ) -> Result:
        """Run `pixels` (uint8 [N,28,28]) through the model, batched with concurrent callers.

        `deadline` is on this batcher's clock (time.monotonic by default). `requests` is how
        many requests `pixels` carries, for the statistics; `gather=False` runs at once when
        idle even with a queue delay set (`infer_group`: its caller has gathered already).
        """
        n = int(pixels.shape[0])
        with self._lock:
            if self._queued_images + n > self.max_queue:
                self.stats.rejected_full += 1
                raise _full(self._queued_images, n, self.max_queue)
            self.stats.requests += requests
            if not self._busy and (self.max_queue_delay_s == 0 or not gather):
                # Idle: run at once, in this thread, with nothing queued behind us yet.
                self._busy = True
                p = None
            else:
                p = _Pending(pixels, deadline, is_cancelled, self._clock())
                self._queue.append(p)
                self._queued_images += n
                if self._busy:
                    p.wake = threading.Lock()
                    p.wake.acquire()
                    self._arrival.notify()
                    lead = False
                else:
                    self._busy = True
                    p.state = _LEADER
                    lead = True
        if p is None:
            return self._run_alone(pixels)
        if not lead:
            lead = self._wait(p)
        if lead:
            self._lead()
        if p.error is not None:
            raise p.error
        assert p.result is not None
        return p.result

    def infer_group(self, group: Sequence[GroupRequest], deliver: Callable[[int, Result | BaseException], None]) -> None:
        """Several requests that arrived together, from one thread (the inference lane).

        `deliver(i, result_or_error)` is called once per request (refusals first, then batch
        by batch) as soon as its answer is known. Requests are cut into consecutive batches of at most
        `max_batch_size` images (a larger request runs alone); what would overflow
        `max_queue` (counting this group's later batches as queued) is refused at once with
        RESOURCE_EXHAUSTED, before anything runs; a request whose deadline has passed when
        its batch is about to start is dropped with DEADLINE_EXCEEDED, never computed.
        """
        limit = self.max_batch_size
        batches: list[list[int]] = []
        refused: list[tuple[int, ResourceExhausted]] = []
        images = filled = 0  # this group's images accepted, and those in the last batch
        with self._lock:
            waiting = self._queued_images
            for i, request in enumerate(group):
                n = int(request.pixels.shape[0])
                if waiting + images + n > self.max_queue:
                    self.stats.rejected_full += 1
                    refused.append((i, _full(waiting + images, n, self.max_queue)))
                    continue
                images += n
                if batches and filled + n <= limit:
                    batches[-1].append(i)
                    filled += n
                else:  # a new batch; a request over the limit fills one alone
                    batches.append([i])
                    filled = n
        for i, error in refused:
            deliver(i, error)
        clock = self._clock
        for members in batches:
            now = clock()
            live = []
            for i in members:
                deadline = group[i].deadline
                if deadline is not None and now >= deadline:
                    with self._lock:
                        self.stats.expired += 1
                    deliver(i, DeadlineExceeded(f"deadline passed after {now - group[i].arrived:.3f}s in the queue; the request was dropped before compute"))
                else:
                    live.append(i)
            if not live:
                continue
            x = group[live[0]].pixels if len(live) == 1 else np.concatenate([group[i].pixels for i in live])
            try:
                r = self.infer(x, requests=len(live), gather=False)
            except BaseException as exc:  # noqa: BLE001 - every request of the batch gets the error
                for i in live:
                    deliver(i, exc)
                continue
            offset = 0
            for i in live:
                n = int(group[i].pixels.shape[0])
                deliver(i, Result(r.probabilities[offset : offset + n], r.digits[offset : offset + n], r.tag, now - group[i].arrived + r.queue_s, r.compute_s))
                offset += n

    def _run_alone(self, pixels: np.ndarray) -> Result:
        """The idle fast path: one request, no queue, no hand-off; one lock round at the end."""
        clock = self._clock
        run, tag = self._run, self._tag
        start = clock()
        try:
            probs, digits = run(pixels)
        except BaseException:
            self._handoff()
            raise
        seconds = clock() - start
        n = pixels.shape[0]
        with self._lock:
            s = self.stats
            s.batches += 1
            s.images += n
            s.batch_sizes[n] += 1
            s.compute_seconds += seconds
            idle = not self._queue
            if idle:
                self._busy = False
        if not idle:
            self._handoff()
        if self._on_batch is not None:
            self._on_batch(n, seconds)
        return Result(probs, digits, tag, 0.0, seconds)

    def _wait(self, p: _Pending) -> bool:
        """Wait for our result or for the leader role; True when we must lead."""
        while True:
            # Capped: a wait beyond threading.TIMEOUT_MAX raises OverflowError.
            timeout = -1 if p.deadline is None else min(max(0.0, p.deadline - self._clock()), _MAX_WAIT_S)
            fired = p.wake.acquire(True, timeout)
            with self._lock:
                if p.state == _LEADER:
                    return True
                if p.state == _DONE:
                    return False
                if not fired and p.state == _QUEUED and self._clock() >= p.deadline:
                    # Deadline passed while queued: drop it, never compute it.
                    self._queue.remove(p)
                    self._queued_images -= p.n
                    self.stats.expired += 1
                    p.state = _DONE
                    p.error = DeadlineExceeded(
                        f"deadline passed after {self._clock() - p.enqueued:.3f}s in the queue; the request was dropped before compute"
                    )
                    return False
                # Taken into a running batch: it will finish; wait without a timeout.
                if p.state == _RUNNING:
                    p.deadline = None

    def _take(self) -> list[_Pending]:
        """Under the lock: the next batch, FIFO, dropping expired and cancelled requests."""
        now = self._clock()
        batch: list[_Pending] = []
        total = 0
        q = self._queue
        while q:
            head = q[0]
            if head.deadline is not None and now >= head.deadline:
                self._drop(q.popleft(), DeadlineExceeded(f"deadline passed after {now - head.enqueued:.3f}s in the queue; dropped before compute"))
                self.stats.expired += 1
                continue
            if head.is_cancelled is not None and head.is_cancelled():
                self._drop(q.popleft(), Cancelled("the caller cancelled the request while it was queued"))
                self.stats.cancelled += 1
                continue
            if batch and total + head.n > self.max_batch_size:
                break
            q.popleft()
            self._queued_images -= head.n
            head.state = _RUNNING if head.state != _LEADER else _LEADER
            batch.append(head)
            total += head.n
            if total >= self.max_batch_size:
                break
        return batch

    def _drop(self, p: _Pending, error: BaseException) -> None:
        self._queued_images -= p.n
        p.error = error
        if p.state != _LEADER:
            p.state = _DONE
            p.wake.release()

    def _lead(self) -> None:
        with self._lock:
            if self.max_queue_delay_s > 0:
                end = self._clock() + self.max_queue_delay_s
                while self._queued_images < self.max_batch_size:
                    left = end - self._clock()
                    if left <= 0:
                        break
                    self._arrival.wait(left)
            batch = self._take()
        if batch:
            self._execute(batch)
        self._handoff()

    def _handoff(self) -> None:
        """Hand over: the oldest live waiting request becomes the next leader, or we go idle."""
        with self._lock:
            now = self._clock()
            while self._queue:
                head = self._queue[0]
                if head.deadline is not None and now >= head.deadline:
                    self._drop(self._queue.popleft(), DeadlineExceeded(f"deadline passed after {now - head.enqueued:.3f}s in the queue; dropped before compute"))
                    self.stats.expired += 1
                elif head.is_cancelled is not None and head.is_cancelled():
                    self._drop(self._queue.popleft(), Cancelled("the caller cancelled the request while it was queued"))
                    self.stats.cancelled += 1
                else:
                    head.state = _LEADER
                    head.wake.release()
                    break
            else:
                self._busy = False

    def _execute(self, batch: list[_Pending]) -> None:
        start = self._clock()
        x = batch[0].pixels if len(batch) == 1 else np.concatenate([p.pixels for p in batch])
        run, tag = self._run, self._tag
        try:
            probs, digits = run(x)
        except BaseException as exc:  # noqa: BLE001 - every caller in the batch gets the error
            end = self._clock()
            for p in batch:
                p.error = exc
        else:
            end = self._clock()
            offset = 0
            for p in batch:
                p.result = Result(probs[offset : offset + p.n], digits[offset : offset + p.n], tag, start - p.enqueued, end - start)
                offset += p.n
        queue_times = [start - p.enqueued for p in batch]
        with self._lock:
            s = self.stats
            s.batches += 1
            s.images += int(x.shape[0])
            s.batch_sizes[int(x.shape[0])] += 1
            s.queue_seconds += sum(queue_times)
            s.compute_seconds += end - start
            for p in batch:
                if p.state != _LEADER:
                    p.state = _DONE
                    p.wake.release()
        if self._on_batch is not None:
            self._on_batch(int(x.shape[0]), end - start)
