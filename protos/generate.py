"""Regenerate the Python modules under ``protos/`` from the ``.proto`` sources.

    python -m mnist_edge.protos.generate          write the generated files into protos/
    python -m mnist_edge.protos.generate --check  regenerate into a temporary folder and
                                                  exit 1, listing the files, if the
                                                  committed ones differ (drift)

Works from any current directory. The repository's protos/ folder is the Python
package ``mnist_edge.protos``, so protoc (from grpcio-tools) runs on an include
root where protos/ appears as ``mnist_edge/protos`` (a symlink in a temporary
folder): a proto imports another as
``import "mnist_edge/protos/inference/model_config.proto";`` and the generated
Python imports it as ``mnist_edge.protos.inference.model_config_pb2``. Protobuf
packages and service names (``inference``, ``digits.v1``) do not depend on
this. For every ``.proto`` file
under protos/ it writes ``*_pb2.py`` and ``*_pb2.pyi``, plus ``*_pb2_grpc.py``
when the file declares a service. Generated files that no longer have a source
are deleted (or, with ``--check``, reported).

The output depends only on the sources and the grpcio-tools version (the
generated code records both the protobuf and the grpcio versions it needs),
which is why grpcio-tools is pinned in the ``dev`` extra.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent

# The grpcio-tools release the committed files were generated with (the dev
# extra pins it). Another release may generate different bytes.
EXPECTED_GRPCIO_TOOLS = "1.85.1"

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_sources(root: Path = REPO_ROOT) -> list[str]:
    """The .proto files under protos/, as sorted repository-relative POSIX paths."""
    protos = root / "protos"
    return sorted(p.relative_to(root).as_posix() for p in protos.rglob("*.proto"))


def is_generated(name: str) -> bool:
    return name.endswith(GENERATED_SUFFIXES)


def committed_generated(root: Path = REPO_ROOT) -> list[str]:
    """Generated-looking files currently present under protos/ (relative paths)."""
    protos = root / "protos"
    return sorted(
        p.relative_to(root).as_posix()
        for p in protos.rglob("*")
        if p.is_file() and is_generated(p.name) and "__pycache__" not in p.parts
    )


def grpcio_tools_version() -> str:
    from grpc_tools import grpc_version  # noqa: PLC0415 (only needed here)

    return grpc_version.VERSION


def _well_known_include() -> str:
    import grpc_tools  # noqa: PLC0415

    return str(Path(grpc_tools.__file__).resolve().parent / "_proto")


# Where protos/ sits under protoc's include root: the package path of the generated modules.
PACKAGE_PREFIX = "mnist_edge/"


def _protoc(args: list[str], include_root: Path) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "-I", _well_known_include(), *args]
    # Relative source paths and a fixed cwd keep absolute paths out of the output.
    proc = subprocess.run(cmd, cwd=include_root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"protoc failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}"
        )


def _sources_with_services(sources: list[str], root: Path, work: Path) -> list[str]:
    from google.protobuf import descriptor_pb2  # noqa: PLC0415

    desc = work / "descriptors.pb"
    _protoc([f"--descriptor_set_out={desc}", *sources], root)
    fds = descriptor_pb2.FileDescriptorSet.FromString(desc.read_bytes())
    return sorted(f.name for f in fds.file if f.service)


def render(root: Path = REPO_ROOT) -> dict[str, bytes]:
    """Run protoc on every source and return {repository-relative path: bytes}."""
    sources = proto_sources(root)
    if not sources:
        raise RuntimeError(f"no .proto files under {root / 'protos'}")
    with tempfile.TemporaryDirectory(prefix="protos-gen-") as tmp:
        work = Path(tmp)
        include_root = work / "src"
        (include_root / PACKAGE_PREFIX).mkdir(parents=True)
        (include_root / PACKAGE_PREFIX / "protos").symlink_to((root / "protos").resolve(), target_is_directory=True)
        sources = [PACKAGE_PREFIX + s for s in sources]
        out = work / "out"
        out.mkdir()
        _protoc([f"--python_out={out}", f"--pyi_out={out}", *sources], include_root)
        with_services = _sources_with_services(sources, include_root, work)
        if with_services:
            _protoc([f"--grpc_python_out={out}", *with_services], include_root)
        files = {
            p.relative_to(out / PACKAGE_PREFIX).as_posix(): p.read_bytes()
            for p in sorted((out / PACKAGE_PREFIX).rglob("*"))
            if p.is_file()
        }
    unexpected = sorted(name for name in files if not (name.startswith("protos/") and is_generated(name)))
    if unexpected:
        raise RuntimeError(f"protoc wrote unexpected files: {unexpected}")
    return files


def drift(root: Path = REPO_ROOT, fresh: dict[str, bytes] | None = None) -> dict[str, list[str]]:
    """Compare freshly generated output with the files under ``root``.

    Returns {"changed": [...], "missing": [...], "stale": [...]}: files whose
    bytes differ, files protoc produces that are not committed, and generated
    files that are committed but no longer produced.
    """
    if fresh is None:
        fresh = render(root)
    changed, missing = [], []
    for name, data in sorted(fresh.items()):
        path = root / name
        if not path.is_file():
            missing.append(name)
        elif path.read_bytes() != data:
            changed.append(name)
    stale = [name for name in committed_generated(root) if name not in fresh]
    return {"changed": changed, "missing": missing, "stale": stale}


def write(root: Path = REPO_ROOT, fresh: dict[str, bytes] | None = None) -> list[str]:
    """Bring the generated files under ``root`` up to date; return what changed."""
    if fresh is None:
        fresh = render(root)
    report = drift(root, fresh)
    touched = []
    for name in report["changed"] + report["missing"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(fresh[name])
        os.replace(tmp, path)
        touched.append(f"wrote   {name}")
    for name in report["stale"]:
        (root / name).unlink()
        touched.append(f"removed {name}")
    return touched


def _version_note() -> str:
    have = grpcio_tools_version()
    if have == EXPECTED_GRPCIO_TOOLS:
        return ""
    return (
        f"\nnote: grpcio-tools {have} is installed but the committed files are generated with "
        f"grpcio-tools=={EXPECTED_GRPCIO_TOOLS} (pip install -e '.[dev]'); "
        "a different release can produce different bytes."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnist_edge.protos.generate", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 if the committed generated files differ from a fresh generation",
    )
    args = parser.parse_args(argv)

    fresh = render(REPO_ROOT)
    if args.check:
        report = drift(REPO_ROOT, fresh)
        problems = [
            f"  {kind:<8} {name}" for kind in ("changed", "missing", "stale") for name in report[kind]
        ]
        if problems:
            print(
                "protos: generated files are out of date with the .proto sources:\n"
                + "\n".join(problems)
                + "\nrun `python -m mnist_edge.protos.generate` and commit the result."
                + _version_note(),
                file=sys.stderr,
            )
            return 1
        print(f"protos: {len(fresh)} generated files up to date")
        return 0

    touched = write(REPO_ROOT, fresh)
    for line in touched:
        print(line)
    print(f"protos: {len(fresh)} generated files, {len(touched)} updated" + _version_note())
    return 0


if __name__ == "__main__":
    sys.exit(main())
