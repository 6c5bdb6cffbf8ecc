"""Recogniser upgrade without re-enrollment: the new model's probes against templates transformed
from the old model's stored embeddings, against native templates of the new model.

    facelink bench upgrade [-- --transform mobilefacenet-dlib-to-edgeface-xs --record]

The upgrade transform (`runtime/upgrade.py`, trained by `facelink.export.query.transforms` on the
training faces only) maps recogniser A's unit embedding into recogniser B's space. Rows (the probe
side is always B, what the upgraded server runs, except in the "before" row):

* `A native (before the upgrade)`: A probes against A templates: what the gallery served before;
* `B native (re-enrolled)`: B probes against B templates computed from the pictures: what a full
  re-enrollment would give;
* `B vs T(A) (upgraded, no re-enrollment)`: B probes against the transformed A templates;
* `B vs mixed gallery, x% transformed`: x% of the enrolled people (sha256-ranked names) hold
  transformed templates, the rest native ones -- a gallery part-way through lazy re-enrollment,
  where transformed and native templates compete for the same probe;
* `through the gallery`: the same as the upgraded row, but through `facelink cloud upgrade`'s
  own path: a real `Gallery` enrolled with A's embeddings, `upgrade_gallery`, then
  `Gallery.search` with B probes. It also times the upgrade (templates per second).

Protocols and sets are `facelink bench asymmetric`'s (`benchmarks/asymmetric.py`): LFW View 2 pairs
(first image = probe side) and LFW 1:N over the people ALL of whose pictures pairs.txt references
(no training run saw them); CelebA-dev's 32 held-out identities. Embeddings come from the same
cache. Target: transformed templates reach >= 98% of native B templates' LFW 1:N rank-1.

`--record` writes the LFW figures into the transform manifest's `training.measured`, which
`facelink cloud upgrade` prints before it changes anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from facelink.config import BackendConfig, DetectorConfig
from facelink.datasets import DatasetNotFoundError

from . import reporting
from .asymmetric import (
    DEFAULT_SPLITS,
    DIR_FAR,
    SETS,
    EvalSet,
    Row,
    celeba_set,
    embed_set,
    evaluate_row,
    finish_celeba,
    lfw_set,
    set_table,
)

log = logging.getLogger(__name__)

DEFAULT_TRANSFORM = "mobilefacenet-dlib-to-edgeface-xs"  # the multi-source one; --transform mobilefacenet-to-edgeface-xs for A alone
DEFAULT_JSON = reporting.RESULTS_DIR / "upgrade.json"
RANK1_TARGET = 0.98  # transformed templates' rank-1 as a share of native templates'
MIXED = (0.25, 0.5, 0.75)


def transformed_identities(identities: list[str], fraction: float) -> set[str]:
    """The `fraction` of `identities` ranked first by sha256("upgrade:<identity>"): deterministic."""
    ranked = sorted(set(identities), key=lambda i: hashlib.sha256(f"upgrade:{i}".encode()).hexdigest())
    return set(ranked[: round(fraction * len(ranked))])


def build_rows(upgrade: Any, olds: dict[str, np.ndarray], b: np.ndarray, evalset: EvalSet,
               mixed: tuple[float, ...]) -> list[Row]:
    """`olds`: every source model's embeddings of the images (a multi-source upgrade reads them all)."""
    source, target = upgrade.source_model, upgrade.target_model
    a = olds[source]
    t = upgrade.ensemble.transform(olds).vectors
    label = " + ".join(f"T({m})" for m in olds)
    rows = [
        Row("A native (before the upgrade)", "before", source, f"{source} (from pictures)", a, a),
        Row("B native (re-enrolled)", "native", target, f"{target} (from pictures)", b, b),
        Row("B vs T(A) (upgraded, no re-enrollment)", "transformed", target, f"{label} -> {target}", b, t),
    ]
    if len(olds) > 1:  # what the primary source alone gives through the same manifest (a picture lacking the others)
        rows.append(Row(f"B vs T({source}) only (the other sources missing)", "primary-only", target,
                        f"T({source}) -> {target}", b, upgrade.ensemble.transform({source: a}).vectors))
    enrolled = [str(i) for i in evalset.open_set.enrolled] if evalset.open_set is not None else []
    for fraction in mixed:
        chosen = transformed_identities(enrolled, fraction)
        use_t = np.array([identity in chosen for identity in evalset.identities], dtype=bool)
        gallery = np.where(use_t[:, None], t, b)
        rows.append(Row(f"B vs mixed gallery, {fraction:.0%} transformed", "mixed", target,
                        f"{len(chosen)} of {len(enrolled)} people {label}, the rest native", b, gallery))
    return rows


def through_gallery(upgrade: Any, olds: dict[str, np.ndarray], b: np.ndarray, evalset: EvalSet) -> dict[str, Any]:
    """Enroll the 1:N gallery with the old models' embeddings into a real Gallery, upgrade it as the
    CLI does, search B probes: rank-1 over the genuine probes, and the upgrade's time."""
    from facelink.cloud.gallery import Gallery
    from facelink.cloud.upgrade import upgrade_gallery

    o = evalset.open_set
    assert o is not None
    with tempfile.TemporaryDirectory(prefix="facelink-upgrade-") as folder, Gallery(folder) as gallery:
        for position, image in enumerate(o.gallery):
            gallery.enroll_pictures(f"person-{position:05d}", {m: e[image][None] for m, e in olds.items()})
        report = upgrade_gallery(gallery, upgrade)
        found = gallery.search(upgrade.target_model, b[o.genuine], k=1)
        templates = [r for r in gallery.templates_of("person-00000") if r.model_id == upgrade.target_model]
    predicted = np.array([int(m[0].identity.split("-")[1]) if m else -1 for m in found])
    return {"rank1": float(100 * np.mean(predicted == o.target)), "templates": report.transformed,
            "seconds": report.seconds, "templates_per_s": report.templates_per_s,
            "reason_stored": templates[0].reason if templates else None}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_kind = {r["kind"]: r for r in rows}
    native, transformed = by_kind["native"], by_kind["transformed"]
    out = {"rank1_native": native["rank1"], "rank1_transformed": transformed["rank1"],
           "rank1_ratio": transformed["rank1"] / native["rank1"] if native["rank1"] else float("nan"),
           "rank1_before": by_kind["before"]["rank1"]}
    if "dir_at_far" in native:
        out.update(dir_native=native["dir_at_far"], dir_transformed=transformed["dir_at_far"],
                   dir_before=by_kind["before"]["dir_at_far"])
    out["met"] = bool(out["rank1_ratio"] >= RANK1_TARGET)
    return out


def record(upgrade: Any, lfw: dict[str, Any], command: str, date: str) -> None:
    """The LFW figures into the transform manifest's training.measured (what the CLI prints)."""
    data = json.loads(upgrade.path.read_text())
    data["training"]["measured"] = {
        "set": "LFW 1:N, people no training run saw (facelink bench upgrade)", "command": command, "date": date,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in lfw["summary"].items()},
    }
    tmp = upgrade.path.with_name(upgrade.path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(upgrade.path)


def format_report(payload: dict[str, Any]) -> str:
    machine = payload["machine"]
    u = payload["upgrade"]
    lines = [
        f"command: {payload['command']}",
        f"{reporting.machine_line(machine)}; date: {payload['date_human']}",
        (f"upgrade: {' + '.join(u.get('source_models', [u['source_model']]))} (A) -> {u['target_model']} (B) "
         f"through {u['manifest']}"),
    ]
    costs: dict[str, dict] = {u["source_model"]: {}, u["target_model"]: {}}
    for result in payload["sets"].values():
        o = result["open_set"]
        lines += ["", f"## {result['title']}", "",
                  (f"1:N: {o['gallery']} enrolled, {o['genuine_probes']} genuine probes, {o['distractors']} distractors; "
                   f"{result['pairs']} verification pairs."), ""]
        lines += set_table(result, costs, {})
        s = result["summary"]
        verdict = (f"- transformed vs native B templates: rank-1 {s['rank1_transformed']:.2f}% vs {s['rank1_native']:.2f}% "
                   f"= {100 * s['rank1_ratio']:.1f}% of native (target >= {100 * RANK1_TARGET:.0f}%: "
                   f"{'met' if s['met'] else 'NOT met'}); before the upgrade (A native) {s['rank1_before']:.2f}%")
        if "dir_native" in s:
            verdict += (f"; DIR@FAR={DIR_FAR:.0%} {s['dir_transformed']:.2f}% vs {s['dir_native']:.2f}% native, "
                        f"{s['dir_before']:.2f}% before")
        lines += ["", verdict]
        g = result.get("through_gallery")
        if g:
            lines.append(f"- through the gallery (Gallery + upgrade_gallery + search): rank-1 {g['rank1']:.2f}%; "
                         f"{g['templates']} templates transformed in {g['seconds']:.3f} s ({g['templates_per_s']:,.0f}/s)")
    lines += ["", ("rank-1: closed set over genuine probes; DIR@FAR=1%: correct and above the threshold 1% of the "
                   "distractors pass; accuracy: 10-fold, first image of a pair on the probe side (B), second on the "
                   "gallery side.")]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench upgrade", formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="""\
examples:
  facelink bench upgrade
  facelink bench upgrade -- --record             # and write the LFW figures into the manifest
  facelink bench upgrade -- --transform mobilefacenet-to-edgeface-xs --json /tmp/upgrade-single.json   # A alone
  facelink bench upgrade -- --sets lfw --limit-pairs 2 --limit-people 20   # smoke test""")
    p.add_argument("--transform", default=DEFAULT_TRANSFORM, help=f"upgrade manifest, name or path (default {DEFAULT_TRANSFORM})")
    p.add_argument("--from-manifest", help="manifest of the old recogniser A, the primary source (default: the bundled "
                                            "one with its model id; other sources always the bundled ones)")
    p.add_argument("--to-manifest", help="manifest of the new recogniser B (default: the one the transform names)")
    p.add_argument("--sets", default="lfw,celeba", help="lfw, celeba or both (default both)")
    p.add_argument("--data", help="LFW folder (default: $FACELINK_DATA, ../shared/data/lfw, the cache)")
    p.add_argument("--celeba-data", help="CelebA-dev folder (default ../shared/data/celeba-dev)")
    p.add_argument("--limit-pairs", type=int, metavar="N", help="LFW: first N same + N different pairs per fold (tests)")
    p.add_argument("--limit-people", type=int, metavar="N", help="1:N: first N enrolled and N one-picture people (tests)")
    p.add_argument("--record", action="store_true", help="write the LFW figures into the transform manifest")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--no-cache", action="store_true", help="recompute every embedding")
    return p


def _recognizers(upgrade: Any, from_manifest: str | None, to_manifest: str | None, backend: BackendConfig) -> dict[str, Any]:
    from facelink.runtime.manifest import ManifestError, bundled_manifests, load_manifest
    from facelink.runtime.recognition import create_recognizer

    sources = []
    for position, spec in enumerate(upgrade.manifest.transforms):
        if position == 0 and from_manifest is not None:
            sources.append(from_manifest)
            continue
        match = [p for p in sorted(bundled_manifests().values()) if load_manifest(p).model_id == spec.gallery_model
                 and load_manifest(p).sha256 in (None, spec.gallery_sha256)]
        if not match:
            raise ManifestError(f"no bundled manifest for {spec.gallery_model}: pass --from-manifest")
        sources.append(str(match[0]))
    if to_manifest is None:
        reference = upgrade.manifest.query_manifest or ""
        to_manifest = str(upgrade.path.parent / reference) if reference.endswith(".json") else reference
    olds, b = [create_recognizer(m, backend) for m in sources], create_recognizer(to_manifest, backend)
    if ([a.model_id for a in olds], b.model_id) != (list(upgrade.source_models), upgrade.target_model):
        raise ManifestError(f"{upgrade.path} maps {' + '.join(upgrade.source_models)} -> {upgrade.target_model}, "
                            f"the manifests are {' + '.join(a.model_id for a in olds)} -> {b.model_id}")
    return {**{a.model_id: a for a in olds}, b.model_id: b}


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["facelink", "bench", "upgrade", *argv])
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SETS):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    if args.record and "lfw" not in sets:
        parser.error("--record records the LFW figures: include lfw in --sets")

    from facelink.runtime.detection import create_detector
    from facelink.runtime.manifest import ManifestError
    from facelink.runtime.upgrade import load_upgrade

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    backend = BackendConfig(intra_op_threads=1)
    try:
        upgrade = load_upgrade(args.transform, backend)
        recognizers = _recognizers(upgrade, args.from_manifest, args.to_manifest, backend)
        evalsets = [lfw_set(args.data, "unseen", args.limit_pairs, args.limit_people) if name == "lfw"
                    else celeba_set(args.celeba_data, list(DEFAULT_SPLITS), args.limit_people) for name in sets]
    except (ManifestError, DatasetNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    detector_config = DetectorConfig()
    detector = create_detector(detector_config)
    results: dict[str, Any] = {}
    load_start = os.getloadavg()
    for evalset in evalsets:
        embedded, _ = embed_set(evalset, recognizers, detector, detector_config, args.no_cache)
        if evalset.name == "celeba":
            finish_celeba(evalset, next(iter(embedded.values())).detected)
        olds = {m: embedded[m].embeddings for m in upgrade.source_models}
        b = embedded[upgrade.target_model].embeddings
        rows = [evaluate_row(row, evalset) for row in build_rows(upgrade, olds, b, evalset, MIXED)]
        assert evalset.open_set is not None
        results[evalset.name] = {"title": evalset.title, "protocol": evalset.protocol, "images": len(evalset.images),
                                 "pairs": len(evalset.pairs), "open_set": evalset.open_set.summary(), "rows": rows,
                                 "summary": summary(rows), "through_gallery": through_gallery(upgrade, olds, b, evalset)}
    now = datetime.now(timezone.utc)
    payload = {
        "benchmark": "upgrade", "command": command, "date": reporting.utc_now(),
        "date_human": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": reporting.machine_info(intra_op_threads=1, load_average_start=[round(x, 2) for x in load_start],
                                          load_average_end=[round(x, 2) for x in os.getloadavg()]),
        "upgrade": {"manifest": str(upgrade.path), "source_model": upgrade.source_model,
                    "source_models": list(upgrade.source_models),
                    "target_model": upgrade.target_model, "training": upgrade.manifest.training.get("command")},
        "target_rank1_ratio": RANK1_TARGET,
        "sets": results,
    }
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    if args.record:
        record(upgrade, results["lfw"], command, payload["date"])
        print(f"recorded the LFW figures in {upgrade.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
