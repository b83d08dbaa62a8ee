"""--address unix:PATH for a camera process on the same device."""

from __future__ import annotations

import socket
import stat

import grpc
import pytest

from helpers.servers import health_status, running_server
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc


def test_unix_socket_serves_with_a_deliberate_mode(tmp_path, mnist):
    path = tmp_path / "mnist.sock"
    with running_server(address=f"unix:{path}") as app:
        assert app.address == f"unix:{path}"
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o660
        assert health_status(app.address) == "SERVING"
        with grpc.insecure_channel(app.address) as ch:
            resp = digits_pb2_grpc.DigitClassifierStub(ch).Classify(
                digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=mnist.test.images[0].tobytes())]), timeout=10
            )
        assert resp.predictions[0].digit == 7


def test_socket_mode_is_configurable(tmp_path):
    path = tmp_path / "s.sock"
    with running_server(address=f"unix://{path}", socket_mode="0600"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_live_socket_is_not_taken_over_but_a_stale_one_is_replaced(tmp_path):
    from helpers.servers import make_settings
    from mnist_edge.server.app import App, BindError

    path = tmp_path / "s.sock"
    with running_server(address=f"unix:{path}"):
        with pytest.raises(BindError, match="another server is listening there"):
            App(make_settings(address=f"unix:{path}"))
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens
    with running_server(address=f"unix:{stale}") as app:
        assert health_status(app.address) == "SERVING"
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(BindError, match="exists and is not a socket"):
        App(make_settings(address=f"unix:{tmp_path / 'plain'}"))
