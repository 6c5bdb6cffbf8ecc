"""`facelink cloud ...`: run the service, manage its credentials, its gallery and its audit log."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .cli_common import FORMATTER as _FORMATTER
from .cli_common import add_common as _add_common
from .cli_common import read_structured_file
from .cli_upgrade import add_upgrade_parser

_SCOPES_HELP = "recognize (devices), embeddings, scores, enroll, remove, read, unknowns, admin"


# -- serve -------------------------------------------------------------------------------------
def _serve(args: argparse.Namespace) -> int:
    from facelink.cloud.gallery import GalleryError, is_backend_url
    from facelink.cloud.server import InsecureConfigError, serve
    from facelink.config import (
        BatchingConfig,
        CloudConfig,
        CloudSecurity,
        GalleryBackendConfig,
        ServiceLimits,
        UnknownsConfig,
    )

    # Repeatable options left out keep CloudConfig's defaults (auto); `--ensemble none` accepts none.
    chosen = {"gallery_models": args.gallery_model, "ensembles": args.ensemble}
    models = {key: () if value == ["none"] else tuple(value) for key, value in chosen.items() if value}
    # --gallery is a folder (embedded) or a qdrant URL; with a URL, --state-dir keeps the
    # server's own files (credentials, audit log, unknown people).
    url = args.gallery if is_backend_url(args.gallery) else None
    if url is None and args.state_dir is not None:
        print("error: --state-dir goes with a qdrant:// --gallery; a gallery folder holds its own state", file=sys.stderr)
        return 2
    backend = GalleryBackendConfig(
        url=url, replica_poll_s=args.replica_poll, api_key_file=args.gallery_api_key_file, shards=args.qdrant_shards,
        replication_factor=args.qdrant_replication, write_consistency_factor=args.qdrant_write_consistency,
    )
    config = CloudConfig(
        host=args.host,
        port=args.port,
        gallery_dir=(args.state_dir or Path("gallery")) if url else Path(args.gallery),
        gallery_backend=backend,
        recognizer=args.recognizer,
        match_threshold=args.threshold,
        rejection_fraction=args.reject_fraction,
        rejection_action=args.reject_action,
        metrics_port=args.metrics_port,
        security=CloudSecurity(
            tls_cert=args.tls_cert, tls_key=args.tls_key, client_ca=args.client_ca, insecure=args.insecure,
            reflection=args.reflection,
        ),
        limits=ServiceLimits(max_streams=args.max_streams, stream_idle_timeout_s=args.idle_timeout),
        batching=BatchingConfig(max_faces=args.batch, max_delay_ms=args.batch_delay_ms, workers=args.workers),
        unknowns=UnknownsConfig(enabled=not args.no_unknowns, retention_days=args.unknowns_retention_days),
        **models,
    )
    if args.config is not None:
        try:
            config = with_config_file(config, args.config)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    try:
        serve(config)
    except (InsecureConfigError, GalleryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def with_config_file(flags: Any, path: Path) -> Any:
    """The CloudConfig of a YAML/JSON file (any subset of CloudConfig's fields, nested as in
    facelink/config.py), with every flag that differs from its default on top: one file per
    deployment, the command line for what changes between runs. ValueError names the problem."""
    from pydantic import ValidationError

    from facelink.config import CloudConfig

    data = read_structured_file(path, "cloud config")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of CloudConfig fields, got {type(data).__name__}")
    merged = _deep_merge(data, flags.model_dump(mode="json", exclude_defaults=True))
    try:
        return CloudConfig.model_validate(merged)
    except ValidationError as error:
        raise ValueError(f"{path}: {error}") from None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _add_serve(cmds: argparse._SubParsersAction) -> None:
    from facelink.config import BatchingConfig

    serve = cmds.add_parser(
        "serve",
        help="run the service until Ctrl-C",
        formatter_class=_FORMATTER,
        description="""\
Serve facelink.v1 Recognition and Gallery and the standard gRPC health service. The gallery
is a SQLite database in WAL mode under --gallery (files 0600, float16 templates); its search
index is exact below 50,000 templates a model and IVF above, saved beside it so a start reads
it back (settings: --config cloud.yaml, docs/gallery-scale.md). Several servers may share
one gallery folder on one host (replicas see each other's changes within --replica-poll
seconds; not over NFS). --gallery qdrant://HOST:6334
keeps it in a Qdrant cluster instead (qdrants:// for TLS, API key from $FACELINK_QDRANT_API_KEY
or --gallery-api-key-file; docs/gallery.md), and any number of servers share it.

Secure by default: every call but health checks needs a bearer token or a client
certificate, and a scope (`facelink cloud token --help`). Plaintext is allowed on loopback
only; any other address needs --tls-cert/--tls-key (or --insecure, said at start). With
--client-ca every client must show a certificate issued by that CA (mutual TLS); a device
certificate may stream faces (scope recognize) unless `facelink cloud token grant` gives its
name more. Every gallery change is recorded in GALLERY/audit.jsonl (`facelink cloud audit`).

Enrollment runs every gallery model on each picture and stores each embedding. Devices may
send coded faces, or embeddings of an accepted query model (asymmetric matching): a query
model is matched against a gallery derived from the stored embeddings by its ensemble's
transforms, re-derived at every start without re-reading a picture. The ensemble's
disagreement on a picture is its uncertainty; the most uncertain pictures are flagged or
dropped (kept on record with the reason, never matched by the query model).""",
        epilog="""\
examples:
  facelink cloud serve --gallery ./gallery                               # loopback, plaintext
  facelink cloud serve --gallery ./gallery --host 0.0.0.0 \\
      --tls-cert pki/server.crt --tls-key pki/server.key --client-ca pki/ca.crt
  facelink cloud serve --ensemble facelink-query-v9 --reject-fraction 0.05 --reject-action drop
  facelink cloud serve --ensemble none                                   # no query models
  facelink cloud serve --gallery qdrants://qdrant.internal:6334/site-a --state-dir /var/lib/facelink""",
    )
    serve.add_argument("--config", type=Path, metavar="FILE",
                       help="a YAML/JSON file of CloudConfig fields (e.g. gallery_backend.index, limits); "
                            "flags that differ from their defaults override it")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port (0 picks a free one; default 50051)")
    serve.add_argument("--gallery", default="gallery",
                       help="gallery folder (default ./gallery), or qdrant://HOST:PORT[/PREFIX], qdrants://..., "
                            "qdrant+local:///PATH")
    serve.add_argument("--state-dir", type=Path,
                       help="with a qdrant --gallery: folder for auth.json, audit.jsonl, unknowns (default ./gallery)")
    serve.add_argument("--gallery-api-key-file", type=Path, metavar="FILE",
                       help="Qdrant API key file (else $FACELINK_QDRANT_API_KEY; never on the command line)")
    serve.add_argument("--replica-poll", type=float, default=0.5, metavar="S",
                       help="replicas on one gallery folder see each other's changes within S seconds (default 0.5)")
    for flag, what in (("shards", "shards of each collection"), ("replication", "copies of each shard"),
                       ("write-consistency", "copies a write waits for")):
        serve.add_argument(f"--qdrant-{flag}", type=int, default=1, metavar="N",
                           help=f"Qdrant {what}, set when the gallery's collections are created (default 1)")
    serve.add_argument("--recognizer", default="auto",
                       help="manifest name or path; auto = EdgeFace-XS, else MobileFaceNet, whichever ../shared "
                            "has first, else dlib-resnet")
    serve.add_argument("--threshold", type=float, help="cosine match threshold of --recognizer (default: the manifest's)")
    serve.add_argument("--gallery-model", action="append", metavar="MANIFEST",
                       help="a recogniser whose embeddings enrollment stores besides --recognizer; repeatable "
                            "(default auto: dlib-resnet-onnx when its weights are in the cache)")
    serve.add_argument("--ensemble", action="append", metavar="MANIFEST",
                       help="an ensemble manifest (bundled name or path) whose query model's embeddings are accepted; "
                            "repeatable; none for no query models (default auto: every bundled ensemble whose "
                            "gallery models are all served)")
    serve.add_argument("--reject-fraction", type=float, default=0.1,
                       help="the most uncertain fraction of gallery pictures to flag or drop; the ensemble must be "
                            "calibrated for it; 0 for none (default 0.1)")
    serve.add_argument("--reject-action", choices=("flag", "drop"), default="flag",
                       help="flag: keep matching, record why; drop: never match by the query model, record why (default flag)")
    security = serve.add_argument_group("security")
    security.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain (`facelink certs server`)")
    security.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    security.add_argument("--client-ca", type=Path, metavar="PEM",
                          help="require client certificates issued by this CA (mutual TLS; `facelink certs device`)")
    security.add_argument("--insecure", action="store_true",
                          help="allow plaintext on a non-loopback address (only behind a TLS-terminating proxy)")
    security.add_argument("--reflection", action="store_true", help="serve gRPC reflection (admin scope only)")
    load = serve.add_argument_group("load")
    load.add_argument("--max-streams", type=int, default=512,
                      help="Recognize streams open at once; one more is refused RESOURCE_EXHAUSTED (default 512)")
    load.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                      help="close a stream that sends nothing for S seconds (default 600)")
    load.add_argument("--batch", type=int, default=16, help="faces recognised together at most (default 16)")
    load.add_argument("--batch-delay-ms", type=float, default=2.0,
                      help="how long a face waits for others to fill its batch (default 2 ms)")
    load.add_argument("--workers", type=int, default=BatchingConfig().workers,
                      help=f"threads that decode and recognise batches (default: the cores, {BatchingConfig().workers})")
    unknowns = serve.add_argument_group("unknown people (docs/security.md)")
    unknowns.add_argument("--no-unknowns", action="store_true",
                          help="keep nothing of faces answered UNKNOWN: no unknown ids, no crops (what is already "
                               "kept still expires, and can be listed, enrolled or erased)")
    unknowns.add_argument("--unknowns-retention-days", type=float, default=30.0, metavar="DAYS",
                          help="erase an unknown person not seen for DAYS (default 30)")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics")
    _add_common(serve)
    serve.set_defaults(func=_serve)


# -- tokens ------------------------------------------------------------------------------------
def _store(args: argparse.Namespace):  # noqa: ANN202
    from facelink.cloud.auth import AuthStore

    return AuthStore(args.auth_file or args.gallery / "auth.json")


def _token_create(args: argparse.Namespace) -> int:
    record, secret = _store(args).create_token(args.name, args.scope, args.days)
    if args.out:
        import os

        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
        print(f"token {record.token_id} ({record.name}: {', '.join(sorted(record.scopes))}) written to {args.out}",
              file=sys.stderr)
    else:
        print(secret)
        print(f"token {record.token_id} ({record.name}: {', '.join(sorted(record.scopes))}); shown once, stored hashed",
              file=sys.stderr)
    return 0


def _token_list(args: argparse.Namespace) -> int:
    store = _store(args)
    print("id\tname\tscopes\tcreated\texpires\trevoked")
    for t in store.tokens():
        print(f"{t.token_id}\t{t.name}\t{','.join(sorted(t.scopes))}\t{t.created}\t{t.expires or '-'}\t{t.revoked or '-'}")
    for subject, scopes in store.grants().items():
        print(f"cert\t{subject}\t{','.join(sorted(scopes))}\t-\t-\t-")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    revoked = _store(args).revoke(args.token)
    if not revoked:
        print(f"error: no active token with id or name {args.token!r}", file=sys.stderr)
        return 1
    for t in revoked:
        print(f"revoked {t.token_id} ({t.name})")
    return 0


def _token_grant(args: argparse.Namespace) -> int:
    _store(args).grant(args.subject, args.scope)
    print(f"certificate {args.subject!r}: {', '.join(sorted(args.scope))}")
    return 0


def _add_token(cmds: argparse._SubParsersAction) -> None:
    token = cmds.add_parser(
        "token",
        help="create, list and revoke bearer tokens; grant scopes to device certificates",
        formatter_class=_FORMATTER,
        description=f"""\
Credentials of the service, kept in GALLERY/auth.json (0600) on the server's machine: tokens
are stored as SHA-256 hashes and shown once at creation. A running server picks up changes
within a second. Scopes: {_SCOPES_HELP}.
A device that sends coded faces or query-model embeddings needs only `recognize`.""",
        epilog="""\
examples:
  facelink cloud token create --gallery ./gallery ops --scope admin --out ops.token
  facelink cloud token create --gallery ./gallery door-1 --scope recognize --days 365 --out door-1.token
  facelink cloud token list --gallery ./gallery
  facelink cloud token revoke --gallery ./gallery door-1
  facelink cloud token grant --gallery ./gallery enroll-kiosk --scope recognize --scope enroll""",
    )
    sub = token.add_subparsers(dest="token_command", required=True, metavar="{create,list,revoke,grant}")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--gallery", type=Path, default=Path("gallery"), help="the server's gallery folder (default ./gallery)")
        p.add_argument("--auth-file", type=Path, help="the credentials file (default GALLERY/auth.json)")
        _add_common(p)
        return p

    create = command("create", "create a token and print it once (or write it to --out, 0600)")
    create.add_argument("name", help="who holds it: a device, a person, a service")
    create.add_argument("--scope", action="append", required=True, help=f"repeatable: {_SCOPES_HELP}")
    create.add_argument("--days", type=float, help="expires after this many days (default: never)")
    create.add_argument("--out", type=Path, help="write the token to this file (mode 0600) instead of stdout")
    create.set_defaults(func=_token_create)
    command("list", "list tokens (never their secrets) and certificate grants").set_defaults(func=_token_list)
    revoke = command("revoke", "revoke a token by id, or every token of a name")
    revoke.add_argument("token", help="token id or name")
    revoke.set_defaults(func=_token_revoke)
    grant = command("grant", "scopes of a client certificate's common name (default without a grant: recognize)")
    grant.add_argument("subject", help="the certificate's common name, e.g. the NAME of `facelink certs device NAME`")
    grant.add_argument("--scope", action="append", required=True, help=f"repeatable: {_SCOPES_HELP}")
    grant.set_defaults(func=_token_grant)


# -- audit -------------------------------------------------------------------------------------
def _audit(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from facelink.cloud.audit import read_audit, verify_audit

    path = args.audit_file or args.gallery / "audit.jsonl"
    if not path.exists():
        print(f"error: no audit log at {path}", file=sys.stderr)
        return 1
    if args.verify:
        ok, message = verify_audit(path)
        print(message)
        return 0 if ok else 1
    since = datetime.fromisoformat(args.since).replace(tzinfo=timezone.utc) if args.since else None
    for record in read_audit(path, since=since, identity=args.identity, principal=args.principal, limit=args.limit):
        print(json.dumps(record, ensure_ascii=True))
    return 0


def _add_audit(cmds: argparse._SubParsersAction) -> None:
    audit = cmds.add_parser(
        "audit",
        help="read or verify the audit log of gallery changes and refusals",
        formatter_class=_FORMATTER,
        description="""\
The append-only record of every gallery change (enroll, replace, erase), every refused or
unauthenticated call and its principal, peer, time and outcome, one JSON object a line.
Each line carries the SHA-256 of the one before it: --verify finds an edited or deleted line.""",
        epilog="""\
examples:
  facelink cloud audit --gallery ./gallery --since 2026-12-01
  facelink cloud audit --gallery ./gallery --identity "Ada Lovelace"
  facelink cloud audit --gallery ./gallery --verify""",
    )
    audit.add_argument("--gallery", type=Path, default=Path("gallery"), help="the server's gallery folder (default ./gallery)")
    audit.add_argument("--audit-file", type=Path, help="the log (default GALLERY/audit.jsonl)")
    audit.add_argument("--since", help="only records at or after this UTC date/time (ISO 8601)")
    audit.add_argument("--identity", help="only records about this identity")
    audit.add_argument("--principal", help="only records of this principal (e.g. token:ops)")
    audit.add_argument("--limit", type=int, help="the last N matching records")
    audit.add_argument("--verify", action="store_true", help="check the hash chain instead of printing")
    _add_common(audit)
    audit.set_defaults(func=_audit)


# -- gallery clients ---------------------------------------------------------------------------
def _channel(args: argparse.Namespace):  # noqa: ANN202
    from facelink.transport import client_channel, client_security_from_args

    return client_channel(args.server, client_security_from_args(args))


def _rpc(call, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Run a unary call; a failed one prints its status and message instead of a traceback."""
    import grpc

    try:
        return call(*args, timeout=60, **kwargs)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            print("hint: is the server up, and does it speak TLS (then give --tls-ca, and --tls-cert/--tls-key "
                  "if it asks for client certificates)?", file=sys.stderr)
        elif error.code() == grpc.StatusCode.UNAUTHENTICATED:
            print("hint: give a token with --token-file or $FACELINK_TOKEN (`facelink cloud token create` on the "
                  "server's machine), or a client certificate", file=sys.stderr)
        raise SystemExit(1) from None


def _enroll(args: argparse.Namespace) -> int:
    from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

    formats = {".jpg": common_pb2.IMAGE_FORMAT_JPEG, ".jpeg": common_pb2.IMAGE_FORMAT_JPEG,
               ".png": common_pb2.IMAGE_FORMAT_PNG, ".webp": common_pb2.IMAGE_FORMAT_WEBP}
    images = []
    for picture in args.pictures:
        fmt = formats.get(picture.suffix.lower())
        if fmt is None:
            print(f"error: {picture}: not a JPEG, PNG or WebP file", file=sys.stderr)
            return 2
        try:
            data = picture.read_bytes()
        except OSError as error:
            print(f"error: cannot read {picture}: {error.strerror}", file=sys.stderr)
            return 2
        images.append(gallery_pb2.EnrollImage(image=common_pb2.Image(format=fmt, data=data)))
    with _channel(args) as channel:
        reply = _rpc(gallery_pb2_grpc.GalleryStub(channel).Enroll,
                     gallery_pb2.EnrollRequest(identity=args.identity, images=images, replace=args.replace))
    print(f"enrolled {reply.identity!r}: {reply.templates_added} template(s) added, {reply.templates_total} in total")
    return 0


def _remove(args: argparse.Namespace) -> int:
    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    with _channel(args) as channel:
        reply = _rpc(gallery_pb2_grpc.GalleryStub(channel).RemoveIdentity, gallery_pb2.RemoveIdentityRequest(identity=args.identity))
    print(f"removed {reply.identity!r} ({reply.templates_removed} templates)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    token = ""
    with _channel(args) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        while True:
            page = _rpc(stub.ListIdentities, gallery_pb2.ListIdentitiesRequest(page_size=500, page_token=token))
            for identity in page.identities:
                print(f"{identity.identity}\t{identity.templates} template(s)")
            token = page.next_page_token
            if not token:
                break
    print(f"{page.total} identities", file=sys.stderr)
    return 0


def _unknowns_list(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    def when(us: int) -> str:
        return datetime.fromtimestamp(us / 1e6, timezone.utc).isoformat(timespec="seconds")

    crops = args.crops if args.out else 0
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True, mode=0o700)  # pictures of strangers: private
    token, total = "", 0
    with _channel(args) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        while True:
            page = _rpc(stub.ListUnknowns, gallery_pb2.ListUnknownsRequest(page_size=50, page_token=token, max_crops=crops))
            for u in page.unknowns:
                print(f"{u.unknown_id}\t{u.sightings} sighting(s)\tfirst {when(u.first_seen_time_us)}\t"
                      f"last {when(u.last_seen_time_us)}\t{','.join(u.cameras)}\t{u.crops_kept} crop(s)")
                for rank, crop in enumerate(u.crops):
                    _write_private(args.out / f"{u.unknown_id}-{rank}.jpg", crop.image.data)
            total, token = page.total, page.next_page_token
            if not token:
                break
    print(f"{total} unknown people" + (f"; crops in {args.out}" if args.out else ""), file=sys.stderr)
    return 0


def _write_private(path: Path, data: bytes) -> None:
    import os

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _unknowns_enroll(args: argparse.Namespace) -> int:
    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    request = gallery_pb2.EnrollUnknownRequest(unknown_id=args.unknown_id, identity=args.identity, replace=args.replace,
                                               max_crops=args.max_crops)
    with _channel(args) as channel:
        reply = _rpc(gallery_pb2_grpc.GalleryStub(channel).EnrollUnknown, request)
    print(f"enrolled {reply.unknown_id} as {reply.identity!r}: {reply.templates_added} template(s) added, "
          f"{reply.templates_total} in total; {reply.unknown_id} erased")
    return 0


def _unknowns_forget(args: argparse.Namespace) -> int:
    from facelink.v1 import gallery_pb2, gallery_pb2_grpc

    with _channel(args) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        ids = list(args.unknown_ids)
        if args.all:
            token = ""
            while True:
                page = _rpc(stub.ListUnknowns, gallery_pb2.ListUnknownsRequest(page_size=100, page_token=token))
                ids += [u.unknown_id for u in page.unknowns]
                token = page.next_page_token
                if not token:
                    break
        for unknown_id in ids:
            reply = _rpc(stub.ForgetUnknown, gallery_pb2.ForgetUnknownRequest(unknown_id=unknown_id))
            print(f"erased {reply.unknown_id} ({reply.crops_erased} crop(s))")
    if not ids:
        print("nothing to erase", file=sys.stderr)
    return 0


def _add_unknowns(cmds: argparse._SubParsersAction) -> None:
    from facelink.transport import add_client_security_arguments

    unknowns = cmds.add_parser(
        "unknowns",
        help="list unknown people with their best crops, name (enroll) or erase them",
        formatter_class=_FORMATTER,
        description="""\
Faces the server answered UNKNOWN are grouped per person under a persistent id (the unknown_id
of a result), with when and by which cameras each was seen and a few of its best crops. These
are pictures of people who never enrolled: every command needs the scope `unknowns`, enroll
also `enroll`. The server erases a person not seen for its retention period (30 days by
default; `facelink cloud serve --no-unknowns` keeps none).""",
        epilog="""\
examples:
  facelink cloud unknowns list --server localhost:50051 --token-file ops.token
  facelink cloud unknowns list --out unknown-crops --crops 3 --token-file ops.token
  facelink cloud unknowns enroll u-3f9c0a1b2c4d "Ada Lovelace" --token-file ops.token
  facelink cloud unknowns forget u-3f9c0a1b2c4d --token-file ops.token
  facelink cloud unknowns forget --all --token-file ops.token""",
    )
    sub = unknowns.add_subparsers(dest="unknowns_command", required=True, metavar="{list,enroll,forget}")

    def command(name: str, help_text: str, scopes: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=f"{help_text} (needs the scope(s) {scopes})")
        p.add_argument("--server", default="localhost:50051", help="host:port of the service (default localhost:50051)")
        add_client_security_arguments(p)
        _add_common(p)
        return p

    listing = command("list", "list unknown people, newest first; with --out, save their best crops", "unknowns")
    listing.add_argument("--out", type=Path, help="write each one's best crops to this folder (0700) as UNKNOWN_ID-RANK.jpg")
    listing.add_argument("--crops", type=int, default=3, help="crops per person with --out (default 3)")
    listing.set_defaults(func=_unknowns_list)
    enroll = command("enroll", "name an unknown person: enroll its crops as IDENTITY, then erase it", "unknowns, enroll")
    enroll.add_argument("unknown_id", help="u-... as listed")
    enroll.add_argument("identity", help="the person's name (new, or an existing identity to add to)")
    enroll.add_argument("--replace", action="store_true", help="replace the identity's templates instead of adding")
    enroll.add_argument("--max-crops", type=int, default=0, help="enroll at most this many of the best crops (default all)")
    enroll.set_defaults(func=_unknowns_enroll)
    forget = command("forget", "erase unknown people: crops, embedding, cameras and times", "unknowns")
    forget.add_argument("unknown_ids", nargs="*", metavar="UNKNOWN_ID")
    forget.add_argument("--all", action="store_true", help="every unknown person the server keeps")
    forget.set_defaults(func=_unknowns_forget)


def _capabilities(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from facelink.v1 import recognition_pb2, recognition_pb2_grpc

    with _channel(args) as channel:
        reply = _rpc(recognition_pb2_grpc.RecognitionStub(channel).GetCapabilities, recognition_pb2.GetCapabilitiesRequest())
    print(json_format.MessageToJson(reply))
    return 0


def _add_clients(cmds: argparse._SubParsersAction) -> None:
    from facelink.transport import add_client_security_arguments

    def client_parser(name: str, help_text: str, scope: str) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help_text, description=f"{help_text} (needs the scope '{scope}')")
        p.add_argument("--server", default="localhost:50051", help="host:port of the service (default localhost:50051)")
        add_client_security_arguments(p)
        _add_common(p)
        return p

    enroll = client_parser("enroll", "enroll a person from pictures (the server detects the face in each)", "enroll")
    enroll.add_argument("identity", help="the person's name")
    enroll.add_argument("pictures", nargs="+", type=Path, help="JPEG, PNG or WebP pictures")
    enroll.add_argument("--replace", action="store_true", help="replace the person's templates instead of adding")
    enroll.set_defaults(func=_enroll)
    remove = client_parser("remove", "erase a person: every template, derived template and metadata", "remove")
    remove.add_argument("identity")
    remove.set_defaults(func=_remove)
    client_parser("list", "list enrolled people", "read").set_defaults(func=_list)
    client_parser("capabilities", "print what the server accepts (codecs, models, limits) as JSON", "recognize").set_defaults(
        func=_capabilities
    )


def add_cloud_parser(sub: argparse._SubParsersAction) -> None:
    cloud = sub.add_parser(
        "cloud",
        help="run the gRPC service, manage its credentials, gallery and audit log",
        formatter_class=_FORMATTER,
        description="The cloud side: decode faces, recognise them, match against the gallery.",
        epilog="""\
examples:
  facelink cloud token create --gallery ./gallery ops --scope admin --out ops.token
  facelink cloud serve --gallery ./gallery --port 50051
  facelink cloud enroll Ada ada1.jpg ada2.jpg --server localhost:50051 --token-file ops.token
  facelink cloud list --server localhost:50051 --token-file ops.token
  facelink cloud remove Ada --server localhost:50051 --token-file ops.token
  facelink cloud unknowns list --server localhost:50051 --token-file ops.token
  facelink cloud audit --gallery ./gallery
  facelink cloud upgrade --gallery ./gallery --to edgeface-xs   # new recogniser, no re-enrollment""",
    )
    cmds = cloud.add_subparsers(
        dest="cloud_command", required=True, metavar="{serve,token,audit,enroll,remove,list,unknowns,capabilities,upgrade}"
    )
    _add_serve(cmds)
    _add_token(cmds)
    _add_audit(cmds)
    _add_clients(cmds)
    _add_unknowns(cmds)
    add_upgrade_parser(cmds)
