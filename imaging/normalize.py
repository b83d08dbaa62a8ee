"""MNIST-style normalisation of an arbitrary digit image, and a guarded decoder.

MNIST's digits were made by fitting each scanned digit into a 20x20 box (keeping
its aspect ratio, with anti-aliasing) and centring that box in a 28x28 field by
the centre of mass of its pixels. Ink is bright (255) on a dark (0) background.
`normalize` repeats those steps for any image so that what a user's camera or
drawing pad produces looks, to the model, like what it was trained on. Training,
the server and the client all call this one function, so there is one definition
of "what the model sees".

`decode` is the only way the server turns untrusted bytes into pixels: it checks
the byte size, the format and the declared pixel count from the header before any
pixel data is decompressed, so a decompression bomb costs a header read.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as _ImageModule  # noqa: F401


def _pil():
    """Pillow, imported on first use: a server that only ever gets raw pixels never loads it
    (~2.6 MB of resident memory and ~20 ms of start-up on a device)."""
    from PIL import Image

    return Image

SIZE = 28  # side of the output field
BOX = 20  # side of the box the digit is fitted into

# What `normalize` does to a picture, versioned: a model is trained and gated for one version
# (its manifest records which) and a server serves only models made for the version it has.
# Bump it whenever a change to `normalize` changes its output. Version 1: polarity, contrast,
# crop, fit into 20x20, centre of mass (MNIST's own steps). Version 2: as 1, with uneven
# lighting (a shadow, a vignette, a gradient across a photo) taken out before the contrast
# stretch. Stroke-width normalisation was measured against these and not kept (docs/model-card.md).
# Version 3: as 2, for a picture cropped tight to its digit (a form reader's cell, a scan cut
# to the ink), where the border is partly ink: polarity is read with a lean to dark ink on light
# paper, and lighting is left alone (there is no paper around the digit to judge it by).
# Pictures with paper around the digit come out as in version 2.
NORMALISER_VERSION = 3
# Version 2 stays available to `normalize` for measuring models made for it (training.evaluate
# --normaliser 2); the server runs NORMALISER_VERSION only and refuses models made for another.
SUPPORTED_VERSIONS = (2, NORMALISER_VERSION)
DARK_ON_LIGHT_BORDER = 0.35  # v3: dark ink on light paper once this share of the border is clearly light
TIGHT_CROP_BORDER = 0.1  # v3: lighting is left alone once this share of the border is ink
BACKGROUND_GRID = 3  # the lighting is estimated on a 3x3 grid of blocks, then interpolated
BACKGROUND_PERCENTILE = 2  # a block's background: this percentile of its pixels (ink is rarer)
BACKGROUND_MIN = 0.05  # lighting that varies by less than this fraction of the ink's peak is left alone

# Formats accepted from clients, as Pillow names them (PGM is Pillow's "PPM" plugin).
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "BMP", "PPM"})

DEFAULT_MAX_IMAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


class ImageError(ValueError):
    """An image that cannot be normalised; the message says why and what was expected."""


class ImageTooLarge(ImageError):
    """An image over the byte or pixel limit, refused before its pixels were decoded."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def open_checked(data: bytes, limits: ImageLimits = ImageLimits()) -> _ImageModule.Image:
    """Open encoded image bytes lazily and check them from the header alone.

    Returns a Pillow image whose pixel data has NOT been decoded yet; raises
    ImageTooLarge or ImageError otherwise.
    """
    Image = _pil()
    if len(data) == 0:
        raise ImageError("encoded image is empty (0 bytes), expected PNG, JPEG, BMP or PGM data")
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(
            f"encoded image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes (--max-image-bytes)"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on large images by its own global limit; ours is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=sorted(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"encoded image declares too many pixels: {exc}") from None
    except Exception:
        head = data[:8]
        raise ImageError(
            f"could not read an image header from {len(data)} bytes (starting {head!r}): "
            "expected PNG, JPEG, BMP or PGM"
        ) from None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image header declares size {width}x{height}, expected a positive width and height")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image header declares {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} pixels (--max-image-pixels); refused before decoding"
        )
    return img


def decode(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Decode encoded image bytes into a float32 grayscale array in [0, 255]."""
    Image = _pil()
    img = open_checked(data, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        raise ImageError(f"{img.format} image {img.size[0]}x{img.size[1]} could not be decoded: {exc}") from None
    return to_gray(img)


def to_gray(img: _ImageModule.Image) -> np.ndarray:
    """Pillow image -> float32 luminance in [0, 255]; transparency becomes background."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        hi = float(arr.max()) if arr.size else 0.0
        return arr * (255.0 / hi) if hi > 255.0 else arr
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(img.convert("L"), dtype=np.float32)
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
    lum = np.asarray(rgba.convert("L"), dtype=np.float32)
    if alpha.min() >= 1.0:
        return lum
    # Strokes drawn on a transparent canvas: put them on a background of the opposite
    # brightness to the ink, so the polarity step sees a normal picture either way.
    weight = alpha.sum()
    ink_lum = float((lum * alpha).sum() / weight) if weight > 0 else 0.0
    bg = 255.0 if ink_lum < 128.0 else 0.0
    return lum * alpha + bg * (1.0 - alpha)


def normalize(gray: np.ndarray, version: int = NORMALISER_VERSION) -> np.ndarray:
    """Turn a grayscale digit picture (any size, any polarity) into MNIST's 28x28 uint8 form.

    Steps: detect polarity from the border (MNIST is light ink on dark), stretch the
    contrast so the background is 0 and the darkest ink is 255, crop to the ink,
    fit the crop into 20x20 keeping its aspect ratio, and place it in 28x28 so its
    centre of mass is at the centre. `version` names the version the caller expects
    (a model's); one not in SUPPORTED_VERSIONS is refused rather than approximated.
    """
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"image normaliser version {version!r} is not available here (this mnist-edge has {list(SUPPORTED_VERSIONS)})")
    a = np.asarray(gray, dtype=np.float32)
    if a.ndim == 3:
        a = a[..., :3].mean(axis=2) if a.shape[2] >= 3 else a[..., 0]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"expected a 2-D grayscale image, got shape {list(a.shape)}")
    if not np.isfinite(a).all():
        raise ImageError("image contains NaN or infinite values")
    # Grayscale is 0..255; anything outside is clipped rather than allowed to skew the stretch.
    a = np.clip(a, 0.0, 255.0)

    # Polarity: the border is mostly background. Dark-on-light pictures are inverted.
    border = np.concatenate([a[0, :], a[-1, :], a[:, 0], a[:, -1]])
    dark_on_light = float(np.median(border)) > 127.5
    bg = float(np.median(border))
    if version >= 3 and not dark_on_light:
        # A border that is mostly dark may be dark ink cut tight (a form reader's cell) rather
        # than a dark ground: when a good share of it is clearly light (near the picture's own
        # lightest level, and well apart from its darkest), that light is paper. A light digit
        # on a dark ground never covers that much of its border; noise never gets that light.
        lo, hi = np.percentile(a, [2, 98])
        light = border > lo + 0.75 * (hi - lo)
        if hi - lo >= 64 and float(light.mean()) >= DARK_ON_LIGHT_BORDER:
            dark_on_light = True
            bg = float(np.median(border[light]))
    ink = (255.0 - a) if dark_on_light else a
    bg_level = (255.0 - bg) if dark_on_light else bg

    ink = ink - bg_level
    if version < 3 or not _tight_crop(ink):
        ink = ink - _uneven_background(ink)
    peak = float(ink.max())
    if peak < 16.0:
        raise ImageError(
            f"image {a.shape[1]}x{a.shape[0]} has no visible ink: its darkest and lightest pixels "
            f"differ from the background by less than 16 of 255; expected a digit"
        )
    ink = np.clip(ink * (255.0 / peak), 0.0, 255.0)

    # Crop to the ink; a low threshold so faint anti-aliased edges stay, noise goes.
    mask = ink > 0.2 * 255.0
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:  # cannot happen after the stretch (the peak is 255), but never index an empty crop
        raise ImageError(f"image {a.shape[1]}x{a.shape[0]} has no visible ink; expected a digit")
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    # Drop the faint haze below the threshold outside strokes (JPEG ringing, paper texture).
    crop = np.where(crop > 0.1 * 255.0, crop, 0.0)

    Image = _pil()
    h, w = crop.shape
    scale = BOX / max(h, w)
    new_w = max(1, min(BOX, int(round(w * scale))))
    new_h = max(1, min(BOX, int(round(h * scale))))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    fitted = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32)).resize((new_w, new_h), resample)
    box = np.clip(np.asarray(fitted, dtype=np.float32), 0.0, 255.0)

    # Centre of mass of the fitted digit goes to the centre of the 28x28 field.
    total = float(box.sum())
    ys, xs = np.indices(box.shape, dtype=np.float64)
    cy = float((ys * box).sum() / total) if total > 0 else (new_h - 1) / 2
    cx = float((xs * box).sum() / total) if total > 0 else (new_w - 1) / 2
    top = int(round((SIZE - 1) / 2 - cy))
    left = int(round((SIZE - 1) / 2 - cx))
    # Keep the whole box inside the field (a lopsided digit could otherwise be cut).
    top = min(max(top, 0), SIZE - new_h)
    left = min(max(left, 0), SIZE - new_w)
    out = np.zeros((SIZE, SIZE), dtype=np.float32)
    out[top : top + new_h, left : left + new_w] = box
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _tight_crop(ink: np.ndarray) -> bool:
    """A picture cut to its digit: a share of its border is ink (over half the ink's peak)."""
    peak = float(ink.max())
    if peak <= 0:
        return False
    border = np.concatenate([ink[0, :], ink[-1, :], ink[:, 0], ink[:, -1]])
    return float((border > 0.5 * peak).mean()) > TIGHT_CROP_BORDER


def _uneven_background(ink: np.ndarray) -> np.ndarray | float:
    """The lighting left in the background after subtracting the border's level: a smooth map
    (0 where the picture is evenly lit, so a scan or a drawing pad's image is left as it was).

    Each block of a 3x3 grid gives its 2nd-percentile level (some of every block is paper, so
    this is the paper's level there); a block whose level is over half the ink's peak is
    taken as covered by ink, not shadow. Lighting under 5% of the peak is left alone; else
    the grid is interpolated bilinearly to full size.
    """
    h, w = ink.shape
    step = max(1, max(h, w) // 256)  # the levels of a large photo, from a strided sample
    sample = ink[::step, ::step]
    sh, sw = sample.shape
    if min(sh, sw) < BACKGROUND_GRID * 3:
        return 0.0
    ys = np.linspace(0, sh, BACKGROUND_GRID + 1).astype(int)
    xs = np.linspace(0, sw, BACKGROUND_GRID + 1).astype(int)
    grid = np.array(
        [[np.percentile(sample[ys[i] : ys[i + 1], xs[j] : xs[j + 1]], BACKGROUND_PERCENTILE) for j in range(BACKGROUND_GRID)]
         for i in range(BACKGROUND_GRID)],
        dtype=np.float32,
    )
    peak = float(ink.max())
    grid = np.where((grid > 0) & (grid < 0.5 * peak), grid, 0.0).astype(np.float32)
    if float(grid.max()) < BACKGROUND_MIN * peak:
        return 0.0
    Image = _pil()
    return np.asarray(Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def normalize_encoded(data: bytes, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, BMP, PGM) -> normalised 28x28 uint8."""
    return normalize(decode(data, limits))


def normalize_pil(img: _ImageModule.Image) -> np.ndarray:
    """A Pillow image already in memory -> normalised 28x28 uint8."""
    from PIL import ImageOps

    return normalize(to_gray(ImageOps.exif_transpose(img) or img))
