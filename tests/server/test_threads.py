"""Handler threads (server/threads.py): the last-in-first-out unary pool, streams on a pool of
their own, and the directly written ModelInfer response."""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from helpers.servers import running_server
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server.threads import LifoThreadPool
from mnist_edge.server.v2 import OUTPUT_NAMES, DecodedRequest, encode_infer, encode_infer_bytes


def test_pool_returns_results_and_exceptions_through_futures():
    pool = LifoThreadPool(2)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=10) == 5

        def boom():
            raise ValueError("bad")

        with pytest.raises(ValueError, match="bad"):
            pool.submit(boom).result(timeout=10)
        assert isinstance(pool, futures.ThreadPoolExecutor)  # grpcio's per-method pools require it
    finally:
        pool.shutdown()


def test_one_call_at_a_time_reuses_one_thread():
    pool = LifoThreadPool(8)
    try:
        names = set()
        for _ in range(50):
            names.add(pool.submit(lambda: threading.current_thread().name).result(timeout=10))
            time.sleep(0.001)  # let the worker go idle again
        assert len(names) == 1 and pool.threads == 1
    finally:
        pool.shutdown()


def test_most_recently_idle_thread_takes_the_next_call():
    pool = LifoThreadPool(3)
    try:
        gates = [threading.Event() for _ in range(3)]
        started = queue.Queue()

        def hold(i):
            started.put(threading.current_thread().name)
            gates[i].wait(10)
            return threading.current_thread().name

        running = [pool.submit(hold, i) for i in range(3)]
        for _ in range(3):
            started.get(timeout=10)
        # Release them one by one: the last to finish must take the next call.
        order = []
        for i in (0, 2, 1):
            gates[i].set()
            order.append(running[i].result(timeout=10))
            time.sleep(0.02)
        assert pool.submit(lambda: threading.current_thread().name).result(timeout=10) == order[-1]
    finally:
        pool.shutdown()


def test_work_beyond_the_thread_limit_waits_in_order_and_all_of_it_runs():
    pool = LifoThreadPool(2)
    try:
        gate = threading.Event()
        blockers = [pool.submit(gate.wait, 10) for _ in range(2)]
        done = []
        later = [pool.submit(done.append, i) for i in range(20)]
        time.sleep(0.05)
        assert done == [] and pool.threads == 2  # no third thread: the rest wait
        gate.set()
        for f in blockers + later:
            f.result(timeout=10)
        assert done == list(range(20))
    finally:
        pool.shutdown()


def test_shutdown_runs_waiting_work_or_cancels_it():
    pool = LifoThreadPool(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    waiting = pool.submit(lambda: "ran")
    threading.Timer(0.05, gate.set).start()
    pool.shutdown(wait=True)
    assert first.result(timeout=1) is True and waiting.result(timeout=1) == "ran"
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)

    pool = LifoThreadPool(1)
    gate = threading.Event()
    first = pool.submit(gate.wait, 10)
    waiting = pool.submit(lambda: "ran")
    threading.Timer(0.05, gate.set).start()
    pool.shutdown(wait=True, cancel_futures=True)
    assert waiting.cancelled()


@pytest.mark.parametrize("n", [1, 2, 17, 1024])
@pytest.mark.parametrize("request_id", ["", "req-7", "x" * 300])
@pytest.mark.parametrize("name,version", [("mnist", "1"), ("mnist", ""), ("m" * 200, "12")])
def test_written_response_is_the_protobuf_message_byte_for_byte(n, request_id, name, version):
    rng = np.random.default_rng(n)
    probs = rng.random((n, 10), dtype=np.float32)
    digits = rng.integers(0, 10, n).astype(np.int64)
    written = encode_infer_bytes(name, version, request_id, probs, digits)
    message = encode_infer(name, version, DecodedRequest(None, OUTPUT_NAMES, request_id), probs, digits)
    assert pb.ModelInferResponse.FromString(written) == message
    assert written == message.SerializeToString(deterministic=True)


def test_open_streams_never_take_the_threads_of_unary_calls(mnist):
    """One unary thread and three idle open streams: unary calls are still answered, and each
    stream still answers when it finally sends."""
    image = mnist.test.images[0]
    with running_server(handler_threads=1, stream_threads=8) as app:
        channel = grpc.insecure_channel(app.address)
        try:
            native = dpb_grpc.DigitClassifierStub(channel)
            v2 = pb_grpc.GRPCInferenceServiceStub(channel)
            feeds = [queue.Queue() for _ in range(3)]

            def requests(q):
                while (item := q.get()) is not None:
                    yield item

            streams = [native.ClassifyStream(requests(q), timeout=60) for q in feeds]
            stream_threads = lambda: sum(t.name.startswith("stream") for t in threading.enumerate())  # noqa: E731
            deadline = time.monotonic() + 20
            while stream_threads() < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stream_threads() >= 3  # every stream holds a thread of the stream pool
            for _ in range(5):  # a unary method on the handler threads (ModelInfer and Classify are on the lane)
                assert native.GetModelInfo(dpb.GetModelInfoRequest(), timeout=10).name == "mnist"
            assert app.pool.threads == 1
            req = pb.ModelInferRequest(
                model_name="mnist",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                raw_input_contents=[image.tobytes()],
            )
            assert len(v2.ModelInfer(req, timeout=10).raw_output_contents) == 2
            for q, stream in zip(feeds, streams):
                q.put(dpb.ClassifyRequest(images=[dpb.Image(pixels=image.tobytes())]))
                assert len(next(stream).predictions) == 1
                q.put(None)
                assert list(stream) == []
        finally:
            channel.close()


def test_single_image_path_matches_the_general_run_even_under_concurrent_callers(mnist):
    """ModelRunner's bound-buffer path for one image gives what session.run gives, and callers
    racing for it (the loser takes the general path) each get their own image's answer."""
    from mnist_edge.server import model_store
    from mnist_edge.server.runner import INPUT, OUTPUTS

    runner = model_store.load(None).runner
    images = mnist.test.images[:200]
    want_probs, want_digits = runner.session.run(OUTPUTS, {INPUT: images})
    for i in range(20):
        probs, digits = runner.run(images[i : i + 1])
        np.testing.assert_array_equal(probs, want_probs[i : i + 1])
        np.testing.assert_array_equal(digits, want_digits[i : i + 1])

    def check(i):
        for _ in range(5):
            probs, digits = runner.run(images[i : i + 1])
            assert probs.shape == (1, 10) and np.array_equal(probs[0], want_probs[i]) and digits[0] == want_digits[i]
        return True

    with futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, range(200)))


def test_handler_threads_end_when_the_server_stops(mnist):
    with running_server() as app:
        with grpc.insecure_channel(app.address) as channel:
            dpb_grpc.DigitClassifierStub(channel).GetModelInfo(dpb.GetModelInfoRequest(), timeout=10)  # on the handler threads
        threads = list(app.pool._lifo_threads)
        assert threads
        app.shutdown("test")
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()


def test_health_watch_stays_non_blocking_on_the_stream_pool():
    """grpc's HealthServicer answers Watch through a callback and holds no thread: more open
    watches than stream threads all get their first answer."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with running_server(stream_threads=2) as app:
        with grpc.insecure_channel(app.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20) for _ in range(5)]
            for w in watches:
                assert next(w).status == health_pb2.HealthCheckResponse.SERVING
            for w in watches:
                w.cancel()


def test_health_watches_closing_while_the_status_changes_never_stall_the_server():
    """grpc_health's lock-order deadlock (server/health.py): a status change sent to watchers
    while others close. Bounded: 20 rounds of 6 watches; the guard only catches a hang."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from mnist_edge.server.core import State

    with running_server(stream_threads=2) as app:
        with grpc.insecure_channel(app.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for round_ in range(20):
                watches = [stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20) for _ in range(6)]
                for w in watches:
                    next(w)
                flipper = threading.Thread(
                    target=lambda: [app._sync_health(State.DRAINING if i % 2 else State.SERVING) for i in range(10)]
                )
                flipper.start()
                for w in watches:
                    w.cancel()
                flipper.join(timeout=30)
                assert not flipper.is_alive(), f"status changes stalled in round {round_}"
            app._sync_health(State.SERVING)
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
