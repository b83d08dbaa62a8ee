"""tritonclient 2.41 (a client nobody here wrote) against a real server, all 10,000 test images.

tritonclient ships its own copy of the protobuf package `inference`, so it cannot share a
process with the project's v2 modules (docs/design.md, "gRPC APIs"): it runs in a subprocess
with its own Python, found as MNIST_EDGE_TRITONCLIENT_PYTHON or `<repo>/.venv-triton`.
The subprocess only talks to the server and writes what it saw; every assertion is made
here, against an in-process onnxruntime run of the very model file the server serves.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from helpers.servers import ort_reference
from helpers.triton import tritonclient_python

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

BATCH = 500

SCRIPT = r'''
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

address, images_path, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
batch = int(sys.argv[4])
images = np.load(images_path)
assert images.dtype == np.uint8 and images.shape[1:] == (28, 28), (images.dtype, images.shape)
report = {}

client = grpcclient.InferenceServerClient(url=address)
report["live"] = client.is_server_live()
report["ready"] = client.is_server_ready()
report["model_ready"] = client.is_model_ready("mnist")

meta = client.get_server_metadata()
report["server"] = {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

mm = client.get_model_metadata("mnist")
report["model_metadata"] = {
    "name": mm.name,
    "versions": list(mm.versions),
    "platform": mm.platform,
    "inputs": [[t.name, t.datatype, list(t.shape)] for t in mm.inputs],
    "outputs": [[t.name, t.datatype, list(t.shape)] for t in mm.outputs],
}

config = client.get_model_config("mnist").config
report["model_config"] = {
    "name": config.name,
    "platform": config.platform,
    "max_batch_size": config.max_batch_size,
    "inputs": [[i.name, i.data_type, list(i.dims)] for i in config.input],
    "outputs": [[o.name, o.data_type, list(o.dims)] for o in config.output],
}


def uint8_input(chunk):
    inp = grpcclient.InferInput("pixels", [len(chunk), 28, 28], "UINT8")
    inp.set_data_from_numpy(np.ascontiguousarray(chunk))
    return inp


# Every test image, UINT8, in batches.
digits = []
probabilities_rows = 0
for start in range(0, len(images), batch):
    chunk = images[start : start + batch]
    result = client.infer("mnist", [uint8_input(chunk)], request_id=f"batch-{start}")
    d = result.as_numpy("digit")
    p = result.as_numpy("probabilities")
    assert d.shape == (len(chunk),) and d.dtype == np.int64, (d.shape, d.dtype)
    assert p.shape == (len(chunk), 10) and p.dtype == np.float32, (p.shape, p.dtype)
    assert result.get_response().id == f"batch-{start}"
    probabilities_rows += len(p)
    digits.append(d)
np.save(f"{out_dir}/digits.npy", np.concatenate(digits))
report["requests"] = len(digits)
report["probabilities_rows"] = probabilities_rows

# One FP32 batch: pixel / 255 as float32, the server converts back exactly.
fp = images[:batch].astype(np.float32) / 255.0
inp = grpcclient.InferInput("pixels", [len(fp), 28, 28], "FP32")
inp.set_data_from_numpy(fp)
result = client.infer("mnist", [inp])
np.save(f"{out_dir}/fp32_digits.npy", result.as_numpy("digit"))

# Only the output asked for.
result = client.infer("mnist", [uint8_input(images[:50])], outputs=[grpcclient.InferRequestedOutput("digit")])
report["digit_only_outputs"] = [o.name for o in result.get_response().outputs]
report["digit_only_has_probabilities"] = result.as_numpy("probabilities") is not None
np.save(f"{out_dir}/digit_only.npy", result.as_numpy("digit"))


def error_of(call):
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None


report["unknown_model"] = error_of(lambda: client.infer("nope", [uint8_input(images[:1])]))
report["class_count"] = error_of(
    lambda: client.infer(
        "mnist", [uint8_input(images[:1])], outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)]
    )
)
# Statistics, when the server says it implements them (Triton's `statistics` extension).
try:
    stats = client.get_inference_statistics("mnist").model_stats
    report["statistics"] = [
        {
            "name": m.name,
            "version": m.version,
            "inference_count": m.inference_count,
            "execution_count": m.execution_count,
            "success": m.inference_stats.success.count,
            "fail": m.inference_stats.fail.count,
        }
        for m in stats
    ]
except InferenceServerException as exc:
    report["statistics"] = {"status": exc.status(), "message": exc.message()}
client.close()
with open(f"{out_dir}/report.json", "w") as f:
    json.dump(report, f)
'''


@pytest.fixture(scope="module")
def triton_python() -> Path:
    return tritonclient_python()


@pytest.fixture(scope="module")
def triton_run(triton_python, server, mnist, tmp_path_factory):
    """Run the tritonclient script once; (report, digits, fp32 digits, digit-only digits)."""
    python = triton_python
    work = tmp_path_factory.mktemp("tritonclient")
    script = work / "triton_script.py"
    script.write_text(SCRIPT)
    images_path = work / "images.npy"
    np.save(images_path, mnist.test.images)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = subprocess.run(
        [str(python), str(script), server.address, str(images_path), str(work), str(BATCH)],
        cwd=work,  # outside the checkout: the project's own `protos` must not be importable there
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"tritonclient script failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads((work / "report.json").read_text())
    return report, np.load(work / "digits.npy"), np.load(work / "fp32_digits.npy"), np.load(work / "digit_only.npy")


@pytest.fixture(scope="module")
def reference(server, mnist):
    return ort_reference(server.core.model.file, mnist.test.images)[1]


def test_health_and_metadata_through_tritonclient(triton_run, server):
    from mnist_edge import __version__

    report = triton_run[0]
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    assert report["server"]["name"] == "mnist-edge"
    assert report["server"]["version"] == __version__
    # docs/design.md: the extensions list only what is implemented (`statistics` only with ModelStatistics)
    statistics_implemented = isinstance(report["statistics"], list)
    if not statistics_implemented:
        assert report["statistics"]["status"] == "StatusCode.UNIMPLEMENTED", report["statistics"]
    assert ("statistics" in report["server"]["extensions"]) == statistics_implemented
    assert "model_configuration" in report["server"]["extensions"]
    mm = report["model_metadata"]
    assert mm["name"] == "mnist" and mm["versions"] == [server.core.model.version]
    assert mm["platform"] == "onnxruntime_onnx"
    assert mm["inputs"] == [["pixels", "UINT8", [-1, 28, 28]], ["image", "BYTES", [-1, 1]]]
    assert mm["outputs"] == [["probabilities", "FP32", [-1, 10]], ["digit", "INT64", [-1]]]


def test_model_config_through_tritonclient(triton_run):
    # data_type enum values from model_config.proto: TYPE_UINT8 = 2, TYPE_INT64 = 9, TYPE_FP32 = 11, TYPE_STRING = 13
    config = triton_run[0]["model_config"]
    assert config["name"] == "mnist" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 1024
    assert config["inputs"] == [["pixels", 2, [28, 28]], ["image", 13, [1]]]
    assert config["outputs"] == [["probabilities", 11, [10]], ["digit", 9, [1]]]


@pytest.mark.slow
def test_all_10000_test_images_match_onnxruntime_in_process(triton_run, reference, mnist):
    report, digits, _, _ = triton_run
    n = len(mnist.test.images)
    assert n == 10_000
    assert report["requests"] == -(-n // BATCH) and report["probabilities_rows"] == n
    assert digits.shape == (n,) and digits.dtype == np.int64
    mismatched = np.flatnonzero(digits != reference)
    assert mismatched.size == 0, f"{mismatched.size} of {n} differ, first at {mismatched[:10].tolist()}"
    # and the model is the good one, not merely consistent
    assert (digits == mnist.test.labels).mean() > 0.98


def test_fp32_batch_and_requested_output(triton_run, reference):
    report, _, fp32_digits, digit_only = triton_run
    np.testing.assert_array_equal(fp32_digits, reference[:BATCH])
    assert report["digit_only_outputs"] == ["digit"]
    assert report["digit_only_has_probabilities"] is False
    np.testing.assert_array_equal(digit_only, reference[:50])


def test_statistics_count_what_tritonclient_sent(triton_run, server, mnist):
    report = triton_run[0]
    if not isinstance(report["statistics"], list):
        pytest.skip(f"the server does not implement ModelStatistics: {report['statistics']}")
    (stats,) = report["statistics"]
    assert stats["name"] == "mnist" and stats["version"] == server.core.model.version
    successes = report["requests"] + 2  # every UINT8 batch, the FP32 batch, the digit-only request
    images = len(mnist.test.images) + BATCH + 50
    assert stats["success"] == successes, stats
    assert stats["inference_count"] == images, stats
    assert 1 <= stats["execution_count"] <= successes, stats
    assert stats["fail"] >= 1, stats  # at least the class_count request, which named model 'mnist'


def test_errors_surface_as_inference_server_exception(triton_run):
    report = triton_run[0]
    unknown = report["unknown_model"]
    assert unknown is not None, "inferring model 'nope' did not raise"
    assert unknown["status"] == "StatusCode.NOT_FOUND"
    assert "unknown model 'nope'" in unknown["message"], unknown
    classification = report["class_count"]
    assert classification is not None, "class_count=3 was not rejected"
    assert classification["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "'classification' not supported" in classification["message"], classification
