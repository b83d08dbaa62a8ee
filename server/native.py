"""The native API for devices: `digits.v1.DigitClassifier`.

Raw 784-byte images are used as they are; encoded images (PNG, JPEG, BMP, PGM of any
size) are checked from their header, decoded and normalised MNIST-style by `imaging`,
the same code training and the client use. A bad image gets its own
`Prediction.error` and the others are still answered. A message that fails as a whole
(no images, too many, overload) fails a unary call with that status; on a stream it
gets a response carrying `ClassifyResponse.error` and the stream goes on.

Unary Classify is `ClassifyRpc` (server/rpc.py), one handler for the inference lane and the
handler threads; ClassifyStream uses its decode and response.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from mnist_edge.imaging.normalize import ImageError, ImageLimits, normalize_encoded
from mnist_edge.protos.digits.v1 import digits_pb2 as pb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc
from mnist_edge.server import bounds
from mnist_edge.server.batching import Result
from mnist_edge.server.core import Core, State
from mnist_edge.server.errors import (
    InvalidArgument,
    ServingError,
    Unavailable,
    abort,
    grpc_errors,
    log,
    status_of,
)
from mnist_edge.server.rpc import InferenceRpc, metadata_value, method_handler

PIXELS = 784
STREAM_API = "native_stream"  # ClassifyStream's label in the statistics
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _error(code: grpc.StatusCode, message: str) -> pb.Error:
    return pb.Error(code=code.value[0], message=message)


@dataclass
class DecodedClassify:
    """A ClassifyRequest checked and decoded: the usable images as one batch, and each image's error."""

    request: pb.ClassifyRequest
    good: list[int]  # indices of the usable images, in request order
    pixels: np.ndarray | None  # uint8 [len(good),28,28]; None when every image was refused
    errors: list[pb.Error | None]  # per image: why it was refused, or None


class ClassifyRpc(InferenceRpc[DecodedClassify]):
    """Classify, written once for the lane and the handler threads (server/rpc.py); the
    stream reuses its decode and response."""

    api = "native"
    method = "Classify"
    request_type = pb.ClassifyRequest

    def __init__(self, core: Core, offload: Callable[..., object] | None = None) -> None:
        super().__init__(core, offload)
        s = core.settings
        self.limits = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def read(self, message: bytes) -> pb.ClassifyRequest:
        bounds.check_classify(message, self.core.settings.max_request_images)  # junk is refused before protobuf parses it
        return super().read(message)

    def request_id(self, request: pb.ClassifyRequest) -> str | None:
        return request.request_id or None

    def needs_thread(self, request: pb.ClassifyRequest) -> bool:
        return any(image.WhichOneof("data") == "encoded" for image in request.images)

    def decode(self, request: pb.ClassifyRequest) -> DecodedClassify:
        self.core.serving_model()  # UNAVAILABLE while loading
        images = request.images
        n = len(images)
        limit = self.core.settings.max_request_images
        if n == 0:
            raise InvalidArgument(f"no images: ClassifyRequest.images is empty, expected 1 to {limit} images")
        if n > limit:
            raise InvalidArgument(f"{n} images in one request, over the limit of {limit} (--max-request-images)")
        arrays: list[np.ndarray | None] = [None] * n
        errors: list[pb.Error | None] = [None] * n
        for i, image in enumerate(images):
            kind = image.WhichOneof("data")
            if kind == "pixels":
                raw = image.pixels
                if len(raw) != PIXELS:
                    errors[i] = pb.Error(
                        code=_INVALID,
                        message=f"image {i}: pixels must be exactly 784 bytes (28x28 uint8, row-major), got {len(raw)}",
                    )
                else:
                    arrays[i] = np.frombuffer(raw, dtype=np.uint8).reshape(28, 28)
            elif kind == "encoded":
                try:
                    arrays[i] = normalize_encoded(image.encoded, self.limits)
                except ImageError as exc:
                    errors[i] = pb.Error(code=_INVALID, message=f"image {i}: {exc}")
            else:
                errors[i] = pb.Error(code=_INVALID, message=f"image {i}: empty, expected pixels (784 bytes) or encoded image bytes")
        good = [i for i, a in enumerate(arrays) if a is not None]
        if not good:
            pixels = None
        elif len(good) == 1:
            pixels = arrays[good[0]][None]
        else:
            pixels = np.stack([arrays[i] for i in good])
        return DecodedClassify(request, good, pixels, errors)

    def response(self, decoded: DecodedClassify, result: Result | None) -> pb.ClassifyResponse:
        request = decoded.request
        predictions = [pb.Prediction() for _ in decoded.errors]
        if result is not None:
            probs, digits, model = result.probabilities, result.digits, result.tag
            version = model.version
            want_probs = request.return_probabilities
            want_image = request.return_normalized_image
            batch = decoded.pixels
            for j, i in enumerate(decoded.good):
                p = predictions[i]
                p.digit = int(digits[j])
                p.confidence = float(probs[j, digits[j]])
                if want_probs:
                    p.probabilities.extend(probs[j].tolist())
                if want_image:
                    p.normalized_image = batch[j].tobytes()
        else:
            version = self.core.serving_model().version
        for i, err in enumerate(decoded.errors):
            if err is not None:
                predictions[i].error.CopyFrom(err)
        return pb.ClassifyResponse(predictions=predictions, model_version=version, request_id=request.request_id)

    def encode(self, decoded: DecodedClassify, result: Result | None) -> bytes:
        return self.response(decoded, result).SerializeToString()

    def capture_source(self, decoded: DecodedClassify):
        images, good = decoded.request.images, decoded.good

        def original(j: int) -> bytes | None:
            image = images[good[j]]
            return image.encoded if image.WhichOneof("data") == "encoded" else None

        return decoded.request.request_id, original


class DigitClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, core: Core, offload: Callable[..., object] | None = None) -> None:
        self.core = core
        # `offload`: where the inference lane sends requests with encoded images (a handler
        # pool's submit): decoding them may take long, and the lane thread must not wait on it.
        self.classify = ClassifyRpc(core, offload)

    def Classify(self, message: bytes, context) -> bytes:
        """Classify on the handler threads: registered by `classify_handler`, request and
        response as bytes."""
        return self.classify.serve_context(message, context)

    def classify_group(self, calls) -> None:
        """Classify for calls that arrived together on the inference lane (server/lane.py)."""
        self.classify.serve_group(calls)

    def ClassifyStream(self, request_iterator, context):
        rpc = self.classify
        now = time.perf_counter_ns
        access = self.core.access_log
        for request in request_iterator:
            if self.core.state is State.STOPPING:
                # Shutdown is one of the two things that end a stream (authentication is the other).
                abort(context, Unavailable("the server is shutting down; reconnect to another replica"), "ClassifyStream")
                return
            t0 = now()
            try:
                decoded = rpc.decode(request)
                t1 = now()
                result = None
                if decoded.pixels is not None:
                    result = self.core.classify(decoded.pixels, context.time_remaining(), lambda: not context.is_active())
                t2 = now()
                response = rpc.response(decoded, result)
            except Exception as exc:  # noqa: BLE001 - a failed message does not end the stream
                self.core.stats.record_request(STREAM_API, status_of(exc).name, now() - t0)
                if access is not None:
                    access.record(api="native", method="ClassifyStream", status=status_of(exc).name, duration_ns=now() - t0,
                                  request_id=request.request_id or None, peer=context.peer(), metadata=context.invocation_metadata(),
                                  context=context)
                if not isinstance(exc, ServingError):
                    log.error("unexpected error in ClassifyStream", exc_info=exc)
                    message = f"internal error: {type(exc).__name__}; the server logged the traceback"
                else:
                    message = exc.message
                yield pb.ClassifyResponse(request_id=request.request_id, error=_error(status_of(exc), message))
                continue
            rpc.record_success(STREAM_API, t0, t1, t2, now(), result)
            if access is not None:  # one line per message: each is a request of its own
                access.record(api="native", method="ClassifyStream", status="OK", duration_ns=now() - t0,
                              request_id=request.request_id or None, images=0 if decoded.pixels is None else len(decoded.pixels),
                              queue_s=result.queue_s if result else 0.0, compute_s=result.compute_s if result else 0.0,
                              peer=context.peer(), metadata=context.invocation_metadata(), context=context)
            if rpc.capture is not None and result is not None:
                rpc.offer_capture(STREAM_API, decoded, result, lambda name: metadata_value(context.invocation_metadata(), name))
            yield response

    @grpc_errors(pb.ModelInfo)
    def GetModelInfo(self, request, context):
        model = self.core.serving_model()
        return pb.ModelInfo(
            name=model.name,
            version=model.version,
            precision=model.precision,
            sha256=model.sha256,
            input_shape=[28, 28],
            pixel_convention=model.pixel_convention,
            max_images_per_request=self.core.settings.max_request_images,
            labels=model.labels,
            inference_path=self.core.inference_path,
        )


def classify_handler(servicer: DigitClassifierServicer) -> grpc.RpcMethodHandler:
    """Classify for the handler threads, in place of the generated registration: the request is
    read and the response written by `ClassifyRpc`, as on the lane."""
    return method_handler(servicer.Classify)
