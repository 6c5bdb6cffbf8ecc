"""HNSW and IVF indexes persisted in the gallery folder, so that a large gallery does not rebuild at start.

Building the HNSW graph of a million templates takes minutes; reading it back takes seconds. One
file per model, `index-<model id>.snap` (0600, in the 0700 gallery folder), is a cache of the
store like the index itself, never the truth:

* Written atomically (temporary file, fsync, rename, fsync of the folder), after the templates
  the store no longer holds have been dropped from the index.
* Loaded only if it is ours and whole: magic, format version, model id, dimension and HNSW
  build settings must match, and a CRC-32 per MiB of everything after the header must check
  out. Anything else (corrupt, foreign, older format, other settings) is deleted with a log
  line and the index is rebuilt from the store.
* Reconciled with the store on load: templates the store holds and the snapshot lacks are
  added (read from the store), templates in the snapshot the store no longer holds are erased.
* An erasure reaches the file at once (`scrub`): the erased templates' vectors are overwritten
  with zeros in place, their ids with -1, the affected CRCs rewritten and the file fsynced, so
  after `Gallery.remove` returns no file in the folder holds the erased embedding. That works
  because faiss serialises an `IndexHNSWFlat`'s vectors as the last block of its output; the
  writer checks that this holds, and a file where it does not is deleted on erasure instead.
  An `IndexIVFFlat`'s lists are likewise its last block, each list's vectors then its ids; the
  list sizes stored beside the ids give every template's place, and an erasure zeroes its vector
  and its id in faiss's list (-1: dropped at the next load).

Layout: a 4096-byte JSON header (space padded), the template id of each graph node (int64,
-1 for an erased node; IVF: of each list entry in list order), IVF only: the size of each list
(int64), faiss's serialisation of the `IndexHNSWFlat` or `IndexIVFFlat`, then the CRC table
(uint32 per MiB of the ids, sizes and faiss parts). Several replicas sharing a folder each write the
file at close; the last one wins and every open reconciles it with the store.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import faiss
import numpy as np

from facelink.config import GalleryIndexConfig

from .ann import HNSWVectors, IVFVectors, storage_rows
from .index import EmbeddingIndex
from .store import GalleryStore, _vector, private_umask

log = logging.getLogger(__name__)

MAGIC = "facelink-gallery-index"
VERSION = 1
HEADER_BYTES = 4096
CHUNK = 1 << 20  # bytes covered by one CRC


def snapshot_path(directory: Path, model_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_id)
    return directory / f"index-{safe}.snap"


# -- the store's view: template ids and names, without reading the vectors ----------------------------
def stored_labels(store: GalleryStore, model_id: str | None = None) -> dict[str, dict[int, str]]:
    """{model id: {template id: identity name}} of every searchable template, no vectors read."""
    sql = ("SELECT t.model_id, t.id, i.name FROM templates t JOIN identities i ON i.id = t.identity_id"
           " WHERE t.status != 'dropped'")
    params: tuple[str, ...] = ()
    if model_id is not None:
        sql += " AND t.model_id = ?"
        params = (model_id,)
    out: dict[str, dict[int, str]] = {}
    with store._read() as conn:  # the store's private read transaction: one consistent view
        for model, tid, name in conn.execute(sql, params):
            out.setdefault(model, {})[int(tid)] = name
    return out


def stored_vectors(store: GalleryStore, model_id: str, ids: Iterable[int]) -> tuple[list[int], list[np.ndarray]]:
    """The vectors of template `ids` of `model_id` (damaged blobs skipped, as `iter_templates` does)."""
    wanted = sorted(ids)
    found_ids, vectors = [], []
    with store._read() as conn:
        for start in range(0, len(wanted), 500):  # SQLite bounds the parameters of one statement
            part = wanted[start:start + 500]
            sql = (f"SELECT t.id, i.name, t.dim, t.vector FROM templates t JOIN identities i ON i.id = t.identity_id"
                   f" WHERE t.model_id = ? AND t.status != 'dropped' AND t.id IN ({','.join('?' * len(part))})")
            for tid, name, dim, blob in conn.execute(sql, (model_id, *part)):
                vector = _vector(tid, name, model_id, dim, blob)
                if vector is not None:
                    found_ids.append(int(tid))
                    vectors.append(vector)
    return found_ids, vectors


# -- CRCs -----------------------------------------------------------------------------------------------
class ChunkCrc:
    """CRC-32 of each CHUNK-byte piece of a stream fed in arbitrary pieces."""

    def __init__(self) -> None:
        self.crcs: list[int] = []
        self._crc = 0
        self._filled = 0

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            take = min(CHUNK - self._filled, len(view))
            self._crc = zlib.crc32(view[:take], self._crc)
            self._filled += take
            view = view[take:]
            if self._filled == CHUNK:
                self.finish()

    def finish(self) -> np.ndarray:
        if self._filled:
            self.crcs.append(self._crc)
            self._crc, self._filled = 0, 0
        return np.asarray(self.crcs, dtype="<u4")


class SnapshotError(Exception):
    """A snapshot file that must not be trusted; the message says why."""


@dataclass
class Header:
    model_id: str
    dim: int
    nodes: int
    faiss_bytes: int
    vectors_at_end: bool       # faiss wrote the vectors as its last block: erasure can overwrite them
    hnsw_m: int
    ef_construction: int
    table_crc: int = 0
    kind: str = "hnsw"             # or "ivf"
    lists: int = 0                 # IVF lists (their sizes follow the ids)
    trained_at: int = 0            # IVF: templates the gallery held when the lists were trained

    @property
    def ids_offset(self) -> int:
        return HEADER_BYTES

    @property
    def sizes_offset(self) -> int:
        return HEADER_BYTES + 8 * self.nodes

    @property
    def faiss_offset(self) -> int:
        return self.sizes_offset + 8 * self.lists

    @property
    def table_offset(self) -> int:
        return self.faiss_offset + self.faiss_bytes

    @property
    def vectors_offset(self) -> int:
        """HNSW: where the vectors start; IVF: where the lists' data (vectors, then ids, per list) starts."""
        return self.table_offset - (4 * self.dim + (8 if self.kind == "ivf" else 0)) * self.nodes

    def places(self, rows: np.ndarray, sizes: np.ndarray) -> list[tuple[int, int]]:
        """(vector offset, faiss id offset or -1) in the file of each row of the ids part."""
        if self.kind != "ivf":
            return [(self.vectors_offset + 4 * self.dim * r, -1) for r in rows.tolist()]
        ends = np.cumsum(sizes)
        starts = ends - sizes
        row_bytes = 4 * self.dim
        out = []
        for r in rows.tolist():
            lst = int(np.searchsorted(ends, r, side="right"))
            base = self.vectors_offset + int(starts[lst]) * (row_bytes + 8)
            j = r - int(starts[lst])
            out.append((base + j * row_bytes, base + int(sizes[lst]) * row_bytes + 8 * j))
        return out

    @property
    def chunks(self) -> int:
        return -(-(self.table_offset - self.ids_offset) // CHUNK)

    def encode(self) -> bytes:
        data = json.dumps({"magic": MAGIC, "version": VERSION, **self.__dict__}).encode()
        if len(data) > HEADER_BYTES:
            raise SnapshotError(f"header of {len(data)} bytes does not fit in {HEADER_BYTES}")
        return data.ljust(HEADER_BYTES, b" ")

    @classmethod
    def decode(cls, data: bytes) -> Header:
        try:
            raw: dict[str, Any] = json.loads(data.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SnapshotError("not a facelink index snapshot (unreadable header)") from exc
        if not isinstance(raw, dict) or raw.pop("magic", None) != MAGIC:
            raise SnapshotError("not a facelink index snapshot (foreign file)")
        if raw.pop("version", None) != VERSION:
            raise SnapshotError(f"snapshot format is not version {VERSION}")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise SnapshotError(f"snapshot header has unexpected fields: {exc}") from exc


# -- writing ------------------------------------------------------------------------------------------
def write_snapshot(path: Path, model_id: str, vectors: HNSWVectors | IVFVectors, config: GalleryIndexConfig) -> None:
    """Write `vectors` to `path` atomically (0600): a crash leaves the old file or the new one."""
    index = vectors.index
    ivf = isinstance(vectors, IVFVectors)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    crc = ChunkCrc()
    try:
        with private_umask(), open(tmp, "w+b") as f:
            os.chmod(tmp, 0o600)
            f.write(b" " * HEADER_BYTES)
            sizes = np.zeros(0, dtype=np.int64)
            if ivf:
                inv = index.invlists
                sizes = np.array([inv.list_size(i) for i in range(inv.nlist)], dtype="<i8")
            for block in (np.ascontiguousarray(vectors.ids, dtype="<i8").tobytes(), sizes.astype("<i8").tobytes()):
                f.write(block)
                crc.feed(block)
            written = 0

            def sink(data: bytes) -> int:
                nonlocal written
                f.write(data)
                crc.feed(data)
                written += len(data)
                return len(data)

            faiss.write_index(index, faiss.PyCallbackIOWriter(sink))
            table = crc.finish()
            header = Header(model_id, vectors.dim, int(index.ntotal), written, False, config.hnsw_m,
                            config.hnsw_ef_construction, zlib.crc32(table.tobytes()), kind=vectors.kind,
                            lists=len(sizes), trained_at=vectors.trained_at if ivf else 0)
            header.vectors_at_end = _ivf_lists_at_end(f, header, index, sizes) if ivf else _vectors_at_end(f, header, index)
            f.write(table.tobytes())
            f.seek(0)
            f.write(header.encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _vectors_at_end(f: BinaryIO, header: Header, index: faiss.IndexHNSWFlat) -> bool:
    """Whether the last nodes x dim floats of faiss's output are the vectors (first and last row
    compared), which is what lets an erasure overwrite a vector in place."""
    if header.nodes == 0:
        return True
    rows = storage_rows(faiss.downcast_index(index.storage))
    row_bytes = 4 * header.dim
    for node in (0, header.nodes - 1):
        f.seek(header.vectors_offset + node * row_bytes)
        if f.read(row_bytes) != rows[node].astype("<f4").tobytes():
            return False
    f.seek(0, os.SEEK_END)
    return True


def _ivf_lists_at_end(f: BinaryIO, header: Header, index: faiss.IndexIVFFlat, sizes: np.ndarray) -> bool:
    """Whether faiss's output ends with the lists, each its vectors then its ids, in list order
    (the first and the last entry's vector and id compared): what lets an erasure find them."""
    if header.nodes == 0:
        return True
    inv, row_bytes = index.invlists, 4 * header.dim
    filled = np.flatnonzero(sizes)
    for lst, j, row in ((int(filled[0]), 0, 0), (int(filled[-1]), int(sizes[filled[-1]]) - 1, header.nodes - 1)):
        (vec_at, id_at), = header.places(np.array([row]), sizes)
        codes = faiss.rev_swig_ptr(inv.get_codes(lst), int(sizes[lst]) * row_bytes)[j * row_bytes:(j + 1) * row_bytes]
        ident = faiss.rev_swig_ptr(inv.get_ids(lst), int(sizes[lst]))[j]
        f.seek(vec_at)
        if f.read(row_bytes) != codes.tobytes():
            return False
        f.seek(id_at)
        if f.read(8) != np.int64(ident).astype("<i8").tobytes():
            return False
    f.seek(0, os.SEEK_END)
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------------------
def read_snapshot(path: Path, model_id: str, dim: int, config: GalleryIndexConfig) -> HNSWVectors | IVFVectors:
    """The HNSW or IVF vectors stored in `path`; raises SnapshotError unless it is whole and matches."""
    try:
        with open(path, "rb") as f:
            header = Header.decode(f.read(HEADER_BYTES))
            if header.model_id != model_id:
                raise SnapshotError(f"snapshot is of model {header.model_id!r}, not {model_id!r}")
            if header.dim != dim:
                raise SnapshotError(f"snapshot holds {header.dim}-d vectors, the store {dim}-d")
            if header.kind != config.large_kind:
                raise SnapshotError(f"snapshot holds a {header.kind} index, the configuration asks for {config.large_kind}")
            if header.kind == "hnsw" and (header.hnsw_m, header.ef_construction) != (config.hnsw_m, config.hnsw_ef_construction):
                raise SnapshotError("snapshot was built with other HNSW settings")
            if header.kind == "ivf" and config.ivf_nlist and config.ivf_nlist != header.lists:
                raise SnapshotError("snapshot was built with other IVF settings")
            size = os.fstat(f.fileno()).st_size
            if size != header.table_offset + 4 * header.chunks:
                raise SnapshotError(f"snapshot is {size} bytes, its header says {header.table_offset + 4 * header.chunks}")
            f.seek(header.table_offset)
            table = np.frombuffer(f.read(4 * header.chunks), dtype="<u4")
            if zlib.crc32(table.tobytes()) != header.table_crc:
                raise SnapshotError("snapshot checksum table is damaged")
            crc = ChunkCrc()
            f.seek(header.ids_offset)
            raw_ids = f.read(8 * header.nodes)
            crc.feed(raw_ids)
            raw_sizes = f.read(8 * header.lists)
            crc.feed(raw_sizes)
            remaining = header.faiss_bytes

            def source(n: int) -> bytes:
                nonlocal remaining
                data = f.read(min(n, remaining))
                remaining -= len(data)
                crc.feed(data)
                return data

            index = faiss.read_index(faiss.PyCallbackIOReader(source))
            if not np.array_equal(crc.finish(), table):
                raise SnapshotError("snapshot content does not match its checksums (damaged file)")
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot: {exc}") from exc
    except RuntimeError as exc:  # faiss's own parse errors
        raise SnapshotError(f"faiss cannot read the snapshot: {exc}") from exc
    ids = np.frombuffer(raw_ids, dtype="<i8").copy()
    wanted = faiss.IndexIVFFlat if header.kind == "ivf" else faiss.IndexHNSWFlat
    if not isinstance(index, wanted) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
            or index.d != dim or index.ntotal != header.nodes:
        raise SnapshotError(f"snapshot does not hold an inner-product {header.kind} index of the expected shape")
    if header.kind == "hnsw":
        return HNSWVectors(dim, config, index, ids)
    if index.nlist != header.lists or index.direct_map.type != faiss.DirectMap.Hashtable:
        raise SnapshotError("snapshot's IVF lists do not match its header")
    if (ids < 0).any():  # entries erased in the file (zeroed, id -1): drop them, rebuild the id map
        index.set_direct_map_type(faiss.DirectMap.NoMap)
        index.remove_ids(np.array([-1], dtype=np.int64))
        index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return IVFVectors(dim, config, index, header.trained_at)


# -- erasure ------------------------------------------------------------------------------------------
def scrub(path: Path, template_ids: Iterable[int]) -> None:
    """Overwrite the vectors of `template_ids` in the snapshot at `path` (if any) with zeros and
    their ids with -1, in place, fsynced; delete the file if that cannot be done."""
    wanted = np.asarray(sorted(template_ids), dtype=np.int64)
    if wanted.size == 0 or not path.exists():
        return
    try:
        with open(path, "r+b") as f:
            header = Header.decode(f.read(HEADER_BYTES))
            if not header.vectors_at_end:
                raise SnapshotError("its vectors cannot be located")
            ids = np.frombuffer(f.read(8 * header.nodes), dtype="<i8").copy()
            sizes = np.frombuffer(f.read(8 * header.lists), dtype="<i8").copy()
            rows = np.flatnonzero(np.isin(ids, wanted))
            if rows.size == 0:
                return
            if header.lists and int(sizes.sum()) != header.nodes:
                raise SnapshotError("its list sizes do not add up")
            zeros = bytes(4 * header.dim)
            touched = set()
            for row, (vec_at, id_at) in zip(rows.tolist(), header.places(rows, sizes)):
                writes = [(header.ids_offset + 8 * row, b"\xff" * 8), (vec_at, zeros)]
                if id_at >= 0:  # IVF: faiss's own copy of the id in the list
                    writes.append((id_at, b"\xff" * 8))
                for offset, data in writes:
                    f.seek(offset)
                    f.write(data)
                    first = (offset - header.ids_offset) // CHUNK
                    touched.update(range(first, (offset + len(data) - 1 - header.ids_offset) // CHUNK + 1))
            f.seek(header.table_offset)
            table = np.frombuffer(f.read(4 * header.chunks), dtype="<u4").copy()
            for chunk in sorted(touched):
                start = header.ids_offset + chunk * CHUNK
                f.seek(start)
                table[chunk] = zlib.crc32(f.read(min(CHUNK, header.table_offset - start)))
            f.seek(header.table_offset)
            f.write(table.tobytes())
            header.table_crc = zlib.crc32(table.tobytes())
            f.seek(0)
            f.write(header.encode())
            f.flush()
            os.fsync(f.fileno())
    except (OSError, SnapshotError, ValueError) as exc:
        log.warning("gallery: cannot erase in index snapshot %s (%s); deleting it", path, exc)
        discard(path)


def discard(path: Path, reason: str | None = None) -> None:
    """Delete a snapshot (it is only a cache), overwriting a file we cannot trust to scrub."""
    if reason:
        log.warning("gallery: discarding index snapshot %s: %s; rebuilding from the store", path, reason)
    try:
        size = path.stat().st_size
        with open(path, "r+b") as f:  # the blocks of an unlinked file stay on disk: zero them first
            f.writelines(bytes(min(CHUNK, size - start)) for start in range(0, size, CHUNK))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        pass
    path.unlink(missing_ok=True)


def build_index(store: GalleryStore, model_id: str, config: GalleryIndexConfig) -> EmbeddingIndex | None:
    """`model_id`'s index built from every searchable template in the store (None if it has none)."""
    ids, vectors, names = [], [], []
    for _, tid, name, vector in store.iter_templates(model_id):
        ids.append(tid)
        vectors.append(vector)
        names.append(name)
    if not vectors:
        return None
    index = EmbeddingIndex(len(vectors[0]), config, size_hint=len(vectors))
    index.add(ids, np.stack(vectors), names)
    return index


# -- what the gallery calls -----------------------------------------------------------------------------
class Snapshots:
    """The snapshot files of one gallery folder and which models changed since they were written."""

    def __init__(self, directory: Path, config: GalleryIndexConfig) -> None:
        self.directory = directory
        self.config = config
        self.dirty: set[str] = set()

    def path(self, model_id: str) -> Path:
        return snapshot_path(self.directory, model_id)

    def load_all(self, store: GalleryStore, model_id: str | None) -> dict[str, EmbeddingIndex]:
        """Every model's index (or `model_id`'s, always rebuilt: its templates were replaced): from
        its snapshot reconciled with the store when one is usable, else built from the store and
        written back when HNSW or IVF."""
        labels = stored_labels(store, model_id)
        out: dict[str, EmbeddingIndex] = {}
        for model, names in labels.items():
            usable = model_id is None and self.config.snapshot and len(names) >= self.config.hnsw_min_templates
            index = self._load(store, model, names) if usable else None
            if index is None:
                index = build_index(store, model, self.config)
                if index is None:
                    continue
                self.dirty.add(model)
                self.save(store, model, index)
            out[model] = index
        if model_id is None:
            for path in self.directory.glob("index-*.snap"):  # models the store no longer holds
                if not any(path == self.path(m) for m in out):
                    discard(path, "its model has no templates in the store")
        return out

    def _load(self, store: GalleryStore, model_id: str, names: dict[int, str]) -> EmbeddingIndex | None:
        path = self.path(model_id)
        if not path.exists():
            return None
        dim = store.model_dim(model_id)
        try:
            vectors = read_snapshot(path, model_id, dim or 0, self.config)
        except Exception as exc:  # noqa: BLE001 - only a cache: whatever is wrong with it (a crafted
            # header's types included), the store rebuilds it; it must never keep the gallery shut
            discard(path, str(exc) if isinstance(exc, SnapshotError) else f"unreadable ({type(exc).__name__}: {exc})")
            return None
        snap_ids = vectors.ids[vectors.ids >= 0]
        gone = np.setdiff1d(snap_ids, np.fromiter(names, dtype=np.int64, count=len(names)))
        if gone.size:  # erased while no process had this snapshot open (a crash mid-erasure)
            vectors.remove(gone)
            scrub(path, gone.tolist())
        labels = {int(t): names[int(t)] for t in snap_ids.tolist() if int(t) in names}
        index = EmbeddingIndex(vectors.dim, self.config, vectors=vectors, labels=labels)
        missing = sorted(set(names) - set(labels))
        if missing:
            ids, vecs = stored_vectors(store, model_id, missing)
            if ids:
                index.add(ids, np.stack(vecs), [names[t] for t in ids])
        if gone.size or missing:
            self.dirty.add(model_id)
        log.info("gallery: model %r: %d templates from %s (%d added from the store, %d erased)",
                 model_id, len(index), path.name, len(missing), gone.size)
        return index

    def erase(self, model_id: str, template_ids: list[int]) -> None:
        if template_ids:
            scrub(self.path(model_id), template_ids)
            self.dirty.add(model_id)

    def changed(self, model_id: str) -> None:
        self.dirty.add(model_id)

    def save(self, store: GalleryStore, model_id: str, index: EmbeddingIndex) -> None:
        """Write `model_id`'s snapshot if it changed and is HNSW or IVF (a flat index rebuilds in no time),
        after dropping what the store no longer holds; a failure is logged, never raised."""
        if model_id not in self.dirty or not self.config.snapshot:
            return
        path = self.path(model_id)
        if not isinstance(index.vectors, (HNSWVectors, IVFVectors)):
            discard(path)
            self.dirty.discard(model_id)
            return
        try:
            live = stored_labels(store, model_id).get(model_id, {})
            held = index.vectors.ids[index.vectors.ids >= 0]
            gone = np.setdiff1d(held, np.fromiter(live, dtype=np.int64, count=len(live)))
            if gone.size:
                index.remove(gone.tolist())
            if isinstance(index.vectors, (HNSWVectors, IVFVectors)):
                write_snapshot(path, model_id, index.vectors, self.config)
            self.dirty.discard(model_id)
        except (OSError, SnapshotError, sqlite3.Error) as exc:
            log.warning("gallery: could not write index snapshot %s: %s", path, exc)

    def save_all(self, store: GalleryStore, indexes: dict[str, EmbeddingIndex]) -> None:
        for model_id, index in indexes.items():
            self.save(store, model_id, index)
        for model_id in list(self.dirty - set(indexes)):  # models emptied since
            discard(self.path(model_id))
            self.dirty.discard(model_id)

