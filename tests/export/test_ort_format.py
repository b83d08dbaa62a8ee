"""export/ort_format.py on the shipped int8 model: portable optimisation level, canonical bytes,
and exactly the .onnx model's digits on the whole MNIST test set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mnist_edge.export import ort_format

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


@pytest.fixture(scope="module")
def int8_bytes() -> bytes:
    manifest = json.loads((MODELS / "manifest.json").read_text())
    return (MODELS / manifest["models"]["int8"]["file"]).read_bytes()


@pytest.fixture(scope="module")
def ort_bytes(int8_bytes) -> bytes:
    return ort_format.to_ort(int8_bytes)


def _graph(ort_bytes: bytes):
    mod = ort_format._fbs("InferenceSession")
    return mod.InferenceSession.GetRootAs(ort_bytes, 0).Model().Graph()


def test_is_an_ort_format_model(ort_bytes):
    assert ort_bytes[4:8] == ort_format.FILE_IDENTIFIER
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.load_model_format", "ORT")  # refuse anything but ORT format
    sess = ort.InferenceSession(ort_bytes, so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixels"]
    assert [o.name for o in sess.get_outputs()] == ["probabilities", "digit"]


def test_same_bytes_every_time(int8_bytes, ort_bytes):
    assert ort_format.to_ort(int8_bytes) == ort_bytes
    # onnxruntime's own output is not byte-stable (hash order seeded by addresses); the canonical form is
    assert ort_format.canonicalize(ort_format.convert(int8_bytes)) == ort_bytes
    assert ort_format.canonicalize(ort_bytes) == ort_bytes
    # and in another process, with other addresses (ASLR)
    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]); from export.ort_format import to_ort; "
            "print(hashlib.sha256(to_ort(open(sys.argv[2], 'rb').read())).hexdigest())")
    manifest = json.loads((MODELS / "manifest.json").read_text())
    proc = subprocess.run([sys.executable, "-c", code, str(REPO), str(MODELS / manifest["models"]["int8"]["file"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    import hashlib

    assert proc.stdout.strip() == hashlib.sha256(ort_bytes).hexdigest()


def test_graph_is_fused_and_portable(ort_bytes):
    """QDQ fused into U8S8 QGemm (EXTENDED level); no NCHWc (hardware-specific) nodes; no QDQ Gemm left."""
    g = _graph(ort_bytes)
    nodes = [g.Nodes(i) for i in range(g.NodesLength())]
    ops = [(n.Domain() or b"").decode() + ":" + n.OpType().decode() for n in nodes]
    assert ops.count("com.microsoft:QGemm") == 4, ops
    assert not any(op.endswith(":Gemm") or op.endswith(":MatMul") for op in ops), ops
    assert not any("nchwc" in op.lower() for op in ops), ops
    # QGemm's activation zero point (input 2) is uint8: U8S8, fast on x86 (AVX2/VNNI) and ARM64 alike
    inits = {g.Initializers(i).Name(): g.Initializers(i).DataType() for i in range(g.InitializersLength())}
    uint8, int8 = 2, 3  # onnx TensorProto.UINT8, INT8
    for n in nodes:
        if n.OpType() == b"QGemm":
            a_zp, b_zp = n.Inputs(2), n.Inputs(5)
            if a_zp in inits:
                assert inits[a_zp] == uint8
            assert inits[b_zp] == int8


def test_identical_digits_on_the_whole_test_set(int8_bytes, ort_bytes):
    from mnist_edge.training import data

    test = data.load_test(offline=True)
    result = ort_format.verify(ort_bytes, int8_bytes, test.images)
    assert result["images"] == 10000
    assert result["identical_digits"] and result["differing_images"] == 0
    assert result["max_abs_probability_diff"] < 1e-6
    digits, _ = ort_format.predict(ort_bytes, test.images)
    assert (digits == test.labels).mean() >= 0.99


def test_size_close_to_the_onnx_model(int8_bytes, ort_bytes):
    assert len(ort_bytes) <= 1.05 * len(int8_bytes)


def test_verify_names_a_disagreement(int8_bytes, ort_bytes):
    from mnist_edge.training import data

    images = data.load_test(offline=True).images
    other = (MODELS / json.loads((MODELS / "manifest.json").read_text())["models"]["fp32"]["file"]).read_bytes()
    d_fp32, _ = ort_format.predict(other, images)
    d_int8, _ = ort_format.predict(int8_bytes, images)
    if np.array_equal(d_fp32, d_int8):
        pytest.skip("the fp32 and int8 models agree on every test image: nothing to disagree on")
    with pytest.raises(ort_format.OrtFormatError, match="disagrees"):
        ort_format.verify(ort_bytes, other, images)
