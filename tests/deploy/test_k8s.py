"""deploy/k8s/*.yaml: valid Kubernetes objects, and the facts that tie them together.

Schema validation is kubernetes-validate (PyPI), which ships the Kubernetes OpenAPI schemas as
JSON inside the package and validates with jsonschema, offline (the test forbids sockets while
it runs). `strict=True` uses its "-strict" schemas, where unknown properties are rejected
(additionalProperties: false), so a misspelt or misplaced field fails. Each object is
validated against Kubernetes 1.27 (the first release with GA gRPC probes) and the newest
release the package carries.

A schema cannot see across fields or files, so the rest is asserted here: the probes target
the container's gRPC port with the readiness ("") and liveness ("liveness") health names, the
preStop sleep equals MNIST_EDGE_DRAIN_DELAY_S, terminationGracePeriodSeconds exceeds
preStop + drain + grace, the Services, HPA and PDB select or target the Deployment's pods, the
pod runs as the image's USER, and the resources cover the footprint recorded in README.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import socket
from pathlib import Path

import pytest

CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
try:
    import kubernetes_validate as kv
    import yaml
except ImportError as exc:  # pragma: no cover - depends on the environment
    message = f"{exc}: pip install 'kubernetes-validate==1.37.0' (the dev extra)"
    if CI:
        raise RuntimeError(message) from exc  # a missing setup step must not pass as skipped in CI
    pytest.skip(message, allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VERSIONS = ("1.27.0", None)  # None: the newest the package ships


def load_all() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return load_all()


def only(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def validate(doc: dict, version: str | None) -> str:
    return kv.validate(doc, version or kv.utils.latest_version(), strict=True)


def test_kinds_present(docs):
    kinds = sorted((d["apiVersion"], d["kind"]) for d in docs)
    assert kinds == sorted([
        ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "Service"), ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"), ("policy/v1", "PodDisruptionBudget"),
    ]), kinds


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "latest")
def test_every_object_validates_strictly_offline(docs, version, no_network):
    for doc in docs:
        validate(doc, version)


def test_strict_validation_rejects_what_it_should(docs, no_network):
    """The validation is not vacuous: an unknown field, a wrong type and a bad enum fail."""
    deployment = only(docs, "Deployment")
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = ""
    with pytest.raises(kv.ValidationError):
        validate(bad, None)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    with pytest.raises(kv.ValidationError):
        validate(bad, None)
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30s"
    with pytest.raises(kv.ValidationError):
        validate(bad, None)


# -- cross-field facts ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pod(docs) -> dict:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def server(pod) -> dict:
    (container,) = pod["containers"]
    return container


def env_of(container) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        assert "value" in e, f"{e['name']}: a literal value, so the facts below can be checked"
        env[e["name"]] = e["value"]
    return env


def port_named(container, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def quantity(value: str) -> float:
    """CPU in cores or memory in MiB."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Mi|Gi|Ki)?", str(value))
    assert m, value
    n = float(m.group(1))
    return {"m": n / 1000, "Mi": n, "Gi": n * 1024, "Ki": n / 1024, None: n}[m.group(2)]


def test_ports_and_addresses_agree(server):
    env = env_of(server)
    grpc_port, metrics_port = port_named(server, "grpc"), port_named(server, "metrics")
    assert (grpc_port, metrics_port) == (50051, 9464)
    assert env["MNIST_EDGE_ADDRESS"] == f"0.0.0.0:{grpc_port}"
    assert env["MNIST_EDGE_METRICS_ADDRESS"] == f"0.0.0.0:{metrics_port}"


def test_native_grpc_probes_on_the_right_port_and_services(server):
    grpc_port = port_named(server, "grpc")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = server[kind]
        assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, f"{kind}: the kubelet's native gRPC probe"
        assert probe["grpc"]["port"] == grpc_port, kind
    assert server["readinessProbe"]["grpc"].get("service", "") == ""
    assert server["livenessProbe"]["grpc"]["service"] == "liveness"
    assert server["startupProbe"]["grpc"].get("service", "") == ""
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30, "time enough to load and verify the model"


def test_shutdown_timings(pod, server):
    env = env_of(server)
    drain, grace = float(env["MNIST_EDGE_DRAIN_DELAY_S"]), float(env["MNIST_EDGE_GRACE_S"])
    pre_stop = server["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep = float(command[1])
    assert sleep == drain > 0, "preStop sleep matches MNIST_EDGE_DRAIN_DELAY_S"
    period = pod["terminationGracePeriodSeconds"]
    assert period > drain + grace
    assert period > sleep + drain + grace, "the grace period counts from the start of preStop"
    assert float(env["MNIST_EDGE_MAX_CONNECTION_AGE_S"]) > 0, "connections move to new replicas after a scale-up"


def test_security_context(pod, server):
    import importlib.util
    import sys

    name = "mnist_edge_tests_dockerfile_parser"  # the parser test_container.py uses, by path
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("dockerfile_parser.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    stages = sys.modules[name].parse_dockerfile((REPO / "deploy" / "Dockerfile").read_text())

    psc, csc = pod["securityContext"], server["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc["readOnlyRootFilesystem"] is True and csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"]["drop"] == ["ALL"] and not csc["capabilities"].get("add")
    uid = stages[-1].last("USER").args.split(":")[0]
    assert psc["runAsUser"] == int(uid), "the pod runs as the image's USER"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False, "service links inject MNIST_EDGE_*-like variables"


def test_env_names_are_server_flags(server):
    from mnist_edge.server.settings import ENV_PREFIX, Settings

    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    names = {k for k in env_of(server) if k.startswith(ENV_PREFIX)}
    assert names <= known, f"not server flags (silently ignored): {sorted(names - known)}"


def test_selectors_and_targets(docs):
    deployment = only(docs, "Deployment")
    match = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert match.items() <= labels.items(), "the Deployment selects its own pods"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]

    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1, "one headless Service for client-side round-robin"
    svc = headless[0]
    assert svc["spec"]["selector"].items() <= labels.items() and svc["spec"]["selector"] == match
    (port,) = svc["spec"]["ports"]
    target = port["targetPort"]
    assert (port_named(container, target) if isinstance(target, str) else target) == port_named(container, "grpc")
    assert not svc["spec"].get("publishNotReadyAddresses", False), "DNS lists only ready pods"

    for other in (d for d in docs if d["kind"] == "Service" and d is not svc):
        assert other["spec"]["selector"].items() <= labels.items()
        for p in other["spec"]["ports"]:
            t = p["targetPort"]
            assert (t if isinstance(t, str) else None) in {q["name"] for q in container["ports"]} or t in {q["containerPort"] for q in container["ports"]}

    hpa = only(docs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in container["resources"]["requests"], "CPU utilization is measured against the request"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    pdb = only(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == match
    if "minAvailable" in pdb["spec"]:
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a PDB that allows no eviction blocks node drains"
    else:
        assert pdb["spec"]["maxUnavailable"] >= 1


def test_resources_cover_the_measured_footprint(server):
    """README.md records a run of measure_footprint.py; the numbers must fit the resources."""
    readme = (K8S / "README.md").read_text()
    block = re.search(r"```json\n(.*?)\n```", readme, re.S)
    assert block, "deploy/k8s/README.md has the measurement's JSON output"
    measured = json.loads(block.group(1))
    peaks = [float(x) for x in re.findall(r"\|\s*([\d.]+) MiB\s*\|", readme)]
    assert measured["errors"] == 0 and peaks, "a clean run, and the table of peaks"
    res = server["resources"]
    assert quantity(res["requests"]["memory"]) >= measured["after_load"]["VmHWM_MiB"]
    assert quantity(res["limits"]["memory"]) >= 2 * max(peaks), "room for the largest measured peak"
    assert quantity(res["requests"]["cpu"]) >= measured["load"]["server_cores_busy"] * 0.5
    assert quantity(res["limits"]["cpu"]) >= quantity(res["requests"]["cpu"])


def test_clusterip_service_and_the_queue_depth_autoscaling_example(docs, no_network):
    clusterip = [d for d in docs if d["kind"] == "Service" and d["spec"].get("type") == "ClusterIP"]
    assert len(clusterip) == 1 and clusterip[0]["spec"]["ports"][0]["targetPort"] == "grpc"
    (example,) = yaml.safe_load_all((K8S / "examples" / "hpa-queue-depth.yaml").read_text())
    validate(example, None)
    (metric,) = example["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "mnist_edge_queue_depth"
    assert example["spec"]["scaleTargetRef"] == only(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    # The gauge it scales on is one the server exports.
    assert "mnist_edge_queue_depth" in (REPO / "server" / "metrics.py").read_text()
