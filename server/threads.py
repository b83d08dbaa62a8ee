"""Handler threads: a last-in-first-out pool for unary calls, and a separate pool for streams.

grpcio's sync server hands every call to one `ThreadPoolExecutor`, whose idle threads
take work in no particular order, and whose 64 threads (mnist-edge's old default) compete for
one core under load. `LifoThreadPool` gives each call to the thread that went idle most
recently, so a lightly loaded server keeps reusing one thread (the likeliest to still have its
stack and onnxruntime's per-thread state in the cache) and a busy one the few it needs; threads
start on demand, up to `max_workers`, and never exit before shutdown. With a fixed response,
4 such threads cost a quarter less CPU per request than the stock 64-thread pool at
concurrency 64 (`python -m mnist_edge.bench.anatomy`, docs/performance.md "Handler threads").

Streams hold their thread for as long as they stay open. grpcio lets a method carry its
own pool (`experimental_thread_pool` on the behavior); `register` uses that to put every
streaming method on a stream pool, so open streams can never take the threads that unary
calls need.

ModelInfer and Classify, when the inference lane does not serve them, run on these threads
through the same handlers as on the lane (server/rpc.py), swapped in by `register`'s `replace`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import NamedTuple

import grpc


class _Work(NamedTuple):
    """A piece of work submitted to the pool."""

    future: futures.Future
    fn: Callable
    args: tuple
    kwargs: dict


class _Worker:
    __slots__ = ("wake", "work")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()  # held while idle: the worker sleeps on acquiring it
        self.work: _Work | None = None


class LifoThreadPool(futures.ThreadPoolExecutor):
    """A ThreadPoolExecutor whose most recently idle thread takes the next piece of work."""

    def __init__(self, max_workers: int, thread_name_prefix: str = "rpc") -> None:
        if max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        # The base class is initialised only so that isinstance checks and attributes hold;
        # none of its queue or threads are used.
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._lifo_max = max_workers
        self._lifo_prefix = thread_name_prefix
        self._lifo_lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._backlog: list[_Work] = []  # work waiting for a thread, oldest first
        self._backlog_head = 0
        self._lifo_threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable, /, *args, **kwargs) -> futures.Future:
        future: futures.Future = futures.Future()
        work = _Work(future, fn, args, kwargs)
        with self._lifo_lock:
            if self._closed:
                raise RuntimeError("cannot schedule new work after shutdown")
            if self._idle:
                worker = self._idle.pop()
                worker.work = work
                worker.wake.release()
                return future
            if len(self._lifo_threads) < self._lifo_max:
                worker = _Worker()
                worker.work = work
                t = threading.Thread(target=self._loop, args=(worker,), name=f"{self._lifo_prefix}_{len(self._lifo_threads)}", daemon=True)
                self._lifo_threads.append(t)
                t.start()
                return future
            self._backlog.append(work)
        return future

    @property
    def threads(self) -> int:
        """Threads started so far."""
        return len(self._lifo_threads)

    def _next(self, worker: _Worker) -> _Work | None:
        """The next work for `worker`: from the backlog, else sleep until handed some; None at shutdown."""
        with self._lifo_lock:
            if self._backlog_head < len(self._backlog):
                work = self._backlog[self._backlog_head]
                self._backlog[self._backlog_head] = None  # type: ignore[call-overload]
                self._backlog_head += 1
                if self._backlog_head > 64 and self._backlog_head * 2 > len(self._backlog):
                    del self._backlog[: self._backlog_head]
                    self._backlog_head = 0
                return work
            if self._closed:
                return None
            self._idle.append(worker)
        worker.wake.acquire()
        work, worker.work = worker.work, None
        return work

    def _loop(self, worker: _Worker) -> None:
        work, worker.work = worker.work, None
        while work is not None:
            future, fn, args, kwargs = work
            work = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the future, as ThreadPoolExecutor does
                    future.set_exception(exc)
                    del exc
                else:
                    future.set_result(result)
                del future, fn, args, kwargs
            work = self._next(worker)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lifo_lock:
            self._closed = True
            idle, self._idle = self._idle, []
            pending = self._backlog[self._backlog_head :]
            if cancel_futures:
                self._backlog, self._backlog_head = [], 0
            threads = list(self._lifo_threads)
        if cancel_futures:
            for future, *_ in pending:
                future.cancel()
        for worker in idle:
            worker.work = None
            worker.wake.release()
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()
        super().shutdown(wait=wait, cancel_futures=cancel_futures)


class _Collect:
    """Stands in for a server to receive what a generated registration function registers."""

    def __init__(self) -> None:
        self.registered: list[tuple[str, dict]] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass  # every generated function also calls add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.registered.append((service, dict(handlers)))


def _on_pool(behavior: Callable, pool: futures.ThreadPoolExecutor) -> Callable:
    def run(*args, **kwargs):
        return behavior(*args, **kwargs)

    # grpcio's server reads these from the behavior: keep a non-blocking method non-blocking
    # (the health service's Watch answers through a callback and holds no thread), and a
    # method's own pool if it already has one.
    if getattr(behavior, "experimental_non_blocking", False):
        run.experimental_non_blocking = True
    own = getattr(behavior, "experimental_thread_pool", None)
    run.experimental_thread_pool = own if isinstance(own, futures.ThreadPoolExecutor) else pool
    return run


def register(
    add: Callable[[grpc.Server], None],
    server: grpc.Server,
    stream_pool: futures.ThreadPoolExecutor,
    replace: dict[str, grpc.RpcMethodHandler] | None = None,
    elsewhere: frozenset[str] = frozenset(),
) -> list[str]:
    """Call `add(fake_server)` (a generated `add_..._to_server` bound to its servicer), move
    every streaming method onto `stream_pool`, swap in the handlers of `replace` (by method
    name), and register the result on `server`. Methods in `elsewhere` (full names, served by
    the inference lane) are left out of grpcio's registered methods, so gRPC core hands their
    calls to the lane alone. Returns the services registered."""
    collect = _Collect()
    add(collect)  # type: ignore[arg-type]
    names = []
    for service, handlers in collect.registered:
        for method, handler in list(handlers.items()):
            handler = (replace or {}).get(method, handler)
            if handler.request_streaming or handler.response_streaming:
                field = ("stream_stream" if handler.response_streaming else "stream_unary") if handler.request_streaming else "unary_stream"
                handler = handler._replace(**{field: _on_pool(getattr(handler, field), stream_pool)})
            handlers[method] = handler
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, {m: h for m, h in handlers.items() if f"/{service}/{m}" not in elsewhere})
        names.append(service)
    return names
