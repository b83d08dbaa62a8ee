"""Settings: every flag also read from MNIST_EDGE_<NAME>, flags win, docs/design.md's defaults, named errors."""

from __future__ import annotations

import dataclasses
import signal

import grpc
import numpy as np
import pytest

from helpers.servers import health_status, start_cli_server, wait_for
from mnist_edge.server import settings as settings_mod
from mnist_edge.server.settings import Settings, from_args

MiB = 1024 * 1024

# One value per flag, as text in the environment and as the parsed value; a second set for the
# command line, to show flags win. A new flag must be added here (test_every_flag_is_covered).
SAMPLES: dict[str, tuple[str, object, str, object]] = {
    # name: (env text, env value, flag text, flag value)
    "model": ("/srv/models", "/srv/models", "/opt/models/manifest.json", "/opt/models/manifest.json"),
    "precision": ("fp32", "fp32", "int8", "int8"),
    "address": ("0.0.0.0:6000", "0.0.0.0:6000", "127.0.0.1:7000", "127.0.0.1:7000"),
    "port_file": ("/tmp/env-port", "/tmp/env-port", "/tmp/flag-port", "/tmp/flag-port"),
    "workers": ("2", 2, "3", 3),
    "trust": ("/k/a.pub", "/k/a.pub", "/k/b.pub,/k/c.pub", "/k/b.pub,/k/c.pub"),
    "watch_s": ("1.5", 1.5, "2", 2.0),
    "max_request_images": ("7", 7, "9", 9),
    "max_batch_size": ("17", 17, "33", 33),
    "max_queue_delay_us": ("250", 250, "500", 500),
    "max_queue": ("5000", 5000, "6000", 6000),
    "max_image_bytes": ("1048576", 1 * MiB, "2097152", 2 * MiB),
    "max_image_pixels": ("1000000", 1_000_000, "2000000", 2_000_000),
    "max_message_bytes": ("33554432", 32 * MiB, "25165824", 24 * MiB),
    "grace_s": ("2.5", 2.5, "3.5", 3.5),
    "max_connection_age_s": ("30", 30.0, "60", 60.0),
    "socket_mode": ("0600", "0600", "0666", "0666"),
    "drain_delay_s": ("1.5", 1.5, "0.25", 0.25),
    "reflection": ("0", False, "--reflection", True),
    "tls_cert": ("/etc/tls/env.crt", "/etc/tls/env.crt", "/etc/tls/flag.crt", "/etc/tls/flag.crt"),
    "tls_key": ("/etc/tls/env.key", "/etc/tls/env.key", "/etc/tls/flag.key", "/etc/tls/flag.key"),
    "tls_client_ca": ("/etc/tls/env-ca.pem", "/etc/tls/env-ca.pem", "/etc/tls/flag-ca.pem", "/etc/tls/flag-ca.pem"),
    "token_file": ("/run/secrets/env-token", "/run/secrets/env-token", "/run/secrets/flag-token", "/run/secrets/flag-token"),
    "health_address": ("0.0.0.0:8081", "0.0.0.0:8081", "127.0.0.1:8082", "127.0.0.1:8082"),
    "metrics_address": ("0.0.0.0:9100", "0.0.0.0:9100", "127.0.0.1:9200", "127.0.0.1:9200"),
    "intra_op_threads": ("2", 2, "3", 3),
    "infer_lane": ("0", False, "--infer-lane", True),
    "handler_threads": ("9", 9, "11", 11),
    "stream_threads": ("7", 7, "13", 13),
    "max_concurrent_rpcs": ("77", 77, "88", 88),
    "http_address": ("0.0.0.0:8000", "0.0.0.0:8000", "127.0.0.1:8001", "127.0.0.1:8001"),
    "http_cors_origin": ("*", "*", "http://ui.local", "http://ui.local"),
    "http_max_connections": ("64", 64, "128", 128),
    "http_read_timeout_s": ("5", 5.0, "7.5", 7.5),
    "http_idle_timeout_s": ("20", 20.0, "40", 40.0),
    "access_log": ("1", True, "--no-access-log", False),
    "access_log_sample": ("0.25", 0.25, "0.5", 0.5),
    "previous_version_grace_s": ("5", 5.0, "0", 0.0),
    "otel": ("1", True, "--no-otel", False),
    "capture_dir": ("/var/lib/env-captures", "/var/lib/env-captures", "/srv/captures", "/srv/captures"),
    "capture_below": ("0.7", 0.7, "0.9", 0.9),
    "capture_sample": ("0.01", 0.01, "0.05", 0.05),
    "capture_max_mb": ("50", 50.0, "1", 1.0),
    "capture_max_age_days": ("30", 30.0, "7", 7.0),
    "capture_private": ("1", True, "--no-capture-private", False),
    "log_format": ("text", "text", "json", "json"),
    "log_level": ("debug", "debug", "error", "error"),
}

# docs/design.md, "Configuration" (and "Lifecycle" for drain_delay_s).
DESIGN_DEFAULTS = {
    "max_request_images": 1024,
    "max_batch_size": 256,
    "max_queue_delay_us": 0,
    "max_queue": 4096,
    "max_image_bytes": 4 * MiB,
    "max_image_pixels": 16_777_216,
    "max_message_bytes": 16 * MiB,
    "grace_s": 10,
    "drain_delay_s": 0,
    "address": "127.0.0.1:50051",
    "reflection": True,
}

FIELDS = [f.name for f in dataclasses.fields(Settings)]

# Settings that are only valid together: set the companions too when testing one alone.
COMPANIONS = {
    "tls_cert": {"tls_key": "/k.pem"},
    "tls_key": {"tls_cert": "/c.pem"},
    "tls_client_ca": {"tls_cert": "/c.pem", "tls_key": "/k.pem"},
}


def var(name: str) -> str:
    return "MNIST_EDGE_" + name.upper()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_argv(name: str, text: str) -> list[str]:
    return [text] if text.startswith("--") else [flag(name), text]


def exit_message(capsys, argv: list[str], env: dict[str, str]) -> str:
    """from_args must exit; the message (SystemExit's text or argparse's stderr) is returned."""
    with pytest.raises(SystemExit) as info:
        from_args(argv, env=env)
    code = info.value.code
    if isinstance(code, str):
        return code
    assert code == 2, code
    return capsys.readouterr().err


def test_every_flag_is_covered():
    assert sorted(SAMPLES) == sorted(FIELDS)


def test_env_name_rule():
    assert settings_mod.env_name("max_batch_size") == "MNIST_EDGE_MAX_BATCH_SIZE"
    help_text = settings_mod.build_parser(env={}).format_help()
    for name in FIELDS:
        assert flag(name) in help_text
        assert var(name) in help_text, f"--help does not name {var(name)}"


def test_defaults_are_designs_table():
    s = from_args([], env={})
    assert {k: getattr(s, k) for k in DESIGN_DEFAULTS} == DESIGN_DEFAULTS
    assert s == Settings().validate()  # the parser adds nothing of its own
    assert s.model is None and s.port_file is None


@pytest.mark.parametrize("name", FIELDS)
def test_each_flag_is_read_from_its_environment_variable(name):
    env_text, env_value, _, _ = SAMPLES[name]
    companions = COMPANIONS.get(name, {})
    s = from_args([], env={var(name): env_text, **{var(k): v for k, v in companions.items()}})
    assert getattr(s, name) == env_value
    assert type(getattr(s, name)) is type(env_value)
    # nothing else moved
    others = {k: getattr(s, k) for k in FIELDS if k != name and k not in companions}
    assert others == {k: getattr(Settings(), k) for k in FIELDS if k != name and k not in companions}


def test_all_variables_at_once():
    env = {var(name): sample[0] for name, sample in SAMPLES.items()}
    s = from_args([], env=env)
    assert {k: getattr(s, k) for k in FIELDS} == {k: v[1] for k, v in SAMPLES.items()}


@pytest.mark.parametrize("name", FIELDS)
def test_a_flag_wins_over_its_variable(name):
    env_text, _, flag_text, flag_value = SAMPLES[name]
    companions = {var(k): v for k, v in COMPANIONS.get(name, {}).items()}
    s = from_args(flag_argv(name, flag_text), env={var(name): env_text, **companions})
    assert getattr(s, name) == flag_value


def test_flags_win_all_at_once():
    env = {var(name): sample[0] for name, sample in SAMPLES.items()}
    argv = [a for name, sample in SAMPLES.items() for a in flag_argv(name, sample[2])]
    s = from_args(argv, env=env)
    assert {k: getattr(s, k) for k in FIELDS} == {k: v[3] for k, v in SAMPLES.items()}


def test_no_reflection_flag_wins_over_a_true_variable():
    assert from_args(["--no-reflection"], env={"MNIST_EDGE_REFLECTION": "1"}).reflection is False


@pytest.mark.parametrize(
    "text, value",
    [("1", True), ("0", False), ("true", True), ("false", False), ("TRUE", True), ("False", False), (" true ", True)],
)
def test_boolean_variables(text, value):
    assert from_args([], env={"MNIST_EDGE_REFLECTION": text}).reflection is value


def test_an_empty_variable_means_unset():
    s = from_args([], env={"MNIST_EDGE_REFLECTION": "", "MNIST_EDGE_MAX_BATCH_SIZE": "", "MNIST_EDGE_ADDRESS": ""})
    assert s.reflection is True and s.max_batch_size == 256 and s.address == "127.0.0.1:50051"


@pytest.mark.parametrize("text", ["maybe", "2", "yes please", "enabled"])
def test_a_bad_boolean_names_the_variable(capsys, text):
    message = exit_message(capsys, [], {"MNIST_EDGE_REFLECTION": text})
    assert "MNIST_EDGE_REFLECTION" in message and repr(text) in message
    assert "1/0/true/false" in message


@pytest.mark.parametrize(
    "name, text",
    [("max_batch_size", "many"), ("max_request_images", "1e3"), ("grace_s", "soon"), ("max_message_bytes", "16MiB")],
)
def test_a_bad_number_names_the_variable(capsys, name, text):
    message = exit_message(capsys, [], {var(name): text})
    assert var(name) in message and repr(text) in message


@pytest.mark.parametrize("name, text", [("log_format", "xml"), ("log_level", "verbose")])
def test_a_bad_choice_in_a_variable_names_the_variable(capsys, name, text):
    message = exit_message(capsys, [], {var(name): text})
    assert var(name) in message


def test_a_bad_choice_on_the_command_line_is_refused(capsys):
    message = exit_message(capsys, ["--log-format", "xml"], {})
    assert "--log-format" in message and "'xml'" in message


# -- validation: each error names the setting and what was expected ---------------------

@pytest.mark.parametrize(
    "argv, env, fragments",
    [
        (
            ["--max-message-bytes", "3000000"],
            {},
            ["--max-message-bytes (3000000) must be at least 3276800", "1024 FP32 images", "--max-request-images"],
        ),
        (
            [],
            {"MNIST_EDGE_MAX_MESSAGE_BYTES": "3000000"},
            ["--max-message-bytes (3000000) must be at least 3276800"],
        ),
        (
            ["--max-message-bytes", "4194304"],
            {},
            ["--max-message-bytes (4194304) must exceed --max-image-bytes (4194304)"],
        ),
        (["--max-queue", "100"], {}, ["--max-queue (100) must be at least --max-request-images (1024)"]),
        (["--max-batch-size", "0"], {}, ["--max-batch-size must be positive, got 0"]),
        (["--max-request-images", "-1"], {}, ["--max-request-images must be positive, got -1"]),
        (["--grace-s", "-1"], {}, ["--grace-s must not be negative, got -1.0"]),
        ([], {"MNIST_EDGE_DRAIN_DELAY_S": "-2"}, ["--drain-delay-s must not be negative, got -2.0"]),
        (["--max-queue-delay-us", "-5"], {}, ["--max-queue-delay-us must not be negative, got -5"]),
    ],
)
def test_validation_errors_are_named(capsys, argv, env, fragments):
    message = exit_message(capsys, argv, env)
    for fragment in fragments:
        assert fragment in message, message


def test_the_message_limit_boundary():
    need = 1024 * 784 * 4 + 64 * 1024
    s = from_args(["--max-message-bytes", str(need), "--max-image-bytes", str(MiB)], env={})
    assert s.max_message_bytes == need
    with pytest.raises(ValueError, match="must be at least"):
        Settings(max_message_bytes=need - 1, max_image_bytes=MiB).validate()
    # fewer images per request need a smaller message
    assert from_args(["--max-request-images", "7", "--max-message-bytes", str(2 * MiB), "--max-image-bytes", str(MiB)], env={})


# -- a real `mnist-edge serve` reads its environment -----------------------------------

def test_cli_server_takes_max_request_images_from_the_environment(tmp_path, mnist):
    from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
    from mnist_edge.protos.inference import grpc_service_pb2 as pb
    from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

    proc, address = start_cli_server(tmp_path, "--log-format", "json", env={"MNIST_EDGE_MAX_REQUEST_IMAGES": "7"})
    try:
        wait_for(lambda: health_status(address) == "SERVING" or proc.poll() is not None, timeout=60)
        assert proc.poll() is None, proc.stderr.read()
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            config = stub.ModelConfig(pb.ModelConfigRequest(name="mnist"), timeout=10).config
            assert config.max_batch_size == 7
            info = digits_pb2_grpc.DigitClassifierStub(ch).GetModelInfo(digits_pb2.GetModelInfoRequest(), timeout=10)
            assert info.max_images_per_request == 7

            def infer(n: int):
                images = np.ascontiguousarray(mnist.test.images[:n])
                req = pb.ModelInferRequest(
                    model_name="mnist",
                    inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[n, 28, 28])],
                    raw_input_contents=[images.tobytes()],
                )
                return stub.ModelInfer(req, timeout=10)

            assert len(infer(7).raw_output_contents) == 2
            with pytest.raises(grpc.RpcError) as err:
                infer(8)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "8 images in one request, over the limit of 7" in err.value.details()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
