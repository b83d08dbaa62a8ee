"""A closed-loop HTTP/1.1 load generator on asyncio, bounded in count and time: the REST
counterpart of `loadgen` (same LoadResult, same percentiles).

Each of `concurrency` callers keeps one keep-alive connection (TCP_NODELAY) and one request
in flight on it; the request bytes are built once, so the client spends no time encoding
and the HTTP floor and the server are fed exactly the same bytes. Responses are read by
Content-Length (both servers send it); any status other than 200 counts as an error.
"""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np

from mnist_edge.bench.loadgen import LoadResult, _cpu, _loop


def request_bytes(path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: bench", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> int:
    writer.write(payload)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
            break
    if length:
        await reader.readexactly(length)
    return status


async def _run(address: str, payload: bytes, concurrency: int, max_requests: int, max_seconds: float, warmup: int) -> LoadResult:
    host, port = address.rsplit(":", 1)
    conns = []
    for _ in range(concurrency):
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 30)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append((reader, writer))
    for i in range(warmup):
        await _one(*conns[i % len(conns)], payload)
    lat: list[int] = []
    errors: dict[str, int] = {}
    budget = [max_requests]
    deadline = time.perf_counter() + max_seconds

    async def worker(k: int) -> None:
        reader, writer = conns[k]
        clock = time.perf_counter_ns
        while budget[0] > 0 and time.perf_counter() < deadline:
            budget[0] -= 1
            t = clock()
            status = await _one(reader, writer, payload)
            if status != 200:
                errors[str(status)] = errors.get(str(status), 0) + 1
                continue
            lat.append(clock() - t)

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    for _, writer in conns:
        writer.close()
    return LoadResult(len(lat), sum(errors.values()), seconds, np.array(lat, dtype=np.float64) / 1e3, cpu, errors)


def run(address: str, payload: bytes, *, concurrency: int = 1, max_requests: int = 20000, max_seconds: float = 3.0, warmup: int = 50) -> LoadResult:
    """POST `payload` (a whole request from `request_bytes`) to `address` in a closed loop."""
    return _loop().run_until_complete(_run(address, payload, concurrency, max_requests, max_seconds, warmup))
