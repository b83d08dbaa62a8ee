"""The server relies on private names of grpcio and onnxruntime (docs/design.md, "Private
internals"), so both are bounded above at the minor versions the suite runs on: an upgrade is a
change someone tests, never a surprise on a device."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
BOUNDED = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "onnxruntime")


def _base_requirements() -> dict[str, Requirement]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {(r := Requirement(d)).name.lower(): r for d in deps}


@pytest.mark.parametrize("name", BOUNDED)
def test_private_internals_dependencies_have_an_upper_bound_that_admits_the_tested_version(name):
    req = _base_requirements()[name]
    uppers = [s for s in req.specifier if s.operator in ("<", "<=", "~=", "==")]
    assert uppers, f"{name} has no upper bound in pyproject.toml: {req}"
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed, prereleases=True), (
        f"the suite runs on {name} {installed}, outside the declared {req.specifier}"
    )
