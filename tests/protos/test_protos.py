"""The protos/ package: generated code in sync, and the wire contracts pinned.

Field numbers below were checked against Triton's r23.12 grpc_service.proto /
model_config.proto (the schema tritonclient 2.41 ships) and docs/design.md for
digits.v1. A change here is a protocol break, not a refactor.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from mnist_edge.protos import generate

REPO_ROOT = Path(__file__).resolve().parents[2]

F = descriptor_pb2.FieldDescriptorProto

# ---------------------------------------------------------------------------
# helpers


def _proto(desc) -> descriptor_pb2.DescriptorProto:
    p = descriptor_pb2.DescriptorProto()
    desc.CopyToProto(p)
    return p


def _is_map(desc, field_name: str) -> bool:
    f = desc.fields_by_name[field_name]
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def field_table(desc) -> dict[str, tuple]:
    """{field name: (number, kind, type)} in declaration order.

    kind is "map", "repeated" or "single"; type is the scalar type name
    ("string", "int64", ...) or the full name of the message/enum, and for
    maps "key->value".
    """
    table = {}
    for fp in _proto(desc).field:
        fd = desc.fields_by_name[fp.name]
        if _is_map(desc, fp.name):
            entry = fd.message_type
            types = [_type_of(entry.fields_by_name[n]) for n in ("key", "value")]
            table[fp.name] = (fp.number, "map", "->".join(types))
        else:
            kind = "repeated" if fp.label == F.LABEL_REPEATED else "single"
            table[fp.name] = (fp.number, kind, _type_of(fd))
    return table


def _type_of(fd) -> str:
    if fd.message_type is not None:
        return fd.message_type.full_name
    if fd.enum_type is not None:
        return fd.enum_type.full_name
    return F.Type.Name(fd.type)[len("TYPE_") :].lower()


def oneof_members(desc) -> dict[str, list[str]]:
    return {o.name: [f.name for f in o.fields] for o in desc.oneofs}


def enum_values(enum_desc) -> dict[str, int]:
    return {v.name: v.number for v in enum_desc.values}


def rpc_table(service_desc) -> list[tuple]:
    sp = descriptor_pb2.ServiceDescriptorProto()
    service_desc.CopyToProto(sp)
    return [
        (m.name, m.input_type.lstrip("."), m.output_type.lstrip("."), m.client_streaming, m.server_streaming)
        for m in sp.method
    ]


@pytest.fixture(scope="module")
def v2():
    from mnist_edge.protos.inference import grpc_service_pb2

    return grpc_service_pb2


@pytest.fixture(scope="module")
def mc():
    from mnist_edge.protos.inference import model_config_pb2

    return model_config_pb2


@pytest.fixture(scope="module")
def digits():
    from mnist_edge.protos.digits.v1 import digits_pb2

    return digits_pb2


# ---------------------------------------------------------------------------
# (a) generated code matches the sources


def test_committed_generated_files_match_a_fresh_generation():
    fresh = generate.render()
    expected = {
        "protos/inference/model_config_pb2.py",
        "protos/inference/model_config_pb2.pyi",
        "protos/inference/grpc_service_pb2.py",
        "protos/inference/grpc_service_pb2.pyi",
        "protos/inference/grpc_service_pb2_grpc.py",
        "protos/digits/v1/digits_pb2.py",
        "protos/digits/v1/digits_pb2.pyi",
        "protos/digits/v1/digits_pb2_grpc.py",
    }
    assert set(fresh) == expected
    for name, data in fresh.items():
        committed = (REPO_ROOT / name).read_bytes()
        assert committed == data, (
            f"{name} differs from a fresh generation: run `python -m mnist_edge.protos.generate`" + generate._version_note()
        )
    assert generate.drift(REPO_ROOT, fresh) == {"changed": [], "missing": [], "stale": []}


def test_generation_is_deterministic():
    assert generate.render() == generate.render()


def test_check_command_passes_from_any_cwd(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mnist_edge.protos.generate", "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout


def test_check_reports_changed_missing_and_stale_files(tmp_path):
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "protos/inference/grpc_service_pb2.py").write_text("# edited by hand\n")
    (tmp_path / "protos/digits/v1/digits_pb2.pyi").unlink()
    (tmp_path / "protos/digits/v1/old_pb2.py").write_text("# source deleted\n")

    report = generate.drift(tmp_path)
    assert report == {
        "changed": ["protos/inference/grpc_service_pb2.py"],
        "missing": ["protos/digits/v1/digits_pb2.pyi"],
        "stale": ["protos/digits/v1/old_pb2.py"],
    }

    # write() repairs all three.
    generate.write(tmp_path)
    assert generate.drift(tmp_path) == {"changed": [], "missing": [], "stale": []}


def test_check_cli_exits_nonzero_and_names_the_files(tmp_path):
    shutil.copytree(REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "protos/inference/model_config_pb2.pyi").write_text("")
    # Run the copied generator as a script so that its REPO_ROOT resolves to tmp_path.
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "protos" / "generate.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "protos/inference/model_config_pb2.pyi" in proc.stderr
    assert "python -m mnist_edge.protos.generate" in proc.stderr


# ---------------------------------------------------------------------------
# imports


def test_importing_protos_loads_nothing_generated():
    code = (
        "import sys, mnist_edge.protos\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('mnist_edge.protos.', 'google.protobuf', 'grpc')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_v2_modules_import_each_other_through_the_package():
    code = (
        "import sys\n"
        "import mnist_edge.protos.inference.grpc_service_pb2_grpc as g\n"
        "assert 'mnist_edge.protos.inference.model_config_pb2' in sys.modules\n"
        "assert 'model_config_pb2' not in sys.modules and 'grpc_service_pb2' not in sys.modules\n"
        "d = g.mnist__edge_dot_protos_dot_inference_dot_grpc__service__pb2.DESCRIPTOR\n"
        "assert [x.name for x in d.dependencies] == ['mnist_edge/protos/inference/model_config.proto'], d.dependencies\n"
        "import mnist_edge.protos.digits.v1.digits_pb2_grpc\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# ---------------------------------------------------------------------------
# runtime floors: generated code refuses to load on older runtimes


def _generated_versions() -> tuple[str, str]:
    pb2 = (REPO_ROOT / "protos/inference/grpc_service_pb2.py").read_text()
    m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
    assert m, "no protobuf runtime check in generated code"
    protobuf_needed = ".".join(m.groups())
    grpc_py = (REPO_ROOT / "protos/inference/grpc_service_pb2_grpc.py").read_text()
    m = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_py)
    assert m, "no GRPC_GENERATED_VERSION in generated code"
    return protobuf_needed, m.group(1)


def test_all_generated_modules_need_the_same_runtime_versions():
    protobuf_needed, grpc_needed = _generated_versions()
    for path in sorted((REPO_ROOT / "protos").rglob("*_pb2.py")):
        assert re.search(
            r"Domain\.PUBLIC,\s*" + r",\s*".join(protobuf_needed.split(".")) + ",", path.read_text()
        ), path
    for path in sorted((REPO_ROOT / "protos").rglob("*_pb2_grpc.py")):
        assert f"GRPC_GENERATED_VERSION = '{grpc_needed}'" in path.read_text(), path


def test_declared_runtime_floors_equal_what_the_generated_code_needs():
    protobuf_needed, grpc_needed = _generated_versions()
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for dep in deps:
        m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)\s*(,.*)?$", dep)
        if m:
            floors[m.group(1).lower()] = m.group(2)
    assert floors.get("protobuf") == protobuf_needed, (
        f"generated *_pb2.py require protobuf>={protobuf_needed}; pyproject declares {floors.get('protobuf')}"
    )
    assert floors.get("grpcio") == grpc_needed, (
        f"generated *_pb2_grpc.py require grpcio>={grpc_needed}; pyproject declares {floors.get('grpcio')}"
    )


# ---------------------------------------------------------------------------
# (b) inference (KServe v2 / Triton r23.12) field numbers

INFER_PARAMETER = "inference.InferParameter"


def test_infer_request(v2):
    assert field_table(v2.ModelInferRequest.DESCRIPTOR) == {
        "model_name": (1, "single", "string"),
        "model_version": (2, "single", "string"),
        "id": (3, "single", "string"),
        "parameters": (4, "map", f"string->{INFER_PARAMETER}"),
        "inputs": (5, "repeated", "inference.ModelInferRequest.InferInputTensor"),
        "outputs": (6, "repeated", "inference.ModelInferRequest.InferRequestedOutputTensor"),
        "raw_input_contents": (7, "repeated", "bytes"),
    }
    assert field_table(v2.ModelInferRequest.InferInputTensor.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "datatype": (2, "single", "string"),
        "shape": (3, "repeated", "int64"),
        "parameters": (4, "map", f"string->{INFER_PARAMETER}"),
        "contents": (5, "single", "inference.InferTensorContents"),
    }
    assert field_table(v2.ModelInferRequest.InferRequestedOutputTensor.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "parameters": (2, "map", f"string->{INFER_PARAMETER}"),
    }


def test_infer_response(v2):
    assert field_table(v2.ModelInferResponse.DESCRIPTOR) == {
        "model_name": (1, "single", "string"),
        "model_version": (2, "single", "string"),
        "id": (3, "single", "string"),
        "parameters": (4, "map", f"string->{INFER_PARAMETER}"),
        "outputs": (5, "repeated", "inference.ModelInferResponse.InferOutputTensor"),
        "raw_output_contents": (6, "repeated", "bytes"),
    }
    assert field_table(v2.ModelInferResponse.InferOutputTensor.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "datatype": (2, "single", "string"),
        "shape": (3, "repeated", "int64"),
        "parameters": (4, "map", f"string->{INFER_PARAMETER}"),
        "contents": (5, "single", "inference.InferTensorContents"),
    }
    assert field_table(v2.ModelStreamInferResponse.DESCRIPTOR) == {
        "error_message": (1, "single", "string"),
        "infer_response": (2, "single", "inference.ModelInferResponse"),
    }


def test_tensor_contents_and_parameters(v2):
    assert field_table(v2.InferTensorContents.DESCRIPTOR) == {
        "bool_contents": (1, "repeated", "bool"),
        "int_contents": (2, "repeated", "int32"),
        "int64_contents": (3, "repeated", "int64"),
        "uint_contents": (4, "repeated", "uint32"),
        "uint64_contents": (5, "repeated", "uint64"),
        "fp32_contents": (6, "repeated", "float"),
        "fp64_contents": (7, "repeated", "double"),
        "bytes_contents": (8, "repeated", "bytes"),
    }
    assert oneof_members(v2.InferTensorContents.DESCRIPTOR) == {}
    assert field_table(v2.InferParameter.DESCRIPTOR) == {
        "bool_param": (1, "single", "bool"),
        "int64_param": (2, "single", "int64"),
        "string_param": (3, "single", "string"),
        "double_param": (4, "single", "double"),
        "uint64_param": (5, "single", "uint64"),
    }
    assert oneof_members(v2.InferParameter.DESCRIPTOR) == {
        "parameter_choice": ["bool_param", "int64_param", "string_param", "double_param", "uint64_param"]
    }


def test_health_and_metadata_messages(v2):
    assert field_table(v2.ServerLiveRequest.DESCRIPTOR) == {}
    assert field_table(v2.ServerLiveResponse.DESCRIPTOR) == {"live": (1, "single", "bool")}
    assert field_table(v2.ServerReadyRequest.DESCRIPTOR) == {}
    assert field_table(v2.ServerReadyResponse.DESCRIPTOR) == {"ready": (1, "single", "bool")}
    name_version = {"name": (1, "single", "string"), "version": (2, "single", "string")}
    assert field_table(v2.ModelReadyRequest.DESCRIPTOR) == name_version
    assert field_table(v2.ModelReadyResponse.DESCRIPTOR) == {"ready": (1, "single", "bool")}
    assert field_table(v2.ServerMetadataRequest.DESCRIPTOR) == {}
    assert field_table(v2.ServerMetadataResponse.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "version": (2, "single", "string"),
        "extensions": (3, "repeated", "string"),
    }
    assert field_table(v2.ModelMetadataRequest.DESCRIPTOR) == name_version
    tensor = "inference.ModelMetadataResponse.TensorMetadata"
    assert field_table(v2.ModelMetadataResponse.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "versions": (2, "repeated", "string"),
        "platform": (3, "single", "string"),
        "inputs": (4, "repeated", tensor),
        "outputs": (5, "repeated", tensor),
    }
    assert field_table(v2.ModelMetadataResponse.TensorMetadata.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "datatype": (2, "single", "string"),
        "shape": (3, "repeated", "int64"),
    }
    assert field_table(v2.ModelConfigRequest.DESCRIPTOR) == name_version
    assert field_table(v2.ModelConfigResponse.DESCRIPTOR) == {"config": (1, "single", "inference.ModelConfig")}


def test_statistics_messages(v2):
    assert field_table(v2.ModelStatisticsRequest.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "version": (2, "single", "string"),
    }
    assert field_table(v2.ModelStatisticsResponse.DESCRIPTOR) == {
        "model_stats": (1, "repeated", "inference.ModelStatistics")
    }
    # r23.12 has no response_stats (9); it came later.
    assert field_table(v2.ModelStatistics.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "version": (2, "single", "string"),
        "last_inference": (3, "single", "uint64"),
        "inference_count": (4, "single", "uint64"),
        "execution_count": (5, "single", "uint64"),
        "inference_stats": (6, "single", "inference.InferStatistics"),
        "batch_stats": (7, "repeated", "inference.InferBatchStatistics"),
        "memory_usage": (8, "repeated", "inference.MemoryUsage"),
    }
    assert field_table(v2.StatisticDuration.DESCRIPTOR) == {
        "count": (1, "single", "uint64"),
        "ns": (2, "single", "uint64"),
    }
    assert [(n, v[0]) for n, v in field_table(v2.InferStatistics.DESCRIPTOR).items()] == [
        ("success", 1),
        ("fail", 2),
        ("queue", 3),
        ("compute_input", 4),
        ("compute_infer", 5),
        ("compute_output", 6),
        ("cache_hit", 7),
        ("cache_miss", 8),
    ]


def test_every_r23_12_message_is_present(v2):
    assert sorted(v2.DESCRIPTOR.message_types_by_name) == sorted(
        [
            "ServerLiveRequest", "ServerLiveResponse", "ServerReadyRequest", "ServerReadyResponse",
            "ModelReadyRequest", "ModelReadyResponse", "ServerMetadataRequest", "ServerMetadataResponse",
            "ModelMetadataRequest", "ModelMetadataResponse", "InferParameter", "InferTensorContents",
            "ModelInferRequest", "ModelInferResponse", "ModelStreamInferResponse", "ModelConfigRequest",
            "ModelConfigResponse", "ModelStatisticsRequest", "StatisticDuration", "InferStatistics",
            "InferBatchStatistics", "MemoryUsage", "ModelStatistics", "ModelStatisticsResponse",
            "ModelRepositoryParameter", "RepositoryIndexRequest", "RepositoryIndexResponse",
            "RepositoryModelLoadRequest", "RepositoryModelLoadResponse", "RepositoryModelUnloadRequest",
            "RepositoryModelUnloadResponse", "SystemSharedMemoryStatusRequest",
            "SystemSharedMemoryStatusResponse", "SystemSharedMemoryRegisterRequest",
            "SystemSharedMemoryRegisterResponse", "SystemSharedMemoryUnregisterRequest",
            "SystemSharedMemoryUnregisterResponse", "CudaSharedMemoryStatusRequest",
            "CudaSharedMemoryStatusResponse", "CudaSharedMemoryRegisterRequest",
            "CudaSharedMemoryRegisterResponse", "CudaSharedMemoryUnregisterRequest",
            "CudaSharedMemoryUnregisterResponse", "TraceSettingRequest", "TraceSettingResponse",
            "LogSettingsRequest", "LogSettingsResponse",
        ]
    )  # fmt: skip
    assert v2.DESCRIPTOR.package == "inference"


def test_model_config(mc):
    t = field_table(mc.ModelConfig.DESCRIPTOR)
    assert t == {
        "name": (1, "single", "string"),
        "platform": (2, "single", "string"),
        "backend": (17, "single", "string"),
        "version_policy": (3, "single", "inference.ModelVersionPolicy"),
        "max_batch_size": (4, "single", "int32"),
        "input": (5, "repeated", "inference.ModelInput"),
        "output": (6, "repeated", "inference.ModelOutput"),
        "batch_input": (20, "repeated", "inference.BatchInput"),
        "batch_output": (21, "repeated", "inference.BatchOutput"),
        "optimization": (12, "single", "inference.ModelOptimizationPolicy"),
        "dynamic_batching": (11, "single", "inference.ModelDynamicBatching"),
        "sequence_batching": (13, "single", "inference.ModelSequenceBatching"),
        "ensemble_scheduling": (15, "single", "inference.ModelEnsembling"),
        "instance_group": (7, "repeated", "inference.ModelInstanceGroup"),
        "default_model_filename": (8, "single", "string"),
        "cc_model_filenames": (9, "map", "string->string"),
        "metric_tags": (10, "map", "string->string"),
        "parameters": (14, "map", "string->inference.ModelParameter"),
        "model_warmup": (16, "repeated", "inference.ModelWarmup"),
        "model_operations": (18, "single", "inference.ModelOperations"),
        "model_transaction_policy": (19, "single", "inference.ModelTransactionPolicy"),
        "model_repository_agents": (23, "single", "inference.ModelRepositoryAgents"),
        "response_cache": (24, "single", "inference.ModelResponseCache"),
    }  # r23.12: no runtime (25) or model_metrics (26) yet
    assert oneof_members(mc.ModelConfig.DESCRIPTOR) == {
        "scheduling_choice": ["dynamic_batching", "sequence_batching", "ensemble_scheduling"]
    }


def test_model_input_output(mc):
    assert field_table(mc.ModelInput.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "data_type": (2, "single", "inference.DataType"),
        "format": (3, "single", "inference.ModelInput.Format"),
        "dims": (4, "repeated", "int64"),
        "reshape": (5, "single", "inference.ModelTensorReshape"),
        "is_shape_tensor": (6, "single", "bool"),
        "allow_ragged_batch": (7, "single", "bool"),
        "optional": (8, "single", "bool"),
    }
    assert enum_values(mc.ModelInput.Format.DESCRIPTOR) == {"FORMAT_NONE": 0, "FORMAT_NHWC": 1, "FORMAT_NCHW": 2}
    assert field_table(mc.ModelOutput.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "data_type": (2, "single", "inference.DataType"),
        "dims": (3, "repeated", "int64"),
        "reshape": (5, "single", "inference.ModelTensorReshape"),
        "label_filename": (4, "single", "string"),
        "is_shape_tensor": (6, "single", "bool"),
    }
    assert field_table(mc.ModelTensorReshape.DESCRIPTOR) == {"shape": (1, "repeated", "int64")}


def test_data_type_enum(mc):
    assert enum_values(mc.DataType.DESCRIPTOR) == {
        "TYPE_INVALID": 0,
        "TYPE_BOOL": 1,
        "TYPE_UINT8": 2,
        "TYPE_UINT16": 3,
        "TYPE_UINT32": 4,
        "TYPE_UINT64": 5,
        "TYPE_INT8": 6,
        "TYPE_INT16": 7,
        "TYPE_INT32": 8,
        "TYPE_INT64": 9,
        "TYPE_FP16": 10,
        "TYPE_FP32": 11,
        "TYPE_FP64": 12,
        "TYPE_STRING": 13,
        "TYPE_BF16": 14,
    }
    assert (mc.TYPE_UINT8, mc.TYPE_FP32, mc.TYPE_INT64) == (2, 11, 9)


def test_model_config_round_trips_through_the_wire(mc, v2):
    cfg = mc.ModelConfig(
        name="mnist",
        platform="onnxruntime_onnx",
        max_batch_size=1024,
        input=[mc.ModelInput(name="pixels", data_type=mc.TYPE_UINT8, dims=[28, 28])],
        output=[
            mc.ModelOutput(name="probabilities", data_type=mc.TYPE_FP32, dims=[10]),
            mc.ModelOutput(
                name="digit", data_type=mc.TYPE_INT64, dims=[1], reshape=mc.ModelTensorReshape(shape=[])
            ),
        ],
    )
    data = v2.ModelConfigResponse(config=cfg).SerializeToString()
    # max_batch_size is field 4, varint: tag 0x20, 1024 = 0x80 0x08.
    assert b"\x20\x80\x08" in data
    assert v2.ModelConfigResponse.FromString(data).config == cfg


# ---------------------------------------------------------------------------
# (c) the inference service


def test_inference_service_rpcs(v2):
    service = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    p = "inference."
    expected = [
        ("ServerLive", "ServerLiveRequest", "ServerLiveResponse"),
        ("ServerReady", "ServerReadyRequest", "ServerReadyResponse"),
        ("ModelReady", "ModelReadyRequest", "ModelReadyResponse"),
        ("ServerMetadata", "ServerMetadataRequest", "ServerMetadataResponse"),
        ("ModelMetadata", "ModelMetadataRequest", "ModelMetadataResponse"),
        ("ModelInfer", "ModelInferRequest", "ModelInferResponse"),
        ("ModelStreamInfer", "ModelInferRequest", "ModelStreamInferResponse"),
        ("ModelConfig", "ModelConfigRequest", "ModelConfigResponse"),
        ("ModelStatistics", "ModelStatisticsRequest", "ModelStatisticsResponse"),
        ("RepositoryIndex", "RepositoryIndexRequest", "RepositoryIndexResponse"),
        ("RepositoryModelLoad", "RepositoryModelLoadRequest", "RepositoryModelLoadResponse"),
        ("RepositoryModelUnload", "RepositoryModelUnloadRequest", "RepositoryModelUnloadResponse"),
        ("SystemSharedMemoryStatus", "SystemSharedMemoryStatusRequest", "SystemSharedMemoryStatusResponse"),
        ("SystemSharedMemoryRegister", "SystemSharedMemoryRegisterRequest", "SystemSharedMemoryRegisterResponse"),
        (
            "SystemSharedMemoryUnregister",
            "SystemSharedMemoryUnregisterRequest",
            "SystemSharedMemoryUnregisterResponse",
        ),
        ("CudaSharedMemoryStatus", "CudaSharedMemoryStatusRequest", "CudaSharedMemoryStatusResponse"),
        ("CudaSharedMemoryRegister", "CudaSharedMemoryRegisterRequest", "CudaSharedMemoryRegisterResponse"),
        ("CudaSharedMemoryUnregister", "CudaSharedMemoryUnregisterRequest", "CudaSharedMemoryUnregisterResponse"),
        ("TraceSetting", "TraceSettingRequest", "TraceSettingResponse"),
        ("LogSettings", "LogSettingsRequest", "LogSettingsResponse"),
    ]
    streaming = {"ModelStreamInfer"}
    assert rpc_table(service) == [
        (name, p + req, p + resp, name in streaming, name in streaming) for name, req, resp in expected
    ]


def test_inference_grpc_module_exposes_stub_servicer_and_registration():
    from mnist_edge.protos.inference import grpc_service_pb2_grpc as g

    assert hasattr(g, "GRPCInferenceServiceStub")
    assert hasattr(g, "GRPCInferenceServiceServicer")
    assert hasattr(g, "add_GRPCInferenceServiceServicer_to_server")
    for rpc in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
                "ModelConfig", "ModelStatistics"):  # fmt: skip
        assert callable(getattr(g.GRPCInferenceServiceServicer, rpc))


# ---------------------------------------------------------------------------
# digits.v1, exactly as docs/design.md


def test_digits_package_and_service(digits):
    assert digits.DESCRIPTOR.package == "digits.v1"
    service = digits.DESCRIPTOR.services_by_name["DigitClassifier"]
    assert service.full_name == "digits.v1.DigitClassifier"
    assert rpc_table(service) == [
        ("Classify", "digits.v1.ClassifyRequest", "digits.v1.ClassifyResponse", False, False),
        ("ClassifyStream", "digits.v1.ClassifyRequest", "digits.v1.ClassifyResponse", True, True),
        ("GetModelInfo", "digits.v1.GetModelInfoRequest", "digits.v1.ModelInfo", False, False),
    ]


def test_digits_messages(digits):
    assert sorted(digits.DESCRIPTOR.message_types_by_name) == sorted(
        ["Image", "ClassifyRequest", "Error", "Prediction", "ClassifyResponse", "GetModelInfoRequest", "ModelInfo"]
    )
    assert field_table(digits.Image.DESCRIPTOR) == {
        "pixels": (1, "single", "bytes"),
        "encoded": (2, "single", "bytes"),
    }
    assert oneof_members(digits.Image.DESCRIPTOR) == {"data": ["pixels", "encoded"]}
    assert field_table(digits.ClassifyRequest.DESCRIPTOR) == {
        "images": (1, "repeated", "digits.v1.Image"),
        "return_probabilities": (2, "single", "bool"),
        "return_normalized_image": (3, "single", "bool"),
        "request_id": (4, "single", "string"),
    }
    assert field_table(digits.Error.DESCRIPTOR) == {
        "code": (1, "single", "int32"),
        "message": (2, "single", "string"),
    }
    assert field_table(digits.Prediction.DESCRIPTOR) == {
        "digit": (1, "single", "uint32"),
        "confidence": (2, "single", "float"),
        "probabilities": (3, "repeated", "float"),
        "normalized_image": (4, "single", "bytes"),
        "error": (5, "single", "digits.v1.Error"),
    }
    assert field_table(digits.ClassifyResponse.DESCRIPTOR) == {
        "predictions": (1, "repeated", "digits.v1.Prediction"),
        "model_version": (2, "single", "string"),
        "request_id": (3, "single", "string"),
        "error": (4, "single", "digits.v1.Error"),
    }
    assert field_table(digits.GetModelInfoRequest.DESCRIPTOR) == {}
    assert field_table(digits.ModelInfo.DESCRIPTOR) == {
        "name": (1, "single", "string"),
        "version": (2, "single", "string"),
        "precision": (3, "single", "string"),
        "sha256": (4, "single", "string"),
        "input_shape": (5, "repeated", "int64"),
        "pixel_convention": (6, "single", "string"),
        "max_images_per_request": (7, "single", "uint32"),
        "labels": (8, "repeated", "string"),
        "inference_path": (9, "single", "string"),
    }
    # docs/design.md declares no `optional` fields.
    for msg in digits.DESCRIPTOR.message_types_by_name.values():
        for f in _proto(msg).field:
            assert not f.proto3_optional, f"{msg.name}.{f.name}"


def test_digits_grpc_module():
    from mnist_edge.protos.digits.v1 import digits_pb2_grpc as g

    for name in ("DigitClassifierStub", "DigitClassifierServicer", "add_DigitClassifierServicer_to_server"):
        assert hasattr(g, name)


# ---------------------------------------------------------------------------
# optional: compare with tritonclient's own descriptors (never in this process)

_SCHEMA_DUMP = r"""
import importlib, json, sys
from google.protobuf import descriptor_pb2

FDP = descriptor_pb2.FieldDescriptorProto

def message(m, prefix, out):
    full = prefix + m.name
    out["messages"][full] = {
        "fields": [
            {
                "name": f.name, "number": f.number, "type": FDP.Type.Name(f.type),
                "label": FDP.Label.Name(f.label), "type_name": f.type_name.lstrip("."),
                "oneof": m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None,
                "proto3_optional": f.proto3_optional, "json_name": f.json_name,
            }
            for f in m.field
        ],
        "map_entry": m.options.map_entry,
    }
    for e in m.enum_type:
        out["enums"][full + "." + e.name] = [[v.name, v.number] for v in e.value]
    for n in m.nested_type:
        message(n, full + ".", out)

def dump(module):
    p = descriptor_pb2.FileDescriptorProto()
    importlib.import_module(module).DESCRIPTOR.CopyToProto(p)
    out = {"package": p.package, "syntax": p.syntax, "messages": {}, "enums": {}, "services": {}}
    for e in p.enum_type:
        out["enums"][p.package + "." + e.name] = [[v.name, v.number] for v in e.value]
    for m in p.message_type:
        message(m, p.package + ".", out)
    for s in p.service:
        out["services"][p.package + "." + s.name] = [
            [r.name, r.input_type.lstrip("."), r.output_type.lstrip("."), r.client_streaming, r.server_streaming]
            for r in s.method
        ]
    return out

json.dump([dump(m) for m in sys.argv[1:]], sys.stdout, sort_keys=True)
"""


def _schema(python: str, modules: list[str], cwd: Path, env: dict | None = None) -> list:
    proc = subprocess.run(
        [python, "-c", _SCHEMA_DUMP, *modules], cwd=cwd, capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.full_setup
def test_schema_equals_tritonclient_2_41(tmp_path):
    from helpers.triton import tritonclient_python

    python = str(tritonclient_python())
    ours = _schema(
        sys.executable, ["mnist_edge.protos.inference.grpc_service_pb2", "mnist_edge.protos.inference.model_config_pb2"], REPO_ROOT
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    theirs = _schema(
        python,
        ["tritonclient.grpc.service_pb2", "tritonclient.grpc.model_config_pb2"],
        tmp_path,
        env,
    )
    assert len(theirs[0]["messages"]) > 40 and "inference.ModelConfig" in theirs[1]["messages"]
    assert ours == theirs
