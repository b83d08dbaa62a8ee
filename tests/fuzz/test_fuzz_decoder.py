"""A fuzzing run of the image decoder, seeded with valid images: at least 60 s or 100,000 executions."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

atheris = pytest.importorskip("atheris", reason="atheris is in the dev extra (x86-64 Linux wheels)")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def seed_corpus(directory: Path, images: np.ndarray) -> int:
    """Valid PNG, JPEG, BMP and PGM files of MNIST digits, both polarities, several sizes."""
    n = 0
    for i, im in enumerate(images[:12]):
        for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("BMP", "bmp"), ("PPM", "pgm")):
            pic = Image.fromarray(im if i % 2 else 255 - im)
            if i % 3 == 0:
                pic = pic.resize((56, 40))
            buf = io.BytesIO()
            pic.save(buf, format=fmt)
            (directory / f"seed{i}.{ext}").write_bytes(buf.getvalue())
            n += 1
    rgba = Image.fromarray(images[0]).convert("RGBA")
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    (directory / "rgba.png").write_bytes(buf.getvalue())
    return n + 1


def test_fuzz_the_image_decoder(tmp_path, mnist):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    seed_corpus(corpus, mnist.test.images)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "fuzz_decoder.py"), str(corpus), "-runs=100000", "-max_total_time=60", "-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    runs = re.search(r"Done (\d+) runs in (\d+) second", output)
    assert runs, output[-2000:]
    executions, seconds = int(runs.group(1)), int(runs.group(2))
    print(f"fuzzed the decoder: {executions} executions in {seconds} s, no crash")
    assert executions >= 100_000 or seconds >= 59, (executions, seconds)
