"""The vector stores behind `EmbeddingIndex`: exact (flat) or approximate (HNSW), chosen by size.

Both map faiss results back to template ids and both erase for real: the bytes of a removed
vector are overwritten in faiss's own storage before the vector leaves the index, so nothing of
an erased person stays readable in this process's memory (see tests/test_gallery_ann.py).

* `FlatVectors`: `IndexIDMap2(IndexFlatIP)`, exact. `remove_ids` compacts the storage, which
  would leave the last row's old bytes in the vector's spare capacity; the rows are zeroed first.
* `HNSWVectors`: `IndexHNSWFlat` with inner product. faiss cannot remove from an HNSW graph, so a
  removal is a tombstone: the node's vector is zeroed in place (it still routes searches, it can
  no longer match anyone) and its template id is forgotten (-1), and searches over-fetch and skip
  tombstones. Once `rebuild_tombstone_fraction` of the nodes are tombstones, `EmbeddingIndex`
  rebuilds the graph from the live vectors (which also drops the erased nodes' links).
* `IVFVectors`: `IndexIVFFlat` with inner product, its lists trained by k-means on a seeded
  sample; a search scans the `ivf_nprobe` lists nearest the query, exactly. Removal is real
  (`remove_ids` through a hashtable direct map): faiss moves the list's last entry into the hole
  and shrinks the list without freeing or clearing its buffer, so the erased rows are zeroed
  first (otherwise a removed last entry would stay whole past the list's new end). The lists stay
  those of the training until the gallery grows `ivf_retrain_growth` times past the training
  size; `EmbeddingIndex` then retrains on the live vectors.
"""

from __future__ import annotations

import logging
from typing import Protocol

import faiss
import numpy as np

from facelink.config import GalleryIndexConfig

log = logging.getLogger(__name__)


class VectorStore(Protocol):
    """Unit vectors under template ids; search returns template ids, -1 padding at the end."""

    kind: str

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...  # live vectors

    @property
    def tombstones(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]: ...

    def live(self) -> tuple[np.ndarray, np.ndarray]: ...


def storage_rows(flat: faiss.IndexFlat) -> np.ndarray:
    """A writable (ntotal, d) view of a flat index's float storage (valid until its next add)."""
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.zeros((0, d), dtype=np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)


def _positions(stored: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions in `stored` (template id per position) of the ids in `ids`."""
    return np.flatnonzero(np.isin(stored, ids))


class FlatVectors:
    """Exact inner-product search (`IndexIDMap2(IndexFlatIP)`)."""

    kind = "flat"

    def __init__(self, dim: int) -> None:
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    @property
    def tombstones(self) -> int:
        return 0

    def _flat(self) -> faiss.IndexFlat:
        return faiss.downcast_index(self._index.index)

    def _ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        rows = _positions(self._ids(), ids)
        storage_rows(self._flat())[rows] = 0.0  # before remove_ids moves rows and frees the tail
        return int(self._index.remove_ids(ids))

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(queries, fetch)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        return self._ids(), storage_rows(self._flat()).copy()


class HNSWVectors:
    """Approximate inner-product search over an HNSW graph, with tombstones for removals."""

    kind = "hnsw"

    def __init__(self, dim: int, config: GalleryIndexConfig, index: faiss.IndexHNSWFlat | None = None,
                 ids: np.ndarray | None = None) -> None:
        """A new, empty graph, or (from a snapshot) `index` with its position -> template id map
        `ids` (-1: a tombstone)."""
        if index is None:
            index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = config.hnsw_ef_construction
            ids = np.zeros(0, dtype=np.int64)
        assert ids is not None and len(ids) == index.ntotal
        index.hnsw.efSearch = config.hnsw_ef_search
        self._index = index
        self._ids = np.asarray(ids, dtype=np.int64)
        self._dead = int((self._ids < 0).sum())

    @property
    def index(self) -> faiss.IndexHNSWFlat:
        return self._index

    @property
    def ids(self) -> np.ndarray:
        """Template id of each graph node (-1: erased); a snapshot stores this array."""
        return self._ids

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return int(self._index.ntotal) - self._dead

    @property
    def tombstones(self) -> int:
        return self._dead

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._index.add(vectors)  # faiss numbers the new nodes ntotal, ntotal + 1, ...
        self._ids = np.concatenate([self._ids, ids])

    def remove(self, ids: np.ndarray) -> int:
        rows = _positions(self._ids, ids)
        if rows.size:
            storage_rows(faiss.downcast_index(self._index.storage))[rows] = 0.0
            self._ids[rows] = -1
            self._dead += int(rows.size)
        return int(rows.size)

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        total = int(self._index.ntotal)
        # Over-fetch by the share of tombstones, so that about `fetch` live nodes come back.
        want = min(total, fetch + int(np.ceil(fetch * self._dead / max(total - self._dead, 1))) + (8 if self._dead else 0))
        scores, rows = self._index.search(queries, want)
        ids = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        if self._dead:  # tombstones and padding to the end of each row, keeping the score order
            order = np.argsort(ids < 0, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order, axis=1)
            scores = np.take_along_axis(scores, order, axis=1)
        return scores[:, :fetch], ids[:, :fetch]

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        keep = self._ids >= 0
        return self._ids[keep].copy(), storage_rows(faiss.downcast_index(self._index.storage))[keep].copy()


TRAIN_SEED = 2121
MIN_POINTS_PER_LIST = 39  # faiss's own warning threshold for k-means


class IVFVectors:
    """Inverted-file search (`IndexIVFFlat`, inner product): trained by the first `add`."""

    kind = "ivf"

    def __init__(self, dim: int, config: GalleryIndexConfig, index: faiss.IndexIVFFlat | None = None,
                 trained_at: int = 0) -> None:
        """An untrained store (the first `add` trains it), or (from a snapshot) `index`, trained
        when the gallery held `trained_at` templates."""
        self._dim = dim
        self._config = config
        self._index = index
        self.trained_at = trained_at
        if index is not None:
            index.nprobe = config.ivf_nprobe

    @property
    def index(self) -> faiss.IndexIVFFlat | None:
        return self._index

    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @property
    def tombstones(self) -> int:
        return 0

    def _train(self, vectors: np.ndarray) -> faiss.IndexIVFFlat:
        n = len(vectors)
        nlist = self._config.ivf_nlist or int(4 * np.sqrt(n))
        nlist = max(1, min(nlist, n // MIN_POINTS_PER_LIST))
        rng = np.random.default_rng(TRAIN_SEED)
        sample = vectors[np.sort(rng.choice(n, min(n, self._config.ivf_train_size), replace=False))]
        quantizer = faiss.IndexFlatIP(self._dim)
        index = faiss.IndexIVFFlat(quantizer, self._dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = TRAIN_SEED
        index.cp.spherical = True  # unit centroids: the lists partition the sphere the templates live on
        index.cp.niter = 10
        index.train(np.ascontiguousarray(sample))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)  # id -> (list, offset): removal without a scan
        index.nprobe = self._config.ivf_nprobe
        log.info("gallery index: IVF of %d lists trained on %d of %d templates", nlist, len(sample), n)
        self.trained_at = n
        return index

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if self._index is None:
            self._index = self._train(vectors)
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> int:
        if self._index is None:
            return 0
        present = []
        code_size = int(self._index.code_size)
        for tid in np.unique(ids).tolist():
            try:
                lo = int(self._index.direct_map.get(tid))
            except RuntimeError:  # faiss: key not found, not in the index
                continue
            list_no, offset = faiss.lo_listno(lo), faiss.lo_offset(lo)
            codes = faiss.rev_swig_ptr(self._index.invlists.get_codes(list_no),
                                       int(self._index.invlists.list_size(list_no)) * code_size)
            codes[offset * code_size:(offset + 1) * code_size] = 0  # before remove_ids moves and shrinks
            present.append(tid)
        if not present:
            return 0
        wanted = np.asarray(present, dtype=np.int64)
        # The hashtable direct map removes through an IDSelectorArray only (not the batch selector
        # the Python wrapper makes from an array).
        return int(self._index.remove_ids(faiss.IDSelectorArray(len(wanted), faiss.swig_ptr(wanted))))

    def search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        assert self._index is not None
        return self._index.search(queries, fetch)

    def lists(self) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(size of each list, ids per list, vectors per list) in faiss's list order."""
        if self._index is None:
            return np.zeros(0, dtype=np.int64), [], []
        inv = self._index.invlists
        sizes = np.array([inv.list_size(i) for i in range(inv.nlist)], dtype=np.int64)
        ids, vectors = [], []
        for i, n in enumerate(sizes.tolist()):
            ids.append(faiss.rev_swig_ptr(inv.get_ids(i), n).copy() if n else np.zeros(0, dtype=np.int64))
            vectors.append(faiss.rev_swig_ptr(inv.get_codes(i), n * 4 * self._dim).view(np.float32).reshape(n, self._dim).copy()
                           if n else np.zeros((0, self._dim), dtype=np.float32))
        return sizes, ids, vectors

    @property
    def ids(self) -> np.ndarray:
        """Template ids in list order (the order of faiss's serialised lists)."""
        if self._index is None:
            return np.zeros(0, dtype=np.int64)
        inv = self._index.invlists
        parts = [faiss.rev_swig_ptr(inv.get_ids(i), inv.list_size(i)).copy()
                 for i in range(inv.nlist) if inv.list_size(i)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        _, ids, vectors = self.lists()
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, self._dim), dtype=np.float32)
        return np.concatenate(ids), np.concatenate(vectors)


def new_store(dim: int, size: int, config: GalleryIndexConfig) -> VectorStore:
    """The store a model holding `size` templates should use: exact below the large-index
    threshold, then `config.large_kind` (HNSW or IVF)."""
    if size < config.hnsw_min_templates:
        return FlatVectors(dim)
    return IVFVectors(dim, config) if config.large_kind == "ivf" else HNSWVectors(dim, config)
