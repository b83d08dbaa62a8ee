"""One worker process of `mnist-edge serve --workers N` (started by server.workers, not by hand).

It runs a normal App on the address the parent resolved, sharing the port with its
siblings through SO_REUSEPORT, and talks to the parent over stdin/stdout in JSON lines:

    parent -> worker  {"id": 1, "cmd": "snapshot" | "prepare" | "commit" | "abort" | "shutdown"}
                      ("prepare" carries "model": the directory to load)
    worker -> parent  {"event": "listening" | "serving" | "failed" | "stopped", ...}
                      {"id": 1, "ok": true, "result": ...} or {"id": 1, "ok": false, "error": "..."}

`prepare` loads and verifies the manifest's model without serving it; `commit` swaps it
in; `abort` drops it. The parent commits only when every worker prepared, so all
workers swap or none does. When stdin closes (the parent died), the worker drains and
exits rather than serving on as an orphan.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from typing import Any

from mnist_edge.server import logs
from mnist_edge.server.settings import Settings


class _Channel:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(message, default=str) + "\n")
            self._out.flush()


def main() -> int:
    from mnist_edge.server.cli import limit_malloc_arenas

    limit_malloc_arenas()
    settings = Settings(**json.loads(os.environ["MNIST_EDGE_WORKER_SETTINGS"]))
    logs.setup(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        logs.capture_native_stderr()
    channel = _Channel()
    # stdout is the control channel: nothing else may print to it.
    sys.stdout = sys.stderr
    from mnist_edge.server.app import App, BindError, State, default_loader

    try:
        app = App(settings, reuseport=True)
    except BindError as exc:
        channel.send({"event": "failed", "error": str(exc)})
        return 2

    def state_changed(state: State) -> None:
        if state is State.SERVING:
            channel.send({"event": "serving", "pid": os.getpid(), "version": app.core.model.version})
        elif state is State.FAILED:
            channel.send({"event": "failed", "error": app.core.failure})

    app.core.on_state(state_changed)

    def on_signal(signum, frame):  # noqa: ARG001
        threading.Thread(target=app.shutdown, args=(signal.Signals(signum).name,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM; a terminal's ^C goes to it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are coordinated by the parent
    app.start()
    channel.send({"event": "listening", "pid": os.getpid(), "address": app.address})

    pending: dict[str, Any] = {}

    def handle(msg: dict[str, Any]) -> Any:
        cmd = msg.get("cmd")
        if cmd == "snapshot":
            return app.metrics_snapshot()
        if cmd == "prepare":
            # The parent names the directory to load (its private copy of the published model).
            current = app.core.model
            source = settings.replace(model=msg["model"]) if msg.get("model") else settings
            model = default_loader(source, min_version=int(current.version) if current else None)
            pending["model"] = model
            return {"version": model.version, "sha256": model.sha256}
        if cmd == "commit":
            model = pending.pop("model", None)
            if model is None:
                raise RuntimeError("commit without a prepared model")
            previous = app.core.model.version if app.core.model else None
            app.core.set_model(model)
            logs.event("reloaded", f"now serving version {model.version} (was {previous})", version=model.version, previous=previous)
            return {"version": model.version}
        if cmd == "rotate_token":
            return app.rotate_token()
        if cmd == "abort":
            pending.pop("model", None)
            return None
        if cmd == "shutdown":
            threading.Thread(target=app.shutdown, args=("parent",), daemon=True).start()
            return None
        raise ValueError(f"unknown command {cmd!r}")

    def control() -> None:
        for line in sys.stdin:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            try:
                channel.send({"id": msg.get("id"), "ok": True, "result": handle(msg)})
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
                channel.send({"id": msg.get("id"), "ok": False, "error": f"{exc}"})
        # The parent is gone: do not serve on as an orphan.
        app.shutdown("parent exited")

    threading.Thread(target=control, name="control", daemon=True).start()
    while not app.wait(0.5):
        pass
    channel.send({"event": "stopped", "exit_code": app.exit_code})
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
