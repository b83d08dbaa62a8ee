"""deploy/kserve/inferenceservice.yaml: a KServe InferenceService running the server as a custom
predictor that speaks the Open Inference Protocol over gRPC.

Three layers of checking:
1. The InferenceService against the kserve SDK's generated OpenAPI models (kserve_validate.py,
   run with the Python of a separate environment, because kserve pins protobuf < 7 and this
   project needs protobuf 7): every key must be a field of the model at that place, every value
   of the declared type, required fields present, and the object must serialize back to the
   same YAML. Mutated copies (an unknown field, a misplaced one, a wrong type, a missing
   required field) must fail, so the check is not vacuous.
2. The predictor's pod part (KServe inlines a Kubernetes PodSpec into the predictor) against
   Kubernetes' own strict schema (kubernetes-validate, offline), as a Pod: this checks the
   containers, probes, security context and volumes to the letter of the Kubernetes API.
3. What KServe itself requires of a custom gRPC predictor, and the cross-field facts: the
   container named kserve-container, PROTOCOL=v2 (KServe's webhook accepts only v1/v2 for
   custom predictors), one port named h2c at the server's address, native gRPC probes on it
   with the readiness ("") and liveness ("liveness") health names, Standard (raw) deployment
   mode, drain timings, the image's USER, and the same server settings as deploy/k8s.

The kserve environment: MNIST_EDGE_KSERVE_PYTHON, else <repo>/.venv-kserve/bin/python
(scripts/test creates it). Missing: skipped, or failed when CI is set.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.full_setup  # needs what scripts/test (not --quick) sets up

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
ISVC = REPO / "deploy" / "kserve" / "inferenceservice.yaml"
VALIDATOR = Path(__file__).with_name("kserve_validate.py")
SETUP = "python3 -m venv .venv-kserve && .venv-kserve/bin/pip install 'kserve==0.21.0'"

# ComponentExtensionSpec fields KServe adds next to the inlined PodSpec.
EXTENSION_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations", "deploymentStrategy", "autoScaling",
}


def kserve_python() -> Path:
    configured = os.environ.get("MNIST_EDGE_KSERVE_PYTHON")
    path = Path(configured) if configured else REPO / ".venv-kserve" / "bin" / "python"
    if path.exists():
        return path
    message = f"no Python with kserve at {path} (set MNIST_EDGE_KSERVE_PYTHON or run: {SETUP})"
    if CI or configured:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def isvc() -> dict:
    (doc,) = [d for d in yaml.safe_load_all(ISVC.read_text()) if d]
    return doc


def _mutants(isvc: dict) -> dict[str, dict]:
    out = {}
    m = copy.deepcopy(isvc)
    m["spec"]["predictor"]["containers"][0]["portz"] = m["spec"]["predictor"]["containers"][0]["ports"]
    out["unknown field"] = m
    m = copy.deepcopy(isvc)
    m["spec"]["predictor"]["protocolVersion"] = "grpc-v2"  # exists on model specs, not on a custom predictor
    out["misplaced field"] = m
    m = copy.deepcopy(isvc)
    m["spec"]["predictor"]["containers"][0]["ports"][0]["containerPort"] = "50051"
    out["wrong type"] = m
    m = copy.deepcopy(isvc)
    del m["spec"]["predictor"]["containers"][0]["readinessProbe"]["grpc"]["port"]
    out["missing required field"] = m
    m = copy.deepcopy(isvc)
    m["spec"]["predictor"]["minReplicas"] = True
    out["bool for an int"] = m
    return out


@pytest.fixture(scope="module")
def validation(isvc, tmp_path_factory) -> dict:
    """One run of kserve_validate.py over the real file and its mutants."""
    python = kserve_python()
    root = tmp_path_factory.mktemp("kserve")
    files = {"real": str(ISVC)}
    for name, doc in _mutants(isvc).items():
        path = root / (name.replace(" ", "-") + ".yaml")
        path.write_text(yaml.safe_dump(doc))
        files[name] = str(path)
    proc = subprocess.run(
        [str(python), str(VALIDATOR), *files.values()], cwd=root, capture_output=True, text=True, timeout=180,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")},
    )
    assert proc.stdout.strip(), f"the validator printed nothing:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    return {"versions": (report["kserve"], report["kubernetes"]), **{name: report["results"][path] for name, path in files.items()}}


def test_inferenceservice_matches_the_kserve_models(validation):
    real = validation["real"]
    assert real["ok"], f"kserve {validation['versions'][0]}: " + "\n".join(real["errors"])
    # the walk reached the kserve types and the Kubernetes ones under them (probes included)
    for klass in ("V1beta1InferenceService", "V1beta1PredictorSpec", "V1Container", "V1Probe", "V1GRPCAction", "V1ContainerPort"):
        assert klass in real["classes"], klass


@pytest.mark.parametrize("mutant", ["unknown field", "misplaced field", "wrong type", "missing required field", "bool for an int"])
def test_the_kserve_check_rejects(validation, mutant):
    result = validation[mutant]
    assert not result["ok"], f"{mutant}: accepted"
    expected = {
        "unknown field": "portz: unknown field of V1Container",
        "misplaced field": "protocolVersion: unknown field of V1beta1PredictorSpec",
        "wrong type": "containerPort: expected int",
        "missing required field": "readinessProbe.grpc: V1GRPCAction",
        "bool for an int": "minReplicas: expected int",
    }[mutant]
    assert any(expected in e for e in result["errors"]), result["errors"]
    if mutant == "missing required field":
        assert any("port" in e and "required" in e.lower() for e in result["errors"]), result["errors"]


def test_predictor_pod_matches_the_kubernetes_schema(isvc):
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in EXTENSION_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": pod_spec}
    for version in ("1.27.0", kv.utils.latest_version()):
        kv.validate(pod, version, strict=True)
    bad = copy.deepcopy(pod)
    bad["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "h2c"  # gRPC probes take a number
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, kv.utils.latest_version(), strict=True)


# -- what KServe requires of a custom gRPC predictor, and the cross-field facts -------------

def env_of(container) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def test_custom_grpc_predictor_shape(isvc):
    meta, predictor = isvc["metadata"], isvc["spec"]["predictor"]
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert not {"model", "sklearn", "onnx", "triton", "tensorflow", "pytorch"} & set(predictor), "a custom predictor: containers only"
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container", "the container KServe treats as the predictor"
    env = env_of(container)
    assert env["PROTOCOL"] == "v2", "Open Inference Protocol; KServe's webhook accepts only v1/v2 for custom predictors"
    (port,) = container["ports"]  # KServe exposes exactly one port
    assert port == {"name": "h2c", "containerPort": 50051, "protocol": "TCP"}, "h2c: KServe routes gRPC (HTTP/2 cleartext)"
    assert env["MNIST_EDGE_ADDRESS"] == f"0.0.0.0:{port['containerPort']}"
    assert meta["annotations"]["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment"), "a plain Deployment runs native gRPC probes"
    manifest = json.loads((REPO / "models" / "manifest.json").read_text())
    assert meta["name"] == manifest["model_name"], "the InferenceService is named after the model the server serves"
    metrics_port = env["MNIST_EDGE_METRICS_ADDRESS"].rsplit(":", 1)[1]
    assert meta["annotations"]["prometheus.kserve.io/port"] == metrics_port


def test_probes_and_shutdown(isvc):
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    grpc_port = container["ports"][0]["containerPort"]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "exec", "tcpSocket"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == grpc_port, kind
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    assert container["livenessProbe"]["grpc"]["service"] == "liveness"
    env = env_of(container)
    drain, grace = float(env["MNIST_EDGE_DRAIN_DELAY_S"]), float(env["MNIST_EDGE_GRACE_S"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and float(command[1]) == drain
    assert predictor["terminationGracePeriodSeconds"] > float(command[1]) + drain + grace
    assert float(env["MNIST_EDGE_MAX_CONNECTION_AGE_S"]) > 0


def test_same_settings_and_user_as_the_kubernetes_deployment(isvc):
    from mnist_edge.server.settings import ENV_PREFIX, Settings

    (container,) = isvc["spec"]["predictor"]["containers"]
    env = env_of(container)
    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    names = {k for k in env if k.startswith(ENV_PREFIX)}
    assert names <= known, f"not server flags: {sorted(names - known)}"

    deployment = yaml.safe_load((REPO / "deploy" / "k8s" / "deployment.yaml").read_text())
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    k8s_env = env_of(server)
    assert {k: env[k] for k in names} == {k: k8s_env[k] for k in names}, "one set of tuned server settings"
    assert container["resources"] == server["resources"]
    assert container["securityContext"] == server["securityContext"]

    name = "mnist_edge_tests_dockerfile_parser"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("dockerfile_parser.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    uid = sys.modules[name].parse_dockerfile((REPO / "deploy" / "Dockerfile").read_text())[-1].last("USER").args.split(":")[0]
    psc = isvc["spec"]["predictor"]["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == int(uid)
