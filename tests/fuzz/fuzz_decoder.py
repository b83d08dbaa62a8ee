"""atheris target: the image decoder and normaliser the server runs on untrusted bytes.

The only allowed outcomes are a 28x28 uint8 array or imaging.normalize.ImageError; any other
exception is a crash, which atheris reports with the input that caused it. Run it as
    python tests/fuzz/fuzz_decoder.py CORPUS_DIR -runs=100000 -max_total_time=60
"""

import sys

import atheris

with atheris.instrument_imports():
    import numpy as np

    from mnist_edge.imaging.normalize import ImageError, ImageLimits, normalize_encoded

# Small limits so the fuzzer spends its time on parsing, not on decoding huge pictures.
LIMITS = ImageLimits(max_bytes=256 * 1024, max_pixels=512 * 512)


def test_one_input(data: bytes) -> None:
    try:
        out = normalize_encoded(data, LIMITS)
    except ImageError:
        return
    if out.shape != (28, 28) or out.dtype != np.uint8:
        raise AssertionError(f"normalize_encoded returned {out.dtype} {out.shape}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
