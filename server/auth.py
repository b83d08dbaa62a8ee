"""Bearer-token authentication for every service except health.

The token comes from a file (never a flag: flags show up in `ps`). Each call must send
`authorization: Bearer <token>`; the comparison takes constant time. Health checking is
never behind authentication, so orchestrators can probe without the secret. SIGHUP re-reads
the file (App.rotate_token): the new token is accepted at once and the old one refused.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

EXEMPT_PREFIX = "/grpc.health.v1.Health/"


def read_token(path: str) -> bytes:
    try:
        token = Path(path).read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"--token-file {path}: {exc.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"--token-file {path}: the token is {len(token)} bytes; use at least 16 random bytes")
    return token


class TokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: bytes) -> None:
        self._expected = b"bearer " + token

    def set_token(self, token: bytes) -> bool:
        """Accept `token` from now on (and no longer the previous one); True if it changed.
        One reference swap: a call checks against either the old or the new value, never a mix."""
        expected = b"bearer " + token
        changed = not hmac.compare_digest(expected, self._expected)
        self._expected = expected
        return changed

    def _deny(self, handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
        def abort(request_or_iterator, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if handler is not None and handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(abort)
        if handler is not None and handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(abort)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(abort)
        return grpc.unary_unary_rpc_method_handler(abort)

    def refusal(self, metadata) -> str | None:
        """None when `metadata` carries the token; otherwise why the call is refused."""
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
                break
        # Case-insensitive scheme, constant-time comparison of the whole header value.
        candidate = presented[:7].lower() + presented[7:]
        if hmac.compare_digest(candidate, self._expected):
            return None
        return "missing authorization metadata (expected 'authorization: Bearer <token>')" if not presented else "wrong bearer token"

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(EXEMPT_PREFIX):
            return continuation(handler_call_details)
        reason = self.refusal(handler_call_details.invocation_metadata)
        if reason is None:
            return continuation(handler_call_details)
        return self._deny(continuation(handler_call_details), reason)
