"""How every facelink client reaches the service: plaintext, TLS, mutual TLS, bearer tokens.

One function builds every client channel, `client_channel(address, security)`, so the edge,
the `facelink cloud` commands and any script get the same rules:

* TLS when `tls_ca` is given (the server's certificate must chain to that CA, e.g. ca.crt from
  `facelink certs ca`) or `tls` is set (gRPC's bundled public roots, for a server with a
  publicly issued certificate). Otherwise plaintext.
* Mutual TLS when `tls_cert` and `tls_key` are given as well: the device proves who it is with
  its certificate (`facelink certs device NAME`), and the server sees NAME as the principal.
* A bearer token (from `token`, `token_file` or $FACELINK_TOKEN) travels with every call as
  the metadata `authorization: Bearer <token>`. Over TLS it is attached as gRPC call
  credentials. In plaintext it would be readable by anyone on the path, so it is only sent to a
  loopback address (a server on the same machine, or behind a local TLS-terminating proxy),
  unless `insecure` says so explicitly.

This module must not import facelink.config: facelink.config imports it (StreamConfig.security).
"""

from __future__ import annotations

import argparse
import collections
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

#: The environment variable a token is read from when none is configured.
ENV_TOKEN = "FACELINK_TOKEN"
#: Keepalive pings keep NAT and load-balancer state alive on idle device links and notice a dead
#: peer within ~40 s; 4 MiB matches the server's default message limit.
DEFAULT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    # gRPC's own reconnect backoff grows to 120 s: an edge would see a restarted cloud minutes
    # late. Capped at 5 s (with gRPC's jitter, a fleet does not come back in lockstep).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


class TransportSecurityError(ValueError):
    """A security setting that cannot work (missing file, token in plaintext, ...): the message says why."""


class ClientSecurity(BaseModel):
    """How a client secures its channel. The default is plaintext without credentials."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tls: bool = Field(False, description="TLS with gRPC's bundled public roots (implied by tls_ca)")
    tls_ca: Path | None = Field(None, description="PEM CA certificate the server's certificate must chain to; implies TLS")
    tls_cert: Path | None = Field(None, description="PEM client certificate for mutual TLS (needs tls_key)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    token: SecretStr | None = Field(None, description="bearer token; prefer token_file or $FACELINK_TOKEN")
    token_file: Path | None = Field(None, description="file holding the bearer token (surrounding whitespace ignored)")
    server_name: str | None = Field(
        None, description="name the server's certificate must carry, when it differs from the address's host"
    )
    insecure: bool = Field(False, description="allow a token in plaintext to a non-loopback address")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None

    @model_validator(mode="after")
    def _consistent(self) -> ClientSecurity:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate (--tls-cert) and its private key (--tls-key) go together")
        if self.tls_cert is not None and not self.uses_tls:
            raise ValueError("a client certificate needs TLS: give the server's CA (--tls-ca) or --tls")
        if self.server_name is not None and not self.uses_tls:
            raise ValueError("--server-name only applies over TLS: give the server's CA (--tls-ca) or --tls")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give a token or a token file, not both")
        if self.insecure and self.uses_tls:
            raise ValueError("--insecure is for plaintext channels; over TLS leave it out")
        return self


def resolve_token(security: ClientSecurity, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token to send: `token`, else the contents of `token_file`, else $FACELINK_TOKEN, else None."""
    if security.token is not None:
        token = security.token.get_secret_value().strip()
    elif security.token_file is not None:
        token = _read(security.token_file, "token file").decode("utf-8", "replace").strip()
        if not token:
            raise TransportSecurityError(f"the token file {security.token_file} is empty")
    else:
        token = environ.get(ENV_TOKEN, "").strip()
    if not token:
        return None
    # Metadata values must be printable ASCII; a token with a newline would be refused by gRPC
    # with a far less helpful message, and one with spaces cannot be a bearer token.
    if not all(33 <= ord(char) <= 126 for char in token):
        raise TransportSecurityError("the token must be printable ASCII without spaces")
    return token


def client_channel(
    address: str,
    security: ClientSecurity | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    environ: Mapping[str, str] = os.environ,
) -> grpc.Channel:
    """A channel to `address` (host:port, or any gRPC target) secured as `security` says.

    `options` are added to (and override) DEFAULT_OPTIONS. Raises TransportSecurityError when a
    file cannot be read or a token would go out in plaintext to another machine. Like every gRPC
    channel it connects lazily: a wrong CA or a refused certificate shows up as UNAVAILABLE on
    the first call.
    """
    security = security or ClientSecurity()
    token = resolve_token(security, environ)
    merged = dict(DEFAULT_OPTIONS) | dict(options)
    if security.uses_tls:
        if security.server_name:
            merged["grpc.ssl_target_name_override"] = security.server_name
        credentials = _tls_credentials(security)
        if token is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.metadata_call_credentials(_BearerAuth(token)))
        return grpc.secure_channel(address, credentials, options=list(merged.items()))
    if token is not None and not (security.insecure or is_loopback(address)):
        raise TransportSecurityError(
            f"refusing to send the token in plaintext to {address}: anyone on the way could read it. "
            "Use TLS (--tls-ca), connect through a loopback address, or pass --insecure on a trusted network"
        )
    channel = grpc.insecure_channel(address, options=list(merged.items()))
    if token is None:
        return channel
    # gRPC only attaches call credentials to secure channels, so the plaintext case adds the
    # same metadata with an interceptor.
    return grpc.intercept_channel(channel, _MetadataInterceptor(_bearer(token)))


def call_within_rate_limit(call: Any, request: Any, timeout: float = 60.0, max_wait_s: float = 60.0) -> Any:
    """A unary call that waits as long as the server's RESOURCE_EXHAUSTED asks (trailing metadata
    `retry-after-ms`), for at most `max_wait_s` in all: what a client enrolling many people does."""
    import time

    waited = 0.0
    while True:
        try:
            return call(request, timeout=timeout)
        except grpc.RpcError as error:
            wait_ms = dict(error.trailing_metadata() or ()).get("retry-after-ms")
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or wait_ms is None or waited >= max_wait_s:
                raise
            time.sleep(int(wait_ms) / 1000)
            waited += int(wait_ms) / 1000


def is_loopback(address: str) -> bool:
    """Whether a gRPC target stays on this machine: localhost, 127.0.0.0/8, ::1 or a unix socket.

    Host names other than localhost are not resolved: DNS could point them anywhere.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    hosts = _target_hosts(address)
    return bool(hosts) and all(_loopback_host(host) for host in hosts)


# -- command-line flags ----------------------------------------------------------------------------
def add_client_security_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the flags of ClientSecurity to a client command (edge, cloud enroll/list/...)."""
    group = parser.add_argument_group(
        "connection security",
        "Plaintext by default. --tls-ca switches to TLS; with --tls-cert/--tls-key as well, mutual\n"
        "TLS (the server knows the client by its certificate's name). A bearer token, from\n"
        f"--token-file or ${ENV_TOKEN}, is sent with every call, never in plaintext to another machine.",
    )
    group.add_argument("--tls-ca", type=Path, metavar="CA.crt",
                       help="connect over TLS and trust server certificates issued by this CA (PEM), "
                            "e.g. ca.crt from `facelink certs ca`")
    group.add_argument("--tls", action="store_true",
                       help="connect over TLS and trust publicly issued server certificates (gRPC's bundled roots) "
                            "instead of a CA of your own")
    group.add_argument("--tls-cert", type=Path, metavar="DEVICE.crt",
                       help="this client's certificate for mutual TLS, e.g. from `facelink certs device NAME`")
    group.add_argument("--tls-key", type=Path, metavar="DEVICE.key", help="the private key of --tls-cert")
    group.add_argument("--token-file", type=Path, metavar="FILE",
                       help=f"read a bearer token from FILE (default: ${ENV_TOKEN} if set); there is no --token "
                            "flag because command lines show up in ps and shell history")
    group.add_argument("--server-name", metavar="NAME",
                       help="the name the server's certificate must carry when --server uses another one "
                            "(e.g. an IP address the certificate does not list)")
    group.add_argument("--insecure", action="store_true",
                       help="allow sending the token without TLS to a non-loopback server (a trusted test network only)")
    return group


def client_security_from_args(args: argparse.Namespace) -> ClientSecurity:
    """The ClientSecurity the flags of add_client_security_arguments describe.

    Raises TransportSecurityError with one line per problem (not pydantic's report).
    """
    from pydantic import ValidationError

    try:
        return ClientSecurity(
            tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
            token_file=args.token_file, server_name=args.server_name, insecure=args.insecure,
        )
    except ValidationError as error:
        raise TransportSecurityError("; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())) from None


# -- internals ---------------------------------------------------------------------------------------
def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise TransportSecurityError(f"cannot read the {what} {path}: {error.strerror}") from None


def _read_pem(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    data = _read(path, what)
    # gRPC would only log a parse failure and report UNAVAILABLE on every call: say it here.
    if b"-----BEGIN " not in data:
        raise TransportSecurityError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def _tls_credentials(security: ClientSecurity) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(security.tls_ca, "CA certificate (--tls-ca)"),  # None: bundled roots
        private_key=_read_pem(security.tls_key, "client key (--tls-key)"),
        certificate_chain=_read_pem(security.tls_cert, "client certificate (--tls-cert)"),
    )


def _target_hosts(address: str) -> list[str]:
    """The host part(s) of a gRPC target: host:port, [v6]:port, dns:[//authority/]host:port,
    ipv4:a:p,b:p, ipv6:[a]:p."""
    rest = address
    if rest.startswith("dns:"):
        rest = rest[4:]
        if rest.startswith("//"):
            rest = rest[2:].split("/", 1)[-1]  # drop the DNS server authority
    elif rest.startswith(("ipv4:", "ipv6:")):
        rest = rest[5:]
    return [_host(part) for part in rest.split(",") if part]


def _host(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    if hostport.count(":") == 1:
        return hostport.split(":", 1)[0]
    return hostport  # no port, or a bare IPv6 address


def _loopback_host(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class _BearerAuth(grpc.AuthMetadataPlugin):
    """Adds the bearer token to every call on a TLS channel."""

    def __init__(self, token: str) -> None:
        self._metadata = _bearer(token)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._metadata, None)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata to every call, whatever its shape (the edge's stream included)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
            details.credentials, details.wait_for_ready, getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._details(details), request_iterator)
