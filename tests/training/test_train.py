import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mnist_edge.training.model import MLP, ModelConfig
from mnist_edge.training.train import TrainConfig, load_checkpoint, train


def test_output_shapes_for_uint8_and_float_input():
    model = MLP(ModelConfig(hidden=(32, 16, 8))).eval()
    assert model(torch.zeros(5, 28, 28, dtype=torch.uint8)).shape == (5, 10)
    assert model(torch.zeros(1, 28, 28)).shape == (1, 10)
    assert model(torch.zeros(3, 784, dtype=torch.uint8)).shape == (3, 10)


def test_depth_is_fixed():
    with pytest.raises(ValueError, match="exactly three hidden layers"):
        ModelConfig(hidden=(64, 32))


def test_normalisation_is_inside_the_module():
    model = MLP(ModelConfig(hidden=(8, 8, 8)))
    cfg = model.config
    x = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    inside = x.reshape(1, -1).float() * model.scale + model.shift
    assert torch.allclose(inside, torch.full_like(inside, (1.0 - cfg.mean) / cfg.std))


def test_loss_falls_on_a_fixed_batch(mnist):
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(64, 32, 16), dropout=0.0))
    x = torch.from_numpy(mnist.train.images[:256].copy())
    y = torch.from_numpy(mnist.train.labels[:256].astype("int64"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(50):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    last = F.cross_entropy(model(x), y).item()
    assert last < first * 0.2, (first, last)


def _smoke(tmp_path, name, mnist, **overrides):
    cfg = TrainConfig(epochs=1, limit=1000, out=str(tmp_path / name), eval_proxy=False, progress=False, **overrides)
    return train(cfg, ModelConfig(hidden=(64, 32, 16)), dataset=mnist, log=lambda m: None)


def test_same_seed_same_weights_with_augmentation_and_shuffling(tmp_path, mnist):
    a = _smoke(tmp_path, "a.pt", mnist, seed=7)
    b = _smoke(tmp_path, "b.pt", mnist, seed=7)
    assert a.checkpoint["train_config"]["augment"] is True
    # The picture-path data (a share in proportion to --limit) is part of what the seed fixes.
    from mnist_edge.imaging.normalize import NORMALISER_VERSION

    assert a.checkpoint["normaliser_version"] == NORMALISER_VERSION
    assert a.checkpoint["metrics"]["picture_images"] == {"handwriting": 250, "mnist_pictures": 166}
    assert a.checkpoint["metrics"]["train_images"] == 1000 + 250 + 166
    for key, tensor in a.checkpoint["state_dict"].items():
        assert torch.equal(tensor, b.checkpoint["state_dict"][key]), key
    c = _smoke(tmp_path, "c.pt", mnist, seed=8)
    assert not torch.equal(a.checkpoint["state_dict"]["layers.0.weight"], c.checkpoint["state_dict"]["layers.0.weight"])


def test_cli_smoke_run_writes_a_safe_checkpoint(tmp_path, mnist):
    out = tmp_path / "ckpt" / "smoke.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge", "train", "--smoke", "--offline", "--no-eval-proxy", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test accuracy" in proc.stdout
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["format_version"] == 1
    assert raw["model_config"]["hidden"] == [640, 320, 160]
    assert raw["train_config"]["limit"] == 2000 and raw["train_config"]["epochs"] == 1
    assert set(raw["data_sha256"]) == {"train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}
    model, ckpt = load_checkpoint(out)
    acc = (model(torch.from_numpy(mnist.test.images[:500].copy())).argmax(1).numpy() == mnist.test.labels[:500]).mean()
    assert abs(acc - ckpt["metrics"]["history"][-1]["test_accuracy"]) < 0.05
    assert ckpt["metrics"]["test_accuracy"] > 0.5  # 2000 images, one epoch: far above chance
    assert not list(out.parent.glob(".*.tmp"))


def test_training_cli_missing_data_is_a_clear_error(tmp_path):
    env = {"MNIST_EDGE_CACHE_DIR": str(tmp_path / "empty"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge", "train", "--smoke", "--offline", "--out", str(tmp_path / "x.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert "could not obtain verified MNIST files" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.pt").exists()
