"""Issue 18's smaller items: a unix socket born with its mode, a bad --trust refused before the
port opens, header-size bounds set, native log lines turned into JSON."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from helpers.servers import make_settings, stop_cli_server


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


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    def length(n: int) -> bytes:  # HPACK integer, 7-bit prefix, no Huffman
        if n < 127:
            return bytes((n,))
        out, n = [127], n - 127
        while n >= 128:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        return bytes([*out, n])

    return b"\x00" + length(len(name)) + name + length(len(value)) + value


def test_a_huge_hand_made_header_block_costs_little_and_others_are_served(tmp_path, mnist):
    """A 1 MB header block sent by hand in CONTINUATION frames: gRPC core reads it (HTTP/2
    requires it) but keeps only what fits its metadata bounds; the server's memory barely moves
    and other callers are served (docs/limits.md, "Headers")."""
    import socket

    import grpc

    from helpers.servers import health_status, start_cli_server, wait_for
    from mnist_edge.protos.inference import grpc_service_pb2 as pb
    from mnist_edge.protos.inference import grpc_service_pb2_grpc as pb_grpc

    proc, address = start_cli_server(tmp_path)
    try:
        wait_for(lambda: health_status(address) == "SERVING", timeout=60)

        def rss_kb() -> int:
            with open(f"/proc/{proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

        before = rss_kb()
        host, port = address.rsplit(":", 1)
        head = b"".join(_hpack_literal(k, v) for k, v in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/inference.GRPCInferenceService/ServerLive"),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
        junk = _h2_frame(9, 0, 1, _hpack_literal(b"x-junk", b"v" * 16_000))
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"") + _h2_frame(1, 0, 1, head))
            for _ in range(64):  # ~1 MB of header block
                s.sendall(junk)
            s.sendall(_h2_frame(9, 4, 1, _hpack_literal(b"x-end", b"1")))  # END_HEADERS
            with grpc.insecure_channel(address) as ch:
                request = pb.ModelInferRequest(model_name="mnist", inputs=[pb.ModelInferRequest.InferInputTensor(name="pixels", datatype="UINT8", shape=[1, 28, 28])],
                                               raw_input_contents=[mnist.test.images[:1].tobytes()])
                assert len(pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(request, timeout=10).outputs) == 2
        assert rss_kb() - before < 32 * 1024, (before, rss_kb())
    finally:
        stop_cli_server(proc)
