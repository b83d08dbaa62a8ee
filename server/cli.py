"""`mnist-edge serve`: settings from flags and MNIST_EDGE_*, signals, exit codes.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when the model fails to load
or verify, 2 for bad settings or an address that cannot be bound.
"""

from __future__ import annotations

import signal
import sys
import threading

from mnist_edge.server import logs, sd_notify
from mnist_edge.server import settings as settings_mod


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (M_ARENA_MAX). With many handler threads glibc would give
    each its own arena; two are enough for this workload and save ~5 MB of resident memory
    per worker (measured), at no per-allocation cost. Does nothing off glibc."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-8, arenas)  # -8 = M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    limit_malloc_arenas()
    settings = settings_mod.from_args(argv)
    logs.setup(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        logs.capture_native_stderr()
    settings_mod.warn_unknown_env()
    # Read (and removed from the environment, so workers never inherit it) before anything starts.
    notifier = sd_notify.Notifier.from_environment()
    if settings.workers > 1:
        from mnist_edge.server import workers
        from mnist_edge.server.app import BindError, check_trust

        try:
            check_trust(settings)  # before the parent reserves the port
        except BindError as exc:
            logs.event("bind_failed", str(exc), 40)
            return 2

        return workers.run(settings, notifier)
    from mnist_edge.server.app import App, BindError

    try:
        app = App(settings)
    except BindError as exc:
        logs.event("bind_failed", str(exc), 40)
        return 2

    def on_signal(signum, frame):
        name = signal.Signals(signum).name
        notifier.stopping(f"shutdown ({name}): draining")
        threading.Thread(target=app.shutdown, args=(name,), name="shutdown", daemon=True).start()

    def on_hup(signum, frame):
        threading.Thread(target=app.reload, args=("SIGHUP",), name="reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hup)
    sd_notify.attach(notifier, app)
    try:
        app.start()
    except BindError as exc:
        logs.event("bind_failed", str(exc), 40)
        return 2
    while not app.wait(0.5):
        pass
    return app.exit_code


if __name__ == "__main__":
    sys.exit(main())
