"""The access log (--access-log): one JSON object per call on the server's log stream.

    {"event": "access", "request_id", "api", "method", "status", "images",
     "queue_us", "compute_us", "duration_us", "peer", "trace_id"}

Every call of the inference APIs is recorded when it ends, failures included; health checks and
reflection are not (probes would drown the rest). --access-log-sample thins successful calls at
random for busy servers; failed calls are always recorded. `trace_id` comes from a W3C
`traceparent` entry in the call's metadata (or an HTTP header: `trace_id()` takes any
(name, value) pairs). docs/deploy.md says what the log holds and how to rotate it.

The lines go through their own logger, `mnist_edge.server.access`, at INFO, into the server's
log handler: they appear with --log-level warning too, since asking for an access log is asking
for them. Nothing here runs unless --access-log is on.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable

import grpc

from mnist_edge.server.logs import LOGGER

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_PARENT = "0" * 16


def trace_id(metadata: Iterable[tuple[str, object]] | None) -> str | None:
    """The trace id of a valid W3C `traceparent` (version 00, or a later one read as 00 is),
    else None. https://www.w3.org/TR/trace-context/#traceparent-header"""
    for key, value in metadata or ():
        if key.lower() != "traceparent":
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        m = _TRACEPARENT.match(text.strip())
        if m is None:
            return None
        version, trace, parent, _, rest = m.groups()
        # Version ff is invalid; version 00 has nothing after the flags; all-zero ids are invalid.
        if version == "ff" or (version == "00" and rest) or trace == _ZERO_TRACE or parent == _ZERO_PARENT:
            return None
        return trace
    return None


def metadata_value(metadata: Iterable[tuple[str, object]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key.lower() == name:
            return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return None


class AccessLog:
    """What happens when a call ends: its access log line (`log`, --access-log) and its
    OpenTelemetry span (`spans`, --otel: server/otel.py's Spans), either or both."""

    def __init__(self, sample: float = 1.0, chance: Callable[[], float] = random.random, *, log: bool = True, spans=None) -> None:
        self.sample = sample
        self._chance = chance
        self.log = log
        self.spans = spans
        self._logger = logging.getLogger(LOGGER + ".access")
        self._logger.setLevel(logging.INFO)  # whatever --log-level says: the handler is the parent's

    def wanted(self, status: str) -> bool:
        """Record this call? Failures always; successes with probability --access-log-sample."""
        return status != "OK" or self.sample >= 1.0 or self._chance() < self.sample

    def record(
        self,
        *,
        api: str,
        method: str,
        status: str,
        duration_ns: int,
        request_id: str | None = None,
        images: int = 0,
        queue_s: float = 0.0,
        compute_s: float = 0.0,
        peer: str | None = None,
        metadata: Iterable[tuple[str, object]] | None = None,
        context=None,
    ) -> None:
        """`context`: the call's ServicerContext, if any, marked so that the interceptor adds no line."""
        if context is not None:
            mark_logged(context)
        logged = self.log and self.wanted(status)
        if not logged and self.spans is None:
            return
        fields = {
            "request_id": request_id or metadata_value(metadata, "x-request-id"),
            "api": api,
            "method": method,
            "status": status,
            "images": images,
            "queue_us": int(queue_s * 1e6),
            "compute_us": int(compute_s * 1e6),
            "duration_us": duration_ns // 1000,
            "peer": peer,
            "trace_id": trace_id(metadata),
        }
        if self.spans is not None:  # every call: the SDK's sampler (OTEL_TRACES_SAMPLER) decides
            self.spans.record(fields, duration_ns, metadata)
        if logged:
            self._logger.info(f"{method} {status}", extra={"event": "access", "fields": fields})


# -- every other RPC: one line per call from a server interceptor --------------------------

# Health checks and reflection are never logged: probes would drown the rest.
_EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_API = {"inference.GRPCInferenceService": "v2", "digits.v1.DigitClassifier": "native"}
_LOGGED = "_mnist_edge_access_logged"  # set on a ServicerContext once its call (or a message of it) was logged


def mark_logged(context) -> None:
    """The call of `context` has its line(s) from the handler itself: the interceptor adds none."""
    try:
        setattr(context, _LOGGED, True)
    except AttributeError:  # a context that takes no attributes: the interceptor may log it again
        pass


def _status(context, raised: bool) -> str:
    code = context.code() if hasattr(context, "code") else None  # grpcio >= 1.38 has code()
    if code is None:
        return "UNKNOWN" if raised else "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class AccessInterceptor(grpc.ServerInterceptor):
    """One access line per call for the RPCs whose handlers do not write their own (metadata,
    readiness, statistics, ...), and for calls refused before their handler ran (a wrong token).
    The inference RPCs (server/rpc.py) and ClassifyStream's messages log themselves, with their
    images and timings, and mark the context so that this adds nothing."""

    def __init__(self, log: AccessLog) -> None:
        self._log = log

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        name = handler_call_details.method
        if handler is None or name.startswith(_EXEMPT):
            return handler
        service, _, method = name.lstrip("/").partition("/")
        api = _API.get(service, service)
        log = self._log

        def finish(context, started: int, raised: bool) -> None:
            if getattr(context, _LOGGED, False):
                return
            log.record(api=api, method=method, status=_status(context, raised), duration_ns=time.perf_counter_ns() - started,
                       peer=context.peer(), metadata=context.invocation_metadata())

        def unary(behavior):
            def wrapped(request, context):
                started, raised = time.perf_counter_ns(), True
                try:
                    response = behavior(request, context)
                    raised = False
                    return response
                finally:
                    finish(context, started, raised)
            return wrapped

        def streaming(behavior):
            def wrapped(request, context):
                started, raised = time.perf_counter_ns(), True
                try:
                    yield from behavior(request, context)
                    raised = False
                finally:
                    finish(context, started, raised)
            return wrapped

        if handler.response_streaming:
            field = "stream_stream" if handler.request_streaming else "unary_stream"
            return handler._replace(**{field: streaming(getattr(handler, field))})
        field = "stream_unary" if handler.request_streaming else "unary_unary"
        return handler._replace(**{field: unary(getattr(handler, field))})
