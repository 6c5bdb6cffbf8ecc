"""Asymmetric face recognition: a small query model on the device against a gallery built in the
cloud by larger models, mapped into the query model's space -- and gallery rejection by the
ensemble's uncertainty.

Rows (what the query side runs / what the gallery side stores):

* `query symmetric`: the query model on both sides;
* `<gallery model> symmetric`: each gallery model on both sides (in the bundled ensemble: MobileFaceNet,
  dlib ResNet, EdgeFace-XS);
* `query vs T(<gallery model>)`: asymmetric with one gallery model -- the query embedding against
  that model's embedding transformed into the query space (`runtime.asymmetric`);
* `query vs ensemble`: asymmetric with the ensemble gallery vector (the re-normalised mean of the
  unit transformed embeddings, `ensemble_mean`);
* `query vs sub-ensemble <members>`: every smaller ensemble of two or more members (the manifest's
  weights of those members), so each member's contribution is measured, not assumed;
* `distillation baseline`: the query model against RAW MobileFaceNet gallery embeddings, no
  transform. The query model is itself trained by distilling MobileFaceNet (export/query/train.py:
  1 - cos(query(view), MobileFaceNet(view))), so "a query model trained to mimic one gallery
  model" is the query model itself, matched directly against its teacher's gallery. No separate
  model is trained for this row.

Protocols, per set:

* verification: pairs scored by cosine, the FIRST image of each pair on the query side and the
  SECOND on the gallery side (symmetric rows: one model on both). `verification.fold_accuracy`
  (10 folds, threshold chosen on the other 9), `tar_at_far` at FAR=1e-3, `eer`.
* 1:N open set: gallery = the first image (by file name) of every person with two or more images;
  genuine probes = their other images; distractors = every image of the people with exactly one
  image (and, on CelebA, of the never-enrolled identities, below). Probes are query-side
  embeddings, the gallery gallery-side ones. Rank-1: closed set over the genuine probes (correct
  when the true gallery entry scores strictly above every other; a tie is an error). DIR at
  FAR=1%: the threshold lets through 1% of the distractors' best scores (`threshold_at_far`
  on them: floor(1% x distractors) may pass); DIR = genuine probes ranked correctly AND at or
  above it.
* rejection (ensemble row only): the gallery images are ranked by the ensemble's uncertainty
  (`disagreement` of the transformed embeddings), and the most uncertain fraction r (0..30%) is
  dropped with `RejectionPolicy(r, "drop")`. The selective risk at r is the rank-1 error over
  the genuine probes whose identity is still enrolled, matched against the remaining gallery
  (risk-coverage curve). Control: the same with a random order (mean and spread over
  `--random-repeats` orders; random rejection also lowers the risk a little, since it removes
  confusers). Also recorded: the open-set error at the threshold fixed at r = 0 (missed or wrong among
  retained genuine probes) and the distractors' false-accept rate against the remaining gallery.
  Reported: the relative error reduction at 10% (target: 17.4%).

Sets:

* `lfw`: verification = View 2 (pairs.txt, 6,000 pairs). 1:N over `--lfw-people`:
  `unseen` (default): only the people ALL of whose pictures pairs.txt references. facelink's
  training runs (query model, transforms, codec) use every LFW picture pairs.txt does NOT
  reference, so these 3,718 people (1,065 enrolled, 1,679 genuine probes, 2,653 distractors)
  were never seen by any of them, not even as an identity label.
  `all`: the issue's protocol on all 13,233 pictures (1,680 enrolled, 7,484 genuine, 4,069
  distractors) -- 5,532 of them are training pictures of the query model and of the transforms
  (whose shared classifier learned their identities): reported for comparison only.
  View 2 itself never contains a training picture, but 563 of its people have training pictures.
* `celeba`: the held-out identities of the training runs: the 32 identities that every query
  and codec run draws with `export.query.data.split_by_identity` (seed 0) and records in its
  split.json, copied to benchmarks/splits/celeba_held_out.json (the transforms are trained on
  that split too; `--celeba-split` takes run split.json files instead, intersected). Pictures
  where YuNet finds no face are left out (CelebA pictures are not aligned, so there is no
  fallback) and counted. Verification: `rate_accuracy.celeba_pairs` (10
  identity-disjoint folds, sha256-ranked pairs) on these pictures with the largest per-fold
  count of (300, 200, 100, 50) they can fill. 1:N: no held-out identity has a single picture, so
  the identities are ranked by sha256("asymmetric:<seed>:<identity>") and every second one is
  never enrolled (all its pictures are distractors); the others are enrolled with their first
  picture. A small set: 16 gallery entries, ~1-2 distractors allowed at FAR=1%, 1 image rejected
  at 10%: read its rejection figures as anecdotal.

Embeddings: every image of a set, for every model, is embedded once through the edge path of
`verification.embed_all` (YuNet, the face nearest the centre, each model's own alignment from
the original picture, flip pass as the manifest says) and cached like verification's cache
(`<cache>/embeddings/<model id>-<weights sha256[:12]>-none-q0-<image list + pipeline sha>.npz`).
The weights' hash is in the name because an interim and a final query model share a model id.

Query cost per row (the query side's model): parameters and multiply-accumulates counted on the
ONNX graph (`export.flops`; x2 when the manifest runs a flip pass), and ms per face (align +
forward, flip pass included) on one core: ONNX Runtime with 1 intra-op thread, median over
`--timing-faces` faces, the models taking turns face by face so that load changes hit them
alike. The load average is recorded with it: on a busy machine the ms are an upper bound.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from facelink.config import DEFAULT_QUERY_MODEL, BackendConfig, CanonicalCrop, DetectorConfig
from facelink.datasets import LFW, CelebADev, DatasetNotFoundError, Pair

from . import reporting
from .open_set import (
    OpenSet,
    RiskCoverage,
    cosine_matrix,
    dir_at_far,
    dir_threshold,
    identification,
    open_set_protocol,
    random_risk_coverage,
    rank1,
    rejection_fractions,
    relative_reduction,
    risk_coverage,
)
from .verification import (
    FAR_TARGET,
    NO_CODEC,
    Embedded,
    Job,
    cache_file,
    distinct_images,
    eer,
    embed_all,
    fold_accuracy,
    limit_pairs,
    load_cache,
    pipeline_digest,
    read_rgb,
    save_cache,
    tar_at_far,
    threshold_at_far,
)

log = logging.getLogger(__name__)

DEFAULT_JSON = reporting.RESULTS_DIR / "asymmetric.json"
DEFAULT_PLOT = reporting.RESULTS_DIR / "asymmetric_risk_coverage.png"
DEFAULT_ENSEMBLE = DEFAULT_QUERY_MODEL  # an ensemble manifest is named after its query model
DEFAULT_TEACHER = "mobilefacenet"
#: The held-out celeba-dev identities of every training run (their split.json files agree), in the
#: repository so the CelebA set needs no training run on this machine.
DEFAULT_SPLITS = (Path(__file__).parent / "splits" / "celeba_held_out.json",)
DIR_FAR = 0.01
REJECTION_AT = 0.10
REJECTION_TARGET = 0.174   # the published relative error reduction at 10% rejection
COST_TARGET = 4.0          # the query model must cost at least 4x fewer MACs than every gallery model
CELEBA_PAIRS_PER_FOLD = (300, 200, 100, 50)
CELEBA_SEED = 0
SETS = ("lfw", "celeba")


# -- verification (the shared metrics) ---------------------------------------------------------------
def pair_scores(query: np.ndarray, gallery: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """Cosine of query-side image a with gallery-side image b, per pair."""
    q = query[index_a].astype(np.float64)
    g = gallery[index_b].astype(np.float64)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", q, g)


def verification_metrics(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    accs, thresholds = fold_accuracy(scores, same, folds)
    return {
        "accuracy_mean": float(100 * accs.mean()),
        "accuracy_std": float(100 * accs.std()),
        "threshold_mean": float(thresholds.mean()),
        "tar_at_far": float(100 * tar_at_far(scores, same, FAR_TARGET)),
        "threshold_at_far": float(threshold_at_far(scores, same, FAR_TARGET)),
        "eer": float(100 * eer(scores, same)),
    }


# -- sets ---------------------------------------------------------------------------------------------
@dataclass
class EvalSet:
    """One data set: its images (embedded once), its identities and the protocol definitions."""

    name: str
    title: str
    image_dir: Path
    images: list[Path]
    identities: list[str]
    protocol: dict[str, Any]
    pairs: list[Pair] = field(default_factory=list)
    open_set: OpenSet | None = None
    kept: np.ndarray | None = None  # (N,) images the protocols may use (detected, on CelebA)
    names: list[str] = field(init=False, default_factory=list)  # image paths relative to image_dir

    def __post_init__(self) -> None:
        self.names = [_relative(p, self.image_dir) for p in self.images]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _first(items: Sequence, n: int | None) -> list:
    return list(items) if n is None else list(items)[:n]


def lfw_set(data: str | None, people: str, limit_pairs_n: int | None, limit_people: int | None) -> EvalSet:
    """LFW: View 2 pairs, and the 1:N protocol over `people` ("unseen" or "all", see the module doc)."""
    lfw = LFW.locate(data)
    all_pairs = lfw.pairs()
    pairs = limit_pairs(all_pairs, limit_pairs_n)
    test = lfw.pair_images()
    everyone = lfw.people()
    if people == "unseen":
        chosen = {name: images for name, images in everyone.items() if all(p in test for p in images)}
    elif people == "all":
        chosen = dict(everyone)
    else:
        raise ValueError(f"--lfw-people must be unseen or all, got {people!r}")
    if limit_people is not None:  # the first N enrolled and the first N one-picture people, by name
        multi = _first([n for n, images in chosen.items() if len(images) >= 2], limit_people)
        single = _first([n for n, images in chosen.items() if len(images) == 1], limit_people)
        chosen = {n: chosen[n] for n in sorted(multi + single)}
    one_to_n = [p for images in chosen.values() for p in images]
    images = sorted(set(distinct_images(pairs)) | set(one_to_n))
    identity = {p: name for name, paths in everyone.items() for p in paths}
    training_pictures = sum(1 for p in one_to_n if p not in test)
    evalset = EvalSet(
        "lfw", "LFW", lfw.image_dir, images, [identity[p] for p in images],
        {
            "verification": "View 2, pairs.txt: 10 folds x (300 same + 300 different); first image = query side",
            "limit_pairs": limit_pairs_n,
            "one_to_n_people": people,
            "one_to_n_rule": ("people all of whose pictures pairs.txt references (no facelink training run saw "
                              "them)" if people == "unseen" else
                              "every LFW person (includes the pictures the query model and transforms trained on)"),
            "limit_people": limit_people,
            "one_to_n_training_pictures": training_pictures,
            "root": str(lfw.root),
        },
    )
    evalset.pairs = pairs
    index = {p: i for i, p in enumerate(images)}
    members = [index[p] for p in one_to_n]
    sub = open_set_protocol([evalset.names[i] for i in members], [evalset.identities[i] for i in members])
    evalset.open_set = _reindex(sub, np.array(members, dtype=np.int64))
    evalset.kept = np.ones(len(images), dtype=bool)
    return evalset


def _reindex(open_set: OpenSet, members: np.ndarray) -> OpenSet:
    """An OpenSet over a subset (positions in `members`) -> over the whole set's images."""
    return OpenSet(members[open_set.gallery], open_set.enrolled, members[open_set.genuine], open_set.target,
                   members[open_set.distractors])


def held_out_identities(split_files: Sequence[Path]) -> tuple[list[str], list[dict[str, Any]]]:
    """The intersection of the `val_identities` of the given split.json files (the first is required)."""
    found, sources = None, []
    for i, path in enumerate(split_files):
        path = Path(path).expanduser()
        if not path.is_file():
            if i == 0:
                raise FileNotFoundError(f"{path} not found: the query run's held-out identities define the CelebA set "
                                        "(pass --celeba-split)")
            sources.append({"file": str(path), "present": False})
            continue
        values = set(json.loads(path.read_text())["val_identities"])
        sources.append({"file": str(path), "present": True, "identities": len(values)})
        found = values if found is None else found & values
    return sorted(found or ()), sources


def _hash_rank(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


def never_enrolled_half(identities: Collection[Hashable], seed: int = CELEBA_SEED) -> set:
    """Every second identity in sha256("asymmetric:<seed>:<identity>") order: CelebA's distractors."""
    ranked = sorted(set(identities), key=lambda i: _hash_rank("asymmetric", seed, i))
    return set(ranked[1::2])


def celeba_set(data: str | None, split_files: Sequence[Path], limit_people: int | None) -> EvalSet:
    celeba = CelebADev.locate(data)
    held, sources = held_out_identities(split_files)
    if not held:
        raise ValueError(f"no held-out identity in common between {', '.join(str(s) for s in split_files)}")
    wanted = {int(label.split(":", 1)[1]) for label in held}
    items = sorted(((p, i) for p, i in celeba.items() if i in wanted), key=lambda item: item[0].name)
    if limit_people is not None:
        keep_ids = sorted({i for _, i in items})[: 2 * limit_people]
        items = [(p, i) for p, i in items if i in keep_ids]
    return EvalSet(
        "celeba", "CelebA-dev held-out identities", celeba.image_dir, [p for p, _ in items],
        [f"celeba:{i}" for _, i in items],
        {"split_files": sources, "held_out_identities": held, "limit_people": limit_people, "root": str(celeba.root)},
    )


def finish_celeba(evalset: EvalSet, detected: np.ndarray) -> None:
    """CelebA's protocols, on the pictures where a face was found (known only after embedding)."""
    from .rate_accuracy import celeba_pairs  # the repository's one CelebA pairs protocol

    kept = np.asarray(detected, dtype=bool)
    evalset.kept = kept
    items = [(p, int(label.split(":", 1)[1])) for p, label, k in zip(evalset.images, evalset.identities, kept) if k]
    pairs, per_fold, problems = None, None, []
    for per_fold in CELEBA_PAIRS_PER_FOLD:
        try:
            pairs = celeba_pairs(items, seed=CELEBA_SEED, per_fold=per_fold)
            break
        except ValueError as error:
            problems.append(f"{per_fold}: {error}")
    evalset.pairs = pairs or []
    members = np.flatnonzero(kept)
    labels = [evalset.identities[i] for i in members]
    distractor_ids = never_enrolled_half(labels)
    sub = open_set_protocol([evalset.names[i] for i in members], labels, distractor_ids)
    evalset.open_set = _reindex(sub, members)
    evalset.protocol.update({
        "pictures": len(evalset.images),
        "pictures_without_face": int((~kept).sum()),
        "verification": (f"rate_accuracy.celeba_pairs(seed={CELEBA_SEED}, folds=10, per_fold={per_fold}): "
                         "identity-disjoint folds, sha256-ranked pairs; first image = query side")
        if pairs else f"no pairs protocol fits ({'; '.join(problems)})",
        "pairs_per_kind_per_fold": per_fold if pairs else None,
        "one_to_n_rule": ("identities ranked by sha256('asymmetric:0:<identity>'); every second one never "
                          "enrolled (all its pictures are distractors), the others enrolled with their first "
                          "picture by name"),
        "never_enrolled_identities": sorted(distractor_ids),
    })


# -- models ---------------------------------------------------------------------------------------------
def weights_sha(recognizer) -> str:  # noqa: ANN001
    manifest = recognizer.manifest
    if manifest.sha256:
        return manifest.sha256
    from facelink.runtime.manifest import file_sha256

    return file_sha256(manifest.weights(verify=False))


def cache_key(recognizer) -> str:  # noqa: ANN001
    """The model's id AND its weights: an interim and a final query model share a model id."""
    return f"{recognizer.model_id}-{weights_sha(recognizer)[:12]}"


@dataclass
class Models:
    ensemble: Any                     # runtime.asymmetric.GalleryEnsemble
    ensemble_path: Path
    query: Any                        # the query recogniser
    query_manifest: Path
    galleries: dict[str, Any]         # gallery model id -> recogniser, in the ensemble's order
    teacher: str                      # the gallery model id the query model was distilled from

    @property
    def all(self) -> dict[str, Any]:
        return {self.query.model_id: self.query, **self.galleries}


def find_ensemble(name_or_path: str) -> Path:
    from facelink.runtime.asymmetric import bundled_ensembles
    from facelink.runtime.manifest import ManifestError

    if name_or_path != "auto":
        if name_or_path.endswith(".json"):
            return Path(name_or_path).expanduser()
        bundled = bundled_ensembles()
        if name_or_path not in bundled:
            raise ManifestError(f"no bundled ensemble {name_or_path!r} (bundled: {', '.join(sorted(bundled)) or 'none'})")
        return bundled[name_or_path]
    bundled = bundled_ensembles()
    if DEFAULT_ENSEMBLE in bundled:
        return bundled[DEFAULT_ENSEMBLE]
    if len(bundled) == 1:
        return next(iter(bundled.values()))
    raise ManifestError(
        f"no query ensemble bundled (runtime/manifests/asymmetric/{DEFAULT_ENSEMBLE}.json"
        + (f"; several: {', '.join(sorted(bundled))}" if bundled else "")
        + "): pass --ensemble path/to/ensemble.json (made by python -m facelink.export.query.transforms)")


def load_models(ensemble_arg: str, query_arg: str | None, gallery_args: Sequence[str], teacher: str,
                backend: BackendConfig) -> Models:
    """The ensemble and its models, each checked against the weights the transforms were trained for."""
    from facelink.runtime.asymmetric import GalleryEnsemble, load_ensemble_manifest
    from facelink.runtime.manifest import ManifestError, bundled_manifests, load_manifest
    from facelink.runtime.recognition import create_recognizer

    path = find_ensemble(ensemble_arg)
    manifest, path = load_ensemble_manifest(path)
    if query_arg is None:
        if manifest.query_manifest is None:
            raise ManifestError(f"{path} names no query manifest: pass --query")
        reference = Path(manifest.query_manifest)
        query_arg = str(reference if reference.is_absolute() else (path.parent / reference).resolve()) \
            if reference.suffix == ".json" else manifest.query_manifest
    query = create_recognizer(query_arg, backend)
    if query.model_id != manifest.query_model:
        raise ManifestError(f"{path} maps into {manifest.query_model}, but the query manifest is {query.model_id}")
    if manifest.query_sha256 and weights_sha(query) != manifest.query_sha256:
        raise ManifestError(f"{path} was trained for {manifest.query_model} weights {manifest.query_sha256[:12]}, "
                            f"but {query_arg} has {weights_sha(query)[:12]}: its transforms would map elsewhere")
    # Gallery manifests: the given ones, else the bundled manifest with the transform's model id and weights.
    candidates = [load_manifest(g) for g in gallery_args] or [load_manifest(n) for n in sorted(bundled_manifests())]
    galleries: dict[str, Any] = {}
    for spec in manifest.transforms:
        match = [m for m in candidates if m.model_id == spec.gallery_model and m.task == "recognition"
                 and (spec.gallery_sha256 is None or m.sha256 in (None, spec.gallery_sha256))]
        if not match:
            raise ManifestError(f"no manifest for gallery model {spec.gallery_model}"
                                + (f" (weights {spec.gallery_sha256[:12]})" if spec.gallery_sha256 else "")
                                + ": pass --gallery path/to/manifest.json")
        galleries[spec.gallery_model] = create_recognizer(match[0].origin, backend)
    teacher_id = next((mid for mid, r in galleries.items() if teacher in (mid, r.manifest.name)), None)
    if teacher_id is None:
        raise ManifestError(f"the distillation teacher {teacher!r} is not one of the gallery models "
                            f"({', '.join(galleries)})")
    return Models(GalleryEnsemble(manifest, path.parent, backend), path, query, Path(query.manifest.origin),
                  galleries, teacher_id)


def model_cost(recognizer) -> dict[str, Any]:  # noqa: ANN001
    """Parameters and MACs counted on the model's ONNX graph (x2 with a flip pass)."""
    manifest = recognizer.manifest
    passes = 2 if manifest.embedding.flip_augmentation else 1
    out: dict[str, Any] = {"model": recognizer.model_id, "passes_per_face": passes}
    if manifest.format != "onnx":
        return {**out, "error": f"{manifest.format} model: no ONNX graph to count"}
    try:
        spec = manifest.input
        shape = (1, 3, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, 3)
        cost, how = count_graph(manifest.weights(), shape)
    except (ImportError, ValueError, OSError) as error:
        return {**out, "error": f"could not count: {error}"}
    return {**out, "params": int(cost.params), "macs_per_pass": int(cost.macs), "macs_per_face": int(cost.macs * passes),
            **({"counted_with": how} if how else {})}


def count_graph(path: Path, shape: tuple[int, ...]) -> tuple[Any, str | None]:
    """`export.flops.count_model`; for a graph whose shapes ONNX's strict inference cannot resolve
    (EdgeFace's reshapes are computed at run time), after ONNX Runtime's symbolic shape inference
    with the batch fixed to `shape`'s. Returns the cost and how it was counted (None: directly)."""
    from facelink.export.flops import count_model

    try:
        return count_model(path, shape), None
    except ValueError:
        import onnx
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        model = onnx.load(str(path))
        model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = shape[0]
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        return count_model(inferred, shape), "onnxruntime symbolic shape inference, then export.flops"



def time_models(recognizers: dict[str, Any], faces: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict]:
    """ms per face (align + forward, flip pass included), the models taking turns face by face."""
    times: dict[str, list[float]] = {name: [] for name in recognizers}
    if not faces:
        return {}
    for recognizer in recognizers.values():  # warm-up: first runs allocate
        for image, landmarks in faces[:3]:
            recognizer.embed(image, landmarks)
    load_before = os.getloadavg()
    for image, landmarks in faces:
        for name, recognizer in recognizers.items():
            started = time.perf_counter()
            recognizer.embed(image, landmarks)
            times[name].append((time.perf_counter() - started) * 1e3)
    load_after = os.getloadavg()
    return {name: {"ms_median": float(np.median(t)), "ms_p10": float(np.percentile(t, 10)),
                   "ms_p90": float(np.percentile(t, 90)), "faces": len(t),
                   "load_average_1min": [round(load_before[0], 2), round(load_after[0], 2)]}
            for name, t in times.items()}


def timing_faces(evalset: EvalSet, detector, n: int) -> list[tuple[np.ndarray, np.ndarray]]:  # noqa: ANN001
    """The first `n` images of the set (by name) with their central face's landmarks."""
    from .faces import central_landmarks
    from .verification import fallback_landmarks

    faces = []
    for path in sorted(evalset.images, key=lambda p: p.name)[:n]:
        image = read_rgb(path)
        points = central_landmarks(detector, image)
        faces.append((image, points if points is not None else fallback_landmarks(image.shape)))
    return faces


# -- embedding ------------------------------------------------------------------------------------------
def embed_set(evalset: EvalSet, recognizers: dict[str, Any], detector, detector_config: DetectorConfig,  # noqa: ANN001
              no_cache: bool) -> tuple[dict[str, Embedded], int]:
    """Every image of the set through the edge path, for every model, cached; returns (results, computed)."""
    from facelink.runtime.alignment import canonical_template

    crop = CanonicalCrop()
    names = evalset.names
    digest = pipeline_digest(evalset.images, evalset.image_dir, detector, crop, detector_config)
    jobs = []
    for recognizer in recognizers.values():
        job = Job(recognizer, NO_CODEC, 0, cache_file(cache_key(recognizer), NO_CODEC, 0, digest))
        if not no_cache:
            job.result = load_cache(job.cache_file, names)
        jobs.append(job)
    todo = [job for job in jobs if job.result is None]
    if todo:
        log.info("%s: embedding %d images for %s", evalset.name, len(names), ", ".join(j.recognizer.model_id for j in todo))
        embed_all(evalset.images, todo, detector, canonical_template(crop.size, crop.scale))
        for job in todo:
            try:
                save_cache(job.cache_file, names, job.result)
            except OSError as error:
                log.warning("could not write the cache %s: %s", job.cache_file, error)
    return {job.recognizer.model_id: job.result for job in jobs}, len(todo)


# -- evaluation ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    label: str
    kind: str           # symmetric | asymmetric | ensemble | distillation
    query_model: str    # the model the query side runs (its cost is the row's)
    gallery_side: str   # what the gallery stores
    query: np.ndarray   # (N, d) query-side embedding of every image of the set
    gallery: np.ndarray  # (N, d) gallery-side embedding of every image of the set


def build_rows(models: Models, embedded: dict[str, Embedded]) -> tuple[list[Row], Any]:
    """Every row's query- and gallery-side embeddings, and the transformed gallery (for uncertainty)."""
    from facelink.runtime.asymmetric import ensemble_mean, own_key

    q_id = models.query.model_id
    q = embedded[q_id].embeddings
    stored = {m: embedded[m].embeddings for m in models.galleries}
    own = own_key(q_id)
    if own in models.ensemble.member_models:  # the query model is a member: its own view of each picture
        stored[own] = q
    transformed = models.ensemble.transform(stored)
    # A member joining through the identity (`transforms --identity`) is its raw embedding, not T(m).
    raw = {t.gallery_model for t in models.ensemble.manifest.transforms if t.identity}
    side = {m: f"{q_id} itself" if m == own else f"{m} (raw)" if m in raw else f"T({m})" for m in transformed.models}
    rows = [Row("query symmetric", "symmetric", q_id, q_id, q, q)]
    for m in models.galleries:
        rows.append(Row(f"{m} symmetric", "symmetric", m, m, embedded[m].embeddings, embedded[m].embeddings))
    for k, m in enumerate(transformed.models):
        # The query model's own member is "query symmetric"; the raw teacher, the distillation baseline.
        if m != own and not (m in raw and m == models.teacher):
            rows.append(Row(f"query vs {side[m]}", "asymmetric", q_id, side[m], q, transformed.members[:, k]))
    if len(transformed.models) > 1:
        parts = [side[m] for m in transformed.models]
        weights = models.ensemble.weights(transformed.models)
        mean = "mean of " if weights is None else "weighted mean (" + "/".join(f"{w:g}" for w in weights) + ") of "
        rows.append(Row("query vs ensemble", "ensemble", q_id, mean + " + ".join(parts), q, transformed.vectors))
        if weights is not None:  # what the fitted weights add over the plain mean
            rows.append(Row("query vs ensemble, equal weights", "ensemble", q_id, "mean of " + " + ".join(parts), q,
                            ensemble_mean(transformed.members)))
        rows += sub_ensemble_rows(models, transformed, side, q)
    rows.append(Row(f"distillation baseline: query vs {models.teacher} (no transform)", "distillation", q_id,
                    f"{models.teacher} (raw)", q, embedded[models.teacher].embeddings))
    return rows, transformed


def sub_ensemble_rows(models: Models, transformed: Any, side: dict[str, str], q: np.ndarray) -> list[Row]:
    """Every smaller ensemble of two or more of the members (the manifest's weights, renormalised):
    what each member adds, e.g. whether a strong independent gallery model beats the teacher's pair."""
    from itertools import combinations

    from facelink.runtime.asymmetric import ensemble_mean

    rows = []
    count = len(transformed.models)
    for size in range(count - 1, 1, -1):
        for chosen in combinations(range(count), size):
            members = tuple(transformed.models[k] for k in chosen)
            weights = models.ensemble.weights(members)
            parts = " + ".join(side[m] for m in members)
            mean = "mean of " if weights is None else "weighted mean (" + "/".join(f"{w:g}" for w in weights) + ") of "
            rows.append(Row(f"query vs sub-ensemble {parts}", "sub-ensemble", models.query.model_id, mean + parts, q,
                            ensemble_mean(transformed.members[:, list(chosen)], weights)))
    return rows


def evaluate_row(row: Row, evalset: EvalSet) -> dict[str, Any]:
    out: dict[str, Any] = {"row": row.label, "kind": row.kind, "query_model": row.query_model,
                           "gallery_side": row.gallery_side}
    if evalset.pairs:
        index = {p: i for i, p in enumerate(evalset.images)}
        a = np.array([index[p.a] for p in evalset.pairs])
        b = np.array([index[p.b] for p in evalset.pairs])
        same = np.array([p.same for p in evalset.pairs])
        folds = np.array([p.fold for p in evalset.pairs])
        out["verification"] = verification_metrics(pair_scores(row.query, row.gallery, a, b), same, folds)
    o = evalset.open_set
    assert o is not None
    genuine = cosine_matrix(row.query[o.genuine], row.gallery[o.gallery])
    out["rank1"] = float(100 * rank1(genuine, o.target))
    if o.distractors.size:
        distractors = cosine_matrix(row.query[o.distractors], row.gallery[o.gallery])
        dir_rate, threshold = dir_at_far(genuine, o.target, distractors, DIR_FAR)
        out.update(dir_at_far=float(100 * dir_rate), dir_threshold=threshold,
                   distractors_allowed=int(np.floor(DIR_FAR * o.distractors.size + 1e-9)))
    return out


def rejection(row: Row, evalset: EvalSet, uncertainty: np.ndarray, fractions: np.ndarray, repeats: int,
              calibrated: dict[str, float]) -> dict[str, Any]:
    """The risk-coverage curves of `row` (the ensemble) under uncertainty-ranked and random rejection."""
    o = evalset.open_set
    assert o is not None
    genuine = cosine_matrix(row.query[o.genuine], row.gallery[o.gallery])
    distractors = cosine_matrix(row.query[o.distractors], row.gallery[o.gallery]) if o.distractors.size \
        else np.zeros((0, o.gallery.size))
    threshold = dir_threshold(distractors, DIR_FAR) if o.distractors.size else float("inf")
    curve = RiskCoverage(genuine, o.target, distractors, threshold)
    u = np.asarray(uncertainty)[o.gallery]
    ranked = risk_coverage(curve, u, fractions)
    control = random_risk_coverage(curve, u.size, fractions, repeats)
    at = int(np.argmin(np.abs(fractions - REJECTION_AT)))
    base = ranked[0]["risk"]
    # What the ranking finds: the r = 0 error of the probes whose identity it rejects at 10%.
    from facelink.runtime.asymmetric import RejectionPolicy

    wrong = ~identification(genuine, o.target)[0]
    dropped = ~RejectionPolicy(float(fractions[at]), "drop").apply(u).accepted[o.target]
    dropped_error = float(wrong[dropped].mean()) if dropped.any() else float("nan")
    reduction = relative_reduction(base, ranked[at]["risk"])
    random_reduction = relative_reduction(control["risk_mean"][0], control["risk_mean"][at])
    out = {
        "row": row.label,
        "ranking": "ensemble uncertainty: 1 - mean pairwise cosine of the ensemble's member embeddings",
        "dir_threshold": threshold,
        "fractions": [float(f) for f in fractions],
        "uncertainty": ranked,
        "random": {"repeats": repeats, **control},
        "at": REJECTION_AT,
        "risk_at_0": base,
        "risk_at": ranked[at]["risk"],
        "random_risk_at": control["risk_mean"][at],
        "relative_error_reduction": reduction,
        "random_relative_error_reduction": random_reduction,
        "reduction_vs_random_at": relative_reduction(control["risk_mean"][at], ranked[at]["risk"]),
        "rejected_probes_at": int(dropped.sum()),
        "rejected_probes_error_at": dropped_error,
        "error_enrichment_at": float(dropped_error / base) if base > 0 else float("nan"),
        # ... and what it would have to be for the target (same number of probes dropped):
        "error_enrichment_needed": float((o.genuine.size - (1 - REJECTION_TARGET) * ranked[at]["probes"])
                                         / max(int(dropped.sum()), 1)) if base > 0 else float("nan"),
        "target": REJECTION_TARGET,
        "met": bool(reduction >= REJECTION_TARGET),
        "open_set_relative_error_reduction": relative_reduction(ranked[0]["open_set_error"], ranked[at]["open_set_error"]),
        "uncertainty_stats": {"median": float(np.median(u)), "p90": float(np.quantile(u, 0.9)), "max": float(u.max())},
    }
    key = next((k for k in calibrated if abs(float(k) - REJECTION_AT) < 1e-9), None)
    if key is not None:  # how the manifest's threshold (calibrated on training faces) transfers to this gallery
        out["calibrated_threshold"] = {"fraction": float(key), "threshold": calibrated[key],
                                       "flags_here": float(np.mean(u >= calibrated[key]))}
    return out


# -- report ---------------------------------------------------------------------------------------------
def _pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _cost_cells(cost: dict[str, Any], timing: dict[str, Any] | None) -> list[str]:
    params = f"{cost['params'] / 1e6:.2f} M" if "params" in cost else "-"
    macs = f"{cost['macs_per_face'] / 1e6:.0f}" if "macs_per_face" in cost else "-"
    ms = f"{timing['ms_median']:.2f}" if timing else "-"
    return [params, macs, ms]


def set_table(result: dict[str, Any], costs: dict[str, dict], timings: dict[str, dict]) -> list[str]:
    header = ["row", "gallery side", "query params", "query MMACs/face", "query ms/face",
              "accuracy %", "TAR@FAR=1e-3", "rank-1 %", "DIR@FAR=1% %"]
    table = []
    for r in result["rows"]:
        v = r.get("verification")
        table.append([
            r["row"], r["gallery_side"], *_cost_cells(costs[r["query_model"]], timings.get(r["query_model"])),
            f"{v['accuracy_mean']:.2f} ± {v['accuracy_std']:.2f}" if v else "-",
            f"{v['tar_at_far']:.2f}" if v else "-",
            f"{r['rank1']:.2f}", _pct(r.get("dir_at_far")),
        ])
    return reporting.markdown_table(header, table)


def rejection_table(rej: dict[str, Any]) -> list[str]:
    header = ["rejected", "gallery left", "probes counted", "rank-1 error % (uncertainty)",
              "rank-1 error % (random, mean ± std)", "open-set error % (uncertainty)",
              "open-set error % (random)",
              "distractor FAR % (uncertainty)"]
    table = []
    fractions = rej["fractions"]
    for i, point in enumerate(rej["uncertainty"]):
        if round(100 * fractions[i]) % 5:
            continue
        rnd = rej["random"]
        table.append([
            f"{100 * fractions[i]:.0f}% ({point['rejected']})", str(point["enrolled"]), str(point["probes"]),
            _pct(100 * point["risk"]), f"{100 * rnd['risk_mean'][i]:.2f} ± {100 * rnd['risk_std'][i]:.2f}",
            _pct(100 * point["open_set_error"]), _pct(100 * rnd["open_set_error_mean"][i]),
            _pct(100 * point["distractor_far"]),
        ])
    return reporting.markdown_table(header, table)


def _beats(ensemble: dict[str, Any], rivals: list[dict[str, Any]], what: str, name: str) -> str:
    """Whether the ensemble row beats the best of `rivals` on rank-1 and (where measured) DIR."""
    best_rank1 = max(rivals, key=lambda r: r["rank1"])
    verdict = ensemble["rank1"] > best_rank1["rank1"]
    line = f"- ensemble vs {what}: rank-1 {ensemble['rank1']:.2f}% vs {best_rank1['rank1']:.2f}% ({best_rank1[name]})"
    if "dir_at_far" in ensemble:
        best_dir = max(rivals, key=lambda r: r.get("dir_at_far", -1))
        verdict = verdict and ensemble["dir_at_far"] > best_dir["dir_at_far"]
        line += f", DIR@FAR=1% {ensemble['dir_at_far']:.2f}% vs {best_dir['dir_at_far']:.2f}% ({best_dir[name]})"
    return line + (": beaten" if verdict else ": NOT beaten")


def targets(result: dict[str, Any], costs: dict[str, dict], models: Models) -> list[str]:
    lines = []
    ensemble = next((r for r in result["rows"] if r["kind"] == "ensemble"), None)  # as served (weighted, if so)
    singles = [r for r in result["rows"] if r["kind"] == "symmetric" and r["query_model"] in models.galleries]
    if ensemble and singles:
        lines.append(_beats(ensemble, singles, "the best gallery model used symmetrically", "query_model"))
    # The published claim: the ensemble beats every single gallery model used asymmetrically (the
    # raw teacher is the distillation baseline) on rank-1 and DIR@FAR=1%.
    rivals = [r for r in result["rows"] if r["kind"] in ("asymmetric", "distillation")]
    if ensemble and rivals:
        lines.append(_beats(ensemble, rivals, "every single gallery model asymmetric and the distillation baseline", "row"))
    rej = result.get("rejection")
    if rej:
        lines.append(f"- rejecting the {REJECTION_AT:.0%} most uncertain gallery images: rank-1 error "
                     f"{100 * rej['risk_at_0']:.2f}% -> {100 * rej['risk_at']:.2f}%, a relative reduction of "
                     f"{100 * rej['relative_error_reduction']:.1f}% (target >= {100 * REJECTION_TARGET:.1f}%: "
                     f"{'met' if rej['met'] else 'NOT met'}); random order: {100 * rej['random_relative_error_reduction']:.1f}%; "
                     f"{100 * rej['reduction_vs_random_at']:.1f}% below random at {REJECTION_AT:.0%}. The probes of the rejected "
                     f"identities had a {100 * rej['rejected_probes_error_at']:.1f}% error rate at r = 0 "
                     f"({rej['error_enrichment_at']:.2f}x the average over {rej['rejected_probes_at']} probes; the target needs about "
                     f"{rej['error_enrichment_needed']:.2f}x)")
    return lines


def cost_lines(costs: dict[str, dict], timings: dict[str, dict], models: Models) -> list[str]:
    header = ["model", "role", "parameters", "MMACs/pass", "passes/face", "MMACs/face", "ms/face median (p10-p90)",
              "MACs vs MobileFaceNet"]
    teacher = costs.get(models.teacher, {})
    table = []
    for mid, cost in costs.items():
        t = timings.get(mid)
        ratio = (f"{teacher['macs_per_face'] / cost['macs_per_face']:.2f}x fewer"
                 if "macs_per_face" in cost and "macs_per_face" in teacher and mid != models.teacher else "-")
        table.append([
            mid, "query" if mid == models.query.model_id else "gallery",
            f"{cost['params'] / 1e6:.3f} M" if "params" in cost else "-",
            f"{cost['macs_per_pass'] / 1e6:.1f}" if "macs_per_pass" in cost else "-",
            str(cost["passes_per_face"]),
            f"{cost['macs_per_face'] / 1e6:.1f}" if "macs_per_face" in cost else cost.get("error", "-"),
            f"{t['ms_median']:.2f} ({t['ms_p10']:.2f}-{t['ms_p90']:.2f})" if t else "-", ratio,
        ])
    return reporting.markdown_table(header, table)


def format_report(payload: dict[str, Any], models: Models) -> str:
    machine = payload["machine"]
    lines = [
        f"command: {payload['command']}",
        f"{reporting.machine_line(machine)} (1 intra-op thread); load average at start "
        f"{' / '.join(f'{x:.2f}' for x in machine['load_average_start'])} (1/5/15 min); date: {payload['date_human']}",
        f"query model: {payload['query']['model']} ({payload['query']['manifest']}, weights {payload['query']['sha256'][:12]})",
        f"ensemble: {payload['ensemble']['path']} (gallery models: {', '.join(payload['ensemble']['gallery_models'])})",
        "distillation baseline: the query model is trained by distillation from "
        f"{models.teacher}; its row matches it directly against raw {models.teacher} gallery embeddings.",
        "",
        "query cost (the model on the query side of each row):",
        "",
        *cost_lines(payload["costs"], payload["timings"], models),
        "",
        f"ms/face: align + forward (flip pass included) on one core, ONNX Runtime 1 thread, median over "
        f"{payload['timing_faces']} faces with the models taking turns; 1-min load average during the timing "
        + (", ".join(f"{t['load_average_1min'][0]:.1f}->{t['load_average_1min'][1]:.1f}"
                     for t in list(payload["timings"].values())[:1]) or "-")
        + f" on {machine['cores']} cores: upper bounds on a busy machine.",
    ]
    for name, result in payload["sets"].items():
        s = result["protocol"]
        o = result["open_set"]
        lines += ["", f"## {result['title']}", ""]
        if name == "lfw":
            lines.append(f"verification: {s['verification']}; {result['pairs']} pairs. "
                         f"1:N people: {s['one_to_n_people']} ({s['one_to_n_rule']}); "
                         f"{s['one_to_n_training_pictures']} training pictures among the 1:N images.")
        else:
            lines.append(f"held-out identities: {len(s['held_out_identities'])} (intersection of "
                         + ", ".join(f"{Path(f['file']).parent.name}/split.json" for f in s["split_files"] if f["present"])
                         + f"); {s['pictures']} pictures, {s['pictures_without_face']} without a face (left out). "
                         f"verification: {s['verification']}; {result['pairs']} pairs. 1:N: {s['one_to_n_rule']}.")
        lines.append(f"1:N: {o['gallery']} enrolled, {o['genuine_probes']} genuine probes, {o['distractors']} distractors"
                     + (f" (FAR=1% lets {result['rows'][0].get('distractors_allowed', 0)} pass)" if o["distractors"] else "")
                     + f"; faces not detected: {result['faces_not_detected']} of {result['images']} images.")
        lines += ["", *set_table(result, payload["costs"], payload["timings"])]
        rej = result.get("rejection")
        if rej:
            lines += ["", f"rejection ({rej['row']}; gallery ranked by {rej['ranking']}; error over the genuine probes "
                      "whose identity is still enrolled; open-set error and distractor FAR at the r=0 DIR threshold "
                      f"{rej['dir_threshold']:.3f}):", "", *rejection_table(rej)]
            if "calibrated_threshold" in rej:
                c = rej["calibrated_threshold"]
                lines.append(f"\nthe ensemble manifest's threshold for {c['fraction']:.0%} ({c['threshold']:.4f}, "
                             f"calibrated on the held-out celeba-dev faces) flags {100 * c['flags_here']:.1f}% of this gallery.")
        lines += ["", "targets:", *targets(result, payload["costs"], models)]
    q = payload["costs"].get(models.query.model_id, {})
    for gallery_model in models.galleries:  # the query model must be cheaper than every gallery model
        t = payload["costs"].get(gallery_model, {})
        if "macs_per_face" in q and "macs_per_face" in t:
            ratio = t["macs_per_face"] / q["macs_per_face"]
            lines.append(f"- query cost: {ratio:.2f}x fewer MACs than {gallery_model} "
                         f"(target >= {COST_TARGET:.0f}x: {'met' if ratio >= COST_TARGET else 'NOT met'})")
    lines += ["", "accuracy: 10-fold (threshold chosen on 9 folds), mean ± std; TAR@FAR=1e-3 over all pairs "
              "(3,000 impostor pairs on LFW: 3 may pass, a coarse point). Rank-1: closed set over genuine probes; "
              "DIR@FAR=1%: correct and above the threshold that 1% of distractors pass."]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [(name, r) for name, r in payload["sets"].items() if r.get("rejection")]
    if not sets:
        return
    fig, axes = plt.subplots(len(sets), 2, squeeze=False, figsize=(11, 4.2 * len(sets)))
    for i, (name, result) in enumerate(sets):
        rej = result["rejection"]
        x = 100 * np.array(rej["fractions"])
        for j, (key, title) in enumerate((("risk", "rank-1 error (selective risk)"),
                                          ("open_set_error", "open-set error at the DIR@FAR=1% threshold"))):
            ax = axes[i][j]
            ours = 100 * np.array([p[key] for p in rej["uncertainty"]])
            mean = 100 * np.array(rej["random"][f"{key}_mean"])
            std = 100 * np.array(rej["random"][f"{key}_std"])
            ax.plot(x, ours, marker="o", ms=3, label="rejected by ensemble uncertainty")
            ax.plot(x, mean, color="0.3", ls="--", label=f"random order (mean of {rej['random']['repeats']})")
            ax.fill_between(x, mean - std, mean + std, color="0.8", alpha=0.6, label="random ± 1 std")
            if key == "risk":
                target = ours[0] * (1 - REJECTION_TARGET)
                ax.plot([100 * REJECTION_AT], [target], marker="*", ms=12, color="k", ls="none",
                        label=f"target: -{100 * REJECTION_TARGET:.1f}% at {REJECTION_AT:.0%}")
            ax.set_title(f"{result['title']}: {title}", fontsize=9)
            ax.set_xlabel("gallery images rejected %")
            ax.set_ylabel("error % over probes still enrolled")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{payload['query']['model']} vs the gallery ensemble: risk-coverage", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench asymmetric",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
Asymmetric face recognition on LFW and the held-out CelebA-dev identities: the lightweight
query model against gallery embeddings of the large models mapped into its space (one at a time
and as the ensemble), against each model used symmetrically, and against the distillation
baseline (the query model against raw MobileFaceNet embeddings: it is distilled from it).
Verification (10-fold accuracy, TAR at FAR=1e-3; first image = query side), 1:N open set
(rank-1, DIR at FAR=1%), the query cost of each row (parameters, MACs, ms per face on one
core), and the risk-coverage curve of rejecting the most uncertain gallery images (PNG).
See the module docstring (python -m facelink.benchmarks.asymmetric --help shows this) and
benchmarks/asymmetric.py for every protocol detail.

Embeddings are cached under ~/.cache/facelink/embeddings/ ($FACELINK_CACHE).""",
        epilog="""\
examples:
  facelink bench asymmetric
  facelink bench asymmetric -- --ensemble path/to/asymmetric/facelink-query-v9.json
  facelink bench asymmetric -- --sets lfw --lfw-people all --json /tmp/a.json --plot /tmp/a.png
  facelink bench asymmetric -- --sets lfw --limit-pairs 2 --limit-people 20 --timing-faces 5   # smoke test""",
    )
    p.add_argument("--ensemble", default="auto",
                   help=f"ensemble manifest: path or bundled name (default: bundled {DEFAULT_ENSEMBLE})")
    p.add_argument("--query", help="query model manifest (default: the one the ensemble names; its weights must match)")
    p.add_argument("--gallery", action="append", default=[], metavar="MANIFEST",
                   help="manifest of a gallery model (default: the bundled one with the transform's model id)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER,
                   help=f"gallery model the query model was distilled from (default {DEFAULT_TEACHER})")
    p.add_argument("--sets", default="lfw,celeba", help="lfw, celeba or both, comma-separated (default both)")
    p.add_argument("--data", help="LFW folder (default: $FACELINK_DATA, ../shared/data/lfw, the cache)")
    p.add_argument("--celeba-data", help="CelebA-dev folder (default ../shared/data/celeba-dev)")
    p.add_argument("--celeba-split", action="append", type=Path, metavar="SPLIT_JSON",
                   help="split.json whose val_identities make the CelebA set; repeat to intersect "
                        "(default: benchmarks/splits/celeba_held_out.json, what every training run holds out)")
    p.add_argument("--lfw-people", choices=("unseen", "all"), default="unseen",
                   help="LFW 1:N over people no training run saw (default), or over all of LFW")
    p.add_argument("--limit-pairs", type=int, metavar="N", help="LFW: first N same + N different pairs per fold (tests)")
    p.add_argument("--limit-people", type=int, metavar="N",
                   help="1:N: first N enrolled and N one-picture people (CelebA: 2N identities) (tests)")
    p.add_argument("--timing-faces", type=int, default=200, help="faces timed per model (default 200; 0 = skip)")
    p.add_argument("--random-repeats", type=int, default=50, help="random rejection orders averaged (default 50)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"risk-coverage PNG (default {DEFAULT_PLOT})")
    p.add_argument("--no-cache", action="store_true", help="recompute every embedding (the cache is then refreshed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["facelink", "bench", "asymmetric", *argv])
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or set(sets) - set(SETS):
        parser.error(f"--sets: choose from {', '.join(SETS)}")
    for option in ("limit_pairs", "limit_people"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.timing_faces < 0 or args.random_repeats < 1:
        parser.error("--timing-faces must be >= 0 and --random-repeats >= 1")

    from facelink.runtime.detection import create_detector
    from facelink.runtime.manifest import ManifestError

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    load_start = os.getloadavg()
    backend = BackendConfig(intra_op_threads=1)
    try:
        models = load_models(args.ensemble, args.query, args.gallery, args.teacher, backend)
    except (ManifestError, FileNotFoundError, ImportError, RuntimeError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    detector_config = DetectorConfig()
    detector = create_detector(detector_config)
    detector_name = getattr(getattr(detector, "manifest", None), "model_id", None) or detector.name

    started = time.perf_counter()
    evalsets = []
    try:
        for name in sets:
            if name == "lfw":
                evalsets.append(lfw_set(args.data, args.lfw_people, args.limit_pairs, args.limit_people))
            else:
                evalsets.append(celeba_set(args.celeba_data, args.celeba_split or list(DEFAULT_SPLITS), args.limit_people))
    except (DatasetNotFoundError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    fractions = rejection_fractions()
    results: dict[str, Any] = {}
    computed = 0
    for evalset in evalsets:
        embedded, n = embed_set(evalset, models.all, detector, detector_config, args.no_cache)
        computed += n
        detected = next(iter(embedded.values())).detected
        if evalset.name == "celeba":
            finish_celeba(evalset, detected)
        rows, transformed = build_rows(models, embedded)
        o = evalset.open_set
        assert o is not None
        result: dict[str, Any] = {
            "title": evalset.title, "protocol": evalset.protocol, "images": len(evalset.images),
            "faces_not_detected": int((~detected).sum()), "pairs": len(evalset.pairs),
            "open_set": o.summary(), "rows": [evaluate_row(row, evalset) for row in rows],
        }
        ensemble_row = next((r for r in rows if r.kind == "ensemble"), None)
        if ensemble_row is not None and o.gallery.size >= 2:
            result["rejection"] = rejection(ensemble_row, evalset, transformed.uncertainty, fractions,
                                            args.random_repeats, models.ensemble.manifest.uncertainty_quantiles)
        results[evalset.name] = result
    embedding_seconds = time.perf_counter() - started

    costs = {mid: model_cost(r) for mid, r in models.all.items()}
    timings = {}
    if args.timing_faces:
        faces = timing_faces(evalsets[0], detector, args.timing_faces)
        timings = time_models(models.all, faces)

    now = datetime.now(timezone.utc)
    machine = reporting.machine_info(intra_op_threads=1, load_average_start=[round(x, 2) for x in load_start],
                                     load_average_end=[round(x, 2) for x in os.getloadavg()])
    q = models.query
    payload = {
        "benchmark": "asymmetric",
        "command": command,
        "date": reporting.utc_now(),
        "date_human": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "detector": detector_name,
        "selection": "central",
        "query": {"model": q.model_id, "manifest": str(models.query_manifest), "sha256": weights_sha(q),
                  "description": q.manifest.description},
        "ensemble": {"path": str(models.ensemble_path), "name": models.ensemble.manifest.name,
                     "gallery_models": list(models.galleries),
                     "gallery_sha256": {m: weights_sha(r) for m, r in models.galleries.items()},
                     "training": models.ensemble.manifest.training},
        "teacher": models.teacher,
        "distillation_baseline": (f"the query model (distilled from {models.teacher}) matched against raw "
                                  f"{models.teacher} gallery embeddings, no transform"),
        "costs": costs,
        "timings": timings,
        "timing_faces": args.timing_faces,
        "embedding_seconds": embedding_seconds,
        "embedding_settings_computed": computed,
        "sets": results,
    }
    print(format_report(payload, models))
    print(f"\nembedding: {embedding_seconds:.1f} s ({computed} model x set setting(s) computed, the rest from the cache)")
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    if any(r.get("rejection") for r in results.values()):
        plot(payload, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
