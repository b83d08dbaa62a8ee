"""Compare the x86 run of the int8 model with its qemu-aarch64 runs (tools/arm64/agreement.sh).

    python tools/arm64/compare.py OUT_DIR

Reads OUT_DIR/x86_64.npz/.json and OUT_DIR/<cpu>.npz/.json for every emulated CPU, the
optimised graphs (*.optimized.onnx, op types and activation types), the onnxruntime logs and
the instruction scan (<cpu>.insn.json), and writes OUT_DIR/agreement.json and agreement.md.
Exit 0 when every emulated run agrees with x86 on every image, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REFERENCE = "x86_64"
ORT_SUFFIX = ".ortfmt"  # runs of the ORT-format model (export/ort_format.py), same comparisons


def graph_summary(path: Path) -> dict | None:
    """Op types onnxruntime ended up with, and the element type fed to its QGemm/QLinear ops."""
    if not path.exists():
        return None
    try:
        import onnx
    except ImportError:
        return {"note": "onnx not installed: op types not read"}
    m = onnx.load(str(path))
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output)}
    inits = {i.name: i.data_type for i in m.graph.initializer}
    quant_ops = []
    # per op: (index of A's zero point, index of B): the zero point's type is the activation's type
    layout = {"QGemm": (2, 3), "QLinearMatMul": (2, 3), "MatMulInteger": (2, 1), "MatMulIntegerToFloat": (4, 1)}
    for n in m.graph.node:
        if n.op_type in layout:
            zp, w = layout[n.op_type]
            elem = inits.get(n.input[zp]) if len(n.input) > zp else None
            elem = elem or types.get(n.input[0])
            wt = inits.get(n.input[w])
            quant_ops.append({"op": n.op_type, "activation": onnx.TensorProto.DataType.Name(elem) if elem else "?",
                              "weight": onnx.TensorProto.DataType.Name(wt) if wt else "?"})
    return {"ops": [n.op_type for n in m.graph.node], "quantized_ops": quant_ops}


def load(out: Path, name: str) -> tuple[dict, dict]:
    arrays = dict(np.load(out / f"{name}.npz"))
    meta = json.loads((out / f"{name}.json").read_text())
    return arrays, meta


def compare(out: Path) -> dict:
    ref, ref_meta = load(out, REFERENCE)
    result: dict = {
        "reference": {"name": REFERENCE, **ref_meta, "graph": graph_summary(out / f"{REFERENCE}.optimized.onnx")},
        "runs": {},
    }
    order = (out / "cpus.txt").read_text().split() if (out / "cpus.txt").exists() else []
    names = [p.stem for p in out.glob("*.npz") if p.stem != REFERENCE]
    names.sort(key=lambda n: (n.endswith(ORT_SUFFIX), order.index(n.removesuffix(ORT_SUFFIX)) if n.removesuffix(ORT_SUFFIX) in order else 99, n))
    for name in names:
        arr, meta = load(out, name)
        same = arr["digits"] == ref["digits"]
        diff = np.flatnonzero(~same)
        single = min(len(arr["digits_batch1"]), len(ref["digits_batch1"]))
        b1_same = arr["digits_batch1"][:single] == ref["digits_batch1"][:single]
        run = {
            **meta,
            "agreement_with_x86": float(same.mean()),
            "differing_images": int(len(diff)),
            "differing_indices": diff[:50].tolist(),
            "accuracy": float((arr["digits"] == arr["labels"]).mean()),
            "x86_accuracy": float((ref["digits"] == ref["labels"]).mean()),
            "max_abs_probability_diff": float(np.abs(arr["probabilities"] - ref["probabilities"]).max()),
            "batch1_agreement_with_x86": float(b1_same.mean()) if single else None,
            "batch1_images": int(single),
            "batch1_agrees_with_batched": bool((arr["digits_batch1"][:single] == arr["digits"][:single]).all()),
            "graph": graph_summary(out / f"{name}.optimized.onnx"),
        }
        insn = out / f"{name}.insn.json"
        if insn.exists():
            run["instruction_scan"] = json.loads(insn.read_text())
        log = out / f"{name}.ort.log"
        if log.exists():
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "cpuinfo" in ln.lower() or "cpu features" in ln.lower()]
            run["ort_log_cpuinfo_lines"] = list(dict.fromkeys(lines))[:10]
        if name.endswith(ORT_SUFFIX):
            result.setdefault("ort_format_runs", {})[name.removesuffix(ORT_SUFFIX)] = run
        else:
            result["runs"][name] = run
    every = list(result["runs"].values()) + list(result.get("ort_format_runs", {}).values())
    result["all_agree"] = all(r["differing_images"] == 0 for r in every) and bool(result["runs"])
    return result


def markdown(r: dict) -> str:
    ref = r["reference"]
    lines = [
        "# int8 model: x86 vs emulated ARM64 (qemu-aarch64)",
        "",
        f"Model run with onnxruntime {ref['onnxruntime']} on all {ref['images']} MNIST test images in batches of {ref['batch']} "
        f"(plus the first {ref['single_images']} one at a time), session options as the server's. "
        f"x86 reference accuracy {ref['accuracy']:.4f}.",
        "",
        "| CPU (QEMU_CPU) | dot product | i8mm | SVE | MLAS int8 kernel (from the CPU features) | kernel instructions seen | agreement with x86 | differing images | accuracy | max prob. diff | batch-1 agreement | emulated time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in r["runs"].items():
        f = run["cpu"].get("features", {})
        scan = run.get("instruction_scan", {})
        seen = ", ".join(f"{k} {v}" for k, v in scan.get("onnxruntime_counts", {}).items() if v) or ("none" if scan else "not scanned")
        lines.append(
            f"| {run['cpu'].get('qemu_cpu') or name} | {'yes' if f.get('asimddp') else 'no'} | {'yes' if f.get('i8mm') else 'no'} | {'yes' if f.get('sve') else 'no'} | {run['cpu'].get('mlas_qgemm_kernel', '?')} | {seen} | "
            f"{run['agreement_with_x86']:.4f} | {run['differing_images']} | {run['accuracy']:.4f} | {run['max_abs_probability_diff']:.2e} | "
            f"{run['batch1_agreement_with_x86']:.4f} | {run['inference_s']:.1f} s |"
        )
    if r.get("ort_format_runs"):
        lines += ["", "The ORT-format model (export/ort_format.py: EXTENDED optimisations, U8S8 QGemm), against the x86 run of the .onnx model:", "",
                  "| CPU | agreement with x86 .onnx | differing images | accuracy | max prob. diff | kernel instructions seen |", "|---|---|---|---|---|---|"]
        for name, run in r["ort_format_runs"].items():
            scan = run.get("instruction_scan", {})
            seen = ", ".join(f"{k} {v}" for k, v in scan.get("onnxruntime_counts", {}).items() if v) or ("none" if scan else "not scanned")
            lines.append(f"| {run['cpu'].get('qemu_cpu') or name} | {run['agreement_with_x86']:.4f} | {run['differing_images']} | {run['accuracy']:.4f} | {run['max_abs_probability_diff']:.2e} | {seen} |")
    g = ref.get("graph") or {}
    lines += ["", f"x86 graph after onnxruntime's optimisations: quantized ops {g.get('quantized_ops')}."]
    for name, run in r["runs"].items():
        g = run.get("graph") or {}
        lines.append(f"{name} graph: quantized ops {g.get('quantized_ops')}.")
    said = {" / ".join(run.get("ort_log_cpuinfo_lines", [])[:4]) for run in r["runs"].values()} - {""}
    for text in sorted(said):
        lines.append("onnxruntime's CPU detection under qemu said: " + text + " (so it read the features from getauxval(AT_HWCAP/AT_HWCAP2)).")
    for name, run in r["runs"].items():
        scan = run.get("instruction_scan")
        if scan:
            lines.append(f"{name}: instruction scan of onnxruntime's library: {scan['verdict']}.")
    lines += ["", "All emulated runs agree with x86 on every image." if r["all_agree"] else "**Some images differ between x86 and emulated ARM64.**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    out = Path((argv or sys.argv[1:])[0])
    r = compare(out)
    (out / "agreement.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "agreement.md").write_text(markdown(r))
    print(markdown(r))
    return 0 if r["all_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
