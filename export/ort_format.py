"""ONNX -> onnxruntime's ORT format, for minimal (size-reduced) onnxruntime builds on devices.

`to_ort(onnx_bytes) -> bytes` converts, canonicalises and returns the ORT-format model;
`verify(ort_bytes, onnx_bytes, images)` checks it predicts exactly what the ONNX model does.

Choices, and why:

- **Optimisation level EXTENDED, with QDQ fusion, and nothing past it.** A minimal build runs
  no graph optimiser, so the ORT file carries the graph already optimised. BASIC only does
  semantics-preserving clean-ups and would leave the QDQ pattern unfused: a full build does not
  re-optimise an ORT-format model, so it would run DequantizeLinear -> fp32 Gemm ->
  QuantizeLinear (measured: 2x slower per image, probabilities off by up to 2e-3). EXTENDED
  adds the fusions every CPU runs: DQ -> Gemm -> Q becomes com.microsoft QGemm (integer
  kernels). LAYOUT/ALL add the NCHWc layout transformer, whose blocked layouts are chosen for
  the converting CPU's vector width (AVX2 8, AVX-512 16) and do not exist on ARM: a model
  saved at that level is only valid where it was made (onnxruntime warns so when it saves one).
  An MLP has no convolutions, but the level is chosen for the property, not for this graph.
- **`session.qdqisint8allowed=0`: uint8 activations, int8 weights (U8S8 QGemm).** The fused
  node's activation type is a conversion-time choice, not a CPU feature: onnxruntime defaults
  it per build (int8 on ARM builds, uint8 on x86), so it is set explicitly, which also makes the
  output independent of the converting machine. U8S8 is the one every CPU runs fast: x86 with
  AVX2 (VPMADDUBSW; exact here thanks to the reduced-range weights) and VNNI, and ARM64, whose
  MLAS U8S8 kernels use UDOT/UMMLA or plain NEON; an int8-activation QGemm fell to a slow
  generic path on this AVX2 machine (about 20x slower per image, measured). Shifting an int8
  activation to uint8 moves its zero point by 128 and changes no value, so predictions are the
  same.
- **Canonical bytes.** onnxruntime's serializer writes the flatbuffer's tables in an order
  that depends on hash-table iteration seeded by memory addresses (ASLR), so converting the
  same model twice gives different bytes with the same content. `canonicalize` re-serialises
  the parsed model depth-first in field order (vector orders kept, so key-sorted vectors stay
  sorted), which makes the output a function of the content alone.

Reading and writing use the flatbuffers bindings onnxruntime ships
(onnxruntime/tools/ort_format_model/ort_flatbuffers_py), imported without importing
onnxruntime.tools itself (which imports torch when present).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

FILE_IDENTIFIER = b"ORTM"
OPTIMIZATION_LEVEL = "extended"

# Table -> fields in schema order: (accessor, kind). Kinds: scalar, str, table:T, union:T (the
# type field is `<accessor>Type`), vstr, vtable:T, vscalar:<numpy dtype>, vstruct:EdgeEnd.
SCHEMA: dict[str, list[tuple[str, str]]] = {
    "InferenceSession": [("OrtVersion", "str"), ("Model", "table:Model"), ("KernelTypeStrResolver", "table:KernelTypeStrResolver")],
    "Model": [("IrVersion", "scalar"), ("OpsetImport", "vtable:OperatorSetId"), ("ProducerName", "str"), ("ProducerVersion", "str"),
              ("Domain", "str"), ("ModelVersion", "scalar"), ("DocString", "str"), ("Graph", "table:Graph"),
              ("GraphDocString", "str"), ("MetadataProps", "vtable:StringStringEntry")],
    "Graph": [("Initializers", "vtable:Tensor"), ("NodeArgs", "vtable:ValueInfo"), ("Nodes", "vtable:Node"), ("MaxNodeIndex", "scalar"),
              ("NodeEdges", "vtable:NodeEdge"), ("Inputs", "vstr"), ("Outputs", "vstr"), ("SparseInitializers", "vtable:SparseTensor"),
              ("RuntimeOptimizations", "table:RuntimeOptimizations")],
    "Node": [("Name", "str"), ("DocString", "str"), ("Domain", "str"), ("SinceVersion", "scalar"), ("Index", "scalar"), ("OpType", "str"),
             ("Type", "scalar"), ("ExecutionProviderType", "str"), ("Inputs", "vstr"), ("Outputs", "vstr"), ("Attributes", "vtable:Attribute"),
             ("InputArgCounts", "vscalar:<i4"), ("ImplicitInputs", "vstr")],
    "Attribute": [("Name", "str"), ("DocString", "str"), ("Type", "scalar"), ("F", "scalar"), ("I", "scalar"), ("S", "str"), ("T", "table:Tensor"),
                  ("G", "table:Graph"), ("Floats", "vscalar:<f4"), ("Ints", "vscalar:<i8"), ("Strings", "vstr"), ("Tensors", "vtable:Tensor"),
                  ("Graphs", "vtable:Graph")],
    "Tensor": [("Name", "str"), ("DocString", "str"), ("Dims", "vscalar:<i8"), ("DataType", "scalar"), ("RawData", "vscalar:u1"),
               ("StringData", "vstr"), ("ExternalDataOffset", "scalar")],
    "SparseTensor": [("Values", "table:Tensor"), ("Indices", "table:Tensor"), ("Dims", "vscalar:<i8")],
    "ValueInfo": [("Name", "str"), ("DocString", "str"), ("Type", "table:TypeInfo")],
    "TypeInfo": [("Denotation", "str"), ("Value", "union:TypeInfoValue")],
    "TensorTypeAndShape": [("ElemType", "scalar"), ("Shape", "table:Shape")],
    "SequenceType": [("ElemType", "table:TypeInfo")],
    "MapType": [("KeyType", "scalar"), ("ValueType", "table:TypeInfo")],
    "Shape": [("Dim", "vtable:Dimension")],
    "Dimension": [("Value", "table:DimensionValue"), ("Denotation", "str")],
    "DimensionValue": [("DimType", "scalar"), ("DimValue", "scalar"), ("DimParam", "str")],
    "NodeEdge": [("NodeIndex", "scalar"), ("InputEdges", "vstruct:EdgeEnd"), ("OutputEdges", "vstruct:EdgeEnd")],
    "OperatorSetId": [("Domain", "str"), ("Version", "scalar")],
    "StringStringEntry": [("Key", "str"), ("Value", "str")],
    "KernelTypeStrResolver": [("OpKernelTypeStrArgs", "vtable:OpIdKernelTypeStrArgsEntry")],
    "OpIdKernelTypeStrArgsEntry": [("OpId", "str"), ("KernelTypeStrArgs", "vtable:KernelTypeStrArgsEntry")],
    "KernelTypeStrArgsEntry": [("KernelTypeStr", "str"), ("Args", "vtable:ArgTypeAndIndex")],
    "ArgTypeAndIndex": [("ArgType", "scalar"), ("Index", "scalar")],
    "RuntimeOptimizations": [("Records", "vtable:RuntimeOptimizationRecordContainerEntry")],
    "RuntimeOptimizationRecordContainerEntry": [("OptimizerName", "str"), ("RuntimeOptimizationRecords", "vtable:RuntimeOptimizationRecord")],
    "RuntimeOptimizationRecord": [("ActionId", "str"), ("NodesToOptimizeIndices", "table:NodesToOptimizeIndices"), ("ProducedOpIds", "vstr")],
    "NodesToOptimizeIndices": [("NodeIndices", "vscalar:<u4"), ("NumInputs", "scalar"), ("NumOutputs", "scalar"), ("HasVariadicInput", "scalar"),
                               ("HasVariadicOutput", "scalar"), ("NumVariadicInputs", "scalar"), ("NumVariadicOutputs", "scalar")],
}
UNIONS = {"TypeInfoValue": {1: "TensorTypeAndShape", 2: "SequenceType", 3: "MapType"}}


class OrtFormatError(RuntimeError):
    pass


def _fbs(name: str):
    """A module of onnxruntime's generated ORT-format bindings (ort_flatbuffers_py.fbs.<name>)."""
    import onnxruntime

    parent = str(Path(onnxruntime.__file__).parent / "tools" / "ort_format_model")
    if parent not in sys.path:
        sys.path.append(parent)  # the bindings import each other as top-level `ort_flatbuffers_py`
    return importlib.import_module(f"ort_flatbuffers_py.fbs.{name}")


def convert(onnx_bytes: bytes, qdq_int8_allowed: bool = False) -> bytes:
    """onnxruntime's own conversion (EXTENDED level), as it writes it: not byte-stable."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-format-") as tmp:
        out = os.path.join(tmp, "model.ort")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = out
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "1" if qdq_int8_allowed else "0")
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        return Path(out).read_bytes()


def _present(obj: Any, slot: int) -> bool:
    return obj._tab.Offset(4 + 2 * slot) != 0


def _copy(builder, obj: Any, table: str) -> int:
    """Re-serialise `obj` (a parsed `table`) into `builder`; children first, in field order."""
    module = _fbs(table)
    values: list[tuple[str, str, Any]] = []
    for slot, (field, kind) in enumerate(_slots(table)):
        if field is None or not _present(obj, slot):
            continue
        get = getattr(obj, field)
        if kind == "scalar":
            values.append((field, kind, get()))
        elif kind == "str":
            values.append((field, kind, builder.CreateString(get())))
        elif kind.startswith("table:"):
            values.append((field, kind, _copy(builder, get(), kind[6:])))
        elif kind.startswith("union:"):
            utype = getattr(obj, field + "Type")()
            sub = UNIONS[kind[6:]][utype]
            cls = getattr(_fbs(sub), sub)()
            t = get()
            cls.Init(t.Bytes, t.Pos)
            values.append((field, kind, (utype, _copy(builder, cls, sub))))
        elif kind == "vstr":
            offs = [builder.CreateString(get(j)) for j in range(getattr(obj, field + "Length")())]
            values.append((field, kind, _vector(builder, module, table, field, offs)))
        elif kind.startswith("vtable:"):
            offs = [_copy(builder, get(j), kind[7:]) for j in range(getattr(obj, field + "Length")())]
            values.append((field, kind, _vector(builder, module, table, field, offs)))
        elif kind.startswith("vscalar:"):
            arr = getattr(obj, field + "AsNumpy")()
            arr = np.zeros(0, dtype=kind[8:]) if isinstance(arr, int) else np.asarray(arr, dtype=kind[8:])
            values.append((field, kind, builder.CreateNumpyVector(arr)))
        elif kind == "vstruct:EdgeEnd":
            edges = [get(j) for j in range(getattr(obj, field + "Length")())]
            getattr(module, f"{table}Start{field}Vector")(builder, len(edges))
            create = _fbs("EdgeEnd").CreateEdgeEnd
            for e in reversed(edges):
                create(builder, e.NodeIndex(), e.SrcArgIndex(), e.DstArgIndex())
            values.append((field, kind, builder.EndVector()))
        else:  # pragma: no cover - a schema typo
            raise OrtFormatError(f"unknown field kind {kind}")
    getattr(module, f"{table}Start")(builder)
    for field, kind, value in values:
        if kind.startswith("union:"):
            getattr(module, f"{table}Add{field}Type")(builder, value[0])
            value = value[1]
        getattr(module, f"{table}Add{field}")(builder, value)
    return getattr(module, f"{table}End")(builder)


def _vector(builder, module, table: str, field: str, offsets: list[int]) -> int:
    getattr(module, f"{table}Start{field}Vector")(builder, len(offsets))
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    return builder.EndVector()


_SLOTS: dict[str, list[tuple[str | None, str]]] = {}


def _slots(table: str) -> list[tuple[str | None, str]]:
    """SCHEMA's fields by vtable slot (a union takes two slots; deprecated slots are None)."""
    if table not in _SLOTS:
        module = _fbs(table)
        slots: list[tuple[str | None, str]] = []
        for field, kind in SCHEMA[table]:
            if kind.startswith("union:"):
                slots.append((None, "union-type"))  # written with its value
            slots.append((field, kind))
        # Deprecated fields keep their slot in the schema: find each field's real slot from the
        # generated Add function and pad the gaps.
        import inspect

        by_slot: dict[int, tuple[str | None, str]] = {}
        for field, kind in slots:
            if field is None:
                continue
            src = inspect.getsource(getattr(module, f"{table}Add{field}"))
            slot = int(src.split("Slot(", 1)[1].split(",", 1)[0])
            by_slot[slot] = (field, kind)
        _SLOTS[table] = [by_slot.get(i, (None, "absent")) for i in range(max(by_slot) + 1)]
    return _SLOTS[table]


def canonicalize(ort_bytes: bytes) -> bytes:
    """The same model, serialised depth-first in schema field order: bytes that depend only on content."""
    import flatbuffers

    session_mod = _fbs("InferenceSession")
    if not session_mod.InferenceSession.InferenceSessionBufferHasIdentifier(ort_bytes, 0):
        raise OrtFormatError("not an ORT-format model (no ORTM file identifier)")
    root = session_mod.InferenceSession.GetRootAs(ort_bytes, 0)
    builder = flatbuffers.Builder(len(ort_bytes) + 4096)
    builder.Finish(_copy(builder, root, "InferenceSession"), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def to_ort(onnx_bytes: bytes) -> bytes:
    """ONNX model bytes -> ORT-format model bytes: EXTENDED optimisations, U8S8 QGemm, canonical."""
    out = canonicalize(convert(onnx_bytes, qdq_int8_allowed=False))
    if canonicalize(out) != out:  # pragma: no cover - a canonicalizer bug
        raise OrtFormatError("canonical form is not a fixed point")
    return out


def predict(model: bytes, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(digits, probabilities) with the server's session options (intra-op 1, ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    digits, probs = [], []
    for i in range(0, len(images), batch):
        p, d = sess.run(["probabilities", "digit"], {"pixels": np.ascontiguousarray(images[i: i + batch], dtype=np.uint8)})
        digits.append(d)
        probs.append(p)
    return np.concatenate(digits), np.concatenate(probs)


def verify(ort_bytes: bytes, onnx_bytes: bytes, images: np.ndarray) -> dict[str, Any]:
    """Run both on `images`; the ORT-format model must give identical digits."""
    d_ort, p_ort = predict(ort_bytes, images)
    d_onnx, p_onnx = predict(onnx_bytes, images)
    differ = np.flatnonzero(d_ort != d_onnx)
    result = {
        "images": int(len(images)),
        "identical_digits": bool(differ.size == 0),
        "differing_images": int(differ.size),
        "max_abs_probability_diff": float(np.abs(p_ort - p_onnx).max()) if len(images) else 0.0,
        "bytes": len(ort_bytes),
    }
    if differ.size:
        raise OrtFormatError(f"the ORT-format model disagrees with the ONNX model on {differ.size} of {len(images)} images (first: {differ[:10].tolist()})")
    return result
