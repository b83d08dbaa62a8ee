"""Hot reload (SIGHUP and file watch) and signed models (--trust)."""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from helpers.models import copy_models, set_version
from helpers.servers import health_status, json_log, running_server, start_cli_server, wait_for
from mnist_edge.protos.inference import grpc_service_pb2 as pb
from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc
from mnist_edge.server import model_store


def served_version(address: str) -> str:
    with grpc.insecure_channel(address) as ch:
        return list(pb_grpc.GRPCInferenceServiceStub(ch).ModelMetadata(pb.ModelMetadataRequest(name="mnist"), timeout=5).versions)[0]


def infer(address: str, images, version: str = "", timeout: float = 30):
    with grpc.insecure_channel(address) as ch:
        req = pb.ModelInferRequest(
            model_name="mnist", model_version=version,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])],
            raw_input_contents=[images.tobytes()],
        )
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=timeout)


def test_sighup_reloads_refuses_bad_models_and_supersedes_old_versions(tmp_path, shipped_manifest, mnist):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    # No version grace here (tests/server/test_version_grace.py has it): version 1 goes at the swap.
    proc, address = start_cli_server(tmp_path, "--model", str(models), "--log-format", "json", "--previous-version-grace-s", "0")
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)
        assert served_version(address) == "1"
        set_version(models, 2)
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served_version(address) == "2", timeout=20)
        assert infer(address, mnist.test.images[:2]).model_version == "2"
        with pytest.raises(grpc.RpcError) as info:
            infer(address, mnist.test.images[:1], version="1")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "no version '1'" in info.value.details()

        # A manifest whose model file fails its hash is refused; version 2 keeps serving.
        manifest = json.loads((models / "manifest.json").read_text())
        bad = dict(manifest["models"]["int8"], sha256="0" * 64)
        set_version(models, 3, models={**manifest["models"], "int8": bad})
        proc.send_signal(signal.SIGHUP)
        # A lower version is refused too.
        time.sleep(0.5)
        set_version(models, 1, models=manifest["models"])
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert served_version(address) == "2" and health_status(address) == "SERVING"
        assert infer(address, mnist.test.images[:2]).model_version == "2"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = json_log(proc)
    events = [e["event"] for e in log]
    assert events.count("reloaded") == 1 and events.count("reload_refused") == 2
    refused = [e["msg"] for e in log if e["event"] == "reload_refused"]
    assert "does not match the manifest" in refused[0] and "lower than the version being served" in refused[1]


def test_file_watch_reloads_without_a_signal(tmp_path, shipped_manifest):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 5)
    with running_server(model=str(models), watch_s=0.1) as app:
        assert app.core.model.version == "5"
        set_version(models, 6)
        wait_for(lambda: app.core.model.version == "6", timeout=10)


def test_calls_in_flight_finish_on_the_old_model(tmp_path, shipped_manifest, mnist):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    gate = threading.Event()
    entered = threading.Event()

    def loader(settings):
        model = model_store.load(settings.model)
        if model.version == "1":  # the old model blocks until told to finish
            real = model.runner.run

            class Held:
                def run(self, pixels):
                    entered.set()
                    gate.wait(20)
                    return real(pixels)

            model.runner = Held()
        return model

    with running_server(loader=loader, model=str(models)) as app:
        with futures.ThreadPoolExecutor(2) as pool:
            old_call = pool.submit(infer, app.address, mnist.test.images[:1])
            assert entered.wait(10)
            set_version(models, 2)
            assert app.reload("test")
            gate.set()
            assert old_call.result(20).model_version == "1"
        assert infer(app.address, mnist.test.images[:1]).model_version == "2"


# -- signed models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from mnist_edge.export.signing import keygen

    d = tmp_path_factory.mktemp("keys")
    keygen(d / "a.key", d / "a.pub")
    keygen(d / "b.key", d / "b.pub")
    return d


def sign(models: Path, key: Path) -> None:
    from mnist_edge.export import manifest as mf
    from mnist_edge.export.signing import sign as make_signature

    mf.atomic_write(models / "manifest.json.sig", make_signature((models / "manifest.json").read_bytes(), key))


def test_keygen_cli_writes_a_private_key_only_its_owner_reads(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "mnist_edge", "keygen", "--private", str(tmp_path / "k"), "--public", str(tmp_path / "k.pub")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert b"BEGIN PUBLIC KEY" in (tmp_path / "k.pub").read_bytes()
    again = subprocess.run([sys.executable, "-m", "mnist_edge", "keygen", "--private", str(tmp_path / "k"), "--public", str(tmp_path / "k2.pub")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "refusing to overwrite" in again.stderr


def test_signed_manifest_is_served_and_tampering_is_refused(tmp_path, shipped_manifest, keys):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    sign(models, keys / "a.key")
    with running_server(model=str(models), trust=f"{keys / 'b.pub'},{keys / 'a.pub'}") as app:
        assert app.core.ready
    # a manifest changed after signing
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["golden"] = manifest["golden"][:5]
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(model_store.ModelLoadError, match="signature does not match manifest.json for any trusted key"):
        model_store.load(models, trusted_keys=_keys(keys / "a.pub"))
    # signed by a key the server does not trust
    sign(models, keys / "b.key")
    with pytest.raises(model_store.ModelLoadError, match="signature does not match"):
        model_store.load(models, trusted_keys=_keys(keys / "a.pub"))
    # unsigned
    (models / "manifest.json.sig").unlink()
    with pytest.raises(model_store.ModelLoadError, match="unsigned"):
        model_store.load(models, trusted_keys=_keys(keys / "a.pub"))


def _keys(*paths: Path):
    from mnist_edge.server.signing import load_public_keys

    return load_public_keys([str(p) for p in paths])


def test_serve_with_trust_exits_non_zero_on_an_unsigned_model(tmp_path, shipped_manifest, keys):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    proc, address = start_cli_server(tmp_path, "--model", str(models), "--trust", str(keys / "a.pub"))
    assert proc.wait(60) == 1
    assert "unsigned" in proc.stderr.read()


def test_reload_refuses_a_tampered_model_file_under_a_valid_signature(tmp_path, shipped_manifest, keys, mnist):
    models = copy_models(shipped_manifest.parent, tmp_path / "models")
    set_version(models, 1)
    sign(models, keys / "a.key")
    with running_server(model=str(models), trust=str(keys / "a.pub")) as app:
        set_version(models, 2)
        sign(models, keys / "a.key")
        manifest = json.loads((models / "manifest.json").read_text())
        f = models / manifest["models"]["int8"]["file"]
        data = bytearray(f.read_bytes())
        data[-50] ^= 1
        f.write_bytes(bytes(data))
        assert not app.reload("test")
        assert app.core.model.version == "1"
        assert infer(app.address, mnist.test.images[:1]).model_version == "1"


def test_export_sign_writes_a_signature_that_verifies(tmp_path, keys):
    from mnist_edge.export import manifest as mf

    out = tmp_path / "m"
    from mnist_edge.export.signing import sign as make_signature

    manifest_bytes = b'{"schema_version": 1}\n'
    mf.publish(out, {}, manifest_bytes, make_signature(manifest_bytes, keys / "a.key"))
    from mnist_edge.server.signing import verify

    verify((out / "manifest.json").read_bytes(), (out / "manifest.json.sig").read_bytes(), _keys(keys / "a.pub"), "test")
    # publishing again without a signature removes the stale one
    mf.publish(out, {}, b'{"schema_version": 1, "x": 2}\n')
    assert not (out / "manifest.json.sig").exists()
