"""Digits that are not MNIST, in the gate: the proxy splits, per digit.

MNIST accuracy says little about a user's own handwriting, so the export also measures
the int8 model on the proxy splits, each normalised by the imaging normaliser version the
model was trained for (what the server does to an encoded picture):

- `handwriting-tune`, `handwriting-holdout`: synthetic pen-stroke handwriting
  (training.handwriting; numpy and Pillow only, so always available);
- `scans-tune`, `scans-holdout`: the same writers, every digit through a form reader's
  capture (thick, blocky, often stretched to a square: the low-resolution scan of a real form);
- `fonts-tune`, `fonts-holdout`: the font-rendered proxy set (training.proxy; only where
  the fonts of .ci/fonts.txt are installed).

The gate's `min_digit_accuracy` budget applies to the worst digit of every held-out split
(a model that silently loses one digit class is not published). The figures go into the
manifest, so `export --check` can re-verify them, or, where the fonts are not installed,
read them from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mnist_edge.export.verify import Budgets, Check, _check, ort_predict

SPLITS = ("handwriting-tune", "handwriting-holdout", "scans-tune", "scans-holdout", "fonts-tune", "fonts-holdout")
HELD_OUT = ("handwriting-holdout", "scans-holdout", "fonts-holdout")


@dataclass(frozen=True)
class ProxySpec:
    """Which images: the same spec and normaliser version always give the same bytes."""

    handwriting_per_digit: int = 200
    fonts_per_digit: int = 300
    seed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProxySpec:
        return cls(**{k: int(d[k]) for k in ("handwriting_per_digit", "fonts_per_digit", "seed") if k in d})


def build_sets(
    spec: ProxySpec, version: int, splits: tuple[str, ...] = SPLITS, workers: int = 2, log: Callable[[str], None] = lambda m: None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """The requested splits as (images, labels), and the reason for each one that cannot be built here."""
    from mnist_edge.training import handwriting, proxy

    sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    unavailable: dict[str, str] = {}
    for name in splits:
        family, split = name.split("-", 1)
        if family in ("handwriting", "scans"):
            if spec.handwriting_per_digit <= 0:
                unavailable[name] = "not measured (0 images per digit)"
                continue
            log(f"proxy split {name}: drawing {10 * spec.handwriting_per_digit} digits")
            capture = "scan" if family == "scans" else None
            x, y, _ = handwriting.build(spec.handwriting_per_digit, split, spec.seed, workers=workers, version=version, capture=capture)
        else:
            if spec.fonts_per_digit <= 0:
                unavailable[name] = "not measured (0 images per digit)"
                continue
            try:
                proxy.find_fonts(split)
            except proxy.ProxyUnavailable as exc:
                unavailable[name] = f"fonts not installed ({' '.join(exc.missing_packages) or exc})"
                continue
            log(f"proxy split {name}: rendering {10 * spec.fonts_per_digit} digits")
            x, y, _ = proxy.build_proxy_set(spec.fonts_per_digit, spec.seed, subset=split, version=version, workers=workers)
        sets[name] = (x, y.astype(np.int64))
    return sets, unavailable


def per_digit(digits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Overall and per-digit accuracy (fractions, rounded for the manifest)."""
    labels = np.asarray(labels, dtype=np.int64)
    digits = np.asarray(digits, dtype=np.int64)
    by_digit = [float((digits[labels == d] == d).mean()) if (labels == d).any() else float("nan") for d in range(10)]
    worst = int(np.nanargmin(by_digit))
    return {
        "accuracy": round(float((digits == labels).mean()), 6),
        "per_digit": [round(a, 6) for a in by_digit],
        "worst_digit": worst,
        "worst": round(by_digit[worst], 6),
        "images": len(labels),
    }


def measure(model: bytes, sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
    return {name: per_digit(ort_predict(model, x).digits, y) for name, (x, y) in sets.items()}


def digit_checks(figures: dict[str, dict[str, Any]], budgets: Budgets, recorded: frozenset[str] = frozenset()) -> list[Check]:
    """The worst-digit budget on every held-out split that has figures (`recorded`: read from the manifest)."""
    checks = []
    for name in HELD_OUT:
        f = figures.get(name)
        if f is None:
            continue
        source = "recorded in the manifest, not re-measured here" if name in recorded else f"{f['images']} images"
        checks.append(_check(f"{name}: worst digit ({f['worst_digit']}) accuracy", f["worst"], ">=", budgets.min_digit_accuracy, source))
    return checks
