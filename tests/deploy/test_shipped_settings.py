"""The settings the shipped deployment files give the server, compared with its defaults.

The throughput settings the benchmark measured (handler threads, batching, the inference lane,
onnxruntime threads) stay at their defaults, which are the measured best (README "Speed").
Every other difference from a default is listed here with its reason, and docs/deploy.md
carries the same table: a new difference fails this test until it is written down.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from mnist_edge.server import settings as settings_mod
from mnist_edge.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]

# Measured by the benchmark: the shipped files must leave them at the defaults.
BENCHMARKED = ("handler_threads", "max_batch_size", "max_queue_delay_us", "intra_op_threads", "infer_lane", "stream_threads", "workers")

WHY = {
    "address": "listen on every interface of the container, pod or device, not loopback only",
    "metrics_address": "let a scraper outside the container, pod or device reach /metrics",
    "grace_s": "Docker: drain + grace inside `docker stop`'s 10 s (8 s)",
    "drain_delay_s": "Kubernetes: keep serving while the endpoint leaves the Service (equal to preStop)",
    "max_connection_age_s": "Kubernetes: clients reconnect, and so spread onto new replicas, every minute",
    "max_concurrent_rpcs": "Kubernetes: bound the calls one 1-CPU pod holds in memory",
    "model": "systemd: the model is published into /opt/mnist-edge/models, not read from the wheel",
}

EXPECTED = {
    "Dockerfile": {"address", "metrics_address", "grace_s"},
    "mnist-edge.service": {"address", "metrics_address", "model"},
    "k8s/deployment.yaml": {"address", "metrics_address", "drain_delay_s", "max_connection_age_s", "max_concurrent_rpcs"},
    "kserve/inferenceservice.yaml": {"address", "metrics_address", "drain_delay_s", "max_connection_age_s", "max_concurrent_rpcs"},
}


def _dockerfile_env() -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("mnist_edge_tests_dockerfile_parser_s", Path(__file__).with_name("dockerfile_parser.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    final = module.parse_dockerfile((REPO / "deploy" / "Dockerfile").read_text())[-1]
    return final.env({"PATH": "/usr/bin:/bin"})


def _unit() -> tuple[dict[str, str], list[str]]:
    env, argv = {}, []
    for line in (REPO / "deploy" / "mnist-edge.service").read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line[len("Environment="):].partition("=")
            env[key] = value
        elif line.startswith("ExecStart="):
            argv = shlex.split(line[len("ExecStart="):])[2:]  # after `mnist-edge serve`
    return env, argv


def _container_env(path: Path) -> dict[str, str]:
    env = {}
    for doc in yaml.safe_load_all(path.read_text()):
        text = yaml.safe_dump(doc)
        for item in re.findall(r"- name: (MNIST_EDGE_\w+)\n\s+value: ['\"]?([^'\"\n]*)", text):
            env[item[0]] = item[1]
    return env


def _shipped() -> dict[str, tuple[dict[str, str], list[str]]]:
    return {
        "Dockerfile": (_dockerfile_env(), []),
        "mnist-edge.service": _unit(),
        "k8s/deployment.yaml": (_container_env(REPO / "deploy" / "k8s" / "deployment.yaml"), []),
        "kserve/inferenceservice.yaml": (_container_env(REPO / "deploy" / "kserve" / "inferenceservice.yaml"), []),
    }


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_settings_differ_from_the_defaults_only_where_documented(name):
    env, argv = _shipped()[name]
    mnist_env = {k: v for k, v in env.items() if k.startswith(settings_mod.ENV_PREFIX)}
    assert not settings_mod.unknown_env(mnist_env), f"{name}: not settings: {settings_mod.unknown_env(mnist_env)}"
    parsed = settings_mod.from_args(argv, env=mnist_env)
    default = Settings()
    differ = {f.name for f in dataclasses.fields(Settings) if getattr(parsed, f.name) != getattr(default, f.name)}
    for setting in BENCHMARKED:
        assert setting not in differ, f"{name} sets {setting} to {getattr(parsed, setting)!r}; the benchmark measured the default {getattr(default, setting)!r} as best"
    assert differ == EXPECTED[name], f"{name}: differences from the defaults {sorted(differ)}; documented {sorted(EXPECTED[name])}"
    assert differ <= WHY.keys()


def test_the_docs_list_every_documented_difference():
    docs = (REPO / "docs" / "deploy.md").read_text()
    for setting in WHY:
        assert f"--{setting.replace('_', '-')}" in docs, f"docs/deploy.md does not mention --{setting.replace('_', '-')}"
