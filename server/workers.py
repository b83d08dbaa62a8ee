"""`mnist-edge serve --workers N`: N worker processes on one port.

The parent resolves the address once (port 0 becomes a real port, held by a bound,
non-listening SO_REUSEPORT socket so nothing else takes it), starts N workers that
listen on it with SO_REUSEPORT (the kernel spreads *connections* over them; clients that
want several workers open several channels), restarts a worker that dies, forwards
SIGTERM/SIGINT so every worker drains, coordinates reloads all-or-nothing (SIGHUP: each
worker prepares the new model; all commit, or all abort), and serves /metrics as the
sum of its workers' counters. Each worker has its own batcher and model session.

The parent owns the version. It keeps a private copy of what the workers serve (the
manifest, its signature and the model file, `ServedCopy`) and every worker loads from that
copy, never from the published directory: a worker restarted after a crash serves the
version its siblings serve, whatever has been published (or half-written) since, until a
reload succeeds in every worker. A reload whose manifest names the version and model already
served changes nothing and logs `reload_unchanged`; the same version with another model is
refused, as a single process refuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mnist_edge.server import logs, model_store, sd_notify
from mnist_edge.server.settings import Settings

RESTART_BACKOFF_S = (0.5, 1, 2, 5, 10)


class WorkerProcess:
    def __init__(self, index: int, settings: Settings) -> None:
        self.index = index
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.state = "starting"
        self.pid = 0
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []
        self.changed = threading.Condition()

    def start(self) -> None:
        env = {**os.environ, "MNIST_EDGE_WORKER_SETTINGS": json.dumps(dataclasses.asdict(self.settings))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_edge.server.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, text=True, env=env, bufsize=1,
        )
        self.pid = self.proc.pid
        self.state = "starting"
        threading.Thread(target=self._read, name=f"worker-{self.index}-reader", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "id" in msg and msg["id"] is not None:
                with self._lock:
                    waiter = self._waiting.pop(msg["id"], None)
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
                continue
            with self.changed:
                self.state = msg.get("event", self.state)
                self.events.append(msg)
                self.changed.notify_all()
        with self.changed:
            self.state = "exited"
            self.changed.notify_all()

    def call(self, cmd: str, timeout: float = 30.0, **args: Any) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None or self.proc.stdin is None:
            return {"ok": False, "error": f"worker {self.index} is not running"}
        ident = next(self._ids)
        done: tuple[threading.Event, list] = (threading.Event(), [])
        with self._lock:
            self._waiting[ident] = done
        try:
            self.proc.stdin.write(json.dumps({"id": ident, "cmd": cmd, **args}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            return {"ok": False, "error": f"worker {self.index}: {exc}"}
        if not done[0].wait(timeout):
            with self._lock:
                self._waiting.pop(ident, None)
            return {"ok": False, "error": f"worker {self.index} did not answer {cmd!r} within {timeout}s"}
        return done[1][0]

    def wait_state(self, states: set[str], timeout: float) -> str:
        end = time.monotonic() + timeout
        with self.changed:
            while self.state not in states and time.monotonic() < end:
                self.changed.wait(max(0.0, end - time.monotonic()))
            return self.state

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


class ServedCopy:
    """A private copy of one published model: manifest.json (its exact bytes), its signature if
    any, and the model file the manifest names for the precision served. Workers load from here."""

    def __init__(self, directory: Path, version: str, sha256: str) -> None:
        self.directory = directory
        self.version = version
        self.sha256 = sha256

    @classmethod
    def take(cls, model: str | None, precision: str | None) -> ServedCopy:
        """Copy what `model` publishes now; ModelLoadError if it is incomplete or inconsistent.

        The checks are the cheap ones (JSON, sizes, sha256): the workers verify the copy fully
        (signature, golden images) when they load it. A publisher writes the model file, then
        the signature, then the manifest; the manifest and signature are read twice to catch a
        publish in progress.
        """
        mpath = model_store.resolve_manifest(model)
        sig_path = mpath.parent / model_store.SIGNATURE
        for attempt in (1, 2):
            sig = sig_path.read_bytes() if sig_path.is_file() else None
            raw = mpath.read_bytes()
            if (sig_path.read_bytes() if sig_path.is_file() else None) == sig and mpath.read_bytes() == raw:
                break
            if attempt == 2:
                raise model_store.ModelLoadError(f"{mpath}: the manifest changed while it was being read; try again")
            time.sleep(0.05)
        manifest, _ = model_store.read_manifest(mpath, raw)
        kind = precision or manifest["default"]
        entry = manifest["models"].get(kind)
        if not isinstance(entry, dict) or "file" not in entry:
            raise model_store.ModelLoadError(f"{mpath}: no model entry {kind!r}; the manifest has {sorted(manifest['models'])}")
        name = str(entry["file"])
        if Path(name).name != name:
            raise model_store.ModelLoadError(f"{mpath}: model file name {name!r} must be a plain file name in the same directory")
        try:
            data = (mpath.parent / name).read_bytes()
        except OSError as exc:
            raise model_store.ModelLoadError(f"{mpath.parent / name}: {exc.strerror} (named by {mpath})") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.get("sha256"):
            raise model_store.ModelLoadError(f"{mpath.parent / name}: sha256 {digest} does not match the manifest's {entry.get('sha256')}; refusing to serve it")
        directory = Path(tempfile.mkdtemp(prefix="mnist-edge-served-"))
        try:
            (directory / name).write_bytes(data)
            if sig is not None:
                (directory / model_store.SIGNATURE).write_bytes(sig)
            (directory / model_store.MANIFEST).write_bytes(raw)
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return cls(directory, str(manifest["version"]), digest)

    def same_model(self, other: ServedCopy) -> bool:
        return self.version == other.version and self.sha256 == other.sha256

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.workers: list[WorkerProcess] = []
        self._reserve: socket.socket | None = None
        self.address = self._resolve(settings.address)
        # The HTTP port is shared the same way (SO_REUSEPORT); its reservation is held here too.
        self._http_reserve: socket.socket | None = None
        self.http_address = self._resolve(settings.http_address, http=True) if settings.http_address else ""
        self.exit_code = 0
        self._reload_lock = threading.Lock()
        self._metrics_httpd = None
        self.metrics_address: str | None = None
        self.served: ServedCopy | None = None  # what every worker loads (see the module docstring)

    def _resolve(self, address: str, http: bool = False) -> str:
        if address.startswith("unix:"):
            raise ValueError("--workers N > 1 needs a TCP address: a unix: socket takes one worker")
        host, port = address.rsplit(":", 1)
        bare = host.strip("[]")
        family = socket.AF_INET6 if ":" in bare else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((bare, int(port)))
        except OSError as exc:
            s.close()
            raise ValueError(f"could not reserve {address}: {exc}") from None
        if http:
            self._http_reserve = s
        else:
            self._reserve = s  # bound, never listening: holds the port for the workers
        return f"{host}:{s.getsockname()[1]}"

    def _worker_settings(self) -> Settings:
        model = str(self.served.directory) if self.served is not None else self.settings.model
        return self.settings.replace(address=self.address, http_address=self.http_address, port_file=None, metrics_address="", watch_s=0.0, model=model)

    def start(self) -> None:
        try:
            self.served = ServedCopy.take(self.settings.model, self.settings.precision)
        except (model_store.ModelLoadError, OSError) as exc:
            raise RuntimeError(f"model failed to load: {exc}") from None
        for i in range(self.settings.workers):
            w = WorkerProcess(i, self._worker_settings())
            w.start()
            self.workers.append(w)
        for w in self.workers:
            state = w.wait_state({"listening", "serving", "failed", "exited"}, 60)
            if state in ("failed", "exited"):
                raise RuntimeError(f"worker {w.index} failed to start: {w.events[-1] if w.events else 'no message'}")
        if self.settings.metrics_address:
            from mnist_edge.server.metrics import start_http

            self._metrics_httpd, self.metrics_address = start_http(self.settings.metrics_address, self.metrics_snapshot)
        if self.settings.port_file:
            from mnist_edge.server.app import _atomic_text

            _atomic_text(self.settings.port_file, self.address + "\n")
        logs.event("listening", f"listening on {self.address} with {len(self.workers)} workers", address=self.address,
                   workers=[w.pid for w in self.workers], pid=os.getpid(), http=self.http_address or None,
                   metrics=f"http://{self.metrics_address}/metrics" if self.metrics_address else None)
        for w in self.workers:
            state = w.wait_state({"serving", "failed", "exited"}, 120)
            if state != "serving":
                raise RuntimeError(f"worker {w.index} (pid {w.pid}) did not reach SERVING: {w.events[-1] if w.events else state}")
        logs.event("serving", f"serving on {self.address}", address=self.address, workers=[w.pid for w in self.workers])
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()

    def _monitor(self) -> None:
        restarts: dict[int, int] = {}
        while not self.stopping.wait(0.2):
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None and not self.stopping.is_set():
                    n = restarts.get(w.index, 0)
                    delay = RESTART_BACKOFF_S[min(n, len(RESTART_BACKOFF_S) - 1)]
                    logs.event("worker_died", f"worker {w.index} (pid {w.pid}) exited with {w.proc.returncode}; restarting in {delay}s",
                               logging.WARNING, worker=w.index, pid=w.pid, returncode=w.proc.returncode)
                    if self.stopping.wait(delay):
                        return
                    # Under the reload lock: the replacement loads the copy its siblings serve,
                    # and no reload replaces that copy before it is up.
                    with self._reload_lock:
                        if self.stopping.is_set():
                            return
                        w.settings = self._worker_settings()
                        w.start()
                        restarts[w.index] = n + 1
                        serving = w.wait_state({"serving", "failed", "exited"}, 120) == "serving"
                    if serving:
                        logs.event("worker_restarted", f"worker {w.index} is serving again as pid {w.pid}", worker=w.index, pid=w.pid,
                                   version=self.served.version if self.served else None)
                        restarts[w.index] = 0

    def metrics_snapshot(self) -> dict:
        from mnist_edge.server.metrics import merge

        snaps = [r["result"] for r in (w.call("snapshot", timeout=2) for w in self.workers) if r.get("ok")]
        return merge(snaps)

    def reload(self, reason: str = "SIGHUP") -> bool:
        """Swap every worker to the published model, or none; True if they swapped."""
        with self._reload_lock:
            for w in self.workers:  # the token file is read again whatever becomes of the model
                w.call("rotate_token", timeout=10)
            try:
                candidate = ServedCopy.take(self.settings.model, self.settings.precision)
            except (model_store.ModelLoadError, OSError) as exc:
                logs.event("reload_refused", f"reload ({reason}) refused, still serving version {self._version()}: {exc}", logging.ERROR, version=self._version())
                return False
            refusal = self._refusal(candidate)
            if refusal is not None:
                candidate.remove()
                if refusal == "unchanged":
                    logs.event("reload_unchanged", f"reload ({reason}): version {candidate.version} unchanged", version=candidate.version)
                else:
                    logs.event("reload_refused", f"reload ({reason}) refused, still serving version {self._version()}: {refusal}", logging.ERROR, version=self._version())
                return False
            if not self._swap_all(str(candidate.directory), reason):
                candidate.remove()
                return False
            previous, self.served = self.served, candidate
            if previous is not None:
                previous.remove()
            return True

    def _version(self) -> str | None:
        return self.served.version if self.served else None

    def _refusal(self, candidate: ServedCopy) -> str | None:
        """Why `candidate` may not replace what is served: "unchanged", a reason, or None."""
        current = self.served
        if current is None:
            return None
        if candidate.same_model(current):
            return "unchanged"
        if int(candidate.version) < int(current.version):
            return f"version {candidate.version} is lower than the version being served ({current.version}); refusing to go back"
        if candidate.version == current.version:
            return f"a different model under the same version {current.version}; versions must increase"
        return None

    def _swap_all(self, model: str, reason: str) -> bool:
        """Every worker prepares `model` (a ServedCopy directory); all commit, or (if any refuses) all abort."""
        answers = [w.call("prepare", timeout=120, model=model) for w in self.workers]
        refused = [f"worker {w.index}: {a.get('error')}" for w, a in zip(self.workers, answers) if not a.get("ok")]
        versions = {a["result"]["version"] for a in answers if a.get("ok")}
        if not refused and len(versions) != 1:
            refused.append(f"workers prepared different versions {sorted(versions)}")
        if refused:
            for w in self.workers:
                w.call("abort", timeout=10)
            logs.event("reload_refused", f"reload ({reason}) refused by {len(refused)} worker(s); none swapped: {'; '.join(refused)}", logging.ERROR)
            return False
        for w in self.workers:
            w.call("commit", timeout=30)
        logs.event("reloaded", f"all {len(self.workers)} workers now serve version {versions.pop()}", reason=reason)
        return True

    def shutdown(self, reason: str = "signal") -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        logs.event("draining", f"shutdown ({reason}): forwarding SIGTERM to {len(self.workers)} workers", reason=reason)
        for w in self.workers:
            w.signal(signal.SIGTERM)
        limit = self.settings.drain_delay_s + self.settings.grace_s + 15
        end = time.monotonic() + limit
        for w in self.workers:
            if w.proc is None:
                continue
            try:
                code = w.proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                code = w.proc.wait()
                self.exit_code = 1
            if code not in (0, -signal.SIGTERM):
                self.exit_code = self.exit_code or 1
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
        for reserve in (self._reserve, self._http_reserve):
            if reserve is not None:
                reserve.close()
        if self.served is not None:
            self.served.remove()
        logs.event("stopped", "all workers stopped", exit_code=self.exit_code)


def run(settings: Settings, notifier: sd_notify.Notifier | None = None) -> int:
    notifier = notifier or sd_notify.Notifier(None)
    try:
        sup = Supervisor(settings)
    except ValueError as exc:
        logs.event("bind_failed", str(exc), logging.ERROR)
        return 2
    done = threading.Event()

    def on_term(signum, frame):  # noqa: ARG001
        notifier.stopping(f"shutdown ({signal.Signals(signum).name}): draining {len(sup.workers)} workers")

        def stop():
            sup.shutdown(signal.Signals(signum).name)
            done.set()

        threading.Thread(target=stop, daemon=True).start()

    def on_hup(signum, frame):  # noqa: ARG001
        threading.Thread(target=sup.reload, args=("SIGHUP",), daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        sup.start()
    except RuntimeError as exc:
        logs.event("model_failed", str(exc), logging.ERROR)
        sup.shutdown("startup failed")
        return 1
    if settings.watch_s > 0:
        threading.Thread(target=_watch, args=(sup, settings), daemon=True).start()
    _notify_systemd(notifier, sup, done)
    while not done.wait(0.5):
        pass
    return sup.exit_code


def _watch(sup: Supervisor, settings: Settings) -> None:
    from mnist_edge.server import model_store

    last = model_store.manifest_stamp(settings.model)
    while not sup.stopping.wait(settings.watch_s):
        now = model_store.manifest_stamp(settings.model)
        if now != last and now is not None:
            last = now
            sup.reload("manifest changed")


def _notify_systemd(notifier: sd_notify.Notifier, sup: Supervisor, done: threading.Event) -> None:
    """READY=1 once every worker serves; WATCHDOG=1 while every worker process runs and the
    shared port answers a health check (TLS: the processes alone)."""
    if not notifier.enabled:
        return
    notifier.ready(f"serving on {sup.address} with {len(sup.workers)} workers")
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    port_answers = None if sup.settings.tls_cert else sd_notify.grpc_health_probe(sup.address, interval / 2)

    def healthy() -> bool:
        alive = all(w.proc is not None and w.proc.poll() is None for w in sup.workers)
        return alive and (port_answers is None or port_answers())

    notifier.start_watchdog(healthy, done)
