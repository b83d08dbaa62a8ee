"""The native API for devices: `digits.v1.DigitClassifier`.

Raw 784-byte images are used as they are; encoded images (PNG, JPEG, BMP, PGM of any
size) are checked from their header, decoded and normalised MNIST-style by `imaging`,
the same code training and the client use. A bad image gets its own
`Prediction.error` and the others are still answered. A message that fails as a whole
(no images, too many, overload) fails a unary call with that status; on a stream it
gets a response carrying `ClassifyResponse.error` and the stream goes on.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from imaging.normalize import ImageError, ImageLimits, normalize_encoded
from protos.digits.v1 import digits_pb2 as pb
from protos.digits.v1 import digits_pb2_grpc as pb_grpc
from server.core import Core, State
from server.errors import (
    InvalidArgument,
    ServingError,
    Unavailable,
    abort,
    grpc_errors,
    log,
    status_of,
)

PIXELS = 784
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _error(code: grpc.StatusCode, message: str) -> pb.Error:
    return pb.Error(code=code.value[0], message=message)


class DigitClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, core: Core) -> None:
        self.core = core
        s = core.settings
        self.limits = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)

    def _decode(self, request: pb.ClassifyRequest) -> tuple[list[np.ndarray | None], list[pb.Error | None]]:
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
        return arrays, errors

    def _classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext, t0: int) -> tuple[pb.ClassifyResponse, dict]:
        """The response, and the request's durations for the statistics (empty when no image
        reached the model)."""
        self.core.serving_model()
        arrays, errors = self._decode(request)
        good = [i for i, a in enumerate(arrays) if a is not None]
        predictions = [pb.Prediction() for _ in arrays]
        version = ""
        timing: dict = {}
        if good:
            batch = np.stack([arrays[i] for i in good]) if len(good) > 1 else arrays[good[0]][None]
            t1 = time.perf_counter_ns()
            result = self.core.classify(batch, context.time_remaining(), lambda: not context.is_active())
            timing = {"input_ns": t1 - t0, "queue_ns": int(result.queue_s * 1e9), "infer_ns": int(result.compute_s * 1e9), "t2": time.perf_counter_ns()}
            probs, digits, model = result.probabilities, result.digits, result.tag
            version = model.version
            want_probs = request.return_probabilities
            want_image = request.return_normalized_image
            for j, i in enumerate(good):
                p = predictions[i]
                p.digit = int(digits[j])
                p.confidence = float(probs[j, digits[j]])
                if want_probs:
                    p.probabilities.extend(probs[j].tolist())
                if want_image:
                    p.normalized_image = batch[j].tobytes()
        else:
            version = self.core.serving_model().version
        for i, err in enumerate(errors):
            if err is not None:
                predictions[i].error.CopyFrom(err)
        return pb.ClassifyResponse(predictions=predictions, model_version=version, request_id=request.request_id), timing

    def _record_ok(self, api: str, t0: int, timing: dict) -> None:
        end = time.perf_counter_ns()
        if not timing:  # every image was refused: the model never ran
            self.core.stats.record_request(api, "OK", end - t0, model_level=False)
            return
        self.core.stats.record_ok(api, end - t0, timing["input_ns"], end - timing["t2"], timing["queue_ns"], timing["infer_ns"])

    def Classify(self, request, context):
        t0 = time.perf_counter_ns()
        try:
            response, timing = self._classify(request, context, t0)
        except Exception as exc:  # noqa: BLE001 - mapped to a status here
            self.core.stats.record_request("native", status_of(exc).name, time.perf_counter_ns() - t0)
            abort(context, exc, "Classify")
            return pb.ClassifyResponse()  # not reached: abort raises
        self._record_ok("native", t0, timing)
        return response

    def ClassifyStream(self, request_iterator, context):
        for request in request_iterator:
            if self.core.state is State.STOPPING:
                # Shutdown is one of the two things that end a stream (authentication is the other).
                abort(context, Unavailable("the server is shutting down; reconnect to another replica"), "ClassifyStream")
                return
            t0 = time.perf_counter_ns()
            try:
                response, timing = self._classify(request, context, t0)
            except Exception as exc:  # noqa: BLE001 - a failed message does not end the stream
                self.core.stats.record_request("native_stream", status_of(exc).name, time.perf_counter_ns() - t0)
                if not isinstance(exc, ServingError):
                    log.error("unexpected error in ClassifyStream", exc_info=exc)
                    message = f"internal error: {type(exc).__name__}; the server logged the traceback"
                else:
                    message = exc.message
                yield pb.ClassifyResponse(request_id=request.request_id, error=_error(status_of(exc), message))
                continue
            self._record_ok("native_stream", t0, timing)
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
        )
