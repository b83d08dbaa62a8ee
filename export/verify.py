"""The gate: does the exported model still agree with the PyTorch original?

All figures are fractions over the full 10,000-image MNIST test set, except the
worst-digit budget, which is on the held-out proxy splits (export.proxies). The oracle's
tolerance fits the precision: fp32 ONNX must match PyTorch to 1e-5 with identical
argmax; int8 is judged by accuracy and top-1 agreement, not element-wise.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

INPUT = "pixels"


@dataclass(frozen=True)
class Budgets:
    min_accuracy: float = 0.99  # int8 test accuracy must be at least this
    max_drop: float = 0.001  # fp32 accuracy minus int8 accuracy at most this
    min_agreement: float = 0.998  # int8 vs PyTorch top-1 agreement at least this
    fp32_max_abs_diff: float = 1e-5  # fp32 ONNX vs PyTorch, per probability
    min_digit_accuracy: float = 0.90  # worst digit of each held-out proxy split (export.proxies); docs/model-card.md says why

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budgets:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: float(v) for k, v in d.items() if k in known})


@dataclass
class Check:
    name: str
    value: float
    budget: float
    op: str  # ">=" or "<="
    passed: bool
    detail: str = ""

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"{mark}  {self.name}: {self.value:.6g} (budget {self.op} {self.budget:.6g}){'  ' + self.detail if self.detail else ''}"


def _check(name: str, value: float, op: str, budget: float, detail: str = "") -> Check:
    passed = value >= budget if op == ">=" else value <= budget
    # Rounding noise must not fail a check that is exactly on its budget.
    if not passed and abs(value - budget) <= 1e-12:
        passed = True
    return Check(name=name, value=float(value), budget=float(budget), op=op, passed=bool(passed), detail=detail)


@dataclass
class Predictions:
    probabilities: np.ndarray  # float32 [N, 10]
    digits: np.ndarray  # int64 [N]

    def accuracy(self, labels: np.ndarray) -> float:
        return float((self.digits == labels).mean())

    def per_class_accuracy(self, labels: np.ndarray) -> list[float]:
        return [float((self.digits[labels == c] == c).mean()) if (labels == c).any() else float("nan") for c in range(10)]

    def confusion(self, labels: np.ndarray) -> np.ndarray:
        m = np.zeros((10, 10), dtype=np.int64)
        np.add.at(m, (labels.astype(np.int64), self.digits.astype(np.int64)), 1)
        return m

    def margins(self) -> np.ndarray:
        top2 = np.sort(self.probabilities, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]


@dataclass
class GateResult:
    checks: list[Check] = field(default_factory=list)
    note: str = ""  # where the budgets came from, for the console

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}


class AccuracyRegression(Exception):
    """The exported model missed a budget; `.gate` names every number against its budget."""

    def __init__(self, gate: GateResult, what: str = "int8 model") -> None:
        self.gate = gate
        lines = "; ".join(
            f"{c.name} expected {c.op} {c.budget:.6g}, got {c.value:.6g}" for c in gate.failures()
        )
        super().__init__(f"{what} failed the gate: {lines}")


def session(model: str | os.PathLike | bytes, threads: int = 1, optimize: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_predict(model: str | os.PathLike | bytes, images: np.ndarray, batch: int = 2000, threads: int = 1) -> Predictions:
    sess = session(model, threads=threads)
    probs, digits = [], []
    for i in range(0, len(images), batch):
        p, d = sess.run(["probabilities", "digit"], {INPUT: np.ascontiguousarray(images[i : i + batch])})
        probs.append(p)
        digits.append(d)
    return Predictions(np.concatenate(probs), np.concatenate(digits))


def torch_predict(mlp, images: np.ndarray, batch: int = 2000) -> Predictions:
    import torch

    from mnist_edge.export.onnx_export import Classifier

    model = Classifier(mlp).eval()
    probs, digits = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            p, d = model(torch.from_numpy(np.array(images[i : i + batch])))
            probs.append(p.numpy())
            digits.append(d.numpy())
    return Predictions(np.concatenate(probs), np.concatenate(digits))


def check_fp32(torch_pred: Predictions, fp32_pred: Predictions, budgets: Budgets) -> GateResult:
    """fp32 ONNX on onnxruntime vs PyTorch: identical argmax, probabilities within 1e-5."""
    mismatched = int((torch_pred.digits != fp32_pred.digits).sum())
    diff = float(np.abs(torch_pred.probabilities - fp32_pred.probabilities).max())
    return GateResult(
        [
            _check("fp32 vs torch: argmax mismatches", mismatched, "<=", 0),
            _check("fp32 vs torch: max |probability difference|", diff, "<=", budgets.fp32_max_abs_diff),
        ]
    )


def check_int8(
    labels: np.ndarray,
    fp32_pred: Predictions,
    int8_pred: Predictions,
    reference_pred: Predictions,
    budgets: Budgets,
    reference: str = "torch",
) -> GateResult:
    """The int8 budgets: accuracy, drop against fp32, top-1 agreement with the reference."""
    acc8 = int8_pred.accuracy(labels)
    acc32 = fp32_pred.accuracy(labels)
    agreement = float((int8_pred.digits == reference_pred.digits).mean())
    return GateResult(
        [
            _check("int8 accuracy", acc8, ">=", budgets.min_accuracy),
            _check("accuracy drop (fp32 - int8)", acc32 - acc8, "<=", budgets.max_drop, f"fp32 {acc32:.4f}"),
            _check(f"int8 vs {reference} top-1 agreement", agreement, ">=", budgets.min_agreement),
        ]
    )


def changed_predictions(labels: np.ndarray, before: Predictions, after: Predictions) -> list[dict[str, int]]:
    idx = np.flatnonzero(before.digits != after.digits)
    return [
        {"index": int(i), "label": int(labels[i]), "before": int(before.digits[i]), "after": int(after.digits[i])}
        for i in idx
    ]
