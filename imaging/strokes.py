"""Stroke-width normalisation: the same digit looks the same whatever pen wrote it.

A digit's identity is its centre line, not the width of the pen, the blur of the camera
or the resolution of the scan. `redraw` keeps the centre line and throws the rest away:
binarise (Otsu's threshold), thin to a one-pixel skeleton (Zhang-Suen), and draw the
skeleton again with an anti-aliased round pen of MNIST's typical width. numpy only;
the arrays are small (the digit's box at twice MNIST's scale), so it costs about a
millisecond per image.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

# Pen radius, in pixels of the working image (twice the 20-px box). Chosen so that
# MNIST's own training digits, redrawn, keep their mean ink (docs/model-card.md).
PEN_RADIUS = 2.4
# Ink components smaller than this fraction of the largest are specks, not strokes.
SPECK_FRACTION = 0.08


def otsu_threshold(a: np.ndarray) -> float:
    """The grey level (0..255) that best separates ink from background (Otsu 1979)."""
    hist = np.bincount(np.clip(a, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 127.5
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean_all = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean_all * w0 - m0 * total) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(np.argmax(between)) + 0.5


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning of a boolean image to 8-connected one-pixel lines (whole-array steps)."""
    img = np.pad(np.asarray(mask, dtype=bool), 1).astype(np.uint8)
    for _ in range(max(img.shape)):  # each pass peels one layer; this bound is never reached
        changed = False
        for second in (False, True):
            p = img
            c = p[1:-1, 1:-1]
            # Neighbours clockwise from north: p2 .. p9.
            nb = (p[:-2, 1:-1], p[:-2, 2:], p[1:-1, 2:], p[2:, 2:], p[2:, 1:-1], p[2:, :-2], p[1:-1, :-2], p[:-2, :-2])
            count = sum(n.astype(np.int8) for n in nb)
            ring = nb + (nb[0],)
            transitions = sum(((ring[i] == 0) & (ring[i + 1] == 1)).astype(np.int8) for i in range(8))
            p2, p4, p6, p8 = nb[0], nb[2], nb[4], nb[6]
            if second:
                side = ((p2 & p4 & p8) == 0) & ((p2 & p6 & p8) == 0)
            else:
                side = ((p2 & p4 & p6) == 0) & ((p4 & p6 & p8) == 0)
            remove = (c == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & side
            if remove.any():
                c[remove] = 0
                changed = True
        if not changed:
            break
    return img[1:-1, 1:-1].astype(bool)


def _has_second_ring(p: np.ndarray) -> np.ndarray:
    """For each pixel of the unpadded image: is there skeleton at Chebyshev distance exactly 2?"""
    h, w = p.shape[0] - 2, p.shape[1] - 2
    q = np.pad(p, 1)
    out = np.zeros((h, w), dtype=bool)
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            if max(abs(dy), abs(dx)) == 2:
                out |= q[2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w].astype(bool)
    return out


@lru_cache(maxsize=8)
def _pen(radius: float) -> tuple[tuple[int, int, float], ...]:
    """Offsets of an anti-aliased disc: (dy, dx, coverage in 0..1)."""
    reach = int(np.ceil(radius + 0.5))
    out = []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            cover = float(np.clip(radius + 0.5 - np.hypot(dy, dx), 0.0, 1.0))
            if cover > 0:
                out.append((dy, dx, cover))
    return tuple(out)


def draw_skeleton(skeleton: np.ndarray, radius: float = PEN_RADIUS) -> np.ndarray:
    """Draw every skeleton pixel as an anti-aliased disc; float 0..255, padded by the pen's reach."""
    reach = int(np.ceil(radius + 0.5))
    h, w = skeleton.shape
    out = np.zeros((h + 2 * reach, w + 2 * reach), dtype=np.float32)
    if not skeleton.any():
        return out
    for dy, dx, cover in _pen(radius):
        view = out[reach + dy : reach + dy + h, reach + dx : reach + dx + w]
        np.maximum(view, skeleton * np.float32(255.0 * cover), out=view)
    return out


def redraw(ink: np.ndarray, radius: float = PEN_RADIUS) -> np.ndarray:
    """Ink image (float, 0 = background, 255 = ink) -> the same centre lines drawn with the standard pen.

    Returns a float32 image larger than `ink` by the pen's reach on every side; an image
    with no ink above Otsu's threshold comes back unchanged (padded).
    """
    a = np.asarray(ink, dtype=np.float32)
    level = max(otsu_threshold(a), 0.25 * 255.0)  # never call faint haze ink
    mask = a > level
    reach = int(np.ceil(radius + 0.5))
    if not mask.any():
        return np.pad(a, reach)
    skeleton = thin(mask)
    # A speck thins to a lone pixel or two; the pen would draw it as a dot the size of a stroke.
    p = np.pad(skeleton, 1)
    neighbours = sum(p[1 + dy : p.shape[0] - 1 + dy, 1 + dx : p.shape[1] - 1 + dx].astype(np.int8)
                     for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx)
    lone = skeleton & (neighbours <= 1) & ~_has_second_ring(p)
    if lone.sum() < skeleton.sum():
        skeleton = skeleton & ~lone
    return draw_skeleton(skeleton, radius)


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a small boolean image: (label per pixel, -1 off the mask; pixel count per label).

    Labels spread by repeated 3x3 maxima (separable: rows, then columns) until nothing
    changes, as many rounds as the longest path in a component: fine for the <= 48-px
    images it is used on.
    """
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    buf = np.zeros((h + 2, w + 2), dtype=np.int32)
    lab = buf[1:-1, 1:-1]
    lab[m] = np.arange(1, int(m.sum()) + 1, dtype=np.int32)
    rows = np.empty((h, w + 2), dtype=np.int32)
    grown = np.empty((h, w), dtype=np.int32)
    for _ in range(h * w):
        np.maximum(np.maximum(buf[:-2, :], buf[1:-1, :]), buf[2:, :], out=rows)
        np.maximum(np.maximum(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:], out=grown)
        grown[~m] = 0
        if np.array_equal(grown, lab):
            break
        lab[...] = grown
    ids, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    keep = ids > 0
    dense = np.full(ids.shape, -1, dtype=np.int32)
    dense[keep] = np.arange(int(keep.sum()), dtype=np.int32)
    return dense[inverse].reshape(h, w), counts[keep]


def drop_specks(mask: np.ndarray, fraction: float = SPECK_FRACTION) -> np.ndarray:
    """The mask without components smaller than `fraction` of the largest (noise, dust, JPEG specks)."""
    labels, counts = components(mask)
    if counts.size <= 1:
        return np.asarray(mask, dtype=bool)
    big = counts >= fraction * counts.max()
    return (labels >= 0) & big[np.maximum(labels, 0)]


# Stroke width relative to the digit's longer side (2 * area / boundary of the ink above half
# intensity), as MNIST's training digits have it: 5th percentile 0.105, median 0.141, 95th
# 0.213 (docs/model-card.md). Pictures outside [WIDTH_LOW, WIDTH_HIGH] are brought back into it.
WIDTH_LOW, WIDTH_HIGH = 0.09, 0.22
WORK_SIDE = 56  # the longer side of the working image for width changes (px)


def stroke_width(ink: np.ndarray) -> float:
    """Mean stroke width relative to the longer side of the ink's bounding box (0 if no ink)."""
    m = np.asarray(ink) > 127.5
    area = int(m.sum())
    if area == 0:
        return 0.0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    boundary = max(int((m & ~inner).sum()), 1)
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    side = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    return 2.0 * area / boundary / side


def morph(a: np.ndarray, steps: int) -> np.ndarray:
    """Grey-level dilation (steps > 0) or erosion (steps < 0) by |steps| px per side.

    Steps alternate a 4-neighbour cross and a 3x3 square (an octagon, close to a round pen).
    """
    grow = steps > 0
    op = np.maximum if grow else np.minimum
    out = np.pad(np.asarray(a, dtype=np.float32), abs(steps) + 1)
    for k in range(abs(steps)):
        c = out[1:-1, 1:-1]
        res = op(op(out[:-2, 1:-1], out[2:, 1:-1]), op(out[1:-1, :-2], out[1:-1, 2:]))
        if k % 2 == 1:
            res = op(op(res, op(out[:-2, :-2], out[:-2, 2:])), op(out[2:, :-2], out[2:, 2:]))
        out[1:-1, 1:-1] = op(c, res)
    return out


def standard_width(ink: np.ndarray, fit: Callable[[np.ndarray, int], np.ndarray]) -> np.ndarray:
    """The cropped ink unchanged if its strokes are as wide as MNIST's usually are; else resized
    to WORK_SIDE px and thinned (marker, blurred scan) or thickened (fine pencil) into that range."""
    w = stroke_width(ink)
    if WIDTH_LOW <= w <= WIDTH_HIGH or w == 0.0:
        return ink
    work = fit(ink, WORK_SIDE)
    w = stroke_width(work)
    target = min(max(w, WIDTH_LOW + 0.02), WIDTH_HIGH - 0.04)
    steps = int(round((target - w) * max(work.shape) / 2))
    if steps == 0:
        return work
    changed = morph(work, steps)
    return changed if changed.max() > 127.5 else work  # never erase the digit
