"""`create_server(settings) -> App`: every API on one port, and the lifecycle.

Lifecycle (DESIGN.md): the port opens first with readiness NOT_SERVING and inference
UNAVAILABLE; the model is loaded, verified (sha256, golden images) and warmed up in
the background; then readiness SERVING. `shutdown()`: readiness NOT_SERVING at once,
new calls still served for `drain_delay_s`, then refused with UNAVAILABLE while calls
in flight get `grace_s` to finish. Liveness (health name "liveness") is SERVING
whenever the process runs. A model that fails to load or verify is never SERVING and
the process exits non-zero.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mnist_edge import __version__
from protos.digits.v1 import digits_pb2, digits_pb2_grpc
from protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from server import logs, model_store
from server.core import Core, State
from server.model_store import LoadedModel
from server.native import DigitClassifierServicer
from server.settings import Settings
from server.v2 import InferenceServicer

Loader = Callable[[Settings], LoadedModel]

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
NATIVE_SERVICE = digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"].full_name
READINESS_NAMES = ("", INFERENCE_SERVICE, NATIVE_SERVICE)
LIVENESS_NAME = "liveness"


def default_loader(settings: Settings) -> LoadedModel:
    return model_store.load(settings.model, settings.precision, settings.intra_op_threads)


class BindError(RuntimeError):
    pass


def _atomic_text(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


class App:
    def __init__(self, settings: Settings, loader: Loader | None = None, *, extra_options: list[tuple[str, object]] | None = None) -> None:
        self.settings = settings
        self.loader = loader or default_loader
        self.core = Core(settings)
        self.stopped = threading.Event()
        self.exit_code = 0
        self._shutdown_started = threading.Lock()
        self._shutting_down = False

        self.health = health.HealthServicer(experimental_non_blocking=True)
        # grpc's HealthServicer starts with "" SERVING: readiness must start NOT_SERVING.
        for name in READINESS_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.health.set(LIVENESS_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.core.on_state(self._sync_health)

        options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # One server per port unless workers share it on purpose: a second server on a
            # busy port fails instead of silently splitting the traffic.
            ("grpc.so_reuseport", 0),
        ]
        options += extra_options or []
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.handler_threads, thread_name_prefix="rpc"),
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.core, __version__), self.server)
        digits_pb2_grpc.add_DigitClassifierServicer_to_server(DigitClassifierServicer(self.core), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = [INFERENCE_SERVICE, NATIVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if settings.reflection:
            self.service_names.append(reflection.SERVICE_NAME)
            reflection.enable_server_reflection(self.service_names, self.server)
        self.address = self._bind(settings.address)

    # -- binding ----------------------------------------------------------------
    def _bind(self, address: str) -> str:
        try:
            port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise BindError(f"could not listen on {address}: {exc}") from None
        if address.startswith("unix:"):
            return address
        if port == 0:
            raise BindError(f"could not listen on {address} (in use, or not an address of this machine)")
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    # -- lifecycle ----------------------------------------------------------------
    def _sync_health(self, state: State) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if state is State.SERVING else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_NAMES:
            self.health.set(name, status)

    def start(self, background_load: bool = True) -> "App":
        self.server.start()
        if self.settings.port_file:
            _atomic_text(self.settings.port_file, self.address + "\n")
        logs.event("listening", f"listening on {self.address} (model loading; readiness NOT_SERVING)", address=self.address, pid=os.getpid())
        if background_load:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            model = self.loader(self.settings)
        except Exception as exc:  # noqa: BLE001 - any failure means: never SERVING, exit non-zero
            self.core.failure = str(exc)
            self.core.set_state(State.FAILED)
            logs.event("model_failed", f"model failed to load or verify: {exc}", logging.ERROR)
            self.exit_code = 1
            threading.Thread(target=self._stop_now, name="stopper", daemon=True).start()
            return
        self.core.set_model(model)
        if self.core.state is not State.LOADING:
            return  # a shutdown began while loading
        self.core.set_state(State.SERVING)
        logs.event(
            "serving",
            f"serving on {self.address}",
            address=self.address,
            model=model.name,
            version=model.version,
            precision=model.precision,
            sha256=model.sha256,
            load_seconds=round(time.perf_counter() - started, 3),
        )

    def _stop_now(self) -> None:
        self.server.stop(0).wait()
        self.stopped.set()

    def shutdown(self, reason: str = "signal") -> None:
        """Readiness NOT_SERVING now; serve new calls for drain_delay_s; stop with grace_s."""
        with self._shutdown_started:
            if self._shutting_down:
                return
            self._shutting_down = True
        was = self.core.state
        s = self.settings
        if was is State.SERVING:
            self.core.set_state(State.DRAINING)
        logs.event("draining", f"shutdown ({reason}): readiness NOT_SERVING; serving new calls for {s.drain_delay_s}s", reason=reason, drain_delay_s=s.drain_delay_s)
        if s.drain_delay_s > 0 and was is State.SERVING:
            time.sleep(s.drain_delay_s)
        if self.core.state is not State.FAILED:
            self.core.set_state(State.STOPPING)
        logs.event("stopping", f"refusing new calls; calls in flight have {s.grace_s}s to finish", grace_s=s.grace_s)
        self.server.stop(s.grace_s).wait()
        logs.event("stopped", "server stopped", exit_code=self.exit_code)
        self.stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)


def create_server(settings: Settings, loader: Loader | None = None) -> tuple[App, str]:
    """Build the server and bind its port (not started): returns (app, bound address)."""
    app = App(settings, loader)
    return app, app.address
