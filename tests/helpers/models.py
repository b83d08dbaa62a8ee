"""Model directories for reload tests: a private copy of models/ and new manifest versions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def copy_models(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_version(directory: Path, version: int, **changes) -> None:
    """Publish a new manifest (same model files) under another version, atomically."""
    from mnist_edge.export import manifest as mf

    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["version"] = str(version)
    manifest.update(changes)
    mf.atomic_write(directory / "manifest.json", mf.dumps(manifest))
