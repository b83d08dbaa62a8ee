"""`mnist-edge serve --precision ort` serves the ORT-format copy of the int8 model."""

from __future__ import annotations

import grpc
import numpy as np

from helpers.servers import running_server
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc


def _digits(address: str, images: np.ndarray) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        req = pb.ModelInferRequest(
            model_name="mnist",
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
            raw_input_contents=[np.ascontiguousarray(images).tobytes()],
        )
        resp = pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    return np.frombuffer(resp.raw_output_contents[1], "<i8").tolist()


def test_the_ort_format_model_serves_the_same_digits_as_the_onnx_one(mnist):
    images = mnist.test.images[:1000]
    with running_server(precision="ort") as app:
        assert app.core.model.precision == "int8" and app.core.model.file.suffix == ".ort"
        ort_digits = _digits(app.address, images)
    with running_server() as app:
        onnx_digits = _digits(app.address, images)
    assert ort_digits == onnx_digits
    assert np.mean(np.array(ort_digits) == mnist.test.labels[:1000]) > 0.98
