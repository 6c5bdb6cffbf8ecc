"""Durable gallery storage: identities and their face templates in one SQLite file.

SQLite is the source of truth; the faiss indexes are rebuilt from it on every start. It runs
in WAL mode so readers (another process listing the gallery, a backup) never block the
server's writes, with `synchronous=FULL`: a commit is on disk before the call is acknowledged,
so a power cut never loses an enrollment or erasure that was answered OK (and that the audit
log, fsynced per record, says happened). Enrollments are rare next to the detection and
embedding they cost, so the fsync per commit is not what limits them.

Not thread-safe by itself: the connection is opened with `check_same_thread=False` so that a
gRPC thread pool can use it, and `Gallery` serialises every call with its lock.

Privacy (face templates are biometric data, GDPR art. 9)
--------------------------------------------------------
Files are private to the server's user. The database file and its `-wal` and `-shm` companions
are created under umask 077 (mode 0600; SQLite gives the companions the database file's mode)
and existing ones are chmod-ed to 0600 on open; `Gallery` makes its folder 0700.

An erasure (RemoveIdentity) leaves nothing of the person readable in any gallery file:

* One transaction deletes the identity row (name, metadata) and, by cascade, every template of
  it: each gallery model's, and each template derived for a query model.
* The connection runs with `PRAGMA secure_delete=ON`, so SQLite overwrites deleted content with
  zeros: the freed space inside table and index pages (the name is also a key of the UNIQUE
  index) and whole pages that go to the freelist, overflow pages of long vectors included.
  It is set explicitly because SQLite's default depends on how it was compiled.
* In WAL mode those zeroed pages are first appended to the `-wal` file, while older frames there
  (written when the person was enrolled) still hold the vectors and the name, and the database
  file still holds the old pages. So right after the erasure commits, the store runs
  `PRAGMA wal_checkpoint(TRUNCATE)`: every frame is copied into the database file, overwriting
  the old pages with the zeroed ones, and the WAL is truncated to zero bytes. The `-shm` file
  holds only page numbers and checksums, never content.
* `PRAGMA temp_store=MEMORY` keeps the sorts and temporary tables of queries over templates in
  memory instead of temporary files.

A checkpoint cannot finish while another process holds a read transaction on the file (a
backup, say); it is then retried, after each later write and at close, and a warning says the
WAL still holds erased data. Replacing an identity's templates (enroll with replace) scrubs the
same way. `compact()` (VACUUM, then the same checkpoint) rewrites the whole file: run it once on
a gallery that removed identities while secure_delete was off (older facelink versions on an
SQLite built without SQLITE_SECURE_DELETE).

What this does not reach: copies outside the gallery folder (backups, file-system snapshots),
and blocks the file system or an SSD's wear levelling keeps after a file is truncated or
rewritten. Keep the gallery on an encrypted volume for those.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from facelink.logsafe import printable

from .errors import GalleryError, GalleryQuotaError, InvalidIdentityError, UnknownIdentityError
from .rules import MAX_NAME_LENGTH, GalleryLimits, normalize_identity, stored_form

log = logging.getLogger(__name__)

__all__ = [  # the errors are re-exported: callers imported them from here before errors.py existed
    "MAX_NAME_LENGTH", "SCHEMA_VERSION", "STATUSES", "AddResult", "Change", "GalleryError", "GalleryQuotaError",
    "GalleryStore", "IdentityRecord", "InvalidIdentityError", "TemplateRecord", "Templates",
    "UnknownIdentityError", "enable_erasure_pragmas", "make_private", "private_umask", "truncate_wal", "validate_identity", "validate_model_id",
]

#: Mode of the database file and its -wal and -shm files: the server's user only.
FILE_MODE = 0o600
#: How template vectors are written. float16 halves the file (a 512-d EdgeFace template: 1 kB)
#: and moved no LFW figure (benchmarks/results/recognisers.json, `storage` rows); float32 stays
#: readable, so a gallery written before may hold both.
VectorStorage = Literal["float16", "float32"]
STORAGE_DTYPES: dict[str, str] = {"float16": "<f2", "float32": "<f4"}
#: How long a write waits for another process's lock on the file.
BUSY_TIMEOUT_MS = 10_000
#: How long the post-erasure checkpoint waits for other readers; short, as it holds the gallery
#: lock, and a blocked checkpoint is retried after the next write anyway.
SCRUB_WAIT_MS = 500
#: Bumped whenever the schema changes; a file with a larger version is refused, not guessed at.
SCHEMA_VERSION = 3
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
            vector BLOB NOT NULL,  -- dim float16 or float32 values (told by its length), little-endian, L2-normalised
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
    # The change feed: several server processes (replicas) may share one gallery file, each with
    # its own in-memory indexes. Every write appends what it changed here, in its own
    # transaction, under a sequence that only grows; a replica applies the others' entries
    # before it searches (Gallery._catch_up). Entries hold template ids and model ids only,
    # never a name or a vector: an erasure leaves nothing of the person in the feed.
    3: (
        """CREATE TABLE IF NOT EXISTS changes (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, so 'after seq n' is well defined
            writer TEXT NOT NULL,                   -- which open GalleryStore wrote it (a replica skips its own)
            kind TEXT NOT NULL CHECK (kind IN ('add', 'remove', 'rebuild')),
            model_id TEXT NOT NULL,
            template_id INTEGER,                    -- NULL for a rebuild of the whole model
            created_us INTEGER NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS changes_created ON changes(created_us)",
        # The highest pruned seq: a replica that has not seen up to it missed entries, and rebuilds.
        "CREATE TABLE IF NOT EXISTS feed (id INTEGER PRIMARY KEY CHECK (id = 1), floor INTEGER NOT NULL)",
        "INSERT OR IGNORE INTO feed (id, floor) VALUES (1, 0)",
    ),
}


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

    def as_stored(self, dtype: VectorStorage) -> Templates:
        """These templates with the values the store will give back (float16 rounding), so the
        in-memory index holds exactly what a restart or another replica would load."""
        if dtype == "float32":
            return self
        return dataclasses.replace(self, vectors=self.vectors.astype(STORAGE_DTYPES[dtype]).astype(np.float32))


@dataclass(frozen=True)
class Change:
    """One change-feed entry another replica wrote: templates added or removed, or a model rebuilt."""

    seq: int
    kind: Literal["add", "remove", "rebuild"]
    model_id: str
    template_id: int | None


@dataclass(frozen=True)
class AddResult:
    """What `GalleryStore.add_templates` changed, so the caller can mirror it in its indexes."""

    added: dict[str, list[int]]  # model id -> new template ids, in the order of its rows
    removed: dict[str, list[int]]  # model id -> template ids deleted by a replace
    totals: dict[str, int]  # model id -> templates the identity now holds for it
    identity: str  # the name the identity is stored under (normalised, unless stored before that)


#: Kept for callers of the old name: a valid identity is now also a normalised one.
validate_identity = normalize_identity


def validate_model_id(model_id: object) -> str:
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"model_id must be a non-empty string, got {model_id!r}")
    return model_id


def now_us() -> int:
    return time.time_ns() // 1000


class GalleryStore:
    """Identities and templates in `path` (an SQLite file, created if missing, mode 0600)."""

    def __init__(
        self, path: str | Path, limits: GalleryLimits | None = None, *, feed_retention_s: float = 3600.0,
        vector_storage: VectorStorage = "float32",
    ) -> None:
        self.path = Path(path)
        self.limits = limits or GalleryLimits()
        # New templates are written in this precision; both are read, so a gallery may hold both.
        self.vector_storage: VectorStorage = vector_storage
        # Names this connection's change-feed entries, so that its own Gallery skips them.
        self.writer = uuid.uuid4().hex
        self.feed_retention_s = feed_retention_s
        self._scrub_pending = False  # an erasure whose WAL frames a checkpoint has not yet cleared
        make_private(self.path)  # existing files, before SQLite reads or appends anything
        # Under umask 077: the file, and the -wal and -shm files SQLite creates when it opens it.
        with private_umask():
            try:
                conn = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000
                )
            except sqlite3.Error as exc:
                raise GalleryError(f"cannot open gallery database {self.path}: {exc}") from exc
            try:
                self._conn: sqlite3.Connection | None = conn
                self._init_schema(conn)
                make_private(self.path)  # whatever a file system without umask support did
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
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")  # off by default in SQLite; the cascade needs it
        enable_erasure_pragmas(conn, self.path)
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
        if self._conn is None:
            return
        try:
            if self._scrub_pending:
                self.scrub()
        finally:
            self._conn.close()  # the last connection to close also checkpoints and deletes the WAL
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
        if self._scrub_pending:  # an earlier erasure's checkpoint was blocked by a reader: retry
            self.scrub()

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

        Creates the identity, under its normalised name, if no identity answers to `name`.
        `replace="models"` first deletes the identity's templates of the batches' models,
        `"identity"` all of its templates; either way its metadata becomes exactly `metadata`.
        Without `replace`, `metadata` is merged into the stored one. Stores nothing and raises
        ValueError if a model already holds templates of another dimension, GalleryQuotaError if
        a `GalleryLimits` bound would be exceeded, InvalidIdentityError for a bad name.
        """
        created = now_us()
        with self._write() as conn:
            found = _find(conn, name)
            if found is None:
                identity_id, stored_name = self._create_identity(conn, name, metadata, created)
                removed: dict[str, list[int]] = {}
            else:
                identity_id, stored_name = found
                removed = _delete_for_replace(conn, identity_id, replace, [b.model_id for b in batches])
                self._update_metadata(conn, identity_id, stored_name, metadata, merge=replace is None)
            # Every check before the first insert: a refused enrollment writes no vector at all.
            self._check_pictures(conn, identity_id, stored_name, batches)
            for batch in batches:
                self._check_dim(batch)
            added = {
                b.model_id: _insert(conn, [identity_id] * len(b.vectors), b, created, self.vector_storage) for b in batches
            }
            self._log(conn, "remove", removed)
            self._log(conn, "add", added)
            totals = conn.execute(
                "SELECT model_id, COUNT(*) FROM templates WHERE identity_id = ? GROUP BY model_id", (identity_id,)
            ).fetchall()
        if removed:  # a replace is a request to forget the old pictures: scrubbed as an erasure is
            self.scrub()
        return AddResult(added, removed, {model_id: int(n) for model_id, n in totals}, stored_name)

    def _create_identity(
        self, conn: sqlite3.Connection, name: str, metadata: Mapping[str, str] | None, created: int
    ) -> tuple[int, str]:
        """Insert a new identity under the normalised `name`; returns its row id and stored name."""
        canonical = normalize_identity(name)
        # Counted in the transaction, so concurrent writers cannot both take the last place; the
        # scan costs ~10 ms at a million identities, next to the face models an enrollment runs.
        count = int(conn.execute("SELECT COUNT(*) FROM identities").fetchone()[0])
        if count >= self.limits.max_identities:
            raise GalleryQuotaError(
                f"the gallery holds {count} identities, its limit; remove one before enrolling "
                f"'{printable(canonical)}' (limit max_identities={self.limits.max_identities})"
            )
        self._check_metadata_keys(canonical, len(metadata or {}))
        cur = conn.execute(
            "INSERT INTO identities (name, created_us, metadata) VALUES (?, ?, ?)",
            (canonical, created, _dump_metadata(metadata or {})),
        )
        return int(cur.lastrowid), canonical  # type: ignore[arg-type]

    def _update_metadata(
        self, conn: sqlite3.Connection, identity_id: int, name: str, metadata: Mapping[str, str] | None,
        *, merge: bool,
    ) -> None:
        new = dict(metadata or {})
        if merge:
            (stored,) = conn.execute("SELECT metadata FROM identities WHERE id = ?", (identity_id,)).fetchone()
            new = {**_load_metadata(stored), **new}
        self._check_metadata_keys(name, len(new))
        conn.execute("UPDATE identities SET metadata = ? WHERE id = ?", (_dump_metadata(new), identity_id))

    def _check_metadata_keys(self, name: str, keys: int) -> None:
        """Bound the identity's metadata as stored, after a merge: requests cannot add up past it."""
        if keys > self.limits.max_metadata_keys:
            raise GalleryQuotaError(
                f"identity '{printable(name)}' would hold {keys} metadata keys; the limit is "
                f"{self.limits.max_metadata_keys} (enroll with replace to overwrite them instead of merging)"
            )

    def _check_pictures(
        self, conn: sqlite3.Connection, identity_id: int, name: str, batches: Sequence[Templates]
    ) -> None:
        """Refuse an enrollment that would take the identity past its picture limit.

        Pictures are counted as list() counts them: templates of the model holding the most.
        """
        held = dict(conn.execute(
            "SELECT model_id, COUNT(*) FROM templates WHERE identity_id = ? GROUP BY model_id", (identity_id,)
        ).fetchall())
        after = dict(held)
        for batch in batches:
            after[batch.model_id] = after.get(batch.model_id, 0) + len(batch.vectors)
        limit = self.limits.max_pictures_per_identity
        if max(after.values(), default=0) > limit:
            raise GalleryQuotaError(
                f"identity '{printable(name)}' would hold {max(after.values())} pictures "
                f"({max(held.values(), default=0)} stored, {max(len(b.vectors) for b in batches)} added); "
                f"the limit is {limit} per identity (max_pictures_per_identity)"
            )

    def _check_dim(self, batch: Templates) -> None:
        # Checked after a replace's delete: the invariant is that a model's templates share one
        # dimension, so replacing the only templates of a model may change it.
        dim = batch.vectors.shape[1]
        stored = self.model_dim(batch.model_id)
        if stored is not None and stored != dim:
            raise ValueError(
                f"model {batch.model_id!r} holds {stored}-dimensional templates; got {dim}-dimensional embeddings"
            )

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
            self._log(conn, "rebuild", {model_id: [None]})
            created = now_us()
            for models, keys in groups.items():
                batch = derive({m: np.stack([pictures[k][m] for k in keys]) for m in models}, [sources[k] for k in keys])
                _insert(conn, [identity_id for identity_id, _ in keys], batch, created, self.vector_storage)
                for status in batch.status:
                    counts[status] += 1
        return counts

    def remove_identity(self, name: str) -> dict[str, list[int]]:
        """Erase `name`: its row, metadata and every template of every model (gallery models'
        and derived query-model ones), then scrub the files (see the module docstring).

        Returns the removed template ids per model. Raises UnknownIdentityError.
        """
        with self._write() as conn:
            found = _find(conn, name)
            if found is None:
                raise UnknownIdentityError(name)
            identity_id = found[0]
            removed: dict[str, list[int]] = {}
            rows = conn.execute("SELECT id, model_id FROM templates WHERE identity_id = ?", (identity_id,))
            for tid, model_id in rows:
                removed.setdefault(model_id, []).append(tid)
            conn.execute("DELETE FROM identities WHERE id = ?", (identity_id,))  # templates go by cascade
            self._log(conn, "remove", removed)
        self.scrub()
        return removed

    def _log(self, conn: sqlite3.Connection, kind: str, ids: Mapping[str, Sequence[int | None]]) -> None:
        """Append change-feed entries in the caller's transaction, and prune old ones."""
        created = now_us()
        conn.executemany(
            "INSERT INTO changes (writer, kind, model_id, template_id, created_us) VALUES (?, ?, ?, ?, ?)",
            [(self.writer, kind, model_id, tid, created) for model_id, tids in ids.items() for tid in tids],
        )
        cutoff = created - int(self.feed_retention_s * 1e6)
        (pruned,) = conn.execute("SELECT MAX(seq) FROM changes WHERE created_us < ?", (cutoff,)).fetchone()
        if pruned is not None:
            conn.execute("DELETE FROM changes WHERE seq <= ?", (pruned,))
            conn.execute("UPDATE feed SET floor = MAX(floor, ?) WHERE id = 1", (pruned,))

    def feed_head(self) -> int:
        """The newest change-feed sequence number (0 for none): read before loading the indexes,
        so that what is committed meanwhile is applied later."""
        row = self._db().execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return 0 if row is None else int(row[0])

    def changes_since(self, seq: int) -> tuple[int, int, list[Change]]:
        """(floor, head, entries): the feed's pruned floor, its newest seq, and the entries after
        `seq` that other writers made. One indexed read; `seq < floor` means entries were missed."""
        with self._read() as conn:
            (floor,) = conn.execute("SELECT floor FROM feed WHERE id = 1").fetchone()
            rows = conn.execute(
                "SELECT seq, writer, kind, model_id, template_id FROM changes WHERE seq > ? ORDER BY seq", (seq,)
            ).fetchall()
        head = max([seq, *(r[0] for r in rows)])
        changes = [Change(s, k, m, t) for s, w, k, m, t in rows if w != self.writer]
        return int(floor), head, changes

    def scrub(self) -> bool:
        """Move every WAL frame into the database file and truncate the WAL to zero bytes.

        With secure_delete on, this is what leaves erased content nowhere in the files. Returns
        False (and keeps retrying after later writes and at close) when a reader in another
        process holds a snapshot the checkpoint may not overwrite.
        """
        busy = not truncate_wal(self._db())
        self._scrub_pending = busy
        if busy:
            log.warning(
                "gallery %s: another connection is reading, so the WAL could not be truncated; it still "
                "holds erased data until the next checkpoint (retried after each write and at close)", self.path,
            )
        return not busy

    def compact(self) -> bool:
        """Rewrite the whole file (VACUUM), then scrub: clears content deleted while secure_delete
        was off, and gives free pages back to the file system. Returns what `scrub` returns."""
        self._db().execute("VACUUM")
        return self.scrub()

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
            found = _find(conn, name)
            if found is None:
                raise UnknownIdentityError(name)
            rows = conn.execute(
                "SELECT id, model_id, source, status, uncertainty, reason, created_us FROM templates"
                " WHERE identity_id = ? ORDER BY id",
                (found[0],),
            ).fetchall()
        return [TemplateRecord(*r) for r in rows]

    def resolve(self, name: str) -> str | None:
        """The stored name of the identity `name` refers to, or None; InvalidIdentityError for a
        name that is neither stored as is nor valid."""
        with self._read() as conn:
            found = _find(conn, name)
        return None if found is None else found[1]

    def has_identity(self, name: str) -> bool:
        try:
            return self.resolve(name) is not None
        except InvalidIdentityError:
            return False

    def count_identities(self) -> int:
        return int(self._db().execute("SELECT COUNT(*) FROM identities").fetchone()[0])

    def model_dim(self, model_id: str) -> int | None:
        sql = "SELECT dim FROM templates WHERE model_id = ? LIMIT 1"
        row = self._db().execute(sql, (model_id,)).fetchone()
        return None if row is None else int(row[0])

    def iter_templates(
        self, model_id: str | None = None, ids: Sequence[int] | None = None
    ) -> Iterator[tuple[str, int, str, np.ndarray]]:
        """Yield (model_id, template id, identity name, vector) for every searchable template
        (of `model_id`, and among `ids`, where given).

        Dropped templates are left out: they stay on record but must never match. A blob of the
        wrong length or with non-finite values is skipped with a warning naming the template:
        one damaged row must not keep the server from starting.
        """
        sql = (
            "SELECT t.model_id, t.id, i.name, t.dim, t.vector FROM templates t"
            " JOIN identities i ON i.id = t.identity_id WHERE t.status != 'dropped'"
        )
        params: tuple[str | int, ...] = ()
        if model_id is not None:
            sql += " AND t.model_id = ?"
            params = (model_id,)
        if ids is not None:
            sql += f" AND t.id IN ({', '.join('?' * len(ids))})"
            params += tuple(ids)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY t.model_id, t.id", params).fetchall()
        for model, tid, name, dim, blob in rows:
            vector = _vector(tid, name, model, dim, blob)
            if vector is not None:
                yield model, int(tid), name, vector


def _find(conn: sqlite3.Connection, name: str) -> tuple[int, str] | None:
    """(row id, stored name) of the identity `name` refers to, or None.

    The exact string first: a gallery written before names were normalised may hold a name
    that is not in normal form, and it must stay reachable by the name ListIdentities shows.
    Then the normalised name, which raises InvalidIdentityError for a name that is neither.
    """
    exact = stored_form(name)
    if exact is not None:
        row = conn.execute("SELECT id, name FROM identities WHERE name = ?", (exact,)).fetchone()
        if row is not None:
            return int(row[0]), row[1]
    canonical = normalize_identity(name)
    if canonical == exact:
        return None
    row = conn.execute("SELECT id, name FROM identities WHERE name = ?", (canonical,)).fetchone()
    return None if row is None else (int(row[0]), row[1])


def _delete_for_replace(
    conn: sqlite3.Connection, identity_id: int, replace: Literal["models", "identity"] | None, models: list[str]
) -> dict[str, list[int]]:
    """Delete what a replace replaces (the models' templates, or all of them); returns their ids."""
    if replace is None:
        return {}
    mine = "WHERE identity_id = ?"
    params: tuple[object, ...] = (identity_id,)
    if replace == "models":
        mine += f" AND model_id IN ({', '.join('?' * len(models))})"
        params += tuple(models)
    removed: dict[str, list[int]] = {}
    for tid, model_id in conn.execute(f"SELECT id, model_id FROM templates {mine}", params):
        removed.setdefault(model_id, []).append(tid)
    conn.execute(f"DELETE FROM templates {mine}", params)
    return removed


def enable_erasure_pragmas(conn: sqlite3.Connection, path: Path) -> None:
    """secure_delete and in-memory temporary storage, checked: erasure depends on them (the
    gallery's, and the unknown people's in cloud/unknowns.py)."""
    conn.execute("PRAGMA secure_delete=ON")  # per connection; the compiled-in default varies
    conn.execute("PRAGMA temp_store=MEMORY")
    if conn.execute("PRAGMA secure_delete").fetchone()[0] != 1:
        raise GalleryError(f"{path}: SQLite refused PRAGMA secure_delete=ON, so erasure would leave data")


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Every WAL frame moved into the database file and the WAL truncated to zero bytes (with
    secure_delete on, what leaves erased content in no file); False when a reader in another
    process holds a snapshot the checkpoint may not overwrite (waited for SCRUB_WAIT_MS)."""
    conn.execute(f"PRAGMA busy_timeout = {SCRUB_WAIT_MS}")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return not busy


@contextmanager
def private_umask() -> Iterator[None]:
    """Files created inside are 0600 and folders 0700, whatever the process umask.

    The umask is process-wide: a file another thread creates meanwhile is made private too,
    which is harmless, and a gallery is opened at start-up, before the server's workers run.
    """
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def make_private(database: Path) -> None:
    """chmod the database file and its -wal and -shm files, where present, to 0600."""
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        try:
            if path.exists() and (path.stat().st_mode & 0o777) != FILE_MODE:
                os.chmod(path, FILE_MODE)
        except OSError as exc:
            raise GalleryError(f"cannot make gallery file {path} private (chmod 600): {exc}") from exc


def _insert(
    conn: sqlite3.Connection, identity_ids: Sequence[int], batch: Templates, created: int, storage: VectorStorage
) -> list[int]:
    """Insert `batch`'s rows (row i belonging to identity_ids[i]); returns their template ids."""
    dim = batch.vectors.shape[1]
    dtype = STORAGE_DTYPES[storage]
    ids = []
    rows = zip(identity_ids, batch.vectors, batch.sources, batch.status, batch.uncertainty, batch.reasons)
    for identity_id, vector, source, status, uncertainty, reason in rows:
        cur = conn.execute(
            "INSERT INTO templates (identity_id, model_id, dim, vector, source, created_us, status, uncertainty, reason)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (identity_id, batch.model_id, dim, vector.astype(dtype).tobytes(), source, created, status, uncertainty, reason),
        )
        ids.append(int(cur.lastrowid))  # type: ignore[arg-type]
    return ids


def decode_vector(blob: object, dim: int | None) -> np.ndarray | None:
    """A stored `vector` blob of `dim` values (float16 or float32, told by its length) as float32;
    None if its length fits neither."""
    size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else -1
    dtype = {2 * dim: "<f2", 4 * dim: "<f4"}.get(size) if dim is not None and dim > 0 else None
    return None if dtype is None else np.frombuffer(blob, dtype=dtype).astype(np.float32)  # type: ignore[arg-type]


def _vector(tid: int, name: str, model: str, dim: int | None, blob: object) -> np.ndarray | None:
    """A stored vector blob (float16 or float32, told by its length) as float32, or None (with a
    warning) if it is damaged."""
    vector = decode_vector(blob, dim)
    if vector is None:
        size = len(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else -1
        log.warning(
            "gallery: skipping template %d of %r (model %r): vector blob is %d bytes, expected %s",
            tid, name, model, size, f"{2 * dim} or {4 * dim}" if dim and dim > 0 else "a positive dim",
        )
        return None
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
