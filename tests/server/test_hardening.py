"""Issue 18's smaller items: a unix socket born with its mode, a bad --trust refused before the
port opens, header-size bounds set, native log lines turned into JSON."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from helpers.servers import make_settings


def test_a_unix_socket_is_created_with_its_mode_not_the_umasks(tmp_path, monkeypatch):
    from mnist_edge.server import app as app_mod

    monkeypatch.setattr(app_mod.os, "chmod", lambda *a, **k: None)  # only the creation counts
    old = os.umask(0)  # the most permissive umask: a socket born under it would be 0777
    try:
        path = tmp_path / "s.sock"
        server = app_mod.App(make_settings(address=f"unix:{path}", socket_mode="0600", metrics_address=""))
        try:
            assert stat.S_IMODE(path.stat().st_mode) & 0o177 == 0, oct(path.stat().st_mode)
        finally:
            server.server.stop(0)
        assert os.umask(0) == 0  # restored
    finally:
        os.umask(old)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_trust_path_exits_2_before_the_port_opens(tmp_path, workers):
    port_file = tmp_path / "port"
    out = subprocess.run(
        [sys.executable, "-m", "mnist_edge", "serve", "--address", "127.0.0.1:0", "--metrics-address", "", "--port-file", str(port_file),
         "--workers", workers, "--trust", str(tmp_path / "missing.pem")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2, out.stderr
    assert not port_file.exists()
    events = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["bind_failed"] and "--trust" in events[0]["msg"], events


def test_header_size_bounds_are_set_on_the_server():
    from mnist_edge.server.app import HEADER_BOUNDS

    bounds = dict(HEADER_BOUNDS)
    assert bounds["grpc.absolute_max_metadata_size"] == 16 * 1024
    assert bounds["grpc.max_metadata_size"] <= bounds["grpc.absolute_max_metadata_size"]
    assert bounds["grpc.http2.max_frame_size"] == 16 * 1024


@pytest.mark.parametrize("fmt", ["json"])
def test_native_stderr_lines_become_json_events(fmt):
    """gRPC core writes to fd 2 itself (a failed TLS handshake, for one): in JSON mode each such
    line reaches the log as a JSON event."""
    code = (
        "import os, sys, time\n"
        "from mnist_edge.server import logs\n"
        "logs.setup('json', 'info')\n"
        "logs.capture_native_stderr()\n"
        "os.write(2, b'I1202 02:46:20.482950   31908 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL\\n')\n"
        "os.write(2, b'plain words from a library\\n')\n"
        "logs.event('done', 'done')\n"
        "logs.flush_native_stderr()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    lines = out.stderr.splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    tls = [e for e in events if e["event"] == "tls_handshake_failed"]
    assert tls[0]["level"] == "info" and tls[0]["source"] == "ssl_transport_security.cc:2563" and "SSL_ERROR_SSL" in tls[0]["msg"]
    assert [e["msg"] for e in events if e["event"] == "native_log"] == ["plain words from a library"]
