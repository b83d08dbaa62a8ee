"""Field capture: keep the inputs the model was unsure about, for a person to label later.

Off unless `--capture-dir` is set (captured images are user data). The inference handlers
(server/rpc.py) offer each answered request here once: `offer` picks the images whose top
probability is below `--capture-below` (plus a `--capture-sample` fraction of the confident
ones), copies the little it needs and puts it on a queue bounded in items and bytes. One
writer thread turns queued captures into files; a full queue or a failed write drops the
capture and counts it, so capturing never delays or fails a request.

On disk (docs/field-loop.md): DIR/YYYY-MM-DD/<UTC time>-<pid>-<seq>.png (the 28x28 image the
model saw), the same name with .orig.<ext> (the encoded bytes the client sent, when it sent
a file) and .json (the sidecar, written last: a capture exists once its .json does). Names
sort by time. Files are 0640 (0600 with --capture-private), folders 0750 (0700). The writer
removes the oldest captures beyond --capture-max-mb and those older than
--capture-max-age-days.
"""

from __future__ import annotations

import calendar
import collections
import io
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_edge.server import logs

OPT_OUT_HEADER = "x-mnist-edge-capture"
OPT_OUT_VALUES = frozenset({"off", "0", "false", "no"})
MAX_QUEUE_ITEMS = 256
MAX_QUEUE_BYTES = 8 * 1024 * 1024
PRUNE_TO = 0.9  # pruning for size frees down to this share of the budget, so it runs rarely
AGE_CHECK_S = 600.0  # how often the writer looks for captures past --capture-max-age-days
_WARN_EVERY_S = 60.0
DAY_FORMAT = "%Y-%m-%d"
# Magic bytes -> file extension of the original upload (anything else is kept as .bin).
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"BM", "bmp"), (b"P2", "pgm"), (b"P5", "pgm"))


def original_extension(data: bytes) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    return "bin"


def opted_out(value: str | None) -> bool:
    return value is not None and value.strip().lower() in OPT_OUT_VALUES


@dataclass
class Item:
    """One image to write: everything copied out of the request, nothing shared with it."""

    pixels: np.ndarray  # uint8 [28,28]
    original: bytes | None
    meta: dict

    @property
    def size(self) -> int:
        return 784 + (len(self.original) if self.original else 0) + 512


class Capture:
    """The capture queue and its writer thread, for one server process."""

    def __init__(self, directory: str, below: float, sample: float, max_mb: float, max_age_days: float, private: bool,
                 max_image_bytes: int, max_items: int = MAX_QUEUE_ITEMS, max_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.dir = Path(directory)
        self.below = below
        self.sample = sample
        self.max_bytes_on_disk = int(max_mb * 1024 * 1024)
        self.max_age_s = max_age_days * 86400.0 if max_age_days > 0 else 0.0
        self.file_mode = 0o600 if private else 0o640
        self.dir_mode = 0o700 if private else 0o750
        # An original upload is kept within --max-image-bytes and a tenth of the folder's budget:
        # one large photo must not push every other capture out.
        self.max_original_bytes = min(max_image_bytes, self.max_bytes_on_disk // 10)
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.counts = {"kept": 0, "dropped": 0, "error": 0}
        self._queue: collections.deque[Item] = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._accepted = 0  # captures queued, and captures the writer has finished with
        self._done = 0
        self._closed = False
        self._random = random.Random()
        self._seq = 0
        self._pid = os.getpid()
        self._last_warning = 0.0
        # Captures on disk, oldest first: (stem path, bytes). Built by a scan, extended per write.
        self._index: collections.deque[tuple[Path, int]] = collections.deque()
        self._disk_bytes = 0
        self._last_age_check = 0.0
        self.usable = self._check_dir()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        self._thread.start()

    # -- on the request's thread: cheap --------------------------------------------------------
    def offer(self, api: str, request_id: str, result, pixels: np.ndarray, originals, header) -> None:
        """Queue the images of one answered request that are worth keeping.

        `pixels` uint8 [N,28,28] as the model saw them, `result` their Result, `originals`
        a callable giving the encoded bytes of image j (or None), `header(name)` the
        request's metadata/header value. Never raises, never blocks."""
        try:
            probs = result.probabilities
            top = probs.max(axis=1)
            keep = [j for j in range(len(top)) if top[j] < self.below or (self.sample > 0 and self._random.random() < self.sample)]
            if not keep or opted_out(header(OPT_OUT_HEADER)):
                return
            model = result.tag
            now = time.time()
            for j in keep:
                original = originals(j) if originals is not None else None
                if original is not None and len(original) > self.max_original_bytes:
                    original = None  # the PNG and sidecar are still kept
                digit = int(result.digits[j])
                meta = {
                    "time": now,
                    "api": api,
                    "request_id": request_id,
                    "index": j,
                    "reason": "below" if top[j] < self.below else "sample",
                    "model": {"name": model.name, "version": model.version, "precision": model.precision, "sha256": model.sha256},
                    "digit": digit,
                    "confidence": float(top[j]),
                    "probabilities": [float(p) for p in probs[j]],
                }
                self._put(Item(np.array(pixels[j], dtype=np.uint8, copy=True), original, meta))
        except Exception:  # noqa: BLE001 - capturing must never fail a request
            self._count("error")
            self._warn("capture_failed", "could not queue a capture", exc_info=True)

    def _put(self, item: Item) -> None:
        size = item.size
        with self._cond:
            if self._closed or len(self._queue) >= self.max_items or self._queued_bytes + size > self.max_bytes:
                self.counts["dropped"] += 1
                return
            self._queue.append(item)
            self._queued_bytes += size
            self._accepted += 1
            self._cond.notify_all()  # the writer, and any flush() waiting

    def _count(self, result: str) -> None:
        with self._cond:
            self.counts[result] += 1

    def _finished(self, result: str) -> None:
        with self._cond:
            self.counts[result] += 1
            self._done += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued capture is written or failed; True if so within `timeout`."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._accepted, timeout)

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return dict(self.counts)

    def close(self, timeout: float = 2.0) -> None:
        """Stop taking captures; the writer finishes what is queued (for up to `timeout`)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the writer thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            # Lowest CPU priority for this thread alone (Linux: a thread is a task): on a one-core
            # device the serving threads run first and the writer catches up when they idle.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):
            pass
        try:
            self._scan()
            self._prune_age()
        except OSError:
            pass  # an unusable folder: each write will fail and be counted
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait(AGE_CHECK_S)
                    if not self._queue:
                        break
                if not self._queue and self._closed:
                    return
                item = self._queue.popleft() if self._queue else None
                if item is not None:
                    self._queued_bytes -= item.size
            if item is not None:
                try:
                    self._write(item)
                    self._finished("kept")
                except Exception as exc:  # noqa: BLE001 - a failed write is counted, never raised
                    self._finished("error")
                    self._warn("capture_write_failed", f"could not write a capture to {self.dir}: {exc}")
            try:
                self._prune()
            except OSError as exc:
                self._warn("capture_prune_failed", f"could not prune captures in {self.dir}: {exc}")

    def _write(self, item: Item) -> None:
        from PIL import Image

        t = item.meta["time"]
        day = self.dir / time.strftime(DAY_FORMAT, time.gmtime(t))
        if not day.is_dir():
            self.dir.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            day.mkdir(mode=self.dir_mode, exist_ok=True)
            os.chmod(day, self.dir_mode)  # exactly this mode, whatever the umask
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f"{t % 1:.6f}"[1:] + "Z"
        stem = day / f"{stamp}-{self._pid}-{self._seq:06d}"
        buf = io.BytesIO()
        Image.fromarray(item.pixels, "L").save(buf, "PNG")
        written = self._file(stem.with_name(stem.name + ".png"), buf.getvalue())
        meta = dict(item.meta)
        meta["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f"{t % 1:.6f}"[1:] + "Z"
        meta["image"] = stem.name + ".png"
        meta["original"] = None
        if item.original is not None:
            name = f"{stem.name}.orig.{original_extension(item.original)}"
            written += self._file(stem.with_name(name), item.original)
            meta["original"] = name
        text = (json.dumps(meta, indent=1) + "\n").encode()
        written += self._file(stem.with_name(stem.name + ".json"), text)
        self._index.append((stem, written))
        self._disk_bytes += written

    def _file(self, path: Path, data: bytes) -> int:
        """Write `data` at `path` with the capture file mode (via a temporary name: readers
        never see half a file)."""
        tmp = path.with_name("." + path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, self.file_mode)
        try:
            os.fchmod(fd, self.file_mode)  # exactly this mode, whatever the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        return len(data)

    # -- pruning ---------------------------------------------------------------------------------
    def _scan(self) -> None:
        """Index the captures on disk (every process's), oldest first."""
        stems: dict[Path, int] = {}
        for day in sorted(p for p in self.dir.iterdir() if p.is_dir() and is_day_folder(p.name)):
            for entry in os.scandir(day):
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False) or not is_capture_file(entry.name):
                    continue  # pruning never touches what the writer did not make
                stem = day / capture_stem(entry.name)
                stems[stem] = stems.get(stem, 0) + entry.stat(follow_symlinks=False).st_size
        self._index = collections.deque(sorted(stems.items(), key=lambda kv: kv[0].name))
        self._disk_bytes = sum(stems.values())

    def _prune(self) -> None:
        if self.max_age_s and time.monotonic() - self._last_age_check > AGE_CHECK_S:
            self._prune_age()
        if self._disk_bytes <= self.max_bytes_on_disk:
            return
        # Other worker processes write here too: count what is really there before deleting.
        self._scan()
        target = int(self.max_bytes_on_disk * PRUNE_TO)
        while self._index and self._disk_bytes > target:
            stem, size = self._index.popleft()
            _remove_capture(stem)
            self._disk_bytes -= size

    def _prune_age(self) -> None:
        self._last_age_check = time.monotonic()
        if not self.max_age_s:
            return
        cutoff = time.time() - self.max_age_s
        kept: collections.deque[tuple[Path, int]] = collections.deque()
        for stem, size in self._index:
            if _stem_time(stem.name) < cutoff:
                _remove_capture(stem)
                self._disk_bytes -= size
            else:
                kept.append((stem, size))
        self._index = kept
        _remove_empty_days(self.dir)

    # -- start-up check and warnings ---------------------------------------------------------------
    def _check_dir(self) -> bool:
        """True when the folder can be written; otherwise a warning (the server serves anyway)."""
        try:
            self.dir.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
            probe = self.dir / f".probe-{self._pid}"
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as exc:
            logs.event("capture_unusable", f"--capture-dir {self.dir} is not usable ({exc.strerror or exc}); serving without capture "
                       "until it is (each failed write is counted in mnist_edge_captures_total{result=\"error\"})",
                       logging.WARNING, capture_dir=str(self.dir))
            self._last_warning = time.monotonic()
            return False

    def _warn(self, event: str, message: str, exc_info=None) -> None:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_S:
            self._last_warning = now
            logs.event(event, message + " (further failures are counted, logged at most once a minute)", logging.WARNING, exc_info=exc_info)


def _stem_time(name: str) -> float:
    """Seconds since the epoch from a capture name (its UTC time); 0 for a name that is not one."""
    try:
        whole = name.split("-", 1)[0].rstrip("Z").split(".", 1)[0]
        return float(calendar.timegm(time.strptime(whole, "%Y%m%dT%H%M%S")))
    except ValueError:
        return 0.0


def capture_stem(file_name: str) -> str:
    """The capture a file belongs to: its name without .png, .json or .orig.<ext>."""
    if ".orig." in file_name:
        return file_name[: file_name.index(".orig.")]
    return file_name.rsplit(".", 1)[0]


_ORIGINAL_EXTENSIONS = sorted({ext for _, ext in _MAGIC} | {"bin"})


def _remove_capture(stem: Path) -> int:
    """Delete every file of one capture (the sidecar first: readers look for it); returns how many."""
    removed = 0
    for suffix in (".json", ".png", *(f".orig.{ext}" for ext in _ORIGINAL_EXTENSIONS)):
        try:
            os.unlink(f"{stem}{suffix}")
            removed += 1
        except FileNotFoundError:
            pass  # not part of this capture, or another process pruned it first
    return removed


def _remove_empty_days(directory: Path) -> None:
    for day in directory.iterdir():
        if day.is_dir() and is_day_folder(day.name):
            try:
                day.rmdir()
            except OSError:
                pass  # not empty


def from_settings(settings) -> Capture | None:
    if not settings.capture_dir:
        return None
    return Capture(settings.capture_dir, settings.capture_below, settings.capture_sample, settings.capture_max_mb,
                   settings.capture_max_age_days, settings.capture_private, settings.max_image_bytes)


# -- mnist-edge captures purge ---------------------------------------------------------------------
def is_day_folder(name: str) -> bool:
    try:
        return time.strftime(DAY_FORMAT, time.strptime(name, DAY_FORMAT)) == name
    except ValueError:
        return False


def is_capture_file(name: str) -> bool:
    """A file the writer makes: <UTC time>Z-<pid>-<seq> with .png, .json, .orig.<ext>, or its temporary name."""
    name = name[1:] if name.startswith(".") and name.endswith(".tmp") else name
    return _stem_time(capture_stem(name)) > 0 and "Z-" in name


def purge(directory: str, before: str | None = None) -> int:
    """Delete captures (all, or those of days before `before`, YYYY-MM-DD); returns how many.
    Only day folders and the files the writer makes are touched: pointed at the wrong folder,
    purge deletes nothing else."""
    root = Path(directory)
    count = 0
    for day in sorted(p for p in root.iterdir() if p.is_dir() and is_day_folder(p.name)):
        if before is not None and day.name >= before:
            continue
        for entry in os.scandir(day):
            if entry.is_file(follow_symlinks=False) and is_capture_file(entry.name):
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    count += 1
                os.unlink(entry.path)
        try:
            day.rmdir()
        except OSError:
            pass  # something that is not a capture is in it: left alone
    return count


def main(argv: list[str] | None = None) -> int:
    """`mnist-edge captures purge DIR [--before DATE]`."""
    import argparse
    import datetime

    ap = argparse.ArgumentParser(prog="mnist-edge captures", description="Manage field captures (docs/field-loop.md).")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("purge", help="delete captures: all of them, or the days before --before")
    p.add_argument("dir", help="the --capture-dir folder")
    p.add_argument("--before", metavar="DATE", help="delete only the captures of days before DATE (YYYY-MM-DD, UTC)")
    args = ap.parse_args(argv)
    if args.before is not None:
        try:
            args.before = datetime.date.fromisoformat(args.before).isoformat()
        except ValueError:
            ap.error(f"--before: expected a date as YYYY-MM-DD, got {args.before!r}")
    if not Path(args.dir).is_dir():
        ap.error(f"{args.dir} is not a folder")
    count = purge(args.dir, args.before)
    print(f"deleted {count} capture{'s' if count != 1 else ''} from {args.dir}" + (f" (days before {args.before})" if args.before else ""))
    return 0
