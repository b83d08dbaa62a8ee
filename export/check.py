"""`mnist-edge export --check MODELS`: re-verify a published models/ directory.

Checks, in order: every file the manifest names exists with its recorded size and
sha256; every model classifies the manifest's golden images as recorded; the gate on the
full test set with this machine's onnxruntime; and the worst-digit budget on the held-out
proxy splits, re-measured (the synthetic handwriting always; the font split where its fonts
are installed, else read from the manifest). The budgets are the ones the model was
exported with (the manifest's `budgets`); a budget given on the command line replaces its
recorded value. Recorded accuracies are compared within the gate's budgets, not for
equality, because int8 kernels may differ between CPUs. Needs onnxruntime, numpy and
Pillow only (no torch, no onnx).
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


def budgets_for(manifest: dict[str, Any], overrides: dict[str, float] | None = None) -> Budgets:
    """The manifest's recorded budgets (the defaults for a manifest from before they were recorded), with overrides."""
    recorded = manifest.get("budgets") or {}
    return Budgets.from_dict({**Budgets().to_dict(), **recorded, **(overrides or {})})


def run(models_dir: Path, overrides: dict[str, float] | None = None, *, data_dir: str | None = None, offline: bool = False,
        log=lambda m: None) -> GateResult:
    manifest, directory = load_manifest(models_dir)
    budgets = budgets_for(manifest, overrides)
    blobs = verify_files(manifest, directory)
    source = "recorded in the manifest" if manifest.get("budgets") else "defaults (the manifest records none)"
    gate = GateResult(note=source + (f"; from the command line: {', '.join(sorted(overrides))}" if overrides else ""))
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
    if "int8" in blobs and manifest.get("proxy"):
        gate.checks += _proxy_checks(manifest, blobs["int8"], budgets, log)
    return gate


def _proxy_checks(manifest: dict[str, Any], int8: bytes, budgets: Budgets, log) -> list:
    """The held-out proxy splits re-measured where they can be built here, read from the manifest where not."""
    from mnist_edge.export import proxies
    from mnist_edge.imaging.normalize import NORMALISER_VERSION

    recorded_figures = manifest["proxy"].get("int8") or {}
    version = int((manifest.get("normaliser") or {}).get("version", 1))
    checks = []
    if version != NORMALISER_VERSION:
        checks.append(_check("normaliser version the model was made for", version, "<=", NORMALISER_VERSION,
                             f"this mnist-edge has version {NORMALISER_VERSION} only"))
        checks[-1].passed = False
        return checks
    spec = proxies.ProxySpec.from_dict(manifest["proxy"].get("spec") or {})
    wanted = tuple(n for n in proxies.HELD_OUT if n in recorded_figures)
    sets, unavailable = proxies.build_sets(spec, version, wanted, log=log)
    figures = proxies.measure(int8, sets)
    for name, f in figures.items():
        rec = float(recorded_figures[name]["accuracy"])
        checks.append(_check(f"{name}: accuracy below the recorded figure", rec - f["accuracy"], "<=", budgets.max_drop,
                             f"recorded {rec:.4f}, measured {f['accuracy']:.4f}"))
    recorded = frozenset(n for n in unavailable if n in recorded_figures)
    for name in recorded:
        figures[name] = recorded_figures[name]
    return checks + proxies.digit_checks(figures, budgets, recorded)


def main(models_dir: Path, overrides: dict[str, float] | None = None, *, data_dir: str | None = None, offline: bool = False) -> int:
    try:
        gate = run(models_dir, overrides, data_dir=data_dir, offline=offline, log=lambda m: print(m, file=sys.stderr))
    except CheckFailed as exc:
        print(f"check FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"check {'PASSED' if gate.passed else 'FAILED'}: {models_dir} (budgets {gate.note})")
    for c in gate.checks:
        print("  " + c.line())
    return 0 if gate.passed else 1
