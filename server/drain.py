"""The last step of a drain: stop gRPC without a call ending CANCELLED.

Once a gRPC server's shutdown has begun, gRPC core cancels every call that reaches it
(CANCELLED, although the call never started), and keeps doing so until each client has read
the GOAWAY the shutdown sends. A client that sends a call in that moment, typically because its
previous call has just been answered, loses it. So the shutdown waits for a moment when no
client is free to send:

1. `hold()`: calls that arrive from now on are held, not started (answered later);
2. the server waits (bounded) until no call is in progress and no new call has arrived for a
   moment: every client that had a call in progress has been answered and its next call is
   held;
3. gRPC's shutdown begins (GOAWAY); clients blocked on held calls send nothing meanwhile;
4. `release()`: each held call is refused with UNAVAILABLE, which a client may retry
   elsewhere (it was never started); its next call finds the GOAWAY and the closed port.

A client with several calls outstanding at once may still send one into step 3's moment; the
client library retries what gRPC core cancels there (client/client.py). Timings: docs/limits.md.

`DrainGate` does steps 1 and 4 for the methods grpcio's thread pools serve, as a server
interceptor (while serving it costs grpcio's interceptor call and an attribute read per call;
the ModelInfer and Classify calls on the inference lane do not pass through it); the lane holds
its own calls (server/lane.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from mnist_edge.server.lane import REFUSAL

HOLD_MAX_S = 1.0  # longest wait for calls in progress before gRPC's shutdown begins (less if --grace-s is short)
SETTLE_S = 0.1  # quiet time (no call in progress, none arriving) that ends the hold: clients are all waiting
GOAWAY_S = 0.1  # after gRPC's shutdown began: time for the GOAWAY to reach clients before held calls are refused

OPEN, HOLDING, REFUSING = 0, 1, 2


class DrainGate(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.stage = OPEN
        self.held = 0  # calls held now (counted when they arrive)
        self.last_arrival = 0.0  # time.monotonic() when the last call was held
        self._lock = threading.Lock()
        self._released = threading.Event()

    def hold(self) -> None:
        self.stage = HOLDING

    def release(self) -> None:
        self.stage = REFUSING
        self._released.set()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if self.stage == OPEN or handler is None:
            return handler
        with self._lock:
            self.held += 1
            self.last_arrival = time.monotonic()
        return _refusing(handler, self._refuse)

    def _refuse(self, request, context: grpc.ServicerContext):
        try:
            self._released.wait(30)  # bounded: release() comes within HOLD_MAX_S + SETTLE_S + GOAWAY_S
        finally:
            with self._lock:
                self.held -= 1
        context.abort(grpc.StatusCode.UNAVAILABLE, REFUSAL)


def _refusing(handler: grpc.RpcMethodHandler, refuse: Callable) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by `refuse` (whatever its streaming kind)."""
    field = (
        ("stream_stream" if handler.response_streaming else "stream_unary")
        if handler.request_streaming
        else ("unary_stream" if handler.response_streaming else "unary_unary")
    )
    return handler._replace(**{field: refuse})


def grpcio_calls_in_progress(server: grpc.Server) -> int | None:
    """Calls grpcio's thread pools are running or queueing (grpcio's private count), or None
    when this grpcio does not keep it (the drain then waits HOLD_MAX_S)."""
    state = getattr(server, "_state", None)
    count = getattr(state, "active_rpc_count", None)
    return count if isinstance(count, int) else None
