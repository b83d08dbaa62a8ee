"""`mnist-edge classify --target HOST:PORT FILE...`: classify files through a running server.

FILE may be an encoded image (PNG, JPEG, BMP, PGM; the server normalises it) or an
IDX file of uint8 28x28 images (sent as raw pixels, in chunks). `--labels` takes an
IDX labels file for the images given and prints the accuracy measured through the
server; `--show` prints the 28x28 image the server says the model saw.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mnist_edge.client.client import ClientError, DigitClient, Prediction, add_connection_args, connection_kwargs
from mnist_edge.imaging.idx import IdxError, parse_idx

SHADES = " .:-=+*#%@"


def ascii_art(pixels: bytes | np.ndarray) -> str:
    """28x28 uint8 (0 = background) as text, two characters per pixel so it looks square."""
    a = np.frombuffer(pixels, dtype=np.uint8) if isinstance(pixels, (bytes, bytearray)) else np.asarray(pixels, dtype=np.uint8)
    a = a.reshape(28, 28)
    idx = (a.astype(np.int32) * (len(SHADES) - 1) + 127) // 255
    return "\n".join("".join(SHADES[v] * 2 for v in row) for row in idx)


def _is_idx(data: bytes) -> bool:
    return len(data) >= 4 and data[0] == 0 and data[1] == 0 and data[2] == 0x08


def _describe(p: Prediction) -> str:
    if p.error:
        return f"error: {p.error}"
    return f"{p.digit} ({100 * p.confidence:.1f}%)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mnist-edge classify", description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("files", nargs="+", type=Path, metavar="FILE", help="image files (PNG/JPEG/BMP/PGM) or IDX image files")
    ap.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT (comma-separated for several)")
    ap.add_argument("--labels", type=Path, default=None, help="IDX labels file for the images given: print the accuracy")
    ap.add_argument("--show", action="store_true", help="print the 28x28 image the model saw, as text")
    ap.add_argument("--batch", type=int, default=256, help="images per request for IDX files")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    ap.add_argument("--verbose", action="store_true", help="one line per IDX image, not only a summary and the mistakes")
    add_connection_args(ap)
    args = ap.parse_args(argv)

    try:
        client = DigitClient(args.target, timeout=args.timeout, **connection_kwargs(args))
    except (ValueError, OSError) as exc:  # a --target that is not an address, an unreadable TLS or token file
        print(f"mnist-edge classify: --target {args.target!r}: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(client, args)
    except ClientError as exc:
        print(f"mnist-edge classify: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()


def _run(client: DigitClient, args) -> int:
    info = client.model_info()
    per_request = max(1, min(args.batch, info.max_images_per_request or args.batch))
    names: list[str] = []
    preds: list[Prediction] = []
    started = time.perf_counter()
    for path in args.files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            print(f"mnist-edge classify: cannot read {path}: {exc.strerror}", file=sys.stderr)
            return 2
        if _is_idx(data):
            try:
                images = parse_idx(data, source=str(path))
            except IdxError as exc:
                print(f"mnist-edge classify: {exc}", file=sys.stderr)
                return 2
            if images.ndim != 3 or images.shape[1:] != (28, 28):
                print(f"mnist-edge classify: {path}: IDX images must be [N,28,28], got {list(images.shape)}", file=sys.stderr)
                return 2
            for i in range(0, len(images), per_request):
                chunk = images[i : i + per_request]
                preds += client.classify(list(chunk), return_normalized_image=args.show)
                names += [f"{path}[{j}]" for j in range(i, i + len(chunk))]
        else:
            preds += client.classify([data], return_normalized_image=args.show)
            names.append(str(path))
    elapsed = time.perf_counter() - started

    labels = None
    if args.labels is not None:
        try:
            labels = parse_idx(args.labels.read_bytes(), source=str(args.labels))
        except (OSError, IdxError) as exc:
            print(f"mnist-edge classify: {exc}", file=sys.stderr)
            return 2
        if labels.ndim != 1 or len(labels) != len(preds):
            print(f"mnist-edge classify: {args.labels} holds {labels.size} labels for {len(preds)} images", file=sys.stderr)
            return 2

    many = len(preds) > 20 and not args.verbose
    for i, (name, p) in enumerate(zip(names, preds)):
        wrong = labels is not None and p.digit != int(labels[i])
        if many and not wrong and not p.error:
            continue
        suffix = f"  (label {int(labels[i])})" if labels is not None else ""
        print(f"{name}: {_describe(p)}{suffix}")
        if args.show and p.normalized_image:
            print(ascii_art(p.normalized_image))
    failed = sum(1 for p in preds if p.error)
    print(f"{len(preds)} images classified by model {info.name} v{info.version} ({info.precision}) in {elapsed:.2f}s" + (f"; {failed} rejected" if failed else ""))
    if labels is not None:
        correct = sum(1 for p, y in zip(preds, labels) if p.digit == int(y))
        print(f"accuracy through the server: {100 * correct / len(preds):.2f}% ({correct}/{len(preds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
