"""Durable gallery storage: identities and their face templates in one SQLite file.

SQLite is the source of truth; the faiss indexes are rebuilt from it on every start. It runs
in WAL mode so readers (another process listing the gallery, a backup) never block the
server's writes, with `synchronous=NORMAL`, which in WAL mode can lose the last commits on a
power cut but never corrupts the file - the right trade for enrollments that can be redone.

Not thread-safe by itself: the connection is opened with `check_same_thread=False` so that a
gRPC thread pool can use it, and `Gallery` serialises every call with its lock.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

#: Bumped whenever the schema changes; a file with a larger version is refused, not guessed at.
SCHEMA_VERSION = 2
MAX_NAME_LENGTH = 256
#: What the rejection policy decided about a template; "dropped" templates are kept, never indexed.
STATUSES = ("ok", "flagged", "dropped")

# The statements that bring a file from version n-1 to n. A new file runs them all in order,
# so the migration path is the one every new gallery takes, not a branch that only old files
# ever exercise.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE IF NOT EXISTS identities (
            id INTEGER PRIMARY KEY,
            name TEXT UNIQUE NOT NULL,
            created_us INTEGER NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}'  -- JSON object of str -> str
        )""",
        # AUTOINCREMENT so a template id is never reused after a removal: the id is also the faiss
        # id, and a reused id could make a stale index entry point at someone else's face.
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
        # Serves the ON DELETE CASCADE lookup (without it every removal scans all templates) and the
        # per-identity, per-model counts of list() and enroll().
        "CREATE INDEX IF NOT EXISTS templates_identity_model ON templates(identity_id, model_id)",
    ),
    # Query-model templates are derived from the gallery models' ones and judged by a rejection
    # policy; its verdict is kept with the template so that an operator can see why a picture
    # does not match. Templates computed from pictures are always "ok" with no uncertainty.
    2: (
        "ALTER TABLE templates ADD COLUMN status TEXT NOT NULL DEFAULT 'ok'"
        " CHECK (status IN ('ok', 'flagged', 'dropped'))",
        "ALTER TABLE templates ADD COLUMN uncertainty REAL",
        "ALTER TABLE templates ADD COLUMN reason TEXT",
    ),
}


class GalleryError(Exception):
    """Base class of every error the gallery raises on purpose."""


class UnknownIdentityError(GalleryError, KeyError):
    """The identity is not enrolled."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown identity {name!r}")
        self.identity = name

    def __str__(self) -> str:  # KeyError would otherwise print the message with extra quotes
        return str(self.args[0])


class InvalidIdentityError(GalleryError, ValueError):
    """The identity name is empty, longer than 256 characters or holds control characters."""


@dataclass(frozen=True)
class IdentityRecord:
    """One enrolled identity as listed.

    `templates` is the identity's template count for the model in which it has the most. Each
    enrollment image yields one template per model, so this is the number of enrollment images
    and does not double when the same images are also enrolled under a second model.
    """

    identity: str
    templates: int
    created_time_us: int
    metadata: dict[str, str]


@dataclass(frozen=True)
class TemplateRecord:
    """One stored template as `Gallery.templates_of` lists it.

    `picture` is the key shared by every model's template of one enrollment picture (the
    `source` column); `status`, `uncertainty` and `reason` are the rejection policy's verdict
    on a derived (query-model) template, and "ok", None, None for a computed one.
    """

    template_id: int
    model_id: str
    picture: str | None
    status: str
    uncertainty: float | None
    reason: str | None
    created_time_us: int


@dataclass(frozen=True)
class Templates:
    """Templates of one model to store together: unit rows, and per row its picture and verdict."""

    model_id: str
    vectors: np.ndarray  # (n, d) float32, L2-normalised
    sources: Sequence[str | None]
    status: Sequence[str]
    uncertainty: Sequence[float | None]
    reasons: Sequence[str | None]

    @classmethod
    def ok(cls, model_id: str, vectors: np.ndarray, sources: Sequence[str | None]) -> Templates:
        """Templates with nothing to judge (computed from pictures, say): every row "ok"."""
        n = len(vectors)
        return cls(model_id, vectors, sources, ["ok"] * n, [None] * n, [None] * n)

    @property
    def indexed(self) -> np.ndarray:
        """(n,) bool: the rows a search may return (dropped ones are kept on record only)."""
        return np.array([s != "dropped" for s in self.status], dtype=bool)


@dataclass(frozen=True)
class AddResult:
    """What `GalleryStore.add_templates` changed, so the caller can mirror it in its indexes."""

    added: dict[str, list[int]]  # model id -> new template ids, in the order of its rows
    removed: dict[str, list[int]]  # model id -> template ids deleted by a replace
    totals: dict[str, int]  # model id -> templates the identity now holds for it


def validate_identity(name: object) -> str:
    """Return `name` if it is a usable identity name, else raise InvalidIdentityError."""
    if not isinstance(name, str):
        raise InvalidIdentityError(f"identity must be a string, got {type(name).__name__}")
    if not name:
        raise InvalidIdentityError("identity must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidIdentityError(f"identity is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    # Cc: C0/C1 controls and DEL (newlines, escapes) that break logs and terminals; Cs: lone
    # surrogates, which cannot be encoded as UTF-8 and so cannot be stored at all.
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise InvalidIdentityError(f"identity {name!r} contains the control character U+{ord(bad):04X}")
    return name


def validate_model_id(model_id: object) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    return model_id


def now_us() -> int:
    return time.time_ns() // 1000


class GalleryStore:
    """Identities and templates in `path` (an SQLite file, created if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10.0)
        except sqlite3.Error as exc:
            raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from exc
        try:
            self._conn: sqlite3.Connection | None = conn
            self._init_schema(conn)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    # -- lifecycle ---------------------------------------------------------------------------

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        try:
            # Read the version before any pragma writes to the file: a newer schema is left as is.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise GalleryError(f"{self.path} is not a usable gallery database: {exc}") from exc
        if version > SCHEMA_VERSION:
            raise GalleryError(
                f"{self.path} has gallery schema version {version}, newer than the supported version "
                f"{SCHEMA_VERSION}; upgrade facelink to open it"
            )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":  # e.g. file systems without shared memory
            log.warning("gallery %s: could not enable WAL (journal_mode is %s)", self.path, mode)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite; the cascade needs it
        if version < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction: all steps happen, or none."""
        with self._write() as conn:
            # Read again under the write lock: another process may have migrated it meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if 0 < version < SCHEMA_VERSION:
            log.info("gallery %s: schema migrated from version %d to %d", self.path, version, SCHEMA_VERSION)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise GalleryError(f"gallery {self.path} is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; everything in it is committed together or not at all.

        BEGIN IMMEDIATE takes the write lock up front, so checks made inside (such as the
        model's dimension) still hold at commit even if another process shares the file.
        """
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: several queries see one snapshot."""
        conn = self._db()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

    # -- writes ------------------------------------------------------------------------------

    def add_templates(
        self,
        name: str,
        batches: Sequence[Templates],
        *,
        replace: Literal["models", "identity"] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> AddResult:
        """Store `batches` (one per model) as templates of `name`, in one transaction.

        Creates the identity if needed. `replace="models"` first deletes the identity's
        templates of the batches' models, `"identity"` all of its templates; either way its
        metadata becomes exactly `metadata`. Without `replace`, `metadata` is merged into the
        stored one. Raises ValueError (and stores nothing) if a model already holds templates
        of another dimension.
        """
        created = now_us()
        models = [batch.model_id for batch in batches]
        with self._write() as conn:
            row = conn.execute("SELECT id, metadata FROM identities WHERE name = ?", (name,)).fetchone()
            removed: dict[str, list[int]] = {}
            if row is None:
                cur = conn.execute(
                    "INSERT INTO identities (name, created_us, metadata) VALUES (?, ?, ?)",
                    (name, created, _dump_metadata(metadata or {})),
                )
                identity_id = int(cur.lastrowid)  # type: ignore[arg-type]
            else:
                identity_id = int(row[0])
                if replace is not None:
                    mine = "WHERE identity_id = ?"
                    params: tuple[object, ...] = (identity_id,)
                    if replace == "models":
                        mine += f" AND model_id IN ({', '.join('?' * len(models))})"
                        params += tuple(models)
                    for tid, model_id in conn.execute(f"SELECT id, model_id FROM templates {mine}", params):
                        removed.setdefault(model_id, []).append(tid)
                    conn.execute(f"DELETE FROM templates {mine}", params)
                    merged = dict(metadata or {})
                else:
                    merged = {**_load_metadata(row[1]), **(metadata or {})}
                conn.execute(
                    "UPDATE identities SET metadata = ? WHERE id = ?", (_dump_metadata(merged), identity_id)
                )
            added = {}
            for batch in batches:
                # Checked after a replace's delete: the invariant is that a model's templates share
                # one dimension, so replacing the only templates of a model may change it.
                dim = batch.vectors.shape[1]
                stored = self.model_dim(batch.model_id)
                if stored is not None and stored != dim:
                    raise ValueError(
                        f"model {batch.model_id!r} holds {stored}-dimensional templates; "
                        f"got {dim}-dimensional embeddings"
                    )
                added[batch.model_id] = _insert(conn, [identity_id] * len(batch.vectors), batch, created)
            totals = conn.execute(
                "SELECT model_id, COUNT(*) FROM templates WHERE identity_id = ? GROUP BY model_id", (identity_id,)
            ).fetchall()
        return AddResult(added, removed, {model_id: int(n) for model_id, n in totals})

    def replace_derived(
        self,
        model_id: str,
        gallery_models: Sequence[str],
        derive: Callable[[Mapping[str, np.ndarray], Sequence[str | None]], Templates],
    ) -> dict[str, int]:
        """Replace every template of `model_id` by `derive` applied to the stored templates of
        `gallery_models`, picture by picture, in one transaction; returns how many templates
        got each status.

        Only stored vectors are read, never a picture. Templates of one picture are joined on
        their `source`; pictures holding the same subset of the gallery models go to `derive`
        together, as {model id: (n, d)} plus their n sources. A template without a source
        (written without one, e.g. before schema version 2) counts as a picture of its own.
        """
        marks = ", ".join("?" * len(gallery_models))
        counts = dict.fromkeys(STATUSES, 0)
        with self._write() as conn:
            rows = conn.execute(
                "SELECT t.id, t.identity_id, i.name, t.source, t.model_id, t.dim, t.vector FROM templates t"
                f" JOIN identities i ON i.id = t.identity_id WHERE t.model_id IN ({marks}) ORDER BY t.id",
                tuple(gallery_models),
            ).fetchall()
            pictures: dict[tuple[int, str], dict[str, np.ndarray]] = {}
            sources: dict[tuple[int, str], str | None] = {}
            for tid, identity_id, name, source, model, dim, blob in rows:
                vector = _vector(tid, name, model, dim, blob)
                if vector is None:
                    continue
                key = (identity_id, source if source is not None else f"#{tid}")
                pictures.setdefault(key, {})[model] = vector  # in id order: a re-used source keeps its latest
                sources[key] = source
            groups: dict[tuple[str, ...], list[tuple[int, str]]] = {}
            for key, vectors in pictures.items():
                groups.setdefault(tuple(sorted(vectors)), []).append(key)
            conn.execute("DELETE FROM templates WHERE model_id = ?", (model_id,))
            created = now_us()
            for models, keys in groups.items():
                batch = derive({m: np.stack([pictures[k][m] for k in keys]) for m in models}, [sources[k] for k in keys])
                _insert(conn, [identity_id for identity_id, _ in keys], batch, created)
                for status in batch.status:
                    counts[status] += 1
        return counts

    def remove_identity(self, name: str) -> dict[str, list[int]]:
        """Delete `name` and all its templates; returns the removed template ids per model."""
        with self._write() as conn:
            row = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownIdentityError(name)
            removed: dict[str, list[int]] = {}
            rows = conn.execute("SELECT id, model_id FROM templates WHERE identity_id = ?", (row[0],))
            for tid, model_id in rows:
                removed.setdefault(model_id, []).append(tid)
            conn.execute("DELETE FROM identities WHERE id = ?", (row[0],))  # templates go by cascade
        return removed

    # -- reads -------------------------------------------------------------------------------

    def list_identities(self, offset: int, limit: int) -> tuple[list[IdentityRecord], int]:
        """A page of identities in name order (code point order, as Python sorts) and the total."""
        with self._read() as conn:
            total = conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0]
            rows = conn.execute(
                """SELECT p.name, p.created_us, p.metadata,
                          COALESCE((SELECT COUNT(*) AS n FROM templates t WHERE t.identity_id = p.id
                                    GROUP BY t.model_id ORDER BY n DESC LIMIT 1), 0)
                   FROM (SELECT id, name, created_us, metadata FROM identities
                         ORDER BY name LIMIT ? OFFSET ?) AS p
                   ORDER BY p.name""",
                (limit, offset),
            ).fetchall()
        page = [
            IdentityRecord(name, int(n), int(created), _load_metadata(meta))
            for name, created, meta, n in rows
        ]
        return page, int(total)

    def templates_of(self, name: str) -> list[TemplateRecord]:
        """Every template of `name`, every model, dropped ones included, in the order stored."""
        with self._read() as conn:
            row = conn.execute("SELECT id FROM identities WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise UnknownIdentityError(name)
            rows = conn.execute(
                "SELECT id, model_id, source, status, uncertainty, reason, created_us FROM templates"
                " WHERE identity_id = ? ORDER BY id",
                (row[0],),
            ).fetchall()
        return [TemplateRecord(*r) for r in rows]

    def has_identity(self, name: str) -> bool:
        return self._db().execute("SELECT 1 FROM identities WHERE name = ?", (name,)).fetchone() is not None

    def count_identities(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def model_dim(self, model_id: str) -> int | None:
        sql = "SELECT dim FROM templates WHERE model_id = ? LIMIT 1"
        row = self._db().execute(sql, (model_id,)).fetchone()
        return None if row is None else int(row[0])

    def iter_templates(self, model_id: str | None = None) -> Iterator[tuple[str, int, str, np.ndarray]]:
        """Yield (model_id, template id, identity name, vector) for every searchable template.

        Dropped templates are left out: they stay on record but must never match. A blob of the
        wrong length or with non-finite values is skipped with a warning naming the template:
        one damaged row must not keep the server from starting.
        """
        sql = (
            "SELECT t.model_id, t.id, i.name, t.dim, t.vector FROM templates t"
            " JOIN identities i ON i.id = t.identity_id WHERE t.status != 'dropped'"
        )
        params: tuple[str, ...] = ()
        if model_id is not None:
            sql += " AND t.model_id = ?"
            params = (model_id,)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY t.model_id, t.id", params).fetchall()
        for model, tid, name, dim, blob in rows:
            vector = _vector(tid, name, model, dim, blob)
            if vector is not None:
                yield model, int(tid), name, vector


def _insert(conn: sqlite3.Connection, identity_ids: Sequence[int], batch: Templates, created: int) -> list[int]:
    """Insert `batch`'s rows (row i belonging to identity_ids[i]); returns their template ids."""
    dim = batch.vectors.shape[1]
    ids = []
    rows = zip(identity_ids, batch.vectors, batch.sources, batch.status, batch.uncertainty, batch.reasons)
    for identity_id, vector, source, status, uncertainty, reason in rows:
        cur = conn.execute(
            "INSERT INTO templates (identity_id, model_id, dim, vector, source, created_us, status, uncertainty, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (identity_id, batch.model_id, dim, vector.astype("<f4").tobytes(), source, created, status, uncertainty, reason),
        )
        ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
    return ids


def _vector(tid: int, name: str, model: str, dim: int | None, blob: object) -> np.ndarray | None:
    """A stored vector blob as float32, or None (with a warning) if it is damaged."""
    size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else -1
    if dim is None or dim <= 0 or size != 4 * dim:
        log.warning(
            "gallery: skipping template %d of %r (model %r): vector blob is %d bytes, expected %s",
            tid, name, model, size, 4 * dim if dim and dim > 0 else "a positive dim",
        )
        return None
    vector = np.frombuffer(blob, dtype="<f4").astype(np.float32)  # type: ignore[arg-type]
    if not np.isfinite(vector).all():
        log.warning("gallery: skipping template %d of %r (model %r): non-finite values", tid, name, model)
        return None
    return vector


def _dump_metadata(metadata: Mapping[str, str]) -> str:
    return json.dumps(dict(metadata), sort_keys=True)  # ASCII escapes: safe for any str, even lone surrogates


def _load_metadata(text: str | None) -> dict[str, str]:
    try:
        data = json.loads(text or "{}")
    except json.JSONDecodeError:
        log.warning("gallery: unreadable metadata %r, treating it as empty", text)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
