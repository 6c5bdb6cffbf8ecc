"""Unknown people: faces answered UNKNOWN, grouped per person under a persistent opaque id.

Each UNKNOWN face whose primary-recogniser embedding exists (a decoded `face` or `image`
payload) is a `Sighting`. It joins the cluster whose centroid it is nearest to, if the cosine
reaches the threshold (by default the recogniser's match threshold: the bar at which the
server would call two faces the same person if one were enrolled), else it opens a new
cluster with a fresh random id ("u-" + 12 hex digits; derived from nothing, so it says
nothing about the face). A face of a track that was assigned a cluster moments ago keeps that
cluster's id even when it alone would not match (profile, blur): the device's tracker already
said it is the same person. Such a face changes neither the centroid nor the crops, so a
tracker that swaps two people cannot pull one cluster towards someone else.

Per cluster the store keeps: a running-mean centroid (the mean of the unit embeddings that
matched it), first and last seen (server clock), the number of sightings, the most recent
cameras, and the `crops_per_unknown` best crops by quality. A crop is the face warped to the
canonical crop the edge sends (128x128), so enrolling it later is enrolling an edge crop;
quality is its sharpness, the variance of the Laplacian of its luma, which is low for a face
that was small in its frame (upscaled) or blurred. At most one crop per device track is kept,
so the best crops show different appearances rather than five near-identical frames.

Storage: GALLERY/unknowns.sqlite3, separate from the gallery (it holds pictures, the gallery
holds none), with the gallery's privacy measures (cloud/gallery/store.py): 0600 files under
umask 077, `secure_delete=ON`, in-memory temporary storage, and a `wal_checkpoint(TRUNCATE)`
after every erasure, so that an erased cluster's crops and centroid are left nowhere in the
files. Sightings are committed with `synchronous=NORMAL`: a power cut may lose the last
sightings, never the file's consistency, and costs no fsync per face; erasures are committed
with `synchronous=FULL`, so one answered OK never comes back. The file is created at
the first sighting, not before: a server that keeps no unknown people writes nothing.

Retention: clusters not seen for `retention_days` are erased at start and every
`purge_interval_s` (`expire`), and past `max_unknowns` the least recently seen cluster is
erased to make room. Each erasure the store decides itself is reported to `on_erased` (the
audit log); one a client asked for is recorded by the service that served the call.

Thread-safe: one lock serialises every call (the connection is shared between the server's
unknowns thread and its gallery thread).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facelink.config import UnknownsConfig
from facelink.runtime.alignment import canonical_template

from .gallery.store import BUSY_TIMEOUT_MS, enable_erasure_pragmas, make_private, private_umask, truncate_wal

log = logging.getLogger(__name__)

#: The file beside the gallery's.
UNKNOWNS_DB = "unknowns.sqlite3"
SCHEMA_VERSION = 1
#: The crop kept per sighting: the edge's canonical crop (config.CanonicalCrop's defaults).
CROP_TEMPLATE = canonical_template(128, 1.0)
JPEG_QUALITY = 90
#: Cameras remembered per cluster (the most recent ones).
MAX_CAMERAS = 32
#: Tracks remembered for `track_memory_s`; the least recently seen are forgotten past this.
MAX_TRACKS = 4096
_ID_RE = re.compile(r"^u-[0-9a-f]{12}$")

_SCHEMA = (
    # AUTOINCREMENT: a row id is never reused, so a page token (an id) never points at a
    # cluster created after it was issued.
    """CREATE TABLE IF NOT EXISTS clusters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        unknown_id TEXT UNIQUE NOT NULL,
        model_id TEXT NOT NULL,         -- the recogniser whose space the centroid is in
        centroid BLOB NOT NULL,         -- float32 little-endian: mean of the members' unit embeddings
        members INTEGER NOT NULL,       -- embeddings in that mean
        sightings INTEGER NOT NULL,
        first_seen_us INTEGER NOT NULL,
        last_seen_us INTEGER NOT NULL,
        cameras TEXT NOT NULL DEFAULT '[]'  -- JSON list, most recent last, at most MAX_CAMERAS
    )""",
    "CREATE INDEX IF NOT EXISTS clusters_last_seen ON clusters(last_seen_us)",
    """CREATE TABLE IF NOT EXISTS crops (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        cluster_id INTEGER NOT NULL REFERENCES clusters(id) ON DELETE CASCADE,
        quality REAL NOT NULL,
        jpeg BLOB NOT NULL,
        camera_id TEXT NOT NULL,
        track TEXT,                     -- camera and track id of the device's tracker; NULL: untracked
        seen_us INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS crops_cluster ON crops(cluster_id, quality)",
)


class UnknownNotFound(KeyError):
    """No kept unknown person has this id (never had, erased, or enrolled)."""


@dataclass(frozen=True)
class Sighting:
    """One UNKNOWN face, as the recognition service hands it over."""

    embedding: np.ndarray  # (dim,) unit vector of the primary recogniser
    crop: np.ndarray  # CROP_TEMPLATE-aligned RGB uint8
    camera_id: str
    track: tuple[str, str, int] | None  # (principal, camera, track id); None when untracked (track 0)


@dataclass(frozen=True)
class KeptCrop:
    jpeg: bytes
    quality: float
    camera_id: str
    seen_us: int


@dataclass(frozen=True)
class UnknownRecord:
    unknown_id: str
    first_seen_us: int
    last_seen_us: int
    cameras: list[str]
    sightings: int
    crops: list[KeptCrop]  # best first, as many as asked for
    crops_kept: int


#: (why, erased unknown ids, crops erased with them) -> None; called with the store's lock held.
ErasureHook = Callable[[str, list[str], int], None]


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the crop's luma: the crop quality that ranks kept crops."""
    gray = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def now_us() -> int:
    return time.time_ns() // 1000


def valid_id(unknown_id: str) -> bool:
    return bool(_ID_RE.match(unknown_id))


class _Centroids:
    """The unit centroids of one model's clusters, by row id: what a sighting is matched against."""

    def __init__(self, rows: list[int], vectors: list[np.ndarray]) -> None:
        self.rows = rows
        self.matrix = _unit(np.stack(vectors)) if vectors else np.zeros((0, 0), np.float32)
        self._position = {row: i for i, row in enumerate(rows)}

    def __contains__(self, row_id: object) -> bool:
        return row_id in self._position

    def nearest(self, embedding: np.ndarray) -> tuple[int | None, float]:
        if not self.rows or self.matrix.shape[1] != embedding.shape[0]:
            return None, -1.0
        scores = self.matrix @ embedding
        best = int(np.argmax(scores))
        return self.rows[best], float(scores[best])

    def score(self, row_id: int, embedding: np.ndarray) -> float:
        position = self._position.get(row_id)
        if position is None or self.matrix.shape[1] != embedding.shape[0]:
            return -1.0
        return float(self.matrix[position] @ embedding)

    def add(self, row_id: int, centroid: np.ndarray) -> None:
        unit = _unit(centroid[None])
        self.matrix = unit if self.matrix.size == 0 else np.vstack([self.matrix, unit])
        self._position[row_id] = len(self.rows)
        self.rows.append(row_id)

    def update(self, row_id: int, centroid: np.ndarray) -> None:
        position = self._position.get(row_id)
        if position is not None:
            self.matrix[position] = _unit(centroid[None])[0]

    def remove(self, row_ids: set[int]) -> None:
        keep = [i for i, row in enumerate(self.rows) if row not in row_ids]
        if len(keep) == len(self.rows):
            return
        self.matrix = self.matrix[keep]
        self.rows = [self.rows[i] for i in keep]
        self._position = {row: i for i, row in enumerate(self.rows)}


class UnknownClusters:
    """Unknown people of one server: clusters of UNKNOWN faces in `path` (SQLite, 0600)."""

    def __init__(self, path: str | Path, config: UnknownsConfig, model_id: str, threshold: float) -> None:
        self.path = Path(path)
        self.config = config
        self.model_id = model_id
        self.threshold = threshold
        self.on_erased: ErasureHook | None = None  # set by the service that holds the audit log
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._scrub_pending = False
        self._centroids = _Centroids([], [])
        # (principal, camera, track id) -> (cluster row id, monotonic time last seen)
        self._tracks: OrderedDict[tuple[str, str, int], tuple[int, float]] = OrderedDict()
        if self.path.exists():  # clusters kept by an earlier run: load their centroids now
            with self._lock:
                self._db()

    # -- connection --------------------------------------------------------------------------
    def _db(self, create: bool = True) -> sqlite3.Connection | None:
        """The connection, opened (and the file created when `create`) on first use."""
        if self._conn is not None:
            return self._conn
        if not create and not self.path.exists():
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_private(self.path)
        with private_umask():  # the file and the -wal/-shm files SQLite creates: 0600
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                self._init_schema(conn)
            except BaseException:
                conn.close()
                raise
        make_private(self.path)
        self._conn = conn
        self._load()
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has unknowns schema version {version}, newer than {SCHEMA_VERSION}; "
                               "upgrade facelink to open it")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # see the module docstring: no fsync per face
        conn.execute("PRAGMA foreign_keys=ON")  # crops go with their cluster by cascade
        enable_erasure_pragmas(conn, self.path)  # erasure depends on them, as in the gallery
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")

    def _load(self) -> None:
        assert self._conn is not None
        rows = self._conn.execute("SELECT id, centroid FROM clusters WHERE model_id = ? ORDER BY id",
                                  (self.model_id,)).fetchall()
        # Clusters of another recogniser (the server's model changed) stay listable and
        # enrollable, but their centroids are in another space: never matched, expired as usual.
        self._centroids = _Centroids([int(row_id) for row_id, _ in rows],
                                     [np.frombuffer(blob, "<f4").astype(np.float32) for _, blob in rows])

    @contextmanager
    def _write(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction. `durable`: committed with an fsync (synchronous=FULL, which
        SQLite lets no one change inside a transaction), for erasures: an erasure answered OK
        must not come back after a power cut, even when its checkpoint was blocked."""
        conn = self._db()
        assert conn is not None
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                try:
                    self._load()  # the centroids in memory may have run ahead of what was rolled back
                except sqlite3.Error:
                    log.exception("unknowns: cannot reload the centroids after a failed write")
                raise
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")
        if self._scrub_pending:
            self._scrub()

    def close(self) -> None:
        """Close the file (a later call opens it again)."""
        with self._lock:
            if self._conn is None:
                return
            try:
                if self._scrub_pending:
                    self._scrub()
            finally:
                self._conn.close()
                self._conn = None

    # -- sightings ---------------------------------------------------------------------------
    def observe(self, sighting: Sighting) -> str:
        """The unknown id of this face: its cluster's, or a new cluster's."""
        embedding = np.asarray(sighting.embedding, np.float32).reshape(-1)
        embedding = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        seen = now_us()
        with self._lock, self._write(durable=self._full()) as conn:
            row_id, score = self._centroids.nearest(embedding)
            matched = row_id is not None and score >= self.threshold
            remembered = self._track_cluster(sighting.track)
            if remembered is not None and remembered != row_id:
                # The tracker's word wins over a nearest other cluster: one track, one id.
                row_id, matched = remembered, self._centroids.score(remembered, embedding) >= self.threshold
            elif remembered is None and not matched:
                row_id = None
            if row_id is None:
                unknown_id, row_id = self._open(conn, embedding, sighting.camera_id, seen)
                matched = True  # its first face is its model and its first crop
            else:
                unknown_id = self._seen(conn, row_id, embedding if matched else None, sighting.camera_id, seen)
            if matched:
                self._keep_crop(conn, row_id, sighting, seen)
            if sighting.track is not None:
                self._remember(sighting.track, row_id)
        return unknown_id

    def _full(self) -> bool:
        """Whether a new cluster would erase another (capacity): that write must be durable."""
        conn = self._db()
        assert conn is not None
        return int(conn.execute("SELECT COUNT(*) FROM clusters").fetchone()[0]) >= self.config.max_unknowns

    def _track_cluster(self, track: tuple[str, str, int] | None) -> int | None:
        if track is None or self.config.track_memory_s <= 0:
            return None
        found = self._tracks.get(track)
        if found is None or time.monotonic() - found[1] > self.config.track_memory_s:
            return None
        return found[0] if found[0] in self._centroids else None

    def _remember(self, track: tuple[str, str, int], row_id: int) -> None:
        self._tracks[track] = (row_id, time.monotonic())
        self._tracks.move_to_end(track)
        while len(self._tracks) > MAX_TRACKS:
            self._tracks.popitem(last=False)

    def _open(self, conn: sqlite3.Connection, embedding: np.ndarray, camera: str, seen: int) -> tuple[str, int]:
        """A new cluster; the least recently seen ones go first when the store is full."""
        count = conn.execute("SELECT COUNT(*) FROM clusters").fetchone()[0]
        if count >= self.config.max_unknowns:
            oldest = conn.execute("SELECT id FROM clusters ORDER BY last_seen_us, id LIMIT ?",
                                  (count - self.config.max_unknowns + 1,)).fetchall()
            self._erase(conn, [row for (row,) in oldest], f"over max_unknowns ({self.config.max_unknowns})")
        while True:  # 48 random bits: a collision is astronomically rare, and checked anyway
            unknown_id = "u-" + secrets.token_hex(6)
            if conn.execute("SELECT 1 FROM clusters WHERE unknown_id = ?", (unknown_id,)).fetchone() is None:
                break
        cursor = conn.execute(
            "INSERT INTO clusters (unknown_id, model_id, centroid, members, sightings, first_seen_us, last_seen_us,"
            " cameras) VALUES (?, ?, ?, 1, 1, ?, ?, ?)",
            (unknown_id, self.model_id, embedding.astype("<f4").tobytes(), seen, seen, json.dumps([camera])),
        )
        row_id = int(cursor.lastrowid)  # type: ignore[arg-type]
        self._centroids.add(row_id, embedding)
        return unknown_id, row_id

    def _seen(
        self, conn: sqlite3.Connection, row_id: int, embedding: np.ndarray | None, camera: str, seen: int
    ) -> str:
        """Count a sighting of `row_id`; fold `embedding` into its centroid when given."""
        unknown_id, blob, members, cameras = conn.execute(
            "SELECT unknown_id, centroid, members, cameras FROM clusters WHERE id = ?", (row_id,)
        ).fetchone()
        recent = [c for c in json.loads(cameras) if c != camera][-(MAX_CAMERAS - 1):] + [camera]
        if embedding is not None:
            mean = np.frombuffer(blob, "<f4").astype(np.float32)
            mean = mean + (embedding - mean) / (members + 1)
            blob, members = mean.astype("<f4").tobytes(), members + 1
            self._centroids.update(row_id, mean)
        conn.execute(
            "UPDATE clusters SET centroid = ?, members = ?, sightings = sightings + 1, last_seen_us = ?, cameras = ?"
            " WHERE id = ?",
            (blob, members, seen, json.dumps(recent), row_id),
        )
        return str(unknown_id)

    def _keep_crop(self, conn: sqlite3.Connection, row_id: int, sighting: Sighting, seen: int) -> None:
        """Keep this face's crop if it is among the cluster's best (one per device track)."""
        quality = sharpness(sighting.crop)
        track = None if sighting.track is None else json.dumps(list(sighting.track[1:]))
        if track is not None:
            same = conn.execute("SELECT id, quality FROM crops WHERE cluster_id = ? AND track = ?",
                                (row_id, track)).fetchone()
            if same is not None:
                if same[1] >= quality:
                    return
                conn.execute("DELETE FROM crops WHERE id = ?", (same[0],))
        kept = conn.execute("SELECT id, quality FROM crops WHERE cluster_id = ? ORDER BY quality, id",
                            (row_id,)).fetchall()
        limit = self.config.crops_per_unknown
        if len(kept) >= limit and kept[0][1] >= quality:
            return
        for crop_id, _ in kept[: max(0, len(kept) - limit + 1)]:
            conn.execute("DELETE FROM crops WHERE id = ?", (crop_id,))
        bgr = cv2.cvtColor(sighting.crop, cv2.COLOR_RGB2BGR)
        ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            log.warning("unknowns: a crop could not be JPEG-encoded; not kept")
            return
        conn.execute(
            "INSERT INTO crops (cluster_id, quality, jpeg, camera_id, track, seen_us) VALUES (?, ?, ?, ?, ?, ?)",
            (row_id, quality, jpeg.tobytes(), sighting.camera_id, track, seen),
        )

    # -- reading -----------------------------------------------------------------------------
    def list(
        self, before: int | None, limit: int, max_crops: int, max_bytes: int
    ) -> tuple[list[UnknownRecord], int | None, int]:
        """Clusters newest first, below row id `before`: (page, the token of the next page or
        None, clusters kept). The page stops early when its crops would pass `max_bytes`."""
        with self._lock:
            conn = self._db(create=False)
            if conn is None:
                return [], None, 0
            total = conn.execute("SELECT COUNT(*) FROM clusters").fetchone()[0]
            rows = conn.execute(
                "SELECT id, unknown_id, first_seen_us, last_seen_us, cameras, sightings FROM clusters"
                " WHERE id < ? ORDER BY id DESC LIMIT ?",
                (before if before is not None else 2**62, limit + 1),
            ).fetchall()
            page: list[UnknownRecord] = []
            size, last_row = 0, None
            for row_id, unknown_id, first, last, cameras, sightings in rows[:limit]:
                crops = self._crops(conn, row_id, max_crops)
                size += sum(len(c.jpeg) for c in crops)
                if page and size > max_bytes:  # the rest on the next page (always one on this one)
                    return page, last_row, total
                kept = conn.execute("SELECT COUNT(*) FROM crops WHERE cluster_id = ?", (row_id,)).fetchone()[0]
                page.append(UnknownRecord(unknown_id, first, last, json.loads(cameras), sightings, crops, kept))
                last_row = int(row_id)
            return page, (last_row if len(rows) > limit else None), total

    def crops(self, unknown_id: str, limit: int | None = None) -> list[KeptCrop]:
        """The best crops of `unknown_id`, best first; UnknownNotFound if it is not kept."""
        with self._lock:
            conn = self._db(create=False)
            row = None
            if conn is not None:
                row = conn.execute("SELECT id FROM clusters WHERE unknown_id = ?", (unknown_id,)).fetchone()
            if row is None:
                raise UnknownNotFound(unknown_id)
            return self._crops(conn, row[0], limit)

    @staticmethod
    def _crops(conn: sqlite3.Connection | None, row_id: int, limit: int | None) -> list[KeptCrop]:
        if conn is None or limit == 0:
            return []
        rows = conn.execute(
            "SELECT jpeg, quality, camera_id, seen_us FROM crops WHERE cluster_id = ?"
            " ORDER BY quality DESC, id LIMIT ?",
            (row_id, -1 if limit is None else limit),
        ).fetchall()
        return [KeptCrop(bytes(jpeg), float(q), camera, int(seen)) for jpeg, q, camera, seen in rows]

    def __len__(self) -> int:
        with self._lock:
            conn = self._db(create=False)
            return 0 if conn is None else int(conn.execute("SELECT COUNT(*) FROM clusters").fetchone()[0])

    # -- erasure -----------------------------------------------------------------------------
    def forget(self, unknown_id: str, why: str | None = None) -> int:
        """Erase `unknown_id`: its row, centroid, cameras and crops, then scrub the files.
        Returns the crops erased; UnknownNotFound if it is not kept. `why` is reported to
        `on_erased` (None: the caller records the erasure itself)."""
        with self._lock:
            if self._db(create=False) is None:
                raise UnknownNotFound(unknown_id)
            with self._write(durable=True) as conn:
                row = conn.execute("SELECT id FROM clusters WHERE unknown_id = ?", (unknown_id,)).fetchone()
                if row is None:
                    raise UnknownNotFound(unknown_id)
                return self._erase(conn, [row[0]], why)

    def expire(self, now: int | None = None) -> int:
        """Erase clusters not seen for the retention period, and the least recently seen past
        `max_unknowns` (the limit may have been lowered since they were kept). Returns how many."""
        cutoff = (now if now is not None else now_us()) - int(self.config.retention_days * 86400e6)
        with self._lock:
            if self._db(create=False) is None:
                return 0
            with self._write(durable=True) as conn:
                old = [r for (r,) in conn.execute("SELECT id FROM clusters WHERE last_seen_us < ?", (cutoff,))]
                self._erase(conn, old, f"not seen for {self.config.retention_days:g} days")
                over = conn.execute("SELECT COUNT(*) FROM clusters").fetchone()[0] - self.config.max_unknowns
                excess = [r for (r,) in conn.execute(
                    "SELECT id FROM clusters ORDER BY last_seen_us, id LIMIT ?", (max(over, 0),))]
                self._erase(conn, excess, f"over max_unknowns ({self.config.max_unknowns})")
            return len(old) + len(excess)

    def _erase(self, conn: sqlite3.Connection, row_ids: list[int], why: str | None) -> int:
        """Delete clusters (crops by cascade) inside the caller's transaction; the files are
        scrubbed once it commits. Returns the crops deleted."""
        if not row_ids:
            return 0
        marks = ", ".join("?" * len(row_ids))
        ids = [u for (u,) in conn.execute(f"SELECT unknown_id FROM clusters WHERE id IN ({marks})", row_ids)]
        crops = conn.execute(f"SELECT COUNT(*) FROM crops WHERE cluster_id IN ({marks})", row_ids).fetchone()[0]
        conn.execute(f"DELETE FROM clusters WHERE id IN ({marks})", row_ids)
        self._centroids.remove(set(row_ids))
        self._scrub_pending = True  # _write scrubs after the commit
        if why is not None and self.on_erased is not None:
            try:
                self.on_erased(why, ids, int(crops))
            except Exception:  # noqa: BLE001 - the erasure stands; the log says the record is missing
                log.exception("unknowns: the erasure of %d unknown people could not be recorded", len(ids))
        return int(crops)

    def _scrub(self) -> None:
        """Checkpoint the WAL into the file and truncate it: with secure_delete, nothing erased
        stays in any file (as GalleryStore.scrub)."""
        assert self._conn is not None
        busy = not truncate_wal(self._conn)
        self._scrub_pending = busy
        if busy:
            log.warning("unknowns %s: a reader blocked the WAL checkpoint; it still holds erased data until the next one",
                        self.path)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)
