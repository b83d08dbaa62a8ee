"""Labelled field captures as training data (docs/field-loop.md): the reader behind
`mnist-edge train --extra-data DIR...`.

A capture folder (a server's --capture-dir, labelled with `mnist-edge label`) holds, per
capture, the 28x28 PNG the model saw, already normalised MNIST-style (white digit on black,
centred by mass), so it enters training exactly as MNIST images do. Only captures labelled
0-9 in DIR/labels.csv are used ("x", not a digit, and unlabelled ones are not).

Held-out part: a capture is held out when the first 8 bytes of sha256(its file name), read as
an integer, fall in the lowest `held_out` share. The split depends on the name alone, so it is
the same on every run and machine, and captures added later never move an older one between
the parts: a capture evaluated as held out is never trained on.

Weighting: a few hundred captures next to 60,000 MNIST images would barely move the model.
`mix` repeats the training captures so they make up `share` of each epoch (default 0.1)
while every MNIST image stays in it, so the model learns the new style without forgetting MNIST.
Plain numpy: no torch needed to read or split.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LABELS_FILE = "labels.csv"
DIGITS = frozenset(str(d) for d in range(10))


@dataclass(frozen=True)
class CaptureSet:
    images: np.ndarray  # uint8 [N, 28, 28], as the model saw them
    labels: np.ndarray  # uint8 [N], the person's label
    files: list[str]  # "<folder>/<day>/<name>.png", for reports

    def __len__(self) -> int:
        return len(self.labels)


def is_held_out(file_name: str, held_out: float) -> bool:
    digest = hashlib.sha256(Path(file_name).name.encode()).digest()
    return int.from_bytes(digest[:8], "big") < held_out * 2**64


def read_labelled(directory: str | Path) -> list[tuple[str, Path, int]]:
    """(relative file, path, digit) for each capture of `directory` labelled 0-9 whose PNG exists."""
    root = Path(directory)
    labels_file = root / LABELS_FILE
    if not labels_file.is_file():
        raise FileNotFoundError(f"{labels_file} not found: label the captures first with `mnist-edge label {root}`")
    out: dict[str, tuple[Path, int]] = {}
    with open(labels_file, newline="") as f:
        for row in csv.reader(f):
            if len(row) != 2 or row[1] not in DIGITS:
                continue  # the header, "x" (not a digit), anything unreadable
            path = root / row[0]
            if path.is_file():  # purged or pruned since it was labelled: skipped
                out[row[0]] = (path, int(row[1]))
    return [(rel, path, digit) for rel, (path, digit) in sorted(out.items())]


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.uint8)
    if pixels.shape != (28, 28):
        raise ValueError(f"{path}: a capture is a 28x28 image, this one is {pixels.shape[1]}x{pixels.shape[0]}")
    return pixels


def load(directories: list[str | Path], held_out: float = 0.2) -> tuple[CaptureSet, CaptureSet]:
    """The labelled captures of `directories` as (train, held_out) sets."""
    parts: dict[bool, tuple[list[np.ndarray], list[int], list[str]]] = {False: ([], [], []), True: ([], [], [])}
    for directory in directories:
        for rel, path, digit in read_labelled(directory):
            images, labels, files = parts[is_held_out(rel, held_out)]
            images.append(_load_png(path))
            labels.append(digit)
            files.append(f"{Path(directory).name}/{rel}")

    def as_set(images: list[np.ndarray], labels: list[int], files: list[str]) -> CaptureSet:
        stacked = np.stack(images) if images else np.zeros((0, 28, 28), np.uint8)
        return CaptureSet(stacked, np.asarray(labels, dtype=np.uint8), files)

    return as_set(*parts[False]), as_set(*parts[True])


def mix(mnist_images: np.ndarray, mnist_labels: np.ndarray, captures: CaptureSet, share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """MNIST plus the captures repeated so they are about `share` of the result (at least once each)."""
    if len(captures) == 0 or share <= 0:
        return mnist_images, mnist_labels
    if not 0 < share < 1:
        raise ValueError(f"the captures' share of an epoch must be between 0 and 1, got {share}")
    wanted = share * len(mnist_labels) / (1 - share)
    repeats = max(1, math.ceil(wanted / len(captures)))
    images = np.concatenate([mnist_images, np.tile(captures.images, (repeats, 1, 1))])
    labels = np.concatenate([mnist_labels, np.tile(captures.labels, repeats)])
    return images, labels
