"""Triton's own HTTP tools against the REST port, unchanged: `tritonclient.http` 2.41 (JSON and
binary tensor data, compressed bodies, the BYTES `image` input; the same images through
tritonclient.grpc) and `perf_analyzer -i http`.

tritonclient runs in its own Python (.venv-triton, see helpers/triton.py) and only writes
what it saw; every assertion is made here against an in-process onnxruntime run of the
model the server serves. No timing is asserted.
"""

from __future__ import annotations

import io
import json
import re
import subprocess

import numpy as np
import pytest

from helpers.servers import ort_reference, running_server
from helpers.triton import tritonclient_python
from mnist_edge.bench import perf_analyzer as pa
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.server import model_store

pytestmark = [pytest.mark.timeout(300), pytest.mark.full_setup]  # full_setup: needs what scripts/test (not --quick) sets up
COUNT = 2000

SCRIPT = r'''
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

address, images_path, pngs_path, out_dir, grpc_address = sys.argv[1:6]
images = np.load(images_path)
pngs = np.load(pngs_path, allow_pickle=True)
report = {}
client = httpclient.InferenceServerClient(url=address)
report["live"] = client.is_server_live()
report["ready"] = client.is_server_ready()
report["model_ready"] = client.is_model_ready("mnist")
report["server"] = client.get_server_metadata()
report["metadata"] = client.get_model_metadata("mnist")
report["max_batch_size"] = client.get_model_config("mnist")["max_batch_size"]


def pixels(chunk, binary=True, datatype="UINT8"):
    inp = httpclient.InferInput("pixels", [len(chunk), 28, 28], datatype)
    inp.set_data_from_numpy(np.ascontiguousarray(chunk), binary_data=binary)
    return inp


runs = {}
for name, binary, compression in (("binary", True, None), ("json", False, None), ("gzip", True, "gzip"), ("deflate", False, "deflate")):
    digits, probs = [], []
    for start in range(0, len(images), 500):
        chunk = images[start : start + 500]
        outputs = [httpclient.InferRequestedOutput("probabilities", binary_data=binary), httpclient.InferRequestedOutput("digit", binary_data=binary)]
        r = client.infer("mnist", [pixels(chunk, binary)], outputs=outputs, request_id=f"{name}-{start}",
                         request_compression_algorithm=compression, response_compression_algorithm=compression)
        assert r.get_response()["id"] == f"{name}-{start}"
        digits.append(r.as_numpy("digit"))
        probs.append(r.as_numpy("probabilities"))
    np.save(f"{out_dir}/{name}_digits.npy", np.concatenate(digits))
    np.save(f"{out_dir}/{name}_probs.npy", np.concatenate(probs))

fp = images[:100].astype(np.float32) / 255.0
np.save(f"{out_dir}/fp32_digits.npy", client.infer("mnist", [pixels(fp, True, "FP32")]).as_numpy("digit"))
r = client.infer("mnist", [pixels(images[:10])], outputs=[httpclient.InferRequestedOutput("digit")])
report["digit_only"] = [o["name"] for o in r.get_response()["outputs"]]

image = httpclient.InferInput("image", [len(pngs)], "BYTES")
image.set_data_from_numpy(pngs)
np.save(f"{out_dir}/image_digits.npy", client.infer("mnist", [image]).as_numpy("digit"))

# the same images through tritonclient.grpc: its BYTES tensors travel as length-prefixed raw contents
import tritonclient.grpc as grpcclient

g = grpcclient.InferenceServerClient(url=grpc_address)
gimage = grpcclient.InferInput("image", [len(pngs), 1], "BYTES")
gimage.set_data_from_numpy(pngs.reshape(-1, 1))
np.save(f"{out_dir}/grpc_image_digits.npy", g.infer("mnist", [gimage]).as_numpy("digit"))
g.close()


def error_of(call):
    try:
        call()
    except InferenceServerException as exc:
        return {"status": exc.status(), "message": exc.message()}
    return None


report["unknown_model"] = error_of(lambda: client.infer("nope", [pixels(images[:1])]))
report["class_count"] = error_of(lambda: client.infer("mnist", [pixels(images[:1])], outputs=[httpclient.InferRequestedOutput("probabilities", class_count=3)]))
report["stats"] = client.get_inference_statistics("mnist")["model_stats"][0]["inference_count"]
client.close()
with open(f"{out_dir}/report.json", "w") as f:
    json.dump(report, f)
'''


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(255 - image).resize((84, 84), Image.BILINEAR).save(buf, format="PNG")
    return buf.getvalue()


def test_tritonclient_http_against_the_rest_port(tmp_path, mnist):
    python = tritonclient_python()
    images = mnist.test.images[:COUNT]
    pngs = [_png(mnist.test.images[i]) for i in range(8)]
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "pngs.npy", np.array(pngs, dtype=np.object_), allow_pickle=True)
    probs, digits = ort_reference(model_store.load(model_store.resolve_manifest(None)).file, images)
    with running_server(http_address="127.0.0.1:0") as app:
        proc = subprocess.run([str(python), "-c", SCRIPT, app.http_address, str(tmp_path / "images.npy"), str(tmp_path / "pngs.npy"), str(tmp_path), app.address],
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        image_expected = ort_reference(app.core.model.file, np.stack([normalize_encoded(p) for p in pngs]))[1]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["live"] and report["ready"] and report["model_ready"]
    assert report["server"]["name"] == "mnist-edge" and report["max_batch_size"] == 1024
    assert ["pixels", "UINT8", [-1, 28, 28]] in [[t["name"], t["datatype"], t["shape"]] for t in report["metadata"]["inputs"]]
    for name in ("binary", "json", "gzip", "deflate"):
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_digits.npy"), digits, err_msg=name)
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_probs.npy"), probs, err_msg=name)
    np.testing.assert_array_equal(np.load(tmp_path / "fp32_digits.npy"), digits[:100])
    np.testing.assert_array_equal(np.load(tmp_path / "image_digits.npy"), image_expected)
    np.testing.assert_array_equal(np.load(tmp_path / "grpc_image_digits.npy"), image_expected)
    assert report["digit_only"] == ["digit"]
    assert report["unknown_model"]["status"] == "404" or "404" in str(report["unknown_model"]["status"])
    assert report["class_count"] is not None and "classification" in report["class_count"]["message"]
    assert report["stats"] >= 4 * COUNT


def test_perf_analyzer_over_http(mnist):
    binary = pa.find()
    if binary is None:
        pytest.skip(f"perf_analyzer not found: {pa.SETUP}")
    with running_server(http_address="127.0.0.1:0") as app:
        with app.core.stats.locked():
            before = app.core.stats.inference_count
        cmd = pa.command(binary, app.http_address, 2, 200, stability_percent=1000, max_trials=5, protocol="http")
        for _ in range(2):  # a load spike on a shared machine can make even 1000% "unstable": once more
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=pa.environment(binary), check=False)
            if "Failed to obtain stable measurement" not in proc.stdout:
                break
        with app.core.stats.locked():
            after = app.core.stats.inference_count
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"Concurrency: (\d+), throughput: ([\d.]+) infer/sec, latency (\d+) usec", proc.stdout)
    assert m and int(m.group(1)) == 2 and float(m.group(2)) > 0, out[-3000:]
    assert after - before >= 200
