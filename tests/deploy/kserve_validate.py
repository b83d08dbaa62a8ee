"""Strict validation of InferenceService YAML against the kserve SDK's generated OpenAPI models.

Run with the Python of the environment that has `kserve` (it pins protobuf < 7, so it cannot
live in the project's .venv):   .venv-kserve/bin/python tests/deploy/kserve_validate.py FILE...
Prints one JSON object: {"kserve": version, "kubernetes": version, "results": {FILE: {"ok":
bool, "errors": [...], "classes": [...]}}}. Exit status 0 when every file is valid.

What "valid" means, for every object in the file, recursively from V1beta1InferenceService:
1. every key is a field of the model at that place (the model's attribute_map, i.e. the JSON
   names of the Go API types the SDK was generated from); an unknown key is an error with
   its path (the generated SDK's own deserializer silently drops unknown keys);
2. every value has the declared type: str, int (not bool), float, bool, list[...], dict(str,
   ...), a nested model (kserve's V1beta1* or the Kubernetes client's V1* models), or
   "object" (free-form: IntOrString and the like);
3. every model is then constructed from its fields with client-side validation on, so a
   missing required field (a container's name, a port's containerPort, a gRPC probe's port)
   raises;
4. the constructed object serialized back (kserve's ApiClient.sanitize_for_serialization) equals the
   YAML, so nothing was dropped or reinterpreted.
Not covered: value constraints that live only in the CRD's openAPIV3Schema or in KServe's
admission webhook (tests/deploy/test_kserve.py checks the ones that matter here itself).
"""

from __future__ import annotations

import json
import re
import sys

import kserve
import kserve.models as kserve_models
import kubernetes.client.models as k8s_models
import yaml
from kserve.api_client import ApiClient

LIST = re.compile(r"^(?:list|List)\[(.*)\]$")
DICT = re.compile(r"^(?:dict\(str, (.*)\)|Dict\[str, (.*)\])$")
PRIMITIVES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "datetime": (str,),
    "date": (str,),
    "ResourceQuantity": (str, int, float),
}


def resolve(name: str):
    for module in (kserve_models, k8s_models):
        klass = getattr(module, name, None)
        if klass is not None and hasattr(klass, "openapi_types"):
            return klass
    return None


class Checker:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.classes: set[str] = set()

    def build(self, data, type_name: str, path: str):
        """The value for `data` of OpenAPI type `type_name`, or None after recording errors."""
        m = LIST.match(type_name)
        if m:
            if not isinstance(data, list):
                self.errors.append(f"{path}: expected a list ({type_name}), got {type(data).__name__}")
                return None
            return [self.build(item, m.group(1), f"{path}[{i}]") for i, item in enumerate(data)]
        m = DICT.match(type_name)
        if m:
            if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
                self.errors.append(f"{path}: expected a map of strings ({type_name}), got {type(data).__name__}")
                return None
            inner = m.group(1) or m.group(2)
            return {k: self.build(v, inner, f"{path}.{k}") for k, v in data.items()}
        if type_name == "object":
            return data
        if type_name in PRIMITIVES:
            ok = isinstance(data, PRIMITIVES[type_name]) and not (type_name != "bool" and isinstance(data, bool))
            if not ok:
                self.errors.append(f"{path}: expected {type_name}, got {type(data).__name__} {data!r}")
            return data
        klass = resolve(type_name)
        if klass is None:
            self.errors.append(f"{path}: the validator does not know the type {type_name!r}")
            return None
        if not isinstance(data, dict):
            self.errors.append(f"{path}: expected an object ({type_name}), got {type(data).__name__}")
            return None
        self.classes.add(klass.__name__)
        by_json = {json_name: attr for attr, json_name in klass.attribute_map.items()}
        kwargs = {}
        for key, value in data.items():
            attr = by_json.get(key)
            if attr is None:
                self.errors.append(f"{path}.{key}: unknown field of {type_name} (known: {', '.join(sorted(by_json))})")
                continue
            kwargs[attr] = self.build(value, klass.openapi_types[attr], f"{path}.{key}")
        try:
            return klass(**kwargs)
        except (ValueError, TypeError) as exc:
            self.errors.append(f"{path}: {type_name}: {exc}")
            return None


def validate(doc) -> dict:
    checker = Checker()
    if not isinstance(doc, dict):
        return {"ok": False, "errors": ["the document is not a mapping"], "classes": []}
    if doc.get("apiVersion") != "serving.kserve.io/v1beta1" or doc.get("kind") != "InferenceService":
        checker.errors.append(f"not a serving.kserve.io/v1beta1 InferenceService: {doc.get('apiVersion')} {doc.get('kind')}")
    obj = checker.build(doc, "V1beta1InferenceService", "$")
    if obj is not None and not checker.errors:
        back = ApiClient().sanitize_for_serialization(obj)
        if back != doc:
            checker.errors.append(f"the object does not serialize back to the YAML: {json.dumps(back, sort_keys=True)}")
    return {"ok": not checker.errors, "errors": checker.errors, "classes": sorted(checker.classes)}


def main(paths: list[str]) -> int:
    results = {}
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        outcome = [validate(d) for d in docs] or [{"ok": False, "errors": ["no document"], "classes": []}]
        results[path] = {
            "ok": all(o["ok"] for o in outcome),
            "errors": [e for o in outcome for e in o["errors"]],
            "classes": sorted({c for o in outcome for c in o["classes"]}),
        }
    print(json.dumps({"kserve": getattr(kserve, "__version__", None) or _dist_version("kserve"),
                      "kubernetes": _dist_version("kubernetes"), "results": results}))
    return 0 if all(r["ok"] for r in results.values()) else 1


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
