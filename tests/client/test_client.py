"""The client library and the `mnist-edge classify` / `mnist-edge health` commands against real servers."""

from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from helpers.servers import REPO, ort_reference, running_server

# From the modules, not the package face: under a bare `pytest` (cwd not on sys.path) the test
# directory tests/client/ shadows the package `client` as a namespace package; submodules still
# resolve. test_imports.py checks the package face itself.
from mnist_edge.client.cli import SHADES, ascii_art
from mnist_edge.client.client import ClientError, DigitClient, Prediction
from mnist_edge.imaging.idx import encode_idx
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.server import model_store

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


# -- helpers ------------------------------------------------------------------------------

def png_of(image: np.ndarray, scale: int = 3, invert: bool = True) -> bytes:
    """An MNIST test image as a PNG a user might send: larger, dark ink on white."""
    from PIL import Image

    pixels = 255 - image if invert else image
    img = Image.fromarray(pixels).resize((28 * scale, 28 * scale), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`mnist-edge ARGS` as a user runs it, in a fresh process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST_EDGE_")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(
        [sys.executable, "-m", "mnist_edge", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@contextlib.contextmanager
def closed_port():
    """An address on 127.0.0.1 that refuses connections: bound (so nobody else takes it), never listening."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"
    finally:
        s.close()


@contextlib.contextmanager
def starting_server():
    """A server whose loader blocks until the block ends: port open, model not loaded."""
    release = threading.Event()

    def slow_loader(settings):
        release.wait(60)
        return model_store.load(settings.model)

    with running_server(loader=slow_loader, background_load=True) as app:
        try:
            yield app
        finally:
            release.set()


def reference_digits(server, images: np.ndarray) -> np.ndarray:
    return ort_reference(server.core.model.file, np.ascontiguousarray(images, dtype=np.uint8))[1]


@pytest.fixture(scope="module")
def client(server):
    with DigitClient(server.address, timeout=30) as c:
        yield c


# -- the library ----------------------------------------------------------------------------

def test_classify_a_path_bytes_and_a_uint8_array(client, server, mnist, tmp_path):
    images, labels = mnist.test.images, mnist.test.labels
    png0, png1 = png_of(images[0]), png_of(images[1])
    path = tmp_path / "first.png"
    path.write_bytes(png0)
    inputs = [path, str(path), png1, bytearray(png1), images[2], images[3].reshape(784)]
    expected_pixels = [normalize_encoded(png0)] * 2 + [normalize_encoded(png1)] * 2 + [images[2], images[3]]
    expected = reference_digits(server, np.stack(expected_pixels))

    preds = client.classify(inputs, return_probabilities=True, return_normalized_image=True)
    assert len(preds) == len(inputs)
    assert all(isinstance(p, Prediction) and p.error is None and p.error_code == 0 for p in preds)
    assert [p.digit for p in preds] == expected.tolist()
    assert [p.digit for p in preds] == [int(labels[i]) for i in (0, 0, 1, 1, 2, 3)]
    for p, pixels in zip(preds, expected_pixels):
        assert len(p.probabilities) == 10 and abs(sum(p.probabilities) - 1) < 1e-3
        assert p.confidence == pytest.approx(max(p.probabilities)) and 0 < p.confidence <= 1
        assert p.normalized_image == np.ascontiguousarray(pixels).tobytes()  # what the model saw


def test_classify_without_extras_returns_digits_only(client, server, mnist):
    preds = client.classify([mnist.test.images[4]])
    assert preds[0].digit == int(reference_digits(server, mnist.test.images[4:5])[0])
    assert preds[0].probabilities == [] and preds[0].normalized_image == b""


def test_classify_pixels_matches_onnxruntime_in_process(client, server, mnist):
    images = mnist.test.images[:200]
    preds = client.classify_pixels(images)
    assert [p.digit for p in preds] == reference_digits(server, images).tolist()


def test_a_bad_image_gets_its_own_error_and_the_others_are_answered(client, server, mnist):
    images = mnist.test.images
    preds = client.classify([images[0], b"this is not an image", images[1], b""])
    assert [p.digit for p in (preds[0], preds[2])] == reference_digits(server, images[:2]).tolist()
    for i in (1, 3):
        assert preds[i].digit is None and preds[i].error
        assert preds[i].error.startswith(f"image {i}:"), preds[i].error
        assert preds[i].error_code == INVALID_ARGUMENT


def test_a_raw_image_of_the_wrong_kind_is_refused_before_sending(client):
    with pytest.raises(ValueError, match="uint8 with 784 pixels"):
        client.classify([np.zeros((28, 28), dtype=np.float32)])
    with pytest.raises(ValueError, match="uint8 with 784 pixels"):
        client.classify([np.zeros((27, 27), dtype=np.uint8)])


def test_a_request_over_the_limit_fails_as_a_whole_with_a_named_error(client, mnist):
    with pytest.raises(ClientError) as info:
        client.classify_pixels(np.zeros((1025, 28, 28), dtype=np.uint8))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "1025 images in one request, over the limit of 1024" in str(info.value)


def test_model_info(client, server):
    info = client.model_info()
    model = server.core.model
    assert (info.name, info.version, info.precision, info.sha256) == ("mnist", model.version, "int8", model.sha256)
    assert list(info.input_shape) == [28, 28]
    assert info.max_images_per_request == 1024
    assert list(info.labels) == [str(d) for d in range(10)]
    assert "0 = background" in info.pixel_convention


def test_health(client):
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    assert client.health("liveness") == "SERVING"
    assert client.health("digits.v1.DigitClassifier") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"


def test_health_while_loading():
    with starting_server() as app, DigitClient(app.address) as c:
        assert c.health() == "NOT_SERVING"
        assert c.health("liveness") == "SERVING"
        with pytest.raises(ClientError, match="is starting") as info:
            c.model_info()
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_closed_port_is_a_client_error_naming_the_target():
    with closed_port() as address, DigitClient(address, timeout=5, retries=1) as c:
        with pytest.raises(ClientError) as info:
            c.classify([np.zeros(784, dtype=np.uint8)])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert f"cannot reach a server at {address}" in str(info.value)
        with pytest.raises(ClientError, match="cannot reach"):
            c.health()


def _requests(*apps) -> tuple[int, ...]:
    return tuple(app.core.batcher.stats.requests for app in apps)


def test_two_targets_are_balanced_round_robin(mnist):
    image = mnist.test.images[0]
    with running_server() as a, running_server() as b, DigitClient([a.address, b.address], timeout=10) as c:
        assert c.target == f"ipv4:{a.address},{b.address}"
        before = _requests(a, b)
        # until both subchannels are connected, round robin may use only the first one
        end = time.monotonic() + 30
        calls = 0
        while calls < 200 and time.monotonic() < end:
            assert c.classify([image])[0].error is None
            calls += 1
            seen = tuple(x - y for x, y in zip(_requests(a, b), before))
            if min(seen) > 0:
                break
        assert min(seen) > 0, f"requests per server after {calls} calls: {seen}"
        assert sum(seen) == calls
        # with both connected, calls alternate
        before = _requests(a, b)
        for _ in range(20):
            assert c.classify([image])[0].error is None
        seen = tuple(x - y for x, y in zip(_requests(a, b), before))
        assert sum(seen) == 20 and min(seen) >= 8, seen


def test_unavailable_is_retried_on_another_replica(mnist):
    """One replica still starting (UNAVAILABLE), one serving: every call succeeds, on the serving one."""
    images = mnist.test.images[:20]
    with starting_server() as starting, running_server() as serving:
        expected = reference_digits(serving, images).tolist()
        with DigitClient([starting.address, serving.address], timeout=10, retries=3) as c:
            before = serving.core.batcher.stats.requests
            digits = []
            for image in images:
                (p,) = c.classify([image])
                assert p.error is None
                digits.append(p.digit)
            assert digits == expected
            assert serving.core.batcher.stats.requests - before == len(images)
            assert starting.core.batcher.stats.requests == 0


def test_several_targets_must_be_ipv4_addresses():
    with pytest.raises(ValueError, match="several targets must be IPv4"):
        DigitClient("localhost:1,localhost:2")
    with pytest.raises(ValueError, match="no target given"):
        DigitClient("")


# -- mnist-edge classify ------------------------------------------------------------------------

def test_classify_cli_on_an_idx_file_reports_the_accuracy_through_the_server(server, mnist, tmp_path):
    n = 300
    images, labels = mnist.test.images[:n], mnist.test.labels[:n]
    images_file, labels_file = tmp_path / "images.idx", tmp_path / "labels.idx"
    images_file.write_bytes(encode_idx(images))
    labels_file.write_bytes(encode_idx(labels))
    expected = reference_digits(server, images)
    correct = int((expected == labels).sum())
    requests_before = server.core.batcher.stats.requests

    proc = cli("classify", "--target", server.address, str(images_file), "--labels", str(labels_file), "--batch", "64")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert f"accuracy through the server: {100 * correct / n:.2f}% ({correct}/{n})" in lines
    assert any(line.startswith(f"{n} images classified by model mnist v{server.core.model.version} (int8)") for line in lines)
    # with more than 20 images only the mistakes are listed, each with its label
    mistakes = [line for line in lines if line.startswith(f"{images_file}[")]
    wrong = np.flatnonzero(expected != labels)
    assert len(mistakes) == len(wrong)
    for line, i in zip(mistakes, wrong):
        assert line.startswith(f"{images_file}[{i}]: {expected[i]} (") and line.endswith(f"(label {labels[i]})"), line
    assert server.core.batcher.stats.requests - requests_before == -(-n // 64)  # 64 images per request


def test_classify_cli_show_prints_what_the_model_saw(server, mnist, tmp_path):
    png = tmp_path / "seven.png"
    png.write_bytes(png_of(mnist.test.images[0]))
    proc = cli("classify", "--target", server.address, "--show", str(png))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{png}: {int(mnist.test.labels[0])} (")
    picture = lines[1:29]
    assert len(picture) == 28 and all(len(row) == 56 and set(row) <= set(SHADES) for row in picture)
    assert picture == ascii_art(normalize_encoded(png.read_bytes())).split("\n")
    assert sum(row.count("@") for row in picture) > 10  # ink, not a blank field
    assert lines[29].startswith("1 images classified")


def test_classify_cli_against_a_closed_port_exits_2_saying_it_cannot_reach(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(png_of(np.eye(28, dtype=np.uint8) * 255))
    with closed_port() as address:
        proc = cli("classify", "--target", address, "--timeout", "5", str(png))
    assert proc.returncode == 2
    assert "cannot reach" in proc.stderr and address in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_classify_cli_against_a_starting_server_says_it_is_starting(tmp_path):
    png = tmp_path / "x.png"
    png.write_bytes(png_of(np.eye(28, dtype=np.uint8) * 255))
    with starting_server() as app:
        proc = cli("classify", "--target", app.address, "--timeout", "5", str(png))
    assert proc.returncode == 2
    assert f"server at {app.address} is starting" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_classify_cli_with_a_missing_file_exits_2(server, tmp_path):
    proc = cli("classify", "--target", server.address, str(tmp_path / "missing.png"))
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr and "missing.png" in proc.stderr


# -- mnist-edge health --------------------------------------------------------------------------

def test_health_cli_exit_0_when_serving(server):
    proc = cli("health", "--target", server.address)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "SERVING"


def test_health_cli_exit_1_while_loading():
    with starting_server() as app:
        proc = cli("health", "--target", app.address)
        live = cli("health", "--target", app.address, "--service", "liveness")
    assert proc.returncode == 1
    assert "NOT_SERVING" in proc.stderr and "not ready" in proc.stderr, proc.stderr
    assert live.returncode == 0 and live.stdout.strip() == "SERVING (liveness)"


def test_health_cli_exit_1_for_an_unknown_service(server):
    proc = cli("health", "--target", server.address, "--service", "no.such.Service")
    assert proc.returncode == 1
    assert "SERVICE_UNKNOWN" in proc.stderr


def test_health_cli_exit_2_for_a_closed_port():
    with closed_port() as address:
        proc = cli("health", "--target", address, "--timeout", "5")
    assert proc.returncode == 2
    assert proc.stderr.startswith("UNREACHABLE:") and "cannot reach" in proc.stderr and address in proc.stderr, proc.stderr


def test_health_cli_quiet_prints_nothing(server):
    proc = cli("health", "--target", server.address, "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


@pytest.mark.parametrize("command", ["classify", "health"])
def test_a_bad_target_list_is_a_message_not_a_traceback(command, tmp_path, capsys):
    from mnist_edge.client import cli, health_cli

    main = cli.main if command == "classify" else health_cli.main
    argv = ["--target", "localhost:1,localhost:2"] + ([str(tmp_path / "x.png")] if command == "classify" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"mnist-edge {command}: --target 'localhost:1,localhost:2'" in err
    assert "several targets must be IPv4" in err


def test_a_call_the_server_cancelled_before_starting_it_is_retried():
    """gRPC core cancels a call that reaches a server whose shutdown has begun (issue 18): the
    client library sends it again, as it does an UNAVAILABLE one."""
    from concurrent import futures

    from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc

    attempts = []

    class Flaky(digits_pb2_grpc.DigitClassifierServicer):
        def Classify(self, request, context):
            attempts.append(len(attempts))
            if len(attempts) == 1:
                context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            return digits_pb2.ClassifyResponse(predictions=[digits_pb2.Prediction(digit=3, confidence=0.9)])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    digits_pb2_grpc.add_DigitClassifierServicer_to_server(Flaky(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with DigitClient(f"127.0.0.1:{port}", timeout=10) as c:
            predictions = c.classify([np.zeros((28, 28), np.uint8)])
        assert [p.digit for p in predictions] == [3] and len(attempts) == 2
    finally:
        server.stop(0)
