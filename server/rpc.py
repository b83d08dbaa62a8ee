"""One handler per inference RPC: ModelInfer and Classify are each written once, here in shape.

An RPC is a subclass of `InferenceRpc` that says how to read its request bytes, decode them
into pixels and encode the answer. The class serves it the same way wherever the call came from:
`serve` answers one call (on a handler thread, `serve_context` makes grpcio's
ServicerContext a `Responder`), `serve_group` answers the calls the inference lane took
together (`lane.LaneCall` is a `Responder` too) by running their images through
`Core.classify_group`. Both paths share the error mapping (`errors.status_and_message`) and the
statistics (`record_success`, `_fail`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from mnist_edge.server.batching import GroupRequest, Result
from mnist_edge.server.core import Core
from mnist_edge.server.errors import (
    InvalidArgument,
    Unavailable,
    log,
    status_and_message,
    status_of,
)
from mnist_edge.server.model_store import LoadedModel

_now = time.perf_counter_ns


class Responder(Protocol):
    """A unary call as a handler sees it: the request, its timing, and the one answer it gets."""

    message: bytes  # the serialized request
    received_ns: int  # time.perf_counter_ns() when the message was read: the request's time starts here
    deadline: float | None  # time.monotonic() seconds, or None
    is_cancelled: Callable[[], bool] | None  # True once the client has gone, if the transport can tell

    def reply(self, body: bytes) -> None:
        """Answer OK with the serialized response `body`."""

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with `code` and no message (a trailers-only response)."""

    def header(self, name: str) -> str | None:
        """The value of request metadata (gRPC) or header (HTTP) `name`, lower case; None when absent."""

    def peer(self) -> str | None:
        """The client's address as gRPC reports it (for the access log; asked before answering)."""

    def invocation_metadata(self) -> tuple:
        """The call's invocation metadata (or HTTP headers), (key, value) pairs (for the access log)."""


def metadata_value(metadata, name: str) -> str | None:
    """The value of `name` in gRPC invocation metadata ((key, value) pairs), or None."""
    for key, value in metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class ContextResponder:
    """A `Responder` over grpcio's ServicerContext: the handler-thread path. The answer is kept
    and given to grpcio by `answer()` once the handler has returned."""

    __slots__ = ("_body", "_context", "_failure", "deadline", "message", "received_ns")

    def __init__(self, message: bytes, context: grpc.ServicerContext) -> None:
        self.received_ns = _now()
        self.message = message
        self._context = context
        # grpc reports "no deadline" as a huge time_remaining(): the batcher caps each wait.
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else time.monotonic() + remaining
        self._body: bytes | None = None
        self._failure: tuple[grpc.StatusCode, str] | None = None

    def is_cancelled(self) -> bool:
        return not self._context.is_active()

    def reply(self, body: bytes) -> None:
        self._body = body

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        self._failure = (code, details)

    def header(self, name: str) -> str | None:
        return metadata_value(self._context.invocation_metadata(), name)

    def peer(self) -> str | None:
        return self._context.peer()

    def invocation_metadata(self) -> tuple:
        return self._context.invocation_metadata()

    @property
    def context(self) -> grpc.ServicerContext:
        return self._context

    @property
    def answered(self) -> bool:
        return self._body is not None or self._failure is not None

    def answer(self, method: str) -> bytes:
        """The response for grpcio to send; a failure aborts the call (grpcio's abort raises)."""
        if self._failure is not None:
            self._context.abort(*self._failure)
        if self._body is None:
            log.error("%s left a call unanswered", method)
            self._context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: the call was left unanswered; the server logged it")
        return self._body


D = TypeVar("D")  # an RPC's decoded request: has `pixels`, uint8 [N,28,28], or None when no image is for the model


class Admitted(NamedTuple, Generic[D]):
    """A call whose request was read and decoded: on its way to the model."""

    call: Responder
    decoded: D
    decoded_ns: int  # time.perf_counter_ns() when decoding ended: input time is decoded_ns - call.received_ns
    model: LoadedModel | None = None  # a version in its grace period the request named; None: the current model
    request_id: str | None = None  # the request's own id, for the access log


class InferenceRpc(Generic[D]):
    """A unary inference RPC: read -> decode -> Core -> encode, on either transport.

    Subclasses set `api` (the statistics label), `method` (the name in error messages),
    `request_type` (the protobuf request message), and write `decode` and `encode`; `read`
    may add checks of where the request is addressed. Errors raised by `read` are not counted
    in the model's statistics (the request was not for it); errors from then on are.
    """

    api: str
    method: str
    request_type: type

    def __init__(self, core: Core, offload: Callable[..., object] | None = None) -> None:
        self.core = core
        self.stats = core.stats
        self.access_log = getattr(core, "access_log", None)  # --access-log (server/access_log.py), or None
        # Where the lane sends calls that `needs_thread` (a handler pool's submit): the lane
        # thread must not wait on slow decoding.
        self.offload = offload
        # Field capture (server/capture.py), None when off: the hot path checks only this.
        self.capture = getattr(core, "capture", None)

    # -- what each RPC writes ----------------------------------------------------------------
    def read(self, message: bytes):
        """The request message from its bytes."""
        try:
            return self.request_type.FromString(message)
        except DecodeError as exc:
            raise InvalidArgument(f"the request is not a valid {self.request_type.DESCRIPTOR.full_name} message: {exc}") from None

    def decode(self, request) -> D:
        raise NotImplementedError

    def encode(self, decoded: D, result: Result | None) -> bytes:
        """The serialized response; `result` is None when no image reached the model."""
        raise NotImplementedError

    def capture_source(self, decoded: D) -> tuple[str, Callable[[int], bytes | None] | None]:
        """For field capture: the request's id, and the encoded bytes the client sent for image
        j of `decoded.pixels` (None when it sent pixels), or no callable when none were sent."""
        return "", None

    def needs_thread(self, request) -> bool:
        """True when decoding `request` may take long: the lane hands it to `offload`."""
        return False

    def pinned(self, request) -> LoadedModel | None:
        """The model the request names when that is not the current one (a version in its
        grace period after a reload, core.Core.previous); None: the current model."""
        return None

    def request_id(self, request) -> str | None:
        """The request's own id, for the access log."""
        return None

    # -- serving -----------------------------------------------------------------------------
    def serve(self, call: Responder, request=None) -> None:
        """Answer one call, from the calling thread (a handler thread, or a lane hand-off)."""
        admitted = self._admit(call, request)
        if admitted is None:
            return
        pixels = admitted.decoded.pixels
        result = None
        if pixels is not None:
            remaining = None if call.deadline is None else call.deadline - time.monotonic()
            try:
                result = self.core.classify(pixels, remaining, call.is_cancelled, model=admitted.model)
            except Exception as exc:  # noqa: BLE001 - mapped to a status in _fail
                self._fail(call, exc, admitted=admitted)
                return
        self._finish(admitted, result)

    def serve_group(self, calls: Sequence) -> None:
        """Answer calls that arrived together on the inference lane (server/lane.py): each
        request read and decoded on its own, the images of the valid ones run together by
        `Core.classify_group`, each call answered as soon as its batch ends. Calls that
        `needs_thread` are handed whole to `offload` and answered from there."""
        # One group per model: the current one, and a version in its grace period that calls named.
        groups: dict[int, tuple[LoadedModel | None, list[Admitted[D]], list[GroupRequest]]] = {}
        for call in calls:
            try:
                request = self.read(call.message)
            except Exception as exc:  # noqa: BLE001 - mapped to a status in _fail
                self._fail(call, exc, model_level=False)
                continue
            if self.offload is not None and self.needs_thread(request):
                self._hand_off(call, request)
                continue
            a = self._admit(call, request)
            if a is None:
                continue
            if a.decoded.pixels is None:  # nothing for the model: answered now
                self._finish(a, None)
                continue
            _, admitted, group = groups.setdefault(id(a.model), (a.model, [], []))
            admitted.append(a)
            group.append(GroupRequest(a.decoded.pixels, call.deadline, time.monotonic()))
        for model, admitted, group in groups.values():
            try:
                self.core.classify_group(group, lambda i, outcome, admitted=admitted: self._deliver(admitted[i], outcome), model=model)
            except Exception as exc:  # noqa: BLE001 - the named version was unloaded since it was checked
                for a in admitted:
                    self._fail(a.call, exc, admitted=a)

    def serve_context(self, message: bytes, context: grpc.ServicerContext) -> bytes:
        """grpcio's unary behavior on a handler thread (see `method_handler`): the response
        bytes, or the call aborted with the failure's status."""
        call = ContextResponder(message, context)
        try:
            self.serve(call)
        except Exception as exc:  # noqa: BLE001 - a bug past the mapping: logged, and INTERNAL unless answered
            code, details = status_and_message(exc, self.method)
            if not call.answered:
                call.fail(code, details)
        return call.answer(self.method)

    def _hand_off(self, call, request) -> None:
        call.hand_off()
        try:
            self.offload(self.serve, call, request)
        except RuntimeError:  # the handler pool has shut down: so has the server
            self._fail(call, Unavailable("the server is shutting down; retry on another replica"))

    def _admit(self, call: Responder, request=None) -> Admitted[D] | None:
        """Read (unless given) and decode the call's request; a call that fails here is answered."""
        if request is None:
            try:
                request = self.read(call.message)
            except Exception as exc:  # noqa: BLE001 - mapped to a status in _fail
                self._fail(call, exc, model_level=False)
                return None
        try:
            model = self.pinned(request)
        except Exception as exc:  # noqa: BLE001 - not a request for a model served here: not in its statistics
            self._fail(call, exc, model_level=False, request_id=self.request_id(request))
            return None
        try:
            decoded = self.decode(request)
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _fail
            self._fail(call, exc, admitted=None, request_id=self.request_id(request))
            return None
        return Admitted(call, decoded, _now(), model, self.request_id(request))

    def _deliver(self, admitted: Admitted[D], outcome: Result | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self._fail(admitted.call, outcome, admitted=admitted)
        else:
            self._finish(admitted, outcome)

    def _finish(self, admitted: Admitted[D], result: Result | None) -> None:
        call = admitted.call
        encode_start = _now()
        try:
            body = self.encode(admitted.decoded, result)
        except Exception as exc:  # noqa: BLE001 - mapped to a status in _fail
            self._fail(call, exc, admitted=admitted)
            return
        end = _now()
        if self.access_log is not None:  # before the answer: the call is released after it
            self._access(call, "OK", end - call.received_ns, admitted, result)
        call.reply(body)
        self.record_success(self.api, call.received_ns, admitted.decoded_ns, encode_start, end, result,
                            stats=self._stats_for(admitted.model))
        if self.capture is not None and result is not None:
            self.offer_capture(self.api, admitted.decoded, result, call.header)

    def offer_capture(self, api: str, decoded: D, result: Result, header: Callable[[str], str | None]) -> None:
        """Hand an answered request to field capture (which keeps what it wants, off this thread)."""
        request_id, originals = self.capture_source(decoded)
        self.capture.offer(api, request_id, result, decoded.pixels, originals, header)

    # -- the one statistics and error path ---------------------------------------------------
    def record_success(self, api: str, start_ns: int, decoded_ns: int, encode_start_ns: int, end_ns: int, result: Result | None,
                       stats=None) -> None:
        """A request answered OK; one that no image of reached the model is counted by API only.
        `stats`: those of the model that answered (a version in its grace period has its own)."""
        stats = self.stats if stats is None else stats
        if result is None:
            stats.record_request(api, "OK", end_ns - start_ns, model_level=False)
        else:
            stats.record_ok(
                api, end_ns - start_ns, decoded_ns - start_ns, end_ns - encode_start_ns, int(result.queue_s * 1e9), int(result.compute_s * 1e9)
            )

    def _fail(self, call: Responder, exc: BaseException, model_level: bool = True, admitted: Admitted[D] | None = None,
              request_id: str | None = None) -> None:
        status = status_of(exc).name
        duration = _now() - call.received_ns
        stats = self._stats_for(admitted.model if admitted is not None else None)
        stats.record_request(self.api, status, duration, model_level=model_level)
        if self.access_log is not None:  # before the answer: the call is released after it
            self._access(call, status, duration, admitted, None, request_id)
        call.fail(*status_and_message(exc, self.method))

    def _stats_for(self, model: LoadedModel | None):
        """The statistics of the model that answers: a version in its grace period has its own."""
        return self.stats if model is None else self.core.stats_for(model)

    def _access(self, call: Responder, status: str, duration_ns: int, admitted: Admitted[D] | None, result: Result | None,
                request_id: str | None = None) -> None:
        """The call's access log line (--access-log)."""
        pixels = admitted.decoded.pixels if admitted is not None else None
        self.access_log.record(
            api=self.api, method=self.method, status=status, duration_ns=duration_ns,
            request_id=admitted.request_id if admitted is not None else request_id,
            images=0 if pixels is None else len(pixels),
            queue_s=result.queue_s if result is not None else 0.0, compute_s=result.compute_s if result is not None else 0.0,
            peer=call.peer(), metadata=call.invocation_metadata(), context=getattr(call, "context", None),
        )


def method_handler(behavior: Callable[[bytes, grpc.ServicerContext], bytes]) -> grpc.RpcMethodHandler:
    """A unary grpcio method handler whose request and response stay bytes: `behavior` is a
    servicer method that calls `InferenceRpc.serve_context`."""
    return grpc.unary_unary_rpc_method_handler(behavior)
