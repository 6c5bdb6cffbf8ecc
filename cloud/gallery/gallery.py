"""The gallery: durable enrollment (SQLite) plus one in-memory faiss index per model.

An enrollment picture is stored as one template per gallery model, all under one picture key,
plus one template per served query model derived from those (`derived.QueryModel`), so a new
query model is served from what is stored (`rebuild_derived`) without re-reading a picture.

Every write goes to the store first, in one transaction, and reaches the index only after the
commit, so a failed enrollment leaves no trace and a crash loses at most what the store lost.
On open, the indexes are rebuilt from the store: there is no index file to get out of step.

The folder is made private (0700) and the database files in it 0600; an erasure leaves nothing
of the person in any file (see `store` for how). Identity names are normalised (`rules`) and
everything a client can store is bounded by `GalleryLimits`.

One `Gallery` is shared by the gRPC server's worker threads. A single re-entrant lock
serialises every call: SQLite allows one writer anyway, and a search over an exact flat index
is short next to the network round trip, so finer locking would buy little.

Replicas: several server processes on one host may open the same folder (SQLite's WAL mode
serialises their writes; a network file system is not supported, as SQLite's locking is not
reliable there). Each write appends to the store's change feed in its own transaction, and a
search first applies the other processes' entries to this process's indexes whenever its last
look at the feed is older than `GallerySettings.replica_poll_s`. So an enrollment or erasure
committed through one replica is seen by every replica's searches at most that long after it
committed. Listing, membership and erasure read the store itself and are never stale.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from facelink.config import GalleryIndexConfig

from .backend import ContextClosing, GallerySettings, check_dim, check_page, check_search, prepare_pictures
from .derived import QueryModel
from .errors import GalleryError, UnknownIdentityError
from .index import EmbeddingIndex, Match, unit_rows
from .rules import GalleryLimits, check_metadata, normalize_identity
from .snapshot import Snapshots
from .store import (
    Change,
    GalleryStore,
    IdentityRecord,
    TemplateRecord,
    Templates,
    private_umask,
    validate_model_id,
)

log = logging.getLogger(__name__)

DB_NAME = "gallery.sqlite3"
#: Mode of the gallery folder: only the server's user may list or open what is inside.
DIR_MODE = 0o700


class Gallery(ContextClosing):
    """Enrolled identities and nearest-identity search, safe to share between threads."""

    def __init__(
        self, directory: str | Path, limits: GalleryLimits | None = None, settings: GallerySettings | None = None
    ) -> None:
        self.directory = Path(directory)
        self.settings = settings or GallerySettings()
        _make_private_dir(self.directory)
        self._lock = threading.RLock()
        self._store = GalleryStore(
            self.directory / DB_NAME, limits, feed_retention_s=self.settings.feed_retention_s,
            vector_storage=self.settings.vector_storage,
        )
        self._indexes: dict[str, EmbeddingIndex] = {}
        self._index_config: GalleryIndexConfig = self.settings.index or GalleryIndexConfig()
        self._snapshots = Snapshots(self.directory, self._index_config)
        try:
            # Read before loading: what other replicas commit meanwhile is applied by _catch_up.
            self._seen = self._store.feed_head()
            self._polled = time.monotonic()
            self._rebuild()
        except BaseException:
            self._store.close()
            raise

    @classmethod
    def open(
        cls, directory: str | Path, limits: GalleryLimits | None = None, settings: GallerySettings | None = None
    ) -> Gallery:
        """Open (creating if needed) the gallery in `directory`; same as the constructor."""
        return cls(directory, limits, settings)

    @property
    def limits(self) -> GalleryLimits:
        return self._store.limits

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; later calls raise GalleryError. Closing twice is harmless."""
        with self._lock:
            if not self._store.closed:
                self._snapshots.save_all(self._store, self._indexes)  # so the next start need not rebuild
            self._store.close()
            self._indexes.clear()

    def _check_open(self) -> None:
        if self._store.closed:
            raise GalleryError(f"gallery {self.directory} is closed")

    # -- writes ------------------------------------------------------------------------------

    def enroll(
        self,
        identity: str,
        model_id: str,
        embeddings: np.ndarray,
        *,
        replace: bool = False,
        metadata: Mapping[str, str] | None = None,
        sources: Sequence[str] | None = None,
    ) -> tuple[int, int]:
        """Add (n, d) `embeddings` as templates of `identity` for `model_id`.

        Stores L2-normalised float32 copies. With `replace`, the identity's existing templates
        for this model are dropped first and its metadata is overwritten by `metadata` (None
        meaning empty); otherwise `metadata` is merged into what is stored. All or nothing.
        Returns (templates added, templates the identity now holds for this model).
        Raises InvalidIdentityError for a bad name, InvalidMetadataError for bad metadata,
        GalleryQuotaError past a `GalleryLimits` bound, and ValueError for a bad array (wrong
        shape, non-finite or all-zero rows, a dimension other than the model's) or sources.
        """
        normalize_identity(identity)  # refuse a bad name before any work on the arrays
        validate_model_id(model_id)
        vectors = unit_rows(embeddings)
        if len(vectors) == 0:
            raise ValueError("embeddings must hold at least one row")
        if sources is not None:
            sources = list(sources)
            if len(sources) != len(vectors) or not all(isinstance(s, str) for s in sources):
                raise ValueError(f"sources must be {len(vectors)} strings, one per embedding row")
        batch = Templates.ok(model_id, vectors, sources or [None] * len(vectors))
        totals = self._add(identity, [batch], "models" if replace else None, metadata)
        return len(vectors), totals[model_id]

    def enroll_pictures(
        self,
        identity: str,
        embeddings: Mapping[str, np.ndarray],
        query_models: Sequence[QueryModel] = (),
        *,
        replace: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[int, int]:
        """Add n pictures of `identity`: {gallery model id: (n, d) embeddings of the same pictures}.

        Stores one template per model and picture, all of a picture's templates sharing a new
        picture key, and for each of `query_models` the template derived from them with the
        rejection policy's verdict (a dropped one is stored, never indexed). With `replace`,
        every template the identity had, of any model, goes first and its metadata is
        overwritten. All or nothing. Returns (pictures added, pictures the identity now holds).
        Raises as `enroll` does, and ValueError if the arrays differ in length.
        """
        keys, batches = prepare_pictures(identity, embeddings, query_models)
        totals = self._add(identity, batches, "identity" if replace else None, metadata)
        # Counted as list() counts: pictures, in the model holding the most of them.
        return len(keys), max(totals.values())

    def _add(
        self, name: str, batches: list[Templates], replace: Literal["models", "identity"] | None,
        metadata: Mapping[str, str] | None,
    ) -> dict[str, int]:
        """Store `batches`, then mirror the change in the indexes; returns the identity's
        template count per model."""
        meta = check_metadata(metadata, self.limits)
        with self._lock:
            self._check_open()
            # The index gets what the store keeps (float16-rounded), as a restart would load.
            batches = [b.as_stored(self._store.vector_storage) for b in batches]
            result = self._store.add_templates(name, batches, replace=replace, metadata=meta)
            stored = result.identity  # the index labels matches with the name as stored
            for model_id, ids in result.removed.items():
                if model_id not in result.added:
                    self._mirror(model_id, ids, [], None, stored)
            for batch in batches:
                keep = batch.indexed
                added = [tid for tid, kept in zip(result.added[batch.model_id], keep) if kept]
                self._mirror(batch.model_id, result.removed.get(batch.model_id, []), added, batch.vectors[keep], stored)
        return result.totals

    def rebuild_derived(self, query_model: QueryModel) -> dict[str, int]:
        """(Re)derive every template of `query_model` from the stored gallery-model templates.

        Backfill-free: reads stored embeddings only, never a picture, and replaces the query
        model's templates in one transaction, so a search sees either the old ones or the new
        ones. Returns how many templates got each status (ok, flagged, dropped).
        """
        with self._lock:
            self._check_open()
            counts = self._store.replace_derived(query_model.model_id, query_model.gallery_models, query_model.derive)
            self._rebuild(query_model.model_id)
        log.info("gallery: derived %s templates from %s: %s", query_model.model_id,
                 ", ".join(query_model.gallery_models), ", ".join(f"{n} {s}" for s, n in counts.items()))
        return counts

    def remove(self, identity: str) -> int:
        """Erase `identity`: its metadata and its templates of every model, derived query-model
        ones included, from the store (leaving nothing readable in its files) and the indexes.
        Returns how many pictures went.

        `identity` is looked up as stored, then normalised. Pictures are counted as list()
        counts them: templates of the model holding the most. Raises UnknownIdentityError if
        it is not enrolled, InvalidIdentityError for a bad name.
        """
        with self._lock:
            self._check_open()
            removed = self._store.remove_identity(identity)
            for model_id, ids in removed.items():
                self._mirror(model_id, ids, [], None, identity)
        return max((len(ids) for ids in removed.values()), default=0)

    def compact(self) -> bool:
        """Rewrite the database file (VACUUM) and truncate its WAL: run once on a gallery that
        removed identities before erasures were scrubbed. False if a reader blocked the WAL
        truncation (retried after later writes and at close)."""
        with self._lock:
            self._check_open()
            return self._store.compact()

    def _mirror(
        self, model_id: str, removed: list[int], added: list[int], vectors: np.ndarray | None, name: str
    ) -> None:
        """Apply a committed store change to the model's index.

        The store has already committed, so this must not leave the two disagreeing: if the
        index update fails (out of memory, say), the model's index is rebuilt from the store.
        """
        try:
            index = self._indexes.get(model_id)
            if index is not None and removed:
                index.remove(removed)
                if len(index) == 0:  # forget it, so a replace may bring a new dimension
                    del self._indexes[model_id]
                    index = None
            self._snapshots.erase(model_id, removed)  # before returning: no file keeps them
            if added and vectors is not None:
                if index is None:
                    index = self._indexes[model_id] = EmbeddingIndex(vectors.shape[1], self._index_config)
                index.add(added, vectors, [name] * len(added))
                self._snapshots.changed(model_id)
        except Exception:
            log.exception("gallery: index update for model %r failed; rebuilding it from the store", model_id)
            self._rebuild(model_id)

    def _rebuild(self, model_id: str | None = None) -> None:
        """Rebuild one model's index (or all of them) from the store; on open, from a snapshot
        reconciled with the store where one is usable (`snapshot.Snapshots`)."""
        loaded = self._snapshots.load_all(self._store, model_id)
        if model_id is None:
            self._indexes.clear()
        else:
            self._indexes.pop(model_id, None)
        self._indexes.update(loaded)
        if model_id is None and loaded:
            log.info(
                "gallery: loaded %s",
                ", ".join(f"{len(ix)} templates of model {m!r}" for m, ix in sorted(self._indexes.items())),
            )

    # -- reads -------------------------------------------------------------------------------

    def search(self, model_id: str, queries: np.ndarray, k: int = 5) -> list[list[Match]]:
        """For each (n, d) query row, the best `k` distinct identities, best first.

        An identity scores the highest cosine similarity among its templates. Each list is empty
        when the model has no templates. Raises ValueError for a bad array or a dimension other
        than the model's.
        """
        qs = check_search(model_id, queries, k)
        with self._lock:
            self._check_open()
            self._catch_up()
            index = self._indexes.get(model_id)
            if index is None:
                return [[] for _ in range(len(qs))]
            check_dim(model_id, index.dim, qs.shape[1])
            return index.search(qs, k)

    def _catch_up(self, force: bool = False) -> None:
        """Apply the changes other replicas made to this process's indexes, at most every
        `replica_poll_s` (one indexed SELECT when nothing changed). Called with the lock held."""
        now = time.monotonic()
        if not force and now - self._polled < self.settings.replica_poll_s:
            return
        floor, head, changes = self._store.changes_since(self._seen)
        self._polled = now
        if self._seen < floor:  # entries this replica had not applied were pruned: start over
            log.warning("gallery: change feed pruned past this replica's position; reloading every index")
            self._seen = head
            self._rebuild()
            return
        self._seen = head
        if changes:
            self._apply(changes)

    def _apply(self, changes: builtins.list[Change]) -> None:
        """Mirror other replicas' committed changes. Idempotent: a template is removed, then
        added back only if the store still holds it as searchable, so entries may overlap what
        a rebuild already loaded and may arrive in any order."""
        touched: dict[str, set[int]] = {}
        rebuilt = {c.model_id for c in changes if c.kind == "rebuild"}
        for change in changes:
            if change.model_id not in rebuilt and change.template_id is not None:
                touched.setdefault(change.model_id, set()).add(change.template_id)
        for model_id in sorted(rebuilt):
            self._rebuild(model_id)
        for model_id, ids in touched.items():
            self._mirror(model_id, sorted(ids), [], None, "")
            by_name: dict[str, tuple[builtins.list[int], builtins.list[np.ndarray]]] = {}
            for _, tid, name, vector in self._store.iter_templates(model_id, sorted(ids)):
                tids, vectors = by_name.setdefault(name, ([], []))
                tids.append(tid)
                vectors.append(vector)
            for name, (tids, vectors) in by_name.items():
                self._mirror(model_id, [], tids, np.stack(vectors), name)

    def templates_of(self, identity: str) -> builtins.list[TemplateRecord]:
        """Every template of `identity`: each model's, dropped ones included, with status,
        uncertainty and the reason for a flag or a drop. Raises UnknownIdentityError."""
        with self._lock:
            self._check_open()
            return self._store.templates_of(identity)

    def resolve(self, identity: str) -> str:
        """The name `identity` is stored under (its normalised form, or the exact stored name of
        an identity enrolled before names were normalised). Raises UnknownIdentityError, or
        InvalidIdentityError for a name that is neither stored nor valid."""
        with self._lock:
            self._check_open()
            stored = self._store.resolve(identity)
        if stored is None:
            raise UnknownIdentityError(identity)
        return stored

    def normalized_name(self, identity: str) -> str:
        """The name an enrollment of `identity` is (or would be) stored under: the stored name
        if it is enrolled (see `resolve`), else its normalised form. Raises InvalidIdentityError."""
        try:
            return self.resolve(identity)
        except UnknownIdentityError:
            return normalize_identity(identity)

    def dim(self, model_id: str) -> int | None:
        """The embedding dimension of `model_id`'s templates, or None if it has none."""
        with self._lock:
            self._check_open()
            return self._store.model_dim(model_id)

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, str):
            return False
        with self._lock:
            self._check_open()
            return self._store.has_identity(identity)

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return self._store.count_identities()

    # Defined last and annotated with builtins.list: inside the class body, `list` now names
    # this method, which type checkers would otherwise apply to the annotations after it.
    def list(self, offset: int = 0, limit: int = 100) -> tuple[builtins.list[IdentityRecord], int]:
        """A page of identities sorted by name, and the total number of identities.

        `IdentityRecord.templates` counts the identity's templates in the model where it has
        the most (that is, its enrollment images), not the sum over models.
        """
        check_page(offset, limit)
        with self._lock:
            self._check_open()
            return self._store.list_identities(offset, limit)

    def __repr__(self) -> str:
        state = "closed" if self._store.closed else f"models={sorted(self._indexes)}"
        return f"Gallery({str(self.directory)!r}, {state})"


def _make_private_dir(directory: Path) -> None:
    """Create `directory` (and missing parents) as 0700, or chmod an existing one to 0700."""
    with private_umask():
        directory.mkdir(parents=True, exist_ok=True)
    try:
        if (directory.stat().st_mode & 0o777) != DIR_MODE:
            os.chmod(directory, DIR_MODE)
    except OSError as exc:
        raise GalleryError(f"cannot make gallery folder {directory} private (chmod 700): {exc}") from exc
