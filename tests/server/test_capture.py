"""Field capture (server/capture.py): what is kept, from every API, on disk as promised, and
never at the cost of a request."""

from __future__ import annotations

import base64
import calendar
import http.client
import json
import logging
import os
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.digits import digit_pngs
from helpers.servers import running_server, wait_for
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import capture
from mnist_edge.server.images import join_bytes_tensor

OPT_OUT = (("x-mnist-edge-capture", "off"),)


def captures(d: Path) -> list[dict]:
    """The sidecars on disk, oldest first."""
    return [json.loads(p.read_text()) for p in sorted(d.glob("*/*.json"))]


def total_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def counts(app) -> dict:
    return app.metrics_snapshot()["captures"]


def settled(app) -> dict:
    """The counts once the writer has finished with everything queued."""
    assert app.core.capture.flush(20)
    return counts(app)


def native_stub(app):
    ch = grpc.insecure_channel(app.address)
    return ch, digits_pb2_grpc.DigitClassifierStub(ch)


def http_post(address: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_held_out_scenario_pairs_bounded_and_every_call_answered(tmp_path):
    """--capture-below 0.9 --capture-sample 0.05 --capture-max-mb 1, digit PNGs sent three times."""
    d = tmp_path / "captures"
    pngs = digit_pngs()
    with running_server(capture_dir=str(d), capture_below=0.9, capture_sample=0.05, capture_max_mb=1) as app:
        ch, stub = native_stub(app)
        with ch:
            answered = 0
            for _ in range(3):
                for _, png in pngs:
                    r = stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)], return_probabilities=True), timeout=20)
                    assert not r.predictions[0].HasField("error")
                    answered += 1
        assert answered == 3 * len(pngs)
        assert settled(app)["error"] == 0
    kept = captures(d)
    assert kept, "some of these digits are read with less than 90% confidence"
    for meta in kept:
        stem = d / meta["time"][:10] / meta["image"][: -len(".png")]
        assert Path(str(stem) + ".png").is_file() and Path(str(stem) + ".json").is_file()
        assert meta["original"] and (stem.parent / meta["original"]).read_bytes().startswith(b"\x89PNG")
        assert meta["model"]["version"] and len(meta["model"]["sha256"]) == 64
        assert len(meta["probabilities"]) == 10 and meta["digit"] == int(np.argmax(meta["probabilities"]))
        assert meta["reason"] == "sample" or meta["confidence"] < 0.9
        assert "peer" not in json.dumps(meta)
    assert total_bytes(d) <= 1024 * 1024


def test_size_budget_removes_the_oldest(tmp_path):
    d = tmp_path / "c"
    budget_mb = 0.02  # ~20 KB: a few dozen captures with their original PNG
    pngs = digit_pngs()
    with running_server(capture_dir=str(d), capture_below=1.0, capture_max_mb=budget_mb) as app:
        ch, stub = native_stub(app)
        with ch:
            for _ in range(4):
                stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=p) for _, p in pngs]), timeout=20)
        settled(app)
        names = sorted(p.name for p in d.glob("*/*.json"))
    assert 0 < len(names) < 4 * len(pngs)
    assert total_bytes(d) <= budget_mb * 1024 * 1024
    assert names[-1].endswith(f"-{4 * len(pngs):06d}.json"), "the newest capture is kept"


def test_every_api_is_captured_with_its_original_bytes(tmp_path):
    d = tmp_path / "c"
    png = digit_pngs()[1][1]
    raw = normalize_encoded(png).tobytes()
    with running_server(capture_dir=str(d), capture_below=1.0, http_address="127.0.0.1:0") as app:
        ch, stub = native_stub(app)
        with ch:
            stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=raw)], request_id="native-raw"), timeout=20)
            stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)], request_id="native-encoded"), timeout=20)
            list(stub.ClassifyStream(iter([digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)], request_id="stream")]), timeout=20))
            v2 = pb_grpc.GRPCInferenceServiceStub(ch)
            tensor = pb.ModelInferRequest.InferInputTensor
            v2.ModelInfer(pb.ModelInferRequest(model_name="mnist", id="v2-pixels", inputs=[tensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                               raw_input_contents=[raw]), timeout=20)
            v2.ModelInfer(pb.ModelInferRequest(model_name="mnist", id="v2-image", inputs=[tensor(name="image", datatype="BYTES", shape=[1])],
                                               raw_input_contents=[join_bytes_tensor([png])]), timeout=20)
        status, _ = http_post(app.http_address, "/v1/classify", png, {"Content-Type": "image/png"})
        assert status == 200
        body = {"id": "rest-v2", "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(png).decode()]}]}
        status, _ = http_post(app.http_address, "/v2/models/mnist/infer", json.dumps(body).encode(), {"Content-Type": "application/json"})
        assert status == 200
        settled(app)
    by_id = {(m["api"], m["request_id"]): m for m in captures(d)}
    assert set(by_id) == {
        ("native", "native-raw"), ("native", "native-encoded"), ("native_stream", "stream"), ("v2", "v2-pixels"),
        ("v2", "v2-image"), ("native_http", ""), ("v2_http", "rest-v2"),
    }
    for (_api, rid), meta in by_id.items():
        day = d / meta["time"][:10]
        assert (day / meta["image"]).read_bytes().startswith(b"\x89PNG")
        from PIL import Image

        seen = np.asarray(Image.open(day / meta["image"]))
        assert seen.shape == (28, 28) and seen.tobytes() == raw, "the PNG is the 28x28 image the model saw"
        if rid in ("native-raw", "v2-pixels"):
            assert meta["original"] is None
        else:
            assert (day / meta["original"]).read_bytes() == png


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "handler-threads"])
def test_a_caller_opts_out(tmp_path, lane):
    d = tmp_path / "c"
    png = digit_pngs()[1][1]
    with running_server(capture_dir=str(d), capture_below=1.0, http_address="127.0.0.1:0", infer_lane=lane) as app:
        ch, stub = native_stub(app)
        with ch:
            request = digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)])
            stub.Classify(request, metadata=OPT_OUT, timeout=20)
            list(stub.ClassifyStream(iter([request]), metadata=OPT_OUT, timeout=20))
            v2 = pb_grpc.GRPCInferenceServiceStub(ch)
            tensor = pb.ModelInferRequest.InferInputTensor
            v2.ModelInfer(pb.ModelInferRequest(model_name="mnist", inputs=[tensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                               raw_input_contents=[bytes(784)]), metadata=OPT_OUT, timeout=20)
        status, _ = http_post(app.http_address, "/v1/classify", png, {"Content-Type": "image/png", "X-Mnist-Edge-Capture": "off"})
        assert status == 200
        # One call without the header: it is captured, so the writer has seen everything before it.
        http_post(app.http_address, "/v1/classify", png, {"Content-Type": "image/png"})
        settled(app)
        assert counts(app) == {"kept": 1, "dropped": 0, "error": 0}
    assert [m["api"] for m in captures(d)] == ["native_http"]


def test_an_unusable_folder_is_a_warning_and_the_server_serves(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where the capture folder should be")
    png = digit_pngs()[1][1]
    with (
        caplog.at_level(logging.WARNING, logger="mnist_edge.server"),
        running_server(capture_dir=str(blocker), capture_below=1.0, http_address="127.0.0.1:0") as app,
    ):
        ch, stub = native_stub(app)
        with ch:
            for _ in range(3):
                r = stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)]), timeout=20)
                assert not r.predictions[0].HasField("error")
        status, _ = http_post(app.http_address, "/v1/classify", png, {"Content-Type": "image/png"})
        assert status == 200
        c = settled(app)
        assert c["error"] == 4 and c["kept"] == 0
        families = {f.name: f for f in text_string_to_metric_families(_metrics_text(app))}
        samples = {s.labels["result"]: s.value for s in families["mnist_edge_captures"].samples}
        assert samples == {"kept": 0, "dropped": 0, "error": 4}
    assert blocker.read_text().startswith("a regular file")
    assert not app.core.capture.usable
    assert any(getattr(r, "event", "") == "capture_unusable" and str(blocker) in r.getMessage() for r in caplog.records)


def _metrics_text(app) -> str:
    from mnist_edge.server.metrics import render

    return render(app.metrics_snapshot())


def test_file_modes_day_folders_and_names_that_sort_by_time(tmp_path):
    for private, file_mode, dir_mode in ((False, 0o640, 0o750), (True, 0o600, 0o700)):
        d = tmp_path / f"c-{private}"
        c = capture.Capture(str(d), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=private, max_image_bytes=1 << 20)
        try:
            for _ in range(3):
                c.offer("v2", "id", _result(), np.zeros((1, 28, 28), np.uint8), None, lambda name: None)
            assert c.flush(20) and c.snapshot()["kept"] == 3
        finally:
            c.close()
        days = [p for p in d.iterdir() if p.is_dir()]
        assert [p.name for p in days] == [time.strftime("%Y-%m-%d", time.gmtime())]
        assert os.stat(days[0]).st_mode & 0o777 == dir_mode
        files = sorted(days[0].iterdir())
        assert {f.stat().st_mode & 0o777 for f in files} == {file_mode}
        jsons = [f.name for f in files if f.suffix == ".json"]
        times = [json.loads((days[0] / n).read_text())["time"] for n in jsons]
        assert times == sorted(times) and len(jsons) == 3


def test_a_full_queue_drops_and_counts(tmp_path):
    c = capture.Capture(str(tmp_path), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=False, max_image_bytes=1 << 20, max_bytes=10)
    try:
        c.offer("v2", "", _result(), np.zeros((1, 28, 28), np.uint8), None, lambda name: None)
        assert c.snapshot() == {"kept": 0, "dropped": 1, "error": 0}
    finally:
        c.close()


def test_old_captures_are_removed_and_purge_deletes(tmp_path, capsys):
    old_day = tmp_path / "2020-01-01"
    old_day.mkdir()
    for ext in (".png", ".json"):
        (old_day / f"20200101T000000.000000Z-1-000001{ext}").write_bytes(b"x")
    c = capture.Capture(str(tmp_path), below=1.0, sample=0.0, max_mb=10, max_age_days=30, private=False, max_image_bytes=1 << 20)
    try:
        c.offer("v2", "", _result(), np.zeros((1, 28, 28), np.uint8), None, lambda name: None)
        wait_for(lambda: c.snapshot()["kept"] == 1 and not old_day.exists())
    finally:
        c.close()
    assert len(list(tmp_path.glob("*/*.json"))) == 1
    today = time.strftime("%Y-%m-%d", time.gmtime())
    from mnist_edge.cli import main

    assert main(["captures", "purge", str(tmp_path), "--before", today]) == 0
    assert len(list(tmp_path.glob("*/*.json"))) == 1, "today's captures are not before today"
    assert main(["captures", "purge", str(tmp_path)]) == 0
    assert "deleted 1 capture" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit):
        main(["captures", "purge", str(tmp_path), "--before", "yesterday"])
    assert capture._stem_time("20200101T000000.000000Z-1-000001") == calendar.timegm((2020, 1, 1, 0, 0, 0))


def test_capture_off_costs_one_attribute(server):
    """Without --capture-dir no capture is started, and the handlers see None (their one check)."""
    assert server.core.capture is None
    assert all(rpc.capture is None for rpc in _rpcs(server))


def _rpcs(app):
    import gc

    from mnist_edge.server.rpc import InferenceRpc

    return [o for o in gc.get_objects() if isinstance(o, InferenceRpc) and o.core is app.core]


class _Model:
    name, version, precision, sha256 = "mnist", "1", "int8", "0" * 64


class _Result:
    def __init__(self) -> None:
        self.probabilities = np.full((1, 10), 0.1, np.float32)
        self.digits = np.zeros(1, np.int64)
        self.tag = _Model()


def _result() -> _Result:
    return _Result()


def test_captures_of_the_same_second_are_indexed_and_pruned_one_by_one(tmp_path):
    day = tmp_path / "2026-01-02"
    day.mkdir()
    for seq in (1, 2):
        stem = f"20260102T030405.{seq:06d}Z-7-{seq:06d}"
        (day / f"{stem}.png").write_bytes(b"p" * 100)
        (day / f"{stem}.orig.jpg").write_bytes(b"o" * 100)
        (day / f"{stem}.json").write_bytes(b"{}")
    c = capture.Capture(str(tmp_path), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=False, max_image_bytes=1 << 20)
    c.close()
    c._scan()
    assert [(stem.name, size) for stem, size in c._index] == [
        ("20260102T030405.000001Z-7-000001", 202), ("20260102T030405.000002Z-7-000002", 202),
    ]
    assert capture._remove_capture(c._index[0][0]) == 3
    assert sorted(p.name for p in day.iterdir()) == [
        "20260102T030405.000002Z-7-000002.json", "20260102T030405.000002Z-7-000002.orig.jpg", "20260102T030405.000002Z-7-000002.png",
    ]


def test_an_original_larger_than_a_tenth_of_the_budget_is_left_out_and_the_capture_kept(tmp_path):
    c = capture.Capture(str(tmp_path), below=1.0, sample=0.0, max_mb=1, max_age_days=0, private=False, max_image_bytes=4 << 20)
    photo = b"\x89PNG" + bytes(200 * 1024)  # a 200 KB upload against a 1 MB folder
    small = b"\x89PNG" + bytes(1000)
    try:
        for original in (photo, small):
            c.offer("native", "", _result(), np.zeros((1, 28, 28), np.uint8), lambda j, o=original: o, lambda name: None)
        assert c.flush(20)
    finally:
        c.close()
    metas = captures(tmp_path)
    assert [m["original"] is None for m in metas] == [True, False]
    assert all((tmp_path / m["time"][:10] / m["image"]).is_file() for m in metas)


def test_the_command_serves_with_a_regular_file_at_the_capture_path(tmp_path):
    """`mnist-edge serve --capture-dir FILE`: a warning, then SERVING, and calls answered."""
    from helpers.servers import health_status, start_cli_server

    blocker = tmp_path / "captures"
    blocker.write_text("not a folder")
    proc, address = start_cli_server(tmp_path, "--capture-dir", str(blocker), "--capture-below", "0.9", "--capture-sample", "0.05",
                                     "--capture-max-mb", "1", "--log-format", "text")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        ch, stub = native_stub(type("A", (), {"address": address}))
        with ch:
            for _, png in digit_pngs():
                r = stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)]), timeout=20)
                assert not r.predictions[0].HasField("error")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "is not usable" in err and str(blocker) in err
    assert blocker.read_text() == "not a folder"


def test_purge_touches_only_captures(tmp_path):
    """Pointed at the wrong folder, purge deletes nothing that the writer did not make."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.json").write_text("{}")
    day = tmp_path / "2020-01-01"
    day.mkdir()
    (day / "mine.json").write_text("{}")
    (day / "20200101T000000.000000Z-1-000001.json").write_text("{}")
    (day / "20200101T000000.000000Z-1-000001.png").write_bytes(b"p")
    c = capture.Capture(str(tmp_path), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=False, max_image_bytes=1 << 20)
    c.close()
    c._scan()
    assert [stem.name for stem, _ in c._index] == ["20200101T000000.000000Z-1-000001"], "the writer's pruning sees only captures"
    assert capture.purge(str(tmp_path)) == 1
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["2020-01-01", "2020-01-01/mine.json", "notes", "notes/a.json"]
