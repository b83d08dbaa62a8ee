"""digits.v1 over a real server: raw and encoded images, per-image and per-message errors, streams."""

from __future__ import annotations

import io
import struct
import zlib

import grpc
import numpy as np
import pytest
from PIL import Image

from mnist_edge.protos.digits.v1 import digits_pb2 as pb
from mnist_edge.protos.digits.v1 import digits_pb2_grpc as pb_grpc

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.DigitClassifierStub(channel)


@pytest.fixture(scope="module")
def reference(server, mnist):
    from helpers.servers import ort_reference

    return ort_reference(server.core.model.file, mnist.test.images)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_raw_pixels_are_used_as_is(stub, mnist, reference):
    probs, digits = reference
    images = mnist.test.images[:20]
    resp = stub.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=im.tobytes()) for im in images], return_probabilities=True, return_normalized_image=True, request_id="abc"))
    assert resp.request_id == "abc" and resp.model_version
    assert [p.digit for p in resp.predictions] == digits[:20].tolist()
    for i, p in enumerate(resp.predictions):
        assert p.normalized_image == images[i].tobytes()
        np.testing.assert_allclose(p.probabilities, probs[i], atol=1e-6)
        assert p.confidence == pytest.approx(probs[i].max(), abs=1e-6)
        assert not p.HasField("error")


def test_probabilities_only_when_asked(stub, mnist):
    resp = stub.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=mnist.test.images[0].tobytes())]))
    assert len(resp.predictions[0].probabilities) == 0 and resp.predictions[0].normalized_image == b""


def test_a_bad_image_gets_its_own_error_and_the_others_are_answered(stub, mnist, reference):
    _, digits = reference
    good = mnist.test.images[:2]
    resp = stub.Classify(
        pb.ClassifyRequest(
            images=[
                pb.Image(pixels=good[0].tobytes()),
                pb.Image(pixels=b"\0" * 783),
                pb.Image(encoded=b"this is not an image"),
                pb.Image(),
                pb.Image(pixels=good[1].tobytes()),
            ]
        )
    )
    p = resp.predictions
    assert len(p) == 5
    assert p[0].digit == digits[0] and p[4].digit == digits[1]
    assert p[1].error.code == INVALID and "exactly 784 bytes" in p[1].error.message and "got 783" in p[1].error.message
    assert p[2].error.code == INVALID and "expected PNG, JPEG, BMP or PGM" in p[2].error.message
    assert p[3].error.code == INVALID and "empty" in p[3].error.message


def test_message_level_errors_fail_the_unary_call(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no images" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(images=[pb.Image(pixels=b"\0" * 784)] * 1025))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1025 images in one request, over the limit of 1024" in info.value.details()


def test_oversized_encoded_image_is_refused(server, stub):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (server.settings.max_image_bytes + 1)
    resp = stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=big)]))
    err = resp.predictions[0].error
    assert err.code == INVALID and "over the limit of 4194304 bytes (--max-image-bytes)" in err.message


def _bomb_png(width: int, height: int) -> bytes:
    """A valid grayscale PNG of width x height black pixels: tiny on the wire, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\0" * (width + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header(stub, monkeypatch, mnist):
    """A 10000x10000 PNG (100 MB of pixels, ~100 KB on the wire): refused before any pixel is decoded.

    The proof is a spy on Pillow's decoder entry point, not timing: it must never be called
    for the bomb, and must be called for a normal image in the same request.
    """
    from PIL import ImageFile

    bomb = _bomb_png(10000, 10000)
    assert len(bomb) < 200_000
    calls: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        calls.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    normal = png(255 - mnist.test.images[0])
    resp = stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=bomb), pb.Image(encoded=normal)]))
    err = resp.predictions[0].error
    assert err.code == INVALID
    assert "10000x10000 = 100000000 pixels, over the limit of 16777216 pixels (--max-image-pixels); refused before decoding" in err.message
    assert (10000, 10000) not in calls  # the bomb's pixel data was never decoded
    assert (28, 28) in calls  # while the normal image was
    assert resp.predictions[1].digit == 7


def _variants(images: np.ndarray, rng: np.random.Generator) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {"light-on-dark": [], "dark-on-light": [], "off-centre": [], "larger": []}
    for im in images:
        out["light-on-dark"].append(png(im))
        out["dark-on-light"].append(png(255 - im))
        canvas = np.zeros((64, 64), np.uint8)
        y, x = rng.integers(0, 36, size=2)
        canvas[y : y + 28, x : x + 28] = im
        out["off-centre"].append(png(canvas))
        big = Image.fromarray(255 - im).resize((112, 112), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=92)
        out["larger"].append(buf.getvalue())
    return out


def test_encoded_variants_agree_with_raw_images(stub, mnist, reference, capsys):
    """>= 99% of a fixed, seeded sample of 1,000 test images per variant give the raw image's digit."""
    _, digits = reference
    rng = np.random.default_rng(1234)
    idx = np.sort(rng.choice(len(mnist.test.images), size=1000, replace=False))
    variants = _variants(mnist.test.images[idx], rng)
    report = []
    for name, blobs in variants.items():
        got = []
        for i in range(0, len(blobs), 100):
            resp = stub.Classify(pb.ClassifyRequest(images=[pb.Image(encoded=b) for b in blobs[i : i + 100]]))
            got += [p.digit if not p.HasField("error") else -1 for p in resp.predictions]
        got = np.array(got)
        misses = [(int(idx[j]), int(digits[idx[j]]), int(got[j])) for j in np.flatnonzero(got != digits[idx])]
        agreement = 1 - len(misses) / len(idx)
        report.append((name, agreement, misses))
        print(f"{name}: {100 * agreement:.1f}% agree with the raw image; misses (test index, raw digit, encoded digit): {misses}")
    for name, agreement, misses in report:
        assert agreement >= 0.99, f"{name}: {agreement:.3f} < 0.99; misses {misses}"


def test_stream_answers_in_order_and_survives_bad_messages(stub, mnist, reference):
    _, digits = reference
    images = mnist.test.images

    def requests():
        for i in range(30):
            if i == 10:
                yield pb.ClassifyRequest(request_id="empty")  # fails as a whole
            elif i == 20:
                yield pb.ClassifyRequest(images=[pb.Image(pixels=b"\0" * 784)] * 2000, request_id="too-many")
            else:
                yield pb.ClassifyRequest(images=[pb.Image(pixels=images[i].tobytes())], request_id=str(i))

    responses = list(stub.ClassifyStream(requests(), timeout=60))
    assert len(responses) == 30
    for i, r in enumerate(responses):
        if i == 10:
            assert r.request_id == "empty" and r.error.code == INVALID and "no images" in r.error.message
        elif i == 20:
            assert r.request_id == "too-many" and r.error.code == INVALID and "over the limit" in r.error.message
        else:
            assert r.request_id == str(i) and not r.HasField("error")
            assert r.predictions[0].digit == digits[i]


def test_get_model_info(stub, server):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    m = server.core.model
    assert (info.name, info.version, info.precision, info.sha256) == ("mnist", m.version, "int8", m.sha256)
    assert list(info.input_shape) == [28, 28] and info.max_images_per_request == 1024
    assert list(info.labels) == [str(d) for d in range(10)]
    assert "255 = full ink" in info.pixel_convention
