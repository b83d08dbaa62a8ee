"""`create_server(settings) -> App`: every API on one port, and the lifecycle.

Lifecycle (docs/design.md): the port opens first with readiness NOT_SERVING and inference
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
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mnist_edge import __version__
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc
from mnist_edge.protos.inference import grpc_service_pb2, grpc_service_pb2_grpc
from mnist_edge.server import drain, lane, logs, model_store, native, threads, v2
from mnist_edge.server.core import Core, State
from mnist_edge.server.health import HealthServicer
from mnist_edge.server.model_store import LoadedModel
from mnist_edge.server.native import DigitClassifierServicer
from mnist_edge.server.settings import Settings
from mnist_edge.server.v2 import InferenceServicer

Loader = Callable[[Settings], LoadedModel]

INFERENCE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
NATIVE_SERVICE = digits_pb2.DESCRIPTOR.services_by_name["DigitClassifier"].full_name
READINESS_NAMES = ("", INFERENCE_SERVICE, NATIVE_SERVICE)
LIVENESS_NAME = "liveness"
MODEL_INFER = f"/{INFERENCE_SERVICE}/ModelInfer"
CLASSIFY = f"/{NATIVE_SERVICE}/Classify"

# gRPC core's bounds on what one call's headers may hold (docs/limits.md), set explicitly rather
# than left to defaults that change between releases: metadata over the soft limit may be
# refused and over the hard one always is; HTTP/2 frames and the HPACK table stay at their
# protocol minimums, so a header block is read in 16 KiB frames against those limits.
HEADER_BOUNDS: list[tuple[str, object]] = [
    ("grpc.max_metadata_size", 8 * 1024),
    ("grpc.absolute_max_metadata_size", 16 * 1024),
    ("grpc.http2.max_frame_size", 16 * 1024),
    ("grpc.http2.hpack_table_size.decoder", 4096),
]


def default_loader(settings: Settings, min_version: int | None = None) -> LoadedModel:
    keys = None
    if settings.trusted_key_files:
        from mnist_edge.server.signing import load_public_keys

        keys = load_public_keys(settings.trusted_key_files)
    return model_store.load(settings.model, settings.precision, settings.intra_op_threads, trusted_keys=keys, min_version=min_version)


class BindError(RuntimeError):
    """Bad settings or an address that cannot be bound: the process exits 2 before serving."""


def check_trust(settings: Settings) -> None:
    """A bad --trust is bad settings: refused before the port opens (BindError: exit 2), not
    found later by the model loader (exit 1, after clients saw the port)."""
    if not settings.trusted_key_files:
        return
    from mnist_edge.server.signing import SignatureError, load_public_keys

    try:
        load_public_keys(settings.trusted_key_files)
    except SignatureError as exc:
        raise BindError(str(exc)) from None


def unix_path(address: str) -> Path:
    """unix:PATH or unix:///ABSOLUTE/PATH (gRPC's two spellings) -> the socket's path."""
    rest = address[len("unix:"):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse to take over a live one."""
    import socket

    if not path.exists():
        return
    if not path.is_socket():
        raise BindError(f"could not listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise BindError(f"could not listen on unix:{path}: another server is listening there")


def _atomic_text(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


class App:
    def __init__(self, settings: Settings, loader: Loader | None = None, *, reuseport: bool = False, extra_options: list[tuple[str, object]] | None = None) -> None:
        self.settings = settings
        self.loader = loader or default_loader
        check_trust(settings)
        self.core = Core(settings)
        self.stopped = threading.Event()
        self.exit_code = 0
        self._shutdown_started = threading.Lock()
        self._shutting_down = False
        self._reload_lock = threading.Lock()

        self.health = HealthServicer(experimental_non_blocking=True)
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
            ("grpc.so_reuseport", 1 if reuseport else 0),
            *HEADER_BOUNDS,
        ]
        if settings.max_connection_age_s > 0:
            # Clients reconnect (and re-resolve) after this; calls in flight get a grace period.
            options += [
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(max(settings.grace_s, 1.0) * 1000)),
            ]
        options += extra_options or []
        # The drain gate first: at the end of a drain it holds new calls (server/drain.py).
        self.gate = drain.DrainGate()
        interceptors: list[grpc.ServerInterceptor] = [self.gate]
        if self.core.access_log is not None:
            # Right after the drain gate, so that calls a later interceptor refuses (a wrong
            # token) are logged too.
            from mnist_edge.server.access_log import AccessInterceptor

            interceptors.append(AccessInterceptor(self.core.access_log))
        token = None
        token_bytes = None
        if settings.token_file:
            from mnist_edge.server.auth import TokenInterceptor, read_token

            try:
                token_bytes = read_token(settings.token_file)
                token = TokenInterceptor(token_bytes)
            except ValueError as exc:
                raise BindError(str(exc)) from None
            interceptors.append(token)
        self.token = token
        # Unary calls on a small last-in-first-out pool; every streaming method on a pool of its
        # own, so open streams never hold the threads unary calls need (server/threads.py).
        self.pool = threads.LifoThreadPool(settings.handler_threads, thread_name_prefix="rpc")
        self.stream_pool = futures.ThreadPoolExecutor(max_workers=settings.stream_threads, thread_name_prefix="stream")
        self.server = grpc.server(
            self.pool,
            options=options,
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
            interceptors=interceptors,
        )
        v2_servicer = InferenceServicer(self.core, __version__, offload=self.pool.submit)
        native_servicer = DigitClassifierServicer(self.core, offload=self.pool.submit)
        # ModelInfer and Classify on the inference lane (server/lane.py): one thread, no
        # hand-offs. grpcio's private layer it uses is checked first; without it they stay on
        # the handler threads.
        self.lane: lane.Lane | None = None
        # Where ModelInfer and Classify are served ("lane", "handler-threads"), and why not on
        # the lane when it was asked for: shown in the log, the metrics and GetModelInfo.
        self.inference_path = "handler-threads"
        self.lane_fallback_reason = ""
        if settings.infer_lane:
            failure = lane.self_check()
            if failure is None:
                self.lane = lane.Lane(
                    self.server,
                    {MODEL_INFER: v2_servicer.model_infer_group, CLASSIFY: native_servicer.classify_group},
                    authorize=token.refusal if token else None,
                    max_calls=settings.max_concurrent_rpcs,
                    gather_s=settings.max_queue_delay_us / 1e6,
                    max_group=settings.max_batch_size,
                    max_images=settings.max_queue,
                    max_request_images=settings.max_request_images,
                    on_refused=self._log_lane_refusal if self.core.access_log is not None else None,
                )
                self.inference_path = "lane"
            else:
                self.lane_fallback_reason = failure
                logs.event(
                    "lane_unavailable",
                    f"inference lane self-check failed ({failure}): ModelInfer and Classify are served from the handler threads",
                    logging.WARNING,
                    reason=failure,
                )
        self.core.inference_path = self.inference_path
        on_lane = frozenset(self.lane.methods if self.lane else ())
        registrations = [
            (lambda s: grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(v2_servicer, s), {"ModelInfer": v2.model_infer_handler(v2_servicer)}),
            (lambda s: digits_pb2_grpc.add_DigitClassifierServicer_to_server(native_servicer, s), {"Classify": native.classify_handler(native_servicer)}),
            (lambda s: health_pb2_grpc.add_HealthServicer_to_server(self.health, s), None),
        ]
        self.service_names = [INFERENCE_SERVICE, NATIVE_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        if settings.reflection:
            names = self.service_names + [reflection.SERVICE_NAME]
            registrations.append((lambda s: reflection.enable_server_reflection(names, s), None))
            self.service_names = names
        for add, replace in registrations:
            threads.register(add, self.server, self.stream_pool, replace, on_lane)
        self.address = self._bind(settings.address)
        self.health_server: grpc.Server | None = None
        self.health_address: str | None = None
        if settings.health_address:
            # Probes that cannot speak TLS get health, and nothing else, in plaintext.
            self.health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"), options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            port = self.health_server.add_insecure_port(settings.health_address)
            if port == 0:
                raise BindError(f"could not listen on {settings.health_address} (--health-address)")
            self.health_address = f"{settings.health_address.rsplit(':', 1)[0]}:{port}"
        self.metrics_address: str | None = None
        self._metrics_httpd = None
        # HTTP/REST only when asked for: without --http-address its modules are never imported.
        self.http = None
        self.http_address: str | None = None
        if settings.http_address:
            self._bind_http(token_bytes, reuseport)

    def _log_lane_refusal(self, call: lane.LaneCall, status: str) -> None:
        """An access log line for a call the inference lane refused before any handler ran."""
        service, _, method = call.method.name.lstrip("/").partition("/")
        self.core.access_log.record(api="v2" if service == INFERENCE_SERVICE else "native", method=method, status=status,
                                    duration_ns=0, peer=call.peer(), metadata=call.invocation_metadata())

    # -- binding ----------------------------------------------------------------
    def _bind(self, address: str) -> str:
        unix = address.startswith("unix:")
        if unix:
            _clear_stale_socket(unix_path(address))
        credentials = self._credentials()
        # A unix socket is created under a umask that gives it --socket-mode's permissions (or
        # fewer) from the start: there is no moment when the umask's usual mode lets others in.
        # The server has started no thread yet (none runs before start()).
        umask = os.umask(0o777 & ~int(self.settings.socket_mode, 8)) if unix else None
        try:
            port = self.server.add_secure_port(address, credentials) if credentials else self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise BindError(f"could not listen on {address}: {exc}") from None
        finally:
            if umask is not None:
                os.umask(umask)
        if unix:
            # Deliberate permissions: only the owner and its group (e.g. the camera process) may connect.
            os.chmod(unix_path(address), int(self.settings.socket_mode, 8))
            return address
        if port == 0:
            raise BindError(f"could not listen on {address} (in use, or not an address of this machine)")
        host = address.rsplit(":", 1)[0]
        return f"{host}:{port}"

    def _bind_http(self, token: bytes | None, reuseport: bool) -> None:
        from mnist_edge.server.http import HttpServer, server_ssl_context
        from mnist_edge.server.rest import RestApi

        s = self.settings
        try:
            context = server_ssl_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert else None
        except (OSError, ValueError) as exc:
            raise BindError(f"could not read TLS files for --http-address: {exc}") from None
        api = RestApi(self.core, __version__, token=token, cors_origin=s.http_cors_origin)
        try:
            self.http = HttpServer(
                s.http_address, api, max_connections=s.http_max_connections, read_timeout_s=s.http_read_timeout_s,
                idle_timeout_s=s.http_idle_timeout_s, max_body_bytes=s.max_message_bytes, ssl_context=context,
                reuseport=reuseport, closing=lambda: self.core.state in (State.DRAINING, State.STOPPING),
            )
        except OSError as exc:
            raise BindError(f"could not listen on {s.http_address} (--http-address): {exc.strerror or exc}") from None
        self.http_address = self.http.address

    def _stop_http(self, grace_s: float) -> threading.Thread | None:
        """Stop the HTTP port alongside gRPC: returns the thread to join."""
        if self.http is None:
            return None
        t = threading.Thread(target=self.http.stop, args=(grace_s,), name="http-stop", daemon=True)
        t.start()
        return t

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if not s.tls_cert:
            return None
        try:
            cert, key = Path(s.tls_cert).read_bytes(), Path(s.tls_key).read_bytes()
            ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
        except OSError as exc:
            raise BindError(f"could not read TLS files: {exc}") from None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    # -- lifecycle ----------------------------------------------------------------
    def _sync_health(self, state: State) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if state is State.SERVING else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in READINESS_NAMES:
            self.health.set(name, status)

    def metrics_snapshot(self) -> dict:
        from mnist_edge.server.metrics import snapshot

        snap = snapshot(self.core.stats, self.core.model, self.core.ready, self.core.batcher.queued_images, self.core.previous)
        snap["lane_active"] = 1 if self.lane is not None else 0
        if self.core.capture is not None:
            snap["captures"] = self.core.capture.snapshot()
        return snap

    def start(self, background_load: bool = True) -> App:
        if self.settings.metrics_address:
            from mnist_edge.server.metrics import start_http

            try:
                self._metrics_httpd, self.metrics_address = start_http(self.settings.metrics_address, self.metrics_snapshot)
            except OSError as exc:
                raise BindError(f"could not serve metrics on {self.settings.metrics_address} (--metrics-address): {exc}") from None
        self.server.start()
        if self.http is not None:
            self.http.start()
        if self.lane is not None:
            self.lane.start()
        if self.health_server is not None:
            self.health_server.start()
        if self.settings.port_file:
            _atomic_text(self.settings.port_file, self.address + "\n")
        logs.event(
            "listening",
            f"listening on {self.address} (model loading; readiness NOT_SERVING)",
            address=self.address,
            metrics=f"http://{self.metrics_address}/metrics" if self.metrics_address else None,
            health=self.health_address,
            http=self.http_address,
            tls=bool(self.settings.tls_cert),
            mtls=bool(self.settings.tls_client_ca),
            token=bool(self.settings.token_file),
            pid=os.getpid(),
        )
        if background_load:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        else:
            self._load()
        if self.settings.watch_s > 0:
            threading.Thread(target=self._watch, name="manifest-watch", daemon=True).start()
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

    def rotate_token(self) -> bool:
        """Read --token-file again (SIGHUP): a new token is accepted from now on and the old one
        refused; a file that cannot be read or holds too short a token keeps the old one. True if it changed."""
        if self.token is None:
            return False
        from mnist_edge.server.auth import read_token

        try:
            changed = self.token.set_token(read_token(self.settings.token_file))
        except ValueError as exc:
            logs.event("token_refused", f"token file not re-read, the previous token stays in effect: {exc}", logging.ERROR)
            return False
        # Never the token itself, nor a hash of it.
        logs.event("token_rotated" if changed else "token_unchanged",
                   f"{self.settings.token_file}: {'a new token is in effect; the previous one is refused' if changed else 'token unchanged'}",
                   token_file=self.settings.token_file)
        return changed

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Read the manifest again, verify everything, then swap atomically; True if swapped.

        Calls in flight finish on the old model (each batch holds the runner it started
        with). A model that fails any check is refused and the old one keeps serving.
        The token file is read again first, whatever becomes of the model.
        """
        with self._reload_lock:
            self.rotate_token()
            current = self.core.model
            if current is None or self.core.state is not State.SERVING:
                logs.event("reload_skipped", f"reload ({reason}) skipped: the server is {self.core.state.value}", logging.WARNING)
                return False
            try:
                if self.loader is default_loader:
                    new = default_loader(self.settings, min_version=int(current.version))
                else:
                    new = self.loader(self.settings)
                    if int(new.version) < int(current.version):
                        raise model_store.ModelLoadError(f"version {new.version} is lower than the version being served ({current.version})")
            except Exception as exc:  # noqa: BLE001 - a bad model never replaces a good one
                logs.event("reload_refused", f"reload ({reason}) refused, still serving version {current.version}: {exc}", logging.ERROR, version=current.version)
                return False
            if new.sha256 == current.sha256 and new.version == current.version:
                logs.event("reload_unchanged", f"reload ({reason}): version {current.version} unchanged", version=current.version)
                return False
            if new.version == current.version:
                logs.event("reload_refused", f"reload ({reason}) refused: a different model under the same version {current.version}; versions must increase", logging.ERROR)
                return False
            self.core.set_model(new)
            logs.event("reloaded", f"now serving version {new.version} (was {current.version})", version=new.version, previous=current.version, sha256=new.sha256, reason=reason)
            return True

    def _watch(self) -> None:
        """Poll the manifest (and its signature) for changes; reload when they change."""
        last = model_store.manifest_stamp(self.settings.model)
        while not self.stopped.wait(self.settings.watch_s):
            now = model_store.manifest_stamp(self.settings.model)
            if now != last and now is not None:
                last = now
                self.reload("manifest changed")

    def _stop_pools(self) -> None:
        """Once gRPC has stopped, nothing more comes to the lane and the handler pools: let their threads end."""
        if self.lane is not None:
            self.lane.stop()
        self.pool.shutdown(wait=False)
        self.stream_pool.shutdown(wait=False)
        if self.core.capture is not None:
            self.core.capture.close()  # what is queued is written (briefly) before the process ends

    def _stop_now(self) -> None:
        http_stopped = self._stop_http(0)
        self.server.stop(0).wait()
        if http_stopped is not None:
            http_stopped.join()
        self._stop_pools()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        self.stopped.set()

    def shutdown(self, reason: str = "signal") -> None:
        """Readiness NOT_SERVING now; serve new calls for drain_delay_s; stop with grace_s.

        Nothing is lost: every call is answered OK, or refused with UNAVAILABLE before it
        started (the stop sequence in server/drain.py).
        """
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
        self._hold_new_calls()
        if self.core.state is not State.FAILED:
            self.core.set_state(State.STOPPING)
        logs.event("stopping", f"refusing new calls; calls in flight have {s.grace_s}s to finish", grace_s=s.grace_s)
        http_stopped = self._stop_http(s.grace_s)
        stopped = self.server.stop(s.grace_s)
        stopped.wait(drain.GOAWAY_S)  # the GOAWAY reaches clients before their held calls are refused
        self._release_held_calls()
        stopped.wait()
        if http_stopped is not None:
            http_stopped.join()
        self._stop_pools()
        if self.health_server is not None:
            self.health_server.stop(0).wait()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        spans = self.core.access_log.spans if self.core.access_log is not None else None
        if spans is not None:
            spans.shutdown()  # export the spans still buffered
        logs.event("stopped", "server stopped", exit_code=self.exit_code)
        self.stopped.set()

    def _calls_in_progress(self) -> int | None:
        """Calls started and not yet answered (held ones excluded), or None if unknown."""
        pool = drain.grpcio_calls_in_progress(self.server)
        if pool is None:
            return None
        lane_calls = self.lane.calls_in_progress() if self.lane is not None else 0
        return max(0, pool - self.gate.held) + lane_calls

    def _hold_new_calls(self) -> None:
        """Hold new calls, then wait (bounded) until no call is in progress and none has arrived
        for a moment: from then on no client with one call at a time is free to send a call
        into gRPC's shutdown."""
        self.gate.hold()
        if self.lane is not None:
            self.lane.hold()
        start = time.monotonic()
        end = start + min(drain.HOLD_MAX_S, self.settings.grace_s / 2)
        while time.monotonic() < end:
            arrived = max(self.gate.last_arrival, self.lane.last_arrival if self.lane is not None else 0.0, start)
            if self._calls_in_progress() == 0 and time.monotonic() - arrived >= drain.SETTLE_S:
                break
            time.sleep(0.005)

    def _release_held_calls(self) -> None:
        self.gate.release()
        if self.lane is not None:
            self.lane.release()

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)


def create_server(settings: Settings, loader: Loader | None = None) -> tuple[App, str]:
    """Build the server and bind its port (not started): returns (app, bound address)."""
    app = App(settings, loader)
    return app, app.address
