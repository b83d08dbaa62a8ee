"""Picture-path training data: synthetic handwriting plus MNIST re-sent as pictures, cached exactly."""

from __future__ import annotations

import numpy as np

from mnist_edge.imaging.normalize import NORMALISER_VERSION
from mnist_edge.training.pictures import picture_training_set


def test_cached_copy_is_exactly_a_rebuild(tmp_path, mnist):
    args = dict(handwriting_per_digit=2, mnist_pictures=30, seed=3, version=NORMALISER_VERSION, data_sha256=mnist.sha256)
    x = mnist.train.images[:200]
    y = mnist.train.labels[:200]
    fresh, fresh_y, counts = picture_training_set(x, y, **args)
    assert counts == {"handwriting": 20, "mnist_pictures": 30} and fresh.shape == (50, 28, 28)
    first, _, _ = picture_training_set(x, y, cache=tmp_path, **args)
    assert len(list(tmp_path.glob("pictures-*.npz"))) == 1
    cached, cached_y, _ = picture_training_set(x, y, cache=tmp_path, **args)
    np.testing.assert_array_equal(first, fresh)
    np.testing.assert_array_equal(cached, fresh)
    np.testing.assert_array_equal(cached_y, fresh_y)
    # MNIST pictures keep their labels; another seed gives other pictures.
    assert set(fresh_y[20:].tolist()) <= set(y.tolist())
    other, _, _ = picture_training_set(x, y, **{**args, "seed": 4})
    assert not np.array_equal(other, fresh)
