"""The REST APIs on `--http-address`: the Open Inference Protocol as KServe v2 and Triton
define it over HTTP, the native `POST /v1/classify`, and the page at `/`.

Every route is a translation: a REST request becomes the same protobuf request the gRPC
APIs take and is answered by the same handlers (server/rpc.py: `RestInferRpc` is ModelInfer
and `RestClassifyRpc` is Classify, with an `HttpCall` as their Responder): the same codecs
(`v2`, `images`, `native`), `Core`, error mapping and statistics. Only reading the JSON and
writing it back (or Triton's binary tensor data) is REST's own. So REST and gRPC give the
same answers and the same error messages.

Status codes: 400 bad request, 401 missing or wrong token, 404 unknown model, version or
route, 405 wrong method, 413 body too large, 415 unsupported Content-Type or
Content-Encoding, 429 queue full and 503 loading or shutting down (both with Retry-After),
504 deadline passed in the queue. Errors are `{"error": "..."}`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from importlib import resources
from typing import NamedTuple

import numpy as np
from google.protobuf.message import Message

from mnist_edge.protos.digits.v1 import digits_pb2
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.server import images, v2
from mnist_edge.server.core import Core, State
from mnist_edge.server.errors import (
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
)
from mnist_edge.server.http import Request, Response, json_error
from mnist_edge.server.native import ClassifyRpc, DecodedClassify

JSON = "application/json"
OCTET = "application/octet-stream"
HEADER_LENGTH = "inference-header-content-length"
RAW_IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/bmp", "image/x-portable-graymap", OCTET})
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499, "INTERNAL": 500, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}
RETRY_AFTER = {429: "1", 503: "1"}
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
PAGE_HEADERS = [
    ("Cache-Control", "no-cache"),
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
]
INT64_TYPES = frozenset({3, 4, 6, 16, 18})  # FieldDescriptor.TYPE_INT64, UINT64, FIXED64, SFIXED64, SINT64


# -- helpers ----------------------------------------------------------------------
def ok_json(value, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode(), [("Content-Type", JSON), *(headers or [])])


def error_response(exc: BaseException) -> Response:
    """The HTTP answer for an exception raised by a codec, Core or the batcher."""
    if isinstance(exc, ServingError):
        status = HTTP_STATUS.get(exc.code.name, 500)
        retry = RETRY_AFTER.get(status)
        return json_error(status, exc.message, [("Retry-After", retry)] if retry else None)
    from mnist_edge.server.errors import log

    log.error("unexpected error in a REST call", exc_info=exc)
    return json_error(500, f"internal error: {type(exc).__name__}; the server logged the traceback")


def message_json(msg: Message) -> dict:
    """A protobuf message as Triton writes it in JSON: proto field names, 64-bit integers as
    numbers, enums by name, every scalar field (defaults too), sub-messages only when set."""
    out: dict = {}
    for fd in msg.DESCRIPTOR.fields:
        value = getattr(msg, fd.name)
        mt = fd.message_type
        if mt is not None and mt.GetOptions().map_entry:
            vfd = mt.fields_by_name["value"]
            out[fd.name] = {k: _field_value(vfd, v) for k, v in value.items()}
        elif fd.is_repeated:
            out[fd.name] = [_field_value(fd, v) for v in value]
        elif mt is not None:
            if msg.HasField(fd.name):
                out[fd.name] = message_json(value)
        elif fd.containing_oneof is not None:
            if msg.HasField(fd.name):
                out[fd.name] = _field_value(fd, value)
        else:
            out[fd.name] = _field_value(fd, value)
    return out


def _field_value(fd, value):
    if fd.message_type is not None:
        return message_json(value)
    if fd.enum_type is not None:
        return fd.enum_type.values_by_number[value].name if value in fd.enum_type.values_by_number else value
    if fd.type in INT64_TYPES:
        return int(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def _parse_json(body: bytes, what: str):
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _b64(text, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidArgument(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what}: not valid base64") from None


def _parameter(value) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    raise InvalidArgument(f"parameter value {value!r} not supported, expected a boolean, integer, number or string")


def _parameters(obj, where: str) -> dict:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"{where} 'parameters' must be a JSON object, got {type(params).__name__}")
    return dict(params)


# -- the v2 inference request in JSON / binary form -----------------------------------
class InferRequest:
    """A REST inference request as the gRPC ModelInferRequest v2 decodes, plus which
    outputs go back as binary data."""

    def __init__(self, message: pb.ModelInferRequest, binary_outputs: dict[str, bool], binary_default: bool) -> None:
        self.message = message
        self.binary_outputs = binary_outputs
        self.binary_default = binary_default

    def binary(self, name: str) -> bool:
        return self.binary_outputs.get(name, self.binary_default)


def _numeric_raw(name: str, datatype: str, data, shape: list[int]) -> bytes:
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"input {name!r}: 'data' is not a flat or evenly nested array of numbers") from None
    if arr.dtype.kind not in "iuf" or arr.dtype == np.bool_:
        raise InvalidArgument(f"input {name!r}: 'data' must hold numbers, got {arr.dtype.kind == 'b' and 'booleans' or 'other values'}")
    expected = int(np.prod(shape)) if shape and all(isinstance(d, int) and d >= 0 for d in shape) else None
    if expected is not None and arr.size != expected:
        raise InvalidArgument(f"input {name!r}: shape {shape} needs {expected} values, 'data' holds {arr.size}")
    if datatype == "UINT8":
        if arr.dtype.kind == "f":
            raise InvalidArgument(f"input {name!r}: UINT8 data must be integers 0-255, got non-integer numbers")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
            raise InvalidArgument(f"input {name!r}: UINT8 values range over [{int(arr.min())}, {int(arr.max())}], expected 0-255")
        return arr.astype(np.uint8).tobytes()
    return arr.astype("<f4").tobytes()


def _flat_strings(data) -> list:
    out: list = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def parse_infer(request: Request, model_name: str, version: str) -> InferRequest:
    """Triton's JSON body, with its binary tensor data extension, -> InferRequest."""
    body = request.body
    length_header = request.headers.get(HEADER_LENGTH)
    if length_header is not None:
        if not length_header.strip().isdigit() or int(length_header) > len(body):
            raise InvalidArgument(f"Inference-Header-Content-Length is {length_header!r}, expected the JSON header's size in bytes (at most the body's {len(body)})")
        split = int(length_header)
        header, binary = body[:split], memoryview(body)[split:]
    else:
        header, binary = body, memoryview(b"")
    obj = _parse_json(header, "the inference request")
    if not isinstance(obj, dict):
        raise InvalidArgument("the inference request must be a JSON object with 'inputs'")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument(f"the inference request has no 'inputs': expected a list with one input, '{v2.INPUT}' or '{images.IMAGE_INPUT}'")
    message = pb.ModelInferRequest(model_name=model_name, model_version=version)
    rid = obj.get("id")
    if rid is not None:
        if not isinstance(rid, str):
            raise InvalidArgument(f"'id' must be a string, got {type(rid).__name__}")
        message.id = rid
    params = _parameters(obj, "the request's")
    binary_default = params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument("parameter 'binary_data_output' must be true or false")
    for key, value in params.items():
        message.parameters[key].CopyFrom(_parameter(value))
    offset = 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str) or not isinstance(t.get("shape"), list):
            raise InvalidArgument("each input needs 'name' (string), 'datatype' (string) and 'shape' (list of integers)")
        name, datatype, shape = t["name"], t["datatype"], t["shape"]
        if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"input {name!r}: shape {shape} must be a list of integers")
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        tparams = _parameters(t, f"input {name!r}")
        size = tparams.pop("binary_data_size", None)
        content_type = tparams.pop("content_type", None) if datatype == "BYTES" else None
        for key, value in tparams.items():
            tensor.parameters[key].CopyFrom(_parameter(value))
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
            if offset + size > len(binary):
                raise InvalidArgument(f"input {name!r}: binary_data_size {size} goes past the end of the binary data ({len(binary) - offset} bytes left)")
            message.raw_input_contents.append(bytes(binary[offset : offset + size]))
            offset += size
            continue
        if "data" not in t:
            raise InvalidArgument(f"input {name!r} has no 'data' and no binary_data_size parameter")
        if datatype == "BYTES":
            if content_type not in (None, "base64"):
                raise InvalidArgument(f"input {name!r}: content_type {content_type!r} not supported, expected 'base64'")
            strings = _flat_strings(t["data"])
            message.raw_input_contents.append(images.join_bytes_tensor([_b64(s, f"input {name!r} element {i}") for i, s in enumerate(strings)]))
        elif datatype in ("UINT8", "FP32"):
            message.raw_input_contents.append(_numeric_raw(name, datatype, t["data"], shape))
        else:
            raise InvalidArgument(f"input {name!r}: datatype {datatype!r} not supported, expected UINT8 or FP32 ('{v2.INPUT}') or BYTES ('{images.IMAGE_INPUT}')")
    if offset != len(binary):
        raise InvalidArgument(f"{len(binary) - offset} bytes of binary data after the last input's binary_data_size; expected none")
    binary_outputs: dict[str, bool] = {}
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidArgument("'outputs' must be a list of {\"name\": ...} objects")
        for o in outputs:
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise InvalidArgument("each requested output needs a 'name' (string)")
            oparams = _parameters(o, f"output {o['name']!r}")
            flag = oparams.pop("binary_data", None)
            if flag is not None:
                if not isinstance(flag, bool):
                    raise InvalidArgument(f"output {o['name']!r}: parameter 'binary_data' must be true or false")
                binary_outputs[o["name"]] = flag
            out = message.outputs.add(name=o["name"])
            for key, value in oparams.items():
                out.parameters[key].CopyFrom(_parameter(value))
    return InferRequest(message, binary_outputs, binary_default)


def infer_response(parsed: InferRequest, decoded: v2.DecodedRequest, result) -> Response:
    model = result.tag
    n = result.probabilities.shape[0]
    head: dict = {"model_name": model.name, "model_version": model.version}
    if decoded.request_id:
        head["id"] = decoded.request_id
    outputs, blobs = [], []
    for name in decoded.outputs:
        if name == "probabilities":
            tensor = {"name": name, "datatype": "FP32", "shape": [n, 10]}
            array, dtype = result.probabilities, "<f4"
        else:
            tensor = {"name": name, "datatype": "INT64", "shape": [n]}
            array, dtype = result.digits, "<i8"
        if parsed.binary(name):
            blob = np.ascontiguousarray(array, dtype=dtype).tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.reshape(-1).tolist()
        outputs.append(tensor)
    head["outputs"] = outputs
    text = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return Response(200, text, [("Content-Type", JSON)])
    return Response(200, b"".join([text, *blobs]), [("Content-Type", OCTET), ("Inference-Header-Content-Length", str(len(text)))])


class _Unsupported(ServingError):
    """415: a Content-Type the route does not take."""


# -- the application -------------------------------------------------------------------
class RestApi:
    """`handler(Request) -> Response` for server.http: routing, auth, CORS, and the APIs."""

    def __init__(self, core: Core, server_version: str, *, token: bytes | None = None, cors_origin: str | None = None) -> None:
        self.core = core
        self.server_version = server_version
        self.v2 = v2.InferenceServicer(core, server_version)
        self.infer_rpc = RestInferRpc(core)
        self.classify_rpc = RestClassifyRpc(core)
        self.token = None
        if token:
            from mnist_edge.server.auth import TokenInterceptor

            self.token = TokenInterceptor(token)
        self.cors_origins = [o.strip() for o in (cors_origin or "").split(",") if o.strip()]
        self.page = {path: (self._page_file(name, bool(token)), ctype) for path, (name, ctype) in STATIC.items()}

    @staticmethod
    def _page_file(name: str, token_required: bool) -> bytes:
        data = resources.files("mnist_edge.server").joinpath("static", name).read_bytes()
        if name == "index.html":
            # The page asks for the token only when this server requires one.
            data = data.replace(b"{{AUTH}}", b"bearer" if token_required else b"none")
        return data

    # routing ---------------------------------------------------------------------
    def __call__(self, request: Request) -> Response:
        response = self._route(request)
        if self.cors_origins:
            response.headers.extend(self._cors(request))
        if self.core.state is State.DRAINING:
            response.close = True  # keep-alive clients move to another replica
        return response

    def _cors(self, request: Request) -> list[tuple[str, str]]:
        origin = request.headers.get("origin")
        if "*" in self.cors_origins:
            allowed = "*"
        elif origin in self.cors_origins:
            allowed = origin
        else:
            return []
        return [("Access-Control-Allow-Origin", allowed), ("Vary", "Origin"), ("Access-Control-Expose-Headers", "Inference-Header-Content-Length")]

    def _route(self, request: Request) -> Response:
        method, path = request.method, request.path
        if method == "OPTIONS":
            if not self.cors_origins:
                return json_error(405, "OPTIONS is answered only with --http-cors-origin (CORS is off)", [("Allow", "GET, POST")])
            asked = request.headers.get("access-control-request-headers", "")
            return Response(204, b"", [
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", asked or "Authorization, Content-Type, Content-Encoding, Inference-Header-Content-Length"),
                ("Access-Control-Max-Age", "600"),
            ])
        if path in self.page:
            if method not in ("GET", "HEAD"):
                return json_error(405, f"{method} {path}: the page is fetched with GET", [("Allow", "GET")])
            body, ctype = self.page[path]
            return Response(200, body, [("Content-Type", ctype), *PAGE_HEADERS])
        if path in ("/v2/health/live", "/v2/health/ready"):
            if method not in ("GET", "HEAD"):
                return json_error(405, f"{method} {path}: expected GET", [("Allow", "GET")])
            return self._health(path.endswith("ready"))
        if not (path == "/v2" or path.startswith(("/v2/", "/v1/"))):
            return json_error(404, f"no route {path!r}: the APIs are under /v2 (Open Inference Protocol) and /v1/classify; the page is at /")
        if self.token is not None:
            reason = self.token.refusal([("authorization", request.headers.get("authorization", ""))])
            if reason is not None:
                return json_error(401, reason, [("WWW-Authenticate", 'Bearer realm="mnist-edge"')])
        try:
            return self._api(request)
        except _Unsupported as exc:
            return json_error(415, exc.message)
        except _MethodNotAllowed as exc:
            return json_error(405, exc.message, [("Allow", exc.allow)])
        except Exception as exc:  # noqa: BLE001 - mapped to a status here
            return error_response(exc)

    def _api(self, request: Request) -> Response:
        method, path = request.method, request.path
        if path == "/v1/classify":
            _expect(method, "POST", path)
            return self._classify(request)
        if path == "/v2":
            _expect(method, "GET", path)
            extensions = [*v2.EXTENSIONS, "binary_tensor_data"]
            # Which process answered (as gRPC's ServerMetadata trailer): with --workers N, the spread.
            return ok_json({"name": "mnist-edge", "version": self.server_version, "extensions": extensions}, headers=[("Mnist-Edge-Pid", str(os.getpid()))])
        if path == "/v2/models/stats":
            _expect(method, "GET", path)
            return self._stats("", "")
        parts = path.split("/")  # "", "v2", "models", name, ["versions", v], [action]
        if len(parts) < 4 or parts[2] != "models" or not parts[3]:
            raise NotFound(f"no route {path!r}; expected /v2/models/<name>[/versions/<version>][/ready|/config|/stats|/infer]")
        name, rest = parts[3], parts[4:]
        version = ""
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or not rest[1]:
                raise NotFound(f"no route {path!r}: expected /versions/<version> after the model name")
            version, rest = rest[1], rest[2:]
        action = rest[0] if len(rest) == 1 else ("" if not rest else None)
        if action == "":
            _expect(method, "GET", path)
            return ok_json(message_json(self._metadata(name, version)))
        if action == "ready":
            _expect(method, "GET", path)
            return self._model_ready(name, version)
        if action == "config":
            _expect(method, "GET", path)
            return ok_json(message_json(v2.InferenceServicer.ModelConfig.__wrapped__(self.v2, pb.ModelConfigRequest(name=name, version=version), None).config))
        if action == "stats":
            _expect(method, "GET", path)
            return self._stats(name, version)
        if action == "infer":
            _expect(method, "POST", path)
            return self._infer(request, name, version)
        raise NotFound(f"no route {path!r}; expected /v2/models/<name>[/versions/<version>][/ready|/config|/stats|/infer]")

    # health and metadata ---------------------------------------------------------
    def _health(self, readiness: bool) -> Response:
        if not readiness:
            return ok_json({"live": True})
        if self.core.ready:
            return ok_json({"ready": True})
        return ok_json({"ready": False, "state": self.core.state.value}, 503, [("Retry-After", "1")])

    def _model_ready(self, name: str, version: str) -> Response:
        if self.core.model is None or not self.core.ready:
            return ok_json({"name": name, "ready": False}, 503, [("Retry-After", "1")])
        self.core.check_model(name, version)
        return ok_json({"name": name, "ready": True})

    def _metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        return v2.InferenceServicer.ModelMetadata.__wrapped__(self.v2, pb.ModelMetadataRequest(name=name, version=version), None)

    def _stats(self, name: str, version: str) -> Response:
        response = v2.InferenceServicer.ModelStatistics.__wrapped__(self.v2, pb.ModelStatisticsRequest(name=name, version=version), None)
        return ok_json(message_json(response))

    # inference: the gRPC RPCs' own handlers, with an HTTP call as their Responder ---------
    def _infer(self, request: Request, name: str, version: str) -> Response:
        media = _media_type(request)
        if media not in ("", JSON, OCTET):
            raise _Unsupported(f"Content-Type {media!r} not supported for inference, expected {JSON} (or {OCTET} with an Inference-Header-Content-Length header)")
        return self._serve(self.infer_rpc, InferMessage(request, name, version), request)

    def _classify(self, request: Request) -> Response:
        media = _media_type(request)
        if media not in RAW_IMAGE_TYPES and media != JSON:
            raise _Unsupported(
                f"Content-Type {media or '(none)'!r} not supported for /v1/classify, expected an image "
                "(image/png, image/jpeg, image/bmp, image/x-portable-graymap, application/octet-stream) or application/json"
            )
        return self._serve(self.classify_rpc, ClassifyMessage(request, raw=media in RAW_IMAGE_TYPES), request)

    def _serve(self, rpc, message, request: Request) -> Response:
        call = HttpCall(message, request.received_ns or time.perf_counter_ns(), request.headers)
        rpc.serve(call)
        return call.response or json_error(500, f"internal error in {rpc.method}: the request was left unanswered; the server logged it")


# -- REST calls through server/rpc.py -------------------------------------------------
class HttpCall:
    """An HTTP request as a `Responder` (server/rpc.py): the RPC handlers answer it exactly as
    they answer a gRPC call. `reply` takes the `Response` a REST RPC's `encode` built; `fail`
    turns a gRPC status into its HTTP status and a JSON error."""

    __slots__ = ("deadline", "headers", "is_cancelled", "message", "received_ns", "response")

    def __init__(self, message, received_ns: int, headers=None) -> None:
        self.message = message
        self.headers = headers if headers is not None else {}
        self.received_ns = received_ns
        self.deadline = None  # HTTP requests carry no deadline; the batcher caps each wait
        self.is_cancelled = None
        self.response: Response | None = None

    def reply(self, body: Response) -> None:
        self.response = body

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def fail(self, code, details: str) -> None:
        status = HTTP_STATUS.get(code.name, 500)
        retry = RETRY_AFTER.get(status)
        self.response = json_error(status, details, [("Retry-After", retry)] if retry else None)

    def peer(self) -> str | None:
        return None  # the access log's peer: not known at this layer over HTTP

    def invocation_metadata(self) -> tuple:
        """The request's headers, for the access log (x-request-id, traceparent)."""
        return tuple(self.headers.items())


class InferMessage(NamedTuple):
    request: Request
    model_name: str
    model_version: str


class RestDecoded(NamedTuple):
    pixels: np.ndarray
    decoded: v2.DecodedRequest
    parsed: InferRequest


class RestInferRpc(v2.ModelInferRpc):
    """POST /v2/models/<name>/infer: ModelInfer with a JSON (or binary-data) body in and out;
    decoding, checks, Core and statistics are ModelInfer's."""

    api = "v2_http"

    def read(self, message: InferMessage) -> InferRequest:
        if self.core.state is State.STOPPING:
            raise Unavailable("the server is shutting down; retry on another replica")
        self.core.check_model(message.model_name, message.model_version)
        return parse_infer(message.request, message.model_name, message.model_version)

    def pinned(self, parsed: InferRequest):
        return super().pinned(parsed.message)  # a version in its grace period, as on gRPC

    def request_id(self, parsed: InferRequest) -> str | None:
        return super().request_id(parsed.message)

    def decode(self, parsed: InferRequest) -> RestDecoded:
        decoded = super().decode(parsed.message)
        return RestDecoded(decoded.pixels, decoded, parsed)

    def encode(self, decoded: RestDecoded, result) -> Response:
        return infer_response(decoded.parsed, decoded.decoded, result)

    def capture_source(self, decoded: RestDecoded):
        return super().capture_source(decoded.decoded)


class ClassifyMessage(NamedTuple):
    request: Request
    raw: bool  # the body is one image file (else JSON)


class RestClassifyRequest(NamedTuple):
    message: digits_pb2.ClassifyRequest
    refused: dict[int, str]  # images refused before decoding (not base64), by index
    raw: bool


class RestClassifyDecoded(NamedTuple):
    pixels: np.ndarray | None
    decoded: DecodedClassify
    request: RestClassifyRequest


class RestClassifyRpc(ClassifyRpc):
    """POST /v1/classify: the native Classify with a raw image or JSON body; decoding,
    normalisation, Core and statistics are Classify's."""

    api = "native_http"

    def read(self, message: ClassifyMessage) -> RestClassifyRequest:
        if self.core.state is State.STOPPING:
            raise Unavailable("the server is shutting down; retry on another replica")
        if message.raw:
            pb_request = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=message.request.body)], return_probabilities=True)
            return RestClassifyRequest(pb_request, {}, True)
        return RestClassifyRequest(*classify_message(_parse_json(message.request.body, "the classify request")), False)

    def request_id(self, request: RestClassifyRequest) -> str | None:
        return super().request_id(request.message)

    def decode(self, request: RestClassifyRequest) -> RestClassifyDecoded:
        decoded = super().decode(request.message)
        return RestClassifyDecoded(decoded.pixels, decoded, request)

    def encode(self, decoded: RestClassifyDecoded, result) -> Response:
        answer = self.response(decoded.decoded, result)
        request = decoded.request
        with_image = request.message.return_normalized_image
        predictions = [
            {"error": request.refused[i]} if i in request.refused else prediction_json(p, with_image)
            for i, p in enumerate(answer.predictions)
        ]
        if request.raw:
            return json_error(400, predictions[0]["error"]) if "error" in predictions[0] else ok_json(predictions[0])
        return ok_json({"predictions": predictions, "model_version": answer.model_version})

    def capture_source(self, decoded: RestClassifyDecoded):
        return super().capture_source(decoded.decoded)


def classify_message(obj) -> tuple[digits_pb2.ClassifyRequest, dict[int, str]]:
    """JSON {"images": [...]} -> the native request, and the images refused here (not base64) by index."""
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), list):
        raise InvalidArgument('expected {"images": [{"encoded": base64} or {"pixels": base64 of 784 bytes}, ...]}')
    flag = obj.get("return_normalized_image", False)
    if not isinstance(flag, bool):
        raise InvalidArgument("'return_normalized_image' must be true or false")
    message = digits_pb2.ClassifyRequest(return_probabilities=True, return_normalized_image=flag)
    refused: dict[int, str] = {}
    for i, item in enumerate(obj["images"]):
        image = message.images.add()
        if not isinstance(item, dict) or len(item) != 1 or not ({"encoded", "pixels"} & item.keys()):
            refused[i] = f'image {i}: expected {{"encoded": base64 of an image file}} or {{"pixels": base64 of 784 bytes}}'
            continue  # left empty: the native API refuses it alone
        key = "encoded" if "encoded" in item else "pixels"
        try:
            setattr(image, key, _b64(item[key], f"image {i} {key}"))
        except InvalidArgument as exc:
            refused[i] = exc.message  # left empty: refused for this image alone
    return message, refused


def prediction_json(p: digits_pb2.Prediction, with_image: bool) -> dict:
    if p.HasField("error"):
        return {"error": p.error.message}
    out = {"digit": p.digit, "confidence": p.confidence, "probabilities": list(p.probabilities)}
    if with_image:
        out["normalized_image"] = base64.b64encode(p.normalized_image).decode()
    return out


def _expect(method: str, allowed: str, path: str) -> None:
    if method != allowed and not (allowed == "GET" and method == "HEAD"):
        raise _MethodNotAllowed(f"{method} {path}: expected {allowed}", allowed)


class _MethodNotAllowed(ServingError):
    """405, with the method the route takes."""

    def __init__(self, message: str, allow: str) -> None:
        super().__init__(message)
        self.allow = allow
