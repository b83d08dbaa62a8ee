"""Reader and writer for the IDX format MNIST is distributed in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the data, big-endian and
row-major. The reader checks every part of that and says what is wrong, so a
truncated download or a file of the wrong kind fails with a sentence, not with a
numpy reshape error three calls later.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

# IDX type code -> numpy dtype (big-endian, as the format stores it).
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("=") if dt.itemsize > 1 else dt: code for code, dt in _DTYPES.items()}


class IdxError(ValueError):
    """An IDX file that is not what it claims to be; the message says what and where."""


def parse_idx(data: bytes | bytearray | memoryview, *, source: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of native byte order; raise IdxError if malformed."""
    buf = memoryview(data)
    if len(buf) < 4:
        raise IdxError(f"{source}: {len(buf)} bytes is too short for an IDX header (needs at least 4)")
    zero0, zero1, code, ndim = buf[0], buf[1], buf[2], buf[3]
    if zero0 != 0 or zero1 != 0:
        raise IdxError(
            f"{source}: not an IDX file: magic number starts with bytes "
            f"0x{zero0:02x} 0x{zero1:02x}, expected 0x00 0x00"
            + (" (this looks gzip-compressed; decompress it first)" if (zero0, zero1) == (0x1F, 0x8B) else "")
        )
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _DTYPES)
        raise IdxError(f"{source}: unknown IDX type code 0x{code:02x}, expected one of {known}")
    if ndim == 0:
        raise IdxError(f"{source}: IDX header declares 0 dimensions, expected at least 1")
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise IdxError(
            f"{source}: truncated header: {ndim} dimensions need {header} header bytes, file has {len(buf)}"
        )
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    dtype = _DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header
    if got < expected:
        raise IdxError(
            f"{source}: truncated: dimensions {list(dims)} of {dtype.name} need {expected} data bytes, "
            f"found {got}"
        )
    if got > expected:
        raise IdxError(
            f"{source}: {got - expected} unexpected bytes after the data: dimensions {list(dims)} "
            f"need {expected} data bytes, found {got}"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header, count=expected // dtype.itemsize)
    arr = arr.reshape(dims)
    if dtype.itemsize > 1:
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file."""
    p = Path(path)
    return parse_idx(p.read_bytes(), source=str(p))


def encode_idx(arr: np.ndarray) -> bytes:
    """Encode an array as IDX bytes (the inverse of parse_idx)."""
    arr = np.asarray(arr)
    native = arr.dtype.newbyteorder("=") if arr.dtype.itemsize > 1 else arr.dtype
    code = _CODES.get(native)
    if code is None:
        raise IdxError(f"cannot write dtype {arr.dtype} as IDX; supported: uint8, int8, int16, int32, float32, float64")
    if not 1 <= arr.ndim <= 255:
        raise IdxError(f"cannot write a {arr.ndim}-dimensional array as IDX")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=_DTYPES[code]).tobytes()


def check_pair(images: np.ndarray, labels: np.ndarray, images_name: str = "images", labels_name: str = "labels") -> tuple[np.ndarray, np.ndarray]:
    """Check an MNIST-style pair: images uint8 [N,rows,cols] and labels uint8 [N] digits, same N."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise IdxError(f"{images_name}: expected uint8 images of shape [N, rows, cols], got {images.dtype} {list(images.shape)}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise IdxError(f"{labels_name}: expected uint8 labels of shape [N], got {labels.dtype} {list(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IdxError(
            f"count mismatch: {images_name} holds {images.shape[0]} images but {labels_name} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise IdxError(f"{labels_name}: label {int(labels.max())} out of range, expected digits 0-9")
    return images, labels


def read_images_and_labels(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST-style pair of IDX files, checked against each other."""
    return check_pair(read_idx(images_path), read_idx(labels_path), str(images_path), str(labels_path))
