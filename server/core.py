"""The serving core shared by every API: lifecycle state, the loaded model, the batcher.

Servicers decode a request into arrays, call the core, and encode the result: `classify`
for one request (a handler thread, a stream message), `classify_group` for requests that
arrived together on the inference lane. They never reach the batcher themselves; the core
knows nothing about protobuf or gRPC.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from mnist_edge.server import logs
from mnist_edge.server.batching import Batcher, GroupRequest, Result
from mnist_edge.server.errors import NotFound, Unavailable
from mnist_edge.server.model_store import LoadedModel
from mnist_edge.server.settings import Settings
from mnist_edge.server.stats import Statistics


class State(str, enum.Enum):
    LOADING = "loading"  # port open, model not verified yet: readiness NOT_SERVING, inference UNAVAILABLE
    SERVING = "serving"
    DRAINING = "draining"  # SIGTERM seen: readiness NOT_SERVING, new calls still served (--drain-delay-s)
    STOPPING = "stopping"  # gRPC refuses new calls (UNAVAILABLE); calls in flight finish (--grace-s)
    FAILED = "failed"  # the model could not be loaded or verified


class Core:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state = State.LOADING
        # "lane" or "handler-threads": where ModelInfer and Classify run (set by the App).
        self.inference_path = "handler-threads"
        self.model: LoadedModel | None = None
        self.failure: str | None = None
        self._listeners: list[Callable[[State], None]] = []
        self._lock = threading.Lock()
        self.stats = Statistics()
        self.batcher = self._new_batcher(self._run_unloaded, self.stats)
        # The version a reload replaced, still answering calls that name it (version grace).
        self.previous: Previous | None = None
        # --access-log and --otel: a line and/or a span per call (server/access_log.py), from the handlers.
        self.access_log = None
        if settings.access_log or settings.otel:
            from mnist_edge.server.access_log import AccessLog

            spans = None
            if settings.otel:  # never imported otherwise
                from mnist_edge import __version__
                from mnist_edge.server.otel import Spans

                spans = Spans(version=__version__)
            self.access_log = AccessLog(settings.access_log_sample, log=settings.access_log, spans=spans)
        # Field capture (server/capture.py): None unless --capture-dir is set.
        self.capture = None
        if getattr(settings, "capture_dir", None):
            from mnist_edge.server import capture

            self.capture = capture.from_settings(settings)

    def _new_batcher(self, run, stats: Statistics) -> Batcher:
        s = self.settings
        return Batcher(run, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                       max_queue_delay_us=s.max_queue_delay_us, on_batch=stats.record_batch)

    # lifecycle -----------------------------------------------------------------
    def on_state(self, listener: Callable[[State], None]) -> None:
        self._listeners.append(listener)

    def set_state(self, state: State) -> None:
        with self._lock:
            self.state = state
        for listener in self._listeners:
            listener(state)

    def set_model(self, model: LoadedModel) -> None:
        """Install a verified model; batches already running finish on the previous one, which
        keeps answering calls that name its version for --previous-version-grace-s."""
        with self._lock:
            replaced = self.model
            self.model = model
            self.batcher.set_runner(model.runner.run, model)
            self._keep_previous(replaced, model)

    # version grace ------------------------------------------------------------------
    def _keep_previous(self, replaced: LoadedModel | None, model: LoadedModel) -> None:
        """Under the lock. Only the version just replaced is kept; one kept before goes now."""
        dropped, self.previous = self.previous, None
        if dropped is not None:
            dropped.timer.cancel()
        grace = self.settings.previous_version_grace_s
        if replaced is None or replaced.version == model.version or grace <= 0:
            return
        stats = Statistics()
        batcher = self._new_batcher(replaced.runner.run, stats)
        batcher.set_runner(replaced.runner.run, replaced)
        timer = threading.Timer(grace, self._unload_previous, args=(replaced,))
        timer.daemon = True
        self.previous = Previous(replaced, batcher, stats, time.monotonic() + grace, timer)
        timer.start()

    def _unload_previous(self, model: LoadedModel) -> None:
        with self._lock:
            if self.previous is None or self.previous.model is not model:
                return
            self.previous = None  # its batcher, and with it the session, go once no call holds them
        logs.event("previous_unloaded", f"version {model.version} unloaded: its grace period ended", version=model.version)

    def versions(self) -> list[LoadedModel]:
        """The models answering now: the current one, then the previous one in its grace period."""
        current, previous = self.model, self.previous
        return [m for m in (current, previous.model if previous else None) if m is not None]

    def batcher_for(self, model: LoadedModel | None) -> Batcher:
        """The batcher that runs `model` (None or the current model: the main one)."""
        if model is None or model is self.model:
            return self.batcher
        previous = self.previous
        if previous is not None and previous.model is model:
            return previous.batcher
        raise NotFound(f"model {model.name!r} version {model.version!r} was unloaded: its grace period after a reload ended")

    def stats_for(self, model: LoadedModel | None) -> Statistics:
        previous = self.previous
        return previous.stats if previous is not None and model is not None and previous.model is model else self.stats

    @staticmethod
    def _run_unloaded(pixels: np.ndarray):
        raise Unavailable("the model is not loaded yet; retry shortly")

    # per-call checks -----------------------------------------------------------
    def serving_model(self) -> LoadedModel:
        """The model to answer with, or UNAVAILABLE while loading."""
        state = self.state
        model = self.model
        if model is None or state is State.LOADING or state is State.FAILED:
            raise Unavailable("the server is starting: the model is not loaded and verified yet; retry shortly")
        # STOPPING: gRPC itself refuses calls that arrive after the stop began; a call that
        # reaches a handler now was accepted before (it waited for a handler thread), so it is
        # in flight and is answered within the grace period.
        return model

    @property
    def ready(self) -> bool:
        return self.state is State.SERVING

    def check_model(self, name: str, version: str) -> LoadedModel:
        model = self.serving_model()
        if name != model.name:
            raise NotFound(f"unknown model {name!r}; this server serves {model.name!r}")
        if version and version != model.version:
            previous = self.previous
            if previous is not None and version == previous.model.version:
                return previous.model
            served = ", ".join(repr(m.version) for m in self.versions())
            raise NotFound(f"model {name!r} has no version {version!r}; the version served is {served}")
        return model

    def classify(
        self,
        pixels: np.ndarray,
        remaining_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
        model: LoadedModel | None = None,
    ) -> Result:
        """Batched inference: probabilities, digits, the model that computed them (`tag`), and
        the request's queue and compute seconds. `model`: the one check_model returned for a
        call that named a version (the previous one runs on its own batcher)."""
        # grpc reports "no deadline" as a huge time_remaining(): the batcher caps each wait.
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        return self.batcher_for(model).infer(pixels, deadline, is_cancelled)

    def classify_group(self, group: Sequence[GroupRequest], deliver: Callable[[int, Result | BaseException], None],
                       model: LoadedModel | None = None) -> None:
        """Batched inference for requests that arrived together, from one thread (the inference
        lane): `deliver(i, result_or_error)` once per request of `group`, as soon as its batch
        ends. Deadlines and arrival times are time.monotonic() seconds (`Batcher.infer_group`).
        `model` as for classify: every request of `group` is for that one."""
        self.batcher_for(model).infer_group(group, deliver)


@dataclass
class Previous:
    """A replaced version in its grace period: its own batcher and statistics, unloaded at `until`."""

    model: LoadedModel
    batcher: Batcher
    stats: Statistics
    until: float
    timer: threading.Timer = field(repr=False)
