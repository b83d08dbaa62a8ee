"""The inference lane: ModelInfer and Classify served straight from gRPC's completion queue, on one thread.

grpcio's sync server moves every unary call between two threads twice: its polling thread
takes the call from gRPC core and hands it to a pool thread, which asks for the request
message and sleeps until the polling thread has it. On a one-core device each hand-off is a
thread wake-up, and together they cost more than the model (docs/performance.md "Where the time went before the lane"). The lane asks
gRPC core for the calls of its methods on a completion queue of its own, registered on the
same server (so the same port, TLS, message limits, keepalive and shutdown), and one thread
does all of it: takes the call, reads the message, runs the model, sends the answer.

Everything that is ready when the thread looks (one pass over the queue) is answered as one
group: the method's handler (`rpc.InferenceRpc.serve_group`, the same code that serves the
method on the handler threads) decodes each request, and `Core.classify_group` runs the valid
ones together (batches of at most --max-batch-size images, --max-queue counted, expired
deadlines dropped before compute). At concurrency 1 that is a batch of one with no
hand-off at all; under load, the requests that arrived while a batch ran form the next.
While the thread answers a group, new calls wait in gRPC core, unread, until it is done.

Admission keeps overload from costing goodput or memory: the lane reads a call's message only
while the images it has admitted (read or being read, not yet answered) are under --max-queue,
counting a message being read at the size recent calls of its method had; the other calls it
has taken wait unread, in arrival order, and are read as answers free room. A group holds at
most --max-queue images (by message size: 784 bytes or more per image, and never more than
--max-request-images for one call, so a message of junk does not hold others back); calls read beyond that
wait, read, for the next group, so no call is refused because others arrived with it. A
waiting call is refused with RESOURCE_EXHAUSTED at once when the work ahead of it (estimated
from recent groups) would not let it start before its deadline, or would keep it waiting
more than MAX_WAIT_S (docs/limits.md).

At the end of a drain the lane holds new calls, unread, and refuses them with UNAVAILABLE once
gRPC's shutdown has begun (`hold`, `release`; server/drain.py says why).

The lane talks to grpcio's Cython layer (`grpc._cython.cygrpc`), the layer grpcio's own
servers are built on; `supported()` checks that this grpcio has what the lane uses, and the
server serves ModelInfer and Classify from its thread pool when it does not (or with
--no-infer-lane). Each call is a `LaneCall`, a `rpc.Responder`: reply() or fail() answers it,
from the lane thread or, after hand_off(), from another one: Classify hands off calls with
encoded images, whose decoding may take long.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc

log = logging.getLogger("mnist_edge.server")

try:
    from grpc._cython import cygrpc
except ImportError:  # pragma: no cover - every grpcio wheel has it
    cygrpc = None

_RECEIVING, _ANSWERING, _HANDED_OFF = 0, 1, 2
_NO_DEADLINE = 1e15  # gRPC core reports "no deadline" as ~9.2e18 seconds since the epoch
_POLL_S = 0.5  # how often an idle lane looks at its stop flag
_EMPTY = ()
BYTES_PER_IMAGE = 784  # the fewest bytes a request spends on one image: a message's size bounds its images
MAX_WAIT_S = 5.0  # longest estimated wait for a call taken but not yet read; beyond it, RESOURCE_EXHAUSTED
REFUSAL = "the server is shutting down: this call was not started; retry it (on another replica)"


def supported(server: grpc.Server) -> bool:
    """True when `server` (from grpc.server, not started) and this grpcio have what the lane uses."""
    if cygrpc is None:
        return False
    cy = getattr(server, "_cy_server", None)
    needed = ("register_completion_queue", "register_method", "request_registered_call")
    ops = ("CompletionQueue", "ReceiveMessageOperation", "SendInitialMetadataOperation", "SendMessageOperation",
           "SendStatusFromServerOperation", "ReceiveCloseOnServerOperation", "CompletionType", "StatusCode")
    return cy is not None and all(hasattr(cy, n) for n in needed) and all(hasattr(cygrpc, n) for n in ops)


PROBE_METHOD = "/mnist_edge.LaneProbe/Echo"


def self_check(timeout_s: float = 2.0) -> str | None:
    """Prove the lane works with this grpcio before a server relies on it: one call through a
    lane on a throwaway loopback server. None when the echo came back intact; otherwise the
    reason, and the caller serves ModelInfer and Classify from the handler threads instead.

    `supported()` only sees that the private names exist; this sees that they still behave (a
    grpcio upgrade may keep a name and change what it does)."""
    probe = b"mnist-edge lane self-check"
    server = None
    lane = None
    try:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
        if not supported(server):
            return "this grpcio lacks the private names the lane uses"

        def echo(calls: list[LaneCall]) -> None:
            for call in calls:
                call.reply(call.message)

        lane = Lane(server, {PROBE_METHOD: echo}, max_calls=1)
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            return "could not open a loopback port for the probe"
        server.start()
        lane.start()
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            call = channel.unary_unary(PROBE_METHOD, request_serializer=None, response_deserializer=None)
            answer = call(probe, timeout=timeout_s)
        if answer != probe:
            return f"the probe call came back altered ({len(answer)} bytes, expected {len(probe)})"
        return None
    except Exception as exc:  # noqa: BLE001 (any failure means: do not use the lane)
        return f"the probe call failed: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        if server is not None:
            server.stop(None).wait(timeout_s)
        if lane is not None:
            lane.stop(timeout_s)


class LaneCall:
    """One call on the lane, as a `rpc.Responder`: what a handler reads (`message`, `deadline`,
    `received_ns`) and answers with reply() or fail(), from the lane thread or another one."""

    __slots__ = ("arrived", "call", "deadline", "images", "message", "metadata", "method", "received_ns", "stage")
    is_cancelled = None  # the lane does not watch for cancellation: a cancelled call's answer is dropped by gRPC core

    def __init__(self, call, method: _Method, deadline: float | None, arrived: float) -> None:
        self.call = call
        self.method = method
        self.deadline = deadline  # time.monotonic() seconds, or None
        self.arrived = arrived  # time.monotonic() when the call was taken
        self.message: bytes = b""
        self.received_ns = 0  # time.perf_counter_ns() when the message was read: where the server's time starts
        self.stage = _RECEIVING
        self.images = 0  # the images admission counts for this call (estimated until its message is read)
        self.metadata = _EMPTY  # the call's invocation metadata

    def header(self, name: str) -> str | None:
        """The value of the call's metadata `name` (lower case), or None."""
        for key, value in self.metadata:
            if key == name:
                return value if isinstance(value, str) else value.decode("latin-1")
        return None

    def peer(self) -> str | None:
        """The client's address (for the access log; asked before the answer releases the call)."""
        call = self.call
        if call is None:
            return None
        peer = call.peer()
        return peer.decode("utf-8", "replace") if isinstance(peer, bytes) else peer

    def invocation_metadata(self) -> tuple:
        return self.metadata

    def hand_off(self) -> None:
        """The handler passes this call to another thread, which will reply() or fail() it."""
        self.stage = _HANDED_OFF

    def reply(self, body: bytes) -> None:
        """Answer OK with the serialized response `body`."""
        self.stage = _ANSWERING
        self.call.start_server_batch(
            (
                cygrpc.SendInitialMetadataOperation(_EMPTY, 0),
                cygrpc.SendMessageOperation(body, 0),
                cygrpc.SendStatusFromServerOperation(_EMPTY, cygrpc.StatusCode.ok, b"", 0),
                cygrpc.ReceiveCloseOnServerOperation(0),
            ),
            self,
        )

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """End the call with `code`: a trailers-only response, no message (as grpcio's abort)."""
        self.stage = _ANSWERING
        self.call.start_server_batch(
            (
                cygrpc.SendInitialMetadataOperation(_EMPTY, 0),
                cygrpc.SendStatusFromServerOperation(_EMPTY, code.value[0], details.encode("utf-8", "replace"), 0),
                cygrpc.ReceiveCloseOnServerOperation(0),
            ),
            self,
        )


# A handler answers a group of calls of its method: it must reply() or fail() each call once
# (or hand_off() it to a thread that will).
Handler = Callable[[list[LaneCall]], None]


class _Method:
    __slots__ = ("estimate", "handler", "name", "open")

    def __init__(self, name: str, handler: Handler) -> None:
        self.name = name
        self.handler = handler
        self.open = True
        self.estimate = 1.0  # images per call, recently (a moving average): a message being read counts this much


class Lane:
    """Serve `handlers` ({"/package.Service/Method": handler}) of `server` on one thread.

    Build it after grpc.server() and before server.start() (gRPC core takes method and queue
    registrations only then); call start() after server.start(), and stop() once the server
    has stopped. `authorize(metadata)` returns None to admit a call, or the reason to refuse
    it with UNAUTHENTICATED.
    """

    def __init__(
        self,
        server: grpc.Server,
        handlers: dict[str, Handler],
        authorize: Callable[[tuple], str | None] | None = None,
        max_calls: int = 1024,
        gather_s: float = 0.0,
        max_group: int = 256,
        max_images: int = 4096,
        max_request_images: int = 1024,
        on_refused: Callable[[LaneCall, str], None] | None = None,
    ) -> None:
        if not supported(server):
            raise RuntimeError("this grpcio does not offer what the inference lane needs")
        self._cy = server._cy_server  # grpcio's private attribute: checked by supported()
        self._cq = cygrpc.CompletionQueue()
        self._cy.register_completion_queue(self._cq)
        self._methods = [_Method(name, handler) for name, handler in handlers.items()]
        for m in self._methods:
            self._cy.register_method(m.name)
        self._authorize = authorize
        self._on_refused = on_refused  # told of each call `authorize` refuses (the access log)
        # The methods share `max_calls` requests for calls, kept open in gRPC core; a slot is
        # asked for again only when its call has ended: at most that many calls are taken at
        # once (more wait in gRPC core), and every call taken is one the server has accepted,
        # which a graceful shutdown lets finish (gRPC core refuses the ones no slot took).
        self._slots = max(1, max_calls // len(self._methods))
        # --max-queue-delay-us on the lane: after taking what is ready, keep taking calls for
        # up to gather_s, or until max_group calls (--max-batch-size: each carries an image or more).
        self._gather_s = gather_s
        self._max_group = max_group
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.groups = 0  # groups answered, and calls in them: their ratio is the mean group size
        self.calls = 0
        # Admission (module docstring): images admitted, calls waiting unread and read-but-deferred.
        self._max_images = max(1, max_images)
        self._max_request_images = max(1, max_request_images)
        self._admitted = 0
        self._waiting: collections.deque[LaneCall] = collections.deque()
        self._waiting_images = 0
        self._deferred: list[LaneCall] = []
        self._recent_images = 0.0  # images answered and seconds spent, recently (decaying sums): the
        self._recent_s = 0.0  # lane's pace, weighted by images, for a waiting call's estimate
        self._taken = 0  # calls taken and not yet ended
        # Drain: calls held unread at the end of a drain (server/drain.py).
        self._holding = False
        self._released = False
        self._held: list[LaneCall] = []
        self._hold_lock = threading.Lock()
        self.last_arrival = 0.0  # time.monotonic() when the last call was held

    @property
    def methods(self) -> list[str]:
        return [m.name for m in self._methods]

    def start(self) -> None:
        for m in self._methods:
            for _ in range(self._slots):
                self._cy.request_registered_call(self._cq, self._cq, m.name, m)
        self._thread = threading.Thread(target=self._loop, name="infer-lane", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the lane thread. Only once the server has stopped: gRPC core requires a server's
        queues to outlive it."""
        self._stopping = True
        if self._thread is not None:
            self._cq.shutdown()  # wakes the thread at once
            self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        poll = self._cq.poll
        timeout = cygrpc.CompletionType.queue_timeout
        shutdown = cygrpc.CompletionType.queue_shutdown
        complete = cygrpc.CompletionType.operation_complete
        while True:
            # Calls read but deferred (the last group was full) are answered next, without waiting.
            event = poll(0 if self._deferred else time.time() + _POLL_S)
            kind = event.completion_type
            if kind == shutdown:
                return
            if kind == timeout and not self._deferred:
                if self._stopping:
                    return
                continue
            ready, self._deferred = self._deferred, []
            while kind == complete:
                self._take_safely(event, ready)
                event = poll(0)  # everything else that is ready now joins this group
                kind = event.completion_type
            if ready and self._gather_s > 0:
                self._gather(ready)
            if ready:
                self._answer(ready)

    def _gather(self, ready: list[LaneCall]) -> None:
        """Keep taking events for up to gather_s after the first request, to fill a batch."""
        complete = cygrpc.CompletionType.operation_complete
        end = ready[0].arrived + self._gather_s
        while len(ready) < self._max_group:
            left = end - time.monotonic()
            if left <= 0:
                return
            event = self._cq.poll(time.time() + left)
            if event.completion_type != complete:
                return
            self._take_safely(event, ready)

    def _take_safely(self, event, ready: list[LaneCall]) -> None:
        try:
            self._take(event, ready)
        except Exception:  # one bad event must not end the lane
            log.exception("inference lane: unexpected error handling a gRPC event")

    def _take(self, event, ready: list[LaneCall]) -> None:
        tag = event.tag
        if type(tag) is _Method:
            if not event.success:  # the server is shutting down: no more calls for this method
                tag.open = False
                return
            now = time.monotonic()
            d = event.call_details.deadline
            c = LaneCall(event.call, tag, None if d > _NO_DEADLINE else now + (d - time.time()), now)
            self._taken += 1
            c.metadata = event.invocation_metadata
            if self._authorize is not None:
                reason = self._authorize(event.invocation_metadata)
                if reason is not None:
                    if self._on_refused is not None:
                        self._on_refused(c, "UNAUTHENTICATED")
                    c.fail(grpc.StatusCode.UNAUTHENTICATED, reason)
                    return
            if self._holding:
                self._hold(c)
                return
            self._admit(c, now)
        elif tag.stage == _RECEIVING:
            if not event.success:  # cancelled or broken before the message came: nothing to answer
                self._release(tag)
                return
            message = event.batch_operations[0].message()
            if message is None:
                tag.fail(grpc.StatusCode.UNIMPLEMENTED, f"{tag.method.name} requires exactly one request message")
                return
            tag.message = message
            tag.received_ns = time.perf_counter_ns()
            # What admission counted was an estimate; no valid request holds more than a full one
            # (a larger message is junk, refused as soon as it is read: it must not hold others back).
            n = min(max(1, len(message) // BYTES_PER_IMAGE), self._max_request_images)
            self._admitted += n - tag.images
            tag.images = n
            m = tag.method
            m.estimate += 0.5 * (n - m.estimate)
            ready.append(tag)
        else:  # _ANSWERING: the answer went out (or the call ended); dropping the tag frees the call
            self._release(tag)

    def _release(self, c: LaneCall) -> None:
        """The call has ended: its images leave the admitted count (waiting calls may be read now)
        and its slot asks gRPC core for the next call of its method."""
        c.call = None
        self._taken -= 1
        if c.images:
            self._admitted -= c.images
            c.images = 0
            if self._waiting:
                self._read_waiting()
        m = c.method
        if m.open and not self._stopping:
            try:
                self._cy.request_registered_call(self._cq, self._cq, m.name, m)
            except ValueError:  # "server must be started and not shutting down": no more calls
                m.open = False

    def _answer(self, ready: list[LaneCall]) -> None:
        """Answer the calls of `ready` that fit in one group of --max-queue images; defer the rest."""
        images = 0
        for i, c in enumerate(ready):
            if i and images + c.images > self._max_images:
                self._deferred = ready[i:]
                ready = ready[:i]
                break
            images += c.images
        started = time.monotonic()
        self.groups += 1
        self.calls += len(ready)
        groups: dict[_Method, list[LaneCall]] = {}
        for c in ready:
            groups.setdefault(c.method, []).append(c)
        for method, calls in groups.items():
            error = None
            try:
                method.handler(calls)
            except Exception as exc:  # a handler bug: the calls it left get INTERNAL
                log.error("unexpected error in %s", method.name, exc_info=exc)
                error = type(exc).__name__
            left = [c for c in calls if c.stage == _RECEIVING]
            if left and error is None:
                log.error("%s left %d of %d calls unanswered", method.name, len(left), len(calls))
                error = "a call was left unanswered"
            for c in left:  # every call is answered, whatever the handler did
                c.fail(grpc.StatusCode.INTERNAL, f"internal error in {method.name.rsplit('/', 1)[-1]}: {error}; the server logged it")
        self._recent_images = 0.8 * self._recent_images + images
        self._recent_s = 0.8 * self._recent_s + (time.monotonic() - started)

    # -- admission ------------------------------------------------------------------------------
    def _admit(self, c: LaneCall, now: float) -> None:
        """Read `c`'s message now if the admitted images leave room; else it waits, unread, or is
        refused at once when it could not start in time."""
        estimate = max(1, round(c.method.estimate))
        if self._admitted == 0 or (not self._waiting and self._admitted + estimate <= self._max_images):
            self._read(c, estimate)
            return
        pace = self._recent_images / self._recent_s if self._recent_s > 0 else 0.0  # images per second
        wait = (self._admitted + self._waiting_images) / pace if pace > 0 else 0.0
        if wait > MAX_WAIT_S:
            c.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the server is overloaded: about {wait:.1f}s of work is ahead of this call, over the {MAX_WAIT_S:g}s a call may wait to start; retry later or elsewhere")
            return
        if c.deadline is not None and now + wait > c.deadline:
            c.fail(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"the server is overloaded: this call could not start before its deadline (about {wait:.2f}s of work ahead, {max(0.0, c.deadline - now):.2f}s left)")
            return
        c.images = estimate
        self._waiting_images += estimate
        self._waiting.append(c)

    def _read(self, c: LaneCall, images: int) -> None:
        c.images = images
        self._admitted += images
        c.call.start_server_batch((cygrpc.ReceiveMessageOperation(0),), c)

    def _read_waiting(self) -> None:
        """Read waiting calls, oldest first, while the admitted images leave room."""
        now = time.monotonic()
        while self._waiting:
            c = self._waiting[0]
            if self._admitted and self._admitted + c.images > self._max_images:
                return
            self._waiting.popleft()
            self._waiting_images -= c.images
            estimate, c.images = c.images, 0
            if c.deadline is not None and now >= c.deadline:
                c.fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is overloaded: this call could not start before its deadline")
                continue
            self._read(c, estimate)

    def calls_in_progress(self) -> int:
        """Calls taken and not yet answered, those held by a drain excepted."""
        return self._taken - len(self._held)

    # -- the end of a drain (server/drain.py) ------------------------------------------------------
    def hold(self) -> None:
        """Hold new calls, unread, until release()."""
        self._holding = True

    def release(self) -> None:
        """Refuse the held calls (and any that arrive from now on) with UNAVAILABLE."""
        with self._hold_lock:
            self._released = True
            held, self._held = self._held, []
        for c in held:
            c.fail(grpc.StatusCode.UNAVAILABLE, REFUSAL)

    def _hold(self, c: LaneCall) -> None:
        with self._hold_lock:
            if not self._released:
                self._held.append(c)
                self.last_arrival = time.monotonic()
                return
        c.fail(grpc.StatusCode.UNAVAILABLE, REFUSAL)
