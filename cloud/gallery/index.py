"""In-memory cosine search over one model's templates, labelled by identity, with faiss.

The index is a cache of the SQLite store, never the source of truth: it is loaded from the
store (or from a snapshot reconciled with it, `snapshot`) on open and only touched after a store
transaction has committed. Vectors are L2-normalised, so the inner product is the cosine
similarity. The vectors live in an exact flat index while the model holds fewer than
`GalleryIndexConfig.hnsw_min_templates` templates (no recall loss, a few ms a search) and in an
HNSW graph or an IVF index (`large_kind`) from then on (`ann`); the switch happens when the index
is built or grows past it. An IVF index is retrained on the live vectors once the model holds
`ivf_retrain_growth` times the templates it was trained on (its lists would drift otherwise).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from facelink.config import GalleryIndexConfig

from .ann import FlatVectors, IVFVectors, VectorStore, new_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """One identity returned by a search: its best cosine similarity to the query."""

    identity: str
    score: float


def unit_rows(array: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """Validate an (n, d) real array and return a C-contiguous float32 copy with unit rows.

    Raises ValueError naming the problem (and the first bad row), because these arrays arrive
    from the network and a NaN or an all-zero row would otherwise poison every later search.
    """
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D (n, d) array, got shape {arr.shape}; use .reshape(1, -1) for one row"
        )
    if arr.shape[1] == 0:
        raise ValueError(f"{what} must have at least one dimension, got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    x = arr.astype(np.float64)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what} row {int(np.argmin(finite))} contains NaN or infinite values")
    # Scale by the largest magnitude first so huge (but finite) values cannot overflow the norm.
    x /= np.maximum(np.abs(x).max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{what} row {int(np.argmin(norms[:, 0]))} is all zeros and has no direction")
    return np.ascontiguousarray(x / norms, dtype=np.float32)


class EmbeddingIndex:
    """Cosine search over the templates of one model, labelled by identity.

    Not thread-safe by itself: `Gallery` serialises all access with its lock.
    """

    def __init__(self, dim: int, config: GalleryIndexConfig | None = None, *, size_hint: int = 0,
                 vectors: VectorStore | None = None, labels: dict[int, str] | None = None) -> None:
        """An empty index for `dim`-dimensional templates, its kind chosen for `size_hint` of
        them; or one over `vectors` (a snapshot's) whose template ids `labels` name."""
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.config = config or GalleryIndexConfig()
        self._vectors: VectorStore = vectors if vectors is not None else new_store(dim, size_hint, self.config)
        self._labels: dict[int, str] = labels if labels is not None else {}  # template id -> identity name

    @property
    def dim(self) -> int:
        return self._vectors.dim

    @property
    def kind(self) -> str:
        """flat (exact), hnsw or ivf (approximate)."""
        return self._vectors.kind

    @property
    def vectors(self) -> VectorStore:
        return self._vectors

    def __len__(self) -> int:
        return len(self._vectors)

    def add(self, ids: Sequence[int], vectors: np.ndarray, labels: Sequence[str]) -> None:
        """Add unit `vectors` (n, dim) under template `ids`, each belonging to identity `labels[i]`."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        vecs = np.ascontiguousarray(vectors, dtype=np.float32)
        if vecs.ndim != 2 or vecs.shape[1] != self.dim or not len(ids_arr) == len(vecs) == len(labels):
            raise ValueError(
                f"expected {len(ids_arr)} ids, vectors and labels of dim {self.dim}, got {vecs.shape}"
            )
        if len(ids_arr) == 0:
            return
        if isinstance(self._vectors, FlatVectors) and len(self) + len(ids_arr) >= self.config.hnsw_min_templates:
            self._restore(len(self) + len(ids_arr))  # grown past the threshold: exact -> HNSW or IVF
        elif isinstance(self._vectors, IVFVectors) and self._vectors.trained_at and \
                len(self) + len(ids_arr) > self.config.ivf_retrain_growth * self._vectors.trained_at:
            self._restore(len(self) + len(ids_arr))  # lists trained on a much smaller gallery: retrain
        self._vectors.add(ids_arr, vecs)
        self._labels.update(zip(ids_arr.tolist(), labels))

    def remove(self, ids: Sequence[int]) -> int:
        """Remove templates by id, overwriting their vectors; ids not in the index are ignored.
        Returns how many were removed."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        if len(ids_arr) == 0:
            return 0
        removed = self._vectors.remove(ids_arr)
        for i in ids_arr.tolist():
            self._labels.pop(i, None)
        store = self._vectors
        if store.tombstones and store.tombstones >= self.config.rebuild_tombstone_fraction * (len(store) + store.tombstones):
            self._restore(len(store))
        return removed

    def _restore(self, size: int) -> None:
        """Move the live vectors into a new store of the kind `size` templates call for."""
        ids, vectors = self._vectors.live()
        fresh = new_store(self.dim, size, self.config)
        log.info("gallery index: %d templates, %s -> %s (%d erased nodes dropped)",
                 len(ids), self.kind, fresh.kind, self._vectors.tombstones)
        fresh.add(ids, vectors)
        self._vectors = fresh

    def search(self, queries: np.ndarray, k: int) -> list[list[Match]]:
        """The best `k` distinct identities per unit query row, best first.

        An identity's score is the maximum over its templates. faiss ranks templates, not
        identities, so we fetch a few templates per wanted identity and widen the fetch only
        for the rows where too many of the top templates belong to the same people. Reading
        templates in descending score order and keeping the first hit per identity is exact
        for the flat index (the first hit of an identity is its best template) and as good as
        the graph's ranking for HNSW.
        """
        n_queries = len(queries)
        total = len(self)
        if k <= 0 or total == 0:
            return [[] for _ in range(n_queries)]
        results: list[list[Match]] = [[] for _ in range(n_queries)]
        pending = np.arange(n_queries)
        fetch = min(total, 4 * k)  # enrollments typically hold a handful of templates each
        qs = np.ascontiguousarray(queries, dtype=np.float32)
        while pending.size:
            scores, ids = self._vectors.search(qs[pending], fetch)
            unfinished = []
            for row, q in enumerate(pending.tolist()):
                best = self._distinct(scores[row], ids[row], k)
                if len(best) >= k or fetch >= total:
                    results[q] = best
                else:
                    unfinished.append(q)
            pending = np.asarray(unfinished, dtype=np.int64)
            fetch = min(total, fetch * 4)
        return results

    def _distinct(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Match]:
        seen: set[str] = set()
        out: list[Match] = []
        for score, tid in zip(scores.tolist(), ids.tolist()):
            if tid < 0:  # faiss pads with -1 when fewer results exist
                break
            label = self._labels[tid]
            if label not in seen:
                seen.add(label)
                out.append(Match(label, float(score)))
                if len(out) == k:
                    break
        return out

