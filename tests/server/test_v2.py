"""Open Inference Protocol over a real server: answers as docs/design.md lists them, and every error row."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.protos.inference import model_config_pb2 as mc

Tensor = pb.ModelInferRequest.InferInputTensor
Output = pb.ModelInferRequest.InferRequestedOutputTensor


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(server, mnist):
    from helpers.servers import ort_reference

    images = mnist.test.images[:64]
    return images, *ort_reference(server.core.model.file, images)


def infer_request(images: np.ndarray, datatype: str = "UINT8", shape=None, **kw) -> pb.ModelInferRequest:
    n = len(images)
    shape = shape or [n, 28, 28]
    raw = images.astype(np.uint8).tobytes() if datatype == "UINT8" else (images.astype(np.float32) / 255.0).tobytes()
    return pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype=datatype, shape=shape)], raw_input_contents=[raw], **kw)


def outputs(resp: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    out = {}
    for tensor, raw in zip(resp.outputs, resp.raw_output_contents):
        dtype = {"FP32": "<f4", "INT64": "<i8"}[tensor.datatype]
        out[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))
    return out


def assert_status(call, code: grpc.StatusCode, *fragments: str):
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, (info.value.code(), info.value.details())
    for fragment in fragments:
        assert fragment in info.value.details(), info.value.details()
    return info.value.details()


# -- health and metadata ---------------------------------------------------------------

def test_live_ready_and_model_ready(stub, server):
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="mnist")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="mnist", version=server.core.model.version)).ready
    assert_status(lambda: stub.ModelReady(pb.ModelReadyRequest(name="cifar")), grpc.StatusCode.NOT_FOUND, "unknown model 'cifar'")


def test_server_metadata(stub):
    from mnist_edge import __version__

    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "mnist-edge" and meta.version == __version__
    assert list(meta.extensions) == ["model_configuration", "statistics"]


def test_model_metadata(stub, server):
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="mnist"))
    assert meta.name == "mnist" and list(meta.versions) == [server.core.model.version]
    assert meta.platform == "onnxruntime_onnx"
    # `image`: encoded files, one per batch item (server/images.py); a request sends one of the two
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixels", "UINT8", [-1, 28, 28]), ("image", "BYTES", [-1, 1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("probabilities", "FP32", [-1, 10]), ("digit", "INT64", [-1])]


def test_model_config(stub, server):
    cfg = stub.ModelConfig(pb.ModelConfigRequest(name="mnist")).config
    assert cfg.name == "mnist" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == server.settings.max_request_images == 1024
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in cfg.input] == [("pixels", mc.TYPE_UINT8, [28, 28], True), ("image", mc.TYPE_STRING, [1], True)]
    outs = {o.name: o for o in cfg.output}
    assert outs["probabilities"].data_type == mc.TYPE_FP32 and list(outs["probabilities"].dims) == [10]
    assert outs["digit"].data_type == mc.TYPE_INT64 and list(outs["digit"].dims) == [1]
    assert outs["digit"].HasField("reshape") and list(outs["digit"].reshape.shape) == []
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == server.settings.max_queue


# -- inference -------------------------------------------------------------------------

@pytest.mark.parametrize("datatype", ["UINT8", "FP32"])
@pytest.mark.parametrize("flat", [False, True])
def test_raw_inputs_in_every_accepted_form(stub, reference, datatype, flat):
    images, probs, digits = reference
    shape = [len(images), 784] if flat else [len(images), 28, 28]
    resp = stub.ModelInfer(infer_request(images, datatype, shape, id=f"req-{datatype}-{flat}"))
    assert resp.id == f"req-{datatype}-{flat}" and resp.model_name == "mnist"
    out = outputs(resp)
    assert [t.name for t in resp.outputs] == ["probabilities", "digit"]
    np.testing.assert_array_equal(out["digit"], digits)
    np.testing.assert_allclose(out["probabilities"], probs, atol=1e-6)


def test_typed_contents(stub, reference):
    images, probs, digits = reference
    n = 5
    req = pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[n, 28, 28], contents=pb.InferTensorContents(uint_contents=images[:n].reshape(-1).tolist()))])
    np.testing.assert_array_equal(outputs(stub.ModelInfer(req))["digit"], digits[:n])
    req = pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="FP32", shape=[n, 784], contents=pb.InferTensorContents(fp32_contents=(images[:n].reshape(-1) / 255.0).tolist()))])
    np.testing.assert_array_equal(outputs(stub.ModelInfer(req))["digit"], digits[:n])


def test_fp32_conversion_rounds_half_up(server):
    from mnist_edge.server.v2 import fp32_to_uint8

    x = np.array([0.0, 0.5 / 255, 0.49 / 255, 1.0, 254.5 / 255, 0.999999], dtype=np.float32)
    assert fp32_to_uint8(x).tolist() == [0, 1, 0, 255, 255, 255]


def test_output_selection_keeps_the_requested_order(stub, reference):
    images, _, digits = reference
    resp = stub.ModelInfer(infer_request(images[:3], outputs=[Output(name="digit")]))
    assert [t.name for t in resp.outputs] == ["digit"] and len(resp.raw_output_contents) == 1
    np.testing.assert_array_equal(outputs(resp)["digit"], digits[:3])
    resp = stub.ModelInfer(infer_request(images[:3], outputs=[Output(name="digit"), Output(name="probabilities")]))
    assert [t.name for t in resp.outputs] == ["digit", "probabilities"]


def test_version_is_accepted_when_it_is_the_served_one(stub, server, reference):
    images, _, digits = reference
    resp = stub.ModelInfer(infer_request(images[:2], model_version=server.core.model.version))
    assert resp.model_version == server.core.model.version


# -- every error row -----------------------------------------------------------------

def _good(stub, reference):
    images, _, digits = reference
    np.testing.assert_array_equal(outputs(stub.ModelInfer(infer_request(images[:4])))["digit"], digits[:4])


ERRORS = {
    "byte count": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])], raw_input_contents=[b"\0" * 783]), grpc.StatusCode.INVALID_ARGUMENT, ["input 'pixels': expected 784 bytes per image", "got 783"]),
    "shape": (lambda im: infer_request(im[:1], shape=[1, 27, 29]), grpc.StatusCode.INVALID_ARGUMENT, ["shape [1, 27, 29] not supported", "expected [N,28,28] or [N,784]"]),
    "rank": (lambda im: infer_request(im[:1], shape=[784]), grpc.StatusCode.INVALID_ARGUMENT, ["shape [784] not supported"]),
    "dtype": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="INT32", shape=[1, 28, 28])], raw_input_contents=[b"\0" * 3136]), grpc.StatusCode.INVALID_ARGUMENT, ["datatype 'INT32' not supported", "expected UINT8 or FP32"]),
    "pixel range": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="FP32", shape=[1, 784])], raw_input_contents=[np.full(784, 1.5, np.float32).tobytes()]), grpc.StatusCode.INVALID_ARGUMENT, ["range over [1.5, 1.5]", "expected values in [0, 1]"]),
    "negative": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="FP32", shape=[1, 784])], raw_input_contents=[np.full(784, -0.1, np.float32).tobytes()]), grpc.StatusCode.INVALID_ARGUMENT, ["expected values in [0, 1]"]),
    "NaN": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="FP32", shape=[1, 784])], raw_input_contents=[np.full(784, np.nan, np.float32).tobytes()]), grpc.StatusCode.INVALID_ARGUMENT, ["NaN or infinity"]),
    "typed uint8 over 255": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784], contents=pb.InferTensorContents(uint_contents=[256] * 784))]), grpc.StatusCode.INVALID_ARGUMENT, ["UINT8 value 256 out of range"]),
    "typed count": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784], contents=pb.InferTensorContents(uint_contents=[1] * 700))]), grpc.StatusCode.INVALID_ARGUMENT, ["expected 784 values in uint_contents", "got 700"]),
    "unknown input": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="img", datatype="UINT8", shape=[1, 784])], raw_input_contents=[b"\0" * 784]), grpc.StatusCode.INVALID_ARGUMENT, ["unknown input 'img'", "'pixels'"]),
    "image input not BYTES": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="image", datatype="UINT8", shape=[1])], raw_input_contents=[b"\0" * 784]), grpc.StatusCode.INVALID_ARGUMENT, ["input 'image'", "expected BYTES"]),
    "missing input": (lambda im: pb.ModelInferRequest(model_name="mnist"), grpc.StatusCode.INVALID_ARGUMENT, ["missing input 'pixels'"]),
    "duplicate input": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784])] * 2, raw_input_contents=[b"\0" * 784] * 2), grpc.StatusCode.INVALID_ARGUMENT, ["given 2 times, expected once"]),
    "no images": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[0, 28, 28])], raw_input_contents=[b""]), grpc.StatusCode.INVALID_ARGUMENT, ["holds no images (N=0)"]),
    "too many images": (lambda im: infer_request(np.zeros((1025, 28, 28), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT, ["1025 images in one request, over the limit of 1024 (--max-request-images)"]),
    "raw and typed": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784], contents=pb.InferTensorContents(uint_contents=[0] * 784))], raw_input_contents=[b"\0" * 784]), grpc.StatusCode.INVALID_ARGUMENT, ["both raw_input_contents and typed contents"]),
    "no data": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784])]), grpc.StatusCode.INVALID_ARGUMENT, ["no data"]),
    "request parameter": (lambda im: infer_request(im[:1], parameters={"priority": pb.InferParameter(int64_param=1)}), grpc.StatusCode.INVALID_ARGUMENT, ["request parameters 'priority' not supported", "accepts only 'triton_enable_empty_final_response' (ignored)"]),
    "ignored parameter of the wrong type": (lambda im: infer_request(im[:1], parameters={"triton_enable_empty_final_response": pb.InferParameter(string_param="yes")}), grpc.StatusCode.INVALID_ARGUMENT, ["'triton_enable_empty_final_response' is a string_param, expected a bool_param"]),
    "input parameter": (lambda im: pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784], parameters={"shared_memory_region": pb.InferParameter(string_param="x")})], raw_input_contents=[b"\0" * 784]), grpc.StatusCode.INVALID_ARGUMENT, ["'shared_memory_region' not supported"]),
    "class_count": (lambda im: infer_request(im[:1], outputs=[Output(name="probabilities", parameters={"classification": pb.InferParameter(int64_param=3)})]), grpc.StatusCode.INVALID_ARGUMENT, ["output 'probabilities' parameters 'classification' not supported"]),
    "unknown model": (lambda im: pb.ModelInferRequest(model_name="resnet", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[1, 784])], raw_input_contents=[b"\0" * 784]), grpc.StatusCode.NOT_FOUND, ["unknown model 'resnet'", "serves 'mnist'"]),
    "unknown version": (lambda im: infer_request(im[:1], model_version="999"), grpc.StatusCode.NOT_FOUND, ["no version '999'"]),
    "unknown output": (lambda im: infer_request(im[:1], outputs=[Output(name="logits")]), grpc.StatusCode.NOT_FOUND, ["unknown output 'logits'"]),
    "duplicate output": (lambda im: infer_request(im[:1], outputs=[Output(name="digit")] * 2), grpc.StatusCode.INVALID_ARGUMENT, ["requested twice"]),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_error_rows(stub, reference, name):
    build, code, fragments = ERRORS[name]
    images = reference[0]
    assert_status(lambda: stub.ModelInfer(build(images)), code, *fragments)
    _good(stub, reference)  # and the server still answers


def test_tritons_empty_final_response_flag_is_accepted_and_ignored(stub, reference):
    # perf_analyzer sends it on every call; for a non-decoupled model it changes nothing.
    images, _, digits = reference
    for flag in (True, False):
        req = infer_request(images[:2], parameters={"triton_enable_empty_final_response": pb.InferParameter(bool_param=flag)})
        np.testing.assert_array_equal(outputs(stub.ModelInfer(req))["digit"], digits[:2])


def test_model_metadata_unknown_model_and_version(stub):
    assert_status(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="x")), grpc.StatusCode.NOT_FOUND, "unknown model 'x'")
    assert_status(lambda: stub.ModelConfig(pb.ModelConfigRequest(name="mnist", version="77")), grpc.StatusCode.NOT_FOUND, "no version '77'")


def test_message_over_the_grpc_limit_is_resource_exhausted(server, reference):
    from helpers.servers import running_server

    # A server with a small message limit, so the test sends little; the limit is named in settings.
    with running_server(max_message_bytes=4 * 1024 * 1024, max_request_images=1024, max_image_bytes=1024 * 1024) as small:
        with grpc.insecure_channel(small.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]) as ch:
            s = pb_grpc.GRPCInferenceServiceStub(ch)
            big = pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[6000, 784])], raw_input_contents=[b"\0" * (6000 * 784)])
            assert_status(lambda: s.ModelInfer(big), grpc.StatusCode.RESOURCE_EXHAUSTED)
            images, _, digits = reference
            np.testing.assert_array_equal(outputs(s.ModelInfer(infer_request(images[:4])))["digit"], digits[:4])


def test_unexpected_error_is_internal_and_logged(reference, caplog):
    from helpers.servers import running_server
    from mnist_edge.server import model_store

    real = model_store.load(None)

    class Broken:
        def run(self, pixels):
            raise ZeroDivisionError("boom")

    def loader(settings):
        real.runner = Broken()
        return real

    with running_server(loader=loader) as app:
        with grpc.insecure_channel(app.address) as ch:
            s = pb_grpc.GRPCInferenceServiceStub(ch)
            details = assert_status(lambda: s.ModelInfer(infer_request(reference[0][:1])), grpc.StatusCode.INTERNAL, "internal error")
            assert "boom" not in details  # no internals leak to clients
            assert s.ServerLive(pb.ServerLiveRequest()).live
    logged = [r for r in caplog.records if "unexpected error in ModelInfer" in r.getMessage()]
    assert logged and logged[0].exc_info and "ZeroDivisionError" in caplog.text


def test_model_statistics_count_requests_and_batches(stub, reference):
    images = reference[0]
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist")).model_stats[0]
    stub.ModelInfer(infer_request(images[:3]))
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(infer_request(images[:1], shape=[1, 27, 29]))
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mnist")).model_stats[0]
    s0, s1 = before.inference_stats, after.inference_stats
    assert after.name == "mnist" and after.version == before.version
    assert s1.success.count == s0.success.count + 1 and s1.success.ns > s0.success.ns
    assert s1.fail.count == s0.fail.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count == before.execution_count + 1
    assert s1.queue.count == s0.queue.count + 1 and s1.compute_infer.count == s0.compute_infer.count + 1
    assert any(b.batch_size == 3 for b in after.batch_stats)
    # One count per successful request in every duration, as perf_analyzer requires.
    assert s1.success.count == s1.queue.count == s1.compute_input.count == s1.compute_infer.count == s1.compute_output.count
    assert after.last_inference > 0
    assert_status(lambda: stub.ModelStatistics(pb.ModelStatisticsRequest(name="other")), grpc.StatusCode.NOT_FOUND, "unknown model")


def test_concurrent_distinct_requests_get_their_own_answers(server, mnist):
    """Many callers at once, each with different images: batched, and routed back exactly."""
    from concurrent import futures

    from helpers.servers import ort_reference

    images = mnist.test.images[:600]
    _, digits = ort_reference(server.core.model.file, images)
    before = server.core.batcher.stats.batches
    requests_before = server.core.batcher.stats.requests

    def call(i: int):
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            s = pb_grpc.GRPCInferenceServiceStub(ch)
            got = []
            for j in range(i, len(images), 24):
                k = 1 + j % 3
                batch = images[j : j + k]
                got.append((j, outputs(s.ModelInfer(infer_request(batch), timeout=30))["digit"].tolist()))
            return got

    with futures.ThreadPoolExecutor(24) as pool:
        for results in pool.map(call, range(24)):
            for j, got in results:
                assert got == digits[j : j + len(got)].tolist(), j
    batches = server.core.batcher.stats.batches - before
    requests = server.core.batcher.stats.requests - requests_before
    assert batches < requests  # some requests shared a batch
