"""The Open Inference Protocol (KServe v2) as Triton's `inference.GRPCInferenceService`.

Transport at the edge: each RPC is decode -> core -> encode. The codecs turn a
ModelInferRequest into a uint8 [N,28,28] array (raw or typed contents, UINT8 or FP32,
[N,28,28] or [N,784], or encoded images in the BYTES input `image`: server/images.py) and
the results into raw output bytes; every rejection names
what was wrong and what was expected. ModelInfer is `ModelInferRpc` (server/rpc.py), one
handler for the inference lane and the handler threads; the other RPCs are plain servicer
methods.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import grpc
import numpy as np

from mnist_edge.imaging.normalize import ImageLimits
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.protos.inference import model_config_pb2 as mc
from mnist_edge.server import bounds, images
from mnist_edge.server.batching import Result
from mnist_edge.server.core import Core
from mnist_edge.server.errors import InvalidArgument, NotFound, grpc_errors
from mnist_edge.server.rpc import InferenceRpc, method_handler

INPUT = "pixels"
OUTPUT_NAMES = ("probabilities", "digit")
PLATFORM = "onnxruntime_onnx"
PIXELS_PER_IMAGE = 784
EXTENSIONS = ["model_configuration", "statistics"]


@dataclass
class DecodedRequest:
    pixels: np.ndarray  # uint8 [N, 28, 28]
    outputs: tuple[str, ...]
    request_id: str
    source: pb.ModelInferRequest | None = None  # the request as sent, when its images came encoded (input `image`)


# Request parameters that cannot change the answer of a non-decoupled model, accepted and
# ignored as Triton does: perf_analyzer sends triton_enable_empty_final_response on every call.
IGNORED_REQUEST_PARAMETERS = {"triton_enable_empty_final_response": "bool_param"}


def _params_error(where: str, params) -> InvalidArgument:
    names = ", ".join(sorted(repr(k) for k in params))
    return InvalidArgument(f"{where} {names} not supported: this server accepts no parameters")


def _check_request_parameters(params) -> None:
    unsupported = [k for k in params if k not in IGNORED_REQUEST_PARAMETERS]
    if unsupported:
        names = ", ".join(sorted(repr(k) for k in unsupported))
        accepted = ", ".join(repr(k) for k in IGNORED_REQUEST_PARAMETERS)
        raise InvalidArgument(f"request parameters {names} not supported: this server accepts only {accepted} (ignored)")
    for name, kind in IGNORED_REQUEST_PARAMETERS.items():
        if name in params and params[name].WhichOneof("parameter_choice") != kind:
            got = params[name].WhichOneof("parameter_choice")
            raise InvalidArgument(f"request parameter {name!r} is a {got}, expected a {kind}")


def _shape_images(shape, max_images: int) -> int:
    dims = list(shape)
    if len(dims) == 3 and dims[1:] == [28, 28]:
        n = dims[0]
    elif len(dims) == 2 and dims[1] == PIXELS_PER_IMAGE:
        n = dims[0]
    else:
        raise InvalidArgument(f"input '{INPUT}': shape {dims} not supported, expected [N,28,28] or [N,784]")
    if n <= 0:
        raise InvalidArgument(f"input '{INPUT}': shape {dims} holds no images (N={n}), expected N >= 1")
    if n > max_images:
        raise InvalidArgument(
            f"input '{INPUT}': {n} images in one request, over the limit of {max_images} (--max-request-images)"
        )
    return n


def fp32_to_uint8(x: np.ndarray) -> np.ndarray:
    """FP32 pixels in [0,1] -> uint8 by clip(floor(x*255 + 0.5), 0, 255); rejects NaN/inf and out of range."""
    if not np.isfinite(x).all():
        raise InvalidArgument(f"input '{INPUT}': FP32 pixels contain NaN or infinity; expected values in [0, 1]")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise InvalidArgument(f"input '{INPUT}': FP32 pixel values range over [{lo:g}, {hi:g}], expected values in [0, 1]")
    return np.clip(np.floor(x * 255.0 + 0.5), 0, 255).astype(np.uint8)


def decode_infer(request: pb.ModelInferRequest, max_images: int, limits: ImageLimits | None = None) -> DecodedRequest:
    """The request's images as uint8 [N,28,28], its outputs and id. With `limits`, the BYTES
    input `image` (encoded files) is taken in place of `pixels`."""
    # Fast path: the common, valid request (one raw UINT8 [N,28,28] input, nothing else),
    # checked with a handful of field reads; anything else takes the full path below.
    raw_list = request.raw_input_contents
    inputs = request.inputs
    if len(raw_list) == 1 and len(inputs) == 1:
        t = inputs[0]
        shape = t.shape
        if (
            t.datatype == "UINT8" and t.name == INPUT and len(shape) == 3 and shape[1] == 28 and shape[2] == 28
            and 0 < shape[0] <= max_images and len(raw_list[0]) == shape[0] * PIXELS_PER_IMAGE
            and not request.outputs and not request.parameters and not t.parameters and not t.HasField("contents")
        ):
            n = shape[0]
            return DecodedRequest(np.frombuffer(raw_list[0], dtype=np.uint8).reshape(n, 28, 28), OUTPUT_NAMES, request.id)
    if limits is not None:
        converted = images.pixels_request(request, max_images, limits)
        if converted is not None:
            decoded = decode_infer(converted, max_images)
            decoded.source = request
            return decoded
    return _decode_general(request, max_images)


def _decode_general(request: pb.ModelInferRequest, max_images: int) -> DecodedRequest:
    if request.parameters:
        _check_request_parameters(request.parameters)
    inputs = request.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        if not names:
            raise InvalidArgument(f"missing input '{INPUT}': the request has no inputs")
        unknown = [n for n in names if n != INPUT]
        if unknown:
            raise InvalidArgument(f"unknown input {unknown[0]!r}: the model has one input, '{INPUT}'")
        raise InvalidArgument(f"input '{INPUT}' given {len(names)} times, expected once")
    tensor = inputs[0]
    if tensor.parameters:
        raise _params_error(f"input '{INPUT}' parameters", tensor.parameters)
    datatype = tensor.datatype
    if datatype not in ("UINT8", "FP32"):
        raise InvalidArgument(f"input '{INPUT}': datatype {datatype!r} not supported, expected UINT8 or FP32")
    n = _shape_images(tensor.shape, max_images)
    count = n * PIXELS_PER_IMAGE
    raw_list = request.raw_input_contents
    has_typed = tensor.HasField("contents")
    if raw_list:
        if has_typed:
            raise InvalidArgument(
                f"input '{INPUT}': both raw_input_contents and typed contents given; send exactly one of them"
            )
        if len(raw_list) != 1:
            raise InvalidArgument(f"raw_input_contents has {len(raw_list)} entries, expected 1 (one per input)")
        raw = raw_list[0]
        itemsize = 1 if datatype == "UINT8" else 4
        if len(raw) != count * itemsize:
            raise InvalidArgument(
                f"input '{INPUT}': expected {PIXELS_PER_IMAGE * itemsize} bytes per image ({n} image{'s' if n != 1 else ''} "
                f"of {datatype}, {count * itemsize} bytes in all), got {len(raw)}"
            )
        if datatype == "UINT8":
            pixels = np.frombuffer(raw, dtype=np.uint8).reshape(n, 28, 28)
        else:
            pixels = fp32_to_uint8(np.frombuffer(raw, dtype="<f4")).reshape(n, 28, 28)
    elif has_typed:
        contents = tensor.contents
        if datatype == "UINT8":
            values = contents.uint_contents
            others = [f for f, _ in contents.ListFields() if f.name != "uint_contents"]
            if others:
                raise InvalidArgument(f"input '{INPUT}': UINT8 data goes in contents.uint_contents, got {others[0].name}")
            if len(values) != count:
                raise InvalidArgument(f"input '{INPUT}': expected {count} values in uint_contents ({n} x 784), got {len(values)}")
            arr = np.fromiter(values, dtype=np.uint32, count=count)
            if arr.max(initial=0) > 255:
                raise InvalidArgument(f"input '{INPUT}': UINT8 value {int(arr.max())} out of range, expected 0-255")
            pixels = arr.astype(np.uint8).reshape(n, 28, 28)
        else:
            values = contents.fp32_contents
            others = [f for f, _ in contents.ListFields() if f.name != "fp32_contents"]
            if others:
                raise InvalidArgument(f"input '{INPUT}': FP32 data goes in contents.fp32_contents, got {others[0].name}")
            if len(values) != count:
                raise InvalidArgument(f"input '{INPUT}': expected {count} values in fp32_contents ({n} x 784), got {len(values)}")
            pixels = fp32_to_uint8(np.fromiter(values, dtype=np.float32, count=count)).reshape(n, 28, 28)
    else:
        raise InvalidArgument(f"input '{INPUT}': no data; send raw_input_contents or contents")

    outputs: tuple[str, ...] = OUTPUT_NAMES
    if request.outputs:
        names = []
        for out in request.outputs:
            if out.name not in OUTPUT_NAMES:
                raise NotFound(f"unknown output {out.name!r}; the model's outputs are 'probabilities' and 'digit'")
            if out.parameters:
                raise _params_error(f"output '{out.name}' parameters", out.parameters)
            if out.name in names:
                raise InvalidArgument(f"output {out.name!r} requested twice")
            names.append(out.name)
        outputs = tuple(names)
    return DecodedRequest(pixels=pixels, outputs=outputs, request_id=request.id)


_OutputTensor = pb.ModelInferResponse.InferOutputTensor


def encode_infer(model_name: str, version: str, decoded: DecodedRequest, probs: np.ndarray, digits: np.ndarray) -> pb.ModelInferResponse:
    n = probs.shape[0]
    if decoded.outputs is OUTPUT_NAMES:  # the common case: both outputs, in the model's order
        return pb.ModelInferResponse(
            model_name=model_name,
            model_version=version,
            id=decoded.request_id,
            outputs=[
                _OutputTensor(name="probabilities", datatype="FP32", shape=(n, 10)),
                _OutputTensor(name="digit", datatype="INT64", shape=(n,)),
            ],
            raw_output_contents=[_le_bytes(probs, "<f4"), _le_bytes(digits, "<i8")],
        )
    tensors, raws = [], []
    for name in decoded.outputs:
        if name == "probabilities":
            tensors.append(_OutputTensor(name=name, datatype="FP32", shape=(n, 10)))
            raws.append(_le_bytes(probs, "<f4"))
        else:
            tensors.append(_OutputTensor(name=name, datatype="INT64", shape=(n,)))
            raws.append(_le_bytes(digits, "<i8"))
    return pb.ModelInferResponse(model_name=model_name, model_version=version, id=decoded.request_id, outputs=tensors, raw_output_contents=raws)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2); every field number used here is < 16."""
    return bytes(((number << 3) | 2,)) + _varint(len(payload)) + payload


@functools.lru_cache(maxsize=4096)
def _response_parts(model_name: str, version: str, n: int) -> tuple[bytes, bytes, bytes, bytes]:
    """The constant bytes of a both-outputs ModelInferResponse for `n` images: the fields before
    `id`, the two output tensors, and the headers of the two raw_output_contents entries."""
    head = (_len_field(1, model_name.encode()) if model_name else b"") + (_len_field(2, version.encode()) if version else b"")
    probs = _len_field(1, b"probabilities") + _len_field(2, b"FP32") + _len_field(3, _varint(n) + _varint(10))
    digit = _len_field(1, b"digit") + _len_field(2, b"INT64") + _len_field(3, _varint(n))
    outputs = _len_field(5, probs) + _len_field(5, digit)
    return head, outputs, b"\x32" + _varint(40 * n), b"\x32" + _varint(8 * n)


def encode_infer_bytes(model_name: str, version: str, request_id: str, probs: np.ndarray, digits: np.ndarray) -> bytes:
    """The serialized ModelInferResponse carrying both outputs, written directly: the same
    message `encode_infer` builds (tests parse both and compare), without building protobuf
    objects on the hot path. Fields in field-number order, as protobuf serializers write them."""
    n = probs.shape[0]
    head, outputs, probs_header, digits_header = _response_parts(model_name, version, n)
    rid = _len_field(3, request_id.encode()) if request_id else b""
    return b"".join((head, rid, outputs, probs_header, _le_bytes(probs, "<f4"), digits_header, _le_bytes(digits, "<i8")))


def response_bytes(decoded: DecodedRequest, result: Result) -> bytes:
    """The serialized ModelInferResponse for `result`: written directly in the common case,
    through protobuf when the request chose its outputs."""
    model = result.tag
    if decoded.outputs is OUTPUT_NAMES:
        return encode_infer_bytes(model.name, model.version, decoded.request_id, result.probabilities, result.digits)
    return encode_infer(model.name, model.version, decoded, result.probabilities, result.digits).SerializeToString()


def _le_bytes(a: np.ndarray, dtype: str) -> bytes:
    """Raw little-endian bytes, as the protocol specifies (a copy only if the array is not already so)."""
    return a.tobytes() if a.dtype == np.dtype(dtype) and a.flags.c_contiguous else np.ascontiguousarray(a, dtype=dtype).tobytes()


def model_statistics(stats, name: str, version: str) -> pb.ModelStatistics:
    def d(x) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=x.count, ns=x.ns)

    with stats.locked():
        return pb.ModelStatistics(
            name=name,
            version=version,
            last_inference=stats.last_inference_ms,
            inference_count=stats.inference_count,
            execution_count=stats.execution_count,
            inference_stats=pb.InferStatistics(
                success=d(stats.success),
                fail=d(stats.fail),
                queue=d(stats.queue),
                compute_input=d(stats.compute_input),
                compute_infer=d(stats.compute_infer),
                compute_output=d(stats.compute_output),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_infer=pb.StatisticDuration(count=b.count, ns=b.compute_infer_ns),
                )
                for size, b in sorted(stats.batches.items())
            ],
        )


class ModelInferRpc(InferenceRpc[DecodedRequest]):
    """ModelInfer, written once for the lane and the handler threads (server/rpc.py)."""

    api = "v2"
    method = "ModelInfer"
    request_type = pb.ModelInferRequest

    def __init__(self, core: Core, offload=None) -> None:
        super().__init__(core, offload)
        s = core.settings
        self.limits = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def needs_thread(self, request: pb.ModelInferRequest) -> bool:
        return images.has_image(request)  # decoding image files may take long: not on the lane

    def read(self, message: bytes) -> pb.ModelInferRequest:
        bounds.check_model_infer(message)  # junk is refused before protobuf parses it
        return super().read(message)

    def pinned(self, request: pb.ModelInferRequest):
        # A request for another model (or version) is not counted in this model's statistics.
        model = self.core.check_model(request.model_name, request.model_version)
        return model if request.model_version and model is not self.core.model else None

    def request_id(self, request: pb.ModelInferRequest) -> str | None:
        return request.id or None

    def decode(self, request: pb.ModelInferRequest) -> DecodedRequest:
        return decode_infer(request, self.core.settings.max_request_images, self.limits)

    def encode(self, decoded: DecodedRequest, result: Result | None) -> bytes:
        return response_bytes(decoded, result)

    def capture_source(self, decoded: DecodedRequest):
        source = decoded.source
        if source is None:
            return decoded.request_id, None
        elements: list[bytes] = []

        def original(j: int) -> bytes:
            if not elements:  # split the request's BYTES tensor only when an image is kept
                elements.extend(images.image_elements(source, len(decoded.pixels)))
            return elements[j]

        return decoded.request_id, original


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: Core, server_version: str, offload=None) -> None:
        self.core = core
        self.server_version = server_version
        # `offload`: where the inference lane sends requests with encoded images (a handler pool's submit).
        self.model_infer = ModelInferRpc(core, offload)

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.core.ready)

    @grpc_errors(pb.ModelReadyResponse)
    def ModelReady(self, request, context):
        model = self.core.model
        if model is None or not self.core.ready:
            return pb.ModelReadyResponse(ready=False)
        self.core.check_model(request.name, request.version)  # NOT_FOUND, unless current or in its grace period
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request, context):
        # Which process answered: with --workers N, operators (and tests) can see the spread.
        context.set_trailing_metadata((("mnist-edge-pid", str(os.getpid())),))
        return pb.ServerMetadataResponse(name="mnist-edge", version=self.server_version, extensions=list(EXTENSIONS))

    @grpc_errors(pb.ModelMetadataResponse)
    def ModelMetadata(self, request, context):
        model = self.core.check_model(request.name, request.version)
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            # The current version first, then one in its grace period after a reload.
            versions=[model.version] if request.version else [m.version for m in self.core.versions()],
            platform=PLATFORM,
            # A request sends one of the two; `image` is one encoded file per batch item.
            inputs=[tm(name=INPUT, datatype="UINT8", shape=[-1, 28, 28]), tm(name=images.IMAGE_INPUT, datatype="BYTES", shape=[-1, 1])],
            outputs=[tm(name="probabilities", datatype="FP32", shape=[-1, 10]), tm(name="digit", datatype="INT64", shape=[-1])],
        )

    @grpc_errors(pb.ModelConfigResponse)
    def ModelConfig(self, request, context):
        model = self.core.check_model(request.name, request.version)
        s = self.core.settings
        config = mc.ModelConfig(
            name=model.name,
            platform=PLATFORM,
            backend="onnxruntime",
            max_batch_size=s.max_request_images,
            input=[
                mc.ModelInput(name=INPUT, data_type=mc.TYPE_UINT8, dims=[28, 28], optional=True),
                mc.ModelInput(name=images.IMAGE_INPUT, data_type=mc.TYPE_STRING, dims=[1], optional=True),
            ],
            output=[
                mc.ModelOutput(name="probabilities", data_type=mc.TYPE_FP32, dims=[10]),
                mc.ModelOutput(name="digit", data_type=mc.TYPE_INT64, dims=[1], reshape=mc.ModelTensorReshape(shape=[])),
            ],
            dynamic_batching=mc.ModelDynamicBatching(
                max_queue_delay_microseconds=s.max_queue_delay_us,
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=s.max_queue),
            ),
            version_policy=mc.ModelVersionPolicy(specific=mc.ModelVersionPolicy.Specific(versions=[int(model.version)])),
            instance_group=[mc.ModelInstanceGroup(name="cpu", kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
        )
        return pb.ModelConfigResponse(config=config)

    def ModelInfer(self, message: bytes, context) -> bytes:
        """ModelInfer on the handler threads: registered by `model_infer_handler`, request and
        response as bytes."""
        return self.model_infer.serve_context(message, context)

    def model_infer_group(self, calls) -> None:
        """ModelInfer for calls that arrived together on the inference lane (server/lane.py)."""
        self.model_infer.serve_group(calls)

    @grpc_errors(pb.ModelStatisticsResponse)
    def ModelStatistics(self, request, context):
        model = self.core.model
        if model is None:
            self.core.serving_model()  # raises UNAVAILABLE while loading
        chosen = self.core.check_model(request.name, request.version) if request.name else None
        # Per version, as Triton reports them: a version in its grace period has its own.
        models = [m for m in self.core.versions() if not request.version or m is chosen]
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(self.core.stats_for(m), m.name, m.version) for m in models])


def model_infer_handler(servicer: InferenceServicer) -> grpc.RpcMethodHandler:
    """ModelInfer for the handler threads, in place of the generated registration: the request
    is read and the response written by `ModelInferRpc`, as on the lane."""
    return method_handler(servicer.ModelInfer)
