"""Soak: concurrency 64, 50,000 requests mixing good, bad, cancelled and short-deadline calls.

Every request gets exactly one answer, each good answer is right for its own image, no status
outside the expected set appears, and the server's RSS grows by at most 10 MB after warm-up.
Loopback only; bounded by count and by time.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import Counter

import grpc
import numpy as np

from helpers.servers import health_status, ort_reference, start_cli_server, wait_for
from mnist_edge.protos.digits.v1 import digits_pb2 as dpb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as dpb_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

TOTAL = 50_000
WARMUP = 5_000
CONCURRENCY = 64
TIME_LIMIT_S = 420


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_soak(tmp_path, mnist, shipped_manifest):
    images = mnist.test.images
    manifest = json.loads(shipped_manifest.read_text())
    _, expected = ort_reference(shipped_manifest.parent / manifest["models"]["int8"]["file"], images)
    proc, address = start_cli_server(tmp_path, "--log-level", "warning")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        report = asyncio.run(_drive(address, images, expected, proc.pid))
        assert health_status(address) == "SERVING"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0
    print(json.dumps(report, indent=1))
    assert report["answers"] == report["sent"] == TOTAL, report  # exactly one answer each
    assert report["wrong_answers"] == 0, report
    assert report["unexpected"] == {}, report
    assert report["rss_growth_mb"] <= 10.0, report
    assert report["kinds"]["good"] > TOTAL // 2


async def _drive(address: str, images: np.ndarray, expected: np.ndarray, pid: int) -> dict:
    rng = random.Random(20261126)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(8)]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    v2 = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
    native = [dpb_grpc.DigitClassifierStub(ch) for ch in channels]
    counts: Counter = Counter()
    kinds: Counter = Counter()
    unexpected: Counter = Counter()
    wrong: list = []
    state = {"next": 0, "answers": 0, "rss_after_warmup": None}
    started = time.monotonic()

    def v2_request(i: int, good: bool) -> pb.ModelInferRequest:
        k = 1 + i % 4
        idx = [(i * 7 + j) % len(images) for j in range(k)]
        raw = images[idx].tobytes()
        if not good:
            raw = raw[: -1 - i % 50]  # a byte count that does not fit
        return idx, pb.ModelInferRequest(
            model_name="mnist", id=str(i),
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[k, 28, 28])],
            raw_input_contents=[raw],
        )

    async def one(i: int, ch: int) -> None:
        roll = rng.random()
        kind = "good" if roll < 0.70 else "bad" if roll < 0.80 else "cancel" if roll < 0.90 else "deadline"
        kinds[kind] += 1
        try:
            if kind in ("good", "bad") and i % 5 == 0:
                idx = [(i * 3) % len(images)]
                pixels = images[idx[0]].tobytes() if kind == "good" else b"\0" * (700 + i % 80)
                resp = await native[ch].Classify(dpb.ClassifyRequest(images=[dpb.Image(pixels=pixels)], request_id=str(i)), timeout=60)
                p = resp.predictions[0]
                if kind == "good":
                    if p.HasField("error") or p.digit != expected[idx[0]] or resp.request_id != str(i):
                        wrong.append((i, "native", p.digit, int(expected[idx[0]])))
                    counts["OK"] += 1
                else:
                    counts["per-image INVALID_ARGUMENT" if p.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] else "bad answered OK"] += 1
                    if p.error.code != grpc.StatusCode.INVALID_ARGUMENT.value[0]:
                        unexpected["bad answered OK"] += 1
                return
            idx, req = v2_request(i, kind != "bad")
            if kind == "cancel":
                call = v2[ch].ModelInfer(req, timeout=60)
                await asyncio.sleep(rng.random() * 0.002)
                call.cancel()
                try:
                    resp = await call
                except asyncio.CancelledError:
                    counts["CANCELLED"] += 1
                    return
            else:
                timeout = 0.0005 + rng.random() * 0.002 if kind == "deadline" else 60
                resp = await v2[ch].ModelInfer(req, timeout=timeout)
            got = np.frombuffer(resp.raw_output_contents[1], "<i8")
            if kind == "bad" or resp.id != str(i) or not np.array_equal(got, expected[idx]):
                wrong.append((i, kind, got.tolist(), expected[idx].tolist()))
            counts["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            counts[code.name] += 1
            allowed = {
                "bad": {grpc.StatusCode.INVALID_ARGUMENT},
                "deadline": {grpc.StatusCode.DEADLINE_EXCEEDED},
                "cancel": {grpc.StatusCode.CANCELLED},
                "good": set(),
            }[kind]
            if code not in allowed:
                unexpected[f"{kind}:{code.name}:{exc.details()}"] += 1
        except asyncio.CancelledError:
            counts["CANCELLED"] += 1
        finally:
            state["answers"] += 1
            if state["answers"] == WARMUP:
                state["rss_after_warmup"] = rss_kb(pid)

    async def worker(w: int) -> None:
        while time.monotonic() - started < TIME_LIMIT_S:
            i = state["next"]
            if i >= TOTAL:
                return
            state["next"] = i + 1
            await one(i, w % len(channels))

    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    seconds = time.monotonic() - started
    await asyncio.sleep(0.5)  # let the server settle before the last RSS reading
    rss_end = rss_kb(pid)
    for ch in channels:
        await ch.close()
    return {
        "sent": state["next"],
        "answers": state["answers"],
        "seconds": round(seconds, 1),
        "requests_per_s": round(state["answers"] / seconds),
        "statuses": dict(counts),
        "kinds": dict(kinds),
        "unexpected": dict(unexpected),
        "wrong_answers": len(wrong),
        "wrong_examples": wrong[:5],
        "rss_after_warmup_mb": round((state["rss_after_warmup"] or 0) / 1024, 1),
        "rss_end_mb": round(rss_end / 1024, 1),
        "rss_growth_mb": round((rss_end - (state["rss_after_warmup"] or rss_end)) / 1024, 2),
    }
