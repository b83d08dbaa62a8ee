"""Synthetic handwriting: reproducible, balanced, every style drawn, held-out styles never trained on."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_edge.training import handwriting


def test_same_arguments_same_bytes_and_workers_do_not_matter():
    a, la, sa = handwriting.build(3, "tune", seed=4)
    b, lb, sb = handwriting.build(3, "tune", seed=4)
    c, _, _ = handwriting.build(3, "tune", seed=5)
    np.testing.assert_array_equal(a, b)
    assert sa == sb and (la == lb).all()
    assert not np.array_equal(a, c)
    big, _, _ = handwriting.build(30, "tune", seed=4, workers=2)
    np.testing.assert_array_equal(big[:30], a)  # index-major: a prefix is the smaller set


def test_balanced_and_shaped_like_mnist():
    images, labels, styles = handwriting.build(4, "train", seed=0)
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    assert all(s.startswith(f"{d}:") for s, d in zip(styles, labels))
    assert 10 < images.mean() < 60  # MNIST: 33


def test_splits_differ_and_held_out_styles_stay_held_out():
    train, _, _ = handwriting.build(2, "train", seed=0)
    tune, _, _ = handwriting.build(2, "tune", seed=0)
    assert not np.array_equal(train, tune)  # other writers
    for split in ("train", "tune"):
        _, _, styles = handwriting.build(60, split, seed=1)
        assert not {tuple(s.split(":")) for s in styles} & {(str(d), n) for d, n in handwriting.HOLDOUT_STYLES}
    _, _, styles = handwriting.build(60, "holdout", seed=1)
    assert {(str(d), n) for d, n in handwriting.HOLDOUT_STYLES} <= {tuple(s.split(":")) for s in styles}


def test_the_styles_mnist_lacks_are_there():
    names = {d: set(s) for d, s in handwriting.STYLES.items()}
    assert {"flag", "flag-foot", "long-flag"} <= names[1]
    assert "crossed" in names[7] and "open" in names[4] and "straight-tail" in names[9] and "looped" in names[2]


def test_raw_pictures_look_like_captures():
    raw, labels, _ = handwriting.build(5, "holdout", seed=2, raw=True)
    sizes = {p.shape for p in raw}
    assert len(sizes) > 10  # every capture has its own size
    dark_on_light = sum(float(np.median(np.concatenate([p[0], p[-1]]))) > 127 for p in raw)
    assert dark_on_light >= 0.7 * len(raw)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="split must be one of train, tune, holdout"):
        handwriting.build(1, "test")
