"""Verify manifest.json against detached Ed25519 signatures from trusted keys (`serve --trust`).

Needs the `sign` extra (`cryptography`) only when `--trust` is given.
"""

from __future__ import annotations

import base64
from pathlib import Path

INSTALL = "pip install 'mnist-edge[sign]'"


class SignatureError(RuntimeError):
    pass


def load_public_keys(paths: list[str]) -> list:
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise SignatureError(f"--trust needs the 'cryptography' package: {INSTALL}") from None
    keys = []
    for p in paths:
        try:
            key = serialization.load_pem_public_key(Path(p).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"--trust {p}: not a readable PEM public key ({exc})") from None
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise SignatureError(f"--trust {p}: expected an Ed25519 public key, got {type(key).__name__}")
        keys.append(key)
    return keys


def verify(manifest_bytes: bytes, signature_file: bytes | None, keys: list, where: str) -> None:
    """Raise SignatureError unless one trusted key signed these exact bytes."""
    from cryptography.exceptions import InvalidSignature

    if signature_file is None:
        raise SignatureError(f"{where}: unsigned (no manifest.json.sig) but --trust requires a signature")
    try:
        sig = base64.b64decode(signature_file.strip(), validate=True)
    except ValueError:
        raise SignatureError(f"{where}: manifest.json.sig is not base64") from None
    for key in keys:
        try:
            key.verify(sig, manifest_bytes)
            return
        except InvalidSignature:
            continue
    raise SignatureError(f"{where}: signature does not match manifest.json for any trusted key; refusing it")
