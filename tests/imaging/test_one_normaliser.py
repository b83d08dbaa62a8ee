"""One normaliser: training, the export gate and the server turn a picture into the same 28x28 image.

If any of them ever normalised differently (another function, another version, a copy of
the code), a model would be trained or gated on inputs the server never produces. Each
path below is driven with the same raw pictures and compared byte for byte with
imaging.normalize at the version the shipped model records.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from mnist_edge.imaging.normalize import NORMALISER_VERSION, normalize

REPO = Path(__file__).resolve().parents[2]
N = 3  # pictures per digit


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(a, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pictures():
    """Raw synthetic handwriting (held-out split) and the reference normalisation of each."""
    from mnist_edge.training import handwriting

    raw, labels, _ = handwriting.build(N, "holdout", seed=5, raw=True)
    return raw, labels, np.stack([normalize(p, NORMALISER_VERSION) for p in raw])


def test_only_the_current_version_is_offered():
    with pytest.raises(ValueError, match=f"version {NORMALISER_VERSION + 1} is not available here"):
        normalize(np.zeros((28, 28)), NORMALISER_VERSION + 1)


def test_everyone_is_made_for_the_current_version():
    from mnist_edge.training.train import TrainConfig

    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    assert manifest["normaliser"]["version"] == NORMALISER_VERSION
    assert TrainConfig().normaliser == NORMALISER_VERSION


def test_training_data_is_normalised_by_imaging(pictures):
    from mnist_edge.training import handwriting
    from mnist_edge.training import pictures as pic

    raw, labels, reference = pictures
    images, got_labels, _ = handwriting.build(N, "holdout", seed=5)
    np.testing.assert_array_equal(images, reference)
    np.testing.assert_array_equal(got_labels, labels)
    # MNIST images re-sent as pictures: the training copy equals normalising the picture.
    rng_images = (np.arange(3 * 784).reshape(3, 28, 28) * 7 % 256).astype(np.uint8)
    made = pic.mnist_as_pictures(rng_images, seed=1, version=NORMALISER_VERSION)
    for i, img in enumerate(rng_images):
        variant = pic._variant(img, np.random.default_rng([pic._SALT, 1, i]))
        np.testing.assert_array_equal(made[i], normalize(variant, NORMALISER_VERSION))


def test_export_gate_sets_are_normalised_by_imaging(pictures):
    from mnist_edge.export import proxies

    _, labels, reference = pictures
    sets, _ = proxies.build_sets(proxies.ProxySpec(handwriting_per_digit=N, fonts_per_digit=0, seed=5), NORMALISER_VERSION,
                                 ("handwriting-holdout",), workers=1)
    images, got = sets["handwriting-holdout"]
    np.testing.assert_array_equal(images, reference)
    np.testing.assert_array_equal(got, labels)


def test_server_normalises_encoded_pictures_the_same_way(pictures):
    from helpers.servers import running_server
    from mnist_edge.protos.digits.v1 import digits_pb2 as pb
    from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc

    raw, _, reference = pictures
    with running_server() as app:
        with grpc.insecure_channel(app.address) as ch:
            stub = pb_grpc.DigitClassifierStub(ch)
            req = pb.ClassifyRequest(images=[pb.Image(encoded=_png(p)) for p in raw], return_normalized_image=True)
            resp = stub.Classify(req, timeout=60)
    got = np.stack([np.frombuffer(p.normalized_image, np.uint8).reshape(28, 28) for p in resp.predictions])
    np.testing.assert_array_equal(got, reference)


def test_server_refuses_a_model_made_for_another_normaliser(tmp_path):
    from helpers.models import copy_models, set_version
    from mnist_edge.server import model_store

    models = copy_models(REPO / "models", tmp_path / "models")
    set_version(models, 7, normaliser={"version": NORMALISER_VERSION + 1})
    with pytest.raises(model_store.ModelLoadError, match=f"normaliser version {NORMALISER_VERSION + 1}.*version {NORMALISER_VERSION}"):
        model_store.load(models)
    manifest = json.loads((models / "manifest.json").read_text())
    del manifest["normaliser"]  # a manifest from before versions were recorded: made for version 1
    (models / "manifest.json").write_text(json.dumps(manifest))
    if NORMALISER_VERSION != 1:
        with pytest.raises(model_store.ModelLoadError, match="normaliser version 1"):
            model_store.load(models)
