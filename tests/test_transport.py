"""Client channels: bearer tokens travel as metadata on every call shape, and never in plaintext
to another machine; the security settings refuse what cannot work, with one clear line."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from facelink.transport import (
    ENV_TOKEN,
    ClientSecurity,
    TransportSecurityError,
    add_client_security_arguments,
    client_channel,
    client_security_from_args,
    is_loopback,
    resolve_token,
)

_SERVICE = "facelink.test.Echo"


def _reply(context: grpc.ServicerContext) -> bytes:
    """What the server saw: the call's metadata and the client certificate's common name, if any."""
    auth = context.auth_context()
    return json.dumps({
        "metadata": dict(context.invocation_metadata()),
        "common_name": [name.decode() for name in auth.get("x509_common_name", [])],
    }).encode()


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return _reply(context)


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in requests:
        yield _reply(context)


@contextlib.contextmanager
def echo_server(credentials: grpc.ServerCredentials | None = None) -> Iterator[int]:
    """A generic gRPC server on 127.0.0.1 that answers with what it saw; yields its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    address = "127.0.0.1:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def echo(channel: grpc.Channel, timeout: float = 10) -> dict:
    """One unary call; what the server saw."""
    return json.loads(channel.unary_unary(f"/{_SERVICE}/Unary")(b"", timeout=timeout))


def echo_stream(channel: grpc.Channel, timeout: float = 10) -> list[dict]:
    """One bidirectional stream of two messages (the edge's call shape); what the server saw each time."""
    return [json.loads(reply) for reply in channel.stream_stream(f"/{_SERVICE}/Stream")(iter([b"", b""]), timeout=timeout)]


def test_a_token_goes_with_every_call_on_a_plaintext_loopback_channel() -> None:
    with echo_server() as port, client_channel(f"127.0.0.1:{port}", ClientSecurity(token="s3cret"), environ={}) as channel:
        assert echo(channel)["metadata"]["authorization"] == "Bearer s3cret"
        assert [seen["metadata"]["authorization"] for seen in echo_stream(channel)] == ["Bearer s3cret"] * 2


def test_without_a_token_nothing_is_added() -> None:
    with echo_server() as port, client_channel(f"localhost:{port}", ClientSecurity(), environ={}) as channel:
        assert "authorization" not in echo(channel)["metadata"]


def test_the_token_comes_from_the_file_then_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "device.token"
    token_file.write_text("  from-file\n")
    environ = {ENV_TOKEN: "from-env"}
    assert resolve_token(ClientSecurity(token_file=token_file), environ) == "from-file"
    assert resolve_token(ClientSecurity(), environ) == "from-env"
    assert resolve_token(ClientSecurity(token="explicit"), environ) == "explicit"
    assert resolve_token(ClientSecurity(), {}) is None
    with echo_server() as port, client_channel(f"127.0.0.1:{port}", environ=environ) as channel:
        assert echo(channel)["metadata"]["authorization"] == "Bearer from-env"


def test_a_token_is_never_sent_in_plaintext_to_another_machine() -> None:
    with pytest.raises(TransportSecurityError, match="refusing to send the token in plaintext to 10.0.0.7:50051"):
        client_channel("10.0.0.7:50051", ClientSecurity(token="s3cret"))
    with pytest.raises(TransportSecurityError, match="in plaintext"):  # from the environment too
        client_channel("cloud.example:50051", environ={ENV_TOKEN: "s3cret"})
    client_channel("10.0.0.7:50051", ClientSecurity(token="s3cret", insecure=True)).close()  # said explicitly
    client_channel("10.0.0.7:50051", environ={}).close()  # no token, nothing to protect


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("localhost:50051", True), ("127.0.0.1:50051", True), ("127.8.9.1:1", True), ("[::1]:50051", True),
        ("dns:///localhost:50051", True), ("unix:/run/facelink.sock", True), ("ipv4:127.0.0.1:1,127.0.0.2:2", True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False), ("10.0.0.7:50051", False), ("0.0.0.0:50051", False),
        ("cloud.example:50051", False), ("localhost.example:1", False),
    ],
)
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tls_ca": "ca.crt", "tls_cert": "d.crt"}, "go together"),
        ({"tls_cert": "d.crt", "tls_key": "d.key"}, "needs TLS"),
        ({"server_name": "cloud.example"}, "only applies over TLS"),
        ({"token": "a", "token_file": "t"}, "not both"),
        ({"tls_ca": "ca.crt", "insecure": True}, "for plaintext"),
    ],
)
def test_settings_that_cannot_work_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ClientSecurity(**settings)


def test_unreadable_or_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(TransportSecurityError, match="cannot read the CA certificate.*missing.crt"):
        client_channel("localhost:1", ClientSecurity(tls_ca=tmp_path / "missing.crt"))
    garbage = tmp_path / "ca.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(TransportSecurityError, match="is not PEM"):
        client_channel("localhost:1", ClientSecurity(tls_ca=garbage))
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    with pytest.raises(TransportSecurityError, match="is empty"):
        resolve_token(ClientSecurity(token_file=empty))
    with pytest.raises(TransportSecurityError, match="printable ASCII"):
        resolve_token(ClientSecurity(token="two words"))


def test_command_line_flags_build_the_settings(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_client_security_arguments(parser)
    args = parser.parse_args(["--tls-ca", "ca.crt", "--tls-cert", "d.crt", "--tls-key", "d.key", "--server-name", "x"])
    security = client_security_from_args(args)
    assert security.uses_tls and security.tls_cert == Path("d.crt") and security.server_name == "x"
    assert client_security_from_args(parser.parse_args([])) == ClientSecurity()
    with pytest.raises(TransportSecurityError, match=r"^a client certificate \(--tls-cert\) and its private key"):
        client_security_from_args(parser.parse_args(["--tls-ca", "ca.crt", "--tls-cert", "d.crt"]))


def test_the_edge_refuses_a_security_mistake_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from facelink.cli import main

    assert main(["edge", "--source", str(tmp_path), "--tls-ca", "ca.crt", "--tls-cert", "door-1.crt"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: a client certificate (--tls-cert) and its private key (--tls-key) go together"
    )


def test_the_edge_refuses_a_plaintext_token_before_loading_a_model() -> None:
    from facelink.config import EdgeConfig, StreamConfig
    from facelink.edge.run import run_edge

    config = EdgeConfig(stream=StreamConfig(server="cloud.example:50051", security=ClientSecurity(token="s3cret")))
    with pytest.raises(TransportSecurityError, match="in plaintext to cloud.example:50051"):
        run_edge(source=None, config=config, on_result=lambda *a: None)  # type: ignore[arg-type]  # never read
