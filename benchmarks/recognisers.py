"""The cloud's recognisers compared on one protocol: which one `auto` should take, and its threshold.

Per recogniser (default: the three EdgeFace manifests and MobileFaceNet), on LFW:

* verification: View 2 (pairs.txt, 6,000 pairs, 10 folds), the model on both sides, the metrics
  of `verification` (10-fold accuracy, TAR at FAR=1e-3, EER);
* 1:N open set: exactly the `<model> symmetric` rows of `asymmetric` (its `lfw_set`, `embed_set`
  and `evaluate_row`): by default over the people no facelink training run saw (`--lfw-people
  unseen`: 1,065 enrolled with their first picture, 1,679 genuine probes, 2,653 distractors);
  rank-1 and DIR at FAR=1% (the threshold passing 1% of the distractors' best scores);
* storage: the same metrics with every embedding round-tripped through float16 (`--storage`), to
  measure what a gallery stored at half the bytes would cost;
* threshold calibration: where the manifest's match threshold sits (View 2 impostor pairs above
  it, 1:1 TAR there, and in 1:N the distractors whose best score passes it and the DIR there),
  and the rule that gave MobileFaceNet's 0.40 applied to each model: the highest View 2
  impostor score rounded UP to the next multiple of 0.05 (`calibrated_threshold`), so that no
  impostor pair of View 2 passes, with the 1:1 threshold at FAR=1e-3 below it.

Cost per face: parameters and multiply-accumulates counted on the ONNX graph (x2 with the flip
pass), and ms per face (align + forward, flip pass included) on one core, the models taking
turns face by face over `--timing-faces` LFW faces so that load changes hit them alike
(`asymmetric.time_models`; the load average is recorded: on a busy machine the ms are an upper
bound, their ratios are what to read). Run it under the timing lock; the embeddings are cached
after the first run, so a rerun is evaluation and timing only.

Embeddings come from (and fill) `asymmetric`'s cache (the same keys), so this benchmark and
`facelink bench asymmetric` never embed a picture twice.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from facelink.config import BackendConfig, DetectorConfig
from facelink.datasets import DatasetNotFoundError

from . import reporting

DEFAULT_JSON = reporting.RESULTS_DIR / "recognisers.json"
DEFAULT_RECOGNIZERS = ("edgeface-xs", "edgeface-xs-int8", "edgeface-xxs", "mobilefacenet")
STORAGE = ("float32", "float16")
#: The step a calibrated threshold is rounded up to (MobileFaceNet's 0.40 is on it).
THRESHOLD_STEP = 0.05


def stored(embeddings: np.ndarray, dtype: str) -> np.ndarray:
    """Embeddings as a gallery holding them in `dtype` gives them back (float32 to compute with)."""
    return np.asarray(embeddings).astype(dtype).astype(np.float32)


def calibrated_threshold(impostor_scores: np.ndarray, step: float = THRESHOLD_STEP) -> float:
    """The highest impostor score rounded up to the next multiple of `step` (strictly above it)."""
    top = float(np.max(impostor_scores))
    return round(math.floor(top / step + 1) * step, 6)


def at_threshold(scores: np.ndarray, same: np.ndarray, genuine_1n: np.ndarray, target: np.ndarray,
                 distractors_1n: np.ndarray, threshold: float) -> dict[str, float]:
    """1:1 and 1:N figures at one match threshold (accept: cosine >= threshold)."""
    from .open_set import identification

    correct, true = identification(genuine_1n, target)
    best = distractors_1n.max(axis=1) if distractors_1n.size else np.zeros(0)
    return {
        "threshold": float(threshold),
        "impostor_pairs_above": int(np.sum(scores[~same] >= threshold)),
        "tar": float(100 * np.mean(scores[same] >= threshold)),
        "dir": float(100 * np.mean(correct & (true >= threshold))),
        "distractors_accepted": int(np.sum(best >= threshold)),
        "distractor_far": float(100 * np.mean(best >= threshold)) if best.size else float("nan"),
    }


def evaluate(recognizer, embeddings: np.ndarray, evalset, dtype: str) -> dict[str, Any]:  # noqa: ANN001
    """One recogniser at one storage precision: verification, 1:N and its threshold calibration."""
    from .asymmetric import Row, evaluate_row, pair_scores
    from .open_set import cosine_matrix

    e = stored(embeddings, dtype)
    row = evaluate_row(Row(f"{recognizer.model_id} symmetric", "symmetric", recognizer.model_id,
                           recognizer.model_id, e, e), evalset)
    index = {p: i for i, p in enumerate(evalset.images)}
    a = np.array([index[p.a] for p in evalset.pairs])
    b = np.array([index[p.b] for p in evalset.pairs])
    same = np.array([p.same for p in evalset.pairs])
    scores = pair_scores(e, e, a, b)
    o = evalset.open_set
    genuine = cosine_matrix(e[o.genuine], e[o.gallery])
    distractors = cosine_matrix(e[o.distractors], e[o.gallery]) if o.distractors.size else np.zeros((0, 1))
    calibrated = calibrated_threshold(scores[~same])
    return {
        "recognizer": recognizer.model_id,
        "storage": dtype,
        "dim": int(e.shape[1]),
        "bytes_per_embedding": int(e.shape[1] * np.dtype(dtype).itemsize),
        **row["verification"],
        "rank1": row["rank1"],
        "dir_at_far": row.get("dir_at_far"),
        "dir_threshold": row.get("dir_threshold"),
        "distractors_allowed": row.get("distractors_allowed"),
        "max_impostor_score": float(np.max(scores[~same])),
        "at_manifest_threshold": at_threshold(scores, same, genuine, o.target, distractors,
                                              recognizer.match_threshold),
        "calibrated_threshold": calibrated,
        "at_calibrated_threshold": at_threshold(scores, same, genuine, o.target, distractors, calibrated),
    }


def format_report(rows: list[dict[str, Any]], payload: dict[str, Any]) -> str:
    header = ["recogniser", "storage", "LFW View 2 %", "TAR@FAR=1e-3", "1:N rank-1 %", "DIR@FAR=1% %",
              "max impostor", "manifest thr.: impostors / TAR / DIR / distractor FAR", "calibrated thr."]
    costs, timings = payload.get("costs", {}), payload.get("timings", {})
    cost_rows = [[
        model, f"{c['params'] / 1e6:.2f} M" if "params" in c else "-",
        f"{c['macs_per_face'] / 1e6:.0f} M" if "macs_per_face" in c else "-",
        f"{timings[model]['ms_median']:.2f} ({timings[model]['ms_p10']:.2f}-{timings[model]['ms_p90']:.2f})"
        if model in timings else "-",
    ] for model, c in costs.items()]
    table = [[
        r["recognizer"], f"{r['storage']} ({r['bytes_per_embedding']} B)",
        f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}", f"{r['tar_at_far']:.2f}", f"{r['rank1']:.2f}",
        "-" if r["dir_at_far"] is None else f"{r['dir_at_far']:.2f}", f"{r['max_impostor_score']:.3f}",
        "{threshold:.2f}: {impostor_pairs_above} / {tar:.2f} / {dir:.2f} / {distractor_far:.2f}%".format(
            **r["at_manifest_threshold"]),
        f"{r['calibrated_threshold']:.2f}",
    ] for r in rows]
    o = payload["open_set"]
    return "\n".join([
        f"command: {payload['command']}",
        f"{reporting.machine_line(payload['machine'])}; date: {payload['date']}",
        f"data: LFW View 2 ({payload['pairs']} pairs); 1:N over {payload['lfw_people']} people: {o['gallery']} "
        f"enrolled, {o['genuine_probes']} genuine probes, {o['distractors']} distractors; detector "
        f"{payload['detector']}, edge path on the original pictures, flip pass as each manifest says",
        "",
        *reporting.markdown_table(header, table),
        "",
        "calibrated thr.: the highest View 2 impostor score rounded up to the next 0.05 (the rule that gives "
        "MobileFaceNet's 0.40).",
        *(["", *reporting.markdown_table(["recogniser", "parameters", "MACs per face", "ms per face, median (p10-p90)"],
                                         cost_rows),
           "", f"ms per face: align + forward (flip pass included), 1 thread, the models taking turns over "
               f"{next(iter(timings.values()))['faces']} LFW faces; 1-min load average before/after: "
               f"{next(iter(timings.values()))['load_average_1min']} on {payload['machine']['cores']} cores"]
          if timings else []),
    ])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench recognisers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
The cloud's recognisers on one protocol: LFW View 2 verification and the 1:N open set of
`facelink bench asymmetric` (rank-1, DIR at FAR=1%, LFW people no training run saw), each with
embeddings stored as float32 and as float16, and where each manifest's match threshold sits
(View 2 impostors above it, 1:1 TAR, 1:N DIR and distractor FAR) next to the threshold
MobileFaceNet's rule gives (highest View 2 impostor score rounded up to 0.05).
Embeddings are shared with `facelink bench asymmetric`'s cache (~/.cache/facelink/embeddings/).""",
        epilog="""\
examples:
  facelink bench recognisers
  facelink bench recognisers -- --recognizer edgeface-xs --recognizer mobilefacenet
  facelink bench recognisers -- --limit-pairs 2 --limit-people 20 --json /tmp/r.json   # smoke test""",
    )
    p.add_argument("--recognizer", action="append", metavar="NAME",
                   help=f"manifest name or path, repeatable (default: {', '.join(DEFAULT_RECOGNIZERS)})")
    p.add_argument("--storage", default=",".join(STORAGE),
                   help=f"embedding precisions to evaluate, comma-separated: {', '.join(STORAGE)} (default both)")
    p.add_argument("--data", help="LFW folder (default: $FACELINK_DATA, ../shared/data/lfw, the cache)")
    p.add_argument("--lfw-people", choices=("unseen", "all"), default="unseen",
                   help="1:N over people no training run saw (default), or over all of LFW")
    p.add_argument("--limit-pairs", type=int, metavar="N", help="first N same + N different pairs per fold (tests)")
    p.add_argument("--limit-people", type=int, metavar="N", help="1:N: first N enrolled and N one-picture people (tests)")
    p.add_argument("--timing-faces", type=int, default=200,
                   help="faces timed per model, the models taking turns (default 200; 0 = skip)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--no-cache", action="store_true", help="recompute every embedding (the cache is then refreshed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["facelink", "bench", "recognisers", *argv])
    storage = [s.strip() for s in args.storage.split(",") if s.strip()]
    if not storage or set(storage) - set(STORAGE):
        parser.error(f"--storage: choose from {', '.join(STORAGE)}")
    if args.timing_faces < 0:
        parser.error("--timing-faces must be >= 0")
    for option in ("limit_pairs", "limit_people"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")

    from facelink.runtime.detection import create_detector
    from facelink.runtime.manifest import ManifestError
    from facelink.runtime.recognition import create_recognizer

    from .asymmetric import embed_set, lfw_set, model_cost, time_models, timing_faces

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    backend = BackendConfig(intra_op_threads=1)
    recognizers = {}
    for name in dict.fromkeys(args.recognizer or DEFAULT_RECOGNIZERS):
        try:
            recognizer = create_recognizer(name, backend)
        except (ManifestError, FileNotFoundError, ImportError, RuntimeError) as error:
            print(f"error: recogniser {name!r}: {error}", file=sys.stderr)
            return 2
        recognizers[recognizer.model_id] = recognizer
    try:
        evalset = lfw_set(args.data, args.lfw_people, args.limit_pairs, args.limit_people)
    except (DatasetNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    detector_config = DetectorConfig()
    detector = create_detector(detector_config)
    started = time.perf_counter()
    embedded, computed = embed_set(evalset, recognizers, detector, detector_config, args.no_cache)
    seconds = time.perf_counter() - started
    rows = [evaluate(r, embedded[mid].embeddings, evalset, dtype) for mid, r in recognizers.items() for dtype in storage]
    costs = {mid: model_cost(r) for mid, r in recognizers.items()}
    timings = time_models(recognizers, timing_faces(evalset, detector, args.timing_faces)) if args.timing_faces else {}
    assert evalset.open_set is not None
    payload = {
        "benchmark": "recognisers",
        "command": command,
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(intra_op_threads=1, shared_with="niced background jobs of other work"),
        "detector": getattr(getattr(detector, "manifest", None), "model_id", None) or detector.name,
        "protocol": evalset.protocol,
        "lfw_people": args.lfw_people,
        "pairs": len(evalset.pairs),
        "images": len(evalset.images),
        "faces_not_detected": int((~next(iter(embedded.values())).detected).sum()),
        "open_set": evalset.open_set.summary(),
        "threshold_rule": f"highest View 2 impostor score rounded up to the next {THRESHOLD_STEP}",
        "embedding_seconds": seconds,
        "embedding_settings_computed": computed,
        "rows": rows,
        "costs": costs,
        "timings": timings,
    }
    print(format_report(rows, payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
