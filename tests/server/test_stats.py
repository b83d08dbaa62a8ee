"""server/stats.py: records queued without a lock are all counted, consistently, when read."""

from __future__ import annotations

import threading

from mnist_edge.server import stats as stats_mod
from mnist_edge.server.stats import Statistics


def test_records_from_many_threads_are_all_counted_and_consistent():
    st = Statistics()

    def work():
        for i in range(5000):
            st.record_ok("v2", 1000, 10, 20, 30, 40)
            st.record_batch(1 + i % 3, 0.0001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st.record_request("v2", "INVALID_ARGUMENT", 500)
    with st.locked():
        assert st.success.count == st.queue.count == st.compute_input.count == st.compute_infer.count == st.compute_output.count == 20000
        assert (st.success.ns, st.compute_input.ns, st.compute_output.ns, st.queue.ns, st.compute_infer.ns) == (20000 * 1000, 20000 * 10, 20000 * 20, 20000 * 30, 20000 * 40)
        assert st.requests_by[("v2", "OK")] == 20000 and st.requests_by[("v2", "INVALID_ARGUMENT")] == 1
        assert st.execution_count == 20000 and st.inference_count == 4 * sum(1 + i % 3 for i in range(5000))
        assert sum(b.count for b in st.batches.values()) == 20000
        assert st.request_hist.n == 20001 and st.batch_hist.n == 20000 and st.fail.count == 1
        assert st.last_inference_ms > 0


def test_queued_records_stay_bounded_without_readers():
    st = Statistics()
    for _ in range(3 * stats_mod._FOLD_AT):
        st.record_ok("native", 1, 1, 1, 1, 1)
    assert len(st._pending) <= stats_mod._FOLD_AT + 1
    with st.locked():
        assert st.success.count == 3 * stats_mod._FOLD_AT
