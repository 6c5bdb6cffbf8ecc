"""LFW View 2 verification through facelink's real edge path, and match-threshold calibration.

Every one of the 7,701 distinct images that pairs.txt references is processed once:

1. read it (RGB) and run the face detector (`create_detector()`: YuNet by default);
2. keep the face nearest the image centre (`select_faces(..., "central", shape)`): LFW
   pictures are centred on the person they are labelled with;
3. if no face is found, fall back to the LFW deep-funneled standard: the fixed landmark set
   `LFW_FALLBACK_LANDMARKS_250` (for a 250x250 picture, scaled to the image's actual size).
   The report counts these images as "no detection";
4. then, per codec setting:
   - `none`: the recogniser embeds the original image with the detected landmarks;
   - a codec id (`jpeg`, `webp`, `png`): exactly what the device and the cloud do: warp to the
     canonical crop (`canonical_template(128, 1.0)`), encode, decode, and recognise the decoded
     crop with the crop landmarks `warp_face` returned. Bytes per face are recorded.

The pairs are scored with the cosine similarity of the two embeddings, and evaluated with the
standard LFW protocol: for each of the 10 folds the threshold that maximises accuracy on the
other 9 folds is measured on the held-out fold (mean +- std over folds). TAR at FAR=1e-3 and
the EER are computed over all pairs at once; View 2 has only 3,000 impostor pairs, so
FAR=1e-3 means "at most 3 impostor pairs above the threshold": a coarse operating point.

Embeddings are cached in `<cache>/embeddings/<model_id>-<codec>-q<quality>-<sha>.npz`
(`facelink.config.cache_dir()`, ~/.cache/facelink by default), where `<sha>` hashes the image
list together with everything upstream of the recogniser (detector and its settings, canonical
crop, fallback landmarks), so a second run is instant and a changed pipeline never reads stale
embeddings.

The metric functions (`fold_accuracy`, `tar_at_far`, `threshold_at_far`, `eer`) are pure numpy
and take scores (higher = more alike) and same-person labels.
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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from facelink.config import BackendConfig, CanonicalCrop, DetectorConfig, cache_dir
from facelink.datasets import LFW, DatasetNotFoundError, Pair

from . import reporting
from .faces import central_landmarks, detector_fingerprint

log = logging.getLogger(__name__)

#: The LFW deep-funneled fallback: where the five landmarks (facelink order: image-left eye,
#: image-right eye, nose tip, image-left mouth corner, image-right mouth corner) sit in a
#: 250x250 deep-funneled picture. It is the per-point median of YuNet's landmarks over the
#: 5,532 LFW images that pairs.txt does NOT reference (YuNet found a face in all of them; spread
#: about 2.5-7 px per coordinate), rounded to 0.5 px, so the test set did not shape it.
LFW_FALLBACK_LANDMARKS_250 = np.array(
    [[104.0, 112.5], [147.5, 112.0], [126.0, 136.5], [108.0, 155.5], [145.5, 155.0]], dtype=np.float32
)
LFW_SIDE = 250

DEFAULT_JSON = Path("benchmarks/results/verification.json")
DEFAULT_RECOGNIZER = "mobilefacenet"
FAR_TARGET = 1e-3
NO_CODEC = "none"
#: The edge's default payload codec (`edge.pipeline.crop_codec(EdgeConfig())`): the learned codec
#: at its bundle's `border_ring_quality`, the crop's border ring coarser. What a board sends.
EDGE_CODEC = "edge"
#: Bumped whenever this file changes what goes into an embedding, to invalidate old caches.
PIPELINE_VERSION = 1


# -- metrics (pure) --------------------------------------------------------------------------------
def _check(scores: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    same = np.asarray(same, dtype=bool).ravel()
    if scores.shape != same.shape:
        raise ValueError(f"scores and labels differ in length: {scores.size} vs {same.size}")
    if scores.size == 0:
        raise ValueError("no scores")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinity")
    return scores, same


def best_threshold(scores: np.ndarray, same: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the threshold that classifies the most pairs right.

    A pair is called "same" when `score >= threshold`. Every distinct cut of the sorted scores is
    tried (exact, O(n log n)); the threshold is the midpoint between the two scores either side
    of the best cut (just below the lowest / just above the highest at the extremes). Among
    equally good cuts the lowest threshold wins, so the result is deterministic.
    """
    scores, same = _check(scores, same)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    n = s.size
    # Cut i (0..n) calls sorted[i:] "same": correct = different pairs below + same pairs above.
    different_below = np.concatenate([[0], np.cumsum(~y)])
    same_above = np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    correct = different_below + same_above
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut between two equal scores cannot be realised
    i = int(np.argmax(np.where(valid, correct, -1)))
    if i == 0:
        threshold = s[0]
    elif i == n:
        threshold = np.nextafter(s[-1], np.inf)
    else:
        threshold = (s[i - 1] + s[i]) / 2
        if threshold <= s[i - 1]:  # adjacent floats: the midpoint rounded onto the lower one
            threshold = s[i]
    return float(threshold), float(correct[i] / n)


def accuracy_at(scores: np.ndarray, same: np.ndarray, threshold: float) -> float:
    scores, same = _check(scores, same)
    return float(np.mean((scores >= threshold) == same))


def fold_accuracy(scores: np.ndarray, same: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The LFW protocol: per fold, the best threshold on the other folds, scored on this one.

    Returns (accuracies, thresholds), one of each per fold in sorted fold order; accuracies are
    fractions (0..1). Report `accs.mean()` +- `accs.std()`.
    """
    scores, same = _check(scores, same)
    folds = np.asarray(folds).ravel()
    if folds.shape != scores.shape:
        raise ValueError(f"folds and scores differ in length: {folds.size} vs {scores.size}")
    ids = np.unique(folds)
    if ids.size < 2:
        raise ValueError("fold_accuracy needs at least two folds")
    accs, thresholds = [], []
    for fold in ids:
        test = folds == fold
        threshold, _ = best_threshold(scores[~test], same[~test])
        accs.append(accuracy_at(scores[test], same[test], threshold))
        thresholds.append(threshold)
    return np.array(accs), np.array(thresholds)


def threshold_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """The lowest threshold t with FAR = #{impostor >= t} / #impostors <= `far` (accept: score >= t).

    With n impostor pairs, k = floor(far * n) impostors may be accepted: t is just above the
    (k+1)-th highest impostor score (ties can only lower the FAR actually reached), or -inf if
    k >= n (everything may be accepted).
    """
    scores, same = _check(scores, same)
    impostor = np.sort(scores[~same])[::-1]
    if impostor.size == 0:
        raise ValueError("no impostor (different-person) pairs")
    if not 0 <= far <= 1:
        raise ValueError(f"far must be in [0, 1], got {far}")
    k = int(np.floor(far * impostor.size + 1e-9))
    return float(np.nextafter(impostor[k], np.inf)) if k < impostor.size else float("-inf")


def tar_at_far(scores: np.ndarray, same: np.ndarray, far: float) -> float:
    """True accept rate (fraction of genuine pairs accepted) at the `threshold_at_far` threshold."""
    scores, same = _check(scores, same)
    genuine = scores[same]
    if genuine.size == 0:
        raise ValueError("no genuine (same-person) pairs")
    return float(np.mean(genuine >= threshold_at_far(scores, same, far)))


def eer(scores: np.ndarray, same: np.ndarray) -> float:
    """Equal error rate: where the false accept and false reject rates cross (interpolated).

    The ROC is traced over every distinct score as threshold (accept: score >= t); between the
    last point with FRR > FAR and the first with FRR <= FAR the two rates are interpolated
    linearly. 0 for perfectly separated scores, about 0.5 for scores unrelated to the labels.
    """
    scores, same = _check(scores, same)
    n_genuine, n_impostor = int(same.sum()), int((~same).sum())
    if n_genuine == 0 or n_impostor == 0:
        raise ValueError("eer needs both genuine and impostor pairs")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], same[order]
    last = np.r_[s[1:] != s[:-1], True]  # the last of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    far = np.r_[0.0, fp / n_impostor]
    frr = np.r_[1.0, 1.0 - tp / n_genuine]
    diff = frr - far  # starts at 1, ends at -1: it crosses zero
    i = int(np.argmax(diff <= 0))
    if diff[i] == 0 or i == 0:
        return float(far[i])
    alpha = diff[i - 1] / (diff[i - 1] - diff[i])
    return float(far[i - 1] + alpha * (far[i] - far[i - 1]))


# -- pairs and images --------------------------------------------------------------------------------
def limit_pairs(pairs: list[Pair], n: int | None) -> list[Pair]:
    """The first `n` same and the first `n` different pairs of every fold (all if `n` is None).

    Taking both kinds keeps every fold a verification problem (each fold of pairs.txt lists its
    300 same pairs before its 300 different ones, so "the first n" alone would be all same).
    """
    if n is None:
        return list(pairs)
    if n < 1:
        raise ValueError(f"--limit-pairs must be at least 1, got {n}")
    taken: dict[tuple[int, bool], int] = {}
    kept = []
    for pair in pairs:
        key = (pair.fold, pair.same)
        if taken.get(key, 0) < n:
            taken[key] = taken.get(key, 0) + 1
            kept.append(pair)
    return kept


def distinct_images(pairs: list[Pair]) -> list[Path]:
    """Every image the pairs use, once, in order of first appearance."""
    return list(dict.fromkeys(p for pair in pairs for p in (pair.a, pair.b)))


def fallback_landmarks(shape: tuple[int, ...]) -> np.ndarray:
    """`LFW_FALLBACK_LANDMARKS_250` scaled from a 250x250 picture to one of `shape` (H, W, ...)."""
    height, width = shape[:2]
    return LFW_FALLBACK_LANDMARKS_250 * np.array([width / LFW_SIDE, height / LFW_SIDE], dtype=np.float32)


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def pipeline_digest(images: list[Path], image_dir: Path, detector, crop: CanonicalCrop,  # noqa: ANN001
                    detector_config: DetectorConfig) -> str:
    """sha256 (12 hex digits) of the image list (relative to the LFW image folder) and of every
    setting upstream of the recogniser, so that a cache is only ever reused for the same inputs."""
    header = {
        "pipeline": PIPELINE_VERSION,
        **detector_fingerprint(detector, detector_config),
        "crop": crop.model_dump(),
        "fallback": LFW_FALLBACK_LANDMARKS_250.tolist(),
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for path in images:
        digest.update(b"\n" + _relative(path, image_dir).encode())
    return digest.hexdigest()[:12]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def edge_default_codec():  # noqa: ANN201 (a FaceCodec; imported lazily with the edge)
    """The payload codec a board with the default EdgeConfig sends its crops with."""
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import crop_codec

    return crop_codec(EdgeConfig())


# -- embedding -------------------------------------------------------------------------------------
@dataclass
class Embedded:
    """One (recogniser, codec) setting's result for every image."""

    embeddings: np.ndarray       # (N, dim) float32
    detected: np.ndarray         # (N,) bool: False where the fallback landmarks were used
    payload_bytes: np.ndarray    # (N,) int: encoded size (0 for codec none)
    recognition_ms: np.ndarray   # (N,) float: recogniser time per face (align + forward)
    cached: bool = False
    created: str = ""


@dataclass
class Job:
    recognizer: object           # a facelink.runtime.recognition.Recognizer
    codec_id: str
    quality: int
    cache_file: Path
    codec: object | None = None  # a FaceCodec, None for codec none
    result: Embedded | None = None

    @property
    def label(self) -> str:
        return NO_CODEC if self.codec_id == NO_CODEC else f"{self.codec_id} q{self.quality}"


def cache_file(model_id: str, codec_id: str, quality: int, digest: str) -> Path:
    safe_model = "".join(c if c.isalnum() or c in "._-@" else "_" for c in model_id)
    return cache_dir() / "embeddings" / f"{safe_model}-{codec_key(codec_id)}-q{quality}-{digest}.npz"


def codec_key(codec_id: str) -> str:
    """A file-name-safe key for a codec argument. `learned:<path.json>` (an exported encoder,
    which shares its bundle's wire id) is keyed by its manifest's content, so two exports of
    one codec never share cached embeddings."""
    alias, _, name = codec_id.partition(":")
    if alias == "learned" and name.endswith(".json"):
        return f"learned-{hashlib.sha256(Path(name).read_bytes()).hexdigest()[:12]}"
    return codec_id


def load_cache(path: Path, images: list[str]) -> Embedded | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["images"].tolist() != images:
                log.warning("ignoring %s: it was made for a different image list", path)
                return None
            return Embedded(
                embeddings=data["embeddings"],
                detected=data["detected"],
                payload_bytes=data["payload_bytes"],
                recognition_ms=data["recognition_ms"],
                cached=True,
                created=str(data["created"]),
            )
    except (OSError, KeyError, ValueError) as error:
        log.warning("ignoring unreadable cache %s: %s", path, error)
        return None


def save_cache(path: Path, images: list[str], result: Embedded) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(
        tmp,
        images=np.array(images),
        embeddings=result.embeddings,
        detected=result.detected,
        payload_bytes=result.payload_bytes,
        recognition_ms=result.recognition_ms,
        created=np.array(result.created),
    )
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache


def embed_all(images: list[Path], jobs: list[Job], detector, template) -> None:  # noqa: ANN001
    """One pass over the images: read and detect each once, then run every job that needs it."""
    from facelink.runtime.alignment import warp_face

    n = len(images)
    for job in jobs:
        dim = job.recognizer.dim
        job.result = Embedded(
            embeddings=np.zeros((n, dim), dtype=np.float32),
            detected=np.zeros(n, dtype=bool),
            payload_bytes=np.zeros(n, dtype=np.int64),
            recognition_ms=np.zeros(n, dtype=np.float64),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    for index, path in enumerate(tqdm(images, desc="embed", unit="image", file=sys.stderr, dynamic_ncols=True,
                                                mininterval=0.1 if sys.stderr.isatty() else 15)):
        image = read_rgb(path)
        found = central_landmarks(detector, image)
        landmarks = found if found is not None else fallback_landmarks(image.shape)
        canonical = None
        for job in jobs:
            result = job.result
            assert result is not None
            result.detected[index] = found is not None
            if job.codec is None:
                face, points = image, landmarks
            else:
                if canonical is None:
                    canonical = warp_face(image, landmarks, template)
                data = job.codec.encode(canonical[0])
                result.payload_bytes[index] = len(data)
                face, points = job.codec.decode(data), canonical[1]
            started = time.perf_counter()
            result.embeddings[index] = job.recognizer.embed(face, points)
            result.recognition_ms[index] = (time.perf_counter() - started) * 1e3


# -- evaluation ---------------------------------------------------------------------------------------
def pair_scores(embeddings: np.ndarray, index_a: np.ndarray, index_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair (embeddings are re-normalised, whatever the model did)."""
    e = embeddings.astype(np.float64)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    return np.einsum("ij,ij->i", e[index_a], e[index_b])


def evaluate(job: Job, pairs: list[Pair], index: dict[Path, int]) -> dict:
    result = job.result
    assert result is not None
    a = np.array([index[p.a] for p in pairs])
    b = np.array([index[p.b] for p in pairs])
    same = np.array([p.same for p in pairs])
    folds = np.array([p.fold for p in pairs])
    scores = pair_scores(result.embeddings, a, b)
    accs, thresholds = fold_accuracy(scores, same, folds)
    far_threshold = threshold_at_far(scores, same, FAR_TARGET)
    manifest_threshold = float(job.recognizer.match_threshold)
    impostor, genuine = scores[~same], scores[same]
    return {
        "recognizer": job.recognizer.model_id,
        "codec": job.label,
        "codec_id": job.codec.codec_id if job.codec is not None else job.codec_id,  # the id on the wire
        "quality": None if job.codec_id == NO_CODEC else job.quality,
        "images": int(result.embeddings.shape[0]),
        "pairs": int(len(pairs)),
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
        "folds": int(np.unique(folds).size),
        "mean_bytes_per_face": None if job.codec_id == NO_CODEC else float(result.payload_bytes.mean()),
        "accuracy_mean": float(100 * accs.mean()),
        "accuracy_std": float(100 * accs.std()),
        "fold_accuracies": [float(100 * x) for x in accs],
        "threshold_mean": float(thresholds.mean()),
        "fold_thresholds": [float(t) for t in thresholds],
        "far_target": FAR_TARGET,
        "impostors_allowed_at_far": int(np.floor(FAR_TARGET * (~same).sum() + 1e-9)),
        "tar_at_far": float(100 * tar_at_far(scores, same, FAR_TARGET)),
        "threshold_at_far": far_threshold,
        "eer": float(100 * eer(scores, same)),
        "faces_not_detected": int((~result.detected).sum()),
        "ms_per_face": float(result.recognition_ms.mean()),
        "manifest_threshold": manifest_threshold,
        "at_manifest_threshold": {
            "accuracy": float(100 * accuracy_at(scores, same, manifest_threshold)),
            "tar": float(100 * np.mean(genuine >= manifest_threshold)),
            "far": float(100 * np.mean(impostor >= manifest_threshold)),
        },
        "cached": result.cached,
        "embedded_at": result.created,
    }


# -- output -----------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    return reporting.machine_info(intra_op_threads=threads)


def format_report(rows: list[dict], command: str, machine: dict, date: str, detector_name: str) -> str:
    header = ["recogniser", "codec", "bytes/face", "accuracy %", "threshold", "TAR@FAR=1e-3", "EER",
              "no detection", "ms/face"]
    table = []
    for r in rows:
        table.append([
            r["recognizer"],
            r["codec"],
            "-" if r["mean_bytes_per_face"] is None else f"{r['mean_bytes_per_face']:.0f}",
            f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
            f"{r['threshold_mean']:.3f}",
            f"{r['tar_at_far']:.2f}%",
            f"{r['eer']:.2f}%",
            f"{r['faces_not_detected']} / {r['images']}",
            f"{r['ms_per_face']:.2f}" + (" *" if r["cached"] else ""),
        ])
    cal_header = ["recogniser", "codec", "manifest threshold", "accuracy there", "TAR there", "FAR there",
                  "best-accuracy threshold (10-fold mean)", "threshold at FAR=1e-3"]
    cal = [[
        r["recognizer"], r["codec"], f"{r['manifest_threshold']:.3f}",
        f"{r['at_manifest_threshold']['accuracy']:.2f}%", f"{r['at_manifest_threshold']['tar']:.2f}%",
        f"{r['at_manifest_threshold']['far']:.2f}%", f"{r['threshold_mean']:.3f}", f"{r['threshold_at_far']:.3f}",
    ] for r in rows]
    first = rows[0]
    lines = [
        f"command: {command}",
        f"{reporting.machine_line(machine)} ({machine['intra_op_threads']} intra-op thread(s)); date: {date}",
        f"data: LFW View 2, {first['pairs']} pairs ({first['genuine_pairs']} same, {first['impostor_pairs']} different)"
        f" in {first['folds']} folds, {first['images']} distinct images; detector: {detector_name}, face nearest the centre",
        "",
        *reporting.markdown_table(header, table),
        "",
        f"accuracy: {first['folds']}-fold, threshold chosen on the other folds, mean ± std (population) over folds;"
        " threshold: mean of the per-fold cosine thresholds.",
        f"TAR@FAR=1e-3 and EER over all {first['pairs']} pairs; with {first['impostor_pairs']} impostor pairs,"
        f" FAR=1e-3 allows {first['impostors_allowed_at_far']} impostor(s) above the threshold: a coarse point.",
        "no detection: images where the detector found no face; the fixed LFW deep-funneled landmarks were used.",
        "ms/face: recogniser only (align + forward, flip pass included if the model uses it)"
        + ("; * = from the cache (timed when it was filled)" if any(r["cached"] for r in rows) else "") + ".",
        "",
        "threshold calibration (cosine; accept when score >= threshold):",
        "",
        *reporting.markdown_table(cal_header, cal),
    ]
    return "\n".join(lines)


# -- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench verification",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""\
LFW View 2 verification (pairs.txt: 6,000 pairs in 10 folds) of a recogniser through
facelink's edge path, and the calibration of its match threshold.

Each distinct pair image (7,701) is read once, the detector (YuNet by default) finds the face
nearest the centre (if none: fixed LFW deep-funneled landmarks, counted as "no detection"),
and the recogniser embeds it, either from the original image (--codec none) or, as the cloud
does, from the canonical 128x128 crop after an encode/decode round trip through the codec.
Pairs are scored by cosine similarity. Reported per (recogniser, codec): 10-fold accuracy
(threshold picked on 9 folds, measured on the 10th), the mean threshold, TAR at FAR=1e-3 and
EER over all pairs, bytes per face, faces not detected, and recogniser ms per face; then the
accuracy/TAR/FAR at the manifest's match threshold, to calibrate it.

Embeddings are cached under ~/.cache/facelink/embeddings/ ($FACELINK_CACHE), so a second run
is instant; --no-cache recomputes (and refreshes the cache).
LFW is looked for in: --data, then $FACELINK_DATA, then ../shared/data/lfw, then the cache.""",
        epilog="""\
examples:
  facelink bench verification
  facelink bench verification -- --codec none --codec jpeg
  facelink bench verification -- --codec webp --codec jpeg --quality 50   # one quality for all codecs
  facelink bench verification -- --recognizer mobilefacenet --recognizer dlib-resnet
  facelink bench verification -- --limit-pairs 3 --no-cache --json /tmp/v.json   # a quick smoke test
  python -m facelink.benchmarks.verification --help""",
    )
    p.add_argument("--data", help="LFW folder (the one holding pairs.txt, or the image folder)")
    p.add_argument("--recognizer", action="append", metavar="NAME",
                   help="manifest name or path; repeat to run several (default: mobilefacenet, the model of "
                        "the committed verification.json; auto = the cloud's primary)")
    p.add_argument("--codec", action="append", metavar="ID",
                   help="none (the original image), edge (the edge's default codec: learned, border ring "
                        "coarse), or a payload codec id: jpeg, webp, png, learned; repeat to run "
                        "several (default: none)")
    p.add_argument("--quality", type=int, default=90, help="codec quality 1-100 for every codec (default 90)")
    p.add_argument("--limit-pairs", type=int, metavar="N",
                   help="use only the first N same and first N different pairs of each fold (for tests; default all)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"write the rows here (default {DEFAULT_JSON})")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1; 0 = let it decide)")
    p.add_argument("--no-cache", action="store_true", help="recompute every embedding (the cache is then refreshed)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["facelink", "bench", "verification", *argv])

    from facelink.runtime.alignment import canonical_template
    from facelink.runtime.codecs import UnknownCodecError, create_codec
    from facelink.runtime.detection import create_detector
    from facelink.runtime.manifest import ManifestError
    from facelink.runtime.recognition import create_recognizer

    if not 1 <= args.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {args.quality}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.limit_pairs is not None and args.limit_pairs < 1:
        parser.error(f"--limit-pairs must be at least 1, got {args.limit_pairs}")
    codec_ids = list(dict.fromkeys(args.codec or [NO_CODEC]))
    codecs = {}
    for codec_id in codec_ids:
        if codec_id != NO_CODEC:
            try:
                codecs[codec_id] = edge_default_codec() if codec_id == EDGE_CODEC else create_codec(codec_id, args.quality)
            except UnknownCodecError as error:
                parser.error(f"--codec: {error} (or {NO_CODEC}, or {EDGE_CODEC})")
    backend = BackendConfig(intra_op_threads=args.threads)
    recognizers = []
    # MobileFaceNet by name, not `auto`: `auto` became EdgeFace-XS, and the committed
    # verification.json (MobileFaceNet's rows, which the README quotes) must stay reproducible.
    for name in dict.fromkeys(args.recognizer or [DEFAULT_RECOGNIZER]):
        try:
            recognizers.append(create_recognizer(name, backend))
        except (ManifestError, FileNotFoundError, ImportError, RuntimeError) as error:
            print(f"error: recogniser {name!r}: {error}", file=sys.stderr)
            return 2

    try:
        lfw = LFW.locate(args.data)
    except DatasetNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pairs = limit_pairs(lfw.pairs(), args.limit_pairs)
    images = distinct_images(pairs)
    names = [_relative(p, lfw.image_dir) for p in images]
    index = {p: i for i, p in enumerate(images)}

    detector_config = DetectorConfig()
    crop = CanonicalCrop()
    detector = create_detector(detector_config)
    detector_manifest = getattr(detector, "manifest", None)
    detector_name = getattr(detector_manifest, "model_id", None) or detector.name
    template = canonical_template(crop.size, crop.scale)
    digest = pipeline_digest(images, lfw.image_dir, detector, crop, detector_config)

    jobs = []
    for recognizer in recognizers:
        for codec_id in codec_ids:
            quality = 0 if codec_id == NO_CODEC else args.quality  # quality means nothing without a codec
            key = codec_id
            if codec_id == EDGE_CODEC:  # the edge's own quality and ring, in the cache key too
                edge, ring = codecs[codec_id], codecs[codec_id].background
                quality, key = edge.quality, f"{EDGE_CODEC}-{edge.codec_id}-ring{ring.quality}s{ring.step}"
            # Keyed by the weights too: a re-exported model keeps its id (an int8 export of the
            # same id, a retrained query model) and must never read the old embeddings.
            weights = (recognizer.manifest.sha256 or "unpinned")[:12]
            path = cache_file(f"{recognizer.model_id}-{weights}", key, quality, digest)
            job = Job(recognizer, codec_id, quality if codec_id == EDGE_CODEC else args.quality, path, codecs.get(codec_id))
            if not args.no_cache:
                job.result = load_cache(path, names)
            jobs.append(job)

    started = time.perf_counter()
    todo = [job for job in jobs if job.result is None]
    if todo:
        log.info("embedding %d images for %d setting(s)", len(images), len(todo))
        embed_all(images, todo, detector, template)
        for job in todo:
            assert job.result is not None
            try:
                save_cache(job.cache_file, names, job.result)
            except OSError as error:
                log.warning("could not write the cache %s: %s", job.cache_file, error)
    elapsed = time.perf_counter() - started

    rows = [evaluate(job, pairs, index) for job in jobs]
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = machine_info(args.threads)
    print(format_report(rows, command, machine, date, detector_name))
    print(f"\nembedding: {elapsed:.1f} s for {len(todo)} setting(s) computed, {len(jobs) - len(todo)} from the cache")

    payload = {
        "benchmark": "verification",
        "command": command,
        "date": reporting.utc_now(),
        "machine": machine,
        "data": {"dataset": "LFW View 2 (pairs.txt)", "root": str(lfw.root), "limit_pairs": args.limit_pairs},
        "detector": detector_name,
        "selection": "central",
        "canonical_crop": crop.model_dump(),
        "fallback_landmarks_250": LFW_FALLBACK_LANDMARKS_250.tolist(),
        "embedding_seconds": elapsed,
        "rows": rows,
    }
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
