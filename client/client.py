"""A small client for the native API (digits.v1) and health checking.

Needs grpcio, protobuf and numpy only: no onnxruntime, no torch, and not the
Open Inference Protocol modules (they would clash with tritonclient's copies of
the same protobuf package in a user's process).

    from mnist_edge.client import DigitClient
    with DigitClient("127.0.0.1:50051") as c:
        for p in c.classify([open("seven.png", "rb").read()]):
            print(p.digit, p.confidence)

Several targets (or a `dns:///name:port` target) are balanced round-robin, and a
call that meets UNAVAILABLE or CANCELLED is retried on another replica by gRPC's retry policy
(`RETRYABLE`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mnist_edge.protos.digits.v1 import digits_pb2 as pb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc

SERVICE = "digits.v1.DigitClassifier"

# Statuses retried on another replica (gRPC retries only what the server answered; a call this
# process cancels or times out is not retried). UNAVAILABLE: the server refused the call before
# starting it (shutting down, starting up, unreachable). CANCELLED: gRPC core cancels a call
# that reaches a server whose shutdown has begun, although the call never started; and a call a
# server cancels at the end of its grace period is safe to send again, as every method of this
# service is idempotent (classifying an image twice gives the same answer, and changes nothing).
RETRYABLE = ("UNAVAILABLE", "CANCELLED")


class ClientError(RuntimeError):
    """A call failed; the message says what happened in words a person can act on."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Prediction:
    digit: int | None
    confidence: float
    probabilities: list[float] = field(default_factory=list)
    normalized_image: bytes = b""
    error: str | None = None
    error_code: int = 0


ImageLike = bytes | bytearray | np.ndarray | str | os.PathLike


def _service_config(retries: int) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE}],
                    "retryPolicy": {
                        "maxAttempts": max(2, min(retries + 1, 5)),
                        "initialBackoff": "0.05s",
                        "maxBackoff": "1s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": list(RETRYABLE),
                    },
                }
            ],
        }
    )


def channel_target(targets: str | Sequence[str]) -> str:
    """One gRPC target for one address, several IPv4 addresses, or a dns:/// name."""
    if isinstance(targets, str):
        targets = [t for t in targets.split(",") if t]
    targets = list(targets)
    if not targets:
        raise ValueError("no target given; expected HOST:PORT")
    if len(targets) == 1:
        return targets[0]
    hosts = []
    for t in targets:
        host = t.split(":", 1)[0]
        if not all(part.isdigit() for part in host.split(".")) or host.count(".") != 3:
            raise ValueError(f"several targets must be IPv4 HOST:PORT addresses (or use one dns:///name:port), got {t!r}")
        hosts.append(t)
    return "ipv4:" + ",".join(hosts)


def describe_rpc_error(exc: grpc.RpcError, target: str) -> ClientError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        if details and ("starting" in details or "not loaded" in details):
            return ClientError(f"server at {target} is starting (model not loaded yet): {details}", code)
        if details and "shutting down" in details:
            return ClientError(f"server at {target} is shutting down: {details}", code)
        return ClientError(f"cannot reach a server at {target} ({details}); is `mnist-edge serve` running there?", code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ClientError(f"server at {target} did not answer in time ({details})", code)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ClientError(f"server at {target} refused the credentials: {details}", code)
    name = code.name if code is not None else "ERROR"
    return ClientError(f"{name}: {details}", code)


class DigitClient:
    def __init__(
        self,
        targets: str | Sequence[str] = "127.0.0.1:50051",
        *,
        timeout: float = 30.0,
        retries: int = 3,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        max_message_bytes: int = 16 * 1024 * 1024,
        options: Sequence[tuple[str, object]] = (),
    ) -> None:
        self.target = channel_target(targets)
        self.timeout = timeout
        opts = [
            ("grpc.service_config", _service_config(retries)),
            ("grpc.enable_retries", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # gRPC buffers a call for retries only up to this size (256 KiB by default); a larger
            # request would be committed once sent and not retried on another replica.
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            *options,
        ]
        if credentials is not None:
            if token:
                credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            self.channel = grpc.secure_channel(self.target, credentials, options=opts)
            self._metadata: tuple[tuple[str, str], ...] = ()
        else:
            self.channel = grpc.insecure_channel(self.target, options=opts)
            self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.stub = pb_grpc.DigitClassifierStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> DigitClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # -- requests -----------------------------------------------------------------
    @staticmethod
    def to_image(image: ImageLike) -> pb.Image:
        """bytes of an encoded file, a path to one, or a uint8 28x28 array (raw pixels)."""
        if isinstance(image, np.ndarray):
            arr = np.asarray(image)
            if arr.dtype != np.uint8 or arr.size != 784:
                raise ValueError(f"raw images must be uint8 with 784 pixels (28x28), got {arr.dtype} {list(arr.shape)}")
            return pb.Image(pixels=np.ascontiguousarray(arr).tobytes())
        if isinstance(image, (str, os.PathLike)):
            return pb.Image(encoded=Path(image).read_bytes())
        return pb.Image(encoded=bytes(image))

    @staticmethod
    def _prediction(p: pb.Prediction) -> Prediction:
        if p.HasField("error"):
            return Prediction(digit=None, confidence=0.0, error=p.error.message, error_code=p.error.code)
        return Prediction(
            digit=int(p.digit),
            confidence=float(p.confidence),
            probabilities=list(p.probabilities),
            normalized_image=bytes(p.normalized_image),
        )

    def classify(
        self,
        images: Iterable[ImageLike],
        *,
        return_probabilities: bool = False,
        return_normalized_image: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> list[Prediction]:
        request = pb.ClassifyRequest(
            images=[self.to_image(i) for i in images],
            return_probabilities=return_probabilities,
            return_normalized_image=return_normalized_image,
            request_id=request_id,
        )
        try:
            response = self.stub.Classify(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.target) from None
        return [self._prediction(p) for p in response.predictions]

    def classify_pixels(self, pixels: np.ndarray, **kw) -> list[Prediction]:
        """uint8 [N,28,28] raw MNIST-convention images, sent as one request."""
        return self.classify(list(np.asarray(pixels, dtype=np.uint8).reshape(-1, 28, 28)), **kw)

    def classify_stream(self, requests: Iterable[pb.ClassifyRequest], timeout: float | None = None) -> Iterator[pb.ClassifyResponse]:
        try:
            yield from self.stub.ClassifyStream(iter(requests), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.target) from None

    def model_info(self) -> pb.ModelInfo:
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise describe_rpc_error(exc, self.target) from None

    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """The health status name (SERVING, NOT_SERVING, SERVICE_UNKNOWN, ...)."""
        try:
            resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise describe_rpc_error(exc, self.target) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def add_connection_args(parser) -> None:
    """--tls-ca / --tls-cert / --tls-key / --token-file, shared by the client commands."""
    g = parser.add_argument_group("connection security")
    g.add_argument("--tls-ca", default=None, help="PEM CA bundle to verify the server (turns TLS on)")
    g.add_argument("--tls-cert", default=None, help="PEM client certificate (mutual TLS)")
    g.add_argument("--tls-key", default=None, help="PEM client private key (mutual TLS)")
    g.add_argument("--token-file", default=None, help="file holding the bearer token the server expects")


def connection_kwargs(args) -> dict:
    """DigitClient keyword arguments from add_connection_args' options."""
    kw: dict = {}
    if args.tls_ca or args.tls_cert:
        def read(path):
            return Path(path).read_bytes() if path else None

        kw["credentials"] = grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key), read(args.tls_cert))
    if args.token_file:
        kw["token"] = Path(args.token_file).read_text().strip()
    return kw
