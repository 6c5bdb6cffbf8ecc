"""`facelink certs`: issue the development PKI's CA, server and device certificates (facelink.pki)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facelink.pki import CertKey

# facelink.pki (and with it `cryptography`, ~50 ms) is imported only when a certs command runs,
# not each time `facelink` builds its parser; these defaults repeat pki.CA_DAYS and pki.LEAF_DAYS.
_CA_DAYS, _LEAF_DAYS = 3650, 825

_DESCRIPTION = """\
A development PKI for running the service over TLS with mutual authentication. Three steps,
in this order:

  1. ca      once: a certificate authority, ca.crt and ca.key. ca.crt goes to the server and
             to every device; ca.key stays with whoever issues certificates (not on the
             server, not on a device).
  2. server  the server's certificate for the names and addresses clients connect to
             (server.crt, server.key): a client refuses a server whose certificate does not
             name the host it dialled.
  3. device  one certificate per device (NAME.crt, NAME.key): its common name NAME is the
             principal the server authenticates the device as.

Keys are EC P-256, written unencrypted with mode 0600; existing files are never replaced
without --force. There is no revocation: to retire a device, issue a new CA and new
certificates (or use bearer tokens, which the server can revoke). For production, issue from
your own CA; the server and clients read PEM files and work the same."""

_EPILOG = """\
example:
  facelink certs ca --out pki/
  facelink certs server --ca pki/ --host cloud.example --host 10.0.0.5 --out pki/
  facelink certs device door-1 --ca pki/ --out pki/

  facelink cloud serve --gallery ./gallery --host 0.0.0.0 \\
      --tls-cert pki/server.crt --tls-key pki/server.key --client-ca pki/ca.crt
  facelink edge --source 0 --server cloud.example:50051 --camera-id door-1 \\
      --tls-ca pki/ca.crt --tls-cert pki/door-1.crt --tls-key pki/door-1.key

  openssl x509 -in pki/door-1.crt -noout -text      # inspect what was issued"""


def add_certs_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `certs` and its three subcommands on the `facelink` command's subparsers."""
    certs = subparsers.add_parser(
        "certs",
        help="issue a development CA, server and device certificates for TLS and mutual TLS",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog=_EPILOG,
    )
    cmds = certs.add_subparsers(dest="certs_command", required=True, metavar="{ca,server,device}")

    ca = cmds.add_parser("ca", help="1. create the certificate authority (ca.crt, ca.key)",
                         description="Create a self-signed CA that signs server and device certificates.")
    ca.add_argument("--name", default="facelink development CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=_CA_DAYS, help=f"validity in days (default {_CA_DAYS})")
    _add_out(ca)
    ca.set_defaults(func=_ca)

    server = cmds.add_parser("server", help="2. issue the server's certificate (server.crt, server.key)",
                             description="Issue a serverAuth certificate for every name and address clients dial.")
    _add_ca(server)
    server.add_argument("--host", action="append", required=True, metavar="NAME",
                        help="a DNS name or IP address clients connect to; repeat for each "
                             "(e.g. --host localhost --host 127.0.0.1 --host ::1 --host cloud.example)")
    server.add_argument("--days", type=int, default=_LEAF_DAYS, help=f"validity in days (default {_LEAF_DAYS})")
    _add_out(server)
    server.set_defaults(func=_server)

    device = cmds.add_parser("device", help="3. issue a device's client certificate (NAME.crt, NAME.key)",
                             description="Issue a clientAuth certificate; its common name is the device's principal.")
    device.add_argument("name", help="the device's name (letters, digits, '.', '_', '-'), e.g. door-1")
    _add_ca(device)
    device.add_argument("--days", type=int, default=_LEAF_DAYS, help=f"validity in days (default {_LEAF_DAYS})")
    _add_out(device)
    device.set_defaults(func=_device)
    return certs


def _add_out(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="folder to write the files to (created if missing)")
    parser.add_argument("--force", action="store_true", help="replace files that already exist")


def _add_ca(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ca", type=Path, required=True, help="the folder with ca.crt and ca.key from `facelink certs ca`")


def _ca(args: argparse.Namespace) -> int:
    from facelink import pki

    return _write(args.out, "ca", lambda: pki.make_ca(args.name, args.days), args.force)


def _server(args: argparse.Namespace) -> int:
    from facelink import pki

    return _write(args.out, "server", lambda: pki.make_server_cert(_load_ca(args.ca), args.host, args.days), args.force)


def _device(args: argparse.Namespace) -> int:
    from facelink import pki

    return _write(args.out, args.name, lambda: pki.make_client_cert(_load_ca(args.ca), args.name, args.days), args.force)


def _load_ca(folder: Path) -> CertKey:
    from facelink import pki

    return pki.load_cert_key(folder, "ca")


def _write(out: Path, stem: str, issue: Callable[[], CertKey], force: bool) -> int:
    """Issue and write STEM.key (0600) and STEM.crt, refusing to replace either without --force."""
    from facelink import pki

    key_path, cert_path = out / f"{stem}.key", out / f"{stem}.crt"
    existing = [str(p) for p in (key_path, cert_path) if p.exists()]
    if existing and not force:
        print(f"error: {' and '.join(existing)} already exist; use --force to replace them", file=sys.stderr)
        return 1
    try:
        pair = issue()
    except (OSError, ValueError) as error:  # a missing CA folder, a bad host or device name, days < 1
        print(f"error: {error}", file=sys.stderr)
        return 2
    pki.write_pem(key_path, pair.key_pem, private=True)
    pki.write_pem(cert_path, pair.cert_pem, private=False)
    print(f"wrote {cert_path} and {key_path} (the key with mode 0600: yours alone)")
    return 0
