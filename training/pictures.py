"""Training data that went through the picture path: what the server does to an encoded image.

Two sources are added to MNIST's raw training images:

- synthetic handwriting (training.handwriting, "train" split): styles MNIST lacks, drawn as
  pen strokes and captured like a phone or scanner would, then normalised;
- MNIST training images turned into pictures (inverted, off-centre on a larger canvas,
  enlarged and JPEG'd, or fitted into a form reader's small box) and normalised back, so
  the model learns that a digit sent as a picture is the same digit as its raw pixels
  (resampling and JPEG change its pixels).

Both are normalised by `imaging.normalize` with the version the model is made for, the
same call the server makes. Building them costs a minute or two of CPU; the result is
cached under the MNIST cache's parent (`pictures/`), keyed by everything it depends on
(arguments, the MNIST files' sha256 and the source of the modules that draw and normalise),
so a cached copy is always exactly what a rebuild would give.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mnist_edge.imaging.normalize import ImageError, normalize

_SALT = 1_000_211


def _variant(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An MNIST digit as someone might send it: inverted or not, off-centre, enlarged, JPEG'd,
    or through a form reader (`handwriting.form_scan`)."""
    pic = image.astype(np.uint8)
    kind = int(rng.integers(0, 4))
    if kind == 3:  # through a form reader: fitted into a small box, maybe stretched, maybe 1-bit
        from mnist_edge.training.handwriting import form_scan

        return form_scan(pic.astype(np.float32) / 255.0, rng)
    if kind == 1:  # off-centre on a larger canvas
        side = int(rng.integers(36, 80))
        canvas = np.zeros((side, side), np.uint8)
        y, x = rng.integers(0, side - 27, size=2)
        canvas[y : y + 28, x : x + 28] = pic
        pic = canvas
    elif kind == 2:  # enlarged, as a bigger picture of the same digit
        factor = float(rng.uniform(2, 5))
        pic = np.asarray(Image.fromarray(pic).resize((int(28 * factor),) * 2, Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
        pic = 255 - pic  # dark ink on light paper
    if rng.random() < 0.3:
        buf = io.BytesIO()
        Image.fromarray(pic).save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
        pic = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    return pic


def _mnist_jobs(jobs: Sequence[tuple[int, np.ndarray]], seed: int, version: int) -> list[np.ndarray]:
    out = []
    for i, img in jobs:
        rng = np.random.default_rng([_SALT, seed, i])
        for _ in range(10):
            try:
                out.append(normalize(_variant(img, rng), version))
                break
            except ImageError:  # a narrow digit fitted into a box with no paper around it is all ink: again
                continue
        else:
            raise RuntimeError(f"no readable picture of MNIST image {i} in 10 draws (seed {seed})")
    return out


def mnist_as_pictures(images: np.ndarray, seed: int, version: int, workers: int = 1) -> np.ndarray:
    """Each image turned into a picture (its own seeded variant) and normalised back; uint8 [N, 28, 28]."""
    jobs = list(enumerate(images))
    if workers <= 1 or len(jobs) < 500:
        return np.stack(_mnist_jobs(jobs, seed, version)) if jobs else np.zeros((0, 28, 28), np.uint8)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, len(jobs), 4 * workers + 1).astype(int)
    chunks = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        parts = pool.map(_mnist_jobs, chunks, [seed] * len(chunks), [version] * len(chunks))
        return np.stack([img for part in parts for img in part])


def _source_digest() -> str:
    """What the cached pictures depend on in code: the modules that draw and normalise."""
    from mnist_edge.imaging import normalize as n
    from mnist_edge.training import handwriting as h

    digest = hashlib.sha256()
    for path in (n.__file__, h.__file__, __file__):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def picture_training_set(
    mnist_images: np.ndarray,
    mnist_labels: np.ndarray,
    *,
    handwriting_per_digit: int,
    mnist_pictures: int,
    handwriting_extra: dict[int, int] | None = None,
    seed: int,
    version: int,
    data_sha256: dict[str, str],
    workers: int = 1,
    cache: Path | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Synthetic handwriting plus MNIST-as-pictures, normalised by `version`: (images, labels, counts)."""
    from mnist_edge.training import handwriting

    key_src = json.dumps(
        {"hw": handwriting_per_digit, "hw_extra": sorted((handwriting_extra or {}).items()), "mp": mnist_pictures, "seed": seed, "version": version, "n": len(mnist_images),
         "data": data_sha256, "code": _source_digest()},
        sort_keys=True,
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    path = cache / f"pictures-{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
        log(f"picture training data: {len(labels)} images from the cache {path}")
        n_hw = handwriting_per_digit * 10 + sum((handwriting_extra or {}).values()) if handwriting_per_digit > 0 else 0
        return images, labels, {"handwriting": n_hw, "mnist_pictures": len(labels) - n_hw}

    parts_x: list[np.ndarray] = []
    parts_y: list[np.ndarray] = []
    if handwriting_per_digit > 0:
        n_hw = handwriting_per_digit * 10 + sum((handwriting_extra or {}).values())
        log(f"drawing {n_hw} synthetic handwritten digits ...")
        hx, hy, _ = handwriting.build(handwriting_per_digit, "train", seed, workers=workers, version=version, extra=handwriting_extra)
        parts_x.append(hx)
        parts_y.append(hy)
    n_pic = min(mnist_pictures, len(mnist_images))
    if n_pic > 0:
        log(f"turning {n_pic} MNIST training images into pictures and normalising them ...")
        pick = np.sort(np.random.default_rng([_SALT, seed]).choice(len(mnist_images), size=n_pic, replace=False))
        parts_x.append(mnist_as_pictures(mnist_images[pick], seed, version, workers))
        parts_y.append(np.asarray(mnist_labels)[pick].astype(np.uint8))
    if not parts_x:
        return np.zeros((0, 28, 28), np.uint8), np.zeros((0,), np.uint8), {"handwriting": 0, "mnist_pictures": 0}
    images, labels = np.concatenate(parts_x), np.concatenate(parts_y)
    if path is not None:
        from mnist_edge.training.data import atomic_write

        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels)
        atomic_write(path, buf.getvalue())
    return images, labels, {"handwriting": len(labels) - n_pic, "mnist_pictures": n_pic}
