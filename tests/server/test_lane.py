"""The inference lane (server/lane.py): ModelInfer and Classify served from gRPC's completion queue on one thread.

The model is wrapped in a gate that records every batch it runs (pixel [0,0] of each image
is the caller's mark) and can be held, so a test can keep the lane busy while other calls
arrive and then see what they were grouped into.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from helpers.servers import ort_reference, running_server, wait_for
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import lane, v2
from mnist_edge.server.core import State

Tensor = pb.ModelInferRequest.InferInputTensor
ARRIVE_S = 1.0  # time given to calls sent while the lane is held to reach the server (ordering, not a timing check)


class Gate:
    def __init__(self, run) -> None:
        self.run = run
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.batches: list[list[int]] = []
        self.threads: list[str] = []

    def __call__(self, pixels: np.ndarray):
        self.batches.append(pixels[:, 0, 0].astype(int).tolist())
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        self.open.wait(30)
        return self.run(pixels)


def gate(app) -> Gate:
    g = Gate(app.core.model.runner.run)
    app.core.batcher.set_runner(g, app.core.model)
    return g


def marked(mnist, marks) -> np.ndarray:
    images = mnist.test.images[: len(marks)].copy()
    images[:, 0, 0] = marks
    return images


def request(images: np.ndarray) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])], raw_input_contents=[images.tobytes()]
    )


def digits(resp: pb.ModelInferResponse) -> list[int]:
    i = [t.name for t in resp.outputs].index("digit")
    return np.frombuffer(resp.raw_output_contents[i], "<i8").tolist()


def stub(address: str):
    ch = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return ch, pb_grpc.GRPCInferenceServiceStub(ch)


def infer(address: str, images: np.ndarray, timeout: float = 30.0) -> list[int]:
    """One ModelInfer on a channel of its own: the digits."""
    ch, s = stub(address)
    with ch:
        return digits(s.ModelInfer(request(images), timeout=timeout))


def infer_or_error(address: str, images: np.ndarray, timeout: float = 30.0) -> list[int] | grpc.RpcError:
    try:
        return infer(address, images, timeout)
    except grpc.RpcError as exc:
        return exc


def test_model_infer_runs_on_the_lane_thread(mnist):
    with running_server() as app:
        assert app.lane is not None
        assert app.lane.methods == ["/inference.GRPCInferenceService/ModelInfer", "/digits.v1.DigitClassifier/Classify"]
        g = gate(app)
        ch, s = stub(app.address)
        with ch:
            images = mnist.test.images[:3]
            _, ref = ort_reference(app.core.model.file, images)
            assert digits(s.ModelInfer(request(images), timeout=10)) == ref.tolist()
        assert g.threads == ["infer-lane"]
        assert app.lane.calls == 1


def test_calls_that_arrive_while_a_batch_runs_are_answered_as_one_group_each_with_its_own_answer(mnist):
    with running_server() as app:
        g = gate(app)
        images = marked(mnist, np.arange(1, 13))
        _, ref = ort_reference(app.core.model.file, images)
        g.open.clear()
        with futures.ThreadPoolExecutor(12) as pool:
            first = pool.submit(infer, app.address, images[:1])
            assert g.entered.wait(10)
            rest = [pool.submit(infer, app.address, images[i : i + 1]) for i in range(1, 12)]
            time.sleep(ARRIVE_S)
            g.open.set()
            answers = [first.result(30)] + [f.result(30) for f in rest]
        assert answers == [[d] for d in ref.tolist()]
        assert g.batches[0] == [1]
        assert max(len(b) for b in g.batches[1:]) > 1  # the waiting calls shared a batch
        assert sorted(m for b in g.batches for m in b) == list(range(1, 13))
        assert set(g.threads) == {"infer-lane"}


def test_calls_beyond_the_queue_limit_wait_unread_and_none_is_refused(mnist):
    """Issue 18: admission reads messages only while the admitted images fit --max-queue; the
    other calls wait unread (in arrival order), a group never holds more than --max-queue
    images, and nothing is refused because others arrived with it."""
    with running_server(max_request_images=8, max_queue=16) as app:
        lane = app.lane
        seen: list[tuple[int, int]] = []  # (images admitted, calls waiting unread) after each admission step
        admit, read = lane._admit, lane._read

        def spy_admit(c, now):
            admit(c, now)
            seen.append((lane._admitted, len(lane._waiting)))

        def spy_read(c, images):
            read(c, images)
            seen.append((lane._admitted, len(lane._waiting)))

        lane._admit, lane._read = spy_admit, spy_read
        g = gate(app)
        g.open.clear()
        with futures.ThreadPoolExecutor(8) as pool:
            first = pool.submit(infer, app.address, marked(mnist, [100] * 8))
            assert g.entered.wait(10)
            eights = {mark: pool.submit(infer_or_error, app.address, marked(mnist, [mark] * 8)) for mark in (1, 2, 3, 4, 5)}
            time.sleep(ARRIVE_S)  # they wait in gRPC core while the lane is busy
            g.open.set()
            first.result(30)
            results = {mark: f.result(30) for mark, f in eights.items()}
        assert max(w for _, w in seen) >= 2, seen  # taken, and left unread
        assert max(a for a, _ in seen) <= 16 + 8, seen  # at most one message read beyond the bound
        assert all(not isinstance(r, grpc.RpcError) for r in results.values()), results
        assert max(len(b) for b in g.batches) <= 16  # no group over --max-queue
        assert sorted(m for b in g.batches for m in b) == sorted([100] * 8 + [m for m in (1, 2, 3, 4, 5) for _ in range(8)])
        assert app.core.batcher.stats.rejected_full == 0


class _Call(lane.LaneCall):
    """A LaneCall without a gRPC call: its answer is recorded in `failed`."""

    __slots__ = ()
    failed: list = []

    def fail(self, code, details):
        _Call.failed.append((self, code, details))


def _admission(max_images: int, admitted: int, pace: float):
    """A Lane's admission state alone (no server): `admitted` images in, answering `pace` images/s."""
    import collections

    ln = lane.Lane.__new__(lane.Lane)
    ln._max_images, ln._admitted, ln._waiting, ln._waiting_images = max_images, admitted, collections.deque(), 0
    ln._max_request_images = 1024
    ln._recent_images, ln._recent_s = pace, 1.0
    _Call.failed = ln.failed = []
    ln.read = []

    def read(c, images):
        ln.read.append((c, images))
        ln._admitted += images

    ln._read = read
    return ln


def test_admission_refuses_at_once_what_could_not_start_in_time_and_queues_the_rest():
    method = lane._Method("/m", None)
    method.estimate = 8
    now = time.monotonic()
    ln = _admission(max_images=8, admitted=8, pace=4.0)  # 2 s of work ahead
    soon, later, never = (_Call(None, method, d, now) for d in (now + 1.0, now + 60.0, None))
    ln._admit(soon, now)
    ln._admit(later, now)
    ln._admit(never, now)
    assert [(c, code) for c, code, _ in ln.failed] == [(soon, grpc.StatusCode.RESOURCE_EXHAUSTED)]
    assert "could not start before its deadline" in ln.failed[0][2]
    assert list(ln._waiting) == [later, never] and not ln.read  # waiting, unread, in arrival order

    ln = _admission(max_images=8, admitted=8, pace=1.0)  # 8 s ahead: over MAX_WAIT_S
    ln._admit(_Call(None, method, None, now), now)
    assert ln.failed and f"over the {lane.MAX_WAIT_S:g}s a call may wait" in ln.failed[0][2]

    ln = _admission(max_images=16, admitted=0, pace=4.0)  # room: read at once
    first = _Call(None, method, None, now)
    ln._admit(first, now)
    assert ln.read == [(first, 8)] and not ln.failed


def test_waiting_calls_are_read_oldest_first_as_room_frees_and_expired_ones_refused():
    method = lane._Method("/m", None)
    method.estimate = 8
    now = time.monotonic()
    ln = _admission(max_images=16, admitted=16, pace=1000.0)
    expired, a, b = (_Call(None, method, d, now) for d in (now + 0.5, None, None))
    for c in (expired, a, b):
        ln._admit(c, now)
    assert list(ln._waiting) == [expired, a, b]
    expired.deadline = now - 0.01  # its deadline passed while it waited
    ln._admitted = 8  # one call's answer went out
    ln._read_waiting()
    assert [c for c, _, _ in ln.failed] == [expired] and [c for c, _ in ln.read] == [a]
    assert list(ln._waiting) == [b]  # a's 8 images fill the room again


def test_a_call_whose_deadline_passes_while_the_lane_is_busy_is_never_computed(mnist):
    with running_server() as app:
        g = gate(app)
        g.open.clear()
        with futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(infer, app.address, marked(mnist, [1]))
            assert g.entered.wait(10)
            late = pool.submit(infer, app.address, marked(mnist, [77]), 0.2)
            with pytest.raises(grpc.RpcError) as info:
                late.result(30)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server's deadline counts from when the call reached it, which on a loaded
            # machine can be later than the client's: let that one pass too.
            time.sleep(ARRIVE_S)
            g.open.set()
            first.result(30)
        ch, s = stub(app.address)
        with ch:
            s.ModelInfer(request(marked(mnist, [5])), timeout=10)  # the lane has read everything before this
        assert all(77 not in b for b in g.batches)


def test_bearer_token_is_checked_on_the_lane(tmp_path, mnist):
    token = tmp_path / "token"
    token.write_text("lane-token-0123456789abcdef\n")
    with running_server(token_file=str(token)) as app:
        assert app.lane is not None
        ch, s = stub(app.address)
        with ch:
            for metadata, why in (((), "missing authorization"), ((("authorization", "Bearer nope-nope-nope-nope"),), "wrong bearer token")):
                with pytest.raises(grpc.RpcError) as info:
                    s.ModelInfer(request(mnist.test.images[:1]), metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in info.value.details()
            ok = s.ModelInfer(request(mnist.test.images[:1]), metadata=(("authorization", "bearer lane-token-0123456789abcdef"),), timeout=10)
            assert len(digits(ok)) == 1


def test_bytes_that_are_not_a_request_get_invalid_argument(mnist):
    with running_server() as app, grpc.insecure_channel(app.address) as ch:
        raw = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in info.value.details()


def test_an_unexpected_error_is_internal_and_the_lane_keeps_serving(mnist, monkeypatch, caplog):
    real = v2.encode_infer_bytes
    failures = iter([True])

    def flaky(*args):
        if next(failures, False):
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(v2, "encode_infer_bytes", flaky)
    with running_server() as app:
        ch, s = stub(app.address)
        with ch:
            with pytest.raises(grpc.RpcError) as info:
                s.ModelInfer(request(mnist.test.images[:1]), timeout=10)
            assert info.value.code() == grpc.StatusCode.INTERNAL and "internal error in" in info.value.details()
            assert "boom" not in info.value.details()  # no internals to the client
            assert len(digits(s.ModelInfer(request(mnist.test.images[:1]), timeout=10))) == 1
    assert any("boom" in (r.exc_text or "") or "boom" in str(r.exc_info) for r in caplog.records)


def test_without_the_lane_model_infer_is_served_from_the_handler_threads(mnist, monkeypatch):
    with running_server(infer_lane=False) as app:
        assert app.lane is None
        g = gate(app)
        ch, s = stub(app.address)
        with ch:
            assert len(digits(s.ModelInfer(request(mnist.test.images[:2]), timeout=10))) == 2
        assert g.threads[0].startswith("rpc")
    # A grpcio without the layer the lane uses: the same, with a warning instead of a failure.
    monkeypatch.setattr(lane, "supported", lambda server: False)
    with running_server() as app:
        assert app.lane is None
        ch, s = stub(app.address)
        with ch:
            assert len(digits(s.ModelInfer(request(mnist.test.images[:1]), timeout=10))) == 1


def test_a_call_in_flight_on_the_lane_finishes_during_shutdown_and_the_lane_thread_ends(mnist):
    with running_server(grace_s=10.0) as app:
        g = gate(app)
        g.open.clear()
        with futures.ThreadPoolExecutor(1) as pool:
            ch, s = stub(app.address)
            with ch:
                call = pool.submit(lambda: digits(s.ModelInfer(request(mnist.test.images[:1]), timeout=30)))
                assert g.entered.wait(10)
                stopper = threading.Thread(target=app.shutdown, args=("test",))
                stopper.start()
                wait_for(lambda: app.core.state is State.STOPPING)
                g.open.set()
                assert len(call.result(30)) == 1
        stopper.join(30)
        assert app.stopped.is_set()
        assert not app.lane._thread.is_alive()


def test_max_queue_delay_lets_the_lane_gather_calls_into_one_batch(mnist):
    # 3 s: far longer than three calls take to arrive, so they all land in the first batch.
    with running_server(max_queue_delay_us=3_000_000, max_batch_size=3) as app:
        g = gate(app)
        images = marked(mnist, [1, 2, 3])
        _, ref = ort_reference(app.core.model.file, images)
        with futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda i: infer(app.address, images[i : i + 1]), range(3)))
        assert answers == [[d] for d in ref.tolist()]
        # max_batch_size calls end the wait early: the batch ran as soon as it was full.
        assert sorted(g.batches[0]) == [1, 2, 3]


def test_the_lane_thread_ends_when_the_server_has_stopped(mnist):
    with running_server() as app:
        thread = app.lane._thread
        app.server.stop(0).wait()
        app.lane.stop(timeout=30)  # shuts its queue down, which wakes the thread
        assert not thread.is_alive()


def test_calls_that_end_during_shutdown_log_no_errors(mnist, caplog):
    with running_server(grace_s=10.0) as app:
        g = gate(app)
        g.open.clear()
        with futures.ThreadPoolExecutor(3) as pool:
            calls = [pool.submit(infer_or_error, app.address, marked(mnist, [i])) for i in (1, 2, 3)]
            assert g.entered.wait(10)
            time.sleep(ARRIVE_S)  # the other two reach the server before it stops listening
            stopper = threading.Thread(target=app.shutdown, args=("test",))
            stopper.start()
            wait_for(lambda: app.core.state is State.STOPPING)
            time.sleep(ARRIVE_S)  # gRPC core has begun its shutdown before the calls end
            g.open.set()
            results = [c.result(30) for c in calls]
        # The call in progress is answered; the two the lane had not taken when the drain began
        # holding are refused, never started (server/drain.py).
        assert sum(isinstance(r, list) for r in results) >= 1, results
        for r in results:
            assert (isinstance(r, list) and len(r) == 1) or (r.code() == grpc.StatusCode.UNAVAILABLE and "not started" in r.details()), r
        stopper.join(30)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


def test_a_call_that_ends_after_grpc_core_began_its_shutdown_does_not_ask_for_another():
    # Deterministic form of the race above: the call's end is handled after gRPC core refused
    # new requests (its slot may not have seen the refusal yet).
    with running_server() as app:
        app.server.stop(0).wait()
        method = app.lane._methods[0]
        method.open = True
        app.lane._release(lane.LaneCall(None, method, None, 0.0))  # must not raise
        assert method.open is False


def test_a_handler_that_leaves_calls_unanswered_or_raises_gets_them_internal_and_the_lane_goes_on(caplog):
    """The lane on a bare grpc.server: whatever its handler does, every call gets one answer."""
    behaviour = iter(["ignore", "raise", "echo"])

    def handler(calls):
        what = next(behaviour)
        if what == "raise":
            raise RuntimeError("boom")
        if what == "echo":
            for c in calls:
                c.reply(c.message)

    server = grpc.server(futures.ThreadPoolExecutor(2))
    ln = lane.Lane(server, {"/t.Lane/Echo": handler}, max_calls=4)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ln.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            echo = ch.unary_unary("/t.Lane/Echo")
            for fragment in ("a call was left unanswered", "RuntimeError"):
                with pytest.raises(grpc.RpcError) as info:
                    echo(b"x", timeout=10)
                assert info.value.code() == grpc.StatusCode.INTERNAL and fragment in info.value.details()
            assert echo(b"hello", timeout=10) == b"hello"
            # 4 slots, 3 calls ended: the slots came back, so more calls than slots are served.
            behaviour = iter(["echo"] * 8)
            assert [echo(bytes([i]), timeout=10) for i in range(8)] == [bytes([i]) for i in range(8)]
    finally:
        server.stop(0).wait()
        ln.stop()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("left 1 of 1 calls unanswered" in m for m in errors) and any("unexpected error in /t.Lane/Echo" in m for m in errors)


# -- the native API's unary Classify on the lane ---------------------------------------------------
def png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_classify_with_raw_pixels_runs_on_the_lane_and_keeps_per_image_errors(mnist):
    with running_server() as app:
        g = gate(app)
        images = mnist.test.images[:2]
        _, ref = ort_reference(app.core.model.file, images)
        with grpc.insecure_channel(app.address) as ch:
            native = dpb_grpc.DigitClassifierStub(ch)
            req = dpb.ClassifyRequest(images=[dpb.Image(pixels=images[0].tobytes()), dpb.Image(pixels=b"\x00" * 783),
                                              dpb.Image(pixels=images[1].tobytes())], request_id="r1")
            resp = native.Classify(req, timeout=10)
            assert resp.request_id == "r1" and resp.model_version == app.core.model.version
            assert [resp.predictions[0].digit, resp.predictions[2].digit] == ref.tolist()
            assert resp.predictions[1].HasField("error") and "exactly 784 bytes" in resp.predictions[1].error.message
            # every image refused: answered without the model
            bad = native.Classify(dpb.ClassifyRequest(images=[dpb.Image(pixels=b"\x01")]), timeout=10)
            assert bad.predictions[0].HasField("error")
            with pytest.raises(grpc.RpcError) as info:
                ch.unary_unary("/digits.v1.DigitClassifier/Classify")(b"\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a valid digits.v1.ClassifyRequest" in info.value.details()
        assert g.threads == ["infer-lane"]  # one batch: the two good images of the first request
        assert g.batches == [[int(images[0, 0, 0]), int(images[1, 0, 0])]]


def test_classify_with_an_encoded_image_is_handed_to_the_handler_threads(mnist):
    with running_server() as app:
        g = gate(app)
        image = mnist.test.images[3]
        with grpc.insecure_channel(app.address) as ch:
            native = dpb_grpc.DigitClassifierStub(ch)
            raw = native.Classify(dpb.ClassifyRequest(images=[dpb.Image(pixels=image.tobytes())]), timeout=10)
            enc = native.Classify(dpb.ClassifyRequest(images=[dpb.Image(encoded=png(image)), dpb.Image(pixels=image.tobytes())]), timeout=10)
        assert enc.predictions[0].digit == enc.predictions[1].digit == raw.predictions[0].digit
        assert g.threads[0] == "infer-lane" and g.threads[1].startswith("rpc")


def test_a_hand_off_refused_by_a_stopped_pool_is_answered_unavailable():
    from mnist_edge.server.native import DigitClassifierServicer
    from mnist_edge.server.stats import Statistics

    class Core:  # only what classify_group touches before the hand-off
        settings = type("S", (), {"max_image_bytes": 1 << 20, "max_image_pixels": 1 << 20, "max_request_images": 1024})()
        stats = Statistics()

    def offload(*args):
        raise RuntimeError("cannot schedule new work after shutdown")

    answers = []

    class Call(lane.LaneCall):  # answers recorded instead of sent
        def hand_off(self):
            answers.append("handed off")

        def fail(self, code, details):
            answers.append((code, details))

    servicer = DigitClassifierServicer(Core(), offload=offload)
    call = Call(None, None, None, 0.0)
    call.message = dpb.ClassifyRequest(images=[dpb.Image(encoded=b"\x89PNG")]).SerializeToString()
    servicer.classify_group([call])
    assert answers == ["handed off", (grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")]
    assert Core.stats.requests_by == {("native", "UNAVAILABLE"): 1}


# -- the start-up self-check and the fallback it chooses ------------------------------------


def _model_info(address: str) -> dpb.ModelInfo:
    with grpc.insecure_channel(address) as ch:
        return dpb_grpc.DigitClassifierStub(ch).GetModelInfo(dpb.GetModelInfoRequest(), timeout=10)


def _lane_active_metric(metrics_address: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("mnist_edge_inference_lane_active ")]
    return float(line.split()[1])


def _altered_reply(monkeypatch) -> None:
    """A lane whose private calls still exist but no longer behave: every answer comes back reversed."""
    reply = lane.LaneCall.reply
    monkeypatch.setattr(lane.LaneCall, "reply", lambda self, body: reply(self, body[::-1]))


def test_the_lane_proves_itself_with_one_loopback_call():
    assert lane.self_check() is None


def test_a_lane_that_answers_wrongly_fails_its_self_check(monkeypatch):
    _altered_reply(monkeypatch)
    reason = lane.self_check()
    assert reason is not None and "altered" in reason


def test_with_the_lane_the_model_info_and_metrics_say_so(mnist):
    with running_server(metrics_address="127.0.0.1:0") as app:
        assert app.lane is not None
        assert _model_info(app.address).inference_path == "lane"
        assert _lane_active_metric(app.metrics_address) == 1


def test_a_failed_self_check_falls_back_to_the_handler_threads_visibly(mnist, monkeypatch, caplog):
    _altered_reply(monkeypatch)
    caplog.set_level("WARNING", logger="mnist_edge.server")
    with running_server(metrics_address="127.0.0.1:0") as app:
        assert app.lane is None
        g = gate(app)
        ch, s = stub(app.address)
        with ch:
            images = mnist.test.images[:2]
            _, ref = ort_reference(app.core.model.file, images)
            assert digits(s.ModelInfer(request(images), timeout=10)) == ref.tolist()
            native = dpb_grpc.DigitClassifierStub(ch).Classify(
                dpb.ClassifyRequest(images=[dpb.Image(pixels=images[0].tobytes())]), timeout=10
            )
            assert native.predictions[0].digit == ref[0]
        assert all(name.startswith("rpc") for name in g.threads), g.threads
        assert _model_info(app.address).inference_path == "handler-threads"
        assert _lane_active_metric(app.metrics_address) == 0
    warnings = [r.getMessage() for r in caplog.records if "self-check failed" in r.getMessage()]
    assert warnings and "altered" in warnings[0], [r.getMessage() for r in caplog.records]
