"""Domain errors that carry their gRPC status, and the one place that maps them.

Codecs, the batcher and the model store raise these; `status_and_message` turns them into
a status with the error's message: ModelInfer and Classify (server/rpc.py) call it, the other
unary methods through `grpc_errors`. Anything else becomes INTERNAL with a logged traceback,
so a bug never leaks a stack trace to a client or kills the server.
"""

from __future__ import annotations

import functools
import logging

import grpc

log = logging.getLogger("mnist_edge.server")


class ServingError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


def abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with the status for `exc`. Raises (grpc's context.abort always does).

    Aborting sends a trailers-only response, with no message: only then does a client's
    retry policy treat the call as not committed and retry UNAVAILABLE on another replica.
    """
    context.abort(*status_and_message(exc, method))


def status_and_message(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a client gets for `exc`; an unexpected error is logged here."""
    if isinstance(exc, ServingError):
        return exc.code, exc.message
    log.error("unexpected error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}; the server logged the traceback"


def status_of(exc: BaseException) -> grpc.StatusCode:
    return exc.code if isinstance(exc, ServingError) else grpc.StatusCode.INTERNAL


def grpc_errors(empty_response):
    """Decorator for unary servicer methods: map exceptions to statuses.

    `empty_response` builds the message returned with a non-OK status (grpc ignores
    it, but the handler must return something of the right type).
    """

    def wrap(fn):
        method = fn.__name__

        @functools.wraps(fn)
        def handler(self, request, context):
            try:
                return fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - this is the mapping point
                abort(context, exc, method)
                return empty_response()  # not reached: abort raises

        return handler

    return wrap
