"""The codec's training set, built once and cached: aligned crops, landmarks, teacher embeddings.

What is cached (in `cache_dir()/codec/`, named by a hash of everything that determines it):

* `crops-<key>.npy`: (N, 128, 128, 3) uint8 RGB canonical crops -- exactly what the edge sends:
  YuNet landmarks, the face nearest the frame centre (the edge's and the benchmark's `central`
  policy), `warp_face` to `canonical_template(128, 1.0)`. Read back as a memory map, so training
  does not hold 470 MB in memory and starts instantly.
* `crops-<key>.npz`: the crops' landmarks (in crop and in frame coordinates), which source each
  crop came from, and MobileFaceNet embeddings of each crop's ArcFace re-warp, plain and
  mirrored (single views, ONNX Runtime, the deployed model), the identity loss's targets.
* `crops-<key>.json`: the source list, readable.

Sources: every image of ../shared/data/celeba-dev and `LFW.training_images()` -- never an image
that LFW's pairs.txt references (the test set). Images where YuNet finds no face are skipped and
counted. The full frames are not cached: full-frame batches decode their JPEGs on the fly (a
250x250 JPEG decodes in about a millisecond, against about a second per training step).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
from facelink.edge.pipeline import select_faces
from facelink.runtime.alignment import canonical_template, warp_face
from facelink.runtime.detection import FaceDetector, create_detector
from facelink.runtime.manifest import load_manifest
from facelink.runtime.recognition import OnnxRecognizer
from tqdm import tqdm

from facelink.config import CanonicalCrop, DetectorConfig, cache_dir
from facelink.datasets import LFW, CelebADev

#: Bump when the cache's content or layout changes, so an old cache is never reused.
CACHE_VERSION = 1
TEACHER_MANIFEST = "mobilefacenet"


@dataclass(frozen=True)
class Source:
    """One training picture: `name` is `<dataset>/<path inside the dataset>` (stable across machines)."""

    name: str
    path: Path
    identity: str
    dataset: str


def training_sources(lfw: LFW | None = None, celeba: CelebADev | None = None) -> list[Source]:
    """All of celeba-dev, then LFW's training images (pairs.txt images excluded), in a fixed order."""
    celeba = celeba or CelebADev.locate()
    lfw = lfw or LFW.locate(download=False)
    sources = [
        Source(f"celeba/{path.name}", path, f"celeba:{identity}", "celeba")
        for path, identity in celeba.items()
    ]
    sources += [
        Source(f"lfw/{path.parent.name}/{path.name}", path, f"lfw:{path.parent.name}", "lfw")
        for path in lfw.training_images()
    ]
    return sources


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@dataclass
class FaceCache:
    """The cached training set; arrays are indexed by crop (images without a face are absent)."""

    crops: np.ndarray  # (N, S, S, 3) uint8, memory-mapped
    crop_landmarks: np.ndarray  # (N, 5, 2) float32, in crop pixels
    frame_landmarks: np.ndarray  # (N, 5, 2) float32, in the source picture's pixels
    source_index: np.ndarray  # (N,) int: which of `sources`
    embeddings: np.ndarray  # (N, 2, dim) float32 unit vectors: [plain, mirrored] views
    sources: list[Source]
    skipped: int  # sources without a detected face

    def __len__(self) -> int:
        return len(self.crops)

    def source(self, index: int) -> Source:
        return self.sources[int(self.source_index[index])]

    def identities(self) -> np.ndarray:
        """(N,) identity label of each crop."""
        labels = np.array([s.identity for s in self.sources])
        return labels[self.source_index]

    def datasets(self) -> np.ndarray:
        names = np.array([s.dataset for s in self.sources])
        return names[self.source_index]

    def frame(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The full source picture of crop `index` and the face's landmarks in it."""
        return read_rgb(self.source(index).path), self.frame_landmarks[index]


def cache_key(
    sources: list[Source], detector: FaceDetector, detector_config: DetectorConfig, crop: CanonicalCrop
) -> str:
    """sha256 (16 hex digits) of every input and setting the cache depends on."""
    detector_manifest = getattr(detector, "manifest", None)
    header = {
        "version": CACHE_VERSION,
        "detector": detector.name,
        "detector_sha256": getattr(detector_manifest, "sha256", None),
        "detector_config": detector_config.model_dump(),
        "selection": "central",
        "crop": crop.model_dump(),
        "teacher_sha256": load_manifest(TEACHER_MANIFEST).sha256,
    }
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for source in sources:
        digest.update(f"\n{source.name}\t{source.identity}".encode())
    return digest.hexdigest()[:16]


def _single_view_recognizer() -> OnnxRecognizer:
    """MobileFaceNet through ONNX Runtime, one view per call: the training loss compares one
    view of the original with the same view of the reconstruction, so the cache keeps the plain
    and the mirrored embeddings apart instead of their flip-augmented sum."""
    manifest = load_manifest(TEACHER_MANIFEST)
    assert manifest.embedding is not None
    single = manifest.embedding.model_copy(update={"flip_augmentation": False, "normalize": True})
    return OnnxRecognizer(manifest.model_copy(update={"embedding": single}))


def _paths(key: str, root: Path) -> dict[str, Path]:
    return {ext: root / f"crops-{key}.{ext}" for ext in ("npy", "npz", "json")}


def build_cache(
    sources: list[Source],
    *,
    root: Path | None = None,
    crop: CanonicalCrop = CanonicalCrop(),
    detector_config: DetectorConfig = DetectorConfig(),
    progress: bool = True,
) -> FaceCache:
    """Load the cache for `sources`, building it first if it does not exist yet.

    Written to temporary names and renamed into place (the .npy last), so an interrupted build
    leaves nothing that a later run could mistake for a finished cache.
    """
    root = root or cache_dir() / "codec"
    detector = create_detector(detector_config)
    key = cache_key(sources, detector, detector_config, crop)
    paths = _paths(key, root)
    if not (paths["npy"].is_file() and paths["npz"].is_file()):
        _build(sources, detector, crop, paths, progress)
    return load_cache(paths["npy"], sources)


def load_cache(npy: Path, sources: list[Source]) -> FaceCache:
    meta = np.load(npy.with_suffix(".npz"))
    names = meta["names"].tolist()
    if names != [s.name for s in sources]:
        raise ValueError(f"{npy}: the cache was built from a different source list")
    return FaceCache(
        crops=np.load(npy, mmap_mode="r"),
        crop_landmarks=meta["crop_landmarks"],
        frame_landmarks=meta["frame_landmarks"],
        source_index=meta["source_index"],
        embeddings=meta["embeddings"],
        sources=sources,
        skipped=int(meta["skipped"]),
    )


def _build(
    sources: list[Source], detector: FaceDetector, crop: CanonicalCrop, paths: dict[str, Path], progress: bool
) -> None:
    template = canonical_template(crop.size, crop.scale)
    recognizer = _single_view_recognizer()
    n = len(sources)
    crops = np.zeros((n, crop.size, crop.size, 3), dtype=np.uint8)
    crop_landmarks = np.zeros((n, 5, 2), dtype=np.float32)
    frame_landmarks = np.zeros((n, 5, 2), dtype=np.float32)
    embeddings = np.zeros((n, 2, recognizer.dim), dtype=np.float32)
    kept = np.zeros(n, dtype=bool)
    for index, source in enumerate(tqdm(sources, desc="codec crops", unit="image", disable=not progress)):
        image = read_rgb(source.path)
        faces = select_faces(detector.detect(image), "central", image.shape)
        if not faces:
            continue
        kept[index] = True
        crops[index], crop_landmarks[index] = warp_face(image, faces[0].landmarks, template)
        frame_landmarks[index] = faces[0].landmarks
        face = recognizer.align(crops[index], crop_landmarks[index])
        embeddings[index] = recognizer.embed_aligned(np.stack([face, face[:, ::-1]]))
    root = paths["npy"].parent
    root.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps([{**asdict(s), "path": str(s.path)} for s in sources], indent=0))
    tmp_npz, tmp_npy = (p.with_name(p.name + ".tmp") for p in (paths["npz"], paths["npy"]))
    with open(tmp_npz, "wb") as f:
        np.savez(
            f,
            names=np.array([s.name for s in sources]),
            crop_landmarks=crop_landmarks[kept],
            frame_landmarks=frame_landmarks[kept],
            source_index=np.flatnonzero(kept),
            embeddings=embeddings[kept],
            skipped=np.int64(n - kept.sum()),
        )
    os.replace(tmp_npz, paths["npz"])
    with open(tmp_npy, "wb") as f:
        np.save(f, crops[kept])
    os.replace(tmp_npy, paths["npy"])


def main() -> None:
    """Build (or just report) the cache: `python -m facelink.export.codec.data`."""
    cache = build_cache(training_sources())
    print(
        f"{len(cache)} crops ({cache.skipped} pictures without a face), {cache.crops.nbytes / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    main()
