"""`facelink cloud upgrade`: serve a gallery with a new recogniser without re-enrolling anyone."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from pathlib import Path

from .cli_common import FORMATTER, add_common


def _upgrade(args: argparse.Namespace) -> int:
    from facelink.cloud.audit import AuditError, AuditLog
    from facelink.cloud.gallery import Gallery, GalleryError
    from facelink.cloud.upgrade import upgrade_gallery
    from facelink.runtime.manifest import ManifestError, load_manifest
    from facelink.runtime.upgrade import bundled_upgrades, find_upgrade, load_upgrade

    if not (args.gallery / "gallery.sqlite3").is_file():
        print(f"error: no gallery at {args.gallery} (gallery.sqlite3 not found)", file=sys.stderr)
        return 2
    upgraded = False
    try:
        with Gallery(args.gallery) as gallery:
            if args.transform:
                upgrade = load_upgrade(args.transform)
                if upgrade.target_model != load_manifest(args.to).model_id:
                    raise ManifestError(f"{upgrade.path} maps into {upgrade.target_model}, not into {args.to}")
            else:
                stored = {load_manifest(p).model_id for p in bundled_manifests_of_recognizers()}
                stored = {m for m in stored if gallery.dim(m) is not None}
                upgrade = find_upgrade(args.to, stored)
            if all(gallery.dim(m) is None for m in upgrade.source_models):
                raise ManifestError(f"the gallery holds no {' or '.join(upgrade.source_models)} template to transform")
            sources = " + ".join(upgrade.source_models)
            print(f"upgrade: {sources} -> {upgrade.target_model} through {upgrade.path.name} "
                  f"(bundled: {', '.join(sorted(bundled_upgrades())) or 'none'})")
            _print_measured(upgrade.measured, upgrade.target_model)
            if args.dry_run:
                print("dry run: nothing changed")
                return 0
            # An admin change to biometric templates is audited as the service's are: the intent
            # before the gallery commits, the outcome after; no audit log, no upgrade.
            with AuditLog(args.audit_file or args.gallery / "audit.jsonl") as audit:
                def record(outcome: str, counts: dict[str, int] | None = None) -> None:
                    audit.record(principal=f"local:{getpass.getuser()}", peer="cli", call="admin:upgrade",
                                 identity=None, outcome=outcome, counts=counts,
                                 detail=f"{sources} -> {upgrade.target_model} by {upgrade.manifest.name}")

                record("started")
                try:
                    report = upgrade_gallery(gallery, upgrade)
                except (ManifestError, GalleryError):
                    record("failed")
                    raise
                upgraded = True
                record("ok", {"transformed": report.transformed, "native": report.native})
    except AuditError as error:
        done = "the upgrade is done but its outcome is not recorded" if upgraded else "nothing was upgraded"
        print(f"error: the audit log cannot be written ({done}): {error}", file=sys.stderr)
        return 2
    except (ManifestError, GalleryError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"done in {report.seconds:.2f} s ({report.templates_per_s:,.0f} templates/s): {report.identities} identities, "
          f"{report.transformed} {upgrade.target_model} templates transformed from {sources}, "
          f"{report.native} native ones kept. No picture was read.")
    print(f"serve it with:  facelink cloud serve --gallery {args.gallery} --recognizer {args.to}\n"
          "New enrollments store native templates; re-enrolling a person (replace) drops their transformed ones. "
          "`facelink cloud upgrade` again re-derives the transformed ones and keeps the native ones.")
    return 0


def bundled_manifests_of_recognizers() -> list[Path]:
    from facelink.runtime.manifest import bundled_manifests, load_manifest

    return [p for p in bundled_manifests().values() if load_manifest(p).task == "recognition"]


def _print_measured(measured: dict, target: str) -> None:
    if not measured:
        print("measured accuracy: none recorded in the manifest (facelink bench upgrade -- --record measures it)")
        return
    keys = ("rank1_transformed", "rank1_native", "rank1_ratio", "dir_transformed", "dir_native")
    if all(k in measured for k in keys):
        print(f"measured ({measured.get('set', 'LFW 1:N')}; {measured.get('date', '?')}): {target} probes against "
              f"transformed templates: rank-1 {measured['rank1_transformed']:.2f}% vs {measured['rank1_native']:.2f}% "
              f"native ({100 * measured['rank1_ratio']:.1f}% of native), DIR@FAR=1% {measured['dir_transformed']:.2f}% "
              f"vs {measured['dir_native']:.2f}%"
              + (f"; before the upgrade (the old model on both sides) rank-1 {measured['rank1_before']:.2f}%, "
                 f"DIR {measured['dir_before']:.2f}%" if "rank1_before" in measured and "dir_before" in measured else ""))
    else:
        print("measured: " + json.dumps(measured))


def add_upgrade_parser(cmds: argparse._SubParsersAction) -> None:
    p = cmds.add_parser(
        "upgrade",
        help="serve a gallery with a new recogniser, without re-enrollment (transformed templates)",
        formatter_class=FORMATTER,
        description="""\
Give every enrolled picture a template of recogniser --to, transformed from the embedding the
gallery stores for the old recogniser (a learned map, runtime/manifests/upgrades/): nobody is
re-enrolled and no picture is read. Where the gallery also stores dlib ResNet embeddings (a
default server does), the multi-source upgrade maps both and averages them: more accurate.
Templates enrolled natively with --to are kept; transformed
ones are marked ("transformed from ...") in their reason. Run it with the server stopped, then
start the server with --recognizer set to the new model. It prints what the transform measurably
costs in accuracy (transformed vs native templates, LFW 1:N), as its manifest records it.

Lazily native: every later enrollment stores the new model's own template; re-enrolling a person
with replace drops their transformed templates. People never enrolled again stay transformed.""",
        epilog="""\
examples:
  facelink cloud upgrade --gallery ./gallery --to edgeface-xs --dry-run
  facelink cloud upgrade --gallery ./gallery --to edgeface-xs
  facelink cloud serve --gallery ./gallery --recognizer edgeface-xs""",
    )
    p.add_argument("--gallery", type=Path, default=Path("gallery"), help="the gallery folder (default ./gallery)")
    p.add_argument("--to", required=True, metavar="MODEL", help="the new recogniser: manifest name or path")
    p.add_argument("--transform", metavar="MANIFEST",
                   help="upgrade transform manifest (default: the bundled one into MODEL from a model the gallery stores)")
    p.add_argument("--audit-file", type=Path, help="the audit log (default GALLERY/audit.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="say what would be done and what it costs; change nothing")
    add_common(p)
    p.set_defaults(func=_upgrade)
