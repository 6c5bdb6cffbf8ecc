"""A development PKI: one CA, a server certificate, one client certificate per device.

This is what a small deployment or a test bench needs to run the service over TLS with mutual
authentication, without OpenSSL recipes:

    facelink certs ca --out pki/                                   # once: ca.crt, ca.key
    facelink certs server --ca pki/ --host cloud.example --host 10.0.0.5 --out pki/
    facelink certs device door-1 --ca pki/ --out pki/              # door-1.crt, door-1.key

The server presents server.crt and trusts client certificates signed by ca.crt; each device
trusts ca.crt and presents its own certificate, whose common name is the principal the server
authenticates (the device's name). Keys are EC P-256 (small, fast to sign on a board) and
unencrypted on disk with mode 0600: protect them with file permissions, and keep ca.key off the
devices and the server altogether, it is only needed to issue certificates.

It is a development PKI: no revocation (CRL/OCSP), no intermediate CA, no key encryption. A
production fleet should issue from its own CA or a secret manager; the server and clients only
ever read PEM files, so they work the same with certificates from anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Long enough for a development setup to outlive a project; short enough that a leaked
#: development certificate eventually stops working. 825 days is the longest validity the major
#: TLS clients accept for a server certificate.
CA_DAYS = 3650
LEAF_DAYS = 825
#: Certificates start being valid a little in the past: a board whose clock lags the machine that
#: issued its certificate by a few minutes must not be refused as "not yet valid".
_BACKDATE = datetime.timedelta(minutes=5)
#: Device names become file names (NAME.crt) and principals: keep them to a safe alphabet.
_DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ORGANIZATION = "facelink development PKI"


class CertKey(NamedTuple):
    """A private key and its certificate, both PEM-encoded. Unpacks as (key_pem, cert_pem)."""

    key_pem: bytes
    cert_pem: bytes


def make_ca(common_name: str = "facelink development CA", days: int = CA_DAYS) -> CertKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_key()
    name = _name(common_name)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
    )
    return _finish(builder, key, key)


def make_server_cert(ca: CertKey | tuple[bytes, bytes], hostnames: Iterable[str], days: int = LEAF_DAYS) -> CertKey:
    """A serverAuth certificate for `hostnames` (DNS names and IP addresses, e.g. localhost,
    127.0.0.1, ::1), signed by `ca`. Clients check the name they connect to against this list."""
    names = list(dict.fromkeys(_general_name(host) for host in hostnames))  # repeated hosts once
    if not names:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = _new_key()
    # Clients match the subjectAltName list only; the common name (the first host) is for people.
    builder = _leaf(ca, _name(str(names[0].value)), key, days, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _finish(builder, key, _load_key(ca[0]))


def make_client_cert(ca: CertKey | tuple[bytes, bytes], common_name: str, days: int = LEAF_DAYS) -> CertKey:
    """A clientAuth certificate whose common name is the device (the principal the server sees)."""
    if not _DEVICE_NAME.match(common_name):
        raise ValueError(
            f"device name {common_name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    key = _new_key()
    builder = _leaf(ca, _name(common_name), key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
    return _finish(builder, key, _load_key(ca[0]))


def write_pem(path: str | os.PathLike[str], data: bytes, private: bool) -> Path:
    """Write `data` to `path` atomically; private keys get mode 0600, certificates 0644.

    The file is created with its final mode before any byte is written (a key is never readable
    by others, not even for an instant) and renamed into place, so a crash leaves the old file
    or the new one, never half of either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_cert_key(folder: str | os.PathLike[str], stem: str) -> CertKey:
    """Read STEM.key and STEM.crt from `folder` (e.g. the CA written by `facelink certs ca`)."""
    folder = Path(folder)
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.crt"
    for path in (key_path, cert_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (create the CA with `facelink certs ca --out {folder}`)")
    pair = CertKey(key_path.read_bytes(), cert_path.read_bytes())
    _load_key(pair.key_pem)  # fail here, with the file's name, rather than deep in a signature
    return pair


# -- building blocks ------------------------------------------------------------------------------
def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _load_key(key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key (facelink's PKI issues EC P-256 keys)")
    return key


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _general_name(host: str) -> x509.GeneralName:
    host = host.strip().removeprefix("[").removesuffix("]")  # [::1] as written in addresses
    if not host:
        raise ValueError("an empty host name")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host.lower())


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    # A CA signs certificates (and would sign CRLs); a leaf signs TLS handshakes (ECDHE_ECDSA
    # and TLS 1.3 need digitalSignature only).
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int) -> x509.CertificateBuilder:
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _leaf(ca: CertKey | tuple[bytes, bytes], subject: x509.Name, key: ec.EllipticCurvePrivateKey, days: int,
          usage: x509.ObjectIdentifier) -> x509.CertificateBuilder:
    """The parts every leaf shares: not a CA, signature key usage, one EKU, SKI and AKI."""
    ca_cert = x509.load_pem_x509_certificate(ca[1])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )


def _finish(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey) -> CertKey:
    cert = builder.sign(signer, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return CertKey(key_pem, cert.public_bytes(serialization.Encoding.PEM))
