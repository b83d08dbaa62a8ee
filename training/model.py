"""The MLP: 784 pixels in, three fully connected hidden layers, 10 digits out.

The module takes raw uint8 pixels [N, 28, 28] (MNIST convention: 0 = background,
255 = full ink) and normalises them itself, so the exported ONNX graph carries the
normalisation and no client or server repeats the training constants.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# MNIST training-set pixel mean and standard deviation, on the 0..1 scale.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (640, 320, 160)
    dropout: float = 0.0
    mean: float = MNIST_MEAN
    std: float = MNIST_STD
    inputs: int = 784
    classes: int = 10

    def __post_init__(self) -> None:
        if len(self.hidden) != 3:
            raise ValueError(f"the network has exactly three hidden layers, got hidden={list(self.hidden)}")
        if any(h <= 0 for h in self.hidden):
            raise ValueError(f"hidden layer widths must be positive, got {list(self.hidden)}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config or ModelConfig()
        self.config = config
        widths = [config.inputs, *config.hidden]
        layers: list[nn.Module] = []
        for i in range(len(config.hidden)):
            layers += [nn.Linear(widths[i], widths[i + 1]), nn.ReLU()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
        layers.append(nn.Linear(widths[-1], config.classes))
        self.layers = nn.Sequential(*layers)
        # Folded normalisation: x_norm = x * scale + shift, with x the raw 0..255 pixel.
        self.register_buffer("scale", torch.tensor(1.0 / (255.0 * config.std)), persistent=False)
        self.register_buffer("shift", torch.tensor(-config.mean / config.std), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) pixels [N, 28, 28] -> logits [N, 10]."""
        x = pixels.reshape(pixels.shape[0], -1).to(torch.float32)
        x = x * self.scale + self.shift
        return self.layers(x)


def build(config: ModelConfig | None = None) -> MLP:
    return MLP(config or ModelConfig())
