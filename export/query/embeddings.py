"""The embeddings transformations train from: computed once per model, stored, never recomputed.

Backfill-free by construction. A transformation needs, for a set of reference faces, the gallery
model's embedding and the query model's embedding of the same face. Both are stored per model:

* a gallery model's embeddings of the reference faces are computed once (when the model is
  added) and kept -- by this store on a training machine, or by the cloud next to its gallery;
* a NEW query model only adds its own embeddings of the same reference faces (the faces are the
  training set's, never the enrolled people's); its transformations train from the two stored
  arrays, and then apply to the gallery's stored embeddings. No gallery image is read again.

`PairedEmbeddings` is the whole training interface: arrays whose rows are the same faces. The
cloud can build one from its own store; `EmbeddingStore` builds one from the training cache.

Files: `<root>/<model name>@<version>-<weights sha256[:12]>-<faces key>.npz` with the
embeddings (the model's deployed embedding: its own alignment from the canonical crop and the
crop's landmarks, as the cloud recognises a streamed crop; flip augmentation as its manifest
says; unit vectors) and the face names, so a mismatch is detected rather than silently misused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facelink.config import cache_dir
from facelink.export.codec.data import FaceCache
from facelink.runtime.manifest import ModelManifest, load_manifest
from facelink.runtime.recognition import Recognizer, create_recognizer

DEFAULT_ROOT = cache_dir() / "query" / "embeddings"


@dataclass(frozen=True)
class PairedEmbeddings:
    """Row i of every array is the same face: what the transformations learn from."""

    query: np.ndarray                  # (N, d_query) unit vectors
    galleries: dict[str, np.ndarray]   # gallery model id -> (N, d_model) unit vectors
    labels: np.ndarray                 # (N,) identity of each face (any hashable labels)

    def __post_init__(self) -> None:
        n = len(self.query)
        bad = {name: len(e) for name, e in self.galleries.items() if len(e) != n}
        if bad or len(self.labels) != n:
            raise ValueError(f"{n} query rows, but gallery rows {bad or 'ok'} and {len(self.labels)} labels")
        if not self.galleries:
            raise ValueError("no gallery embeddings")

    def rows(self, index: np.ndarray) -> PairedEmbeddings:
        return PairedEmbeddings(self.query[index], {k: v[index] for k, v in self.galleries.items()}, self.labels[index])


def faces_key(cache: FaceCache) -> str:
    """What identifies the reference faces: their source names, in order (16 hex digits)."""
    digest = hashlib.sha256()
    for index in cache.source_index:
        digest.update(f"{cache.sources[int(index)].name}\n".encode())
    return digest.hexdigest()[:16]


def embed_cache(recognizer: Recognizer, cache: FaceCache, batch: int = 256, progress: bool = True) -> np.ndarray:
    """(N, dim) deployed embeddings of every cached canonical crop."""
    out = np.zeros((len(cache), recognizer.dim), dtype=np.float32)
    starts = range(0, len(cache), batch)
    for start in tqdm(starts, desc=recognizer.model_id, unit="batch", disable=not progress):
        stop = min(start + batch, len(cache))
        faces = np.stack([recognizer.align(np.asarray(cache.crops[i]), cache.crop_landmarks[i]) for i in range(start, stop)])
        out[start:stop] = recognizer.embed_aligned(faces)
    return out


class EmbeddingStore:
    """Per-model embeddings of the training faces, computed on first use and kept on disk."""

    def __init__(self, cache: FaceCache, root: Path = DEFAULT_ROOT) -> None:
        self.cache = cache
        self.root = root
        self.key = faces_key(cache)
        self.names = np.array([cache.sources[int(i)].name for i in cache.source_index])

    def path(self, manifest: ModelManifest) -> Path:
        return self.root / f"{manifest.model_id}-{(manifest.sha256 or 'unpinned')[:12]}-{self.key}.npz"

    def embeddings(self, manifest_name_or_path: str | Path, progress: bool = True) -> tuple[str, np.ndarray]:
        """(model id, (N, dim) embeddings) of one recogniser, from the store or computed once."""
        manifest = load_manifest(manifest_name_or_path)
        path = self.path(manifest)
        if path.is_file():
            stored = np.load(path)
            if stored["names"].tolist() == self.names.tolist():
                return manifest.model_id, stored["embeddings"]
        embeddings = embed_cache(create_recognizer(manifest_name_or_path), self.cache, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, names=self.names, embeddings=embeddings, model_id=manifest.model_id, sha256=manifest.sha256 or "")
        tmp.replace(path)
        return manifest.model_id, embeddings

    def paired(self, query: str | Path, galleries: list[str | Path], progress: bool = True) -> PairedEmbeddings:
        _, query_embeddings = self.embeddings(query, progress)
        stored = dict(self.embeddings(g, progress) for g in galleries)
        return PairedEmbeddings(query_embeddings, stored, self.cache.identities())
