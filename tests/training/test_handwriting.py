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


def test_a_form_scan_is_small_thick_and_often_stretched_to_a_square():
    raw, labels, _ = handwriting.build(20, "tune", seed=3, raw=True, capture="scan")
    ones = [p for p, d in zip(raw, labels) if d == 1]
    # Every 1 is drawn in a 10-20 px box (plus 1-4 px of paper), shown 1-6x larger.
    square = sum(abs(p.shape[0] - p.shape[1]) <= max(p.shape) // 6 for p in ones)
    assert square >= len(ones) // 4, "stretching to fill the box makes many 1s as wide as they are tall"
    blocky = sum(len(np.unique(p)) <= 2 for p in raw)
    assert blocky >= len(raw) // 5, "about half the scans are one bit per pixel"
    for p in raw:
        assert float(np.median(np.concatenate([p[0], p[-1], p[:, 0], p[:, -1]]))) > 127  # dark ink on light paper


def test_capture_can_be_named_and_is_checked():
    camera, _, _ = handwriting.build(3, "tune", seed=4, capture="camera")
    scan, _, _ = handwriting.build(3, "tune", seed=4, capture="scan")
    assert not np.array_equal(camera, scan)
    with pytest.raises(ValueError, match="capture must be one of camera, scan"):
        handwriting.build(1, "tune", capture="fax")


def test_extra_pictures_of_some_digits_come_from_further_writers():
    base, base_labels, _ = handwriting.build(2, "train", seed=0)
    more, labels, styles = handwriting.build(2, "train", seed=0, extra={1: 3, 7: 1})
    np.testing.assert_array_equal(more[:20], base)  # the balanced set is unchanged, the extras follow it
    assert labels[20:].tolist() == [1, 1, 1, 7] and np.bincount(labels, minlength=10)[[1, 7]].tolist() == [5, 3]
    assert all(s.startswith(f"{d}:") for s, d in zip(styles, labels))
    assert not any(np.array_equal(more[20], b) for b in base)


def test_extra_is_written_as_digit_count_pairs():
    pytest.importorskip("torch")
    from mnist_edge.training.train import parse_extra

    assert parse_extra("1:3000,7:1500") == {1: 3000, 7: 1500} and parse_extra("") == {}
    for bad in ("1=3000", "10:5", "1:-1", "one:2"):
        with pytest.raises(Exception, match="digit"):
            parse_extra(bad)
