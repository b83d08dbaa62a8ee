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

import numpy as np

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
        # Field capture (server/capture.py): None unless --capture-dir is set.
        self.capture = None
        if getattr(settings, "capture_dir", None):
            from mnist_edge.server import capture

            self.capture = capture.from_settings(settings)
        self.batcher = Batcher(
            self._run_unloaded,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_queue_delay_us=settings.max_queue_delay_us,
            on_batch=self.stats.record_batch,
        )

    # lifecycle -----------------------------------------------------------------
    def on_state(self, listener: Callable[[State], None]) -> None:
        self._listeners.append(listener)

    def set_state(self, state: State) -> None:
        with self._lock:
            self.state = state
        for listener in self._listeners:
            listener(state)

    def set_model(self, model: LoadedModel) -> None:
        """Install a verified model; batches already running finish on the previous one."""
        with self._lock:
            self.model = model
            self.batcher.set_runner(model.runner.run, model)

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
            raise NotFound(f"model {name!r} has no version {version!r}; the version served is {model.version!r}")
        return model

    def classify(
        self,
        pixels: np.ndarray,
        remaining_s: float | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> Result:
        """Batched inference: probabilities, digits, the model that computed them (`tag`), and
        the request's queue and compute seconds."""
        # grpc reports "no deadline" as a huge time_remaining(): the batcher caps each wait.
        deadline = None if remaining_s is None else time.monotonic() + remaining_s
        return self.batcher.infer(pixels, deadline, is_cancelled)

    def classify_group(self, group: Sequence[GroupRequest], deliver: Callable[[int, Result | BaseException], None]) -> None:
        """Batched inference for requests that arrived together, from one thread (the inference
        lane): `deliver(i, result_or_error)` once per request of `group`, as soon as its batch
        ends. Deadlines and arrival times are time.monotonic() seconds (`Batcher.infer_group`)."""
        self.batcher.infer_group(group, deliver)
