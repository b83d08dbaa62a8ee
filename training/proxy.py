"""A reproducible non-MNIST "proxy" test set: digits rendered from Debian fonts.

MNIST's digits all went through the same scanners and the same pre-processing, so
a model's MNIST test accuracy says little about digits drawn on a phone, photographed
on paper or typed in a font. This module renders the digits 0-9 from a fixed list of
font files that named Debian packages install (handwriting-like, script, sans, serif
and monospaced), varies what MNIST does not (stroke width, slant, rotation, size,
aspect, position, blur, noise, JPEG artefacts, dark-on-light or light-on-dark),
and normalises every render with `imaging.normalize.normalize`, the path the server
takes for encoded images. The result is used to choose augmentation and layer width
(the "tune" fonts) and to report how the model copes (the "holdout" fonts, whose
packages never appear in "tune").

Everything is a function of (seed, font list, n_per_digit): each image has its own
random generator seeded by (seed, digit, index), so the same call gives the same bytes.
numpy and Pillow only; no torch.

CLI: python -m mnist_edge.training.proxy --out DIR [--n-per-digit N] [--seed S] [--subset all|tune|holdout]
writes IDX files, the per-image font list and PNG contact sheets into DIR.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from mnist_edge.imaging.idx import encode_idx
from mnist_edge.imaging.normalize import NORMALISER_VERSION, ImageError, normalize

FONT_ROOT = Path("/usr/share/fonts")
FONTS_TXT = ".ci/fonts.txt"
INSTALL_HINT = f"apt-get install -y $(cat {FONTS_TXT})"
SUBSETS = ("all", "tune", "holdout")

# package -> (style, font files relative to FONT_ROOT). Chosen by rendering the digits of
# every candidate file: each file here has ten distinct, recognisable arabic numerals with a
# plain zero. Handwriting-like and script faces make up about half of the files, so typeset
# faces, whose digits are much alike, do not dominate. Left out after looking: digits that
# are outlines or hatching (fonts-femkeklaver, fonts-cabinsketch), a dingbat face with no
# digits (urw-base35 D050000L), faces whose digit slots hold boxes (fonts-levien-typoscript,
# fonts-seto's setofont-ex), a pixel/segment face (fonts-f500), a secretary hand with
# flourishes across neighbouring cells (fonts-joscelyn), and faces with a slashed or dotted
# zero, a zero MNIST never shows (fonts-go, fonts-hack, fonts-inconsolata, fonts-firacode,
# fonts-jetbrains-mono, fonts-opendyslexic, DejaVu Sans Mono, Liberation Mono).
_TABLE: dict[str, tuple[str, tuple[str, ...]]] = {
    # handwriting-like
    "fonts-bwht": ("hand", tuple(
        f"opentype/bwht/BecauseWe{name}-Regular.otf"
        for name in ("Build", "Connect", "Create", "Learn", "Mentor", "Organize")
    )),
    "fonts-breip": ("hand", ("truetype/breip/breipfont.ttf",)),
    "fonts-comic-neue": ("hand", (
        "opentype/comic-neue/ComicNeue-Regular.otf",
        "opentype/comic-neue/ComicNeue-Bold.otf",
        "opentype/comic-neue/ComicNeue-LightItalic.otf",
    )),
    "fonts-dkg-handwriting": ("hand", (
        "truetype/fifthhorseman/dkg.ttf",
        "truetype/fifthhorseman/dkgBd.ttf",
        "truetype/fifthhorseman/dkgIt.ttf",
        "truetype/fifthhorseman/dkgBI.ttf",
    )),
    "fonts-ecolier-court": ("hand", ("truetype/ecolier-court/Ecolier-court.ttf",)),
    "fonts-humor-sans": ("hand", ("truetype/humor-sans/Humor-Sans.ttf",)),
    "fonts-kiloji": ("hand", (
        "truetype/kiloji/kiloji.ttf",
        "truetype/kiloji/kiloji_b.ttf",
        "truetype/kiloji/kiloji_d.ttf",
        "truetype/kiloji/kiloji_p.ttf",
    )),
    "fonts-kristi": ("hand", ("truetype/kristi/Kristi.ttf",)),
    "fonts-rufscript": ("hand", ("truetype/rufscript/Rufscript010.ttf",)),
    "fonts-seto": ("hand", ("truetype/seto/setofont.ttf",)),
    "fonts-sjfonts": ("hand", ("truetype/sjfonts/Delphine.ttf", "truetype/sjfonts/SteveHand.ttf")),
    "fonts-tlwg-purisa-ttf": ("hand", (
        "truetype/tlwg/Purisa.ttf",
        "truetype/tlwg/Purisa-Bold.ttf",
        "truetype/tlwg/Purisa-Oblique.ttf",
        "truetype/tlwg/Purisa-BoldOblique.ttf",
    )),
    "fonts-tomsontalks": ("hand", ("truetype/tomsontalks/TomsonTalks.ttf",)),
    "fonts-yusei-magic": ("hand", ("truetype/yusei-magic/YuseiMagic-Regular.ttf",)),
    "fonts-gnutypewriter": ("mono", ("truetype/gnutypewriter/GNUTypewriter.ttf",)),
    # script
    "fonts-dancingscript": ("script", (
        "opentype/dancingscript/DancingScript-Regular.otf",
        "opentype/dancingscript/DancingScript-Bold.otf",
    )),
    "fonts-kaushanscript": ("script", ("opentype/kaushanscript/KaushanScript-Regular.otf",)),
    "fonts-lobster": ("script", ("opentype/lobster/lobster.otf",)),
    "fonts-leckerli-one": ("script", ("truetype/leckerli-one/LeckerliOne-Regular.ttf",)),
    "fonts-isabella": ("script", ("truetype/isabella/Isabella.ttf",)),
    "fonts-havana": ("script", ("opentype/havana/Havana-Regular.otf",)),
    # typeset: sans, serif, mono
    "fonts-dejavu-core": ("sans", (
        "truetype/dejavu/DejaVuSans.ttf",
        "truetype/dejavu/DejaVuSans-Bold.ttf",
        "truetype/dejavu/DejaVuSerif.ttf",
        "truetype/dejavu/DejaVuSerif-Bold.ttf",
    )),
    "fonts-liberation2": ("sans", (
        "truetype/liberation2/LiberationSans-Regular.ttf",
        "truetype/liberation2/LiberationSans-Bold.ttf",
        "truetype/liberation2/LiberationSans-Italic.ttf",
        "truetype/liberation2/LiberationSerif-Regular.ttf",
        "truetype/liberation2/LiberationSerif-Bold.ttf",
        "truetype/liberation2/LiberationSerif-Italic.ttf",
    )),
    "fonts-open-sans": ("sans", (
        "truetype/open-sans/OpenSans-Regular.ttf",
        "truetype/open-sans/OpenSans-Bold.ttf",
        "truetype/open-sans/OpenSans-Light.ttf",
        "truetype/open-sans/OpenSans-CondBold.ttf",
        "truetype/open-sans/OpenSans-Italic.ttf",
    )),
    "fonts-cantarell": ("sans", (
        "opentype/cantarell/Cantarell-Regular.otf",
        "opentype/cantarell/Cantarell-Bold.otf",
        "opentype/cantarell/Cantarell-Thin.otf",
    )),
    "fonts-comfortaa": ("sans", (
        "truetype/comfortaa/Comfortaa-Regular.ttf",
        "truetype/comfortaa/Comfortaa-Bold.ttf",
    )),
    "fonts-freefont-ttf": ("serif", (
        "truetype/freefont/FreeSans.ttf",
        "truetype/freefont/FreeSansBoldOblique.ttf",
        "truetype/freefont/FreeSerif.ttf",
        "truetype/freefont/FreeSerifBold.ttf",
        "truetype/freefont/FreeMono.ttf",
        "truetype/freefont/FreeMonoBold.ttf",
    )),
    "fonts-urw-base35": ("serif", (
        "opentype/urw-base35/C059-Roman.otf",
        "opentype/urw-base35/C059-Italic.otf",
        "opentype/urw-base35/P052-Roman.otf",
        "opentype/urw-base35/P052-Bold.otf",
        "opentype/urw-base35/URWBookman-Light.otf",
        "opentype/urw-base35/URWBookman-DemiItalic.otf",
        "opentype/urw-base35/URWGothic-Book.otf",
        "opentype/urw-base35/URWGothic-Demi.otf",
        "opentype/urw-base35/NimbusSansNarrow-Regular.otf",
        "opentype/urw-base35/NimbusSansNarrow-BoldOblique.otf",
        "opentype/urw-base35/NimbusMonoPS-Regular.otf",
        "opentype/urw-base35/NimbusMonoPS-Bold.otf",
        "opentype/urw-base35/Z003-MediumItalic.otf",
    )),
    "fonts-ebgaramond": ("serif", (
        "opentype/ebgaramond/EBGaramond12-Regular.otf",
        "opentype/ebgaramond/EBGaramond12-Italic.otf",
    )),
}

# Whole packages (families) are held out, so no face of a held-out family is seen while
# tuning: handwriting, script and typeset families alike.
HOLDOUT_PACKAGES = frozenset({
    "fonts-dkg-handwriting",
    "fonts-sjfonts",
    "fonts-tomsontalks",
    "fonts-humor-sans",
    "fonts-kaushanscript",
    "fonts-havana",
    "fonts-comfortaa",
    "fonts-cantarell",
    "fonts-freefont-ttf",
})


@dataclass(frozen=True)
class FontSpec:
    path: str  # relative to FONT_ROOT
    package: str  # the Debian package that installs it
    style: str  # hand | script | sans | serif | mono
    subset: str  # tune | holdout


FONTS: tuple[FontSpec, ...] = tuple(
    sorted(
        (
            FontSpec(path, package, style, "holdout" if package in HOLDOUT_PACKAGES else "tune")
            for package, (style, paths) in _TABLE.items()
            for path in paths
        ),
        key=lambda spec: spec.path,
    )
)
PACKAGES: tuple[str, ...] = tuple(sorted(_TABLE))


class ProxyUnavailable(RuntimeError):
    """The proxy set cannot be built here (its fonts are not installed); the message says how to fix it."""

    def __init__(self, message: str, missing_packages: Sequence[str] = ()):
        super().__init__(message)
        self.missing_packages = tuple(missing_packages)


def font_specs(subset: str = "all") -> list[FontSpec]:
    """The font table for a subset, in a fixed (sorted by path) order."""
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    return [spec for spec in FONTS if subset == "all" or spec.subset == subset]


def find_fonts(subset: str = "all", root: Path | str = FONT_ROOT) -> list[Path]:
    """Absolute paths of the subset's font files; ProxyUnavailable naming the packages if any is missing.

    All-or-nothing on purpose: a set built from only some of the fonts would give numbers
    that cannot be compared with anyone else's.
    """
    root = Path(root)
    specs = font_specs(subset)
    missing = [spec for spec in specs if not (root / spec.path).is_file()]
    if missing:
        packages = sorted({spec.package for spec in missing})
        raise ProxyUnavailable(
            f"the proxy test set needs {len(missing)} font file(s) under {root} that are not installed, "
            f"from the Debian package(s): {' '.join(packages)} (first missing: {root / missing[0].path}). "
            f"Install them with: {INSTALL_HINT}",
            packages,
        )
    return [root / spec.path for spec in specs]


def font_name(path: Path | str, root: Path | str = FONT_ROOT) -> str:
    """A font's name as recorded per image: its path relative to the font root when under it."""
    p, r = Path(path), Path(root)
    try:
        return p.relative_to(r).as_posix()
    except ValueError:
        return p.as_posix()


# ---------------------------------------------------------------------------------------
# Rendering

GLYPH_SIZE = 80  # font size (px) the glyph is rendered at before the random affine map
_MAX_LOST = 0.03  # thinning may erase at most this fraction of a glyph's ink (hairlines)


@lru_cache(maxsize=256)
def _font(path: str) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(path, GLYPH_SIZE)
    except OSError as exc:
        raise ProxyUnavailable(f"cannot load font {path}: {exc}. Reinstall with: {INSTALL_HINT}") from None


def _crop_to_ink(a: np.ndarray, margin: int) -> np.ndarray:
    rows = np.flatnonzero(a.max(axis=1) > 127)
    cols = np.flatnonzero(a.max(axis=0) > 127)
    if rows.size == 0:
        return a[:0, :0]
    return a[max(rows[0] - margin, 0) : rows[-1] + margin + 1, max(cols[0] - margin, 0) : cols[-1] + margin + 1]


def _render_glyph(path: str, digit: int) -> np.ndarray:
    """The digit's coverage (uint8, 255 = ink) as the font draws it, cropped to its ink plus 2 px."""
    font = _font(path)
    text = str(digit)
    left, top, right, bottom = font.getbbox(text)
    pad = 4
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, font=font, fill=255)
    a = _crop_to_ink(np.asarray(img), 2)
    if a.size == 0:
        raise ProxyUnavailable(f"font {path} renders no ink for the digit {digit}")
    return a


def _morph(a: np.ndarray, steps: int, grow: bool) -> np.ndarray:
    """Grey-level dilation (grow) or erosion by `steps` px per side.

    Steps alternate a 4-neighbour cross and a 3x3 square, an octagon close to a round pen,
    so thickened strokes keep round ends rather than square ones.
    """
    op = np.maximum if grow else np.minimum
    m = steps + 1 if grow else 1  # a zero ring that ink never reaches
    out = np.pad(a, m)
    for k in range(steps):
        c = out[1:-1, 1:-1]
        res = op(op(out[:-2, 1:-1], out[2:, 1:-1]), op(out[1:-1, :-2], out[1:-1, 2:]))
        if k % 2 == 1:
            res = op(op(res, op(out[:-2, :-2], out[:-2, 2:])), op(out[2:, :-2], out[2:, 2:]))
        out[1:-1, 1:-1] = op(c, res)
    out = out[1:-1, 1:-1]
    return out


@lru_cache(maxsize=1024)
def _glyph(path: str, digit: int) -> np.ndarray:
    """The digit as the font draws it (uint8 coverage, read-only); cached."""
    a = _render_glyph(path, digit)
    a.setflags(write=False)
    return a


def _thickness(cov: np.ndarray) -> float:
    """Mean stroke width in pixels of a uint8 coverage image, estimated as 2 * area / boundary length."""
    m = cov > 127
    area = int(m.sum())
    if area == 0:
        return 0.0
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    boundary = max(int((m & ~inner).sum()), 1)
    return 2.0 * area / boundary


@lru_cache(maxsize=1024)
def _base_thickness(path: str, digit: int) -> float:
    return _thickness(_glyph(path, digit))


def _thinned(path: str, digit: int, steps: int) -> np.ndarray:
    """The glyph eroded by up to `steps` px per side, fewer if more would erase thin parts.

    A step is kept only if opening (erode then dilate by as much) loses at most _MAX_LOST
    of the ink: a hairline that erosion would erase shows up as ink the opening lost.
    (Opening by a larger pen only removes more, so the first failing step ends the search.)
    """
    base = _glyph(path, digit)
    ink = base > 127
    area = max(int(ink.sum()), 1)
    kept = base
    for n in range(1, steps + 1):
        eroded = _morph(base, n, grow=False)
        opened = _morph(eroded, n, grow=True)[n:-n, n:-n]
        if int((ink & (opened < 128)).sum()) > _MAX_LOST * area:
            break
        kept = eroded
    return kept


@lru_cache(maxsize=2048)
def _variant(path: str, digit: int, stroke: int, steps: int) -> tuple[Image.Image, float]:
    """The glyph thickened by `stroke` px or thinned by up to `steps` px per side, and its stroke width; cached."""
    if steps > 0:
        a = _thinned(path, digit, steps)
    elif stroke > 0:
        a = _morph(_glyph(path, digit), stroke, grow=True)
    else:
        a = _glyph(path, digit)
    return Image.fromarray(np.ascontiguousarray(a)), _thickness(a)


def _styled_glyph(path: str, digit: int, rel_width: float) -> tuple[Image.Image, float]:
    """The glyph with its strokes thickened or thinned towards rel_width * glyph height."""
    height = float(_glyph(path, digit).shape[0] - 4)
    current = _base_thickness(path, digit)
    delta = rel_width * height - current
    if delta >= 1.0:
        return _variant(path, digit, int(round(delta / 2.0)), 0)
    steps = min(int(round(-delta / 2.0)), int((current - 2.5) // 2))  # keep >= ~2.5 px strokes
    return _variant(path, digit, 0, max(steps, 0))


@lru_cache(maxsize=4096)
def _moments(path: str, digit: int) -> np.ndarray:
    """The 2x2 (x, y) covariance of the glyph's ink, image coordinates (y down)."""
    a = _glyph(path, digit).astype(np.float64)
    ys, xs = np.indices(a.shape, dtype=np.float64)
    w = a.sum()
    dx, dy = xs - (xs * a).sum() / w, ys - (ys * a).sum() / w
    sxx, syy, sxy = (dx * dx * a).sum() / w, (dy * dy * a).sum() / w, (dx * dy * a).sum() / w
    m = np.array([[sxx, sxy], [sxy, syy]])
    m.setflags(write=False)
    return m


# Lean = how far the ink's top sits right of its bottom per unit of height, from the second
# moments (the skew MNIST-style deskewing measures). The shear is chosen so the drawn digit's
# total lean (font + rotation + shear) stays in this range: italic faces are not slanted further.
MIN_LEAN, MAX_LEAN = -0.4, 0.55


def render_digit(digit: int, font_path: Path | str, rng: np.random.Generator) -> np.ndarray:
    """One raw render: float32 gray [H, W] in 0..255, either polarity, not normalised.

    Random: canvas side (64-128 px), stroke width, slant, rotation, size, aspect,
    position, blur, noise, background gradient, polarity, and sometimes a JPEG round trip.
    The same rng state gives the same pixels.
    """
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    path, digit = str(font_path), int(digit)
    side = int(rng.integers(64, 129))
    height_frac = float(rng.uniform(0.35, 0.85))
    # Stroke width relative to the digit's height (MNIST: ~0.1-0.2), and at least ~1.8 px
    # on the canvas so thin faces drawn small stay solid lines rather than grey hairlines.
    low = min(max(0.05, 1.8 / (height_frac * side)), 0.2)
    src, thickness = _styled_glyph(path, digit, float(rng.uniform(low, 0.22)))
    gw, gh = src.size

    # Forward map glyph -> canvas, about the glyph centre: shear . rotation . aspect, then scale.
    angle = np.deg2rad(rng.uniform(-12.0, 12.0))
    aspect = float(np.exp(rng.uniform(-0.3, 0.3)))
    c, s = np.cos(angle), np.sin(angle)
    turn = np.array([[c, -s], [s, c]]) @ np.diag([aspect, 1.0])
    cov = turn @ _moments(path, digit) @ turn.T
    lean = -cov[0, 1] / cov[1, 1]
    # Shearing last adds its factor to the lean exactly. > 0: top to the right.
    shear = float(np.clip(rng.uniform(-0.35, 0.35), MIN_LEAN - lean, MAX_LEAN - lean))
    lin = np.array([[1.0, -shear], [0.0, 1.0]]) @ turn
    corners = np.array([[-gw / 2, -gh / 2], [gw / 2, -gh / 2], [-gw / 2, gh / 2], [gw / 2, gh / 2]]).T
    ext = lin @ corners
    span = ext.max(axis=1) - ext.min(axis=1)  # (x, y) extent at scale 1
    scale = float(min(height_frac * side / gh, 0.92 * side / span[0], 0.92 * side / span[1]))
    fwd = scale * lin
    room = np.maximum(side - scale * span, 0.0) / 2.0
    centre = side / 2.0 + rng.uniform(-1.0, 1.0, size=2) * room * 0.9
    inv = np.linalg.inv(fwd)
    offset = np.array([gw / 2.0, gh / 2.0]) - inv @ centre
    coeffs = tuple(float(v) for v in (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]))
    cov_img = src.transform((side, side), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)

    # Blur: up to ~0.7 px in the final 20-px box, and at most about a third of the
    # stroke width, so thin strokes soften rather than vanish.
    stroke_px = thickness * scale
    blur = float(rng.uniform(0.0, 1.0)) * min(0.035 * scale * gh, 0.35 * stroke_px)
    if blur > 0.3:
        cov_img = cov_img.filter(ImageFilter.GaussianBlur(blur))
    cov = np.asarray(cov_img, dtype=np.float32) / 255.0

    # Ink and paper levels (dark ink on light paper); inverted below half the time.
    paper = float(rng.uniform(170.0, 250.0))
    ink = float(rng.uniform(5.0, min(90.0, paper - 90.0)))
    contrast = paper - ink
    gray = paper - contrast * cov
    # A smooth illumination gradient (<= 5.7%) and truncated sensor noise (<= 11%) of the
    # ink's actual peak: together under the normaliser's 20% crop threshold, so they never
    # move its crop.
    visible = contrast * float(cov.max())
    g = float(rng.uniform(0.0, 0.04)) * visible
    theta = float(rng.uniform(0.0, 2.0 * np.pi))
    ramp = np.linspace(-g, g, side, dtype=np.float32)
    gray += np.cos(theta) * ramp[None, :] + np.sin(theta) * ramp[:, None]
    sigma = float(rng.uniform(0.0, 0.044)) * visible
    if sigma > 0.5:
        noise = rng.standard_normal((side, side), dtype=np.float32) * sigma
        gray += np.clip(noise, -2.5 * sigma, 2.5 * sigma)
    if rng.random() < 0.5:
        gray = 255.0 - gray  # light ink on a dark background
    out = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    if rng.random() < 0.25:
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------
# The set


def _font_order(n_fonts: int, n: int, seed: int, digit: int) -> np.ndarray:
    """Which font each of a digit's n images uses: whole shuffled passes over the fonts."""
    rng = np.random.default_rng([seed, 1_000_003, digit])
    passes = -(-n // n_fonts)
    return np.concatenate([rng.permutation(n_fonts) for _ in range(passes)])[:n]


def _render_jobs(jobs: Sequence[tuple[int, int, str]], seed: int, raw: bool, version: int = NORMALISER_VERSION) -> list[np.ndarray]:
    """Render (index, digit, font file) jobs; each image's generator is seeded by (seed, digit, index)."""
    out: list[np.ndarray] = []
    for i, d, path in jobs:
        gray = render_digit(d, path, np.random.default_rng([seed, d, i]))
        if raw:
            out.append(gray)
            continue
        try:
            out.append(normalize(gray, version))
        except ImageError as exc:  # a bug in the renderer, never expected
            raise RuntimeError(
                f"proxy image {i} of digit {d} from {font_name(path)} (seed {seed}) did not normalise: {exc}"
            ) from exc
    return out


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def build_proxy_set(
    n_per_digit: int = 300,
    seed: int = 0,
    fonts: list[Path] | None = None,
    subset: str = "all",
    *,
    raw: bool = False,
    workers: int | None = None,
    version: int = NORMALISER_VERSION,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render and normalise n_per_digit images of each digit.

    Returns (images uint8 [N,28,28], labels uint8 [N], font_names list[str] of length N),
    N = 10 * n_per_digit, ordered index-major (digits 0-9, then 0-9 again, ...) so any
    prefix of a multiple of 10 images is balanced. font_names[i] is the file image i was
    rendered from, relative to /usr/share/fonts. Fonts are used in whole shuffled passes,
    so per digit every font appears n_per_digit / n_fonts times, give or take one.

    `subset` picks the built-in fonts: "all", "tune" (for choosing augmentation and width)
    or "holdout" (for reporting; its font families never appear in "tune"). `fonts`
    replaces the built-in list (then `subset` must stay "all"). With raw=True the images are
    the un-normalised renders (a list of float32 arrays of varying size) instead.
    `version` is the imaging normaliser version applied (the current one unless measuring another).
    `workers` processes render in parallel (default: one per 1000 images, at most the CPUs
    available and 8); the result does not depend on it: the same arguments give the same bytes.
    """
    if n_per_digit < 1:
        raise ValueError(f"n_per_digit must be at least 1, got {n_per_digit}")
    if fonts is None:
        font_paths = find_fonts(subset)
    else:
        if subset != "all":
            raise ValueError("pass either an explicit font list or a subset, not both")
        font_paths = [Path(f) for f in fonts]
        if not font_paths:
            raise ValueError("the font list is empty")
        absent = [str(f) for f in font_paths if not f.is_file()]
        if absent:
            raise ProxyUnavailable(f"font file(s) not found: {', '.join(absent)}. Install with: {INSTALL_HINT}")
    orders = [_font_order(len(font_paths), n_per_digit, seed, d) for d in range(10)]
    jobs = [(i, d, str(font_paths[int(orders[d][i])])) for i in range(n_per_digit) for d in range(10)]
    labels = np.array([d for _, d, _ in jobs], dtype=np.uint8)
    names = [font_name(path) for _, _, path in jobs]

    if workers is None:  # a spawned process costs ~0.5 s to start: only worth it for big sets
        n_workers = min(default_workers(), max(1, len(jobs) // 1000))
    else:
        n_workers = min(max(1, int(workers)), len(jobs))
    if n_workers == 1:
        images = _render_jobs(jobs, seed, raw, version)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # Contiguous chunks, a few per worker, so results come back in order.
        n_chunks = 4 * n_workers
        bounds = np.linspace(0, len(jobs), n_chunks + 1).astype(int)
        chunks = [jobs[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        # spawn, not fork: the caller may hold threads (torch, gRPC) that fork would copy broken.
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
            images = [
                img
                for part in pool.map(_render_jobs, chunks, [seed] * len(chunks), [raw] * len(chunks), [version] * len(chunks))
                for img in part
            ]
    if raw:
        return images, labels, names  # type: ignore[return-value]
    return np.stack(images), labels, names


# ---------------------------------------------------------------------------------------
# Contact sheets and CLI


def contact_sheet(images: Sequence[np.ndarray], labels: np.ndarray, per_digit: int = 30, cell: int = 56) -> Image.Image:
    """A grid: one row per digit (0 at the top), the first per_digit images of it, each scaled to cell px.

    Works for normalised 28x28 images and for raw renders of any size (scaled to fit).
    """
    gap = 2
    margin = 20
    width = margin + per_digit * (cell + gap)
    height = 10 * (cell + gap)
    sheet = Image.new("L", (width, height), 96)
    draw = ImageDraw.Draw(sheet)
    labels = np.asarray(labels)
    for d in range(10):
        idx = np.flatnonzero(labels == d)[:per_digit]
        y = d * (cell + gap)
        draw.text((4, y + cell // 2 - 6), str(d), fill=255)
        for j, k in enumerate(idx):
            img = Image.fromarray(np.clip(np.asarray(images[k]), 0, 255).astype(np.uint8))
            resample = Image.Resampling.NEAREST if img.size[0] <= cell else Image.Resampling.BILINEAR
            sheet.paste(img.resize((cell, cell), resample), (margin + j * (cell + gap), y))
    return sheet


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mnist_edge.training.proxy",
        description="Render the font-based proxy test set (digits from Debian fonts) as MNIST-style IDX files.",
    )
    parser.add_argument("--out", required=True, type=Path, help="directory to write into (created if absent)")
    parser.add_argument("--n-per-digit", type=int, default=300, help="images per digit (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--subset", choices=SUBSETS, default="all",
                        help="all fonts, the tuning fonts or the held-out fonts (default all)")
    parser.add_argument("--sheet-columns", type=int, default=30, help="samples per digit on the contact sheets")
    args = parser.parse_args(argv)

    try:
        start = time.perf_counter()
        images, labels, names = build_proxy_set(args.n_per_digit, args.seed, subset=args.subset)
        elapsed = time.perf_counter() - start
        cols = max(1, min(args.sheet_columns, args.n_per_digit))
        raw, raw_labels, _ = build_proxy_set(cols, args.seed, subset=args.subset, raw=True)
    except ProxyUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"proxy-{args.subset}"
    files = {
        f"{prefix}-images-idx3-ubyte": encode_idx(images),
        f"{prefix}-labels-idx1-ubyte": encode_idx(labels),
        f"{prefix}-fonts.txt": ("\n".join(names) + "\n").encode(),
        f"{prefix}-contact.png": _png_bytes(contact_sheet(images, labels, cols)),
        f"{prefix}-raw.png": _png_bytes(contact_sheet(raw, raw_labels, cols, cell=64)),
    }
    info = {
        "subset": args.subset,
        "seed": args.seed,
        "n_per_digit": args.n_per_digit,
        "images": int(images.shape[0]),
        "fonts": sorted(set(names)),
        "packages": sorted({s.package for s in font_specs(args.subset)}),
    }
    files[f"{prefix}.json"] = (json.dumps(info, indent=2) + "\n").encode()
    for name, data in files.items():
        _write_atomic(out / name, data)
    print(
        f"wrote {images.shape[0]} images from {len(info['fonts'])} font files "
        f"({args.subset}, seed {args.seed}) to {out} in {elapsed:.1f}s; look at {out / (prefix + '-contact.png')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
