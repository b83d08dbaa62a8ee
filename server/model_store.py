"""Find, verify and load the model a server serves.

The manifest is the only file trusted (docs/design.md): every model file it names is
checked against its size and sha256, and the model must classify the manifest's
golden images as recorded before it may serve. A failure raises ModelLoadError
with a sentence saying what did not match.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mnist_edge.server.runner import ModelRunner

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str
    version: str
    precision: str
    sha256: str
    file: Path
    runner: ModelRunner
    manifest: dict[str, Any] = field(repr=False)
    pixel_convention: str = ""
    labels: list[str] = field(default_factory=lambda: [str(d) for d in range(10)])


def default_model_path() -> Path:
    """The shipped model: a checkout's models/ first, else the copy the wheel carries."""
    checkout = Path(__file__).resolve().parent.parent / "models"
    if (checkout / MANIFEST).is_file():
        return checkout
    try:
        packaged = resources.files("mnist_edge") / "models"
        if packaged.joinpath(MANIFEST).is_file():
            return Path(str(packaged))
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    raise ModelLoadError(
        "no shipped model found (neither a checkout's models/ nor the installed package's); pass --model PATH"
    )


def resolve_manifest(path: str | os.PathLike | None) -> Path:
    p = default_model_path() if path is None else Path(path)
    mpath = p / MANIFEST if p.is_dir() else p
    if not mpath.is_file():
        raise ModelLoadError(f"{mpath}: no manifest.json there (--model takes a manifest file or the directory holding it)")
    return mpath


def read_manifest(mpath: Path, raw: bytes | None = None) -> tuple[dict[str, Any], bytes]:
    raw = mpath.read_bytes() if raw is None else raw
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != 1:
        raise ModelLoadError(f"{mpath}: schema_version {manifest.get('schema_version') if isinstance(manifest, dict) else None!r}, expected 1")
    for key in ("model_name", "version", "default", "models", "golden"):
        if key not in manifest:
            raise ModelLoadError(f"{mpath}: missing field {key!r}")
    if not str(manifest["version"]).isdigit():
        raise ModelLoadError(f"{mpath}: version {manifest['version']!r} is not an integer")
    return manifest, raw


def golden(manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    images, digits = [], []
    for i, g in enumerate(manifest["golden"]):
        data = base64.b64decode(g["pixels"])
        if len(data) != 784:
            raise ModelLoadError(f"golden image {i}: {len(data)} bytes, expected 784")
        images.append(np.frombuffer(data, dtype=np.uint8).reshape(28, 28))
        digits.append(int(g["digit"]))
    if not images:
        raise ModelLoadError("the manifest has no golden images to self-test with")
    return np.stack(images), np.asarray(digits, dtype=np.int64)


def _read_signed(mpath: Path, trusted_keys: list) -> tuple[dict[str, Any], bytes]:
    """Read the manifest and, with trusted keys, check its signature.

    A publisher writes the signature before the manifest, so a reader can catch the two
    out of step for a moment: on a mismatch, read both once more before refusing.
    """
    from mnist_edge.server.signing import SignatureError, verify

    for attempt in (1, 2):
        raw = mpath.read_bytes()
        sig_path = mpath.parent / SIGNATURE
        sig = sig_path.read_bytes() if sig_path.is_file() else None
        try:
            verify(raw, sig, trusted_keys, str(mpath))
        except SignatureError as exc:
            if attempt == 2:
                raise ModelLoadError(str(exc)) from None
            time.sleep(0.05)
            continue
        return read_manifest(mpath, raw)  # parse exactly the bytes that were verified
    raise ModelLoadError(f"{mpath}: signature check failed")  # not reached


def _check_normaliser(mpath: Path, manifest: dict[str, Any]) -> None:
    """Refuse a model made for a picture normaliser this server does not run: its encoded-image
    answers would be computed on inputs it was never trained or gated on. Manifests from before
    the version was recorded were made for version 1."""
    from mnist_edge.imaging.normalize import NORMALISER_VERSION

    wanted = (manifest.get("normaliser") or {}).get("version", 1)
    if wanted != NORMALISER_VERSION:
        raise ModelLoadError(
            f"{mpath}: the model was made for image normaliser version {wanted!r}, but this server normalises "
            f"encoded images with version {NORMALISER_VERSION}; export the model again with this mnist-edge "
            "(or serve it with the mnist-edge release it was made with)"
        )


def load(
    path: str | os.PathLike | None = None,
    precision: str | None = None,
    intra_op_threads: int = 1,
    *,
    trusted_keys: list | None = None,
    min_version: int | None = None,
) -> LoadedModel:
    """Verify and load; raise ModelLoadError naming what failed.

    `trusted_keys`: Ed25519 public keys, one of which must have signed manifest.json.
    `min_version`: refuse a manifest whose version is lower (a reload never goes back).
    """
    mpath = resolve_manifest(path)
    if trusted_keys:
        manifest, _ = _read_signed(mpath, trusted_keys)
    else:
        manifest, _ = read_manifest(mpath)
    _check_normaliser(mpath, manifest)
    if min_version is not None and int(manifest["version"]) < min_version:
        raise ModelLoadError(f"{mpath}: version {manifest['version']} is lower than the version being served ({min_version}); refusing to go back")
    kind = precision or manifest["default"]
    entry = manifest["models"].get(kind)
    if entry is None:
        raise ModelLoadError(f"{mpath}: no model entry {kind!r}; the manifest has {sorted(manifest['models'])}")
    file = mpath.parent / entry["file"]
    if Path(entry["file"]).name != entry["file"]:
        raise ModelLoadError(f"{mpath}: model file name {entry['file']!r} must be a plain file name in the same directory")
    if not file.is_file():
        raise ModelLoadError(f"{file}: missing (named by {mpath})")
    data = file.read_bytes()
    if len(data) != entry["bytes"]:
        raise ModelLoadError(f"{file}: {len(data)} bytes, manifest says {entry['bytes']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise ModelLoadError(f"{file}: sha256 {digest} does not match the manifest's {entry['sha256']}; refusing to serve it")
    try:
        runner = ModelRunner(data, intra_op_threads=intra_op_threads)
    except Exception as exc:
        raise ModelLoadError(f"{file}: onnxruntime could not load it: {exc}") from None
    images, digits = golden(manifest)
    got = runner.run(images)[1]
    wrong = np.flatnonzero(got != digits)
    if wrong.size:
        detail = ", ".join(f"#{i} expected {digits[i]} got {got[i]}" for i in wrong[:5])
        raise ModelLoadError(f"{file}: self-test failed on {wrong.size} of {len(digits)} golden images ({detail}); refusing to serve it")
    runner.warm_up()
    return LoadedModel(
        name=manifest["model_name"],
        version=str(manifest["version"]),
        precision=entry.get("precision", kind),
        sha256=digest,
        file=file,
        runner=runner,
        manifest=manifest,
        pixel_convention=manifest.get("input", {}).get("pixel_convention", ""),
        labels=list(manifest.get("labels") or [str(d) for d in range(10)]),
    )


def manifest_stamp(path: str | os.PathLike | None) -> tuple | None:
    """What changes when a manifest or its signature is republished (for file watching)."""
    try:
        m = resolve_manifest(path)
        sig = m.parent / SIGNATURE
        st = m.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino, sig.stat().st_mtime_ns if sig.exists() else 0)
    except (OSError, ModelLoadError):
        return None
