"""The gallery backends side by side at scale: enrollments a second, search p50/p99, erasure.

    facelink bench gallery-backends                                  # 1e5 identities, both backends
    facelink bench gallery-backends -- --identities 100000 --backends embedded
    facelink bench gallery-backends -- --identities 10000 --queries 50 --backends qdrant-local
    FACELINK_QDRANT_API_KEY=... facelink bench gallery-backends -- --backends qdrant \
        --qdrant-url qdrants://qdrant.internal:6334/bench --qdrant-queries 500   # a real engine

Each backend is filled to `--identities` identities of one picture each (one gallery model of
`--dim` dimensions: MobileFaceNet's 512 by default), then measured through its public
`GalleryBackend` calls, exactly as the service calls them, one call at a time:

* enroll: `--enroll` new identities through `enroll_pictures` (per call: p50/p99, and calls/s);
* search: `--queries` single-face searches with k=1 (what the engine asks per face), each a
  noisy copy of an enrolled picture, with its rank-1 hit rate as a check that it searched;
* erase: `--erase` identities through `remove`;
* open: closing and reopening the gallery at full size (a replica's start).

The vectors are random unit vectors, not face embeddings: a backend's cost depends on how many
vectors of what dimension it holds, not on what they mean, and 1e5 distinct real identities do
not exist in ../shared. The fill is not timed and writes in bulk (embedded: with
synchronous=OFF; Qdrant: `upload_points` of the backend's own point layout); every measured
call runs as served (embedded: synchronous=FULL, the change feed written).

Qdrant runs in qdrant-client's local mode (in memory: its on-disk local mode commits each point
on its own, tens of points a second): the client's own embedded engine, exact search in Python,
the engine the contract tests run. It is a reference for correctness, not for speed: a Qdrant
server (HNSW, payload indexes, Rust) is not reachable from this machine, so the cluster's
numbers are not measured here; `--backends qdrant --qdrant-url URL` measures one (into the
collections named by the URL's prefix: use a prefix of its own, they are filled and left). The timed phases hold the shared timing lock
(`--lock`, /tmp/facelink-timing.lock); the fill does not.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import shlex
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import reporting

MODEL = "bench@1"
BACKENDS = ("embedded", "qdrant-local", "qdrant")
FILL_BATCH = 1000


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@contextmanager
def timing_lock(path: Path | None) -> Iterator[float]:
    """Hold the shared timing lock (so that no other timing run overlaps); yields the wait in s."""
    if path is None:
        yield 0.0
        return
    started = time.monotonic()
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - started
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_backend(kind: str, folder: Path, client: Any = None, url: str | None = None) -> Any:
    from facelink.cloud.gallery import GalleryLimits, open_gallery

    limits = GalleryLimits(max_identities=10_000_000)
    if kind == "embedded":
        return open_gallery(folder / "gallery", limits)
    if kind == "qdrant":  # the engine the URL names, opened as the server opens it
        return open_gallery(url, limits, state_dir=folder / "state")
    from facelink.cloud.gallery.qdrant import QdrantGallery

    return QdrantGallery(client, folder / "state", limits, local=True, owns_client=False)


def _fill_embedded(folder: Path, vectors: np.ndarray) -> None:
    """The embedded fill, in a child process at the lowest priority (it is CPU work, not a
    measurement, on cores shared with other jobs)."""
    os.nice(19)
    with open_backend("embedded", folder) as gallery:
        fill("embedded", gallery, vectors)


def fill(kind: str, gallery: Any, vectors: np.ndarray) -> None:
    """Bulk-load one picture per identity (untimed)."""
    if kind == "embedded":
        db = gallery._store._db()
        db.execute("PRAGMA synchronous=OFF")  # the fill only; measured calls run with FULL
        try:
            for i, vector in enumerate(vectors):
                gallery.enroll_pictures(f"person-{i:07d}", {MODEL: vector[None]})
        finally:
            db.execute("PRAGMA synchronous=FULL")
        return
    from qdrant_client import models as qm

    from facelink.cloud.gallery.qdrant import LIVE, _picture_points, identity_point
    from facelink.cloud.gallery.store import Templates, now_us

    gallery.enroll_pictures("person-0000000", {MODEL: vectors[:1]})  # creates the named vector
    db, created = gallery._db(), now_us()
    for start in range(1, len(vectors), FILL_BATCH):
        names = [f"person-{i:07d}" for i in range(start, min(start + FILL_BATCH, len(vectors)))]
        pictures, people = [], []
        for offset, name in enumerate(names):
            key = uuid.uuid4().hex
            point = _picture_points(name, [key], [Templates.ok(MODEL, vectors[start + offset][None], [key])], created)[0]
            point.payload["state"] = LIVE
            pictures.append(point)
            people.append(qm.PointStruct(id=identity_point(name), vector={}, payload={
                "name": name, "state": LIVE, "created_us": created, "metadata": {}}))
        db.upload_points(gallery.pictures, pictures, wait=True)
        db.upload_points(gallery.identities, people, wait=True)


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 2)


def measure(kind: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    n = args.identities if kind == "embedded" else args.qdrant_identities
    queries = args.queries if kind == "embedded" else args.qdrant_queries
    vectors = unit_rows(rng.normal(size=(n, args.dim)))
    client = None
    started = time.monotonic()
    if kind == "qdrant-local":
        from qdrant_client import QdrantClient

        client = QdrantClient(":memory:")  # in this process: nothing to hand over
        gallery = open_backend(kind, folder, client)
        fill(kind, gallery, vectors)
    elif kind == "qdrant":
        if not args.qdrant_url:
            raise SystemExit("--backends qdrant needs --qdrant-url")
        gallery = open_backend(kind, folder, url=args.qdrant_url)
        if len(gallery):
            raise SystemExit(f"{args.qdrant_url} already holds {len(gallery)} identities: give the URL a prefix of its own")
        fill(kind, gallery, vectors)
    else:
        child = multiprocessing.get_context("spawn").Process(target=_fill_embedded, args=(folder, vectors))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise RuntimeError(f"the embedded fill failed (exit code {child.exitcode})")
        gallery = open_backend(kind, folder)
    fill_s = time.monotonic() - started
    assert len(gallery) == n, (len(gallery), n)
    print(f"  {kind}: filled {n} identities in {fill_s:.0f} s", flush=True)
    new = unit_rows(rng.normal(size=(args.enroll, args.dim)))
    probe_ids = rng.choice(n, size=queries, replace=False)
    probes = unit_rows(vectors[probe_ids] + 0.3 / np.sqrt(args.dim) * rng.normal(size=(queries, args.dim)))
    erase_ids = rng.choice(n, size=args.erase if kind == "embedded" else args.qdrant_erase, replace=False)
    with timing_lock(args.lock) as waited:
        load = os.getloadavg()[0]  # the machine is shared: what else ran, in numbers
        enroll_s = []
        for i, vector in enumerate(new):
            t = time.perf_counter()
            gallery.enroll_pictures(f"new-{i:05d}", {MODEL: vector[None]})
            enroll_s.append(time.perf_counter() - t)
        search_s, hits = [], 0
        for row, probe in zip(probe_ids.tolist(), probes):
            t = time.perf_counter()
            (found,) = gallery.search(MODEL, probe[None], k=1)
            search_s.append(time.perf_counter() - t)
            hits += bool(found) and found[0].identity == f"person-{row:07d}"
        erase_s = []
        for row in erase_ids.tolist():
            t = time.perf_counter()
            gallery.remove(f"person-{row:07d}")
            erase_s.append(time.perf_counter() - t)
        total = len(gallery)
        if kind != "qdrant-local":
            gallery.close()
            t = time.perf_counter()
            gallery = open_backend(kind, folder, url=args.qdrant_url)
            open_s: float | None = time.perf_counter() - t
        else:
            open_s = None  # in-memory local mode has nothing to reopen
    gallery.close()
    if client is not None:
        client.close()
    return {
        "backend": kind, "url": args.qdrant_url if kind == "qdrant" else None, "identities": n, "dim": args.dim, "fill_s": round(fill_s, 1),
        "enroll": {"calls": len(enroll_s), "per_s": round(len(enroll_s) / sum(enroll_s), 1),
                   "ms_p50": _ms(enroll_s, 50), "ms_p99": _ms(enroll_s, 99)},
        "search": {"calls": len(search_s), "per_s": round(len(search_s) / sum(search_s), 1),
                   "ms_p50": _ms(search_s, 50), "ms_p99": _ms(search_s, 99), "rank1": round(hits / len(search_s), 4)},
        "erase": {"calls": len(erase_s), "ms_p50": _ms(erase_s, 50), "ms_p99": _ms(erase_s, 99)},
        "open_s": None if open_s is None else round(open_s, 2),
        "identities_after": total, "lock_wait_s": round(waited, 1), "load_average_1min_at_start": round(load, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for kind in args.backends:
        with tempfile.TemporaryDirectory(prefix="facelink-gallery-bench-") as tmp:
            rows.append(measure(kind, args, Path(tmp)))
    return {
        "benchmark": "gallery-backends",
        "command": "facelink bench gallery-backends -- " + shlex.join(reporting.bench_argv(args.argv)),
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(
            shared_with="other niced background jobs on the same 2 cores; timed phases under the shared timing lock"),
        "setup": {"vectors": "random unit vectors (backend cost depends on count and dimension, not meaning)",
                  "pictures_per_identity": 1, "model": MODEL, "search_k": 1,
                  "qdrant": "qdrant-client local mode, in memory (exact Python search); no Qdrant server measured"},
        "rows": rows,
    }


def format_report(payload: dict[str, Any]) -> str:
    header = ["backend", "identities", "enroll/s", "enroll p50 ms", "enroll p99 ms", "search p50 ms", "search p99 ms",
              "search rank-1", "erase p50 ms", "reopen s"]
    rows = [[r["backend"], f"{r['identities']:,}", f"{r['enroll']['per_s']:.1f}", f"{r['enroll']['ms_p50']:.1f}",
             f"{r['enroll']['ms_p99']:.1f}", f"{r['search']['ms_p50']:.1f}", f"{r['search']['ms_p99']:.1f}",
             f"{r['search']['rank1']:.3f} ({r['search']['calls']} q)", f"{r['erase']['ms_p50']:.1f}",
             "-" if r["open_s"] is None else f"{r['open_s']:.2f}"] for r in payload["rows"]]
    return "\n".join([
        f"command: {payload['command']}",
        reporting.machine_line(payload["machine"]),
        f"date: {payload['date']}",
        f"setup: {payload['setup']['vectors']}; one picture per identity; k=1; {payload['setup']['qdrant']}",
        "",
        *reporting.markdown_table(header, rows),
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelink bench gallery-backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--identities", type=int, default=100_000, help="embedded gallery size (default 1e5)")
    parser.add_argument("--qdrant-url", help="a Qdrant engine for --backends qdrant (qdrant://, qdrants://, qdrant+local://)")
    parser.add_argument("--qdrant-identities", type=int, default=100_000, help="Qdrant local-mode gallery size (default 1e5)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512, MobileFaceNet's)")
    parser.add_argument("--enroll", type=int, default=200, help="timed enrollments (default 200)")
    parser.add_argument("--queries", type=int, default=500, help="timed searches, embedded (default 500)")
    parser.add_argument("--qdrant-queries", type=int, default=10,
                        help="timed searches, Qdrant local mode (default 10: seconds each at 1e5)")
    parser.add_argument("--erase", type=int, default=50, help="timed erasures, embedded (default 50)")
    parser.add_argument("--qdrant-erase", type=int, default=5, help="timed erasures, Qdrant local mode (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lock", type=Path, default=Path("/tmp/facelink-timing.lock"),
                        help="the shared timing lock held during the timed phases")
    parser.add_argument("--json", type=Path, default=reporting.RESULTS_DIR / "gallery_backends.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(reporting.bench_argv(argv))
    args.argv = argv
    payload = run(args)
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
