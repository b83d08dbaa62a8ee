"""grpc's HealthServicer, with Watch streams that can close while the status changes.

grpc_health's non-blocking Watch (no thread held per watcher) has a lock-order deadlock:
`set()` holds the servicer's lock while it sends the new status to every watcher, and each
send waits for grpcio's polling thread to finish it; when a watcher closes at that moment, its
close callback runs on that same polling thread and waits for the lock. Neither moves again,
and the server can no longer shut down (seen in tests/server/test_threads.py under load).

Here the close callback runs on a thread of its own, so the polling thread never waits for
the lock. The callback's work is unchanged: forget the watcher, end its call.
"""

from __future__ import annotations

import threading

from grpc_health.v1 import health


class HealthServicer(health.HealthServicer):
    def _on_close_callback(self, send_response_callback, service):  # grpc_health's private hook
        callback = super()._on_close_callback(send_response_callback, service)

        def off_the_polling_thread() -> None:
            threading.Thread(target=callback, name="health-watch-closed", daemon=True).start()

        return off_the_polling_thread
