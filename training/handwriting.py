"""Synthetic handwriting: digits drawn as pen strokes, in the styles MNIST lacks, then "captured".

MNIST's writers were American census staff and students; its 1s are mostly a single
vertical stroke, its 7s uncrossed, its 4s closed. Most of the world writes a 1 with a long
flag (and often a foot), crosses its 7s, leaves its 4s open, and a phone or a scanner adds
low resolution, blur, JPEG, uneven light and paper texture. This module draws digits the
way a pen does: each style is a parametric skeleton (lines, arcs and Bezier curves in a
unit box), bent by a writer (slant, width, roundness, wobble, jitter of every control
point), stroked by a pen (fine pencil to thick marker, with pressure), and captured by a
camera or scanner (rendered at 8-60 px high, upscaled, blurred, lit unevenly, on textured
paper, JPEG'd, rotated, in perspective) or by a form reader (cropped and fitted into a
10-20 px box, often stretched to fill it and at one bit per pixel, then enlarged). The output is a grayscale picture as a user would
send it; `imaging.normalize` turns it into what the model sees, as in the server.

Splits. "train" feeds training; "tune" (other writers) chooses the recipe; "holdout" is only
reported: its writers are disjoint (their seeds never overlap), it alone uses the styles in
HOLDOUT_STYLES, and it alone uses a ribbon pen (a nib held at an angle) and the strongest
perspective. Every image has its own generator seeded by (split, seed, digit, index).

numpy and Pillow only; no torch. CLI:
python -m mnist_edge.training.handwriting --out DIR [--split holdout] [--n-per-digit N]
writes the normalised images as IDX, the raw pictures as PNGs (with --png) and contact sheets.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mnist_edge.imaging.normalize import NORMALISER_VERSION, ImageError, normalize

GENERATOR_VERSION = 2  # 2: the form reader's scan capture (`_scan`); 1s' flags by angle, and the flat-flag 1
SPLITS = ("train", "tune", "holdout")
CAPTURES = ("camera", "scan")
SCAN_SHARE = 0.45  # of the pictures drawn with no capture named
_SPLIT_SALT = {"train": 11, "tune": 23, "holdout": 37}

Stroke = np.ndarray  # [K, 2] points (x, y) in a box 1 unit high, y down


# ---------------------------------------------------------------------------------------
# Primitives: every one returns an array of points along the path.


def _line(p0, p1, n: int = 12) -> Stroke:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) * np.asarray(p0, float) + t * np.asarray(p1, float)


def _bezier(p0, p1, p2, p3, n: int = 24) -> Stroke:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = (np.asarray(p, float) for p in (p0, p1, p2, p3))
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _arc(cx, cy, rx, ry, a0, a1, n: int = 32) -> Stroke:
    """Ellipse arc from angle a0 to a1 (degrees; 0 = right, 90 = down, as on screen)."""
    a = np.deg2rad(np.linspace(a0, a1, n))
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)


def _join(*parts: Stroke) -> Stroke:
    return np.concatenate(parts, axis=0)


# ---------------------------------------------------------------------------------------
# Styles: digit -> name -> skeleton(r), r a uniform(-1, 1) sampler for the writer's own shape.

R = Callable[[float, float], float]  # r(lo, hi): a uniform draw in [lo, hi]


def _zero_oval(r: R) -> list[Stroke]:
    start = r(-120, -60)
    return [_arc(0.5, 0.5, r(0.3, 0.45), 0.5, start, start - 360 - r(0, 25), 48)]


def _zero_open(r: R) -> list[Stroke]:
    start = r(-100, -70)
    return [_arc(0.5, 0.5, r(0.28, 0.42), 0.5, start, start - r(320, 345), 44)]


def _one_stick(r: R) -> list[Stroke]:
    x = r(0.45, 0.55)
    return [_line((x + r(-0.06, 0.06), 0.0), (x, 1.0))]


def _flag(x: float, length: float, angle: float) -> tuple[float, float]:
    """Where a 1's flag starts: `length` from the top of the stem at `x`, `angle` degrees below
    the horizontal, to the left. A 1's flag always falls to the left; a 7's bar runs level
    to the right, which is what tells them apart once a scan has stretched both to a square."""
    a = np.deg2rad(angle)
    return (x - length * float(np.cos(a)), length * float(np.sin(a)))


def _one_flag(r: R) -> list[Stroke]:
    x = r(0.5, 0.62)
    flag = _flag(x, r(0.25, 0.45), r(30, 60))
    return [_join(_line(flag, (x, 0.0), 8), _line((x, 0.0), (x + r(-0.04, 0.04), 1.0), 14))]


def _one_flag_foot(r: R) -> list[Stroke]:
    strokes = _one_flag(r)
    x = float(strokes[0][-1, 0])
    half = r(0.2, 0.38)
    return strokes + [_line((x - half, 1.0), (x + half * r(0.7, 1.1), 1.0 + r(-0.03, 0.03)), 10)]


def _one_short_flag(r: R) -> list[Stroke]:
    """A short flag, as typeset 1s and many writers have it."""
    x = r(0.5, 0.62)
    flag = _flag(x, r(0.12, 0.25), r(25, 55))
    return [_join(_line(flag, (x, 0.0), 6), _line((x, 0.0), (x + r(-0.04, 0.04), 1.0), 14))]


def _one_long_flag(r: R) -> list[Stroke]:
    """The flag as a long upstroke from low on the left (Swiss/German 1)."""
    x = r(0.55, 0.68)
    flag = _flag(x, r(0.45, 0.7), r(40, 65))
    bend = ((flag[0] + x) / 2 + r(-0.05, 0.02), (flag[1]) / 2 - r(0.0, 0.08))
    return [_join(_bezier(flag, bend, bend, (x, 0.0), 12), _line((x, 0.0), (x + r(-0.03, 0.03), 1.0), 14))]


def _one_flat_flag(r: R) -> list[Stroke]:
    """A longer, flatter flag, as some typefaces and writers draw it; still falling to the left
    and shorter than a 7's bar, on an upright stem."""
    x = r(0.55, 0.68)
    flag = _flag(x, r(0.25, 0.4), r(18, 30))
    return [_join(_line(flag, (x, 0.0), 8), _line((x, 0.0), (x + r(-0.04, 0.04), 1.0), 14))]


def _one_serif_foot(r: R) -> list[Stroke]:
    x = r(0.45, 0.55)
    flag = (x - r(0.12, 0.22), r(0.08, 0.18))
    half = r(0.18, 0.3)
    return [_join(_line(flag, (x, 0.0), 6), _line((x, 0.0), (x, 1.0), 14)), _line((x - half, 1.0), (x + half, 1.0), 8)]


def _two_classic(r: R) -> list[Stroke]:
    top = _arc(0.5, r(0.25, 0.32), r(0.33, 0.42), r(0.22, 0.3), r(170, 200), r(350, 380), 20)
    end = top[-1]
    diag = _bezier(end, (end[0] - 0.05, end[1] + 0.2), (r(0.2, 0.35), r(0.7, 0.85)), (r(0.02, 0.12), 1.0), 16)
    base = _line(diag[-1], (r(0.85, 1.0), 1.0 + r(-0.05, 0.03)), 10)
    return [_join(top, diag, base)]


def _two_looped(r: R) -> list[Stroke]:
    top = _arc(0.5, r(0.25, 0.3), r(0.33, 0.42), r(0.22, 0.3), r(170, 200), r(350, 375), 20)
    end = top[-1]
    corner = (r(0.12, 0.22), r(0.86, 0.94))
    diag = _bezier(end, (end[0] - 0.05, end[1] + 0.25), (corner[0] + 0.1, corner[1] - 0.2), corner, 16)
    rad = r(0.07, 0.13)
    loop = _arc(corner[0] + 0.02, corner[1] + rad * 0.2, rad, rad * 0.9, 180 + r(-20, 20), 180 + 360 + r(20, 60), 18)
    base = _line(loop[-1], (r(0.85, 1.0), 1.0 + r(-0.04, 0.02)), 10)
    return [_join(top, diag, loop, base)]


def _two_z(r: R) -> list[Stroke]:
    """A 2 written almost as a Z: a flat top that turns into a straight diagonal."""
    a = (r(0.05, 0.15), r(0.05, 0.2))
    b = (r(0.75, 0.95), r(0.1, 0.25))
    c = (r(0.05, 0.15), 1.0)
    return [_join(_bezier(a, (0.35, -0.08), (b[0] + 0.05, b[1] - 0.1), b, 12), _line(b, c, 12), _line(c, (r(0.85, 1.0), 1.0), 8))]


def _three_round(r: R) -> list[Stroke]:
    mid = r(0.42, 0.52)
    upper = _arc(0.5, mid / 2, r(0.3, 0.4), mid / 2, r(190, 215), r(440, 460), 24)
    lower = _arc(0.5, (1 + mid) / 2, r(0.36, 0.46), (1 - mid) / 2, r(-100, -80), r(140, 165), 26)
    return [_join(upper, lower)]


def _three_flat(r: R) -> list[Stroke]:
    a, b = (r(0.05, 0.15), 0.0), (r(0.8, 0.95), r(-0.03, 0.03))
    mid = (r(0.35, 0.5), r(0.38, 0.46))
    ry = (1 - mid[1]) / 2
    lower = _arc(0.48, mid[1] + ry, r(0.38, 0.46), ry, -110, r(140, 165), 24)
    return [_join(_line(a, b, 8), _line(b, mid, 8), _line(mid, lower[0], 3), lower)]


def _four_closed(r: R) -> list[Stroke]:
    x = r(0.62, 0.75)
    bar = r(0.6, 0.72)
    return [
        _join(_line((x - r(0.0, 0.1), 0.0), (r(0.0, 0.08), bar), 12), _line((r(0.0, 0.08), bar), (r(0.9, 1.0), bar + r(-0.04, 0.02)), 10)),
        _line((x, r(0.05, 0.25)), (x + r(-0.04, 0.04), 1.0), 12),
    ]


def _four_open(r: R) -> list[Stroke]:
    x = r(0.62, 0.78)
    bar = r(0.5, 0.65)
    left = (r(0.05, 0.2), 0.0)
    corner = (left[0] + r(-0.08, 0.05), bar)
    return [
        _join(_line(left, corner, 10), _line(corner, (r(0.9, 1.02), bar + r(-0.04, 0.02)), 10)),
        _line((x + r(-0.05, 0.05), r(0.0, 0.08)), (x + r(-0.04, 0.04), 1.0), 12),
    ]


def _four_one_stroke(r: R) -> list[Stroke]:
    """An open 4 in one movement: down, across, then up and down the stem."""
    x = r(0.62, 0.75)
    bar = r(0.5, 0.62)
    return [_join(_line((r(0.05, 0.2), 0.0), (r(0.0, 0.12), bar), 10), _line((r(0.0, 0.12), bar), (x, bar), 8), _line((x, bar), (x + r(-0.05, 0.05), 0.0), 8), _line((x + r(-0.05, 0.05), 0.0), (x + r(-0.05, 0.05), 1.0), 14))]


def _five_classic(r: R) -> list[Stroke]:
    top = (r(0.2, 0.3), r(-0.02, 0.04))
    knee = (r(0.12, 0.25), r(0.38, 0.5))
    belly = _bezier(knee, (r(0.55, 0.75), knee[1] - r(0.1, 0.2)), (r(1.0, 1.15), r(0.7, 0.85)), (r(0.45, 0.55), 1.0), 20)
    tail = _bezier(belly[-1], (0.35, 1.02), (0.15, 0.98), (r(0.0, 0.1), r(0.82, 0.92)), 8)
    return [_join(_line(top, knee, 8), belly, tail), _line(top, (r(0.8, 0.95), r(-0.04, 0.04)), 8)]


def _six_classic(r: R) -> list[Stroke]:
    rad = r(0.26, 0.34)
    cy = 1.0 - rad * 1.05
    start = (r(0.6, 0.85), 0.0)
    down = _bezier(start, (r(0.2, 0.4), r(0.05, 0.15)), (0.5 - rad, cy - r(0.2, 0.35)), (0.5 - rad, cy), 16)
    loop = _arc(0.5, cy, rad, rad * r(0.85, 1.05), 180, 180 - r(330, 370), 28)
    return [_join(down, loop)]


def _seven_plain(r: R) -> list[Stroke]:
    a, b = (r(0.0, 0.08), r(0.0, 0.06)), (r(0.9, 1.0), r(-0.03, 0.03))
    foot = (r(0.25, 0.5), 1.0)
    return [_join(_line(a, b, 10), _bezier(b, (b[0] - 0.1, 0.3), (foot[0] + 0.05, 0.7), foot, 14))]


def _seven_crossed(r: R) -> list[Stroke]:
    strokes = _seven_plain(r)
    stem = strokes[0][10:]
    y = r(0.45, 0.6)
    k = int(np.argmin(np.abs(stem[:, 1] - y)))
    x = float(stem[k, 0])
    return strokes + [_line((x - r(0.18, 0.32), y + r(-0.03, 0.03)), (x + r(0.15, 0.3), y + r(-0.03, 0.03)), 8)]


def _seven_hooked(r: R) -> list[Stroke]:
    strokes = _seven_plain(r)
    a = strokes[0][0]
    return [_join(_line((a[0] + r(-0.02, 0.04), a[1] + r(0.12, 0.25)), a, 5), strokes[0])]


def _eight_figure(r: R) -> list[Stroke]:
    mid = r(0.42, 0.5)
    top = _arc(0.5, mid / 2, r(0.24, 0.34), mid / 2, 90 + r(-10, 10), 90 + 360 + r(-5, 5), 26)
    low = _arc(0.5, (1 + mid) / 2, r(0.3, 0.42), (1 - mid) / 2, -90, -90 - 360, 28)
    # A figure of eight: the upper loop one way, the lower the other, crossing at the waist.
    return [_join(top[::-1], low)]


def _eight_stacked(r: R) -> list[Stroke]:
    mid = r(0.4, 0.5)
    top = _arc(0.5, mid / 2, r(0.24, 0.34), mid / 2, -90, 270 + r(0, 20), 26)
    low = _arc(0.5, (1 + mid) / 2, r(0.3, 0.42), (1 - mid) / 2, -90, 270 + r(0, 20), 28)
    return [top, low]


def _nine_curved(r: R) -> list[Stroke]:
    rad = r(0.26, 0.34)
    cy = rad * 1.05
    loop = _arc(0.5, cy, rad, rad * r(0.85, 1.05), r(-10, 10), r(-10, 10) - 360, 28)
    x = float(loop[-1, 0])
    tail = _bezier(loop[-1], (x, cy + 0.3), (x - r(0.0, 0.1), 0.8), (x - r(0.15, 0.3), 1.0), 14)
    return [_join(loop, tail)]


def _nine_straight(r: R) -> list[Stroke]:
    rad = r(0.26, 0.34)
    cy = rad * 1.05
    loop = _arc(0.5, cy, rad, rad * r(0.85, 1.05), r(-5, 10), r(-5, 10) - 360, 28)
    x = float(loop[-1, 0])
    return [_join(loop, _line(loop[-1], (x + r(-0.08, 0.02), 1.0), 14))]


def _nine_diagonal(r: R) -> list[Stroke]:
    rad = r(0.26, 0.34)
    cy = rad * 1.05
    loop = _arc(0.5, cy, rad, rad * r(0.85, 1.05), r(0, 15), r(0, 15) - 360, 28)
    return [_join(loop, _line(loop[-1], (r(0.3, 0.55), 1.0), 14))]


STYLES: dict[int, dict[str, Callable[[R], list[Stroke]]]] = {
    0: {"oval": _zero_oval, "open-oval": _zero_open},
    1: {
        "stick": _one_stick, "flag": _one_flag, "short-flag": _one_short_flag, "flag-foot": _one_flag_foot,
        "long-flag": _one_long_flag, "flat-flag": _one_flat_flag, "serif-foot": _one_serif_foot,
    },
    2: {"classic": _two_classic, "looped": _two_looped, "z-like": _two_z},
    3: {"round": _three_round, "flat-top": _three_flat},
    4: {"closed": _four_closed, "open": _four_open, "open-one-stroke": _four_one_stroke},
    5: {"classic": _five_classic},
    6: {"classic": _six_classic},
    7: {"plain": _seven_plain, "crossed": _seven_crossed, "hooked": _seven_hooked},
    8: {"figure": _eight_figure, "stacked": _eight_stacked},
    9: {"curved-tail": _nine_curved, "straight-tail": _nine_straight, "diagonal-tail": _nine_diagonal},
}
# Styles only the held-out split draws: near relatives of trained ones, never trained on.
HOLDOUT_STYLES = frozenset({(2, "z-like"), (4, "open-one-stroke"), (7, "hooked"), (9, "diagonal-tail")})
# How often each style is drawn (relative, per digit): the styles MNIST lacks get more weight.
_WEIGHTS = {
    (1, "stick"): 1.0, (1, "flag"): 2.0, (1, "short-flag"): 1.5, (1, "flag-foot"): 1.5, (1, "long-flag"): 2.0,
    (1, "flat-flag"): 1.5,
}


def styles_for(digit: int, split: str) -> list[str]:
    names = list(STYLES[digit])
    if split == "holdout":
        return names
    return [n for n in names if (digit, n) not in HOLDOUT_STYLES]


# ---------------------------------------------------------------------------------------
# Writer, pen and capture


def _wobble(pts: Stroke, rng: np.random.Generator, amount: float) -> Stroke:
    """Smooth low-frequency displacement along a stroke: a hand is not a plotter."""
    n = len(pts)
    if n < 3 or amount <= 0:
        return pts
    k = max(2, n // 8)
    knots = rng.normal(0.0, amount, size=(k, 2))
    t = np.linspace(0, k - 1, n)
    disp = np.stack([np.interp(t, np.arange(k), knots[:, j]) for j in range(2)], axis=1)
    return pts + disp


def _homography(rng: np.random.Generator, strength: float) -> np.ndarray:
    """A small random perspective map of the unit square (as a camera not square to the paper)."""
    h = np.eye(3)
    h[2, 0], h[2, 1] = rng.uniform(-strength, strength, size=2)
    return h


def skeleton(digit: int, style: str, rng: np.random.Generator) -> list[Stroke]:
    """The style's strokes for one writer: control points jittered, then slant, width, rotation, wobble."""
    def r(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    strokes = [s.copy() for s in STYLES[digit][style](r)]
    width = r(0.5, 0.85) if digit != 1 else r(0.55, 1.0)
    # The top moves right by this per unit height. A 1 leaning as far as other digits may
    # would be a 7 with a short bar to anyone who reads it, so its lean is kept smaller.
    slant = r(-0.12, 0.35) if digit != 1 else r(-0.12, 0.2)
    angle = np.deg2rad(r(-8, 8))
    c, s = np.cos(angle), np.sin(angle)
    wob = r(0.0, 0.025)
    out = []
    for st in strokes:
        st = _wobble(st, rng, wob)
        x = (st[:, 0] - 0.5) * width
        y = st[:, 1] - 0.5
        x = x - slant * y
        out.append(np.stack([c * x - s * y, s * x + c * y], axis=1))
    return out


def _draw(strokes: list[Stroke], size_px: float, pen_px: float, canvas: int, centre: np.ndarray, rng: np.random.Generator, ribbon: bool) -> np.ndarray:
    """Ink coverage (float 0..1) of the strokes drawn with a round (or ribbon) pen, supersampled 4x."""
    ss = 4
    img = Image.new("L", (canvas * ss, canvas * ss), 0)
    draw = ImageDraw.Draw(img)
    pressure_base = rng.uniform(0.75, 1.0)
    nib = rng.uniform(0, np.pi)
    for st in strokes:
        pts = (st * size_px + centre) * ss
        n = len(pts)
        pressure = pressure_base * (1 + 0.25 * np.sin(np.linspace(0, np.pi * rng.uniform(0.5, 2), n) + rng.uniform(0, 6)))
        for i in range(n - 1):
            p0, p1 = pts[i], pts[i + 1]
            w = max(1.0, pen_px * ss * pressure[i])
            if ribbon:
                seg = p1 - p0
                # A flat nib: thick across its own direction, thin along it.
                k = abs(np.sin(np.arctan2(seg[1], seg[0]) - nib))
                w = max(1.0, w * (0.35 + 0.65 * k))
            draw.line([tuple(p0), tuple(p1)], fill=255, width=int(round(w)))
            rad = w / 2
            draw.ellipse([p1[0] - rad, p1[1] - rad, p1[0] + rad, p1[1] + rad], fill=255)
        rad = max(1.0, pen_px * ss * pressure[0]) / 2
        draw.ellipse([pts[0][0] - rad, pts[0][1] - rad, pts[0][0] + rad, pts[0][1] + rad], fill=255)
    small = img.resize((canvas, canvas), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _scan(strokes: list[Stroke], rng: np.random.Generator, ribbon: bool) -> np.ndarray:
    """The strokes written with a pen of 8-30% of the digit's height, then `form_scan`ned."""
    size = 64.0
    pen_px = float(np.exp(rng.uniform(np.log(0.08), np.log(0.3)))) * size
    pts = np.concatenate(strokes)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    canvas = int(np.ceil(((hi - lo) * size + pen_px).max())) + 8
    cov = _draw(strokes, size, pen_px, canvas, canvas / 2 - (lo + hi) / 2 * size, rng, ribbon)
    return form_scan(cov, rng)


def form_scan(coverage: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A form reader's capture of a digit given as ink coverage (0..1): cropped to its ink and
    fitted into a small square box (10-20 px; half the time stretched to fill it, whatever its
    shape), often at one bit per pixel, then shown enlarged as dark ink on light paper. Strokes
    come out thick and blocky, and a narrow digit such as a 1 comes out as wide as it is tall."""
    mask = coverage > 0.3
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        rows, cols = np.arange(coverage.shape[0]), np.arange(coverage.shape[1])
    crop = coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    side = int(rng.integers(10, 21))
    h, w = crop.shape
    if rng.random() < 0.5:
        box = (side, side)
    else:
        k = side / max(h, w)
        box = (max(1, round(w * k)), max(1, round(h * k)))
    small = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(box, Image.Resampling.BOX), dtype=np.float32)
    if rng.random() < 0.5:  # one bit per pixel
        small = (small > rng.uniform(0.25, 0.5) * max(float(small.max()), 1e-6)).astype(np.float32)
    pad = int(rng.integers(0, 5))  # 0: cut to the digit, as a form reader's cell often is
    grid = np.zeros((box[1] + 2 * pad, box[0] + 2 * pad), np.float32)
    grid[pad : pad + box[1], pad : pad + box[0]] = np.clip(small, 0.0, 1.0)
    paper, ink = float(rng.uniform(190, 255)), float(rng.uniform(0, 90))
    img = Image.fromarray(np.clip(paper - grid * (paper - ink), 0, 255).astype(np.uint8))
    factor = int(rng.integers(1, 7))
    if factor > 1:
        resample = Image.Resampling.NEAREST if rng.random() < 0.6 else Image.Resampling.BILINEAR
        img = img.resize((img.size[0] * factor, img.size[1] * factor), resample)
    return np.asarray(img)


def render(digit: int, style: str, rng: np.random.Generator, split: str = "train", capture: str | None = None) -> np.ndarray:
    """One picture of `digit` in `style` as a user would send it: uint8 grayscale, mostly dark ink on light paper.

    `capture` is "camera" (a phone or a scanner at its own resolution), "scan" (a form reader's
    small fitted box, `_scan`) or None: a scan SCAN_SHARE of the time, else a camera.
    """
    if capture not in CAPTURES + (None,):
        raise ValueError(f"capture must be one of {', '.join(CAPTURES)} or None, got {capture!r}")
    strokes = skeleton(digit, style, rng)
    holdout = split == "holdout"
    if holdout:  # the held-out camera: stronger perspective
        hmat = _homography(rng, 0.35)
    else:
        hmat = _homography(rng, 0.2)
    warped = []
    for st in strokes:
        p = np.concatenate([st, np.ones((len(st), 1))], axis=1) @ hmat.T
        warped.append(p[:, :2] / p[:, 2:3])
    strokes = warped
    if capture is None:
        capture = "scan" if rng.random() < SCAN_SHARE else "camera"
    if capture == "scan":
        return _scan(strokes, rng, ribbon=holdout and rng.random() < 0.5)

    # Capture resolution: the digit's height in the picture as taken, before any upscaling.
    low_res = rng.random() < 0.5
    size = float(rng.uniform(8, 16) if low_res else rng.uniform(16, 56))
    # Pen: fine pencil (~4% of the height) to thick marker (~30%), log-uniform.
    pen_rel = float(np.exp(rng.uniform(np.log(0.04), np.log(0.3))))
    pen_px = max(pen_rel * size, 0.6)
    pts = np.concatenate(strokes)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    extent = (hi - lo) * size + pen_px
    canvas = int(np.ceil(max(extent) * rng.uniform(1.3, 2.0))) + 4
    room = np.maximum(canvas - extent, 0) / 2
    centre = canvas / 2 - (lo + hi) / 2 * size + rng.uniform(-1, 1, size=2) * room * 0.6
    cov = _draw(strokes, size, pen_px, canvas, centre, rng, ribbon=holdout and rng.random() < 0.5)

    # Paper, ink, light.
    paper = float(rng.uniform(150, 250))
    ink = float(rng.uniform(0, min(100.0, paper - 80)))
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) / canvas
    theta = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.12) * ((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta))
    if rng.random() < 0.3:  # a shadow or vignette
        light = light - rng.uniform(0, 0.08) * ((xx - rng.random()) ** 2 + (yy - rng.random()) ** 2)
    texture = np.asarray(
        Image.fromarray((rng.random((canvas, canvas)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0))),
        dtype=np.float32,
    )
    texture = (texture - texture.mean()) * rng.uniform(0, 0.15)
    gray = (paper + texture) * light
    gray = gray - cov * (gray - ink)
    gray = np.clip(gray, 0, 255)

    img = Image.fromarray(gray.astype(np.uint8))
    # Upscale a small capture (a low-resolution scan opened at screen size).
    if low_res or rng.random() < 0.3:
        factor = float(rng.uniform(2, 6))
        resample = [Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.NEAREST][int(rng.integers(0, 3))]
        img = img.resize((int(canvas * factor), int(canvas * factor)), resample)
    blur = rng.uniform(0, 0.08) * img.size[0] / max(canvas / size, 1)
    if blur > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    noise = rng.uniform(0, 4)
    if noise > 0.5:
        arr = arr + rng.standard_normal(arr.shape).astype(np.float32) * noise
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(rng.integers(30, 95)))
        arr = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    if rng.random() < 0.1:  # chalk on a board, or a white pen on a dark screen
        arr = 255 - arr
    return arr


def _pick_style(digit: int, split: str, rng: np.random.Generator) -> str:
    names = styles_for(digit, split)
    w = np.array([_WEIGHTS.get((digit, n), 1.0) for n in names])
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _render_jobs(
    jobs: Sequence[tuple[int, int]], split: str, seed: int, raw: bool, version: int, capture: str | None = None
) -> list[tuple[np.ndarray, str]]:
    out = []
    for i, d in jobs:
        rng = np.random.default_rng([_SPLIT_SALT[split], seed, d, i])
        for _ in range(10):
            style = _pick_style(d, split, rng)
            pic = render(d, style, rng, split, capture)
            try:
                seen = normalize(pic, version)
                break
            except ImageError:  # a fine pencil, tiny and blurred on grey paper, can vanish: draw again
                continue
        else:
            raise RuntimeError(f"no visible digit in 10 draws of {d} (split {split}, seed {seed}, index {i})")
        out.append((pic if raw else seen, style))
    return out


def build(
    n_per_digit: int,
    split: str = "train",
    seed: int = 0,
    *,
    raw: bool = False,
    workers: int = 1,
    version: int = NORMALISER_VERSION,
    capture: str | None = None,
    extra: Mapping[int, int] | None = None,
) -> tuple[list[np.ndarray] | np.ndarray, np.ndarray, list[str]]:
    """n_per_digit pictures of each digit, index-major (0-9, 0-9, ...), as the model sees them.
    `capture` forces every picture through one capture ("camera" or "scan"); None mixes them.
    `extra` (digit -> count) appends more pictures of those digits, by further writers.

    Returns (images uint8 [N, 28, 28] normalised by `version`, or with raw=True the raw pictures
    as a list; labels uint8 [N]; style names). The same arguments give the same bytes,
    whatever `workers` is.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    jobs = [(i, d) for i in range(n_per_digit) for d in range(10)]
    jobs += [(i, d) for d, k in sorted((extra or {}).items()) for i in range(n_per_digit, n_per_digit + k)]
    labels = np.array([d for _, d in jobs], dtype=np.uint8)
    if workers <= 1 or len(jobs) < 200:
        results = _render_jobs(jobs, split, seed, raw, version, capture)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        n_chunks = 4 * workers
        bounds = np.linspace(0, len(jobs), n_chunks + 1).astype(int)
        chunks = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        ctx = multiprocessing.get_context("spawn")  # the caller may hold torch's threads
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            parts = pool.map(_render_jobs, chunks, *zip(*[(split, seed, raw, version, capture)] * len(chunks)))
            results = [r for part in parts for r in part]
    images = [img for img, _ in results]
    styles = [f"{d}:{s}" for d, (_, s) in zip(labels, results)]
    return (images if raw else np.stack(images)), labels, styles


def main(argv: Sequence[str] | None = None) -> int:
    from mnist_edge.imaging.idx import encode_idx
    from mnist_edge.training.proxy import _png_bytes, _write_atomic, contact_sheet

    p = argparse.ArgumentParser(prog="python -m mnist_edge.training.handwriting", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", choices=SPLITS, default="holdout")
    p.add_argument("--n-per-digit", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--capture", choices=CAPTURES, default=None, help="draw every picture through this capture (default: a mix)")
    p.add_argument("--png", action="store_true", help="also write every raw picture as PNG (what a user would send)")
    args = p.parse_args(argv)
    images, labels, styles = build(args.n_per_digit, args.split, args.seed, workers=args.workers, capture=args.capture)
    raw, raw_labels, _ = build(min(30, args.n_per_digit), args.split, args.seed, raw=True, workers=1, capture=args.capture)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"handwriting-{args.split}" + (f"-{args.capture}" if args.capture else "")
    _write_atomic(out / f"{prefix}-images-idx3-ubyte", encode_idx(images))
    _write_atomic(out / f"{prefix}-labels-idx1-ubyte", encode_idx(labels))
    _write_atomic(out / f"{prefix}-styles.txt", ("\n".join(styles) + "\n").encode())
    _write_atomic(out / f"{prefix}-contact.png", _png_bytes(contact_sheet(images, labels, min(30, args.n_per_digit))))
    _write_atomic(out / f"{prefix}-raw.png", _png_bytes(contact_sheet(raw, raw_labels, min(30, args.n_per_digit), cell=64)))
    if args.png:
        pics, _, _ = build(args.n_per_digit, args.split, args.seed, raw=True, workers=1, capture=args.capture)
        (out / "png").mkdir(exist_ok=True)
        for i, (pic, d) in enumerate(zip(pics, labels)):
            _write_atomic(out / "png" / f"{i:05d}-{d}.png", _png_bytes(Image.fromarray(pic)))
    info = {"split": args.split, "seed": args.seed, "n_per_digit": args.n_per_digit, "capture": args.capture, "generator_version": GENERATOR_VERSION, "normaliser_version": NORMALISER_VERSION}
    _write_atomic(out / f"{prefix}.json", (json.dumps(info, indent=2) + "\n").encode())
    print(f"wrote {len(labels)} images ({args.split}, seed {args.seed}) to {out}; look at {out / (prefix + '-raw.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
