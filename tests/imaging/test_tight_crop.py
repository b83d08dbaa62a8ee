"""Normaliser version 3: a picture cut tight to its digit (no paper around it, a form reader's
cell) keeps its polarity and its strokes; a picture with paper around the digit comes out as in
version 2."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from mnist_edge.imaging import normalize as nz


def _thick_zero(size: int = 16, margin: int = 0) -> np.ndarray:
    """A 0 drawn with a marker (a quarter of its height), filling its box, dark on light paper,
    cut to the ink (margin 0) as a low-resolution form scan is."""
    ss = 8
    img = Image.new("L", ((size + 2 * margin) * ss,) * 2, 235)
    d = ImageDraw.Draw(img)
    w = size * ss // 4
    m = margin * ss
    # A 0 stretched to fill its box comes out squarish; PIL draws the width inwards.
    d.rounded_rectangle([m, m, m + size * ss - 1, m + size * ss - 1], radius=int(size * ss * 0.33), outline=30, width=w)
    return np.asarray(img.resize(((size + 2 * margin),) * 2, Image.Resampling.BOX), dtype=np.float32)


def test_a_digit_cut_to_its_ink_keeps_its_polarity():
    tight = _thick_zero(margin=0)
    border = np.concatenate([tight[0], tight[-1], tight[:, 0], tight[:, -1]])
    assert np.median(border) < 127.5  # most of the border is ink: version 2 took it for background
    with_paper = nz.normalize(_thick_zero(margin=4), 3).astype(int)
    v3 = nz.normalize(tight, 3).astype(int)
    v2 = nz.normalize(tight, 2).astype(int)
    assert v3[14, 14] < 64 and v3.max() == 255  # the hole of the 0 is background, the ring is ink
    assert np.abs(v3 - with_paper).mean() < np.abs(v2 - with_paper).mean() / 2


def test_lighting_is_left_alone_in_a_tight_crop():
    tight = _thick_zero(margin=0)
    ink = 255.0 - tight - 20.0
    assert nz._tight_crop(ink)
    assert not nz._tight_crop(255.0 - _thick_zero(margin=4) - 20.0)


def test_pictures_with_paper_around_the_digit_are_as_in_version_2(mnist):
    from mnist_edge.training.evaluate import picture_variants

    for name, pics in picture_variants(mnist.test.images[:100]).items():
        for p in pics:
            np.testing.assert_array_equal(nz.normalize(p, 3), nz.normalize(p, 2), err_msg=name)


def test_version_2_stays_available_for_measuring_older_models():
    assert 2 in nz.SUPPORTED_VERSIONS and nz.NORMALISER_VERSION == 3
