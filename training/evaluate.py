"""Per-digit accuracy of a model on every evaluation set: `python -m mnist_edge.training.evaluate`.

The sets, each as the model sees it (pictures normalised by `imaging.normalize`, the
server's call for an encoded image):

- `mnist`: the 10,000 raw MNIST test images (no normalisation: raw pixels are used as they are);
- `fonts-tune`, `fonts-holdout`: the font-rendered proxy splits (training.proxy; need the fonts);
- `handwriting-tune`, `handwriting-holdout`: synthetic handwriting (training.handwriting) by
  writers never trained on; the held-out split also has styles, a pen and a camera never trained on;
- `scans-tune`, `scans-holdout`: the same writers, every digit through a form reader's capture
  (a 10-20 px box, often stretched to fill it and 1-bit, then enlarged: thick, blocky strokes);
- `mnist-pictures`: 1,000 MNIST test images sent as pictures (light on dark, dark on light,
  off-centre on a 64x64 canvas, enlarged 4x as JPEG), scored as agreement with the model's
  answer on the raw image (the contract: >= 99% per variant).

Works on a training checkpoint (.pt) or an ONNX file (the shipped int8 model), so the
figures in docs/model-card.md come from this one command.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mnist_edge.export.proxies import per_digit
from mnist_edge.imaging.normalize import (
    NORMALISER_VERSION,
    SUPPORTED_VERSIONS,
    normalize,
)

Predict = Callable[[np.ndarray], np.ndarray]  # uint8 [N, 28, 28] -> digits int64 [N]
PICTURE_VARIANTS = ("light-on-dark", "dark-on-light", "off-centre", "larger-jpeg")
# Synthetic handwriting sets by capture: "handwriting" mixes cameras and form readers as
# training does; "scans" is every picture through a form reader (thick, blocky, stretched).
HANDWRITING_FAMILIES: dict[str, str | None] = {"handwriting": None, "scans": "scan"}


def picture_variants(images: np.ndarray, seed: int = 1234) -> dict[str, list[np.ndarray]]:
    """The four ways an MNIST test digit is re-sent as a picture (as tests/server/test_native.py does)."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {k: [] for k in PICTURE_VARIANTS}
    for im in images:
        out["light-on-dark"].append(im)
        out["dark-on-light"].append(255 - im)
        canvas = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(0, 36, size=2)
        canvas[y : y + 28, x : x + 28] = im
        out["off-centre"].append(canvas)
        big = Image.fromarray(255 - im).resize((112, 112), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=92)
        out["larger-jpeg"].append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")))
    return out


def per_style(digits: np.ndarray, labels: np.ndarray, styles: list[str]) -> dict[str, list[float]]:
    """Synthetic handwriting: {"digit:style": [accuracy, images]}."""
    out: dict[str, list[float]] = {}
    for name in sorted(set(styles)):
        pick = np.array([s == name for s in styles])
        out[name] = [float((np.asarray(digits)[pick] == np.asarray(labels)[pick]).mean()), int(pick.sum())]
    return out


def picture_sets(version: int, mnist_test, *, n_pictures: int = 1000, handwriting_per_digit: int = 200,
                 fonts_per_digit: int = 300, fonts: bool = True, workers: int = 2, log=lambda m: None) -> dict[str, Any]:
    """Every evaluation set normalised by `version`: name -> (images, labels); plus the raw MNIST picture sample."""
    from mnist_edge.training import handwriting, proxy

    sets: dict[str, Any] = {"mnist": (mnist_test.images, mnist_test.labels)}
    for family, capture in HANDWRITING_FAMILIES.items():
        for split in ("tune", "holdout"):
            log(f"{family}-{split} ...")
            x, y, styles = handwriting.build(handwriting_per_digit, split, 0, workers=workers, version=version, capture=capture)
            sets[f"{family}-{split}"] = (x, y)
            sets[f"styles:{family}-{split}"] = styles
    if fonts:
        try:
            for split in ("tune", "holdout"):
                log(f"fonts-{split} ...")
                x, y, _ = proxy.build_proxy_set(fonts_per_digit, 0, subset=split, version=version, workers=workers)
                sets[f"fonts-{split}"] = (x, y)
        except proxy.ProxyUnavailable as exc:
            log(f"font proxy sets skipped: {exc}")
    idx = np.sort(np.random.default_rng(1234).choice(len(mnist_test.images), size=n_pictures, replace=False))
    variants = picture_variants(mnist_test.images[idx])
    sets["mnist-pictures"] = (idx, {k: np.stack([normalize(p, version) for p in v]) for k, v in variants.items()})
    return sets


def evaluate_sets(predict: Predict, sets: dict[str, Any]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    raw_digits = None
    for name, value in sets.items():
        if name == "mnist-pictures" or name.startswith("styles:"):
            continue
        x, y = value
        d = predict(x)
        if name == "mnist":
            raw_digits = d
        results[name] = per_digit(d, y)
        if f"styles:{name}" in sets:
            results[name]["per_style"] = per_style(d, y, sets[f"styles:{name}"])
    if "mnist-pictures" in sets and raw_digits is not None:
        idx, variants = sets["mnist-pictures"]
        results["mnist-pictures"] = {k: float((predict(v) == raw_digits[idx]).mean()) for k, v in variants.items()}
    return results


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def through_server(target: str, mnist_test, *, n_pictures: int = 1000, handwriting_per_digit: int = 200,
                   fonts_per_digit: int = 300, fonts: bool = True, workers: int = 2, log=lambda m: None) -> dict[str, Any]:
    """The same sets sent to a running server as a device would: raw MNIST as 784 pixels, every
    picture PNG-encoded through Classify's `encoded` path (the server normalises it)."""
    import grpc

    from mnist_edge.protos.digits.v1 import digits_pb2 as pb
    from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc
    from mnist_edge.training import handwriting, proxy

    channel = grpc.insecure_channel(target)
    stub = pb_grpc.DigitClassifierStub(channel)

    def classify(images: list[Any], encoded: bool) -> np.ndarray:
        out: list[int] = []
        for i in range(0, len(images), 100):
            chunk = images[i : i + 100]
            msgs = [pb.Image(encoded=_png(a)) if encoded else pb.Image(pixels=np.asarray(a, np.uint8).tobytes()) for a in chunk]
            resp = stub.Classify(pb.ClassifyRequest(images=msgs), timeout=120)
            out += [p.digit if not p.HasField("error") else -1 for p in resp.predictions]
        return np.array(out, dtype=np.int64)

    results: dict[str, Any] = {}
    raw_digits = classify(list(mnist_test.images), encoded=False)
    results["mnist"] = per_digit(raw_digits, mnist_test.labels)
    for family, capture in HANDWRITING_FAMILIES.items():
        for split in ("tune", "holdout"):
            log(f"{family}-{split} through {target} ...")
            pics, y, styles = handwriting.build(handwriting_per_digit, split, 0, raw=True, workers=workers, capture=capture)
            got = classify(pics, encoded=True)
            results[f"{family}-{split}"] = {**per_digit(got, y), "per_style": per_style(got, y, styles)}
    if fonts:
        try:
            for split in ("tune", "holdout"):
                log(f"fonts-{split} through {target} ...")
                pics, y, _ = proxy.build_proxy_set(fonts_per_digit, 0, subset=split, raw=True, workers=workers)
                results[f"fonts-{split}"] = per_digit(classify(pics, encoded=True), y)
        except proxy.ProxyUnavailable as exc:
            log(f"font proxy sets skipped: {exc}")
    idx = np.sort(np.random.default_rng(1234).choice(len(mnist_test.images), size=n_pictures, replace=False))
    variants = picture_variants(mnist_test.images[idx])
    results["mnist-pictures"] = {k: float((classify(v, encoded=True) == raw_digits[idx]).mean()) for k, v in variants.items()}
    channel.close()
    return results


def torch_predictor(checkpoint: Path) -> tuple[Predict, dict[str, Any]]:
    import torch

    from mnist_edge.training.train import load_checkpoint

    model, ckpt = load_checkpoint(checkpoint)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(x))).argmax(1).numpy()

    return predict, ckpt


def onnx_predictor(path: Path) -> Predict:
    from mnist_edge.export.verify import ort_predict

    data = path.read_bytes()
    return lambda x: ort_predict(data, np.ascontiguousarray(x)).digits


def table(results: dict[str, Any]) -> str:
    lines = ["| set | overall | " + " | ".join(str(d) for d in range(10)) + " | worst |", "|---" * 13 + "|"]
    for name, r in results.items():
        if name == "mnist-pictures":
            continue
        cells = " | ".join(f"{100 * a:.1f}" for a in r["per_digit"])
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {cells} | {r['worst_digit']}: {100 * r['worst']:.1f}% |")
    for name, r in results.items():
        if isinstance(r, dict) and r.get("per_style"):
            lines.append("")
            lines.append(f"{name} by style: " + ", ".join(f"{k} {100 * a:.1f}% ({n})" for k, (a, n) in r["per_style"].items()))
    if "mnist-pictures" in results:
        lines.append("")
        lines.append("MNIST test digits re-sent as pictures, agreement with the raw answer: "
                     + ", ".join(f"{k} {100 * v:.1f}%" for k, v in results["mnist-pictures"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mnist_edge.training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path, help="checkpoints (.pt) or ONNX files (.onnx), or a models/ directory (its default model)")
    p.add_argument("--target", default=None, metavar="HOST:PORT",
                   help="instead of models: send every set to a running server (raw MNIST as pixels, pictures as PNG through Classify's encoded path)")
    p.add_argument("--normaliser", type=int, choices=SUPPORTED_VERSIONS, default=None,
                   help=f"normaliser version (default: the checkpoint's or manifest's, else {NORMALISER_VERSION})")
    p.add_argument("--handwriting-per-digit", type=int, default=200)
    p.add_argument("--fonts-per-digit", type=int, default=300)
    p.add_argument("--no-fonts", action="store_true", help="skip the font proxy sets")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--offline", action="store_true")
    args = p.parse_args(argv)
    from mnist_edge.training import data as mnist_data

    test = mnist_data.load(offline=args.offline).test
    everything: dict[str, Any] = {}
    if args.target:
        results = through_server(args.target, test, handwriting_per_digit=args.handwriting_per_digit,
                                 fonts_per_digit=args.fonts_per_digit, fonts=not args.no_fonts, workers=args.workers,
                                 log=lambda m: print(m, file=sys.stderr))
        everything[args.target] = {"normaliser": "the server's", "results": results}
        print(f"\n## server {args.target} (Classify: raw pixels for MNIST, PNG through `encoded` for pictures)\n")
        print(table(results))
    elif not args.models:
        p.error("give checkpoints, ONNX files or a models/ directory, or --target HOST:PORT")
    cache: dict[int, dict[str, Any]] = {}
    for path in args.models:
        version = args.normaliser
        if path.is_dir() or path.suffix == ".json":
            mpath = path / "manifest.json" if path.is_dir() else path
            manifest = json.loads(mpath.read_text())
            predict = onnx_predictor(mpath.parent / manifest["models"][manifest["default"]]["file"])
            version = version or int(manifest.get("normaliser", {}).get("version", 1))
        elif path.suffix == ".onnx":
            predict = onnx_predictor(path)
        else:
            predict, ckpt = torch_predictor(path)
            version = version or int(ckpt.get("normaliser_version", 1))
        version = version or NORMALISER_VERSION
        if version not in cache:
            cache[version] = picture_sets(version, test, handwriting_per_digit=args.handwriting_per_digit,
                                          fonts_per_digit=args.fonts_per_digit, fonts=not args.no_fonts,
                                          workers=args.workers, log=lambda m: print(m, file=sys.stderr))
        results = evaluate_sets(predict, cache[version])
        everything[str(path)] = {"normaliser": version, "results": results}
        print(f"\n## {path} (normaliser version {version})\n")
        print(table(results))
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
