"""In-memory exact cosine search over one model's templates, with faiss.

The index is a cache of the SQLite store, never the source of truth: it is rebuilt from the
store on open and only touched after a store transaction has committed. Vectors are
L2-normalised, so the inner product of `IndexFlatIP` is the cosine similarity. The flat index
is exact (no training, no recall loss), which is what a gallery of up to a few hundred
thousand templates needs; `IndexIDMap2` lets the faiss id be the template's row id, so a
removal in the store maps to `remove_ids` here without any id bookkeeping of our own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np


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
    """Exact cosine search over the templates of one model, labelled by identity.

    Not thread-safe by itself: `Gallery` serialises all access with its lock.
    """

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._labels: dict[int, str] = {}  # template id -> identity name

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

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
        self._index.add_with_ids(vecs, ids_arr)
        self._labels.update(zip(ids_arr.tolist(), labels))

    def remove(self, ids: Sequence[int]) -> int:
        """Remove templates by id; ids not in the index are ignored. Returns how many were removed."""
        ids_arr = np.asarray(ids, dtype=np.int64)
        if len(ids_arr) == 0:
            return 0
        removed = int(self._index.remove_ids(ids_arr))
        for i in ids_arr.tolist():
            self._labels.pop(i, None)
        return removed

    def search(self, queries: np.ndarray, k: int) -> list[list[Match]]:
        """The best `k` distinct identities per unit query row, best first.

        An identity's score is the maximum over its templates. faiss ranks templates, not
        identities, so we fetch a few templates per wanted identity and widen the fetch only
        for the rows where too many of the top templates belong to the same people. Reading
        templates in descending score order and keeping the first hit per identity is exact:
        the first hit of an identity is its best template.
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
            scores, ids = self._index.search(qs[pending], fetch)
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
