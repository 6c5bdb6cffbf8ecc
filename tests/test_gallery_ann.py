"""The gallery's index chosen by size (exact flat, then HNSW or IVF) and its persisted snapshots.

Small galleries with a low `hnsw_min_templates` exercise every HNSW path in seconds: the choice
by size and the switch when a gallery grows, tombstones and erasure in faiss's own storage, the
rebuild once tombstones pile up, snapshots written atomically and privately, reconciled with
the store, refused when damaged or foreign, and scrubbed in place by an erasure. The snapshot
tests run for both large kinds; IVF's own: removal that leaves nothing in the lists' buffers and
retraining once the gallery outgrows its training.
"""

from __future__ import annotations

import logging
import os
import stat

import faiss
import numpy as np
import pytest
from facelink.cloud.gallery import Gallery, GallerySettings
from facelink.cloud.gallery.ann import FlatVectors, HNSWVectors, IVFVectors, storage_rows
from facelink.cloud.gallery.index import EmbeddingIndex
from facelink.cloud.gallery.snapshot import (
    HEADER_BYTES,
    read_snapshot,
    snapshot_path,
)

from facelink.config import GalleryIndexConfig

DIM = 32
MODEL = "m@1"
SMALL = GalleryIndexConfig(hnsw_min_templates=100, hnsw_ef_search=64, rebuild_tombstone_fraction=0.5, large_kind="hnsw")
SMALL_IVF = SMALL.model_copy(update={"large_kind": "ivf", "ivf_nprobe": 4})
KINDS = pytest.mark.parametrize("cfg", [SMALL, SMALL_IVF], ids=["hnsw", "ivf"])


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(21)


def open_gallery(folder, config: GalleryIndexConfig = SMALL) -> Gallery:
    return Gallery(folder, settings=GallerySettings(index=config))


def enroll(g: Gallery, vectors: np.ndarray, start: int = 0) -> list[str]:
    names = [f"person-{start + i:05d}" for i in range(len(vectors))]
    for name, v in zip(names, vectors):
        g.enroll(name, MODEL, v[None])
    return names


def folder_bytes(folder) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def windows(vector: np.ndarray) -> list[bytes]:
    """Runs of four float32 values of a stored vector (what a copy of the folder would show)."""
    blob = vector.astype("<f4").tobytes()
    return [blob[i : i + 16] for i in range(0, len(blob) - 16, 16)]


# -- the index ------------------------------------------------------------------------------------------
def test_kind_follows_size_and_hnsw_finds_what_exact_search_finds(rng):
    data = unit(rng, 300)
    small = EmbeddingIndex(DIM, SMALL, size_hint=50)
    assert small.kind == "flat"
    index = EmbeddingIndex(DIM, SMALL, size_hint=300)
    assert index.kind == "hnsw"
    index.add(range(300), data, [f"p{i}" for i in range(300)])
    queries = data[:50] + 0.05 * unit(rng, 50)
    top = index.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 3)
    assert [r[0].identity for r in top] == [f"p{i}" for i in range(50)]
    assert all(len({m.identity for m in r}) == 3 for r in top)


def test_flat_index_switches_to_hnsw_when_it_grows(rng):
    index = EmbeddingIndex(DIM, SMALL)
    data = unit(rng, 150)
    index.add(range(60), data[:60], ["a"] * 60)
    assert index.kind == "flat"
    index.add(range(60, 150), data[60:], ["b"] * 90)
    assert index.kind == "hnsw" and len(index) == 150
    assert index.search(data[10:11], 1)[0][0].identity == "a"


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_removal_overwrites_the_vector_in_faiss_storage(rng, kind):
    index = EmbeddingIndex(DIM, SMALL, size_hint=300 if kind == "hnsw" else 10)
    data = unit(rng, 200)
    index.add(range(200), data, [f"p{i}" for i in range(200)])
    assert index.remove([7, 199, 12345]) == 2
    store = index.vectors
    flat = faiss.downcast_index(store.index.storage if isinstance(store, HNSWVectors) else store._index.index)
    raw = storage_rows(flat).tobytes()
    for gone in (7, 199):
        assert not any(w in raw for w in windows(data[gone]))
    hits = index.search(data[[7, 199, 8]], 5)
    assert all(m.identity not in ("p7", "p199") for r in hits for m in r)
    assert hits[2][0].identity == "p8"
    assert len(index) == 198


def test_hnsw_rebuilds_once_tombstones_pass_the_fraction(rng):
    index = EmbeddingIndex(DIM, SMALL, size_hint=400)
    data = unit(rng, 400)
    index.add(range(400), data, [f"p{i}" for i in range(400)])
    index.remove(range(150))
    assert index.vectors.tombstones == 150
    index.remove(range(150, 320))  # 320 of 400 > 0.5: rebuilt from the 80 live vectors, flat now
    assert isinstance(index.vectors, FlatVectors) and len(index) == 80
    assert index.search(data[330:331], 1)[0][0].identity == "p330"


def test_ivf_is_the_large_kind_when_configured_and_finds_what_exact_search_finds(rng):
    index = EmbeddingIndex(DIM, SMALL_IVF, size_hint=600)
    assert index.kind == "ivf"
    assert EmbeddingIndex(DIM, GalleryIndexConfig(hnsw_min_templates=100), size_hint=600).kind == "ivf"  # the default
    data = unit(rng, 600)
    index.add(range(600), data, [f"p{i}" for i in range(600)])
    assert index.vectors.index.nlist == 600 // 39 and index.vectors.trained_at == 600
    queries = data[:50] + 0.05 * unit(rng, 50)
    top = index.search(queries / np.linalg.norm(queries, axis=1, keepdims=True), 3)
    assert [r[0].identity for r in top] == [f"p{i}" for i in range(50)]
    assert all(len({m.identity for m in r}) == 3 for r in top)
    grown = EmbeddingIndex(DIM, SMALL_IVF)  # flat, then IVF once past the threshold
    grown.add(range(60), data[:60], ["a"] * 60)
    grown.add(range(60, 150), data[60:150], ["b"] * 90)
    assert grown.kind == "ivf" and len(grown) == 150


def ivf_list_bytes(store: IVFVectors, old_sizes: np.ndarray) -> bytes:
    """Each list's codes buffer up to its size BEFORE a removal: the part past the new end too."""
    inv = store.index.invlists
    return b"".join(faiss.rev_swig_ptr(inv.get_codes(i), int(n) * store.index.code_size).tobytes()
                    for i, n in enumerate(old_sizes.tolist()) if n)


def test_ivf_removal_leaves_no_copy_in_the_lists_buffers(rng):
    index = EmbeddingIndex(DIM, SMALL_IVF, size_hint=600)
    data = unit(rng, 600)
    index.add(range(600), data, [f"p{i}" for i in range(600)])
    store = index.vectors
    sizes, ids, _ = store.lists()
    last_of_a_list = int(ids[int(np.argmax(sizes))][-1])  # removal shrinks the list over it, no move
    middle = int(ids[int(np.argmax(sizes))][0])           # removal moves the list's last entry here
    gone = sorted({last_of_a_list, middle, 7})
    assert index.remove([*gone, 12345]) == len(gone)
    raw = ivf_list_bytes(store, sizes)
    for g in gone:
        assert not any(w in raw for w in windows(data[g]))
    assert any(w in raw for w in windows(data[8]))
    hits = index.search(data[gone], 5)
    assert all(m.identity not in {f"p{g}" for g in gone} for r in hits for m in r)
    assert len(index) == 600 - len(gone) and index.search(data[8:9], 1)[0][0].identity == "p8"


def test_ivf_retrains_once_the_gallery_outgrows_its_training(rng):
    cfg = SMALL_IVF.model_copy(update={"ivf_retrain_growth": 2.0})
    index = EmbeddingIndex(DIM, cfg, size_hint=200)
    data = unit(rng, 1000)
    index.add(range(200), data[:200], [f"p{i}" for i in range(200)])
    first = index.vectors
    index.add(range(200, 400), data[200:400], [f"p{i}" for i in range(200, 400)])  # 2x: not yet
    assert index.vectors is first and first.trained_at == 200
    index.add(range(400, 1000), data[400:], [f"p{i}" for i in range(400, 1000)])
    assert index.vectors is not first and index.vectors.trained_at == 400 and len(index) == 1000
    assert index.vectors.index.nlist == 400 // 39
    assert index.search(data[900:901], 1)[0][0].identity == "p900"


def test_a_snapshot_of_the_other_large_kind_is_discarded(tmp_path, rng, caplog):
    folder = tmp_path / "g"
    data = unit(rng, 150)
    with open_gallery(folder, SMALL) as g:
        names = enroll(g, data)
    with caplog.at_level(logging.WARNING), open_gallery(folder, SMALL_IVF) as g:
        assert g._indexes[MODEL].kind == "ivf"
        assert [r[0].identity for r in g.search(MODEL, data[:20], 1)] == names[:20]
    assert "the configuration asks for ivf" in caplog.text
    assert isinstance(read_snapshot(snapshot_path(folder, MODEL), MODEL, DIM, SMALL_IVF), IVFVectors)


# -- snapshots ----------------------------------------------------------------------------------------
@KINDS
def test_snapshot_is_private_and_a_reopen_loads_it_without_rebuilding(tmp_path, rng, monkeypatch, cfg):
    folder = tmp_path / "g"
    data = unit(rng, 150)
    with open_gallery(folder, cfg) as g:
        names = enroll(g, data)
    path = snapshot_path(folder, MODEL)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    from facelink.cloud.gallery import snapshot

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt although the snapshot was usable")

    monkeypatch.setattr(snapshot, "build_index", no_build)
    with open_gallery(folder, cfg) as g:
        assert [r[0].identity for r in g.search(MODEL, data[:20], 1)] == names[:20]


@KINDS
def test_reopen_reconciles_the_snapshot_with_the_store(tmp_path, rng, cfg):
    """The store is the truth: templates added and removed while the snapshot went stale."""
    folder = tmp_path / "g"
    data = unit(rng, 200)
    with open_gallery(folder, cfg) as g:
        names = enroll(g, data[:150])
    path = snapshot_path(folder, MODEL)
    old = path.read_bytes()
    stale = GalleryIndexConfig(**{**cfg.model_dump(), "snapshot": False})
    with open_gallery(folder, stale) as g:  # changes the store, never rewrites the snapshot
        g.remove(names[3])
        new = enroll(g, data[150:], start=150)
    path.write_bytes(old)  # as if the process had died before its erasure reached the snapshot
    with open_gallery(folder, cfg) as g:
        assert len(g._indexes[MODEL]) == 199
        assert not any(w in folder_bytes(folder) for w in windows(data[3]))  # scrubbed on open
        got = [r[0].identity for r in g.search(MODEL, data, 1)]
    assert got[3] != names[3]
    assert got[150:] == new and got[:3] == names[:3]


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "version", "model", "types"])
@KINDS
def test_a_damaged_or_foreign_snapshot_is_discarded_and_rebuilt(tmp_path, rng, caplog, damage, cfg):
    folder = tmp_path / "g"
    data = unit(rng, 150)
    with open_gallery(folder, cfg) as g:
        names = enroll(g, data)
    path = snapshot_path(folder, MODEL)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[HEADER_BYTES + len(raw) // 2] ^= 0x40
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "foreign":
        raw = bytearray(os.urandom(len(raw)))
    elif damage == "version":
        raw[:HEADER_BYTES] = raw[:HEADER_BYTES].replace(b'"version": 1', b'"version": 9')
    elif damage == "model":
        raw[:HEADER_BYTES] = raw[:HEADER_BYTES].replace(MODEL.encode(), b"x@1")
    else:  # well-formed JSON, nonsense types
        raw[:HEADER_BYTES] = raw[:HEADER_BYTES].replace(b'"nodes": 150', b'"nodes": "x50"')
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING), open_gallery(folder, cfg) as g:
        assert [r[0].identity for r in g.search(MODEL, data[:30], 1)] == names[:30]
    assert "discarding index snapshot" in caplog.text
    read_snapshot(path, MODEL, DIM, cfg)  # rewritten whole


@KINDS
def test_erasure_leaves_nothing_in_the_snapshot_or_any_file(tmp_path, rng, cfg):
    folder = tmp_path / "g"
    data = unit(rng, 150)
    with open_gallery(folder, cfg) as g:
        names = enroll(g, data)
    victim = 42
    assert any(w in folder_bytes(folder) for w in windows(data[victim]))  # the test can see it
    with open_gallery(folder, cfg) as g:
        g.remove(names[victim])
        raw = folder_bytes(folder)  # while open: right after remove returned
        assert not any(w in raw for w in windows(data[victim]))
        assert names[victim].encode() not in raw
        assert any(w in raw for w in windows(data[victim + 1]))  # the others are still there
        vectors = read_snapshot(snapshot_path(folder, MODEL), MODEL, DIM, cfg)  # still whole
        assert (vectors.tombstones == 1) if cfg.large_kind == "hnsw" else (len(vectors) == 149)
        assert g.search(MODEL, data[victim : victim + 1], 1)[0][0].identity != names[victim]
    assert not any(w in folder_bytes(folder) for w in windows(data[victim]))


def test_a_small_gallery_keeps_no_snapshot(tmp_path, rng):
    folder = tmp_path / "g"
    with open_gallery(folder) as g:
        enroll(g, unit(rng, 20))
    assert not list(folder.glob("index-*"))
