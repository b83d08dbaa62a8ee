"""server/bounds.py: junk in a request is refused from its wire bytes, with a short message,
before protobuf parses it (issue 18)."""

from __future__ import annotations

import time

import pytest

from mnist_edge.protos.digits.v1 import digits_pb2
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.server import bounds
from mnist_edge.server.errors import MAX_DETAILS_CHARS, InvalidArgument, bounded

Tensor = pb.ModelInferRequest.InferInputTensor


def refusal(raw: bytes) -> str:
    with pytest.raises(InvalidArgument) as info:
        bounds.check_model_infer(raw)
    return info.value.message


def million_parameters_request(count: int = 1_000_000) -> bytes:
    """A ModelInferRequest with `count` parameters "k000000": true (~15 MB for a million), written directly
    (protobuf takes seconds to build it); `pb.ModelInferRequest.FromString` reads it back."""
    head = pb.ModelInferRequest(model_name="mnist").SerializeToString()
    return head + b"".join(b"\x22\x0d\x0a\x07k%06d\x12\x02\x08\x01" % i for i in range(count))


@pytest.fixture(scope="module")
def million_parameters() -> bytes:
    return million_parameters_request()


def test_the_written_request_is_what_protobuf_reads():
    parsed = pb.ModelInferRequest.FromString(million_parameters_request(3))
    assert sorted(parsed.parameters) == ["k000000", "k000001", "k000002"] and parsed.parameters["k000001"].bool_param


def test_a_million_parameters_are_refused_in_a_short_message_without_parsing_them(million_parameters):
    started = time.perf_counter()
    message = refusal(million_parameters)
    # The walk stops at the bound: a guard against a full scan (which takes ~0.5 s), not a timing target.
    assert time.perf_counter() - started < 0.25
    assert len(message) < 300 and "more than 32 parameters" in message and "e.g. 'k" in message


@pytest.mark.parametrize(
    ("request_", "says"),
    [
        (pb.ModelInferRequest(inputs=[Tensor(name="x" * 10_000_000)]), "input #1 name 'xxxx"),
        (pb.ModelInferRequest(inputs=[Tensor(name="pixels", shape=list(range(2_000_000)))]), "2,000,000 dimensions"),
        (pb.ModelInferRequest(inputs=[Tensor(name="pixels", datatype="U" * 5000)]), "datatype"),
        (pb.ModelInferRequest(model_name="m" * 300), "model name"),
        (pb.ModelInferRequest(id="é" * 5000), "request id"),
        (pb.ModelInferRequest(inputs=[Tensor(name="pixels")] * 9), "more than 8 inputs"),
        (pb.ModelInferRequest(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="o" * 1000)]), "requested output #1 name"),
        (pb.ModelInferRequest(raw_input_contents=[b""] * 9), "raw_input_contents"),
    ],
)
def test_each_shape_of_junk_is_named_in_a_short_message(request_, says):
    message = refusal(request_.SerializeToString())
    assert says in message and len(message) < 300, message


def test_parameter_names_and_values_are_bounded():
    r = pb.ModelInferRequest()
    r.parameters["k" * 1000].bool_param = True
    assert "parameter name" in refusal(r.SerializeToString())
    r = pb.ModelInferRequest()
    r.inputs.add(name="pixels").parameters["p"].string_param = "v" * 100_000
    assert "input #1 parameter value" in refusal(r.SerializeToString())
    r = pb.ModelInferRequest()
    tensor = r.inputs.add(name="pixels")
    for i in range(33):
        tensor.parameters[f"p{i}"].int64_param = i
    assert "input #1 has more than 32 parameters" in refusal(r.SerializeToString())


def test_ordinary_requests_pass():
    ok = [
        pb.ModelInferRequest(model_name="mnist", id="abc", inputs=[Tensor(name="pixels", datatype="UINT8", shape=[2, 28, 28])], raw_input_contents=[b"\0" * 1568]),
        pb.ModelInferRequest(model_name="mnist", inputs=[Tensor(name="pixels", datatype="FP32", shape=[1, 784], contents=pb.InferTensorContents(fp32_contents=[0.5] * 784))],
                             outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="digit")]),
        pb.ModelInferRequest(),
    ]
    r = pb.ModelInferRequest(model_name="mnist")
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    ok.append(r)
    for request in ok:
        bounds.check_model_infer(request.SerializeToString())


def test_broken_wire_format_is_invalid_argument():
    assert "breaks at byte" in refusal(b"\xff\xff\xff")
    assert "breaks at byte" in refusal(b"\x2a\x10abc")  # a length past the end


def test_classify_requests_are_bounded_in_images_and_id():
    many = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=b"")] * 1025).SerializeToString()
    with pytest.raises(InvalidArgument, match="1025 images in one request, over the limit of 1024"):
        bounds.check_classify(many, 1024)
    lots = digits_pb2.ClassifyRequest(images=[digits_pb2.Image()] * 1_000_000).SerializeToString()
    with pytest.raises(InvalidArgument, match="more than 2048 images in one request"):
        bounds.check_classify(lots, 1024)
    with pytest.raises(InvalidArgument, match="request_id"):
        bounds.check_classify(digits_pb2.ClassifyRequest(request_id="r" * 10_000).SerializeToString(), 1024)
    bounds.check_classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=b"\0" * 784)] * 3, request_id="x").SerializeToString(), 1024)


def test_summaries_read_only_what_they_show():
    def endless():
        i = 0
        while True:
            yield f"k{i}"
            i += 1

    assert bounds.summarize(endless(), "parameters", count=1_000_000) == "1,000,000 parameters, e.g. 'k0', 'k1', 'k2', ..."
    assert bounds.summarize(["a"], "inputs", count=1) == "1 inputs, e.g. 'a'"
    assert bounds.quote("x" * 10_000_000).endswith("...") and len(bounds.quote("x" * 10_000_000)) < 50


def test_every_status_message_is_bounded_on_its_way_out():
    assert len(bounded("y" * 1_000_000)) <= MAX_DETAILS_CHARS
    assert bounded("short") == "short"


def test_a_million_repeats_of_one_field_are_refused_without_parsing_them():
    name = pb.ModelInferRequest.InferInputTensor(name="pixels").SerializeToString()  # "\x0a\x06pixels"
    tensor = name * 1_000_000
    raw = b"\x2a" + bytes(_varint(len(tensor))) + tensor  # one input whose name field comes a million times
    assert "input #1 has more than 16 repeated or unknown fields" in refusal(raw)
    dims = b"\x18\x01" * 1_000_000  # a million unpacked shape dimensions
    raw = b"\x2a" + bytes(_varint(len(dims))) + dims
    assert "shape has more than" in refusal(raw) and "dimensions" in refusal(raw)
    assert "more than 16 repeated or unknown fields" in refusal(b"\x0a\x01m" * 1_000_000)  # model_name a million times


def _varint(n: int) -> list[int]:
    out = []
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return [*out, n]
