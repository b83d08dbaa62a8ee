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
from typing import Callable

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from mnist_edge.imaging.normalize import ImageError, ImageLimits, normalize_encoded
from mnist_edge.protos.digits.v1 import digits_pb2 as pb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc
from mnist_edge.server.batching import Result
from mnist_edge.server.core import Core, State
from mnist_edge.server.errors import (
    InvalidArgument,
    ServingError,
    Unavailable,
    abort,
    grpc_errors,
    log,
    status_and_message,
    status_of,
)

PIXELS = 784
_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def _error(code: grpc.StatusCode, message: str) -> pb.Error:
    return pb.Error(code=code.value[0], message=message)


class DigitClassifierServicer(pb_grpc.DigitClassifierServicer):
    def __init__(self, core: Core, offload: Callable[..., object] | None = None) -> None:
        self.core = core
        s = core.settings
        self.limits = ImageLimits(max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
        # Where the inference lane sends requests with encoded images (a handler pool's submit):
        # decoding them may take long, and the lane thread must not wait on it.
        self.offload = offload

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

    def _prepare(self, request: pb.ClassifyRequest) -> tuple[list[int], np.ndarray | None, list[pb.Error | None]]:
        """Checks and decodes: the indices of the usable images, those images as one batch
        (None when there is none) and each image's error."""
        self.core.serving_model()
        arrays, errors = self._decode(request)
        good = [i for i, a in enumerate(arrays) if a is not None]
        if not good:
            return good, None, errors
        return good, (np.stack([arrays[i] for i in good]) if len(good) > 1 else arrays[good[0]][None]), errors

    def _response(self, request: pb.ClassifyRequest, good: list[int], batch, errors: list[pb.Error | None], result: Result | None) -> pb.ClassifyResponse:
        predictions = [pb.Prediction() for _ in errors]
        if result is not None:
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
        return pb.ClassifyResponse(predictions=predictions, model_version=version, request_id=request.request_id)

    @staticmethod
    def _timing(t0: int, t1: int, result: Result) -> dict:
        return {"input_ns": t1 - t0, "queue_ns": int(result.queue_s * 1e9), "infer_ns": int(result.compute_s * 1e9), "t2": time.perf_counter_ns()}

    def _classify(self, request: pb.ClassifyRequest, remaining_s: float | None, is_cancelled, t0: int) -> tuple[pb.ClassifyResponse, dict]:
        """The response, and the request's durations for the statistics (empty when no image
        reached the model)."""
        good, batch, errors = self._prepare(request)
        if batch is None:
            return self._response(request, good, batch, errors, None), {}
        t1 = time.perf_counter_ns()
        result = self.core.classify(batch, remaining_s, is_cancelled)
        timing = self._timing(t0, t1, result)
        return self._response(request, good, batch, errors, result), timing

    def _record_ok(self, api: str, t0: int, timing: dict) -> None:
        end = time.perf_counter_ns()
        if not timing:  # every image was refused: the model never ran
            self.core.stats.record_request(api, "OK", end - t0, model_level=False)
            return
        self.core.stats.record_ok(api, end - t0, timing["input_ns"], end - timing["t2"], timing["queue_ns"], timing["infer_ns"])

    def Classify(self, request, context):
        t0 = time.perf_counter_ns()
        try:
            response, timing = self._classify(request, context.time_remaining(), lambda: not context.is_active(), t0)
        except Exception as exc:  # noqa: BLE001 - mapped to a status here
            self.core.stats.record_request("native", status_of(exc).name, time.perf_counter_ns() - t0)
            abort(context, exc, "Classify")
            return pb.ClassifyResponse()  # not reached: abort raises
        self._record_ok("native", t0, timing)
        return response

    def classify_group(self, calls, lane) -> None:
        """Classify for calls that arrived together on the inference lane (server/lane.py). Raw
        pixels are checked here and the usable images of every call run as batches by the
        batcher; a call carrying an encoded image is handed whole to the handler threads
        (`offload`), as decoding it may take long, and answered from there."""
        stats = self.core.stats
        group: list[tuple[np.ndarray, float | None, float]] = []
        owners: list[tuple] = []
        for c in calls:
            t0 = c.received_ns
            try:
                request = pb.ClassifyRequest.FromString(c.message)
            except DecodeError as exc:
                stats.record_request("native", "INVALID_ARGUMENT", time.perf_counter_ns() - t0, model_level=False)
                lane.fail(c, grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid digits.v1.ClassifyRequest message: {exc}")
                continue
            if self.offload is not None and any(image.WhichOneof("data") == "encoded" for image in request.images):
                lane.hand_off(c)
                try:
                    self.offload(self._classify_off_lane, c, request, lane)
                except RuntimeError:  # the handler pool has shut down: so has the server
                    lane.fail(c, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
                continue
            try:
                good, batch, errors = self._prepare(request)
            except Exception as exc:  # noqa: BLE001 - mapped to a status here
                stats.record_request("native", status_of(exc).name, time.perf_counter_ns() - t0)
                lane.fail(c, *status_and_message(exc, "Classify"))
                continue
            if batch is None:  # every image refused: answered now, the model never runs
                lane.reply(c, self._response(request, good, batch, errors, None).SerializeToString())
                self._record_ok("native", t0, {})
                continue
            owners.append((c, request, good, batch, errors, t0, time.perf_counter_ns()))
            group.append((batch, c.deadline, time.monotonic()))

        def deliver(i: int, result) -> None:
            c, request, good, batch, errors, t0, t1 = owners[i]
            if isinstance(result, BaseException):
                stats.record_request("native", status_of(result).name, time.perf_counter_ns() - t0)
                lane.fail(c, *status_and_message(result, "Classify"))
                return
            timing = self._timing(t0, t1, result)
            lane.reply(c, self._response(request, good, batch, errors, result).SerializeToString())
            self._record_ok("native", t0, timing)

        if group:
            self.core.batcher.infer_group(group, deliver)

    def _classify_off_lane(self, c, request: pb.ClassifyRequest, lane) -> None:
        """On a handler thread: a lane call with encoded images, answered through the lane."""
        t0 = c.received_ns
        try:
            remaining = None if c.deadline is None else c.deadline - time.monotonic()
            response, timing = self._classify(request, remaining, None, t0)
        except Exception as exc:  # noqa: BLE001 - mapped to a status here
            self.core.stats.record_request("native", status_of(exc).name, time.perf_counter_ns() - t0)
            lane.fail(c, *status_and_message(exc, "Classify"))
            return
        lane.reply(c, response.SerializeToString())
        self._record_ok("native", t0, timing)

    def ClassifyStream(self, request_iterator, context):
        for request in request_iterator:
            if self.core.state is State.STOPPING:
                # Shutdown is one of the two things that end a stream (authentication is the other).
                abort(context, Unavailable("the server is shutting down; reconnect to another replica"), "ClassifyStream")
                return
            t0 = time.perf_counter_ns()
            try:
                response, timing = self._classify(request, context.time_remaining(), lambda: not context.is_active(), t0)
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
