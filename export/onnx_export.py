"""PyTorch checkpoint -> fp32 ONNX with the public contract of docs/design.md.

The graph takes `pixels` uint8 [N, 28, 28] (N dynamic) and returns `probabilities`
float32 [N, 10] (softmax) and `digit` int64 [N] (argmax); the pixel normalisation
is part of the module, so it is part of the graph. The exported file is made
deterministic: fixed node and initializer names, no producer timestamps, and the
metadata this project sets (see `set_metadata`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch

OPSET = 18
INPUT = "pixels"
OUTPUTS = ("probabilities", "digit")
PIXEL_CONVENTION = "uint8 [N,28,28], row-major, MNIST convention: 0 = background, 255 = full ink"


class Classifier(torch.nn.Module):
    """The trained MLP plus softmax and argmax: the exact function the ONNX graph computes."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probabilities = torch.softmax(self.mlp(pixels), dim=1)
        return probabilities, probabilities.argmax(dim=1)


class FoldedMLP(torch.nn.Module):
    """The MLP with its input normalisation folded into the first layer.

    fc1(x * s + t) = (W * s) x + (b + t * W 1): the same function on raw 0..255 pixels,
    one multiply-add less per pixel and, for int8, an exact input quantization (integers
    0..255 are representable with scale 1), so the first layer sees the pixels losslessly.
    The normalisation is still inside the graph, in fc1's weights and bias.
    """

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        linears = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        first = linears[0]
        folded = torch.nn.Linear(first.in_features, first.out_features)
        with torch.no_grad():
            w = first.weight.detach().to(torch.float64)
            folded.weight.copy_((w * float(mlp.scale)).to(torch.float32))
            folded.bias.copy_((first.bias.detach().to(torch.float64) + float(mlp.shift) * w.sum(dim=1)).to(torch.float32))
        rest = list(mlp.layers)
        rest[rest.index(first)] = folded
        # Dropout is the identity in eval mode; leave it out of the exported graph.
        self.layers = torch.nn.Sequential(*[m for m in rest if not isinstance(m, torch.nn.Dropout)])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.layers(pixels.reshape(pixels.shape[0], -1).to(torch.float32))


def _quiet_exporter() -> None:
    # The dynamo exporter logs a warning per missing torchvision op; nothing here uses them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def export_fp32(mlp: torch.nn.Module, path: str | os.PathLike, opset: int = OPSET) -> onnx.ModelProto:
    """Export `mlp` (eval mode) to `path` and return the checked model."""
    _quiet_exporter()
    mlp = mlp.eval()
    example = torch.zeros(2, 28, 28, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Classifier(FoldedMLP(mlp)),
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={"pixels": {0: torch.export.Dim("N")}},
            opset_version=opset,
            verbose=False,
        )
    model = program.model_proto
    tidy(model)
    check(model)
    save(model, path)
    return model


def tidy(model: onnx.ModelProto) -> None:
    """Stable, readable names: fc1..fc4 for the layers, the batch dimension called N."""
    graph = model.graph
    renames: dict[str, str] = {}
    gemms = [n for n in graph.node if n.op_type in ("Gemm", "MatMul")]
    for i, node in enumerate(gemms, start=1):
        node.name = f"fc{i}"
        if len(node.input) > 1:
            renames[node.input[1]] = f"fc{i}.weight"
        if len(node.input) > 2:
            renames[node.input[2]] = f"fc{i}.bias"
    for node in graph.node:
        if node.op_type in ("Softmax", "ArgMax", "Cast", "Reshape", "Relu"):
            node.name = node.name.replace("node_", "")
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name.replace("mlp.", "").replace("m.", ""))
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in renames:
                node.input[j] = renames[name]
            elif name.startswith("mlp."):
                node.input[j] = name.replace("mlp.", "")
    for init in graph.initializer:
        if init.name.startswith("mlp."):
            init.name = init.name.replace("mlp.", "")
    model.producer_name = "mnist-edge"
    model.producer_version = ""
    del model.metadata_props[:]
    graph.name = "mnist"
    graph.doc_string = ""
    # Drop any value_info the exporter left; shape inference re-derives what is needed.
    del graph.value_info[:]


def check(model: onnx.ModelProto) -> None:
    """ONNX checker (full) and strict shape inference; raise if the contract is not met."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    inputs = {i.name: i for i in inferred.graph.input}
    outputs = {o.name: o for o in inferred.graph.output}
    if list(inputs) != [INPUT]:
        raise ValueError(f"graph inputs {list(inputs)}, expected ['{INPUT}']")
    if tuple(outputs) != OUTPUTS:
        raise ValueError(f"graph outputs {list(outputs)}, expected {list(OUTPUTS)}")
    expect = {
        INPUT: (onnx.TensorProto.UINT8, ["N", 28, 28]),
        "probabilities": (onnx.TensorProto.FLOAT, ["N", 10]),
        "digit": (onnx.TensorProto.INT64, ["N"]),
    }
    for name, value in {**inputs, **outputs}.items():
        tt = value.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in tt.shape.dim]
        want_type, want_dims = expect[name]
        if tt.elem_type != want_type or len(dims) != len(want_dims) or any(
            isinstance(w, int) and d != w for d, w in zip(dims, want_dims)
        ) or isinstance(dims[0], int):
            raise ValueError(
                f"{name}: type {onnx.TensorProto.DataType.Name(tt.elem_type)} {dims}, "
                f"expected {onnx.TensorProto.DataType.Name(want_type)} {want_dims} with a dynamic first dimension"
            )


def set_metadata(model: onnx.ModelProto, props: dict[str, str]) -> None:
    del model.metadata_props[:]
    for key in sorted(props):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=str(props[key])))


def save(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


__all__ = ["Classifier", "export_fp32", "check", "tidy", "set_metadata", "save", "serialize", "OPSET"]
