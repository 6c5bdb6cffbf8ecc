"""The distributed gallery backend: Qdrant, through its official client.

Layout (two collections per gallery, named `<prefix>_pictures` and `<prefix>_identities`):

* one point per enrollment picture in `_pictures`, its id the picture key (a UUID), with one
  named vector per model: each gallery model's embedding and each query model's template
  derived from them. Its payload: `identity` (the normalised name), `state` (pending or live),
  `created_us`, `models` (the vectors it holds), `derived` ({query model: status, uncertainty,
  reason}) and `dropped` (the query models whose template the rejection policy dropped: kept on
  record, filtered out of every search);
* one payload-only point per identity in `_identities` (id: a UUID derived from the name), with
  `name`, `state`, `created_us` and `metadata`: identity-level data, listed without touching the
  pictures.

A search asks for the best k *distinct* identities with the query API's group_by on `identity`
(one hit per group, the identity's best picture). Sharding and replication are the cluster's
(`GallerySettings.shards`, `replication_factor`, `write_consistency_factor`, applied when the
collections are created). Replicas of the facelink server hold nothing: every call goes to the
engine, so what one replica wrote is what the next search on any replica reads (with
replication, after the engine's own write consistency: writes here use wait=True).

Qdrant has no transactions, so writes are ordered so that a crash at any point never leaves a
half-enrolled identity visible to search:

1. a new identity's point is written `pending` (not listed, not counted);
2. the picture points are written `pending` (never returned: searches filter on `state`);
3. the identity goes `live` with its metadata, then its new pictures go `live` together;
4. a replace then deletes the old pictures.

A crash before 3 leaves only pending points, which a later open deletes once they are older than
`GallerySettings.pending_grace_s`; a crash between the identity's and the pictures' flip leaves
a listed identity that search does not find yet, which the client's retry completes. An erasure
deletes the pictures first, then the identity, so a crash half-way leaves it listed and erasable.

What Qdrant keeps after an erasure is in docs/gallery.md: deleted points are gone from search
and from the API at once, but their bytes stay in the engine's WAL and in segments until the
optimizer rewrites them.

Local mode (`qdrant+local:///path`) is the client's own embedded engine: exact search, one
process per folder, for tests and single-host trials. It keeps points pickled in an SQLite file
without secure deletion, so it is not an erasure-safe production store.
"""

from __future__ import annotations

import builtins
import logging
import threading
import uuid
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from facelink.logsafe import printable

from .backend import (
    ContextClosing,
    GallerySettings,
    QdrantLocation,
    check_dim,
    check_page,
    check_search,
    prepare_pictures,
    read_api_key,
)
from .derived import QueryModel
from .errors import GalleryError, GalleryQuotaError, UnknownIdentityError
from .gallery import _make_private_dir
from .index import Match
from .rules import GalleryLimits, check_metadata, normalize_identity
from .store import STATUSES, IdentityRecord, TemplateRecord, Templates, now_us

log = logging.getLogger(__name__)

#: Identity point ids: uuid5 of the normalised name in this namespace (stable across replicas).
IDENTITY_NAMESPACE = uuid.UUID("6b1d2c52-6f0e-4c8e-9a57-0f2a5e6b9d41")
#: Characters Qdrant refuses in a vector name (it keeps vectors in folders named after them).
_INVALID_NAME_CHARS = '<>:"/\\|?*\0\x1f%'
_SCROLL_PAGE = 1024
_WRITE_BATCH = 256
PENDING, LIVE = "pending", "live"


def vector_name(model_id: str) -> str:
    """The named vector of `model_id`: the id itself, with characters Qdrant refuses %-escaped."""
    return "".join(f"%{ord(c):02X}" if c in _INVALID_NAME_CHARS else c for c in model_id)


def identity_point(name: str) -> str:
    return str(uuid.uuid5(IDENTITY_NAMESPACE, name))


def _match(key: str, value: object) -> qm.FieldCondition:
    return qm.FieldCondition(key=key, match=qm.MatchValue(value=value))  # type: ignore[arg-type]


_LIVE = _match("state", LIVE)


class QdrantGallery(ContextClosing):
    """The gallery in a Qdrant collection pair; same contract as the embedded `Gallery`."""

    def __init__(
        self,
        client: QdrantClient,
        directory: str | Path,
        limits: GalleryLimits | None = None,
        settings: GallerySettings | None = None,
        *,
        prefix: str = "facelink",
        local: bool = False,
        owns_client: bool = True,
        where: str = "qdrant",
    ) -> None:
        self.directory = Path(directory)
        _make_private_dir(self.directory)
        self.settings = settings or GallerySettings()
        self._limits = limits or GalleryLimits()
        self._client: QdrantClient | None = client
        self._owns_client = owns_client
        self._where = where
        self.pictures = f"{prefix}_pictures"
        self.identities = f"{prefix}_identities"
        # One writer at a time in this process: the quota and picture-count checks, then the
        # writes they allow. Across replicas nothing serialises two writers (documented).
        self._lock = threading.RLock()
        # Local mode is one in-process engine over an SQLite file, not made for threads: every
        # call takes the lock. A remote client is thread-safe, so searches run concurrently.
        self._local = local  # (local mode has no payload indexes: it scans)
        self._read_lock: AbstractContextManager[Any] = self._lock if local else nullcontext()
        self._dims: dict[str, int] = {}
        try:
            self._ensure_collections()
            self._sweep_pending()
        except Exception as exc:
            self.close()
            if isinstance(exc, GalleryError):
                raise
            raise GalleryError(f"cannot open the gallery at {where}: {exc}") from exc

    @classmethod
    def connect(
        cls, location: QdrantLocation, directory: str | Path, limits: GalleryLimits | None = None,
        settings: GallerySettings | None = None,
    ) -> QdrantGallery:
        """Open the gallery at a parsed `qdrant...://` URL (see backend.open_gallery)."""
        settings = settings or GallerySettings()
        if location.local:
            assert location.path is not None
            try:
                client = QdrantClient(path=str(location.path))
            except Exception as exc:  # portalocker: another process holds the folder
                raise GalleryError(f"cannot open the local Qdrant gallery {location.path}: {exc}") from exc
            return cls(client, directory, limits, settings, prefix=location.prefix, local=True, where=str(location))
        api_key = read_api_key(settings)
        if api_key and not location.tls and location.host not in ("localhost", "127.0.0.1", "::1"):
            raise GalleryError(
                f"refusing to send the Qdrant API key in plaintext to {location.host}: use qdrants://"
            )
        client = QdrantClient(
            host=location.host, grpc_port=location.port, prefer_grpc=True, https=location.tls,
            api_key=api_key, timeout=int(settings.timeout_s),
        )
        return cls(client, directory, limits, settings, prefix=location.prefix, where=str(location))

    @property
    def limits(self) -> GalleryLimits:
        return self._limits

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the client (if this gallery opened it); later calls raise GalleryError."""
        with self._lock:
            client, self._client = self._client, None
            if client is not None and self._owns_client:
                client.close()

    def _db(self) -> QdrantClient:
        if self._client is None:
            raise GalleryError(f"gallery {self._where} is closed")
        return self._client

    def _ensure_collections(self) -> None:
        db = self._db()
        for name, keywords in ((self.pictures, ("identity", "state", "dropped")), (self.identities, ("name", "state"))):
            if not db.collection_exists(name):
                try:
                    db.create_collection(
                        name, vectors_config={}, shard_number=self.settings.shards,
                        replication_factor=self.settings.replication_factor,
                        write_consistency_factor=self.settings.write_consistency_factor,
                    )
                except Exception:
                    if not db.collection_exists(name):  # else another replica created it first
                        raise
                for key in keywords if not self._local else ():  # filtered on by every search, count and erasure
                    db.create_payload_index(name, key, qm.PayloadSchemaType.KEYWORD)
        self._load_dims()

    def _load_dims(self) -> None:
        vectors = self._db().get_collection(self.pictures).config.params.vectors
        self._dims = {name: int(p.size) for name, p in (vectors or {}).items()} if isinstance(vectors, dict) else {}

    def _sweep_pending(self) -> None:
        """Delete what a crashed enrollment left pending for longer than the grace period."""
        cutoff = now_us() - int(self.settings.pending_grace_s * 1e6)
        stale = qm.Filter(must=[_match("state", PENDING), qm.FieldCondition(key="created_us", range=qm.Range(lt=cutoff))])
        for collection in (self.pictures, self.identities):
            self._db().delete(collection, qm.FilterSelector(filter=stale), wait=True)

    # -- writes ------------------------------------------------------------------------------

    def enroll_pictures(
        self,
        identity: str,
        embeddings: Mapping[str, np.ndarray],
        query_models: Sequence[QueryModel] = (),
        *,
        replace: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[int, int]:
        """As `Gallery.enroll_pictures`: n pictures, one point each; see the module docstring
        for the order of the writes. Returns (pictures added, pictures the identity now holds)."""
        keys, batches = prepare_pictures(identity, embeddings, query_models)
        meta = check_metadata(metadata, self.limits)
        name = normalize_identity(identity)
        with self._lock:
            db = self._db()
            found = self._identity(name)
            created = now_us()
            if found is None:
                # Unfiltered (pending identities count too: stricter, and no scan in local mode).
                count = int(db.count(self.identities, exact=True).count)
                if count >= self.limits.max_identities:
                    raise GalleryQuotaError(
                        f"the gallery holds {count} identities, its limit; remove one before enrolling "
                        f"'{printable(name)}' (limit max_identities={self.limits.max_identities})"
                    )
                new_meta = dict(meta or {})
            else:
                new_meta = dict(meta or {}) if replace else {**found.get("metadata", {}), **(meta or {})}
            if len(new_meta) > self.limits.max_metadata_keys:
                raise GalleryQuotaError(
                    f"identity '{printable(name)}' would hold {len(new_meta)} metadata keys; the limit is "
                    f"{self.limits.max_metadata_keys} (enroll with replace to overwrite them instead of merging)"
                )
            old = [] if found is None else builtins.list(self._pictures_of(name))
            held: dict[str, int] = {}
            for point in [] if replace else old:
                for model in point.payload.get("models", []):
                    held[model] = held.get(model, 0) + 1
            after = dict(held)
            for batch in batches:
                after[batch.model_id] = after.get(batch.model_id, 0) + len(batch.vectors)
            if max(after.values()) > self.limits.max_pictures_per_identity:
                raise GalleryQuotaError(
                    f"identity '{printable(name)}' would hold {max(after.values())} pictures "
                    f"({max(held.values(), default=0)} stored, {len(keys)} added); "
                    f"the limit is {self.limits.max_pictures_per_identity} per identity (max_pictures_per_identity)"
                )
            self._ensure_vectors(batches)
            ident_id = identity_point(name)
            if found is None:  # 1. the identity, pending
                db.upsert(self.identities, [qm.PointStruct(id=ident_id, vector={}, payload={
                    "name": name, "state": PENDING, "created_us": created, "metadata": new_meta,
                })], wait=True)
            points = _picture_points(name, keys, batches, created)
            for start in range(0, len(points), _WRITE_BATCH):  # 2. the pictures, pending
                db.upsert(self.pictures, points[start:start + _WRITE_BATCH], wait=True)
            # 3. the identity live (with its metadata), then its new pictures, together
            db.set_payload(self.identities, {"state": LIVE, "metadata": new_meta}, points=[ident_id], wait=True)
            db.set_payload(self.pictures, {"state": LIVE}, points=[p.id for p in points], wait=True)
            if replace and old:  # 4. a replace forgets the old pictures
                db.delete(self.pictures, qm.PointIdsList(points=[p.id for p in old]), wait=True)
        return len(keys), max(after.values())

    def _ensure_vectors(self, batches: Sequence[Templates]) -> None:
        """Create the named vector of each model seen for the first time; refuse another dimension."""
        for batch in batches:
            dim = int(batch.vectors.shape[1])
            name = vector_name(batch.model_id)
            if name not in self._dims:
                self._load_dims()  # another replica may have created it
            if name not in self._dims:
                config = qm.DenseVectorNameConfig(dense=qm.DenseVectorConfig(size=dim, distance=qm.Distance.COSINE))
                try:
                    self._db().create_vector_name(self.pictures, name, config)
                except Exception:
                    self._load_dims()
                    if name not in self._dims:
                        raise
                self._dims.setdefault(name, dim)
            if self._dims[name] != dim:
                # Unlike the embedded gallery, a named vector's size is fixed when it is created.
                raise ValueError(
                    f"model {batch.model_id!r} holds {self._dims[name]}-dimensional templates; "
                    f"got {dim}-dimensional embeddings"
                )

    def rebuild_derived(self, query_model: QueryModel) -> dict[str, int]:
        """(Re)derive `query_model`'s vector of every live picture from its stored gallery-model
        vectors (never a picture). Point by point: a search during it may see some pictures'
        old templates and others' new ones (each picture's own is old or new, never mixed).
        Replicas that rebuild at once write the same values. Returns counts per status."""
        target = query_model.model_id
        counts = dict.fromkeys(STATUSES, 0)
        with self._lock:
            self._load_dims()  # vectors another replica created since
            members = [m for m in query_model.gallery_models if vector_name(m) in self._dims]
            groups: dict[tuple[str, ...], builtins.list[Any]] = {}
            orphans = []  # pictures holding a template of `target` but none of its members
            vectors = [vector_name(m) for m in members]
            for point in self._scroll(self.pictures, qm.Filter(must=[_LIVE]), with_vectors=vectors or False):
                held = tuple(m for m in members if vector_name(m) in (point.vector or {}))
                if held:
                    groups.setdefault(held, []).append(point)
                elif target in point.payload.get("models", []):
                    orphans.append(point)
            updates: builtins.list[tuple[Any, Templates, int]] = []
            for held, points in groups.items():
                batch = query_model.derive(
                    {m: np.array([p.vector[vector_name(m)] for p in points], dtype=np.float32) for m in held},
                    [str(p.id) for p in points],
                )
                if batch.vectors.size:
                    self._ensure_vectors([batch])
                updates += [(p, batch, i) for i, p in enumerate(points)]
                for status in batch.status:
                    counts[status] += 1
            self._write_derived(target, updates, orphans)
        log.info("gallery: derived %s templates from %s: %s", target, ", ".join(query_model.gallery_models),
                 ", ".join(f"{n} {s}" for s, n in counts.items()))
        return counts

    def _write_derived(self, target: str, updates: builtins.list[tuple[Any, Templates, int]], orphans: builtins.list[Any]) -> None:
        db = self._db()
        ops: builtins.list[Any] = []
        name = vector_name(target)
        for point, batch, i in updates:
            derived = {**point.payload.get("derived", {}), target: _verdict(batch, i)}
            ops.append(qm.UpdateVectorsOperation(update_vectors=qm.UpdateVectors(points=[
                qm.PointVectors(id=point.id, vector={name: batch.vectors[i].tolist()})])))
            ops.append(qm.SetPayloadOperation(set_payload=qm.SetPayload(points=[point.id], payload={
                "derived": derived, "dropped": _dropped(derived),
                "models": sorted({*point.payload.get("models", []), target}),
            })))
        for point in orphans:
            derived = {k: v for k, v in point.payload.get("derived", {}).items() if k != target}
            ops.append(qm.DeleteVectorsOperation(delete_vectors=qm.DeleteVectors(points=[point.id], vector=[name])))
            ops.append(qm.SetPayloadOperation(set_payload=qm.SetPayload(points=[point.id], payload={
                "derived": derived, "dropped": _dropped(derived),
                "models": [m for m in point.payload.get("models", []) if m != target],
            })))
        for start in range(0, len(ops), _WRITE_BATCH):
            db.batch_update_points(self.pictures, ops[start:start + _WRITE_BATCH], wait=True)

    def remove(self, identity: str) -> int:
        """Erase `identity`: every picture point (all its vectors and payload), then the identity
        point, each with wait=True. Returns how many pictures went; UnknownIdentityError if
        it is not enrolled. What the engine keeps on disk afterwards: docs/gallery.md."""
        name = normalize_identity(identity)
        with self._lock:
            db = self._db()
            if self._identity(name, live_only=False) is None:
                raise UnknownIdentityError(identity)
            removed = _pictures_held(self._pictures_of(name, live_only=False))
            db.delete(self.pictures, qm.FilterSelector(filter=qm.Filter(must=[_match("identity", name)])), wait=True)
            db.delete(self.identities, qm.PointIdsList(points=[identity_point(name)]), wait=True)
        return removed

    # -- reads -------------------------------------------------------------------------------

    def search(self, model_id: str, queries: np.ndarray, k: int = 5) -> builtins.list[builtins.list[Match]]:
        """For each query row, the best `k` distinct identities (group_by identity), best first."""
        qs = check_search(model_id, queries, k)
        name = vector_name(model_id)
        with self._read_lock:
            db = self._db()
            if name not in self._dims:
                self._load_dims()  # created by another replica since
                if name not in self._dims:
                    return [[] for _ in range(len(qs))]
            check_dim(model_id, self._dims[name], qs.shape[1])
            if k == 0:
                return [[] for _ in range(len(qs))]
            searchable = qm.Filter(must=[_LIVE], must_not=[_match("dropped", model_id)])
            results = []
            for row in qs:
                found = db.query_points_groups(
                    self.pictures, query=row.tolist(), using=name, group_by="identity", limit=k, group_size=1,
                    query_filter=searchable, with_payload=False,
                )
                results.append([Match(str(g.id), float(g.hits[0].score)) for g in found.groups])
        return results

    def templates_of(self, identity: str) -> builtins.list[TemplateRecord]:
        """Every template of `identity`, one per model per picture, dropped ones included.

        `template_id` is an opaque number derived from the picture key and the model (Qdrant
        has no row ids); `picture` is the picture key."""
        name = normalize_identity(identity)
        with self._read_lock:
            if self._identity(name) is None:
                raise UnknownIdentityError(identity)
            points = sorted(self._pictures_of(name), key=lambda p: (p.payload["created_us"], str(p.id)))
        records = []
        for point in points:
            key = uuid.UUID(str(point.id)).hex
            for model in point.payload.get("models", []):
                verdict = point.payload.get("derived", {}).get(model, {})
                records.append(TemplateRecord(
                    _template_id(key, model), model, key, verdict.get("status", "ok"), verdict.get("uncertainty"),
                    verdict.get("reason"), int(point.payload["created_us"]),
                ))
        return records

    def resolve(self, identity: str) -> str:
        """The stored (normalised) name of `identity`; UnknownIdentityError if not enrolled."""
        name = normalize_identity(identity)
        with self._read_lock:
            if self._identity(name) is None:
                raise UnknownIdentityError(identity)
        return name

    def normalized_name(self, identity: str) -> str:
        return normalize_identity(identity)

    def dim(self, model_id: str) -> int | None:
        with self._read_lock:
            self._db()
            return self._dims.get(vector_name(model_id))

    def __contains__(self, identity: object) -> bool:
        if not isinstance(identity, str):
            return False
        try:
            self.resolve(identity)
        except (UnknownIdentityError, ValueError):
            return False
        return True

    def __len__(self) -> int:
        with self._read_lock:
            return int(self._db().count(self.identities, count_filter=qm.Filter(must=[_LIVE]), exact=True).count)

    def list(self, offset: int = 0, limit: int = 100) -> tuple[builtins.list[IdentityRecord], int]:
        """A page of identities sorted by name (code point order) and the total.

        Qdrant orders scrolls by numeric payload only, so each page reads every identity's name
        (payload `name` alone) and sorts them here: O(identities) per page, about 10 ms per
        10,000 identities; the pictures are counted for the page's identities only."""
        check_page(offset, limit)
        with self._read_lock:
            names = sorted(p.payload["name"] for p in self._scroll(self.identities, qm.Filter(must=[_LIVE]), payload=["name"]))
            page = names[offset:offset + limit]
            if not page:
                return [], len(names)
            records = {p.payload["name"]: p.payload for p in self._db().retrieve(
                self.identities, [identity_point(n) for n in page], with_payload=True)}
            counts: dict[str, dict[str, int]] = {}
            pictures = qm.Filter(must=[_LIVE, qm.FieldCondition(key="identity", match=qm.MatchAny(any=page))])
            for point in self._scroll(self.pictures, pictures, payload=["identity", "models"]):
                per_model = counts.setdefault(point.payload["identity"], {})
                for model in point.payload.get("models", []):
                    per_model[model] = per_model.get(model, 0) + 1
        out = []
        for n in page:
            record = records.get(n)
            if record is None:  # erased between the two reads
                continue
            out.append(IdentityRecord(
                n, max(counts.get(n, {}).values(), default=0), int(record["created_us"]),
                {str(k): str(v) for k, v in record.get("metadata", {}).items()},
            ))
        return out, len(names)

    def _identity(self, name: str, *, live_only: bool = True) -> dict[str, Any] | None:
        found = self._db().retrieve(self.identities, [identity_point(name)], with_payload=True)
        if not found or (live_only and found[0].payload.get("state") != LIVE):
            return None
        return dict(found[0].payload or {})

    def _pictures_of(self, name: str, *, live_only: bool = True) -> Iterator[Any]:
        must = [_match("identity", name), *([_LIVE] if live_only else [])]
        return self._scroll(self.pictures, qm.Filter(must=must), payload=True)

    def _scroll(
        self, collection: str, where: qm.Filter, *, payload: bool | builtins.list[str] = True,
        with_vectors: bool | builtins.list[str] = False,
    ) -> Iterator[Any]:
        offset = None
        while True:
            points, offset = self._db().scroll(
                collection, scroll_filter=where, limit=_SCROLL_PAGE, offset=offset,
                with_payload=payload, with_vectors=with_vectors,
            )
            yield from points
            if offset is None:
                return

    def __repr__(self) -> str:
        return f"QdrantGallery({self._where!r}, {'closed' if self._client is None else 'open'})"


def _verdict(batch: Templates, i: int) -> dict[str, Any]:
    return {"status": batch.status[i], "uncertainty": batch.uncertainty[i], "reason": batch.reasons[i]}


def _dropped(derived: Mapping[str, Mapping[str, Any]]) -> builtins.list[str]:
    return sorted(m for m, v in derived.items() if v.get("status") == "dropped")


def _picture_points(name: str, keys: Sequence[str], batches: Sequence[Templates], created: int) -> builtins.list[qm.PointStruct]:
    """One pending point per picture, holding every model's vector of it."""
    points = []
    for i, key in enumerate(keys):
        derived = {b.model_id: _verdict(b, i) for b in batches if b.status[i] != "ok" or b.uncertainty[i] is not None}
        points.append(qm.PointStruct(
            id=str(uuid.UUID(hex=key)),
            vector={vector_name(b.model_id): b.vectors[i].tolist() for b in batches},
            payload={
                "identity": name, "state": PENDING, "created_us": created, "models": sorted(b.model_id for b in batches),
                "derived": derived, "dropped": _dropped(derived),
            },
        ))
    return points


def _pictures_held(points: Iterator[Any]) -> int:
    """Pictures as list() counts them: points holding the model that the most points hold."""
    per_model: dict[str, int] = {}
    for point in points:
        for model in point.payload.get("models", []):
            per_model[model] = per_model.get(model, 0) + 1
    return max(per_model.values(), default=0)


def _template_id(key: str, model: str) -> int:
    """A stable, opaque 63-bit id for one model's template of one picture."""
    return (int(key[:12], 16) << 15 ^ zlib.crc32(model.encode())) & (2**63 - 1)

