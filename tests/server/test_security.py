"""TLS, mutual TLS, bearer tokens, and the plaintext health-only listener. Certificates are made here."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.servers import running_server
from mnist_edge.protos.digits.v1 import digits_pb2, digits_pb2_grpc

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_name=None, issuer_key=None, ca: bool = False, san: list | None = None):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(obj) -> bytes:
    if hasattr(obj, "private_bytes"):
        return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return obj.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("test CA", ca_key, ca=True)
    server_key = _key()
    server = _cert("127.0.0.1", server_key, ca.subject, ca_key, san=[x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client_key = _key()
    client = _cert("camera", client_key, ca.subject, ca_key)
    other_ca_key = _key()
    other_ca = _cert("other CA", other_ca_key, ca=True)
    stranger_key = _key()
    stranger = _cert("stranger", stranger_key, other_ca.subject, other_ca_key)
    files = {"ca": ca, "server": server, "server_key": server_key, "client": client, "client_key": client_key, "stranger": stranger, "stranger_key": stranger_key}
    out = {}
    for name, obj in files.items():
        out[name] = d / f"{name}.pem"
        out[name].write_bytes(_pem(obj))
    out["token"] = d / "token"
    out["token"].write_text("s3cret-token-0123456789abcdef\n")
    return out


def classify(channel, token: str | None = None):
    md = (("authorization", f"Bearer {token}"),) if token else ()
    return digits_pb2_grpc.DigitClassifierStub(channel).GetModelInfo(digits_pb2.GetModelInfoRequest(), timeout=10, metadata=md)


def health(channel) -> str:
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def tls_channel(address: str, pki, cert: str | None = None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{cert}_key"].read_bytes() if cert else None,
        certificate_chain=pki[cert].read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, creds)


def test_tls_serves_tls_clients_and_refuses_plaintext(pki):
    with running_server(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), health_address="127.0.0.1:0") as app:
        with tls_channel(app.address, pki) as ch:
            assert classify(ch).name == "mnist"
        with grpc.insecure_channel(app.address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                classify(ch)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # orchestrator probes that cannot speak TLS use the plaintext health-only listener
        with grpc.insecure_channel(app.health_address) as ch:
            assert health(ch) == "SERVING"
            with pytest.raises(grpc.RpcError) as info:
                classify(ch)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # nothing but health there


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    with running_server(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), tls_client_ca=str(pki["ca"])) as app:
        with tls_channel(app.address, pki, cert="client") as ch:
            assert classify(ch).name == "mnist"
        for cert in (None, "stranger"):
            with tls_channel(app.address, pki, cert=cert) as ch:
                with pytest.raises(grpc.RpcError) as info:
                    classify(ch)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_is_required_except_for_health(pki, mnist):
    with running_server(token_file=str(pki["token"])) as app:
        with grpc.insecure_channel(app.address) as ch:
            assert health(ch) == "SERVING"  # never behind authentication
            for token, why in ((None, "missing authorization"), ("wrong-token-0000000000", "wrong bearer token")):
                with pytest.raises(grpc.RpcError) as info:
                    classify(ch, token)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and why in info.value.details()
            assert classify(ch, "s3cret-token-0123456789abcdef").name == "mnist"
            # a stream without the token ends with UNAUTHENTICATED
            stream = digits_pb2_grpc.DigitClassifierStub(ch).ClassifyStream(
                iter([digits_pb2.ClassifyRequest(images=[digits_pb2.Image(pixels=mnist.test.images[0].tobytes())])]), timeout=10
            )
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_library_speaks_tls_and_token(pki, mnist):
    from mnist_edge.client.client import DigitClient

    with running_server(tls_cert=str(pki["server"]), tls_key=str(pki["server_key"]), token_file=str(pki["token"])) as app:
        creds = grpc.ssl_channel_credentials(root_certificates=pki["ca"].read_bytes())
        with DigitClient(app.address, credentials=creds, token="s3cret-token-0123456789abcdef") as c:
            assert c.classify([mnist.test.images[0]])[0].digit == 7


def test_short_or_missing_token_file_is_refused(tmp_path):
    from helpers.servers import make_settings
    from mnist_edge.server.app import App, BindError

    (tmp_path / "t").write_text("short")
    with pytest.raises(BindError, match="at least 16"):
        App(make_settings(token_file=str(tmp_path / "t")))
    with pytest.raises(BindError, match="--token-file"):
        App(make_settings(token_file=str(tmp_path / "missing")))
