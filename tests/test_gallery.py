"""Tests of the cloud gallery: SQLite store + faiss index, with random unit vectors.

In 128 dimensions random unit vectors are nearly orthogonal (cosine ~ +-0.1), so a template
plus a little noise is unambiguously closest to its own identity.
"""

from __future__ import annotations

import logging
import sqlite3
import threading

import numpy as np
import pytest

from facelink.cloud.gallery import (
    SCHEMA_VERSION,
    Gallery,
    GalleryError,
    IdentityRecord,
    InvalidIdentityError,
    Match,
    UnknownIdentityError,
)
from facelink.cloud.gallery.store import decode_vector

DIM = 128
MODEL = "test-model"


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(rng: np.random.Generator, v: np.ndarray, noise: float = 0.05) -> np.ndarray:
    """A query close to `v` (one row)."""
    return (v + noise * rng.standard_normal(v.shape) / np.sqrt(v.shape[-1])).reshape(1, -1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def gallery(tmp_path):
    with Gallery(tmp_path / "g") as g:
        yield g


def test_enroll_and_search_finds_the_right_identity(gallery, rng):
    people = {name: unit(rng, 3) for name in ["alice", "bob", "carol", "dave"]}
    for name, vecs in people.items():
        assert gallery.enroll(name, MODEL, vecs) == (3, 3)
    for name, vecs in people.items():
        (matches,) = gallery.search(MODEL, near(rng, vecs[1]), k=1)
        assert matches[0].identity == name
        assert matches[0].score == pytest.approx(1.0, abs=0.01)
    assert len(gallery) == 4 and "alice" in gallery and "zoe" not in gallery
    assert gallery.dim(MODEL) == DIM and gallery.dim("other") is None


def test_stores_normalised_copies(gallery, rng):
    v = unit(rng, 1)
    gallery.enroll("alice", MODEL, 7.0 * v)  # scale must not matter to cosine
    assert np.linalg.norm(gallery_vectors(gallery)[0]) == pytest.approx(1.0, abs=1e-6)
    (matches,) = gallery.search(MODEL, 0.001 * v)
    assert matches[0].score == pytest.approx(1.0, abs=1e-5)


def gallery_vectors(g: Gallery) -> np.ndarray:
    with sqlite3.connect(g.directory / "gallery.sqlite3") as conn:
        rows = conn.execute("SELECT dim, vector FROM templates ORDER BY id").fetchall()
    return np.stack([decode_vector(b, d) for d, b in rows])


def test_templates_are_stored_as_float16_and_float32_galleries_stay_readable(tmp_path, rng):
    from facelink.cloud.gallery import GallerySettings

    v = unit(rng, 3)
    with Gallery(tmp_path / "g") as old:  # a gallery written in float32 (the library's default)
        old.enroll("alice", MODEL, v[:1])
    # What a server opens (GalleryBackendConfig.vector_storage): float16 beside the float32 rows.
    with Gallery(tmp_path / "g", settings=GallerySettings(vector_storage="float16")) as g:
        g.enroll("bob", MODEL, v[1:2])
        with sqlite3.connect(g.directory / "gallery.sqlite3") as conn:
            sizes = [len(b) for (b,) in conn.execute("SELECT vector FROM templates ORDER BY id")]
        assert sizes == [4 * DIM, 2 * DIM]
        ((a,),), ((b,),) = g.search(MODEL, v[:1], k=1), g.search(MODEL, v[1:2], k=1)
        assert (a.identity, b.identity) == ("alice", "bob")
        assert a.score == pytest.approx(1.0, abs=1e-6) and b.score == pytest.approx(1.0, abs=1e-3)
        before = g.search(MODEL, v[2:], k=2)[0]
    with Gallery(tmp_path / "g", settings=GallerySettings(vector_storage="float16")) as reopened:
        # the index held exactly what the store gives back
        after = reopened.search(MODEL, v[2:], k=2)[0]
    assert [(m.identity, round(m.score, 6)) for m in after] == [(m.identity, round(m.score, 6)) for m in before]


def test_search_returns_k_distinct_identities_best_first(gallery, rng):
    q = unit(rng, 1)[0]
    # "many" has 20 templates all closer to q than anyone else: a template-level top-k would
    # return it 20 times; the gallery must return it once and then the next people (this also
    # makes the index widen its first fetch of 4 * k templates).
    many = np.stack([q + 0.05 * rng.standard_normal(DIM) / np.sqrt(DIM) for _ in range(20)])
    gallery.enroll("many", MODEL, many)
    for i, w in enumerate([0.8, 0.6, 0.4]):  # decreasing similarity to q
        other = unit(rng, 1)[0]
        other -= other.dot(q) * q
        other /= np.linalg.norm(other)
        gallery.enroll(f"p{i}", MODEL, (w * q + np.sqrt(1 - w * w) * other).reshape(1, -1))
    for noise in range(5):
        gallery.enroll(f"noise{noise}", MODEL, unit(rng, 2))

    (matches,) = gallery.search(MODEL, q.reshape(1, -1), k=4)
    assert [m.identity for m in matches] == ["many", "p0", "p1", "p2"]
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True)
    assert scores[1:] == pytest.approx([0.8, 0.6, 0.4], abs=1e-5)
    assert all(isinstance(m, Match) for m in matches)

    # More than exist: every identity once. Several queries: one list each.
    results = gallery.search(MODEL, np.vstack([q, unit(rng, 1)[0]]), k=100)
    assert len(results) == 2
    for res in results:
        assert len(res) == len({m.identity for m in res}) == 9
    assert gallery.search(MODEL, q.reshape(1, -1), k=0) == [[]]


def test_replace_semantics(gallery, rng):
    old, new = unit(rng, 3), unit(rng, 2)
    gallery.enroll("alice", MODEL, old, metadata={"team": "a", "site": "x"})
    assert gallery.enroll("alice", MODEL, unit(rng, 1), metadata={"team": "b"}) == (1, 4)
    (rec,), _ = gallery.list()
    assert rec.templates == 4 and rec.metadata == {"team": "b", "site": "x"}  # merged

    assert gallery.enroll("alice", MODEL, new, replace=True, metadata={"badge": "7"}) == (2, 2)
    (rec,), _ = gallery.list()
    assert rec.templates == 2 and rec.metadata == {"badge": "7"}  # overwritten
    # Old templates are gone from the index too: the best score for them is now ~0.
    (matches,) = gallery.search(MODEL, old[:1], k=1)
    assert matches[0].score < 0.5
    (matches,) = gallery.search(MODEL, new[:1], k=1)
    assert matches[0] == Match("alice", pytest.approx(1.0, abs=1e-5))


def test_replace_only_touches_that_model(gallery, rng):
    gallery.enroll("alice", "m1", unit(rng, 3))
    gallery.enroll("alice", "m2", unit(rng, 2, dim=64))
    assert gallery.enroll("alice", "m2", unit(rng, 1, dim=64), replace=True) == (1, 1)
    (rec,), _ = gallery.list()
    assert rec.templates == 3  # the model with most templates, not the sum
    assert gallery.search("m1", unit(rng, 1), k=1)[0][0].identity == "alice"


def test_remove_then_search_no_longer_returns_it(gallery, rng):
    a, b = unit(rng, 2), unit(rng, 2)
    gallery.enroll("alice", MODEL, a)
    gallery.enroll("alice", "small", unit(rng, 1, dim=16))
    gallery.enroll("bob", MODEL, b)
    # Templates of every model go; the count is of pictures, as list() counts them (the model
    # holding the most), so it agrees with what Enroll reported.
    assert gallery.remove("alice") == 2
    assert "alice" not in gallery and len(gallery) == 1
    (matches,) = gallery.search(MODEL, a[:1], k=5)
    assert [m.identity for m in matches] == ["bob"]
    assert gallery.search("small", unit(rng, 1, dim=16)) == [[]]
    assert gallery.dim("small") is None


def test_remove_unknown_identity(gallery, rng):
    gallery.enroll("alice", MODEL, unit(rng, 1))
    with pytest.raises(UnknownIdentityError, match="unknown identity 'bob'") as info:
        gallery.remove("bob")
    assert isinstance(info.value, KeyError) and isinstance(info.value, GalleryError)
    assert str(info.value) == "unknown identity 'bob'"


# An emoji ZWJ sequence is refused with the other invisible characters: the joiner cannot be
# seen, and the same rule must hold for every Cf character (tests/test_gallery_privacy.py).
@pytest.mark.parametrize(
    "name", ["", "x" * 257, "tab\there", "new\nline", "nul\x00", "del\x7f", "c1\x85", "\U0001f469\u200d\U0001f52c"]
)
def test_invalid_identity_names(gallery, rng, name):
    with pytest.raises(InvalidIdentityError) as info:
        gallery.enroll(name, MODEL, unit(rng, 1))
    assert isinstance(info.value, ValueError) and isinstance(info.value, GalleryError)
    assert len(gallery) == 0


@pytest.mark.parametrize("name", ["x" * 256, "José Ñúñez", "李雷", "O'Brien-Smith (2)", "🔬"])
def test_valid_identity_names(gallery, rng, name):
    gallery.enroll(name, MODEL, unit(rng, 1))
    assert name in gallery and gallery.list()[0][0].identity == name


def test_dim_mismatch_is_refused_and_stores_nothing(gallery, rng):
    gallery.enroll("alice", MODEL, unit(rng, 2))
    with pytest.raises(ValueError, match="128-dimensional"):
        gallery.enroll("bob", MODEL, unit(rng, 1, dim=64), metadata={"k": "v"})
    assert "bob" not in gallery  # the transaction rolled back, identity row included
    with pytest.raises(ValueError, match="128-dimensional"):
        gallery.search(MODEL, unit(rng, 1, dim=64))
    # Replacing the model's only templates may change its dimension.
    assert gallery.enroll("alice", MODEL, unit(rng, 1, dim=64), replace=True) == (1, 1)
    assert gallery.dim(MODEL) == 64
    assert gallery.search(MODEL, unit(rng, 1, dim=64))[0][0].identity == "alice"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_embeddings_are_refused(gallery, rng, bad):
    x = unit(rng, 3)
    x[1, 5] = bad
    with pytest.raises(ValueError, match="row 1"):
        gallery.enroll("alice", MODEL, x)
    assert len(gallery) == 0
    with pytest.raises(ValueError, match="NaN or infinite"):
        gallery.search(MODEL, x)


@pytest.mark.parametrize(
    "embeddings",
    [np.ones(DIM), np.ones((1, 2, DIM)), np.zeros((0, DIM)), np.zeros((1, DIM)), np.array([["a"]])],
)
def test_bad_shapes_and_values_are_refused(gallery, embeddings):
    with pytest.raises(ValueError):
        gallery.enroll("alice", MODEL, embeddings)
    assert len(gallery) == 0


def test_persists_across_reopen(tmp_path, rng):
    vecs = {"alice": unit(rng, 2), "bob": unit(rng, 3)}
    with Gallery(tmp_path) as g:
        for name, v in vecs.items():
            sources = [f"{name}{i}.jpg" for i in range(len(v))]
            g.enroll(name, MODEL, v, metadata={"name": name}, sources=sources)
        g.remove("bob")
        g.enroll("carol", MODEL, unit(rng, 1))
    with Gallery.open(tmp_path) as g:
        assert len(g) == 2 and "bob" not in g
        (matches,) = g.search(MODEL, near(rng, vecs["alice"][1]), k=5)
        assert matches[0].identity == "alice" and matches[0].score > 0.99
        assert {m.identity for m in matches} == {"alice", "carol"}
        records, total = g.list()
        assert total == 2
        assert records[0] == IdentityRecord("alice", 2, records[0].created_time_us, {"name": "alice"})
        # New template ids continue after the old ones (never reused), so adding still works.
        assert g.enroll("alice", MODEL, unit(rng, 1)) == (1, 3)


def test_list_pagination_and_total(gallery, rng):
    names = [f"person-{i:02d}" for i in range(23)]
    for name in reversed(names):
        gallery.enroll(name, MODEL, unit(rng, 1 + len(name) % 3))
    pages, offset = [], 0
    while True:
        page, total = gallery.list(offset=offset, limit=10)
        assert total == 23
        if not page:
            break
        pages.append(page)
        offset += len(page)
    assert [len(p) for p in pages] == [10, 10, 3]
    listed = [r.identity for p in pages for r in p]
    assert listed == sorted(names)
    assert all(r.templates >= 1 and r.created_time_us > 0 for p in pages for r in p)
    assert gallery.list(offset=100) == ([], 23)
    assert gallery.list(limit=0) == ([], 23)
    with pytest.raises(ValueError):
        gallery.list(offset=-1)


def test_search_on_empty_model(gallery, rng):
    assert gallery.search(MODEL, unit(rng, 3)) == [[], [], []]
    gallery.enroll("alice", "other", unit(rng, 1))
    assert gallery.search(MODEL, unit(rng, 2)) == [[], []]


def test_concurrent_enroll_and_search(gallery, rng):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        local = np.random.default_rng(t)
        try:
            for i in range(25):
                gallery.enroll(f"t{t}-{i % 5}", MODEL, unit(local, 2))
                res = gallery.search(MODEL, unit(local, 3), k=3)
                assert len(res) == 3 and all(len(r) <= 3 for r in res)
                if i % 10 == 9:
                    gallery.remove(f"t{t}-{i % 5}")
                gallery.list(limit=5)
        except BaseException as exc:  # collected: an assertion in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    # The index agrees with the store: every listed identity is findable by its own template.
    records, total = gallery.list(limit=1000)
    assert total == len(records) == len(gallery)
    found = {m.identity for (m,) in gallery.search(MODEL, gallery_vectors(gallery), k=1)}
    assert found == {r.identity for r in records}


def test_newer_schema_is_refused(tmp_path):
    with sqlite3.connect(tmp_path / "gallery.sqlite3") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(GalleryError, match="version 99"):
        Gallery(tmp_path)


# The version 1 schema exactly as facelink wrote it (cloud/gallery/store.py at commit 3a1ddc4).
V1_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS identities (
        id INTEGER PRIMARY KEY,
        name TEXT UNIQUE NOT NULL,
        created_us INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}'  -- JSON object of str -> str
    )""",
    """CREATE TABLE IF NOT EXISTS templates (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        identity_id INTEGER NOT NULL REFERENCES identities(id) ON DELETE CASCADE,
        model_id TEXT NOT NULL,
        dim INTEGER NOT NULL,
        vector BLOB NOT NULL,  -- dim float32 values, little-endian, L2-normalised
        source TEXT,           -- where the template came from (file name, request id), optional
        created_us INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS templates_model ON templates(model_id)",
    "CREATE INDEX IF NOT EXISTS templates_identity_model ON templates(identity_id, model_id)",
)


def test_a_version_1_gallery_is_migrated_in_place_and_stays_searchable(tmp_path, rng):
    vectors = unit(rng, 2)
    with sqlite3.connect(tmp_path / "gallery.sqlite3") as conn:  # as version 1 wrote it
        for statement in V1_SCHEMA:
            conn.execute(statement)
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO identities (name, created_us, metadata) VALUES ('alice', 1, '{\"team\": \"a\"}')")
        for i, row in enumerate(vectors):
            conn.execute(
                "INSERT INTO templates (identity_id, model_id, dim, vector, source, created_us) VALUES (1, ?, ?, ?, ?, 1)",
                (MODEL, DIM, row.astype("<f4").tobytes(), f"alice{i}.jpg"),
            )
    conn.close()
    for _ in range(2):  # migrated on the first open; the second finds the current version and leaves it
        with Gallery(tmp_path) as g:
            db = g._store._db()
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            columns = [c[1] for c in db.execute("PRAGMA table_info(templates)")]
            assert columns[-3:] == ["status", "uncertainty", "reason"]
            (matches,) = g.search(MODEL, near(rng, vectors[1]), k=1)
            assert matches[0].identity == "alice" and matches[0].score > 0.99
            records = g.templates_of("alice")
            assert [(r.picture, r.status, r.uncertainty, r.reason) for r in records] == [
                ("alice0.jpg", "ok", None, None), ("alice1.jpg", "ok", None, None)]
            assert g.list()[0][0] == IdentityRecord("alice", 2, 1, {"team": "a"})
    with Gallery(tmp_path) as g:  # and it takes new templates
        assert g.enroll("alice", MODEL, unit(rng, 1)) == (1, 3)


def test_database_settings(gallery):
    conn = gallery._store._db()  # the gallery's own connection: pragmas are per connection
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL: an acknowledged commit is on disk
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_corrupt_vector_is_skipped_on_rebuild(tmp_path, rng, caplog):
    with Gallery(tmp_path) as g:
        g.enroll("alice", MODEL, unit(rng, 1))
        g.enroll("bob", MODEL, unit(rng, 1))
    with sqlite3.connect(tmp_path / "gallery.sqlite3") as conn:
        (tid,) = conn.execute(
            "SELECT t.id FROM templates t JOIN identities i ON i.id = t.identity_id WHERE i.name = 'bob'"
        ).fetchone()
        conn.execute("UPDATE templates SET vector = ? WHERE id = ?", (b"\x00" * 10, tid))
    with caplog.at_level(logging.WARNING), Gallery(tmp_path) as g:
        assert f"template {tid} " in caplog.text
        assert [m.identity for m in g.search(MODEL, unit(rng, 1), k=5)[0]] == ["alice"]
        assert g.remove("bob") == 1  # still in the store, so it can be cleaned up


def test_index_failure_after_commit_is_repaired_from_the_store(gallery, rng, monkeypatch):
    from facelink.cloud.gallery import gallery as gallery_module

    real_add = gallery_module.EmbeddingIndex.add
    calls = []

    def flaky_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("simulated")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(gallery_module.EmbeddingIndex, "add", flaky_add)
    v = unit(rng, 2)
    assert gallery.enroll("alice", MODEL, v) == (2, 2)  # committed, so reported as done
    assert len(calls) == 2  # the failed add, then the rebuild's
    assert gallery.search(MODEL, v[:1], k=1)[0][0].score == pytest.approx(1.0, abs=1e-5)


def test_closed_gallery_raises(tmp_path, rng):
    g = Gallery(tmp_path)
    g.close()
    g.close()
    with pytest.raises(GalleryError, match="closed"):
        g.enroll("alice", MODEL, unit(rng, 1))
    with pytest.raises(GalleryError, match="closed"):
        len(g)
