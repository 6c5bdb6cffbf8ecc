"""The gallery as a store of biometric data: private files, erasure that leaves nothing in any
file, identity names normalised, and bounds on everything a client can store.

The erasure tests read the raw bytes of every file in the gallery folder, the way someone who
copied the folder would, and look for the erased person's vectors (runs of four float32
values), name, metadata value and picture keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from facelink.cloud.gallery import (
    Gallery,
    GalleryError,
    GalleryLimits,
    GalleryQuotaError,
    InvalidIdentityError,
    InvalidMetadataError,
    QueryModel,
    UnknownIdentityError,
    normalize_identity,
)
from facelink.cloud.gallery.gallery import DB_NAME
from facelink.runtime.asymmetric import RejectionPolicy, TransformedGallery, disagreement, ensemble_mean

DIM = 64
WIDE = 1024  # 4 KiB per vector: more than an SQLite page holds, so it lives in overflow pages


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(18)


@pytest.fixture
def restore_umask() -> Iterator[None]:
    old = os.umask(0o022)
    os.umask(old)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- files are private ---------------------------------------------------------------------------


def test_a_new_gallery_is_private_whatever_the_umask(tmp_path, rng, restore_umask):
    os.umask(0)  # the loosest: without the gallery's own umask, files would be 0666
    folder = tmp_path / "nested" / "gallery"
    with Gallery(folder) as g:
        g.enroll("alice", "m", unit(rng, 2))
        assert mode(folder) == 0o700
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            assert (folder / name).exists() and mode(folder / name) == 0o600, name
    assert os.umask(0) == 0  # the process umask is given back


def test_existing_files_are_made_private_on_open(tmp_path, rng, restore_umask):
    os.umask(0o022)
    folder = tmp_path / "g"
    folder.mkdir(mode=0o755)
    other = sqlite3.connect(folder / DB_NAME)  # a gallery file left world-readable, with its WAL open
    other.execute("PRAGMA journal_mode=WAL")
    other.execute("CREATE TABLE t (x)")
    other.execute("INSERT INTO t VALUES (1)")
    other.commit()
    try:
        for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
            os.chmod(folder / name, 0o644)
        with Gallery(folder) as g:  # an empty database is made a gallery, and private
            assert mode(folder) == 0o700
            for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm"):
                assert mode(folder / name) == 0o600, name
            g.enroll("alice", "m", unit(rng, 1))
    finally:
        other.close()


def test_an_existing_gallery_is_made_private_on_open(tmp_path, rng, restore_umask):
    with Gallery(tmp_path / "g") as g:
        g.enroll("alice", "m", unit(rng, 1))
    os.chmod(tmp_path / "g", 0o755)
    os.chmod(tmp_path / "g" / DB_NAME, 0o644)
    with Gallery(tmp_path / "g") as g:
        assert "alice" in g
        assert mode(tmp_path / "g") == 0o700 and mode(tmp_path / "g" / DB_NAME) == 0o600


# -- erasure -------------------------------------------------------------------------------------


class MeanEnsemble:
    """Stands in for a GalleryEnsemble with identity transforms: the query-model template of a
    picture is the mean of its two gallery models' embeddings (no ONNX file needed)."""

    query_model = "q@1"
    member_models = ("a@1", "b@1")

    def transform(self, embeddings: dict[str, np.ndarray]) -> TransformedGallery:
        models = tuple(m for m in self.member_models if m in embeddings)
        members = np.stack([embeddings[m] for m in models], axis=1).astype(np.float32)
        uncertainty = disagreement(members) if len(models) > 1 else np.zeros(len(members), np.float32)
        return TransformedGallery(ensemble_mean(members, None), members, uncertainty, models)


QUERY = QueryModel(MeanEnsemble(), RejectionPolicy(0.1, "flag", threshold=0.5))  # type: ignore[arg-type]
VICTIM = "Zebedee Quarrington-Erasemé"
BADGE = "badge-ERASE-ME-4242"


def enroll_people(g: Gallery, rng: np.random.Generator, count: int) -> list[str]:
    """`count` people (one of them VICTIM), each with pictures in a@1, b@1 (wide) and the
    derived q@1, plus templates of a second, separately enrolled model."""
    names = [f"Person {i:03d}" for i in range(count - 1)]
    names.insert(count // 2, VICTIM)
    for i, name in enumerate(names):
        a = unit(rng, 3)
        b = a + 0.1 * unit(rng, 3)  # agree closely with a: the derived template is kept, "ok"
        g.enroll_pictures(name, {"a@1": a, "b@1": b}, [QUERY], metadata={"badge": f"{BADGE}" if name == VICTIM else f"b{i}"})
        g.enroll(name, "wide@1", unit(rng, 2, WIDE), sources=[f"{name}-{k}.jpg" for k in range(2)])
    return names


def secrets_of(folder: Path, name: str) -> dict[str, list[bytes]]:
    """Byte strings that give `name` away: windows of four float32 values from each of its
    templates (every model's, derived ones included), its name, and its picture keys."""
    conn = sqlite3.connect(f"file:{folder / DB_NAME}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT t.model_id, t.vector, t.source FROM templates t JOIN identities i ON i.id = t.identity_id"
            " WHERE i.name = ?", (name,),
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[bytes]] = {"name": [name.encode()]}
    for model, blob, source in rows:
        step = len(blob) // 4
        out.setdefault(model, []).extend(blob[i : i + 16] for i in (0, step, 2 * step, len(blob) - 16))
        if source is not None:
            out.setdefault("source", []).append(source.encode())
    return out


def raw_bytes(folder: Path) -> bytes:
    """Everything in the gallery folder, as a copy of the folder would hold it."""
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file())


def found(secrets: dict[str, list[bytes]], data: bytes) -> dict[str, int]:
    return {kind: sum(s in data for s in items) for kind, items in secrets.items() if any(s in data for s in items)}


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_erasure_leaves_nothing_of_the_person_in_any_file(tmp_path, rng, storage):
    from facelink.cloud.gallery import GallerySettings

    folder = tmp_path / "g"
    settings = GallerySettings(vector_storage=storage)  # float16: what a server writes
    with Gallery(folder, settings=settings) as g:
        names = enroll_people(g, rng, 40)
        others = [n for n in names if n != VICTIM]
        secrets = secrets_of(folder, VICTIM)
        assert set(secrets) == {"name", "a@1", "b@1", "q@1", "wide@1", "source"}  # derived ones included
        kept = {n: secrets_of(folder, n) for n in (others[0], others[20], others[-1])}
        before = raw_bytes(folder)
        assert found(secrets, before) == {k: len(v) for k, v in secrets.items()}  # the scan sees them
        assert BADGE.encode() in before

        assert g.remove(VICTIM) == 3
        with pytest.raises(UnknownIdentityError):
            g.templates_of(VICTIM)
        # While the server still runs: the database file, its WAL and shared-memory file.
        data = raw_bytes(folder)
        assert found(secrets, data) == {} and BADGE.encode() not in data
        for name, theirs in kept.items():
            assert found(theirs, data) == {k: len(v) for k, v in theirs.items()}, name
    data = raw_bytes(folder)
    assert found(secrets, data) == {} and BADGE.encode() not in data
    with Gallery(folder, settings=settings) as g:
        assert VICTIM not in g and len(g) == 39
        records, _ = g.list(limit=100)
        assert [r.identity for r in records] == sorted(others)


def test_many_erasures_in_a_row_leave_nothing(tmp_path, rng):
    folder = tmp_path / "g"
    with Gallery(folder) as g:
        names = enroll_people(g, rng, 30)
        gone = names[::3]
        secrets = {n: secrets_of(folder, n) for n in names}
        for name in gone:
            g.remove(name)
        data = raw_bytes(folder)
    data_closed = raw_bytes(folder)
    for name in names:
        expected = {} if name in gone else {k: len(v) for k, v in secrets[name].items()}
        assert found(secrets[name], data) == expected, name
        assert found(secrets[name], data_closed) == expected, name


def test_replace_scrubs_the_replaced_templates(tmp_path, rng):
    folder = tmp_path / "g"
    with Gallery(folder) as g:
        old = unit(rng, 2, WIDE)
        g.enroll("alice", "wide@1", old)
        secrets = secrets_of(folder, "alice")
        g.enroll("alice", "wide@1", unit(rng, 1, WIDE), replace=True)
        assert found({"old": secrets["wide@1"]}, raw_bytes(folder)) == {}


def test_an_erasure_blocked_by_a_reader_is_scrubbed_after_the_next_write(tmp_path, rng, caplog):
    folder = tmp_path / "g"
    with Gallery(folder) as g:
        enroll_people(g, rng, 5)
        secrets = secrets_of(folder, VICTIM)
        reader = sqlite3.connect(folder / DB_NAME, isolation_level=None)  # a backup, say
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM templates").fetchone()  # holds the pre-erasure snapshot
        with caplog.at_level(logging.WARNING):
            g.remove(VICTIM)
        assert "could not be truncated" in caplog.text
        assert found(secrets, raw_bytes(folder))  # still in the WAL, as the warning says
        reader.execute("COMMIT")
        reader.close()
        g.enroll("someone new", "a@1", unit(rng, 1))  # the next write retries the checkpoint
        assert found(secrets, raw_bytes(folder)) == {}


def test_compact_rewrites_a_file_that_deleted_without_secure_delete(tmp_path, rng):
    folder = tmp_path / "g"
    with Gallery(folder) as g:
        enroll_people(g, rng, 6)
        secrets = secrets_of(folder, VICTIM)
    conn = sqlite3.connect(folder / DB_NAME, isolation_level=None)  # as an older facelink would
    conn.execute("PRAGMA secure_delete=OFF")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("DELETE FROM identities WHERE name = ?", (VICTIM,))
    conn.close()
    assert found(secrets, raw_bytes(folder))  # left in free space by the unscrubbed delete
    with Gallery(folder) as g:
        assert g.compact() is True
        assert found(secrets, raw_bytes(folder)) == {}
        assert len(g) == 5


def test_database_pragmas_for_erasure(tmp_path):
    with Gallery(tmp_path) as g:
        conn = g._store._db()
        assert conn.execute("PRAGMA secure_delete").fetchone()[0] == 1
        assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY


# -- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "Ada Lovelace",
        "Ada\u00a0Lovelace",  # no-break space
        "Ａｄａ Lovelace",  # full-width letters
        "Ada\u3000Lovelace",  # ideographic space
        "  Ada   Lovelace ",  # runs of spaces, leading and trailing ones
        "Ada\u2003\u2009Lovelace",  # em space then thin space: one run
    ],
)
def test_names_a_person_reads_as_the_same_are_one_identity(tmp_path, rng, variant):
    with Gallery(tmp_path) as g:
        g.enroll("Ada Lovelace", "m", unit(rng, 1))
        assert normalize_identity(variant) == "Ada Lovelace"
        assert variant in g and g.resolve(variant) == "Ada Lovelace"
        assert g.enroll(variant, "m", unit(rng, 1)) == (1, 2)  # added to the same identity
        assert len(g) == 1 and g.list()[0][0].identity == "Ada Lovelace"
        assert len(g.templates_of(variant)) == 2
        assert g.search("m", unit(rng, 1))[0][0].identity == "Ada Lovelace"
        assert g.remove(variant) == 2 and len(g) == 0


def test_a_name_is_stored_in_normal_form(tmp_path, rng):
    with Gallery(tmp_path) as g:
        g.enroll(" Ａｄａ\u00a0\u00a0Lovelace ", "m", unit(rng, 1))
        assert [r.identity for r in g.list()[0]] == ["Ada Lovelace"]
        assert g.normalized_name("Ada\u3000Lovelace") == "Ada Lovelace"
        assert g.normalized_name("Ｂob") == "Bob"  # not enrolled: the form it would be stored under


def test_case_is_kept(tmp_path, rng):
    with Gallery(tmp_path) as g:
        g.enroll("Ada Lovelace", "m", unit(rng, 1))
        g.enroll("ada lovelace", "m", unit(rng, 1))
        assert len(g) == 2


@pytest.mark.parametrize(
    ("name", "char", "index"),
    [
        ("Ada\u200bLovelace", "U+200B", 3),  # zero-width space
        ("Ada\u200dLovelace", "U+200D", 3),  # zero-width joiner
        ("\u202eecalevoL adA", "U+202E", 0),  # right-to-left override
        ("Ada\u2066Lovelace\u2069", "U+2066", 3),  # bidi isolate
        ("Ada\ufeffLovelace", "U+FEFF", 3),  # zero-width no-break space (BOM)
        ("Ada\u00adLovelace", "U+00AD", 3),  # soft hyphen
        ("Ada\u2028Lovelace", "U+2028", 3),  # line separator (Zl)
        ("Ada\u2029Lovelace", "U+2029", 3),  # paragraph separator (Zp)
        ("Ada\ue000", "U+E000", 3),  # private use (Co)
        ("Ada\u0378", "U+0378", 3),  # unassigned (Cn)
        ("Ada\u1680Lovelace", "U+1680", 3),  # a space separator NFKC keeps (Ogham space mark)
        ("Ada\u3164Lovelace", "U+3164", 3),  # Hangul filler: a letter by category, blank on screen
        ("Ada\ufe0f Lovelace", "U+FE0F", 3),  # variation selector
        ("Ada\U000e0041", "U+E0041", 3),  # tag character
        ("Ada\tLovelace", "U+0009", 3),
        ("Ada\nLovelace", "U+000A", 3),
        ("Ada\x1b[31m", "U+001B", 3),
    ],
)
def test_invisible_characters_are_refused_by_code_point_and_index(tmp_path, rng, name, char, index):
    with Gallery(tmp_path) as g:
        with pytest.raises(InvalidIdentityError, match=rf"{re.escape(char)} .* at index {index},") as info:
            g.enroll(name, "m", unit(rng, 1))
        assert "\n" not in str(info.value) and "\x1b" not in str(info.value)  # safe to log
        assert len(g) == 0
        with pytest.raises(InvalidIdentityError):
            g.remove(name)
        assert name not in g


@pytest.mark.parametrize("name", ["", "   ", "\u00a0\u3000", "x" * 257, " " + "x" * 257])
def test_empty_and_too_long_names_are_refused(name):
    with pytest.raises(InvalidIdentityError):
        normalize_identity(name)


def test_length_is_judged_after_normalisation():
    assert normalize_identity("  " + "x" * 256 + "  ") == "x" * 256
    assert normalize_identity("ｘ" * 256) == "x" * 256


def test_names_stored_before_normalisation_stay_reachable(tmp_path, rng):
    """A gallery written by an older version may hold names that are not in normal form."""
    with Gallery(tmp_path) as g:
        for name in ("two", "emoji", "wide", "plain"):
            g.enroll(name, "m", unit(rng, 1))
    legacy = {"two": "Ada  Lovelace", "emoji": "\U0001f469\u200d\U0001f52c", "wide": "Ｃｈａｒｌｅｓ", "plain": "Grace Hopper"}
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        for old, new in legacy.items():
            conn.execute("UPDATE identities SET name = ? WHERE name = ?", (new, old))
    conn.close()
    with Gallery(tmp_path) as g:
        assert all(name in g for name in legacy.values())  # each by its exact stored form
        assert "Grace\u00a0Hopper" in g  # a stored name in normal form is found by any variant
        assert g.resolve("Grace\u00a0Hopper") == "Grace Hopper"
        assert len(g.templates_of("\U0001f469\u200d\U0001f52c")) == 1
        assert g.remove("\U0001f469\u200d\U0001f52c") == 1  # removable although no longer valid
        assert g.remove("Ada  Lovelace") == 1
        assert g.remove("Ｃｈａｒｌｅｓ") == 1
        assert [r.identity for r in g.list()[0]] == ["Grace Hopper"]


# -- metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        {f"k{i}": "v" for i in range(32)},
        {"a" * 64: "x" * 1024},
        {"team.name_2-b": "Zürich – Straße 5, 李雷 🔬"},
        {"note": "no-break\u00a0space"},
        {"empty": ""},
    ],
)
def test_metadata_within_bounds_is_stored(tmp_path, rng, metadata):
    with Gallery(tmp_path) as g:
        g.enroll("alice", "m", unit(rng, 1), metadata=metadata)
        assert g.list()[0][0].metadata == metadata


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({f"k{i}": "v" for i in range(33)}, "33 keys; the limit is 32"),
        ({"": "v"}, "0 characters long"),
        ({"a" * 65: "v"}, "65 characters long"),
        ({"bad key": "v"}, r"U\+0020 .*at index 3"),
        ({"ключ": "v"}, r"U\+043A"),
        ({"k\n": "v"}, r"U\+000A"),
        ({"k": "x" * 1025}, "1025 characters long; the limit is 1024"),
        ({"k": "two\nlines"}, r"U\+000A .*at index 3"),
        ({"k": "a\u200bb"}, r"U\+200B"),
        ({"k": "\u202eevil"}, r"U\+202E"),
        ({"k": 5}, "strings to strings"),
        ({5: "v"}, "strings to strings"),
    ],
)
def test_metadata_out_of_bounds_is_refused(tmp_path, rng, metadata, message):
    with Gallery(tmp_path) as g:
        with pytest.raises(InvalidMetadataError, match=message) as info:
            g.enroll("alice", "m", unit(rng, 1), metadata=metadata)
        assert isinstance(info.value, ValueError) and isinstance(info.value, GalleryError)
        assert len(g) == 0


def test_merged_metadata_is_bounded_too(tmp_path, rng):
    with Gallery(tmp_path, GalleryLimits(max_metadata_keys=3)) as g:
        g.enroll("alice", "m", unit(rng, 1), metadata={"a": "1", "b": "2"})
        g.enroll("alice", "m", unit(rng, 1), metadata={"b": "3", "c": "4"})  # 3 keys once merged
        with pytest.raises(GalleryQuotaError, match="would hold 4 metadata keys; the limit is 3"):
            g.enroll("alice", "m", unit(rng, 1), metadata={"d": "5"})
        assert g.list()[0][0].templates == 2  # the refused enrollment stored nothing
        g.enroll("alice", "m", unit(rng, 1), replace=True, metadata={"x": "1", "y": "2", "z": "3"})
        assert g.list()[0][0].metadata == {"x": "1", "y": "2", "z": "3"}


# -- quotas --------------------------------------------------------------------------------------


def test_the_gallery_wide_identity_quota(tmp_path, rng):
    with Gallery(tmp_path, GalleryLimits(max_identities=2)) as g:
        g.enroll("alice", "m", unit(rng, 1))
        g.enroll("bob", "m", unit(rng, 1))
        with pytest.raises(GalleryQuotaError, match="holds 2 identities.*max_identities=2") as info:
            g.enroll("carol", "m", unit(rng, 1))
        assert isinstance(info.value, GalleryError)
        assert "carol" not in g
        g.enroll("alice", "m", unit(rng, 1))  # an enrolled identity may still add pictures
        g.remove("bob")
        g.enroll("carol", "m", unit(rng, 1))
        assert len(g) == 2


def test_the_per_identity_picture_quota(tmp_path, rng):
    with Gallery(tmp_path, GalleryLimits(max_pictures_per_identity=3)) as g:
        g.enroll("alice", "m", unit(rng, 2))
        with pytest.raises(GalleryQuotaError, match=r"would hold 4 pictures \(2 stored, 2 added\); the limit is 3"):
            g.enroll("alice", "m", unit(rng, 2))
        assert len(g.templates_of("alice")) == 2
        assert g.enroll("alice", "m", unit(rng, 3), replace=True) == (3, 3)  # a replace starts over
        assert g.enroll("alice", "other", unit(rng, 3)) == (3, 3)  # pictures, not templates summed
        with pytest.raises(GalleryQuotaError):
            g.enroll("bob", "m", unit(rng, 4))
        assert "bob" not in g


def test_the_picture_quota_counts_pictures_of_enroll_pictures(tmp_path, rng):
    with Gallery(tmp_path, GalleryLimits(max_pictures_per_identity=4)) as g:
        a = unit(rng, 3)
        assert g.enroll_pictures("alice", {"a@1": a, "b@1": a}, [QUERY]) == (3, 3)
        with pytest.raises(GalleryQuotaError, match="would hold 5 pictures"):
            g.enroll_pictures("alice", {"a@1": a[:2], "b@1": a[:2]}, [QUERY])
        assert len(g.templates_of("alice")) == 9


def test_limits_are_a_frozen_validated_value(tmp_path):
    limits = GalleryLimits()
    assert (limits.max_identities, limits.max_pictures_per_identity) == (1_000_000, 1000)
    assert (limits.max_metadata_keys, limits.max_metadata_key_length, limits.max_metadata_value_length) == (32, 64, 1024)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_identities = 5  # type: ignore[misc]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_identities must be a positive integer"):
            GalleryLimits(max_identities=bad)  # type: ignore[arg-type]
    with Gallery.open(tmp_path, GalleryLimits(max_identities=7)) as g:
        assert g.limits.max_identities == 7
