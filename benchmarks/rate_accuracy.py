"""Rate against recognition accuracy: how few bytes per face keep a recogniser as accurate as on
the original pictures, for facelink's learned codec and for the standard codecs.

Measured: verification accuracy (10 folds, mean ± std, the LFW protocol of `verification`)
against bits per pixel (bpp = 8 x bytes / coded pixels, totals over all images) and mean bytes
per face, for every codec setting:

- `original`: the original picture, detected and recognised (the reference);
- every quality 1..Q of every bundled learned codec (`runtime/manifests/codec-<name>.json`;
  they appear here as soon as their weights are committed);
- with `--face-aware NAME`, also codec NAME with its bits on the face (`learned:NAME+faces`,
  `runtime.codecs.face_aware`): on `full`, the encoder detects the faces on the original and
  codes the latent cells under each face's canonical crop at the quality, the rest at the
  coarse background of `config.FaceRegionCoding`; on `edge`, the canonical crop's ring of
  border cells at the background of `config.CropRegionCoding` (not on `edge112`, whose border
  is the face's own);
- the baselines of `baseline_codecs`: x265 over a CRF sweep that includes 23, JPEG, WebP, AVIF
  and JPEG XL over quality sweeps (`SWEEPS`).

Protocols (what is coded, and where the landmarks come from):

- `edge`: the device's path. YuNet finds the face nearest the centre on the ORIGINAL picture,
  the picture is warped to the canonical 128x128 crop (16,384 px), the crop is coded, and the
  recogniser embeds the decoded crop with the crop landmarks, exactly as the cloud does.
  `crop (not coded)` is the same without the codec: what the crop alone costs.
- `edge112`: the same with the plain ArcFace 112x112 crop (12,544 px). Recognising it re-warps
  with the crop landmarks: an identity warp (up to rounding) for a model on the ArcFace template
  (MobileFaceNet), an up-scaling one for dlib, whose chip reaches beyond the 112 crop (into the
  replicated border).
- `full`: as in the published work: the whole picture (LFW: 250x250 = 62,500 px) is coded, then
  detection, alignment and recognition all run on the reconstruction. When the detector finds no
  face on the reconstruction, the original's landmarks are used and the image is counted
  (`re-detect fallbacks`).

If the detector misses on an original picture, the fixed LFW deep-funneled landmarks
(`verification.fallback_landmarks`, scaled to the picture) stand in, counted as in `verification`.

Sets:

- `lfw`: LFW View 2, pairs.txt (6,000 pairs in 10 folds, 7,701 images).
- `celeba`: the ../shared CelebA-dev subset (4,092 pictures, 199 identities, longer side
  <= 320 px), with this deterministic pairs protocol (`celeba_pairs`, recorded in the JSON):
  identities with at least two pictures are ordered by sha256("<seed>:<identity>") (seed 0) and
  dealt round-robin into 10 folds, so folds are identity-disjoint; in each fold, 300 same pairs
  (every within-identity pair of pictures ranked by sha256 of "<seed>:<a>:<b>", then taken one
  identity at a time, round-robin, so large identities do not dominate) and 300 different pairs
  (the 300 lowest-ranked cross-identity pairs of the fold). Hashes, not a random generator, so
  the pairs do not depend on any library's version. NOTE: the learned codec trains on
  celeba-dev, so its CelebA rows are on training pictures, not held out.

Identity kept, per coded setting and recogniser: the cosine between each image's embedding after
coding and before (`identity cosine`, mean and 5th percentile over images). The reference is
the same protocol's uncoded crop (`edge`, `edge112`), so only the codec differs, or the original
picture (`full`). Accuracy on 6,000 pairs moves by a pair at a time and the folds' spread is a
few tenths, the size of the parity band; the cosine averages over every image and separates two
codecs whose accuracies the noise mixes up.

The same reading of each codec's curve of mean identity cosine against bpp gives the bpp at which
it keeps as much identity as x265 at CRF 23 (`× x265 CRF 23 bpp, same identity cosine`): a
comparison at x265's reference point that the pair noise does not blur.

Bits per pixel at parity, per set, recogniser, protocol and codec: the lowest bpp at which the
rate-accuracy curve comes within `TOLERANCE` (0.3) points of the originals' accuracy, the curve
being the monotone (non-decreasing) least-squares fit of the measured points, linear between
them in log-bpp (`parity` says why the fit). A curve already within the band at its lowest
measured rate reports that rate as an upper bound; a curve that never enters the band never
reaches parity. Reported with its ratio to the bpp of x265 at CRF 23 on the same set and
protocol (the issue's reference point).

Cost: every (setting, image) stores its payload size, PSNR, codec times and each recogniser's
embedding in an SQLite cache, `<cache>/rate_accuracy/cache.sqlite` (~/.cache/facelink,
$FACELINK_CACHE), keyed by everything that decides them (detector, crop, codec and its
parameters and versions, the recogniser's weights). A run is therefore incremental (a new
recogniser or codec setting computes only itself), resumable (killed runs keep what they
committed, every few seconds), and shared between `--limit-pairs` runs and the full run.
Settings run one after the other, so a partial run has finished settings. The per-image times
give each setting's cost, and its estimate for the whole set (no --limit-pairs), in the report.

Times: codec encode/decode per image on one thread (ONNX Runtime intra-op threads = 1 for the
learned codec, x265 `pools=1`, AVIF/JPEG XL `numthreads=1`), measured when the cache was filled.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as TypingProtocol

import numpy as np
from tqdm import tqdm

from facelink.config import (
    BackendConfig,
    CanonicalCrop,
    CropRegionCoding,
    DetectorConfig,
    FaceRegionCoding,
    cache_dir,
)
from facelink.datasets import LFW, CelebADev, DatasetNotFoundError, Pair

from . import reporting
from .faces import central_landmarks, detector_fingerprint
from .verification import (
    FAR_TARGET,
    distinct_images,
    eer,
    fallback_landmarks,
    fold_accuracy,
    limit_pairs,
    pair_scores,
    read_rgb,
    tar_at_far,
)

log = logging.getLogger(__name__)

DEFAULT_JSON = reporting.RESULTS_DIR / "rate_accuracy.json"
DEFAULT_PLOT = reporting.RESULTS_DIR / "rate_accuracy.png"
DEFAULT_RECOGNIZERS = ("mobilefacenet", "dlib-resnet-onnx")
TOLERANCE = 0.3  # accuracy points: "at parity" with the originals
REFERENCE = ("x265", 23)
#: Bumped whenever this file changes what goes into a cached number.
PIPELINE_VERSION = 1

#: Quality sweeps of the baselines: from well below parity to near-lossless, 7 points each.
SWEEPS: dict[str, tuple[int, ...]] = {
    "x265": (18, 23, 28, 32, 36, 40, 44),
    "jpeg": (5, 10, 20, 30, 50, 75, 90),
    "webp": (0, 5, 10, 20, 40, 60, 80),
    "avif": (0, 10, 20, 30, 45, 60, 75),
    "jxl": (1, 5, 10, 20, 35, 55, 75),
}
LEARNED = "learned"
FACE_AWARE = "+faces"  # suffix of a learned codec family with its bits on the face (`--face-aware`)
NOT_CODED = "none"
ORIGINAL = "original"

CELEBA_SEED = 0
CELEBA_FOLDS = 10
CELEBA_PAIRS = 300  # same, and as many different, per fold


class Codec(TypingProtocol):
    def encode(self, image: np.ndarray) -> bytes: ...

    def decode(self, data: bytes) -> np.ndarray: ...


# -- protocols, settings -------------------------------------------------------------------------
@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    template: Any | None  # runtime.alignment.Template of the coded crop; None = the whole picture

    def spec(self) -> dict[str, Any]:
        if self.template is None:
            return {"protocol": self.name}
        template = self.template
        return {"protocol": self.name, "template": template.points.tolist(), "size": list(template.size)}


def protocols() -> dict[str, Protocol]:
    from facelink.runtime.alignment import ARCFACE, canonical_template

    crop = CanonicalCrop()
    return {
        "edge": Protocol("edge", f"canonical {crop.size}x{crop.size} crop coded (aligned on the original)",
                         canonical_template(crop.size, crop.scale)),
        "edge112": Protocol("edge112", "ArcFace 112x112 crop coded (aligned on the original)", ARCFACE),
        "full": Protocol("full", "whole picture coded; detect, align, recognise on the reconstruction", None),
    }


@dataclass(frozen=True)
class Setting:
    """One thing to measure: a protocol and a codec at one quality (or no codec)."""

    protocol: str                # a protocol name, or ORIGINAL
    codec: str                   # a codec family (x265, jpeg, learned:<name>, ...) or NOT_CODED
    quality: int | None
    label: str
    spec: dict[str, Any] = field(compare=False)      # the codec and everything that decides its bytes
    geometry: dict[str, Any] = field(compare=False)  # what is coded: the protocol's crop, or the picture
    make: Callable[[], Codec] | None = field(default=None, compare=False)

    def key(self, pipeline: str) -> str:
        text = json.dumps({"pipeline": pipeline, "protocol": self.geometry, "codec": self.spec},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def learned_codecs() -> dict[str, tuple[str, int]]:
    """Bundled learned codecs: name -> (wire codec id, number of qualities); broken bundles skipped."""
    from facelink.runtime.codecs import create_codec
    from facelink.runtime.codecs.learned import codec_manifests, load_codec_manifest
    from facelink.runtime.manifest import ManifestError

    found = {}
    for name in sorted(codec_manifests()):
        try:
            qualities = load_codec_manifest(name)[0].qualities
            # Building one checks the tables' hash (the networks': on first use); the id is bound to
            # the weights, so the cache never mixes two trainings.
            found[name] = (create_codec(f"{LEARNED}:{name}", 1).codec_id, qualities)
        except ManifestError as error:
            log.warning("skipping learned codec %r: %s", name, error)
    return found


def face_aware_codec(protocol: str, name: str, quality: int) -> Codec:
    """Learned codec `name` at `quality` with its bits on the face: on whole pictures the faces the
    benchmark's detector finds, on the canonical crop all but its border ring."""
    from facelink.runtime.codecs import create_codec
    from facelink.runtime.codecs.face_aware import AlignedCropCodec, FaceAwareCodec
    from facelink.runtime.detection import create_detector

    codec = create_codec(f"{LEARNED}:{name}", quality)
    if protocol == "edge":
        return AlignedCropCodec(codec, CropRegionCoding())
    return FaceAwareCodec(codec, create_detector(DetectorConfig()), FaceRegionCoding())


#: The protocols where `--face-aware` adds settings, and what decides their bytes.
FACE_AWARE_PROTOCOLS = {"edge": CropRegionCoding, "full": FaceRegionCoding}


def codec_settings(protocol: Protocol, families: Sequence[str], sweeps: dict[str, Sequence[int]],
                   x265_preset: str, face_aware: Sequence[str] = (), face_aware_only: bool = False,
                   learned_qualities: Sequence[int] | None = None) -> list[Setting]:
    """The coded settings of one protocol: every learned codec at every quality (and, on `edge` and
    `full`, the `face_aware` ones with their bits on the face), then the baselines. With
    `face_aware_only`, the `face_aware` codecs are measured only with their bits on the face (what the
    edge sends by default) and the other learned codecs not at all: a new recogniser's column at
    about half the cost. `learned_qualities` limits every learned codec to those of its qualities."""
    from facelink.runtime.codecs import create_codec

    from .baseline_codecs import create_baseline

    geometry = protocol.spec()
    settings = [Setting(protocol.name, NOT_CODED, None, "crop (not coded)", {"codec": NOT_CODED}, geometry)] \
        if protocol.template is not None else []
    if LEARNED in families:
        for name, (codec_id, qualities) in learned_codecs().items():
            measured = [q for q in range(1, qualities + 1) if learned_qualities is None or q in learned_qualities]
            for q in measured if not face_aware_only else ():
                family = f"{LEARNED}:{name}"
                spec = {"codec": codec_id, "q": q}
                settings.append(Setting(protocol.name, family, q, f"{family} q{q}", spec, geometry,
                                        lambda n=name, q=q: create_codec(f"{LEARNED}:{n}", q)))
            if name in face_aware and protocol.name in FACE_AWARE_PROTOCOLS:
                regions = FACE_AWARE_PROTOCOLS[protocol.name]().model_dump(mode="json")
                for q in measured:
                    family = f"{LEARNED}:{name}{FACE_AWARE}"
                    # On `full` the detector is the benchmark's (DetectorConfig()), which the pipeline key holds.
                    spec = {"codec": codec_id, "q": q, "regions": regions}
                    settings.append(Setting(protocol.name, family, q, f"{family} q{q}", spec, geometry,
                                            lambda p=protocol.name, n=name, q=q: face_aware_codec(p, n, q)))
    for family in families:
        if family == LEARNED:
            continue
        options = {"preset": x265_preset} if family == "x265" else {}
        for q in sweeps[family]:
            codec = create_baseline(family, q, **options)
            settings.append(Setting(protocol.name, family, q, codec.label, codec.settings(), geometry,
                                    lambda f=family, q=q, o=options: create_baseline(f, q, **o)))
    return settings


# -- evaluation sets -----------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSet:
    name: str
    description: str
    root: Path                # image names in the cache are relative to it
    pairs: list[Pair]
    protocol: dict[str, Any]  # how the pairs were made (for the JSON)
    full_images: int          # distinct images without --limit-pairs: the unit of the cost estimates

    @property
    def images(self) -> list[Path]:
        return distinct_images(self.pairs)

    def image_name(self, path: Path) -> str:
        try:
            return f"{self.name}/{path.relative_to(self.root).as_posix()}"
        except ValueError:
            return f"{self.name}/{path.as_posix()}"


def _rank(*parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in parts).encode()).hexdigest()


def celeba_pairs(items: Sequence[tuple[Path, int]], seed: int = CELEBA_SEED, folds: int = CELEBA_FOLDS,
                 per_fold: int = CELEBA_PAIRS) -> list[Pair]:
    """The deterministic CelebA-dev verification protocol (see the module docstring).

    Raises ValueError if a fold cannot supply `per_fold` pairs of either kind.
    """
    by_identity: dict[int, list[Path]] = {}
    for path, identity in items:
        by_identity.setdefault(identity, []).append(path)
    usable = sorted((i for i, paths in by_identity.items() if len(paths) >= 2), key=lambda i: _rank(seed, i))
    if len(usable) < 2 * folds:
        raise ValueError(f"{len(usable)} identities with two or more pictures cannot fill {folds} folds")
    pairs: list[Pair] = []
    for fold in range(folds):
        members = usable[fold::folds]
        # Same pairs: each identity's pairs in hash order, identities taking turns.
        queues = []
        for identity in members:
            paths = sorted(set(by_identity[identity]), key=lambda p: p.name)
            candidates = [(a, b) for i, a in enumerate(paths) for b in paths[i + 1 :]]
            queues.append(sorted(candidates, key=lambda ab: _rank(seed, ab[0].name, ab[1].name)))
        same: list[tuple[Path, Path]] = []
        depth = 0
        while len(same) < per_fold and any(depth < len(q) for q in queues):
            same += [q[depth] for q in queues if depth < len(q)][: per_fold - len(same)]
            depth += 1
        # Different pairs: the lowest-ranked pairs of pictures of two different identities.
        owned = [(p, identity) for identity in members
                 for p in sorted(set(by_identity[identity]), key=lambda p: p.name)]
        different = sorted(
            ((a, b) for i, (a, ia) in enumerate(owned) for b, ib in owned[i + 1 :] if ia != ib),
            key=lambda ab: _rank(seed, ab[0].name, ab[1].name),
        )[:per_fold]
        if len(same) < per_fold or len(different) < per_fold:
            raise ValueError(f"fold {fold} has only {len(same)} same and {len(different)} different pairs")
        pairs += [Pair(a, b, True, fold) for a, b in same] + [Pair(a, b, False, fold) for a, b in different]
    return pairs


def load_set(name: str, lfw_data: str | None, celeba_data: str | None, limit: int | None) -> EvalSet:
    if name == "lfw":
        lfw = LFW.locate(lfw_data)
        pairs = lfw.pairs()
        return EvalSet("lfw", "LFW View 2 (pairs.txt)", lfw.root, limit_pairs(pairs, limit),
                       {"protocol": "pairs.txt, 10 folds x (300 same + 300 different)", "limit_pairs": limit},
                       len(distinct_images(pairs)))
    celeba = CelebADev.locate(celeba_data)
    protocol = {
        "protocol": f"{CELEBA_FOLDS} identity-disjoint folds x ({CELEBA_PAIRS} same + {CELEBA_PAIRS} "
                    "different), sha256-ranked (see benchmarks/rate_accuracy.py)",
        "seed": CELEBA_SEED, "folds": CELEBA_FOLDS, "pairs_per_kind_per_fold": CELEBA_PAIRS,
        "limit_pairs": limit,
        "note": "the learned codec trains on celeba-dev: its rows here are on training pictures",
    }
    pairs = celeba_pairs(celeba.items())
    return EvalSet("celeba", "CelebA-dev (../shared), facelink pairs protocol", celeba.root,
                   limit_pairs(pairs, limit), protocol, len(distinct_images(pairs)))


# -- the cache -----------------------------------------------------------------------------------
@dataclass
class Coded:
    bytes: int | None        # None when nothing is coded
    pixels: int
    psnr: float | None
    encode_ms: float
    decode_ms: float
    detect_ms: float         # re-detection on the reconstruction (full protocol), else 0
    redetected: bool | None  # full protocol: did the detector find the face on the reconstruction


class Store:
    """Per-image results in SQLite: one row per (setting, image), one per (setting, model, image)."""

    COMMIT_EVERY_S = 3.0

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # Two runs may share the cache (say, two protocols on two cores): rows wait in memory and
        # are written in one short transaction every COMMIT_EVERY_S, so neither run holds the
        # write lock while it computes (an open transaction between inserts starves the other).
        self.db = sqlite3.connect(path, timeout=60)
        self._pending: dict[str, list[tuple]] = {}
        self.db.execute("PRAGMA journal_mode=WAL")  # a killed run leaves the committed rows intact
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS located (pipeline TEXT, image TEXT, landmarks BLOB,
                PRIMARY KEY (pipeline, image));
            CREATE TABLE IF NOT EXISTS coded (setting TEXT, image TEXT, bytes INTEGER, pixels INTEGER,
                psnr REAL, encode_ms REAL, decode_ms REAL, detect_ms REAL, redetected INTEGER,
                PRIMARY KEY (setting, image));
            CREATE TABLE IF NOT EXISTS embedded (setting TEXT, model TEXT, image TEXT, vector BLOB, ms REAL,
                PRIMARY KEY (setting, model, image));
        """)
        self._last_commit = time.monotonic()

    def close(self) -> None:
        self.commit()
        self.db.close()

    def commit(self) -> None:
        """Write the pending rows, in one transaction."""
        with self.db:
            for sql, rows in self._pending.items():
                self.db.executemany(sql, rows)
        self._pending.clear()
        self._last_commit = time.monotonic()

    def maybe_commit(self) -> None:
        if time.monotonic() - self._last_commit > self.COMMIT_EVERY_S:
            self.commit()

    def _put(self, sql: str, row: tuple) -> None:
        self._pending.setdefault(sql, []).append(row)

    def located(self, pipeline: str) -> dict[str, np.ndarray | None]:
        rows = self.db.execute("SELECT image, landmarks FROM located WHERE pipeline = ?", (pipeline,))
        return {image: None if blob is None else np.frombuffer(blob, np.float32).reshape(5, 2)
                for image, blob in rows}

    def put_located(self, pipeline: str, image: str, landmarks: np.ndarray | None) -> None:
        blob = None if landmarks is None else np.asarray(landmarks, np.float32).tobytes()
        self._put("INSERT OR REPLACE INTO located VALUES (?, ?, ?)", (pipeline, image, blob))

    def coded(self, setting: str) -> dict[str, Coded]:
        rows = self.db.execute("SELECT image, bytes, pixels, psnr, encode_ms, decode_ms, detect_ms, "
                               "redetected FROM coded WHERE setting = ?", (setting,))
        return {r[0]: Coded(*r[1:7], None if r[7] is None else bool(r[7])) for r in rows}

    def put_coded(self, setting: str, image: str, c: Coded) -> None:
        self._put("INSERT OR REPLACE INTO coded VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (setting, image, c.bytes, c.pixels, c.psnr, c.encode_ms, c.decode_ms, c.detect_ms,
                   None if c.redetected is None else int(c.redetected)))

    def embedded(self, setting: str, model: str) -> dict[str, tuple[np.ndarray, float]]:
        rows = self.db.execute("SELECT image, vector, ms FROM embedded WHERE setting = ? AND model = ?",
                               (setting, model))
        return {image: (np.frombuffer(blob, np.float32), ms) for image, blob, ms in rows}

    def put_embedded(self, setting: str, model: str, image: str, vector: np.ndarray, ms: float) -> None:
        self._put("INSERT OR REPLACE INTO embedded VALUES (?, ?, ?, ?, ?)",
                  (setting, model, image, np.asarray(vector, np.float32).tobytes(), ms))


def model_key(recognizer) -> str:  # noqa: ANN001
    """The recogniser's id bound to its weights, so new weights never read old embeddings."""
    return f"{recognizer.model_id}:{(recognizer.manifest.sha256 or 'unpinned')[:12]}"


def pipeline_key(detector, detector_config: DetectorConfig) -> str:  # noqa: ANN001
    header = {"version": PIPELINE_VERSION, **detector_fingerprint(detector, detector_config),
              "fallback": fallback_landmarks((250, 250)).tolist()}
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:16]


# -- the measurement pass ------------------------------------------------------------------------
def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return None if mse == 0 else 10 * math.log10(255.0**2 / mse)


def locate_all(evalset: EvalSet, store: Store, pipeline: str, detector,  # noqa: ANN001
               refresh: bool) -> dict[str, np.ndarray | None]:
    """Landmarks of the central face on every original picture (None: not detected), cached."""
    found = {} if refresh else store.located(pipeline)
    todo = [p for p in evalset.images if evalset.image_name(p) not in found]
    for path in tqdm(todo, desc=f"{evalset.name}: detect", unit="image", file=sys.stderr, dynamic_ncols=True,
                     mininterval=0.1 if sys.stderr.isatty() else 15, disable=not todo):
        name = evalset.image_name(path)
        found[name] = central_landmarks(detector, read_rgb(path))
        store.put_located(pipeline, name, found[name])
        store.maybe_commit()
    store.commit()
    return found


def measure(evalset: EvalSet, settings: Sequence[Setting], recognizers: Sequence, store: Store, pipeline: str,
            detector, refresh: bool) -> None:  # noqa: ANN001
    """Fill the cache for every (setting, image, recogniser) it lacks, one setting after the other."""
    from facelink.runtime.alignment import warp_face

    landmarks = locate_all(evalset, store, pipeline, detector, refresh)
    templates = {name: p.template for name, p in protocols().items()}
    models = {model_key(r): r for r in recognizers}
    names = {evalset.image_name(p): p for p in evalset.images}
    plan = []
    for setting in settings:
        key = setting.key(pipeline)
        coded = {} if refresh else store.coded(key)
        have = {m: ({} if refresh else store.embedded(key, m)) for m in models}
        work = [(n, [m for m in models if n not in have[m]], n not in coded) for n in names]
        work = [(n, needed, new) for n, needed, new in work if needed or new]
        if work:
            plan.append((setting, key, work))
    total = sum(len(work) for _, _, work in plan)
    bar = tqdm(total=total, desc=f"{evalset.name}: measure", unit="face", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 15, disable=not total)
    for setting, key, work in plan:
        bar.set_postfix_str(f"{setting.protocol} {setting.label}")
        codec = setting.make() if setting.make is not None else None
        template = templates.get(setting.protocol)
        for name, needed, new in work:
            image = read_rgb(names[name])
            found = landmarks[name]
            points = found if found is not None else fallback_landmarks(image.shape)
            source = image
            if template is not None:
                source, points = warp_face(image, points, template)
            face, encode_ms, decode_ms, detect_ms, size, redetected = source, 0.0, 0.0, 0.0, None, None
            if codec is not None:
                t0 = time.perf_counter()
                data = codec.encode(source)
                t1 = time.perf_counter()
                face = codec.decode(data)
                t2 = time.perf_counter()
                encode_ms, decode_ms, size = (t1 - t0) * 1e3, (t2 - t1) * 1e3, len(data)
                if template is None:  # full frame: find the face again, on what the cloud received
                    again = central_landmarks(detector, face)
                    detect_ms = (time.perf_counter() - t2) * 1e3
                    redetected = again is not None
                    points = again if again is not None else points
            if new:
                psnr = _psnr(source, face) if codec is not None else None
                store.put_coded(key, name, Coded(size, int(source.shape[0] * source.shape[1]), psnr,
                                                 encode_ms, decode_ms, detect_ms, redetected))
            for model in needed:
                t0 = time.perf_counter()
                vector = models[model].embed(face, points)
                store.put_embedded(key, model, name, vector, (time.perf_counter() - t0) * 1e3)
            store.maybe_commit()
            bar.update()
    bar.close()
    store.commit()


# -- evaluation ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Parity:
    bpp: float | None
    status: str  # "interpolated", "at or below the lowest rate measured", "not reached"


def monotone_fit(values: Sequence[float]) -> np.ndarray:
    """The least-squares non-decreasing fit of `values` (pool adjacent violators)."""
    blocks: list[tuple[float, int]] = []  # (mean, count) of runs pooled so far
    for value in values:
        mean, count = float(value), 1
        while blocks and blocks[-1][0] > mean:
            last_mean, last_count = blocks.pop()
            mean, count = (last_mean * last_count + mean * count) / (last_count + count), last_count + count
        blocks.append((mean, count))
    return np.repeat([m for m, _ in blocks], [n for _, n in blocks])


def parity(bpp: Sequence[float], accuracy: Sequence[float], reference: float,
           tolerance: float = TOLERANCE) -> Parity:
    """The lowest bpp at which accuracy comes within `tolerance` points of `reference`.

    Accuracy cannot really fall when a codec spends more bits, but measured curves wiggle: on
    6,000 pairs one pair is 0.017 points and the fold noise is a few tenths, the size of the
    band. So the curve (points sorted by bpp) is first replaced by its monotone least-squares
    fit (`monotone_fit`): a lucky low-rate point is pooled with its worse neighbours instead of
    claiming parity, and an unlucky finest setting is pooled with the ones below it instead of
    denying it. Then the fit is joined linearly in log(bpp) and the first crossing into the
    band is the parity point. A point above the reference counts as within.
    """
    if len(bpp) != len(accuracy) or not len(bpp):
        raise ValueError("parity needs as many accuracies as rates, and at least one")
    order = np.argsort(np.asarray(bpp, dtype=np.float64), kind="stable")
    rates = np.asarray(bpp, dtype=np.float64)[order]
    if np.any(rates <= 0):
        raise ValueError("bits per pixel must be positive")
    fit = monotone_fit(np.asarray(accuracy, dtype=np.float64)[order])
    target = reference - tolerance
    inside = fit >= target
    if not inside[-1]:
        return Parity(None, "not reached")
    k = int(np.argmax(inside))  # the first point in the band (the fit never leaves it again)
    if k == 0:
        return Parity(float(rates[0]), "at or below the lowest rate measured")
    t = (target - fit[k - 1]) / (fit[k] - fit[k - 1])
    log_rate = math.log(rates[k - 1]) + t * (math.log(rates[k]) - math.log(rates[k - 1]))
    return Parity(math.exp(log_rate), "interpolated")


def identity_references(settings: Sequence[Setting]) -> dict[str, Setting]:
    """Per protocol, the uncoded setting its coded ones are compared with (`identity cosine`): the
    protocol's own crop, not coded, or for whole pictures (no crop) the original."""
    original = next((s for s in settings if s.protocol == ORIGINAL), None)
    references = {s.protocol: s for s in settings if s.make is None and s.protocol != ORIGINAL}
    for s in settings:
        if s.protocol != ORIGINAL and s.protocol not in references and original is not None:
            references[s.protocol] = original
    return references


def identity_cosine(coded: np.ndarray, uncoded: np.ndarray) -> dict[str, float]:
    """Per image, the cosine between its embedding after coding and before: mean and 5th percentile."""
    n = len(coded)
    cosine = pair_scores(np.concatenate([coded, uncoded]), np.arange(n), np.arange(n, 2 * n))
    return {"mean": float(cosine.mean()), "p5": float(np.percentile(cosine, 5))}


def stored_embeddings(evalset: EvalSet, store: Store, key: str, model: str) -> np.ndarray | None:
    """A setting's embeddings of the set's images, in image order; None if any is missing."""
    stored = store.embedded(key, model)
    names = [evalset.image_name(p) for p in evalset.images]
    return np.stack([stored[n][0] for n in names]) if all(n in stored for n in names) else None


def evaluate(evalset: EvalSet, setting: Setting, recognizer, store: Store, pipeline: str,  # noqa: ANN001
             landmarks: dict[str, np.ndarray | None], uncoded: np.ndarray | None = None) -> dict[str, Any]:
    """One row of the report: a setting's accuracy with one recogniser, its rate, PSNR and times,
    and (coded settings, given the `uncoded` reference's embeddings in image order) how much of each
    face's identity it keeps."""
    key = setting.key(pipeline)
    images = evalset.images
    names = [evalset.image_name(p) for p in images]
    stored = store.embedded(key, model_key(recognizer))
    coded = store.coded(key)
    missing = [n for n in names if n not in stored or n not in coded]
    if missing:
        raise RuntimeError(f"{setting.label}: {len(missing)} images were not measured (first: {missing[0]})")
    embeddings = np.stack([stored[n][0] for n in names])
    index = {p: i for i, p in enumerate(images)}
    a = np.array([index[p.a] for p in evalset.pairs])
    b = np.array([index[p.b] for p in evalset.pairs])
    same = np.array([p.same for p in evalset.pairs])
    folds = np.array([p.fold for p in evalset.pairs])
    scores = pair_scores(embeddings, a, b)
    accs, _ = fold_accuracy(scores, same, folds)
    rows = [coded[n] for n in names]
    sizes = np.array([r.bytes or 0 for r in rows], dtype=np.float64)
    pixels = np.array([r.pixels for r in rows], dtype=np.float64)
    psnrs = [r.psnr for r in rows if r.psnr is not None]
    encoded = setting.make is not None
    embed_ms = np.array([stored[n][1] for n in names])
    kept = identity_cosine(embeddings, uncoded) if encoded and uncoded is not None else None
    return {
        "set": evalset.name,
        "recognizer": recognizer.model_id,
        "protocol": setting.protocol,
        "codec": setting.codec,
        "quality": setting.quality,
        "label": setting.label,
        "settings": setting.spec,
        "images": len(names),
        "pairs": len(evalset.pairs),
        "folds": int(np.unique(folds).size),
        "pixels_per_face": float(pixels.mean()),
        "bytes_per_face": float(sizes.mean()) if encoded else None,
        "bpp": float(8 * sizes.sum() / pixels.sum()) if encoded else None,
        "psnr_db": float(np.mean(psnrs)) if psnrs else None,
        "accuracy_mean": float(100 * accs.mean()),
        "accuracy_std": float(100 * accs.std()),
        "fold_accuracies": [float(100 * x) for x in accs],
        "tar_at_far": float(100 * tar_at_far(scores, same, FAR_TARGET)),
        "eer": float(100 * eer(scores, same)),
        "identity_cosine": kept,  # vs the uncoded reference; None when nothing is coded
        "faces_not_detected": sum(landmarks[n] is None for n in names),
        "redetect_fallbacks": (sum(r.redetected is False for r in rows)
                               if setting.protocol == "full" else None),
        "encode_ms": _stats([r.encode_ms for r in rows]) if encoded else None,
        "decode_ms": _stats([r.decode_ms for r in rows]) if encoded else None,
        # What one image costs this benchmark: coding and re-detection once, embedding per recogniser.
        "coding_ms_per_image": float(np.mean([r.encode_ms + r.decode_ms + r.detect_ms for r in rows])),
        "embed_ms_per_image": float(embed_ms.mean()),
    }


def _stats(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p95": float(np.percentile(v, 95))}


def parity_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One parity point per (set, recogniser, protocol, codec family), with its ratio to x265 CRF 23;
    and where the curve keeps as much identity as x265 CRF 23 (the same `parity` reading of the
    monotone fit, on the mean identity cosine, with x265 CRF 23's cosine as the target)."""
    originals = {(r["set"], r["recognizer"]): r["accuracy_mean"] for r in rows if r["protocol"] == ORIGINAL}
    reference = {(r["set"], r["protocol"]): r["bpp"] for r in rows if (r["codec"], r["quality"]) == REFERENCE}
    kept_by_x265 = {(r["set"], r["recognizer"], r["protocol"]): r["identity_cosine"]["mean"]
                    for r in rows if (r["codec"], r["quality"]) == REFERENCE and r.get("identity_cosine")}
    curves: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r["bpp"] is not None:
            curves.setdefault((r["set"], r["recognizer"], r["protocol"], r["codec"]), []).append(r)
    out = []
    for (set_name, recognizer, protocol, codec), curve in curves.items():
        original = originals[(set_name, recognizer)]
        point = parity([r["bpp"] for r in curve], [r["accuracy_mean"] for r in curve], original)
        x265 = reference.get((set_name, protocol))
        pixels = curve[0]["pixels_per_face"]
        target = kept_by_x265.get((set_name, recognizer, protocol))
        matched = None
        if target is not None and all(r.get("identity_cosine") for r in curve):
            matched = parity([r["bpp"] for r in curve], [r["identity_cosine"]["mean"] for r in curve],
                             target, tolerance=0.0)
        same_identity = None if matched is None else matched.bpp
        out.append({
            "set": set_name, "recognizer": recognizer, "protocol": protocol, "codec": codec,
            "original_accuracy": original, "tolerance": TOLERANCE,
            "bpp": point.bpp, "status": point.status,
            "bytes_per_face": None if point.bpp is None else point.bpp * pixels / 8,
            "x265_crf23_bpp": x265,
            "ratio_to_x265_crf23": None if point.bpp is None or x265 is None else point.bpp / x265,
            "x265_crf23_identity_cosine": target,
            "bpp_at_x265_crf23_identity": same_identity,
            "identity_status": None if matched is None else matched.status,
            "identity_ratio_to_x265_crf23": (None if same_identity is None or x265 is None
                                             else same_identity / x265),
        })
    return out


# -- report --------------------------------------------------------------------------------------
def _acc(row: dict[str, Any]) -> str:
    return f"{row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f}"


def _identity_match(p: dict[str, Any]) -> str:
    """The ratio at x265 CRF 23's identity cosine, marked when it is a bound or not reached."""
    status = p.get("identity_status")
    if status is None:
        return "-"
    if status == "not reached":
        return "not reached"
    return ("≤ " if status.startswith("at or below") else "") + _num(p["identity_ratio_to_x265_crf23"], ".2f")


def _cosine(row: dict[str, Any] | None) -> str:
    kept = row and row.get("identity_cosine")
    return f"{kept['mean']:.4f}" if kept else "-"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_report(rows: list[dict[str, Any]], parities: list[dict[str, Any]], header: list[str],
                  protocol_info: dict[str, Protocol]) -> str:
    lines = [*header]
    recognizers = list(dict.fromkeys(r["recognizer"] for r in rows))
    for set_name in dict.fromkeys(r["set"] for r in rows):
        in_set = [r for r in rows if r["set"] == set_name]
        originals = {r["recognizer"]: r for r in in_set if r["protocol"] == ORIGINAL}
        first = in_set[0]
        lines += ["", f"## {set_name}: {first['pairs']} pairs in {first['folds']} folds, "
                      f"{first['images']} images", ""]
        for protocol in dict.fromkeys(r["protocol"] for r in in_set if r["protocol"] != ORIGINAL):
            full = protocol == "full"
            head = ["codec", "bytes/face", "bpp", "PSNR dB", *[f"{m} acc %" for m in recognizers],
                    "identity cosine (" + " / ".join(recognizers) + ")",
                    *(["re-detect fallbacks"] if full else []), "encode ms", "decode ms"]
            table = [["original", "-", "-", "-", *[_acc(originals[m]) for m in recognizers], "-",
                      *(["-"] if full else []), "-", "-"]]
            by_label: dict[str, dict[str, dict[str, Any]]] = {}
            for r in in_set:
                if r["protocol"] == protocol:
                    by_label.setdefault(r["label"], {})[r["recognizer"]] = r
            for label, per_model in by_label.items():
                r = next(iter(per_model.values()))
                table.append([
                    label, _num(r["bytes_per_face"], ".0f"), _num(r["bpp"], ".3f"), _num(r["psnr_db"], ".2f"),
                    *[_acc(per_model[m]) if m in per_model else "-" for m in recognizers],
                    " / ".join(_cosine(per_model.get(m)) for m in recognizers),
                    *([_num(r["redetect_fallbacks"], "d")] if full else []),
                    _num(r["encode_ms"] and r["encode_ms"]["median"], ".2f"),
                    _num(r["decode_ms"] and r["decode_ms"]["median"], ".2f"),
                ])
            pixels = next(iter(next(iter(by_label.values())).values()))["pixels_per_face"]
            lines += [f"### protocol {protocol}: {protocol_info[protocol].description}, {pixels:.0f} px/face",
                      "", *reporting.markdown_table(head, table), ""]
        in_parity = [p for p in parities if p["set"] == set_name]
        table = [[p["protocol"], p["recognizer"], p["codec"], f"{p['original_accuracy']:.2f}",
                  ("≤ " if p["status"].startswith("at or below") else "") + _num(p["bpp"], ".3f"),
                  _num(p["bytes_per_face"], ".0f"), _num(p["ratio_to_x265_crf23"], ".2f"),
                  _identity_match(p), p["status"] if p["status"] != "interpolated" else ""]
                 for p in sorted(in_parity, key=lambda p: (p["protocol"], p["recognizer"]))]
        head = ["protocol", "recogniser", "codec", "originals %", "bpp at parity", "bytes/face at parity",
                "× x265 CRF 23 bpp", "× x265 CRF 23 bpp, same identity cosine", "note"]
        lines += [f"### parity: lowest bpp at which accuracy (monotone fit) comes within {TOLERANCE} points"
                  " of the originals", "", *reporting.markdown_table(head, table)]
        x265 = [r for r in in_set
                if (r["codec"], r["quality"]) == REFERENCE and r["recognizer"] == recognizers[0]]
        if x265:
            lines += ["", "x265 CRF 23 lands at: " + "; ".join(
                f"{r['protocol']} {r['bytes_per_face']:.0f} bytes/face = {r['bpp']:.3f} bpp" for r in x265)]
    lines += ["", ("accuracy: 10-fold, threshold chosen on the other folds, mean ± std over folds;"
                   " bpp: 8 x total bytes / total coded pixels; identity cosine: mean over images of the"
                   " cosine between the embedding after coding and before (the protocol's uncoded crop,"
                   " or the original picture); encode/decode: median ms per image, one"
                   " thread, measured when the cache was filled.")]
    return "\n".join(lines)


def cost_table(rows: list[dict[str, Any]],
               full_images: dict[str, int]) -> tuple[list[str], list[dict[str, Any]]]:
    """Codec latency and benchmark cost per (set, protocol, codec family), with a whole-set estimate.

    A setting costs its coding (encode, decode, re-detection) once per image plus every
    recogniser's embedding; the estimate multiplies that by the set's images without
    --limit-pairs (`full_images`: LFW View 2 has 7,701).
    """
    settings: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        settings.setdefault((r["set"], r["protocol"], r["label"]), []).append(r)
    groups: dict[tuple[str, str, str], list[list[dict[str, Any]]]] = {}
    for (set_name, protocol, _), per_model in settings.items():
        groups.setdefault((set_name, protocol, per_model[0]["codec"]), []).append(per_model)

    def median_ms(members: list[list[dict[str, Any]]], what: str) -> float | None:
        if members[0][0][what] is None:
            return None
        return float(np.median([m[0][what]["median"] for m in members]))

    entries = []
    for (set_name, protocol, codec), members in groups.items():
        per_setting = [m[0]["coding_ms_per_image"] + sum(r["embed_ms_per_image"] for r in m)
                       for m in members]
        entries.append({
            "set": set_name, "protocol": protocol, "codec": codec, "settings": len(members),
            "encode_ms_median": median_ms(members, "encode_ms"),
            "decode_ms_median": median_ms(members, "decode_ms"),
            "ms_per_image_per_setting": float(np.mean(per_setting)),
            "full_set_minutes": float(np.sum(per_setting) * full_images[set_name] / 6e4),
        })
    table = [[e["set"], e["protocol"], e["codec"], str(e["settings"]), _num(e["encode_ms_median"], ".2f"),
              _num(e["decode_ms_median"], ".2f"), f"{e['ms_per_image_per_setting']:.1f}",
              f"{e['full_set_minutes'] / e['settings']:.1f}", f"{e['full_set_minutes']:.0f}"]
             for e in entries]
    hours = {name: sum(e["full_set_minutes"] for e in entries if e["set"] == name) / 60
             for name in full_images}
    head = ["set", "protocol", "codec", "settings", "encode ms", "decode ms", "ms / image / setting",
            "whole set min / setting", "whole set min"]
    lines = ["", ("codec latency (median over images, then over the qualities; one thread) and benchmark cost"
                  " (coding + re-detection + every recogniser; times from when the cache was filled):"), "",
             *reporting.markdown_table(head, table), "",
             "estimated whole-set run of these settings from an empty cache: "
             + "; ".join(f"{name} ({n} images) {hours[name]:.1f} h" for name, n in full_images.items())]
    return lines, entries


def _bpp_axis(ax) -> None:  # noqa: ANN001
    """Log bits per pixel, labelled in plain numbers (0.3, 0.4, ...: '3x10^-1' labels collide)."""
    from matplotlib.ticker import FormatStrFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%.2g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("bits per pixel")


def _identity_panel(ax, rows: list[dict[str, Any]], set_name: str, protocol: str,  # noqa: ANN001
                    recognizer: str) -> None:
    """Mean identity cosine against bpp, one curve per codec family (same colours as above)."""
    curve = [r for r in rows if r["protocol"] == protocol and r["recognizer"] == recognizer
             and r["bpp"] and r.get("identity_cosine")]
    for codec in dict.fromkeys(r["codec"] for r in curve):
        points = sorted((r["bpp"], r["identity_cosine"]["mean"]) for r in curve if r["codec"] == codec)
        ax.plot(*zip(*points), marker="o", ms=3, label=codec)
    for r in curve:
        if (r["codec"], r["quality"]) == REFERENCE:
            ax.plot(r["bpp"], r["identity_cosine"]["mean"], marker="*", ms=12, color="k", ls="none",
                    label="x265 CRF 23")
    # Zoom on the learned codecs and x265 CRF 23 (the coarsest baselines would squash them).
    focus = [r["identity_cosine"]["mean"] for r in curve
             if r["codec"].startswith(LEARNED) or (r["codec"], r["quality"]) == REFERENCE]
    if focus:
        ax.set_ylim(1 - 1.5 * (1 - min(focus)), 1.0)
    _bpp_axis(ax)
    ax.set_title(f"{set_name}, {protocol}, {recognizer}: identity kept", fontsize=9)
    ax.set_ylabel("cosine to the uncoded embedding")
    ax.grid(True, which="both", alpha=0.3)


def plot(rows: list[dict[str, Any]], set_name: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    in_set = [r for r in rows if r["set"] == set_name]
    recognizers = list(dict.fromkeys(r["recognizer"] for r in in_set))
    protocol_names = list(dict.fromkeys(r["protocol"] for r in in_set if r["protocol"] != ORIGINAL))
    # Per protocol two rows of panels: verification accuracy, then the identity cosine (less noisy).
    fig, axes = plt.subplots(2 * len(protocol_names), len(recognizers), squeeze=False,
                             figsize=(5.5 * len(recognizers), 4.2 * 2 * len(protocol_names)))
    for i, protocol in enumerate(protocol_names):
        for j, recognizer in enumerate(recognizers):
            _identity_panel(axes[2 * i + 1][j], in_set, set_name, protocol, recognizer)
            ax = axes[2 * i][j]
            original = next(r for r in in_set if r["protocol"] == ORIGINAL and r["recognizer"] == recognizer)
            ref = original["accuracy_mean"]
            ax.axhspan(ref - TOLERANCE, ref + TOLERANCE, color="0.85", label=f"originals ± {TOLERANCE}")
            ax.axhline(ref, color="0.4", lw=0.8)
            curve = [r for r in in_set
                     if r["protocol"] == protocol and r["recognizer"] == recognizer and r["bpp"]]
            lowest = ref
            for codec in dict.fromkeys(r["codec"] for r in curve):
                points = sorted((r["bpp"], r["accuracy_mean"]) for r in curve if r["codec"] == codec)
                ax.plot(*zip(*points), marker="o", ms=3, label=codec)
                lowest = min(lowest, *(a for _, a in points))
            for r in curve:
                if (r["codec"], r["quality"]) == REFERENCE:
                    ax.plot(r["bpp"], r["accuracy_mean"], marker="*", ms=12, color="k", ls="none",
                            label="x265 CRF 23")
            _bpp_axis(ax)
            ax.set_ylim(max(lowest - 0.5, ref - 10), ref + 1.0)
            ax.set_title(f"{set_name}, {protocol}, {recognizer}", fontsize=9)
            ax.set_ylabel("verification accuracy %")
            ax.grid(True, which="both", alpha=0.3)
    legend: dict[str, Any] = {}  # one entry per label, whichever panel drew it
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    ncol = min(8, len(legend))
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=ncol, fontsize=8)
    # Keep the panels (and their x labels) above the legend, however many rows it needs.
    legend_rows = -(-len(legend) // ncol)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * legend_rows) / fig.get_figheight(), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench rate-accuracy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + """

Verification accuracy (10 folds) against bits per pixel and bytes per face for the originals,
every quality of every bundled learned codec, and the standard codecs (x265 CRF sweep, JPEG,
WebP, AVIF, JPEG XL), under the edge protocol (code the aligned crop: edge = canonical 128x128,
edge112 = ArcFace 112x112) and the full-frame protocol (code the picture, detect and recognise
on the reconstruction); then the bpp at parity (within 0.3 points of the originals) and its
ratio to x265 CRF 23. Everything per image is cached (~/.cache/facelink/rate_accuracy/), so
runs are incremental and resumable. See `pydoc facelink.benchmarks.rate_accuracy`.""",
        epilog="""\
examples:
  facelink bench rate-accuracy -- --limit-pairs 100
  facelink bench rate-accuracy -- --protocols edge,full --codecs x265,jpeg
  facelink bench rate-accuracy -- --codecs jpeg --quality jpeg=30,50 --recognizer mobilefacenet
  facelink bench rate-accuracy -- --protocols edge,full --codecs learned,x265 --face-aware wide
  facelink bench rate-accuracy -- --sets lfw,celeba --codecs learned,x265""",
    )
    p.add_argument("--sets", type=_csv, default=["lfw"],
                   help="lfw, celeba or both, comma-separated (default lfw)")
    p.add_argument("--data", help="LFW folder (default: the project's LFW lookup)")
    p.add_argument("--celeba-data", help="CelebA-dev folder (default: ../shared/data/celeba-dev)")
    p.add_argument("--recognizer", action="append", metavar="NAME",
                   help=f"manifest name or path, repeatable (default: {', '.join(DEFAULT_RECOGNIZERS)})")
    p.add_argument("--protocols", type=_csv, default=["edge", "edge112", "full"],
                   help="edge, edge112, full, comma-separated (default all)")
    p.add_argument("--codecs", type=_csv, default=[LEARNED, *SWEEPS],
                   help=f"codec families, comma-separated: {LEARNED}, {', '.join(SWEEPS)} (default all)")
    p.add_argument("--face-aware", type=_csv, default=[], metavar="NAME,NAME",
                   help="learned codecs (bundle names, e.g. wide) also measured with their bits on the face: "
                        "on full, the detected faces' crops at the quality, the rest coarse; on edge, the "
                        "crop's border ring coarse (default none)")
    p.add_argument("--face-aware-only", action="store_true",
                   help="measure the --face-aware codecs only with their bits on the face, and no other "
                        "learned codec (the edge's defaults only; for a new recogniser's column)")
    p.add_argument("--learned-quality", type=lambda s: [int(q) for q in _csv(s)], metavar="Q,Q",
                   help="only these qualities of the learned codecs (default every one)")
    p.add_argument("--quality", action="append", default=[], metavar="FAMILY=Q,Q",
                   help="override a baseline's sweep, e.g. jpeg=30,50 (repeatable)")
    p.add_argument("--x265-preset", default="medium", help="x265 preset (default medium)")
    p.add_argument("--limit-pairs", type=int, metavar="N",
                   help="only the first N same and N different pairs of each fold (default all)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--plot", type=Path, default=DEFAULT_PLOT,
                   help=f"PNG plot for LFW; CelebA's gets -celeba in the name (default {DEFAULT_PLOT})")
    p.add_argument("--threads", type=int, default=1,
                   help="ONNX Runtime intra-op threads for recognisers (default 1)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute everything (the cache is then refreshed)")
    return p


def _sweeps(parser: argparse.ArgumentParser, overrides: list[str]) -> dict[str, tuple[int, ...]]:
    sweeps = dict(SWEEPS)
    for item in overrides:
        family, _, values = item.partition("=")
        if family not in SWEEPS or not values:
            parser.error(f"--quality {item!r}: expected FAMILY=Q,Q with FAMILY one of {', '.join(SWEEPS)}")
        try:
            sweeps[family] = tuple(int(v) for v in _csv(values))
        except ValueError:
            parser.error(f"--quality {item!r}: qualities must be integers")
    return sweeps


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["facelink", "bench", "rate-accuracy", *argv])
    protocol_info = protocols()
    choices = (("--sets", args.sets, ("lfw", "celeba")),
               ("--protocols", args.protocols, tuple(protocol_info)),
               ("--codecs", args.codecs, (LEARNED, *SWEEPS)))
    for option, given, allowed in choices:
        unknown = sorted(set(given) - set(allowed))
        if unknown or not given:
            parser.error(f"{option}: expected some of {', '.join(allowed)}, "
                         f"got {', '.join(unknown) or 'nothing'}")
    if args.face_aware:
        bundled = learned_codecs()
        unknown = sorted(set(args.face_aware) - set(bundled))
        if unknown or not set(FACE_AWARE_PROTOCOLS) & set(args.protocols) or LEARNED not in args.codecs:
            parser.error(f"--face-aware: expected bundled learned codecs ({', '.join(bundled)}) with --protocols "
                         f"including edge or full and --codecs including {LEARNED}, got {', '.join(args.face_aware)}")
    if args.face_aware_only and not args.face_aware:
        parser.error("--face-aware-only needs --face-aware NAME,NAME")
    if args.limit_pairs is not None and args.limit_pairs < 1:
        parser.error(f"--limit-pairs must be at least 1, got {args.limit_pairs}")
    sweeps = _sweeps(parser, args.quality)

    from facelink.runtime.detection import create_detector
    from facelink.runtime.manifest import ManifestError
    from facelink.runtime.recognition import create_recognizer

    backend = BackendConfig(intra_op_threads=args.threads)
    recognizers = []
    for name in dict.fromkeys(args.recognizer or DEFAULT_RECOGNIZERS):
        try:
            recognizers.append(create_recognizer(name, backend))
        except (ManifestError, FileNotFoundError, ImportError, RuntimeError) as error:
            hint = (" (create it with `python -m facelink.export.dlib_convert --out "
                    "~/.cache/facelink/models/dlib-resnet.onnx`)") if "dlib-resnet-onnx" in str(name) else ""
            print(f"error: recogniser {name!r}: {error}{hint}", file=sys.stderr)
            return 2
    try:
        evalsets = [load_set(name, args.data, args.celeba_data, args.limit_pairs) for name in args.sets]
        original = Setting(ORIGINAL, NOT_CODED, None, ORIGINAL, {"codec": NOT_CODED}, {"protocol": ORIGINAL})
        settings = [original]
        for name in args.protocols:
            settings += codec_settings(protocol_info[name], args.codecs, sweeps, args.x265_preset, args.face_aware,
                                       args.face_aware_only, args.learned_quality)
    except (DatasetNotFoundError, ImportError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    detector_config = DetectorConfig()
    detector = create_detector(detector_config)
    pipeline = pipeline_key(detector, detector_config)
    store = Store(cache_dir() / "rate_accuracy" / "cache.sqlite")
    started = time.perf_counter()
    rows = []
    try:
        for evalset in evalsets:
            measure(evalset, settings, recognizers, store, pipeline, detector, args.no_cache)
            landmarks = store.located(pipeline)
            # Each protocol's uncoded embeddings, read once per recogniser, not once per setting.
            uncoded = {(protocol, model_key(r)): stored_embeddings(evalset, store, s.key(pipeline), model_key(r))
                       for protocol, s in identity_references(settings).items() for r in recognizers}
            rows += [evaluate(evalset, s, r, store, pipeline, landmarks,
                              uncoded.get((s.protocol, model_key(r))))
                     for s in settings for r in recognizers]
    finally:
        store.close()
    wall = time.perf_counter() - started
    parities = parity_rows(rows)

    machine = reporting.machine_info(intra_op_threads=args.threads)
    detector_name = getattr(getattr(detector, "manifest", None), "model_id", None) or detector.name
    header = [
        f"command: {command}",
        f"{reporting.machine_line(machine)} (1 thread per codec, {args.threads} per recogniser); "
        f"date: {reporting.utc_now()}",
        "sets: " + "; ".join(f"{s.name} = {s.description}, {len(s.pairs)} pairs, {len(s.images)} images"
                             for s in evalsets),
        f"detector: {detector_name}, face nearest the centre; "
        f"recognisers: {', '.join(r.model_id for r in recognizers)}",
    ]
    cost_lines, cost = cost_table(rows, {s.name: s.full_images for s in evalsets})
    report = format_report(rows, parities, header, protocol_info)
    print(report + "\n" + "\n".join(cost_lines))
    print(f"\nwall time of this run: {wall / 60:.1f} min (cached settings cost nothing)")

    plots = []
    for evalset in evalsets:
        suffix = "" if evalset.name == "lfw" else f"-{evalset.name}"
        path = args.plot.with_name(f"{args.plot.stem}{suffix}{args.plot.suffix}")
        plot(rows, evalset.name, path)
        plots.append(str(path))
    reporting.write_results(args.json, {
        "benchmark": "rate_accuracy",
        "command": command,
        "date": reporting.utc_now(),
        "machine": machine,
        "sets": {s.name: {"description": s.description, "root": str(s.root), "pairs": len(s.pairs),
                          "images": len(s.images), **s.protocol} for s in evalsets},
        "protocols": {name: protocol_info[name].description for name in args.protocols},
        "detector": detector_name,
        "tolerance_points": TOLERANCE,
        "reference": {"codec": REFERENCE[0], "crf": REFERENCE[1]},
        "sweeps": {family: list(sweeps[family]) for family in args.codecs if family in sweeps},
        "wall_seconds": wall,
        "rows": rows,
        "parity": parities,
        "cost": cost,
        "plots": plots,
    })
    print(f"wrote {args.json} and {', '.join(plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
