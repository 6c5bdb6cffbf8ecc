"""The development PKI: what it issues verifies, keys stay private, and real gRPC TLS and mutual
TLS work with it through client_channel()."""

from __future__ import annotations

import argparse
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from facelink import pki
from facelink.cli_certs import add_certs_parser
from facelink.transport import ClientSecurity, client_channel

from .test_transport import echo, echo_server


class Bench:
    """One CA with a server certificate for the loopback names and a device certificate, on disk."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = pki.make_ca("test CA", days=2)
        self.server = pki.make_server_cert(self.ca, ["localhost", "127.0.0.1", "::1"], days=2)
        self.device = pki.make_client_cert(self.ca, "door-1", days=2)
        for stem, pair in (("ca", self.ca), ("server", self.server), ("door-1", self.device)):
            pki.write_pem(folder / f"{stem}.key", pair.key_pem, private=True)
            pki.write_pem(folder / f"{stem}.crt", pair.cert_pem, private=False)

    def server_credentials(self, require_client_auth: bool = False) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.server.key_pem, self.server.cert_pem)],
            root_certificates=self.ca.cert_pem if require_client_auth else None,
            require_client_auth=require_client_auth,
        )

    def security(self, **extra: object) -> ClientSecurity:
        return ClientSecurity(tls_ca=self.folder / "ca.crt", **extra)

    def mtls(self, stem: str = "door-1") -> ClientSecurity:
        return self.security(tls_cert=self.folder / f"{stem}.crt", tls_key=self.folder / f"{stem}.key")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(tmp_path_factory.mktemp("pki"))


def refused(address: str, security: ClientSecurity) -> grpc.StatusCode:
    with client_channel(address, security, environ={}) as channel, pytest.raises(grpc.RpcError) as error:
        echo(channel, timeout=5)
    return error.value.code()


# -- what is issued ---------------------------------------------------------------------------------
def test_certificates_chain_to_the_ca_with_the_right_usages(bench: Bench) -> None:
    ca = x509.load_pem_x509_certificate(bench.ca.cert_pem)
    server = x509.load_pem_x509_certificate(bench.server.cert_pem)
    device = x509.load_pem_x509_certificate(bench.device.cert_pem)

    ca.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for leaf, usage in ((server, ExtendedKeyUsageOID.SERVER_AUTH), (device, ExtendedKeyUsageOID.CLIENT_AUTH)):
        leaf.verify_directly_issued_by(ca)
        assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey) and leaf.public_key().curve.name == "secp256r1"
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [usage]
        key_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert key_usage.critical and key_usage.value.digital_signature and not key_usage.value.key_cert_sign
        assert leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
        leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)

    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert device.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "door-1"


def test_the_server_certificate_passes_path_validation_for_its_names(bench: Bench) -> None:
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([x509.load_pem_x509_certificate(bench.ca.cert_pem)]))
    server = x509.load_pem_x509_certificate(bench.server.cert_pem)
    verifier.build_server_verifier(x509.DNSName("localhost")).verify(server, [])
    with pytest.raises(Exception, match="(?i)name|subject"):
        verifier.build_server_verifier(x509.DNSName("cloud.example")).verify(server, [])


def test_bad_requests_are_refused() -> None:
    ca = pki.make_ca(days=1)
    with pytest.raises(ValueError, match="device name"):
        pki.make_client_cert(ca, "../etc/passwd")
    with pytest.raises(ValueError, match="at least one host"):
        pki.make_server_cert(ca, [])
    with pytest.raises(ValueError, match="days"):
        pki.make_ca(days=0)


def test_private_keys_are_written_0600(tmp_path: Path, bench: Bench) -> None:
    assert stat.S_IMODE((bench.folder / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((bench.folder / "door-1.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((bench.folder / "ca.crt").stat().st_mode) == 0o644
    readable = tmp_path / "old.key"
    readable.write_bytes(b"old")
    readable.chmod(0o644)
    pki.write_pem(readable, b"new", private=True)  # replacing a world-readable file does not keep its mode
    assert stat.S_IMODE(readable.stat().st_mode) == 0o600 and readable.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["old.key"]  # no temporary file left behind


# -- TLS with gRPC ----------------------------------------------------------------------------------
def test_tls_needs_the_right_ca(bench: Bench, tmp_path: Path) -> None:
    other = pki.make_ca("another CA", days=1)
    pki.write_pem(tmp_path / "other.crt", other.cert_pem, private=False)
    with echo_server(bench.server_credentials()) as port:
        address = f"localhost:{port}"
        with client_channel(address, bench.security(), environ={}) as channel:
            assert echo(channel)["common_name"] == []  # server-only TLS: the client is anonymous
        assert refused(address, ClientSecurity()) == grpc.StatusCode.UNAVAILABLE             # plaintext
        assert refused(address, ClientSecurity(tls_ca=tmp_path / "other.crt")) == grpc.StatusCode.UNAVAILABLE
        assert refused(address, ClientSecurity(tls=True)) == grpc.StatusCode.UNAVAILABLE     # public roots


def test_the_server_name_can_differ_from_the_address(bench: Bench, tmp_path: Path) -> None:
    """A certificate for a DNS name only, reached by IP: --server-name says which name to check."""
    named = pki.make_server_cert(bench.ca, ["facelink.internal"], days=1)
    credentials = grpc.ssl_server_credentials([(named.key_pem, named.cert_pem)])
    with echo_server(credentials) as port:
        address = f"127.0.0.1:{port}"
        assert refused(address, bench.security()) == grpc.StatusCode.UNAVAILABLE
        with client_channel(address, bench.security(server_name="facelink.internal"), environ={}) as channel:
            echo(channel)


def test_a_token_over_tls_travels_as_call_credentials(bench: Bench) -> None:
    with echo_server(bench.server_credentials()) as port:
        with client_channel(f"localhost:{port}", bench.security(token="s3cret")) as channel:
            assert echo(channel)["metadata"]["authorization"] == "Bearer s3cret"


def test_mutual_tls_admits_devices_of_the_ca_only(bench: Bench, tmp_path: Path) -> None:
    stranger_ca = pki.make_ca("stranger CA", days=1)
    stranger = pki.make_client_cert(stranger_ca, "door-1", days=1)
    pki.write_pem(tmp_path / "stranger.crt", stranger.cert_pem, private=False)
    pki.write_pem(tmp_path / "stranger.key", stranger.key_pem, private=True)
    with echo_server(bench.server_credentials(require_client_auth=True)) as port:
        address = f"localhost:{port}"
        with client_channel(address, bench.mtls(), environ={}) as channel:
            assert echo(channel)["common_name"] == ["door-1"]  # the principal the server authenticates
        assert refused(address, bench.security()) == grpc.StatusCode.UNAVAILABLE  # no client certificate
        foreign = bench.security(tls_cert=tmp_path / "stranger.crt", tls_key=tmp_path / "stranger.key")
        assert refused(address, foreign) == grpc.StatusCode.UNAVAILABLE


# -- facelink certs -----------------------------------------------------------------------------------
def certs(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="facelink")
    add_certs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["certs", *argv])
    return args.func(args)


def test_the_certs_command_issues_the_three_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "pki")
    assert certs("server", "--ca", out, "--host", "localhost", "--out", out) == 2  # no CA yet
    assert "facelink certs ca" in capsys.readouterr().err
    assert certs("ca", "--out", out) == 0
    assert certs("server", "--ca", out, "--host", "localhost", "--host", "127.0.0.1", "--out", out) == 0
    assert certs("device", "door-1", "--ca", out, "--out", out) == 0
    files = sorted(p.name for p in Path(out).iterdir())
    assert files == ["ca.crt", "ca.key", "door-1.crt", "door-1.key", "server.crt", "server.key"]
    assert all(stat.S_IMODE((Path(out) / f).stat().st_mode) == 0o600 for f in files if f.endswith(".key"))
    ca = x509.load_pem_x509_certificate((Path(out) / "ca.crt").read_bytes())
    x509.load_pem_x509_certificate((Path(out) / "door-1.crt").read_bytes()).verify_directly_issued_by(ca)

    capsys.readouterr()
    before = (Path(out) / "ca.key").read_bytes()
    assert certs("ca", "--out", out) == 1  # an existing CA is never replaced by accident
    assert "--force" in capsys.readouterr().err and (Path(out) / "ca.key").read_bytes() == before
    assert certs("device", "bad/name", "--ca", out, "--out", out) == 2
    assert "device name" in capsys.readouterr().err


def test_the_certs_help_teaches_the_order(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        certs("--help")
    text = capsys.readouterr().out
    assert text.index("1. ca") < text.index("2. server") < text.index("3. device")
    assert "facelink certs device door-1 --ca pki/ --out pki/" in text
