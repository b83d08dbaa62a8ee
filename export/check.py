"""`mnist-edge export --check MODELS`: re-verify a published models/ directory.

Checks, in order: every file the manifest names exists with its recorded size and
sha256; every model classifies the manifest's golden images as recorded; and the gate
on the full test set with this machine's onnxruntime. Recorded accuracies are
compared within the gate's budgets, not for equality, because int8 kernels may
differ between CPUs. Needs onnxruntime and numpy only (no torch, no onnx).
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from mnist_edge.export.verify import Budgets, Check, GateResult, _check, ort_predict

MANIFEST = "manifest.json"


class CheckFailed(Exception):
    pass


def load_manifest(path: Path) -> tuple[dict[str, Any], Path]:
    mpath = path / MANIFEST if path.is_dir() else path
    if not mpath.is_file():
        raise CheckFailed(f"{mpath}: no manifest (expected a models/ directory or its manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as exc:
        raise CheckFailed(f"{mpath}: not valid JSON: {exc}") from None
    if manifest.get("schema_version") != 1:
        raise CheckFailed(f"{mpath}: schema_version {manifest.get('schema_version')!r}, expected 1")
    return manifest, mpath.parent


def verify_files(manifest: dict[str, Any], directory: Path) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for kind, entry in sorted(manifest["models"].items()):
        path = directory / entry["file"]
        if not path.is_file():
            raise CheckFailed(f"model {kind!r}: file {path} is missing")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise CheckFailed(f"model {kind!r}: {path} is {len(data)} bytes, manifest says {entry['bytes']}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CheckFailed(f"model {kind!r}: {path} has sha256 {digest}, manifest says {entry['sha256']}")
        blobs[kind] = data
    return blobs


def golden_images(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    imgs = [np.frombuffer(base64.b64decode(g["pixels"]), dtype=np.uint8).reshape(28, 28) for g in manifest["golden"]]
    return np.stack(imgs), np.array([g["digit"] for g in manifest["golden"]], dtype=np.int64)


def run(models_dir: Path, budgets: Budgets, *, data_dir: str | None = None, offline: bool = False) -> GateResult:
    manifest, directory = load_manifest(models_dir)
    blobs = verify_files(manifest, directory)
    gate = GateResult()
    gate.checks.append(Check("files match manifest sha256", len(blobs), len(manifest["models"]), ">=", True, ", ".join(sorted(blobs))))
    images, digits = golden_images(manifest)
    preds = {}
    for kind, data in blobs.items():
        got = ort_predict(data, images).digits
        wrong = int((got != digits).sum())
        gate.checks.append(_check(f"{kind}: golden images misclassified", wrong, "<=", 0, f"{len(digits)} images"))
    from mnist_edge.training import data as mnist_data

    test = mnist_data.load(data_dir, offline=offline).test
    labels = test.labels.astype(np.int64)
    for kind, data in blobs.items():
        preds[kind] = ort_predict(data, test.images)
    int8 = preds.get("int8")
    fp32 = preds.get("fp32")
    if int8 is not None:
        acc8 = int8.accuracy(labels)
        gate.checks.append(_check("int8 accuracy", acc8, ">=", budgets.min_accuracy))
        recorded = float(manifest["models"]["int8"]["accuracy"])
        gate.checks.append(
            _check("int8 accuracy below the recorded figure", recorded - acc8, "<=", budgets.max_drop, f"recorded {recorded:.4f}, measured {acc8:.4f}")
        )
        if fp32 is not None:
            acc32 = fp32.accuracy(labels)
            gate.checks.append(_check("accuracy drop (fp32 - int8)", acc32 - acc8, "<=", budgets.max_drop, f"fp32 {acc32:.4f}"))
            gate.checks.append(_check("int8 vs fp32 top-1 agreement", float((int8.digits == fp32.digits).mean()), ">=", budgets.min_agreement))
        ort = preds.get("ort")
        if ort is not None:
            differ = int((ort.digits != int8.digits).sum())
            gate.checks.append(_check("ORT-format copy: digits that differ from int8", differ, "<=", 0, "must be identical"))
    return gate


def main(models_dir: Path, budgets: Budgets, *, data_dir: str | None = None, offline: bool = False) -> int:
    try:
        gate = run(models_dir, budgets, data_dir=data_dir, offline=offline)
    except CheckFailed as exc:
        print(f"check FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"check {'PASSED' if gate.passed else 'FAILED'}: {models_dir}")
    for c in gate.checks:
        print("  " + c.line())
    return 0 if gate.passed else 1
