"""Ed25519 signatures over manifest.json: key pairs and detached signatures.

`mnist-edge keygen` makes a key pair (standard PEM: PKCS#8 private key, written 0600;
SubjectPublicKeyInfo public key); `mnist-edge export --sign KEY` writes
`manifest.json.sig`, the base64 Ed25519 signature of manifest.json's exact bytes.
Because the manifest holds every model file's sha256, the signature covers the models
too. Needs the `sign` extra (the `cryptography` package); the base device install
does not carry it unless it verifies signatures.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from pathlib import Path

INSTALL = "pip install 'mnist-edge[sign]'"


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError:
        raise SystemExit(f"signing needs the 'cryptography' package: {INSTALL}") from None
    return serialization, ed25519


def sign(data: bytes, key_path: Path) -> bytes:
    """The detached signature file's contents for `data` (base64 text and a newline)."""
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{key_path}: expected an Ed25519 private key, got {type(key).__name__}")
    return base64.b64encode(key.sign(data)) + b"\n"


def keygen(private_path: Path, public_path: Path) -> None:
    serialization, ed25519 = _crypto()
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    public_path.write_bytes(public)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mnist-edge keygen", description="Make an Ed25519 key pair for signing models (PEM files).")
    p.add_argument("--private", type=Path, default=Path("mnist-edge.key"), help="private key to write (mode 0600; must not exist)")
    p.add_argument("--public", type=Path, default=Path("mnist-edge.pub"), help="public key to write (give it to servers: serve --trust)")
    args = p.parse_args(argv)
    if args.private.exists():
        print(f"mnist-edge keygen: {args.private} exists; refusing to overwrite a private key", file=sys.stderr)
        return 2
    keygen(args.private, args.public)
    print(f"wrote {args.private} (keep it secret) and {args.public}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
