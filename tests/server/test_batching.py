"""The batcher with arrays alone: routing under concurrency, bounded queue, deadlines, policy."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import numpy as np
import pytest

from mnist_edge.server.batching import Batcher, GroupRequest
from mnist_edge.server.errors import Cancelled, DeadlineExceeded, ResourceExhausted


class FakeModel:
    """digit = the image's first pixel (so every caller can check it got its own answer);
    records every batch it ran; can be held to keep the batcher busy."""

    def __init__(self, delay: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()
        self.lock = threading.Lock()

    def __call__(self, pixels: np.ndarray):
        self.running.set()
        self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        ids = pixels[:, 0, 0].astype(np.int64)
        with self.lock:
            self.batches.append(ids.tolist())
        probs = np.zeros((len(ids), 10), np.float32)
        return probs, ids


def image(value: int, n: int = 1) -> np.ndarray:
    a = np.zeros((n, 28, 28), np.uint8)
    a[:, 0, 0] = value
    return a


def test_idle_request_runs_at_once_in_the_callers_thread():
    callers = []

    def run(pixels):
        callers.append(threading.get_ident())
        return np.zeros((len(pixels), 10), np.float32), np.zeros(len(pixels), np.int64)

    b = Batcher(run)
    b.infer(image(1))
    assert callers == [threading.get_ident()]
    assert b.stats.batches == 1 and b.stats.mean_batch_size == 1


def test_results_go_back_to_exactly_their_callers_under_concurrency():
    model = FakeModel(delay=0.002)
    b = Batcher(model, max_batch_size=16)
    n = 400

    def call(i: int):
        k = 1 + i % 5  # requests of 1..5 images, all with this caller's id
        probs, digits, *_ = b.infer(image(i % 250, k))
        return i, digits.tolist(), k

    with futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(n)))
    for i, digits, k in results:
        assert digits == [i % 250] * k, (i, digits)
    sizes = [len(batch) for batch in model.batches]
    assert max(sizes) > 1  # concurrency really was batched
    assert max(sizes) <= 16 or all(len(set(batch)) == 1 for batch in model.batches if len(batch) > 16)
    assert sum(sizes) == sum(1 + i % 5 for i in range(n))


def test_a_request_larger_than_a_batch_runs_alone_and_whole():
    model = FakeModel()
    b = Batcher(model, max_batch_size=8)
    b.infer(image(7, 20))
    assert model.batches == [[7] * 20]


def test_full_queue_is_refused_at_once_without_waiting():
    model = FakeModel()
    model.gate.clear()  # the running batch holds
    b = Batcher(model, max_batch_size=4, max_queue=10)
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(b.infer, image(1))
        assert model.running.wait(5)
        queued = [pool.submit(b.infer, image(2, 5)), pool.submit(b.infer, image(3, 5))]
        deadline = time.monotonic() + 5
        while b.queued_images < 10 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert b.queued_images == 10
        # Refused synchronously: the model is still held, so waiting would never return.
        with pytest.raises(ResourceExhausted, match=r"queue is full: 10 images waiting, this request adds 1, limit 10 \(--max-queue\)"):
            b.infer(image(4))
        assert b.stats.rejected_full == 1
        model.gate.set()
        assert first.result(10)[1].tolist() == [1]
        assert [q.result(10)[1].tolist() for q in queued] == [[2] * 5, [3] * 5]


def test_an_expired_deadline_is_never_computed():
    model = FakeModel()
    model.gate.clear()
    b = Batcher(model, max_batch_size=64)
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(b.infer, image(1))
        assert model.running.wait(5)
        late = pool.submit(b.infer, image(99), time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded, match="dropped before compute"):
            late.result(5)
        model.gate.set()
        first.result(5)
        b.infer(image(5))
    assert all(99 not in batch for batch in model.batches)  # the expired request was dropped, not computed
    assert b.stats.expired == 1


def test_a_cancelled_request_is_dropped_before_compute():
    model = FakeModel()
    model.gate.clear()
    b = Batcher(model)
    cancelled = threading.Event()
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(b.infer, image(1))
        assert model.running.wait(5)
        gone = pool.submit(b.infer, image(42), None, cancelled.is_set)
        deadline = time.monotonic() + 5
        while b.queued_images < 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        cancelled.set()
        model.gate.set()
        first.result(5)
        with pytest.raises(Cancelled):
            gone.result(5)
    assert all(42 not in batch for batch in model.batches)


def test_queue_delay_lets_a_leader_fill_its_batch():
    model = FakeModel()
    b = Batcher(model, max_batch_size=8, max_queue_delay_us=200_000)
    with futures.ThreadPoolExecutor(8) as pool:
        calls = [pool.submit(b.infer, image(i)) for i in range(8)]
        for i, c in enumerate(calls):
            assert c.result(10)[1].tolist() == [i]
    assert len(model.batches) <= 2 and max(len(x) for x in model.batches) >= 4


def test_model_errors_reach_every_caller_in_the_batch_and_the_batcher_recovers():
    calls = {"n": 0}

    def flaky(pixels):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return np.zeros((len(pixels), 10), np.float32), pixels[:, 0, 0].astype(np.int64)

    b = Batcher(flaky)
    with pytest.raises(RuntimeError, match="boom"):
        b.infer(image(1))
    assert b.infer(image(2))[1].tolist() == [2]  # not stuck busy after an error


def test_the_tag_of_the_model_that_ran_comes_back_with_the_result():
    b = Batcher(lambda p: (np.zeros((len(p), 10), np.float32), np.zeros(len(p), np.int64)))
    b.set_runner(lambda p: (np.zeros((len(p), 10), np.float32), np.ones(len(p), np.int64)), tag="v2")
    assert b.infer(image(0))[2] == "v2"


def test_a_far_deadline_while_queued_neither_overflows_nor_expires():
    # grpc reports "no deadline" as ~1e9 s remaining; a queued wait that long must not raise
    # (threading's timeout limit) and must not be mistaken for an expired deadline.
    model = FakeModel()
    model.gate.clear()
    b = Batcher(model, max_batch_size=64)
    with futures.ThreadPoolExecutor(4) as pool:
        first = pool.submit(b.infer, image(1))
        assert model.running.wait(5)
        far = [pool.submit(b.infer, image(v), time.monotonic() + 1e12) for v in (2, 3)]
        time.sleep(0.05)  # both are queued behind the running batch
        model.gate.set()
        assert first.result(10)[1].tolist() == [1]
        assert [f.result(10)[1].tolist() for f in far] == [[2], [3]]
    assert b.stats.expired == 0


# -- groups: several requests handed over at once by one thread (the inference lane) -----------
def _group(*specs, deadline=None, now=None):
    """(value, n) pairs -> infer_group's items."""
    now = time.monotonic() if now is None else now
    return [GroupRequest(image(v, n), deadline, now) for v, n in specs]


def test_a_group_runs_in_batches_of_at_most_max_batch_size_and_each_request_gets_its_own_rows():
    model = FakeModel()
    b = Batcher(model, max_batch_size=4)
    got = {}
    b.infer_group(_group((1, 1), (2, 2), (3, 1), (4, 2), (5, 9), (6, 1)), lambda i, r: got.setdefault(i, r))
    # 1+2+1 fill a batch; 4 starts the next; 9 > 4 runs alone, whole; 6 starts another.
    assert model.batches == [[1, 2, 2, 3], [4, 4], [5] * 9, [6]]
    assert {i: r.digits.tolist() for i, r in got.items()} == {0: [1], 1: [2, 2], 2: [3], 3: [4, 4], 4: [5] * 9, 5: [6]}
    assert b.stats.requests == 6 and b.stats.batches == 4


def test_what_would_overflow_the_queue_is_refused_before_anything_runs():
    model = FakeModel()
    b = Batcher(model, max_batch_size=4, max_queue=10)
    seen = []

    def deliver(i, r):
        seen.append((i, type(r).__name__, len(model.batches)))

    b.infer_group(_group((1, 4), (2, 4), (3, 4), (4, 2)), deliver)
    # 4+4 fit, the third 4 would make 12 > 10: refused at once, before the first batch ran;
    # the 2 after it still fits (4+4+2 = 10).
    assert seen[0] == (2, "ResourceExhausted", 0)
    assert sorted(i for i, kind, _ in seen if kind == "Result") == [0, 1, 3]
    assert all(3 not in batch for batch in model.batches)
    assert b.stats.rejected_full == 1


def test_an_expired_request_in_a_group_is_never_computed_and_the_rest_are():
    model = FakeModel()
    b = Batcher(model, max_batch_size=8)
    past = time.monotonic() - 1
    group = _group((1, 1), (2, 1)) + [GroupRequest(image(99), past, past - 1)] + _group((3, 1))
    got = {}
    b.infer_group(group, lambda i, r: got.setdefault(i, r))
    assert isinstance(got[2], DeadlineExceeded) and "dropped before compute" in str(got[2])
    assert model.batches == [[1, 2, 3]]
    assert [got[i].digits.tolist() for i in (0, 1, 3)] == [[1], [2], [3]]
    assert b.stats.expired == 1


def test_a_model_error_reaches_every_request_of_its_batch_and_the_next_batch_still_runs():
    calls = []

    def run(pixels):
        calls.append(len(pixels))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return np.zeros((len(pixels), 10), np.float32), pixels[:, 0, 0].astype(np.int64)

    b = Batcher(run, max_batch_size=2)
    got = {}
    b.infer_group(_group((1, 1), (2, 1), (3, 1)), lambda i, r: got.setdefault(i, r))
    assert isinstance(got[0], RuntimeError) and isinstance(got[1], RuntimeError)
    assert got[2].digits.tolist() == [3]
