"""fp32 ONNX -> int8 ONNX: static QDQ quantization calibrated on training images.

Choices, and why:

- **Static, QDQ format.** Activation ranges are fixed at export from calibration
  data, so inference does no range computation; QDQ is the portable form that
  onnxruntime fuses into its quantized kernels (QGemm here) on every CPU.
- **Per-channel weights.** Each output unit gets its own scale; the rows of an MLP
  weight matrix differ in range by an order of magnitude, and one scale per tensor
  wastes most of the int8 levels of the small rows.
- **Signed 8-bit weights and activations, weights in reduced (7-bit) range.** On x86
  CPUs without VNNI (AVX2 only, like this build machine and many small servers)
  onnxruntime's u8s8 kernel multiplies with VPMADDUBSW, whose 16-bit intermediate
  sums saturate when full-range weights meet large activations; measured here, that
  made 0.3% of test predictions differ from the exact QDQ arithmetic. With weights
  in [-64, 64] a pair sum is at most 2 * 255 * 64 = 32640 and cannot saturate, and the kernels give exactly the emulated
  QDQ result on x86 with or without VNNI and on ARM, at a cost of about 0.02 points
  of accuracy. Portability of the verified numbers wins.
- **Only the layers are quantized, and each ReLU is folded into its layer.** Listing
  Relu as a quantized op lets the quantizer drop it and quantize the layer's output
  with the ReLU's range (the clamp at zero then happens in the requantization), so
  onnxruntime chains QGemm -> QGemm with no dequantize/quantize pair in between:
  fewer nodes (12 -> 9), less latency for one image, one rounding less per layer.
  The last layer's output (the logits) is not quantized: it goes to softmax in float,
  so the probabilities clients read are not rounded to 256 levels.
- **Calibration on a fixed, seeded sample of training images, never test images**,
  so the test set stays an honest measurement.

`quantize(src, dst, cfg, calibration)` is path in, path out, with a config object,
as onnxruntime's own tool is.
"""

from __future__ import annotations

import contextlib
import enum
import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

INPUT = "pixels"


class Calibration(str, enum.Enum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"

    def ort(self) -> CalibrationMethod:
        return {
            Calibration.MINMAX: CalibrationMethod.MinMax,
            Calibration.PERCENTILE: CalibrationMethod.Percentile,
            Calibration.ENTROPY: CalibrationMethod.Entropy,
        }[self]


@dataclass(frozen=True)
class QuantConfig:
    calibration: Calibration = Calibration.MINMAX
    percentile: float = 99.999
    per_channel: bool = True
    reduce_range: bool = True
    op_types: tuple[str, ...] = ("Gemm", "MatMul", "Relu")
    nodes_to_exclude: tuple[str, ...] = ()  # layers kept in fp32
    calibration_batch: int = 500

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = self.calibration.value
        d["activation_type"] = "int8"
        d["weight_type"] = "int8"
        d["format"] = "QDQ"
        d["op_types"] = list(self.op_types)
        d["nodes_to_exclude"] = list(self.nodes_to_exclude)
        if self.calibration is not Calibration.PERCENTILE:
            d.pop("percentile")
        return d

    def with_excluded(self, *nodes: str) -> QuantConfig:
        return replace(self, nodes_to_exclude=tuple(sorted(set(self.nodes_to_exclude) | set(nodes))))


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch: int) -> None:
        self._batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self._batches):
            return None
        self._pos += 1
        return {INPUT: self._batches[self._pos - 1]}

    def rewind(self) -> None:
        self._pos = 0


def calibration_sample(train_images: np.ndarray, size: int = 2000, seed: int = 0) -> np.ndarray:
    """A fixed, seeded sample of training images (sorted indices, so order is stable too)."""
    if size >= len(train_images):
        return np.ascontiguousarray(train_images)
    idx = np.sort(np.random.default_rng(seed).choice(len(train_images), size=size, replace=False))
    return np.ascontiguousarray(train_images[idx])


@contextlib.contextmanager
def _quiet():
    """onnxruntime's calibrators print progress to stdout and advise pre-processing on the
    root logger (this graph needs none); keep the exporter's console summary readable."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, cfg: QuantConfig, calibration: np.ndarray) -> onnx.ModelProto:
    """Quantize the fp32 model at `src` into `dst`; return the int8 model."""
    if calibration.dtype != np.uint8 or calibration.ndim != 3 or calibration.shape[1:] != (28, 28):
        raise ValueError(f"calibration images must be uint8 [N,28,28], got {calibration.dtype} {list(calibration.shape)}")
    extra: dict[str, Any] = {
        "WeightSymmetric": True,
        "ActivationSymmetric": False,
        # Layer outputs followed by a ReLU take the ReLU's quantization; the last one stays float.
        "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],
    }
    if cfg.calibration is Calibration.PERCENTILE:
        extra["CalibPercentile"] = cfg.percentile
    with tempfile.TemporaryDirectory(prefix="mnist-edge-quant-") as tmp, _quiet():
        # onnxruntime writes its augmented calibration model next to a temp path; keep it private.
        out = Path(tmp) / "int8.onnx"
        quantize_static(
            str(src),
            str(out),
            _Reader(calibration, cfg.calibration_batch),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(cfg.op_types),
            per_channel=cfg.per_channel,
            reduce_range=cfg.reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(cfg.nodes_to_exclude),
            calibrate_method=cfg.calibration.ort(),
            extra_options=extra,
        )
        model = onnx.load(str(out))
    model.producer_name = "mnist-edge"
    model.producer_version = ""
    onnx.checker.check_model(model, full_check=True)
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(dst))
    return model


def weight_layers(model: onnx.ModelProto) -> list[str]:
    """Names of the Gemm/MatMul nodes (the layers), in graph order."""
    return [n.name for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]


def quantized_weight_sources(model: onnx.ModelProto) -> dict[str, str]:
    """layer name -> the op that produces its weight input ('DequantizeLinear:int8', 'initializer', ...)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    result: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        weight = node.input[1]
        if weight in inits:
            result[node.name] = "initializer:" + onnx.TensorProto.DataType.Name(inits[weight].data_type).lower()
            continue
        prod = producers.get(weight)
        if prod is None:
            result[node.name] = "unknown"
        elif prod.op_type == "DequantizeLinear" and prod.input[0] in inits:
            dtype = onnx.TensorProto.DataType.Name(inits[prod.input[0]].data_type).lower()
            result[node.name] = f"DequantizeLinear:{dtype}"
        else:
            result[node.name] = prod.op_type
    return result


@dataclass
class LayerError:
    layer: str
    output_sqnr_db: float  # fp32 vs int8 (emulated) at this layer's output, cumulative
    added_error_db: float  # how much SQNR this layer lost relative to its input
    weight_sqnr_db: float | None = None


@dataclass
class LayerErrors:
    layers: list[LayerError] = field(default_factory=list)

    def worst(self, exclude: tuple[str, ...] = ()) -> LayerError | None:
        candidates = [layer for layer in self.layers if layer.layer not in exclude]
        return max(candidates, key=lambda e: e.added_error_db) if candidates else None


def _sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def layer_errors(fp32: onnx.ModelProto, int8: onnx.ModelProto, images: np.ndarray) -> LayerErrors:
    """Per-layer quantization error, found by SQNR at each layer's input and output.

    Both models expose each layer's input (what the layer consumes: after the
    dequantize, in the int8 graph) and the last layer's output as extra graph outputs,
    and run with graph optimisations off, so the int8 side is the exact QDQ arithmetic
    (which, with reduced-range weights, is also what the fused kernels compute). The
    error a layer adds is the SQNR lost between its input and the next layer's input.
    """
    import onnxruntime as ort

    def probe(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        existing = {o.name for o in m.graph.output}
        for name in names:
            if name not in existing:
                m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
                existing.add(name)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(None, {INPUT: images})
        return {o.name: v for o, v in zip(sess.get_outputs(), outs)}

    ref_nodes = [n for n in fp32.graph.node if n.op_type in ("Gemm", "MatMul")]
    test_nodes = {n.name: n for n in int8.graph.node if n.op_type in ("Gemm", "MatMul")}
    pairs = [(n, test_nodes[n.name]) for n in ref_nodes if n.name in test_nodes]
    if not pairs:
        return LayerErrors()
    ref_points = [r.input[0] for r, _ in pairs] + [pairs[-1][0].output[0]]
    test_points = [t.input[0] for _, t in pairs] + [pairs[-1][1].output[0]]
    ref, test = probe(fp32, ref_points), probe(int8, test_points)
    sqnr = [min(_sqnr_db(ref[a], test[b]), 200.0) for a, b in zip(ref_points, test_points)]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fp32.graph.initializer}
    result = LayerErrors()
    for k, (r, t) in enumerate(pairs):
        w = inits.get(r.input[1])
        result.layers.append(
            LayerError(
                layer=r.name,
                output_sqnr_db=sqnr[k + 1],
                added_error_db=sqnr[k] - sqnr[k + 1],
                weight_sqnr_db=_weight_sqnr(int8, t, w) if w is not None else None,
            )
        )
    return result


def _weight_sqnr(model: onnx.ModelProto, node: onnx.NodeProto, w_fp32: np.ndarray) -> float | None:
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = producers.get(node.input[1])
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        return None
    q = inits[dq.input[0]].astype(np.float32)
    scale = inits[dq.input[1]].astype(np.float32)
    zp = inits[dq.input[2]].astype(np.float32) if len(dq.input) > 2 else np.float32(0)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), np.reshape(zp, shape) if np.ndim(zp) else zp
    return _sqnr_db(w_fp32, (q - zp) * scale)
