"""Real LFW embeddings for the gallery-scale benchmark: every LFW picture through the edge path
(YuNet, central face, ArcFace crop) and a recogniser, cached like `verification`'s caches.

    <cache>/embeddings/<model id>-<weights sha256[:12]>-none-q0-<image list + pipeline sha>.npz

so `facelink bench gallery` embeds the 13,233 pictures once per model (minutes) and reads them
afterwards. Kept apart from benchmarks/gallery_scale.py because nothing here knows about indexes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from facelink.config import BackendConfig, CanonicalCrop, DetectorConfig

from .asymmetric import cache_key
from .verification import NO_CODEC, Job, cache_file, embed_all, load_cache, pipeline_digest, save_cache

log = logging.getLogger(__name__)


@dataclass
class LFWEmbeddings:
    """Every LFW picture (sorted by name) with its person and a model's unit embedding."""

    model_id: str
    names: list[str]              # picture path relative to the LFW image folder
    identities: list[str]         # the person of each picture
    embeddings: np.ndarray        # (N, d) float32, unit rows
    cache: str                    # the cache file they came from / went to
    computed: bool                # False when read from the cache


def embed_lfw(model_name: str, data: str | None = None, limit_people: int | None = None) -> LFWEmbeddings:
    """Every picture of LFW (or of its first `limit_people` people by name) embedded by
    `model_name` (a recogniser manifest name), from the cache when it holds them."""
    from facelink.runtime.alignment import canonical_template
    from facelink.runtime.detection import create_detector
    from facelink.runtime.recognition import create_recognizer

    from facelink.datasets import LFW

    lfw = LFW.locate(data, download=False)
    people = lfw.people()
    chosen = sorted(people)[:limit_people] if limit_people else sorted(people)
    images = sorted(p for name in chosen for p in people[name])
    owner = {p: name for name in chosen for p in people[name]}
    names = [p.relative_to(lfw.image_dir).as_posix() for p in images]
    recognizer = create_recognizer(model_name, BackendConfig(intra_op_threads=1))
    detector_config, crop = DetectorConfig(), CanonicalCrop()
    detector = create_detector(detector_config)
    digest = pipeline_digest(images, lfw.image_dir, detector, crop, detector_config)
    job = Job(recognizer, NO_CODEC, 0, cache_file(cache_key(recognizer), NO_CODEC, 0, digest))
    job.result = load_cache(job.cache_file, names)
    computed = job.result is None
    if computed:
        log.info("embedding %d LFW pictures with %s (cached afterwards in %s)", len(images), model_name, job.cache_file)
        embed_all(images, [job], detector, canonical_template(crop.size, crop.scale))
        save_cache(job.cache_file, names, job.result)
    assert job.result is not None
    vectors = job.result.embeddings.astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return LFWEmbeddings(recognizer.model_id, names, [owner[p] for p in images], vectors, str(job.cache_file), computed)


if __name__ == "__main__":  # warm the cache: python -m facelink.benchmarks.gallery_lfw MODEL...
    import sys

    logging.basicConfig(level=logging.INFO)
    for model in sys.argv[1:]:
        result = embed_lfw(model)
        print(model, result.embeddings.shape, result.cache, "computed" if result.computed else "cached")
