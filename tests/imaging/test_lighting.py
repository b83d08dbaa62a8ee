"""Normaliser version 2: uneven lighting (a shadow, a vignette, a gradient) is taken out; even lighting is left alone."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mnist_edge.imaging import normalize as nz


def _four_on_paper(size: int = 160) -> np.ndarray:
    """An open 4 in dark ink on evenly lit light paper (float gray)."""
    img = Image.new("L", (size, size), 225)
    d = ImageDraw.Draw(img)
    s = size
    d.line([(0.38 * s, 0.25 * s), (0.34 * s, 0.58 * s), (0.68 * s, 0.58 * s)], fill=40, width=s // 18)
    d.line([(0.6 * s, 0.3 * s), (0.6 * s, 0.78 * s)], fill=40, width=s // 18)
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.2)), dtype=np.float32)


def test_a_shadow_across_the_paper_is_taken_out():
    even = _four_on_paper()
    yy, xx = np.mgrid[0:160, 0:160] / 160.0
    light = 1.0 - 0.2 * np.clip(xx + yy - 0.5, 0, None)  # a shadow over the bottom-right corner
    shaded = even * light
    want = nz.normalize(even).astype(int)
    got = nz.normalize(shaded).astype(int)
    assert np.abs(got - want).mean() < 4
    # Without the correction the shadow is taken for ink: the crop grows and the digit shrinks.
    original = nz._uneven_background
    try:
        nz._uneven_background = lambda ink: 0.0
        assert np.abs(nz.normalize(shaded).astype(int) - want).mean() > 8
    finally:
        nz._uneven_background = original


def test_even_lighting_and_mnist_pictures_are_left_alone(mnist):
    from mnist_edge.training.evaluate import picture_variants

    for variant in picture_variants(mnist.test.images[:50]).values():
        for pic in variant:
            a = np.asarray(pic, dtype=np.float32)
            border = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]))
            ink = (255.0 - a if border > 127.5 else a) - min(border, 255 - border)
            assert np.isscalar(nz._uneven_background(ink))
