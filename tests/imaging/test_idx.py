import struct

import numpy as np
import pytest

from mnist_edge.imaging.idx import IdxError, check_pair, encode_idx, parse_idx, read_images_and_labels


def _images(n=3):
    return (np.arange(n * 28 * 28) % 256).astype(np.uint8).reshape(n, 28, 28)


def test_round_trip_all_dtypes():
    for dtype in (np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64):
        arr = (np.arange(24) - 5).astype(dtype).reshape(2, 3, 4)
        back = parse_idx(encode_idx(arr))
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back, arr)


def test_bad_magic_is_named():
    data = bytearray(encode_idx(_images()))
    data[0] = 0x1F
    data[1] = 0x8B
    with pytest.raises(IdxError, match=r"magic number starts with bytes 0x1f 0x8b, expected 0x00 0x00.*gzip"):
        parse_idx(bytes(data), source="x.idx")


def test_unknown_type_code():
    data = bytearray(encode_idx(_images()))
    data[2] = 0x42
    with pytest.raises(IdxError, match=r"unknown IDX type code 0x42"):
        parse_idx(bytes(data))


def test_truncated_data_says_how_much():
    data = encode_idx(_images(3))
    with pytest.raises(IdxError, match=r"truncated: dimensions \[3, 28, 28\] of uint8 need 2352 data bytes, found 2351"):
        parse_idx(data[:-1])


def test_truncated_header():
    with pytest.raises(IdxError, match=r"truncated header: 3 dimensions need 16 header bytes, file has 10"):
        parse_idx(bytes([0, 0, 8, 3]) + b"\x00" * 6)
    with pytest.raises(IdxError, match="too short"):
        parse_idx(b"\x00\x00")


def test_trailing_bytes_are_refused():
    with pytest.raises(IdxError, match="1 unexpected bytes after the data"):
        parse_idx(encode_idx(_images(1)) + b"\x00")


def test_count_mismatch_between_images_and_labels(tmp_path):
    (tmp_path / "img").write_bytes(encode_idx(_images(3)))
    (tmp_path / "lab").write_bytes(encode_idx(np.array([1, 2], dtype=np.uint8)))
    with pytest.raises(IdxError, match=r"count mismatch: .*img holds 3 images but .*lab holds 2 labels"):
        read_images_and_labels(tmp_path / "img", tmp_path / "lab")


def test_labels_must_be_digits():
    with pytest.raises(IdxError, match="label 12 out of range"):
        check_pair(_images(2), np.array([1, 12], dtype=np.uint8))


def test_header_declares_dimensions_big_endian():
    data = encode_idx(_images(2))
    assert data[:4] == bytes([0, 0, 0x08, 3])
    assert struct.unpack(">3I", data[4:16]) == (2, 28, 28)


def test_real_mnist_files_parse(mnist):
    assert mnist.train.images.shape == (60000, 28, 28) and mnist.train.images.dtype == np.uint8
    assert mnist.test.images.shape == (10000, 28, 28)
    assert mnist.test.labels[:5].tolist() == [7, 2, 1, 0, 4]
