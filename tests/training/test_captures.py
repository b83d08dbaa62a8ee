"""training/captures.py: labelled captures (as the server writes them and `mnist-edge label`
saves their labels) read back as training data, with a stable held-out part."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.digits import digit_pngs
from mnist_edge.client.label import find_captures, write_labels
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.server import capture
from mnist_edge.training import captures


class _Model:
    name, version, precision, sha256 = "mnist", "1", "int8", "0" * 64


class _Result:
    def __init__(self) -> None:
        self.probabilities = np.full((1, 10), 0.1, np.float32)
        self.digits, self.tag = np.zeros(1, np.int64), _Model()


@pytest.fixture
def labelled(tmp_path):
    """30 captures written by the server's writer, labelled: 28 digits, one "x", one unlabelled."""
    root = tmp_path / "site-a"
    c = capture.Capture(str(root), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=False, max_image_bytes=1 << 20)
    truth = digit_pngs()
    try:
        for _, png in truth:
            c.offer("native", "", _Result(), normalize_encoded(png)[None], None, lambda name: None)
        assert c.flush(20)
    finally:
        c.close()
    found = find_captures(root)
    assert len(found) == len(truth)
    labels = {cap.file: str(digit) for cap, (digit, _) in zip(found, truth)}
    labels[found[0].file] = "x"
    del labels[found[1].file]
    write_labels(root, labels)
    return root, found, truth


def test_only_digit_labels_are_read_with_the_images_the_model_saw(labelled):
    root, found, truth = labelled
    train, held = captures.load([root], held_out=0.2)
    assert len(train) + len(held) == len(truth) - 2
    everything = {f: (img, lab) for s in (train, held) for f, img, lab in zip(s.files, s.images, s.labels)}
    for cap, (digit, png) in list(zip(found, truth))[2:]:
        image, label = everything[f"{root.name}/{cap.file}"]
        assert label == digit
        assert np.array_equal(image, normalize_encoded(png))


def test_the_held_out_part_is_stable_and_never_trained_on(labelled):
    root, _, _ = labelled
    train1, held1 = captures.load([root], held_out=0.3)
    train2, held2 = captures.load([root], held_out=0.3)
    assert held1.files == held2.files and train1.files == train2.files
    assert not set(held1.files) & set(train1.files)
    assert 0 < len(held1) < len(held1) + len(train1)
    # More captures later never move an existing one between the parts: the split is by name.
    for f in held1.files:
        assert captures.is_held_out(f.rsplit("/", 1)[1], 0.3)


def test_mix_gives_the_captures_their_share_and_keeps_all_of_mnist(labelled):
    root, _, _ = labelled
    train, _ = captures.load([root], held_out=0.2)
    mnist_x = np.zeros((1000, 28, 28), np.uint8)
    mnist_y = np.arange(1000, dtype=np.uint8) % 10
    x, y = captures.mix(mnist_x, mnist_y, train, share=0.1)
    assert np.array_equal(x[:1000], mnist_x) and np.array_equal(y[:1000], mnist_y)
    extra = len(y) - 1000
    assert extra % len(train) == 0 and 0.09 <= extra / len(y) <= 0.2


def test_a_folder_never_labelled_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="mnist-edge label"):
        captures.load([tmp_path])
