"""OpenTelemetry spans, one per call (--otel; `pip install 'mnist-edge[otel]'`).

Imported only when --otel is on: a server without it never loads opentelemetry. Each call
the access log sees (server/access_log.py) becomes a SERVER span named after the RPC
(`inference.GRPCInferenceService/ModelInfer`), a child of the caller's W3C `traceparent` when
there is one, with the OpenTelemetry gRPC attributes (rpc.system, rpc.service, rpc.method,
rpc.grpc.status_code), the peer, and the server's own figures (images, queue and compute
microseconds, request id). Where the spans go is the SDK's standard configuration: OTLP over
HTTP/protobuf to OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT (default
http://localhost:4318), or OTEL_TRACES_EXPORTER=console; OTEL_SERVICE_NAME (default
mnist-edge) and OTEL_TRACES_SAMPLER as usual. Spans are exported in batches off the call path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_SERVICES = {"v2": "inference.GRPCInferenceService", "native": "digits.v1.DigitClassifier"}
_CODES = {name: number for number, name in enumerate((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
    "DATA_LOSS", "UNAUTHENTICATED"))}


def _default_exporter() -> SpanExporter:
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "console":
        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout from OTEL_EXPORTER_OTLP_* variables


class Spans:
    def __init__(self, exporter: SpanExporter | None = None, version: str = "") -> None:
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "mnist-edge"), "service.version": version})
        self.provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER is read here
        self.provider.add_span_processor(BatchSpanProcessor(exporter or _default_exporter()))
        self.tracer = self.provider.get_tracer("mnist_edge.server")
        self._propagator = TraceContextTextMapPropagator()

    def record(self, fields: dict, duration_ns: int, metadata: Iterable[tuple[str, object]] | None) -> None:
        """One finished call as a span that ended now and lasted `duration_ns`."""
        carrier = {}
        for key, value in metadata or ():
            if key.lower() in ("traceparent", "tracestate"):
                carrier[key.lower()] = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)
        parent = self._propagator.extract(carrier) if carrier else None
        end = time.time_ns()
        service = _SERVICES.get(fields["api"], fields["api"])
        attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": fields["method"],
            "rpc.grpc.status_code": _CODES.get(fields["status"], 2),
            "mnist_edge.images": fields["images"],
            "mnist_edge.queue_us": fields["queue_us"],
            "mnist_edge.compute_us": fields["compute_us"],
        }
        if fields.get("peer"):
            attributes["network.peer.address"] = fields["peer"]
        if fields.get("request_id"):
            attributes["mnist_edge.request_id"] = fields["request_id"]
        span = self.tracer.start_span(f"{service}/{fields['method']}", context=parent, kind=SpanKind.SERVER,
                                      attributes=attributes, start_time=end - duration_ns)
        if fields["status"] != "OK":
            span.set_status(Status(StatusCode.ERROR, fields["status"]))
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is still buffered (at shutdown)."""
        self.provider.shutdown()

