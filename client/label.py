"""`mnist-edge label DIR`: label field captures (server/capture.py) in a terminal, one key each.

Shows each capture without a label, oldest first: the 28x28 image the model saw (as
`classify --show` prints it), the model's guess and confidence. Keys: 0-9 label it, x "not a
digit", s skip (asked again next run), u undo, q quit. Every key that changes a label rewrites
DIR/labels.csv (`file,label`) at once, atomically, so a run can stop anywhere and resume.
Needs nothing beyond the server-only install. docs/field-loop.md has the whole loop.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_edge.client.cli import ascii_art

LABELS_FILE = "labels.csv"
NOT_A_DIGIT = "x"
VALID_LABELS = frozenset([str(d) for d in range(10)] + [NOT_A_DIGIT])
CLEAR = "\x1b[H\x1b[2J"
KEYS_HELP = "0-9 label   x not a digit   s skip   u undo   q quit"


@dataclass(frozen=True)
class Capture:
    file: str  # the PNG's path relative to the capture folder, with "/" (the key in labels.csv)
    meta: dict


def find_captures(root: Path) -> list[Capture]:
    """Every complete capture under `root` (its .json sidecar exists), oldest first."""
    out = []
    for sidecar in sorted(root.glob("*/*.json"), key=lambda p: p.name):
        if sidecar.name.startswith("."):
            continue
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue  # being pruned or damaged: not offered
        image = sidecar.parent / meta.get("image", "")
        if image.is_file():
            out.append(Capture(f"{sidecar.parent.name}/{image.name}", meta))
    return out


def read_labels(root: Path) -> dict[str, str]:
    """labels.csv as {file: label}; unknown labels and a missing file are ignored."""
    labels: dict[str, str] = {}
    try:
        with open(root / LABELS_FILE, newline="") as f:
            for row in csv.reader(f):
                if len(row) == 2 and row[1] in VALID_LABELS and row[0] != "file":
                    labels[row[0]] = row[1]
    except FileNotFoundError:
        pass
    return labels


def write_labels(root: Path, labels: dict[str, str]) -> None:
    """labels.csv rewritten whole under a temporary name and renamed: never half written."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "label"])
    writer.writerows(labels.items())
    tmp = root / f".{LABELS_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LABELS_FILE)


def load_pixels(root: Path, capture: Capture) -> np.ndarray:
    from PIL import Image

    with Image.open(root / capture.file) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


class Session:
    """The labelling state: what is left, what was done this run (for undo), the saved labels."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.labels = read_labels(root)
        self.todo = [c for c in find_captures(root) if c.file not in self.labels]
        self.total = len(self.todo)
        self.position = 0  # index into todo of the capture shown
        self.history: list[tuple[int, str | None]] = []  # (position, label it replaced or None) per key
        self.done_this_run = 0

    @property
    def current(self) -> Capture | None:
        return self.todo[self.position] if self.position < len(self.todo) else None

    def key(self, key: str) -> str:
        """Apply one key; returns what happened, for the status line."""
        capture = self.current
        if key == "u":
            return self.undo()
        if capture is None:
            return "nothing left to label"
        if key in VALID_LABELS:
            self.history.append((self.position, self.labels.get(capture.file)))
            self.labels[capture.file] = key
            write_labels(self.root, self.labels)
            self.position += 1
            self.done_this_run += 1
            return f"{capture.file}: {'not a digit' if key == NOT_A_DIGIT else key}"
        if key == "s":
            self.history.append((self.position, "s"))
            self.position += 1
            return f"{capture.file}: skipped"
        return f"key {key!r} does nothing here ({KEYS_HELP})"

    def undo(self) -> str:
        if not self.history:
            return "nothing to undo"
        position, replaced = self.history.pop()
        self.position = position
        capture = self.todo[position]
        if replaced == "s":
            return f"{capture.file}: skip undone"
        if replaced is None:
            self.labels.pop(capture.file, None)
        else:
            self.labels[capture.file] = replaced
        write_labels(self.root, self.labels)
        self.done_this_run -= 1
        return f"{capture.file}: label undone"

    def screen(self, status: str) -> str:
        capture = self.current
        lines = [f"mnist-edge label {self.root}    {len(self.labels)} labelled in all, {self.done_this_run} this run"]
        if capture is None:
            skipped = sum(1 for _, replaced in self.history if replaced == "s")
            lines += ["", f"all {self.total} captures gone through: {self.done_this_run} labelled, {skipped} skipped.", "u undo   q quit"]
        else:
            meta = capture.meta
            confidence = meta.get("confidence")
            guess = f"model's guess: {meta.get('digit', '?')}" + (f" ({100 * confidence:.1f}%)" if isinstance(confidence, (int, float)) else "")
            lines += [
                f"capture {self.position + 1} of {self.total}: {capture.file}",
                f"{guess}    model v{meta.get('model', {}).get('version', '?')}    {meta.get('api', '')}    {meta.get('time', '')}",
                "",
                ascii_art(load_pixels(self.root, capture)),
                "",
                KEYS_HELP,
            ]
        lines += ["", status]
        return "\n".join(lines)


@contextlib.contextmanager
def raw_keys(stream):
    """Keys one at a time from a terminal (no Enter needed); from a pipe, one character at a time."""
    if not stream.isatty():
        yield lambda: stream.read(1)
        return
    import termios
    import tty

    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield lambda: os.read(fd, 1).decode("latin-1")
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mnist-edge label", description="Label field captures (a server's --capture-dir) in the terminal, one key each.",
                                 epilog=f"keys: {KEYS_HELP}. Labels go to DIR/{LABELS_FILE} (file,label), saved after every key.")
    ap.add_argument("dir", type=Path, metavar="DIR", help="the --capture-dir folder of a server")
    args = ap.parse_args(argv)
    if not args.dir.is_dir():
        print(f"mnist-edge label: {args.dir} is not a folder (expected a server's --capture-dir)", file=sys.stderr)
        return 2
    session = Session(args.dir)
    if session.total == 0:
        print(f"nothing to label in {args.dir}: {len(session.labels)} captures labelled, none waiting")
        return 0
    out = sys.stdout
    status = f"{session.total} captures to label"
    with raw_keys(sys.stdin) as read_key:
        while True:
            out.write(CLEAR + session.screen(status) + "\n")
            out.flush()
            try:
                key = read_key()
            except KeyboardInterrupt:
                break
            if key in ("", "q", "\x03", "\x04"):  # end of input, q, Ctrl-C, Ctrl-D
                break
            if key in ("\n", "\r", " "):
                continue
            status = session.key(key.lower())
    print(f"saved: {len(session.labels)} labels in {args.dir / LABELS_FILE} ({session.done_this_run} this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
