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
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np

from facelink.config import GalleryIndexConfig

from .derived import QueryModel
from .errors import GalleryError, UnknownIdentityError
from .index import EmbeddingIndex, Match, unit_rows
from .rules import GalleryLimits, check_metadata, normalize_identity
from .snapshot import Snapshots
from .store import (
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


class Gallery:
    """Enrolled identities and nearest-identity search, safe to share between threads."""

    def __init__(self, directory: str | Path, limits: GalleryLimits | None = None) -> None:
        self.directory = Path(directory)
        _make_private_dir(self.directory)
        self._lock = threading.RLock()
        self._store = GalleryStore(self.directory / DB_NAME, limits)
        self._indexes: dict[str, EmbeddingIndex] = {}
        # GallerySettings.index where the settings carry one (see snapshot.settings_with_index).
        index_config = getattr(getattr(self, "settings", None), "index", None)
        self._index_config: GalleryIndexConfig = index_config or GalleryIndexConfig()
        self._snapshots = Snapshots(self.directory, self._index_config)
        try:
            self._rebuild()
        except BaseException:
            self._store.close()
            raise

    @classmethod
    def open(cls, directory: str | Path, limits: GalleryLimits | None = None) -> Gallery:
        """Open (creating if needed) the gallery in `directory`; same as the constructor."""
        return cls(directory, limits)

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

    def __enter__(self) -> Gallery:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

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
        normalize_identity(identity)
        if not embeddings:
            raise ValueError("embeddings must hold at least one gallery model")
        vectors = {validate_model_id(m): unit_rows(e, f"{m} embeddings") for m, e in embeddings.items()}
        sizes = {len(v) for v in vectors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"every model needs the same, non-zero number of pictures; got {sorted(sizes)}")
        keys = [uuid.uuid4().hex for _ in range(sizes.pop())]
        batches = [Templates.ok(m, v, keys) for m, v in vectors.items()]
        batches += [q.derive(vectors, keys) for q in query_models]
        if len({b.model_id for b in batches}) != len(batches):
            raise ValueError(f"a model appears twice among {[b.model_id for b in batches]}")
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
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        validate_model_id(model_id)
        qs = unit_rows(queries, "queries")
        with self._lock:
            self._check_open()
            index = self._indexes.get(model_id)
            if index is None:
                return [[] for _ in range(len(qs))]
            if qs.shape[1] != index.dim:
                raise ValueError(
                    f"model {model_id!r} holds {index.dim}-dimensional templates; "
                    f"got {qs.shape[1]}-dimensional queries"
                )
            return index.search(qs, k)

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
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must be >= 0, got offset={offset}, limit={limit}")
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
