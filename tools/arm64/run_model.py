"""Run an ONNX model on the MNIST test set and save its digits: the same script on x86 and
under qemu-aarch64, so the two runs can be compared image by image.

Needs only the standard library, numpy and onnxruntime (it runs inside a bare Debian arm64
root where the project is not installed). The session is built the way server/runner.py
builds it (intra-op 1, inter-op 1, sequential, ORT_ENABLE_ALL, no spinning), so the graph
optimisations and the MLAS kernels are the ones the server would get on that CPU.

    python run_model.py --model M.onnx --images t10k-images-idx3-ubyte --labels t10k-labels-idx1-ubyte \
        --out result.npz [--optimized-model opt.onnx] [--batch 256] [--single 200] [--limit N]

Writes result.npz (digits, probabilities, labels, digits_batch1) and result.json (timings,
the CPU features onnxruntime sees: AT_HWCAP/AT_HWCAP2 bits, /proc/cpuinfo, versions).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort

# Linux arm64 <asm/hwcap.h> bits onnxruntime's CPU detection reads (core/common/cpuid_info.cc,
# core/mlas/lib/platform.cpp): dot product picks the UDOT/SDOT QGEMM kernels, I8MM the
# UMMLA/SMMLA ones; without either MLAS runs its plain NEON int8 kernels.
HWCAP = {"asimd": 1 << 1, "asimdhp": 1 << 10, "asimddp": 1 << 20, "sve": 1 << 22}
HWCAP2 = {"svei8mm": 1 << 9, "i8mm": 1 << 13, "bf16": 1 << 14, "sme": 1 << 23}
AT_HWCAP, AT_HWCAP2 = 16, 26


def read_idx(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def cpu_features() -> dict:
    info: dict = {"machine": platform.machine(), "qemu_cpu": os.environ.get("QEMU_CPU")}
    if platform.machine() == "aarch64":
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        libc.getauxval.argtypes = [ctypes.c_ulong]
        hw, hw2 = libc.getauxval(AT_HWCAP), libc.getauxval(AT_HWCAP2)
        info["at_hwcap"], info["at_hwcap2"] = hex(hw), hex(hw2)
        info["features"] = {k: bool(hw & v) for k, v in HWCAP.items()} | {k: bool(hw2 & v) for k, v in HWCAP2.items()}
        f = info["features"]
        # onnxruntime's choice for an int8 x int8 (or uint8 x int8) QGEMM, as MLAS platform.cpp makes it.
        info["mlas_qgemm_kernel"] = (
            "SVE I8MM (SVE SMMLA/UMMLA)" if f["sve"] and f["svei8mm"] else
            "I8MM (SMMLA/UMMLA)" if f["i8mm"] else
            "dot product (SDOT/UDOT)" if f["asimddp"] else
            "NEON (SMULL/SADALP, no dot product)"
        )
    try:
        with open("/proc/cpuinfo") as fh:
            lines = fh.read().splitlines()
        info["proc_cpuinfo_head"] = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "Features", "CPU implementer", "CPU part", "flags")][:3]
    except OSError as exc:
        info["proc_cpuinfo_head"] = [f"unreadable: {exc}"]
    return info


def session(model: str, optimized: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized:
        so.optimized_model_filepath = optimized
    so.log_severity_level = int(os.environ.get("RUN_MODEL_ORT_LOG_LEVEL", "3"))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--labels", required=True)
    ap.add_argument("--out", required=True, help="result .npz (a .json with the same stem is written beside it)")
    ap.add_argument("--optimized-model", help="also save the graph onnxruntime optimised for this CPU")
    ap.add_argument("--batch", type=int, default=256, help="images per session.run (the server's default max batch)")
    ap.add_argument("--single", type=int, default=200, help="also run the first N images one at a time (the M=1 kernels)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N images (0: all)")
    args = ap.parse_args(argv)

    images, labels = read_idx(args.images), read_idx(args.labels)
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    t0 = time.perf_counter()
    sess = session(args.model, args.optimized_model)
    load_s = time.perf_counter() - t0

    digits, probs = [], []
    t0 = time.perf_counter()
    for i in range(0, len(images), args.batch):
        p, d = sess.run(["probabilities", "digit"], {"pixels": np.ascontiguousarray(images[i: i + args.batch])})
        probs.append(p)
        digits.append(d)
    batch_s = time.perf_counter() - t0
    digits_a, probs_a = np.concatenate(digits), np.concatenate(probs)

    single = min(args.single, len(images))
    t0 = time.perf_counter()
    d1 = [sess.run(["digit"], {"pixels": images[i: i + 1]})[0][0] for i in range(single)]
    single_s = time.perf_counter() - t0

    np.savez_compressed(args.out, digits=digits_a.astype(np.int64), probabilities=probs_a.astype(np.float32), labels=labels.astype(np.int64), digits_batch1=np.array(d1, dtype=np.int64))
    meta = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "images": int(len(images)),
        "batch": args.batch,
        "session_load_s": load_s,
        "inference_s": batch_s,
        "images_per_s": len(images) / batch_s if batch_s else None,
        "single_images": single,
        "single_s": single_s,
        "accuracy": float((digits_a == labels).mean()),
        "cpu": cpu_features(),
    }
    if os.environ.get("RUN_MODEL_MAPS"):
        # Where onnxruntime's library is mapped, for the qemu instruction scan (insn_scan.py).
        with open("/proc/self/maps") as src, open(os.environ["RUN_MODEL_MAPS"], "w") as dst:
            dst.write(src.read())
    stem = args.out[: -len(".npz")] if args.out.endswith(".npz") else args.out
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: meta[k] for k in ("images", "accuracy", "inference_s", "session_load_s")} | {"cpu": meta["cpu"].get("mlas_qgemm_kernel", meta["cpu"]["machine"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
