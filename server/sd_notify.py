"""systemd's notification protocol (sd_notify) without libsystemd: datagrams to $NOTIFY_SOCKET.

With `Type=notify` systemd hands the service a Unix datagram socket in NOTIFY_SOCKET (a path,
or an abstract name written with a leading "@") and reads newline-separated KEY=VALUE lines
from it: `READY=1` ends the start-up (systemctl start returns, units ordered after ours
start), `STOPPING=1` says a stop has begun, `STATUS=...` shows in `systemctl status`, and
`WATCHDOG=1` must arrive at least every WATCHDOG_USEC microseconds when `WatchdogSec=` is set,
or systemd kills the service (and restarts it, with Restart=on-failure).

`Notifier.from_environment()` reads and then removes those variables (what sd_notify's
unset_environment does), so worker processes never talk to systemd in the server's name.
Without NOTIFY_SOCKET every method does nothing. A send that fails is ignored: systemd going
away must never take the server down.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, MutableMapping

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract socket namespace
        self.address = address or None
        self.watchdog_usec = watchdog_usec if self.address else 0
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_environment(cls, env: MutableMapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET")
        usec = 0
        # WATCHDOG_PID names the process the watchdog is meant for; a child that inherited it is not.
        pid = env.get("WATCHDOG_PID")
        if not pid or pid == str(os.getpid()):
            try:
                usec = max(0, int(env.get("WATCHDOG_USEC") or 0))
            except ValueError:
                usec = 0
        for name in _VARIABLES:
            env.pop(name, None)
        return cls(address, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the timeout, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def send(self, *lines: str) -> bool:
        if self.address is None:
            return False
        data = "\n".join(lines).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.sendto(data, self.address)
                return True
            except OSError:
                return False

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.send("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={status}")

    def start_watchdog(self, healthy: Callable[[], bool], stop: threading.Event) -> threading.Thread | None:
        """Send WATCHDOG=1 every half WATCHDOG_USEC while `healthy()` says so, until `stop` is set.

        A check that fails (or hangs past one interval) skips that keep-alive; two in a row
        and systemd's timeout passes, so a wedged server is killed and restarted."""
        interval = self.watchdog_interval_s
        if interval is None:
            return None

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    ok = healthy()
                except Exception:  # noqa: BLE001 - any failure of the check means: not healthy
                    ok = False
                if ok and not stop.is_set():
                    self.send("WATCHDOG=1")

        thread = threading.Thread(target=loop, name="sd-watchdog", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def grpc_health_probe(address: str, timeout_s: float) -> Callable[[], bool]:
    """A check for the watchdog: a gRPC health Check through the server's own port answers
    (SERVING or not: a server that is loading or draining is alive). It goes the way a client's
    call goes (gRPC core's polling, the handler threads), so a wedged server fails it."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host = address
    if not address.startswith("unix:"):
        name, _, port = address.rpartition(":")
        if name in ("0.0.0.0", "", "[::]"):
            host = f"{'[::1]' if name == '[::]' else '127.0.0.1'}:{port}"
    channel = grpc.insecure_channel(host, options=[("grpc.enable_retries", 0)])
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="liveness")

    def check() -> bool:
        try:
            stub.Check(request, timeout=timeout_s)
            return True
        except grpc.RpcError:
            return False

    return check


def attach(notifier: Notifier, app) -> None:
    """Wire a single-process server (server/app.py's App, before its start()) to systemd: READY=1 once readiness
    is SERVING, STATUS on later changes, STOPPING=1 when the shutdown begins (the caller's
    signal handler calls `notifier.stopping`), WATCHDOG=1 while the port answers."""
    if not notifier.enabled:
        return
    from mnist_edge.server.core import State

    def on_state(state: State) -> None:
        model = app.core.model
        if state is State.SERVING and model is not None:
            notifier.ready(f"serving {model.name} version {model.version} on {app.address}")
        elif state is State.FAILED:
            notifier.status(f"failed: {app.core.failure}")

    # Registered after App's own health listener: readiness is SERVING before READY=1 is sent.
    app.core.on_state(on_state)
    probe_address = app.health_address or (None if app.settings.tls_cert else app.address)
    if probe_address is not None and notifier.watchdog_interval_s is not None:
        healthy = grpc_health_probe(probe_address, notifier.watchdog_interval_s / 2)
    else:  # TLS without a plaintext health listener: the process's own view of its state
        def healthy() -> bool:
            return app.core.state is not State.FAILED
    notifier.start_watchdog(healthy, app.stopped)
