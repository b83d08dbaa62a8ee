"""Do the server's dependencies install on a 64-bit ARM Linux device without a compiler?

For every base dependency in pyproject.toml ([project].dependencies) and everything they
pull in, resolve the version a fresh install picks today (`pip install --dry-run
--ignore-installed --report`, on this machine's Python), then, for each target Python
(3.11, 3.12, 3.13), `pip download --only-binary=:all: --no-deps` exactly that version
for linux aarch64 (manylinux2014 / manylinux_2_17 .. manylinux_2_<max-glibc>) into a
cache directory. A dependency passes for a Python when an aarch64 wheel, or a
pure-Python (`none-any`) wheel, was downloaded: no sdist, no build on the device.

This needs PyPI, which the tests must not use, so it is a separate step: scripts/test
runs it before pytest and tests/edge/test_arm64_wheels.py asserts on the JSON report it
writes (DIR/report.json). The downloaded wheels stay in DIR/cp3XX/ and are reused by
tools/arm64/agreement.sh (the qemu check needs the aarch64 onnxruntime and numpy).

    python tools/arm64/check_wheels.py [--dir DIR] [--python 3.11 --python 3.12 ...]

DIR defaults to $MNIST_EDGE_ARM64_WHEELS, else ~/.cache/mnist-edge/arm64/wheels.
Exit status: 0 every dependency has a wheel for every Python; 1 one is missing;
2 the check itself could not run (no network, bad pyproject).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHONS = ("3.11", "3.12", "3.13")
ARCH = "aarch64"
REPORT_VERSION = 1


def default_dir() -> Path:
    env = os.environ.get("MNIST_EDGE_ARM64_WHEELS")
    return Path(env) if env else Path.home() / ".cache" / "mnist-edge" / "arm64" / "wheels"


def platforms(max_glibc_minor: int) -> list[str]:
    """pip does not widen manylinux_2_X to older glibc tags by itself: list them all."""
    tags = [f"manylinux2014_{ARCH}"]
    tags += [f"manylinux_2_{m}_{ARCH}" for m in range(17, max_glibc_minor + 1)]
    return tags


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def base_dependencies(pyproject: Path) -> list[str]:
    with pyproject.open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def requirement_name(req: str) -> str:
    return canonical(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def resolve(requirements: list[str], python: str = sys.executable) -> dict[str, dict]:
    """name -> {version, requested}: what `pip install` would pick in a fresh environment."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--report", str(report), *requirements]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"resolving {requirements} failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        data = json.loads(report.read_text())
    out = {}
    for item in data["install"]:
        meta = item["metadata"]
        out[canonical(meta["name"])] = {"version": meta["version"], "requested": bool(item.get("requested"))}
    return out


def wheelhouse_versions(wheelhouse: Path) -> dict[str, str]:
    found = {}
    for whl in sorted(wheelhouse.glob("*.whl")):
        parts = whl.name.split("-")
        found[canonical(parts[0])] = parts[1]
    return found


def wheel_tags(filename: str) -> dict:
    """name-version(-build)?-python-abi-platform.whl -> its tag fields."""
    parts = filename[: -len(".whl")].split("-")
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    return {"python_tag": py, "abi_tag": abi, "platform_tag": plat}


def wheel_kind(filename: str) -> str:
    tags = wheel_tags(filename)
    plats = tags["platform_tag"].split(".")
    if plats == ["any"]:
        return "pure-python"
    if all(p.endswith("_" + ARCH) for p in plats):
        return ARCH
    return "other"


def min_glibc(platform_tag: str) -> str | None:
    best = None
    for p in platform_tag.split("."):
        m = re.match(r"manylinux_(\d+)_(\d+)_", p)
        v = (int(m.group(1)), int(m.group(2))) if m else (2, 17) if p.startswith("manylinux2014") else None
        if v and (best is None or v < best):
            best = v
    return f"{best[0]}.{best[1]}" if best else None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(pins: list[str], python: str, dest: Path, plats: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python, "--dest", str(dest)]
    for p in plats:
        cmd += ["--platform", p]
    cmd += pins
    return cmd, subprocess.run(cmd, capture_output=True, text=True)


def download(name: str, version: str, python: str, dest: Path, plats: list[str], batch_ok: bool = False) -> dict:
    """`pip download` of one pinned package for linux aarch64 and one Python; what it fetched (or why not).

    With `batch_ok` the package was already fetched by one batched call for every package.
    """
    before = set(dest.glob("*.whl"))
    if batch_ok:
        cmd, proc = ["", "", "(batched)", f"{name}=={version}"], subprocess.CompletedProcess([], 0, "", "")
    else:
        cmd, proc = pip_download([f"{name}=={version}"], python, dest, plats)
    result: dict = {"command": " ".join(cmd[2:]), "returncode": proc.returncode}
    # pip skips the download when the file is already in dest: find it by name and version.
    stem = canonical(name).replace("-", "_")
    candidates = [w for w in dest.glob("*.whl") if canonical(w.name.split("-")[0]).replace("-", "_") == stem and w.name.split("-")[1] == version]
    if proc.returncode != 0 or not candidates:
        result.update(ok=False, error=(proc.stderr or proc.stdout).strip()[-1500:] or "pip downloaded nothing")
        return result
    new = [w for w in candidates if w not in before]
    whl = sorted(new or candidates)[0]
    kind = wheel_kind(whl.name)
    result.update(
        ok=kind in (ARCH, "pure-python"),
        wheel=whl.name,
        kind=kind,
        **wheel_tags(whl.name),
        min_glibc=min_glibc(wheel_tags(whl.name)["platform_tag"]),
        bytes=whl.stat().st_size,
        sha256=sha256(whl),
    )
    if not result["ok"]:
        result["error"] = f"{whl.name} is neither an {ARCH} nor a pure-Python wheel"
    return result


def check(out_dir: Path, pythons: list[str], max_glibc_minor: int, pyproject: Path, log=print) -> dict:
    deps = base_dependencies(pyproject)
    direct = {requirement_name(d): d for d in deps}
    resolved = resolve(deps)
    missing = sorted(set(direct) - set(resolved))
    if missing:
        raise RuntimeError(f"pip's resolution lacks {missing}")
    wheelhouse = Path(os.environ.get("MNIST_EDGE_WHEELHOUSE", REPO / "wheelhouse"))
    wh = wheelhouse_versions(wheelhouse) if wheelhouse.is_dir() else {}
    plats = platforms(max_glibc_minor)
    # One pip call per Python for every pin (fast when cached); per package only if it fails,
    # so a missing wheel is reported for exactly the package that lacks it.
    pins = [f"{n}=={resolved[n]['version']}" for n in sorted(resolved)]
    batched = {py: pip_download(pins, py, out_dir / ("cp" + py.replace(".", "")), plats)[1].returncode == 0 for py in pythons}
    packages = []
    for name in sorted(resolved, key=lambda n: (n not in direct, n)):
        version = resolved[name]["version"]
        entry = {
            "name": name,
            "version": version,
            "requirement": direct.get(name),
            "direct": name in direct,
            "wheelhouse_version": wh.get(name),
            "results": {},
        }
        for py in pythons:
            tag = "cp" + py.replace(".", "")
            r = download(name, version, py, out_dir / tag, plats, batch_ok=batched[py])
            entry["results"][py] = r
            log(f"{name:<24} {version:<10} py{py}: " + (f"{r['wheel']}" if r["ok"] else f"MISSING ({r.get('error', '')[:200]})"))
        entry["ok"] = all(r["ok"] for r in entry["results"].values())
        packages.append(entry)
    return {
        "report_version": REPORT_VERSION,
        "generated_unix": int(time.time()),
        "arch": ARCH,
        "pythons": pythons,
        "platforms": plats,
        "max_glibc": f"2.{max_glibc_minor}",
        "pip": subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split(" from ")[0],
        "resolved_with": f"pip install --dry-run --ignore-installed --only-binary=:all: (Python {sys.version.split()[0]}, {sys.platform})",
        "pyproject_dependencies": deps,
        "wheelhouse": str(wheelhouse) if wh else None,
        "packages": packages,
        "ok": all(p["ok"] for p in packages),
    }


def markdown(report: dict) -> str:
    pys = report["pythons"]
    lines = ["# aarch64 wheels for the server's dependencies", "",
             f"Platforms: {', '.join(report['platforms'])}; versions as {report['resolved_with']}.", "",
             "| package | version | direct | " + " | ".join(f"cp{p.replace('.', '')}" for p in pys) + " |",
             "|---|---|---|" + "---|" * len(pys)]
    for p in report["packages"]:
        cells = []
        for py in pys:
            r = p["results"][py]
            if not r["ok"]:
                cells.append("**missing**")
            elif r["kind"] == "pure-python":
                cells.append("pure Python")
            else:
                cells.append(f"{r['python_tag']}/{r['abi_tag']} glibc>={r['min_glibc']} ({r['bytes'] / 1e6:.1f} MB)")
        lines.append(f"| {p['name']} | {p['version']} | {'yes' if p['direct'] else 'no'} | " + " | ".join(cells) + " |")
    lines += ["", "All present." if report["ok"] else "**Some wheels are missing.**"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=default_dir(), help="cache directory for the wheels and report.json")
    ap.add_argument("--python", action="append", dest="pythons", help="target Python version (repeatable; default 3.11 3.12 3.13)")
    ap.add_argument("--max-glibc", type=int, default=28, metavar="MINOR", help="newest glibc the devices have, as 2.MINOR (default 28)")
    ap.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    args = ap.parse_args(argv)
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        report = check(args.dir, args.pythons or list(PYTHONS), args.max_glibc, args.pyproject)
    except (RuntimeError, OSError, KeyError) as exc:
        print(f"check_wheels: {exc}", file=sys.stderr)
        return 2
    tmp = args.dir / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.dir / "report.json")
    (args.dir / "report.md").write_text(markdown(report))
    print(f"report: {args.dir / 'report.json'} ({'ok' if report['ok'] else 'MISSING WHEELS'})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
