"""`mnist-edge label`, driven through a real terminal (tmux send-keys / capture-pane)."""

from __future__ import annotations

import csv
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers.digits import digit_pngs
from helpers.servers import wait_for
from mnist_edge.client.cli import ascii_art
from mnist_edge.imaging.normalize import normalize_encoded
from mnist_edge.server import capture

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (scripts/test installs it)")


class _Model:
    name, version, precision, sha256 = "mnist", "3", "int8", "0" * 64


class _Result:
    def __init__(self, digit: int, confidence: float) -> None:
        p = np.full((1, 10), (1 - confidence) / 9, np.float32)
        p[0, digit] = confidence
        self.probabilities, self.digits, self.tag = p, np.array([digit]), _Model()


def make_captures(root: Path, n: int) -> list[np.ndarray]:
    """`n` real captures written by the server's own writer; returns the images, oldest first."""
    c = capture.Capture(str(root), below=1.0, sample=0.0, max_mb=10, max_age_days=0, private=False, max_image_bytes=1 << 20)
    images = []
    try:
        for i, (_, png) in enumerate(digit_pngs()[:n]):
            pixels = normalize_encoded(png)
            images.append(pixels)
            c.offer("native", f"r{i}", _Result((i + 1) % 10, 0.5 + i / 100), pixels[None], lambda j, png=png: png, lambda name: None)
            assert c.flush(10)
    finally:
        c.close()
    return images


class Terminal:
    """A command in a detached tmux session of its own (its own socket: no user's tmux is touched)."""

    def __init__(self, command: list[str], cwd: Path) -> None:
        self.socket = f"mnist-edge-test-{uuid.uuid4().hex[:8]}"
        env_prefix = f"cd {shlex.quote(str(cwd))} && "
        self._tmux("new-session", "-d", "-x", "120", "-y", "60", env_prefix + " ".join(shlex.quote(a) for a in command) + "; sleep 30")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True, timeout=10).stdout

    def keys(self, *keys: str) -> None:
        for key in keys:
            self._tmux("send-keys", "-t", "0", "-l", key)
            time.sleep(0.05)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "0")

    def wait_for_text(self, text: str, timeout: float = 20) -> str:
        def shown():
            screen = self.screen()
            return screen if text in screen else None

        try:
            return wait_for(shown, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"{text!r} not shown; the terminal shows:\n{self.screen()}") from None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10, check=False)


@pytest.fixture
def terminal_factory():
    opened: list[Terminal] = []

    def start(root: Path) -> Terminal:
        t = Terminal([sys.executable, "-m", "mnist_edge", "label", str(root)], root)
        opened.append(t)
        return t

    yield start
    for t in opened:
        t.close()


def labels(root: Path) -> list[tuple[str, str]]:
    with open(root / "labels.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label"]
    return [tuple(r) for r in rows[1:]]


def test_label_through_a_real_terminal_saves_every_key_and_resumes(tmp_path, terminal_factory):
    root = tmp_path / "captures"
    images = make_captures(root, 5)
    files = sorted(f"{p.parent.name}/{p.name}" for p in root.glob("*/*.png") if ".orig." not in p.name)
    assert len(files) == 5

    t = terminal_factory(root)
    first = t.wait_for_text("capture 1 of 5")
    assert ascii_art(images[0]).splitlines()[10].rstrip() in first, "the picture is drawn as classify --show draws it"
    assert "model's guess: 1 (50.0%)" in first
    t.keys("7")
    t.wait_for_text("capture 2 of 5")
    assert labels(root) == [(files[0], "7")], "saved after the key, before quitting"
    t.keys("s")  # skip the second
    t.wait_for_text("capture 3 of 5")
    t.keys("x")  # the third is not a digit
    t.wait_for_text("capture 4 of 5")
    t.keys("u")  # undo "not a digit"
    t.wait_for_text("capture 3 of 5")
    assert labels(root) == [(files[0], "7")]
    t.keys("3")
    t.wait_for_text("capture 4 of 5")
    t.keys("q")
    t.wait_for_text("saved: 2 labels")
    assert labels(root) == [(files[0], "7"), (files[2], "3")]

    # A second run offers only what has no label yet: the skipped one, then the last two.
    t2 = terminal_factory(root)
    screen = t2.wait_for_text("capture 1 of 3")
    assert files[1] in screen
    assert ascii_art(images[1]).splitlines()[10].rstrip() in screen
    t2.keys("2", "4", "9")
    t2.wait_for_text("all 3 captures gone through")
    t2.keys("q")
    t2.wait_for_text("saved: 5 labels")
    assert dict(labels(root)) == {files[0]: "7", files[1]: "2", files[2]: "3", files[3]: "4", files[4]: "9"}


def test_label_help_and_an_empty_folder(tmp_path):
    env = {**os.environ}
    out = subprocess.run([sys.executable, "-m", "mnist_edge", "label", "--help"], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0 and "labels.csv" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mnist_edge", "label", str(tmp_path)], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 0 and "nothing to label" in out.stdout
    out = subprocess.run([sys.executable, "-m", "mnist_edge", "label", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert out.returncode == 2 and "not a folder" in out.stderr


def test_served_captures_labelled_in_the_terminal_become_training_data(tmp_path, terminal_factory):
    """The loop up to fine-tuning: a server captures what it is sent, a person labels it in the
    terminal from the truth, and training reads exactly those images with those labels."""
    import grpc

    from helpers.servers import running_server
    from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
    from mnist_edge.training import captures

    root = tmp_path / "captures"
    sent = digit_pngs()[:8]
    with running_server(capture_dir=str(root), capture_below=1.0) as app, grpc.insecure_channel(app.address) as ch:
        stub = digits_pb2_grpc.DigitClassifierStub(ch)
        for _, png in sent:  # one at a time: the captures' names sort in the order sent
            stub.Classify(digits_pb2.ClassifyRequest(images=[digits_pb2.Image(encoded=png)]), timeout=20)
        assert app.core.capture.flush(20)
    t = terminal_factory(root)
    t.wait_for_text(f"capture 1 of {len(sent)}")
    for i, (digit, _) in enumerate(sent):
        t.wait_for_text(f"capture {i + 1} of {len(sent)}")
        t.keys(str(digit))
    t.wait_for_text(f"all {len(sent)} captures gone through")
    t.keys("q")
    t.wait_for_text(f"saved: {len(sent)} labels")
    train, held = captures.load([root], held_out=0.0)
    assert len(held) == 0
    assert train.labels.tolist() == [digit for digit, _ in sent]
    for image, (_, png) in zip(train.images, sent):
        assert np.array_equal(image, normalize_encoded(png))
