"""Every server dependency installs on linux aarch64 from a wheel, for Python 3.11-3.13.

The downloads need PyPI, which tests may not use: tools/arm64/check_wheels.py does them
(scripts/test runs it before pytest) and writes report.json; this test asserts on that
report. Without a report it fails in CI and skips elsewhere, naming the command.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "arm64"))
import check_wheels  # noqa: E402

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

COMMAND = ".venv/bin/python tools/arm64/check_wheels.py"


@pytest.fixture(scope="module")
def report() -> dict:
    path = check_wheels.default_dir() / "report.json"
    if not path.exists():
        msg = f"no aarch64 wheel report at {path}: run `{COMMAND}` (needs PyPI) first"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(msg)
        pytest.skip(msg)
    return json.loads(path.read_text())


def _base_deps() -> list[str]:
    with (REPO / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def test_report_is_for_the_current_dependencies(report):
    assert report["report_version"] == check_wheels.REPORT_VERSION
    assert report["pyproject_dependencies"] == _base_deps(), f"pyproject.toml's dependencies changed since the report: rerun `{COMMAND}`"
    assert report["pythons"] == list(check_wheels.PYTHONS)


def test_every_base_dependency_is_checked(report):
    checked = {p["name"] for p in report["packages"] if p["direct"]}
    wanted = {check_wheels.requirement_name(d) for d in _base_deps()}
    assert checked == wanted


@pytest.mark.parametrize("python", check_wheels.PYTHONS)
def test_aarch64_or_pure_python_wheel_for_each_package(report, python):
    cache = check_wheels.default_dir() / ("cp" + python.replace(".", ""))
    problems = []
    for p in report["packages"]:
        r = p["results"].get(python)
        if r is None or not r["ok"]:
            problems.append(f"{p['name']}=={p['version']}: {r and r.get('error')}")
            continue
        name = r["wheel"]
        kind = check_wheels.wheel_kind(name)
        # Judge the file name again rather than trusting the report's verdict.
        if kind == "aarch64":
            abi = r["abi_tag"]
            cp = "cp" + python.replace(".", "")
            compatible = abi == cp or (abi == "abi3" and int(r["python_tag"][3:]) <= int(cp[3:]) and r["python_tag"].startswith("cp3"))
            if not compatible:
                problems.append(f"{name}: ABI {abi} does not load on CPython {python}")
            glibc = r["min_glibc"]
            if glibc is None or tuple(map(int, glibc.split("."))) > (2, 28):
                problems.append(f"{name}: needs glibc {glibc} (> 2.28)")
        elif kind != "pure-python":
            problems.append(f"{name}: not an aarch64 or pure-Python wheel")
        if not (cache / name).exists():
            problems.append(f"{name} is not in {cache} (rerun `{COMMAND}`)")
        elif (cache / name).stat().st_size != r["bytes"]:
            problems.append(f"{name}: size differs from the report")
    assert not problems, "\n".join(problems)


def test_wheel_kind_classifies_file_names():
    assert check_wheels.wheel_kind("numpy-2.4.6-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl") == "aarch64"
    assert check_wheels.wheel_kind("grpcio_reflection-1.85.1-py3-none-any.whl") == "pure-python"
    assert check_wheels.wheel_kind("numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl") == "other"
    assert check_wheels.min_glibc("manylinux2014_aarch64.manylinux_2_17_aarch64") == "2.17"
    assert check_wheels.min_glibc("manylinux_2_27_aarch64.manylinux_2_28_aarch64") == "2.27"
    assert re.fullmatch(r"manylinux_2_\d+_aarch64", check_wheels.platforms(28)[-1])
