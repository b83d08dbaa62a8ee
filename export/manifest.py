"""models/: content-addressed ONNX files and manifest.json, published atomically.

Publishing order (docs/design.md): model files, then the signature, then the manifest,
each by temp file + fsync + rename, then an fsync of the directory. A reader that
trusts only manifest.json therefore never sees a manifest that names a file that is
not yet complete. The manifest holds no timestamps or timings, so exporting the same
checkpoint twice gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mnist_edge.training.data import atomic_write

SCHEMA_VERSION = 1
MODEL_NAME = "mnist"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
PIXEL_CONVENTION = "uint8 row-major 28x28; 0 = background, 255 = full ink (MNIST convention)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_name(kind: str, data: bytes, suffix: str = ".onnx") -> str:
    return f"{MODEL_NAME}-{kind}-{sha256(data)[:12]}{suffix}"


def model_entry(kind: str, data: bytes, *, precision: str, accuracy: float, agreement: float, fp32_layers: list[str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "file": content_name(kind, data),
        "sha256": sha256(data),
        "bytes": len(data),
        "precision": precision,
        "format": "onnx",
        "accuracy": round(float(accuracy), 6),
        "agreement_with_torch": round(float(agreement), 6),
        "fp32_layers": list(fp32_layers),
    }
    if extra:
        entry.update(extra)
    return entry


def golden_set(images: np.ndarray, labels: np.ndarray, margins: np.ndarray, agree: np.ndarray, per_digit: int = 2) -> list[dict[str, Any]]:
    """Self-test images: per digit, the correctly classified ones with the widest top-1 margin.

    `margins` is the smallest top-1 margin over the models being shipped, `agree` the
    images every model (torch, fp32, int8) classifies correctly. A wide margin means no
    CPU's int8 kernels can flip them, so a failure on a device means a broken model.
    """
    chosen: list[dict[str, Any]] = []
    for digit in range(10):
        idx = np.flatnonzero((labels == digit) & agree)
        order = idx[np.lexsort((idx, -margins[idx]))][:per_digit]
        for i in order:
            chosen.append(
                {
                    "digit": int(digit),
                    "test_index": int(i),
                    "margin": round(float(margins[i]), 6),
                    "pixels": base64.b64encode(np.ascontiguousarray(images[i], dtype=np.uint8).tobytes()).decode("ascii"),
                }
            )
    return chosen


def build(
    *,
    version: int,
    models: dict[str, dict[str, Any]],
    default: str,
    data_sha256: dict[str, str],
    created_by: dict[str, str],
    golden: list[dict[str, Any]],
    training: dict[str, Any] | None = None,
    budgets: dict[str, float] | None = None,
    normaliser: dict[str, int] | None = None,
    proxy: dict[str, Any] | None = None,
    per_digit: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """The manifest. `budgets`: the gate it passed (export --check re-applies them); `normaliser`:
    the imaging normaliser version the model expects for pictures (a server refuses any other);
    `proxy`: how the proxy splits were built and the int8 model's per-digit figures on them."""
    if default not in models:
        raise ValueError(f"default model {default!r} is not among {sorted(models)}")
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model_name": MODEL_NAME,
        "version": str(int(version)),
        "default": default,
        "models": models,
        "input": {"name": "pixels", "dtype": "uint8", "shape": [-1, 28, 28], "pixel_convention": PIXEL_CONVENTION},
        "outputs": [
            {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]},
            {"name": "digit", "dtype": "int64", "shape": [-1]},
        ],
        "labels": [str(d) for d in range(10)],
        "data_sha256": dict(sorted(data_sha256.items())),
        "created_by": dict(sorted(created_by.items())),
        "golden": golden,
    }
    if training:
        manifest["training"] = training
    for key, value in (("budgets", budgets), ("normaliser", normaliser), ("proxy", proxy), ("per_digit", per_digit)):
        if value is not None:
            manifest[key] = value
    return manifest


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(out: Path, files: dict[str, bytes], manifest_bytes: bytes, signature: bytes | None = None) -> list[Path]:
    """Write model files, then the signature, then the manifest; return what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, data in sorted(files.items()):
        target = out / name
        if target.is_file() and sha256(target.read_bytes()) == sha256(data):
            continue  # content-addressed: an identical file is already in place
        atomic_write(target, data)
        written.append(target)
    sig_path = out / SIGNATURE
    if signature is not None:
        atomic_write(sig_path, signature)
        written.append(sig_path)
    elif sig_path.exists():
        # A stale signature over an older manifest would make readers refuse the new one.
        sig_path.unlink()
    atomic_write(out / MANIFEST, manifest_bytes)
    written.append(out / MANIFEST)
    _fsync_dir(out)
    return written


def resolve(path: str | os.PathLike) -> Path:
    """`--model`/`--check` take a manifest file or the directory that holds it."""
    p = Path(path)
    return p / MANIFEST if p.is_dir() else p
