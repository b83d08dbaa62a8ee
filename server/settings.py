"""One typed settings object for the server, from flags and MNIST_EDGE_* variables.

Every flag `--some-name` can also be set as MNIST_EDGE_SOME_NAME; a flag on the
command line wins. Booleans accept 1/0/true/false/yes/no/on/off. Defaults are safe
for a laptop: 127.0.0.1:50051, reflection on, TLS off.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "MNIST_EDGE_"
MiB = 1024 * 1024


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    model: str | None = _opt(None, "manifest file or models/ directory (default: the shipped model)")
    precision: str | None = _opt(None, "manifest entry to serve, e.g. int8 or fp32 (default: the manifest's default)")
    trust: str | None = _opt(None, "Ed25519 public key file(s), comma-separated: serve only manifests one of them signed")
    watch_s: float = _opt(0.0, "check the manifest for changes every N seconds and reload (0: only on SIGHUP)")
    address: str = _opt("127.0.0.1:50051", "HOST:PORT to listen on (port 0 picks a free port), or unix:PATH")
    port_file: str | None = _opt(None, "write the bound address here once the port is open (for scripts and tests)")
    socket_mode: str = _opt("0660", "file mode of a unix: socket (octal): who on the device may connect")
    workers: int = _opt(1, "worker processes sharing the port (SO_REUSEPORT); each has its own batcher and model session")
    max_request_images: int = _opt(1024, "images per request (advertised as ModelConfig max_batch_size)")
    max_batch_size: int = _opt(256, "images per executed batch")
    max_queue_delay_us: int = _opt(0, "extra microseconds the batcher may wait to fill a batch")
    max_queue: int = _opt(4096, "images waiting in the queue before RESOURCE_EXHAUSTED")
    max_image_bytes: int = _opt(4 * MiB, "bytes of one encoded image")
    max_image_pixels: int = _opt(4096 * 4096, "pixels of one decoded image (checked from the header)")
    max_message_bytes: int = _opt(16 * MiB, "bytes of one gRPC message")
    max_connection_age_s: float = _opt(0.0, "close client connections after this many seconds (0: never), so long-lived HTTP/2 connections rebalance onto new replicas")
    grace_s: float = _opt(10.0, "seconds in-flight calls get to finish on shutdown")
    drain_delay_s: float = _opt(0.0, "seconds new calls are still served after SIGTERM (readiness already NOT_SERVING)")
    reflection: bool = _opt(True, "gRPC server reflection")
    tls_cert: str | None = _opt(None, "PEM certificate chain: serve TLS (with --tls-key)")
    tls_key: str | None = _opt(None, "PEM private key for --tls-cert")
    tls_client_ca: str | None = _opt(None, "PEM CA bundle: require client certificates signed by it (mutual TLS)")
    token_file: str | None = _opt(None, "file holding a bearer token every call must present (health is exempt)")
    health_address: str | None = _opt(None, "HOST:PORT for a plaintext health-only listener (for probes that cannot speak TLS)")
    http_address: str = _opt(
        "", "HOST:PORT for HTTP/REST: the Open Inference Protocol over REST, POST /v1/classify and the page at / "
        '(port 0 picks a free port; "" turns it off); same TLS and token as gRPC'
    )
    http_cors_origin: str | None = _opt(None, "origins allowed to call the HTTP APIs from a browser, comma-separated, or * (default: CORS off)")
    http_max_connections: int = _opt(256, "HTTP connections open at once; a new one closes the connection idle longest, or gets 503 when all are busy")
    http_read_timeout_s: float = _opt(30.0, "seconds an HTTP request may take to arrive, from its first byte to its last (then 408)")
    http_idle_timeout_s: float = _opt(60.0, "seconds an idle HTTP keep-alive connection stays open")
    metrics_address: str = _opt("127.0.0.1:9464", 'HOST:PORT for the Prometheus /metrics endpoint ("" turns it off)', empty_is_value=True)
    intra_op_threads: int = _opt(1, "onnxruntime intra-op threads per session")
    infer_lane: bool = _opt(True, "serve ModelInfer and the native Classify on one thread straight from gRPC's completion queue (no thread hand-offs; requests ready together run as one batch; encoded images go to the handler threads); off: on the handler threads")
    handler_threads: int = _opt(4, "threads for unary calls (most recently idle first; more calls wait in line, none is refused); threads start on demand")
    stream_threads: int = _opt(64, "threads for streams: streams open at once (each open stream holds one; more wait for one to close)")
    max_concurrent_rpcs: int = _opt(1024, "calls accepted at once; more get RESOURCE_EXHAUSTED from gRPC (ModelInfer and Classify on the inference lane: more wait in gRPC core)")
    access_log: bool = _opt(False, "one JSON line per call on the log stream (request id, method, status, images, timings, peer, trace id); docs/deploy.md")
    access_log_sample: float = _opt(1.0, "fraction of calls the access log records (0..1), for busy servers")
    otel: bool = _opt(False, "an OpenTelemetry span per call, exported as the OTEL_* variables say (needs pip install 'mnist-edge[otel]'); docs/deploy.md")
    previous_version_grace_s: float = _opt(30.0, "after a reload, the previous version still answers calls that name it for this many seconds, then is unloaded")
    capture_dir: str | None = _opt(None, "keep the inputs the model was unsure about in this folder, for labelling (docs/field-loop.md); off by default: captured images are user data")
    capture_below: float = _opt(0.8, "capture an image when its top probability is below this")
    capture_sample: float = _opt(0.0, "also capture this fraction (0-1) of confident images, for spot checks")
    capture_max_mb: float = _opt(100.0, "megabytes the captures may take; the oldest are removed beyond it")
    capture_max_age_days: float = _opt(0.0, "remove captures older than this many days (0: kept until --capture-max-mb needs the room)")
    capture_private: bool = _opt(False, "capture files mode 0600 and folders 0700 (default 0640 and 0750: readable by the server's group)")
    log_format: str = _opt("json", "log line format: json or text", choices=("json", "text"))
    log_level: str = _opt("info", "log level", choices=("debug", "info", "warning", "error"))

    def validate(self) -> Settings:
        positive = ("workers", "max_request_images", "max_batch_size", "max_queue", "max_image_bytes", "max_image_pixels", "max_message_bytes", "intra_op_threads", "handler_threads", "stream_threads", "max_concurrent_rpcs")
        positive += ("http_max_connections", "http_read_timeout_s", "http_idle_timeout_s")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.otel:
            import importlib.util

            if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.sdk") is None:
                raise ValueError("--otel needs the OpenTelemetry SDK, which is not installed: pip install 'mnist-edge[otel]'")
        if not 0.0 <= self.access_log_sample <= 1.0:
            raise ValueError(f"--access-log-sample must be between 0 and 1, got {self.access_log_sample}")
        for name in ("max_queue_delay_us", "grace_s", "drain_delay_s", "watch_s", "max_connection_age_s", "previous_version_grace_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 < self.capture_below <= 1:
            raise ValueError(f"--capture-below must be in (0, 1], got {self.capture_below}")
        if not 0 <= self.capture_sample <= 1:
            raise ValueError(f"--capture-sample must be in [0, 1], got {self.capture_sample}")
        if self.capture_max_mb <= 0:
            raise ValueError(f"--capture-max-mb must be positive, got {self.capture_max_mb}")
        if self.capture_max_age_days < 0:
            raise ValueError(f"--capture-max-age-days must not be negative, got {self.capture_max_age_days}")
        try:
            if not 0 <= int(self.socket_mode, 8) <= 0o777:
                raise ValueError
        except ValueError:
            raise ValueError(f"--socket-mode must be an octal file mode like 0660, got {self.socket_mode!r}") from None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if self.http_address and (self.http_address.startswith("unix:") or ":" not in self.http_address):
            raise ValueError(f"--http-address must be HOST:PORT, got {self.http_address!r}")
        if self.workers > 1 and self.address.startswith("unix:"):
            raise ValueError("--workers must be 1 with a unix: address (a Unix socket cannot be shared by worker processes)")
        if self.max_queue < self.max_request_images:
            raise ValueError(
                f"--max-queue ({self.max_queue}) must be at least --max-request-images ({self.max_request_images}), "
                "or a largest allowed request could never be queued"
            )
        # A full request of FP32 images must fit in one message, with room for framing.
        need = self.max_request_images * 784 * 4 + 64 * 1024
        if self.max_message_bytes < need:
            raise ValueError(
                f"--max-message-bytes ({self.max_message_bytes}) must be at least {need} to carry "
                f"{self.max_request_images} FP32 images (--max-request-images) plus framing"
            )
        if self.max_message_bytes <= self.max_image_bytes:
            raise ValueError(
                f"--max-message-bytes ({self.max_message_bytes}) must exceed --max-image-bytes ({self.max_image_bytes})"
            )
        return self

    @property
    def trusted_key_files(self) -> list[str]:
        return [p for p in (self.trust or "").split(",") if p.strip()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (1/0/true/false), got {text!r}")


def env_name(flag_field: str) -> str:
    return ENV_PREFIX + flag_field.upper()


def build_parser(prog: str = "mnist-edge serve", env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve the MNIST model over gRPC: Open Inference Protocol (KServe v2), digits.v1, health, reflection. "
        "Every flag can also be set as MNIST_EDGE_<FLAG> (e.g. --max-batch-size -> MNIST_EDGE_MAX_BATCH_SIZE); flags win.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        var = env_name(f.name)
        help_text = f"{f.metadata['help']} [env {var}]"
        default = f.default
        raw = env.get(var)
        kind = _kind(f)
        if raw == "" and f.metadata.get("empty_is_value"):
            default = ""  # e.g. MNIST_EDGE_METRICS_ADDRESS="" turns metrics off, as the flag does
        elif raw is not None and raw != "":
            try:
                default = kind(raw) if kind is not bool else parse_bool(raw)
            except ValueError as exc:
                raise SystemExit(f"{prog}: environment variable {var}={raw!r}: {exc}") from None
            choices = f.metadata.get("choices")
            if choices and default not in choices:
                raise SystemExit(f"{prog}: environment variable {var}={raw!r}: expected one of {', '.join(choices)}")
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            p.add_argument(flag, type=kind, default=default, help=help_text, choices=f.metadata.get("choices"))
    return p


def _kind(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if t.startswith("bool"):
        return bool
    if t.startswith("int"):
        return int
    if t.startswith("float"):
        return float
    return str


def from_args(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    parser = build_parser(env=env)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings)}
    try:
        return Settings(**values).validate()
    except ValueError as exc:
        # Say where a value came from when it was not on the command line.
        given = set(argv if argv is not None else sys.argv[1:])
        sources = [
            f"{env_name(f.name)}={env[env_name(f.name)]}"
            for f in dataclasses.fields(Settings)
            if env.get(env_name(f.name)) and not any(a.split("=")[0] == "--" + f.name.replace("_", "-") for a in given)
            and ("--" + f.name.replace("_", "-")) in str(exc)
        ]
        parser.error(str(exc) + (f" (from the environment: {', '.join(sources)})" if sources else ""))
        raise  # unreachable: parser.error exits


# MNIST_EDGE_* variables that are not `serve` flags, so never warned about (docs/deploy.md lists
# them): data and cache folders (training/data.py), what the parent hands its workers, image
# build settings (deploy/build-image.sh), and the test suite's settings (scripts/test).
NOT_FLAGS = frozenset({
    "MNIST_EDGE_DATA_DIR", "MNIST_EDGE_CACHE_DIR",
    "MNIST_EDGE_WORKER_SETTINGS",
    "MNIST_EDGE_IMAGE_CACHE", "MNIST_EDGE_REBUILD_BASE", "MNIST_EDGE_ARM64_WHEELS",
    "MNIST_EDGE_WHEELHOUSE", "MNIST_EDGE_TRITONCLIENT_PYTHON", "MNIST_EDGE_PERF_ANALYZER",
    "MNIST_EDGE_KSERVE_PYTHON", "MNIST_EDGE_REQUIRE_PROXY", "MNIST_EDGE_REQUIRE_IMAGE",
    "MNIST_EDGE_CHROMIUM", "MNIST_EDGE_CHROMEDRIVER",
})
# Kubernetes' service links: a Service named mnist-edge (or mnist-edge-metrics) puts
# MNIST_EDGE_SERVICE_HOST, MNIST_EDGE_PORT_50051_TCP_ADDR, ... into every pod of its namespace.
_SERVICE_LINK = re.compile(r"^MNIST_EDGE(_[A-Z0-9]+)*_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_(ADDR|PORT|PROTO))?)?)$")


def unknown_env(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """(variable, closest flag variable or None) for each MNIST_EDGE_* name that is no setting."""
    env = os.environ if env is None else env
    known = [env_name(f.name) for f in dataclasses.fields(Settings)]
    unknown = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in known or name in NOT_FLAGS or _SERVICE_LINK.match(name):
            continue
        # Compared without the shared prefix, which would make every name look close.
        close = difflib.get_close_matches(name[len(ENV_PREFIX):], [k[len(ENV_PREFIX):] for k in known], n=1, cutoff=0.6)
        unknown.append((name, ENV_PREFIX + close[0] if close else None))
    return unknown


def warn_unknown_env(env: Mapping[str, str] | None = None) -> None:
    """Name each unknown MNIST_EDGE_* variable in a warning: a misspelt setting is otherwise silently ignored."""
    from mnist_edge.server import logs

    for name, closest in unknown_env(env):
        hint = f"did you mean {closest}?" if closest else "no setting has a similar name"
        logs.event("unknown_setting", f"environment variable {name} is not a setting and is ignored; {hint} (mnist-edge serve --help lists them)",
                   logging.WARNING, variable=name, closest=closest)
