"""A closed-loop gRPC load generator on grpc.aio, bounded in count and time.

It sends pre-serialized request bytes with identity serializers, so the client spends
no time in protobuf and the floor and the server are fed exactly the same bytes.
`concurrency` callers each keep one call in flight; they share `channels` channels,
each with its own connection (`grpc.use_local_subchannel_pool`), so calls spread
over connections (and over worker processes with SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import time
from dataclasses import dataclass, field

import grpc
import numpy as np


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_us: np.ndarray = field(repr=False)
    client_cpu_s: float = 0.0
    error_codes: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_us, q)) if len(self.latencies_us) else float("nan")

    @property
    def client_cpu_fraction(self) -> float:
        """The load generator's own CPU use, as a fraction of one core."""
        return self.client_cpu_s / self.seconds if self.seconds > 0 else 0.0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def channel_options(local_pool: bool = True) -> list[tuple[str, object]]:
    opts: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ]
    if local_pool:
        opts.append(("grpc.use_local_subchannel_pool", 1))
    return opts


async def _unary(address: str, method: str, payload: bytes, concurrency: int, channels: int, max_requests: int, max_seconds: float, warmup: int) -> LoadResult:
    chans = [grpc.aio.insecure_channel(address, options=channel_options()) for _ in range(max(1, channels))]
    calls = [c.unary_unary(method, request_serializer=None, response_deserializer=None) for c in chans]
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), 30)
    for i in range(warmup):
        await calls[i % len(calls)](payload, timeout=30)
    lat: list[int] = []
    errors: dict[str, int] = {}
    budget = [max_requests]
    deadline = time.perf_counter() + max_seconds

    async def worker(k: int) -> None:
        call = calls[k % len(calls)]
        clock = time.perf_counter_ns
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t = clock()
            try:
                await call(payload, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            lat.append(clock() - t)

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    for c in chans:
        await c.close()
    return LoadResult(len(lat), sum(errors.values()), seconds, np.array(lat, dtype=np.float64) / 1e3, cpu, errors)


async def _stream(address: str, method: str, payload: bytes, concurrency: int, channels: int, max_requests: int, max_seconds: float, warmup: int) -> LoadResult:
    """Ping-pong: each caller keeps one stream open and one message in flight on it."""
    chans = [grpc.aio.insecure_channel(address, options=channel_options()) for _ in range(max(1, channels))]
    for c in chans:
        await asyncio.wait_for(c.channel_ready(), 30)
    lat: list[int] = []
    errors: dict[str, int] = {}
    budget = [max_requests]
    deadline = [0.0]  # set once every stream has warmed up
    cpu_at_start = [0.0]
    started = asyncio.Event()
    ready = [0]

    async def worker(k: int) -> None:
        call = chans[k % len(chans)].stream_stream(method, request_serializer=None, response_deserializer=None)()
        clock = time.perf_counter_ns
        for _ in range(warmup):
            await call.write(payload)
            await call.read()
        ready[0] += 1
        if ready[0] == concurrency:
            deadline[0] = time.perf_counter() + max_seconds
            cpu_at_start[0] = _cpu()
            started.set()
        await started.wait()
        while budget[0] > 0 and time.perf_counter() < deadline[0]:
            budget[0] -= 1
            t = clock()
            await call.write(payload)
            resp = await call.read()
            if resp is grpc.aio.EOF:
                errors["EOF"] = errors.get("EOF", 0) + 1
                break
            lat.append(clock() - t)
        await call.done_writing()

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    end, cpu_end = time.perf_counter(), _cpu()
    seconds = end - (deadline[0] - max_seconds) if deadline[0] else 0.0  # the measured window only
    for c in chans:
        await c.close()
    return LoadResult(len(lat), sum(errors.values()), seconds, np.array(lat, dtype=np.float64) / 1e3, cpu_end - cpu_at_start[0], errors)


def run(
    address: str,
    method: str,
    payload: bytes,
    *,
    concurrency: int = 1,
    channels: int | None = None,
    max_requests: int = 20000,
    max_seconds: float = 3.0,
    warmup: int = 50,
    stream: bool = False,
) -> LoadResult:
    """Drive `method` at `address` in a closed loop; bounded by `max_requests` and `max_seconds`."""
    channels = channels or min(concurrency, 8)
    fn = _stream if stream else _unary
    return _loop().run_until_complete(fn(address, method, payload, concurrency, channels, max_requests, max_seconds, warmup))


_LOOP: asyncio.AbstractEventLoop | None = None


def _loop() -> asyncio.AbstractEventLoop:
    """One event loop for every run in this process: grpc.aio binds its poller to the first
    loop it sees, and a second asyncio.run() loop can wait forever on calls that never complete."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        _LOOP = asyncio.new_event_loop()
    return _LOOP


def pin_to(cpu: int, pid: int = 0) -> bool:
    """Pin a process (this one by default) to one CPU if the machine has it; True when pinned."""
    if hasattr(os, "sched_setaffinity") and cpu < (os.cpu_count() or 1):
        try:
            os.sched_setaffinity(pid, {cpu})
        except ProcessLookupError:
            return False  # it has exited already: whoever waits for it will see how
        return True
    return False


def spawn_pinned(cmd: list[str], cpu: int, **popen_kw) -> subprocess.Popen:
    """Start `cmd` and pin it to `cpu` from here, not with a preexec_fn in the child.

    A preexec_fn makes subprocess fork() instead of vfork(), and in a process where gRPC is
    running, fork() runs gRPC's fork handlers in the child; they restart gRPC's poller there,
    which dies on the epoll descriptor that close_fds has just closed (SIGABRT before exec:
    "Epoll1Poller ... epoll_wait error: Bad file descriptor", grpc/grpc#43055). The child is
    pinned as soon as Popen returns (with vfork, once it has exec'd), in practice before it
    starts threads of its own; threads it starts later inherit the pin."""
    p = subprocess.Popen(cmd, **popen_kw)
    pin_to(cpu, p.pid)
    return p
