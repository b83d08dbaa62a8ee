"""A small trained checkpoint shared by the export tests (seconds to train)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smoke_checkpoint(tmp_path_factory, mnist):
    from mnist_edge.training.model import ModelConfig
    from mnist_edge.training.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "smoke.pt"
    cfg = TrainConfig(epochs=2, limit=6000, out=str(out), eval_proxy=False, progress=False, seed=3)
    train(cfg, ModelConfig(hidden=(128, 64, 32)), dataset=mnist, log=lambda m: None)
    return out
