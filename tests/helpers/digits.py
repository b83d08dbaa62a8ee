"""Digit photos unlike MNIST, for the field-capture tests: the typeset digits the capture
benchmark sends (mnist_edge.bench.capture)."""

from __future__ import annotations

from mnist_edge.bench.capture import digit_png, digit_pngs

__all__ = ["digit_png", "digit_pngs"]
