"""The embedded gallery at 1e4 to 1e6 identities: exact (flat) against HNSW and IVF, per recogniser.

    facelink bench gallery                                   # 1e4, 1e5, 1e6 x 3 models (hours)
    facelink bench gallery -- --sizes 10000 100000 --models mobilefacenet
    facelink bench gallery -- --models mobilefacenet --sizes 1000000 --kinds ivf   # the IVF row only
    facelink bench gallery -- --quick                        # a tiny run, for the tests

Per recogniser (MobileFaceNet 128-d, dlib ResNet via ONNX 128-d, EdgeFace-XS 512-d):

1. Its real LFW embeddings (benchmarks/gallery_lfw.py; cached under $FACELINK_CACHE/embeddings)
   give the genuine and impostor cosine distributions. A generator is fitted to them: random
   identity centres (a shared mean direction plus an isotropic part in k of the d dimensions,
   matching the impostor mean and spread) and per-picture isotropic noise of log-normal scale
   (matching the genuine mean and spread). Both distributions' quantiles are printed and stored,
   real against synthetic, so the fit can be judged.
2. Per size N, a gallery folder ($FACELINK_CACHE/gallery-scale/<model>-<N>) holds N synthetic
   identities (one template each) plus the LFW people of the 1:N protocol of
   benchmarks/open_set.py (people with two or more pictures, enrolled with their first). It is
   populated by a bulk SQL loader (one transaction per 50,000 identities), NOT through
   Gallery.enroll: that costs ~5 ms an identity (a synchronous SQLite commit each), 1.5 hours a
   million. Steady-state enrollment through Gallery.enroll is measured on the full gallery.
3. The HNSW index is built by the gallery's first open (niced, in a child process) and persisted
   as its snapshot; that open's time is reported as the build time (shared cores: indicative).
   The IVF index is built the same way in a copy of the gallery (<folder>-ivf: one snapshot file
   per folder), so the HNSW snapshot stays for the HNSW rows.
4. Measured per (model, N, index kind) in a child process pinned to one core (taskset -c 0,
   faiss.omp_set_num_threads(1)) under the shared timing lock: start-up (Gallery open: flat
   rebuilds from the store, HNSW reads its snapshot and reconciles it), the process's RSS after
   it, search p50/p99 of single queries (k = 5 distinct identities; half genuine queries, half
   never-enrolled people), recall@1 against exact search, enrollments and erasures a second
   through the Gallery API (each erasure scrubs the snapshot in place).
5. LFW open-set identification as the distractors grow from 1e3 to 1e6: rank-1 and DIR at
   FAR = 1% (benchmarks/open_set.py's definitions), exact and through HNSW.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import reporting

log = logging.getLogger(__name__)

MODELS = ("mobilefacenet", "dlib-resnet-onnx", "edgeface-xs")
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
CURVE_EXTRA = 1_000          # the LFW curve also has a point with this many distractors (exact only)
FAR = 0.01
K = 5
LOCK = "/tmp/facelink-timing.lock"
DEFAULT_JSON = Path("benchmarks/results/gallery_scale.json")
SEED = 2121
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
BULK_BATCH = 50_000


# -- the generator fitted to a model's real score distributions ---------------------------------------
@dataclass(frozen=True)
class Generator:
    """Identity centre c = unit(a u0 + z), z ~ N(0, I_k / k) on k of the d axes; picture
    x = unit(c + e), e ~ N(0, I_d (beta exp(s n - s^2 / 2))^2 / d), n ~ N(0, 1) per picture."""

    dim: int
    a: float
    k: int
    beta: float
    s: float

    def centres(self, rng: np.random.Generator, n: int) -> np.ndarray:
        c = np.zeros((n, self.dim), dtype=np.float32)
        c[:, : self.k] = rng.standard_normal((n, self.k), dtype=np.float32) / np.sqrt(self.k)
        c[:, -1] += self.a  # u0: the last axis (shared by every face, like a real model's mean embedding)
        return c / np.linalg.norm(c, axis=1, keepdims=True)

    def pictures(self, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
        n = len(centres)
        scale = self.beta * np.exp(self.s * rng.standard_normal((n, 1), dtype=np.float32) - self.s**2 / 2)
        x = centres + rng.standard_normal((n, self.dim), dtype=np.float32) * (scale / np.sqrt(self.dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def real_scores(vectors: np.ndarray, identities: list[str], rng: np.random.Generator,
                pairs: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines of LFW pictures: every same-person pair (at most 30 pictures a
    person) and `pairs` random different-person pairs."""
    by_person: dict[str, list[int]] = {}
    for i, who in enumerate(identities):
        by_person.setdefault(who, []).append(i)
    a, b = [], []
    for rows in by_person.values():
        rows = rows[:30]
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                a.append(rows[i])
                b.append(rows[j])
    genuine = np.einsum("ij,ij->i", vectors[a], vectors[b])
    labels = np.asarray(identities)
    x, y = rng.integers(0, len(vectors), pairs * 2), rng.integers(0, len(vectors), pairs * 2)
    keep = labels[x] != labels[y]
    x, y = x[keep][:pairs], y[keep][:pairs]
    return genuine, np.einsum("ij,ij->i", vectors[x], vectors[y])


def synthetic_scores(gen: Generator, rng: np.random.Generator, n: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    centres = gen.centres(rng, n)
    p1, p2 = gen.pictures(rng, centres), gen.pictures(rng, centres)
    return np.einsum("ij,ij->i", p1, p2), np.einsum("ij,ij->i", p1, np.roll(p2, 1, axis=0))


def fit_generator(dim: int, genuine: np.ndarray, impostor: np.ndarray) -> Generator:
    """Closed-form start (see the class), then a few corrections by simulation."""
    mu_g, mu_i, sd_i = float(np.mean(genuine)), float(np.mean(impostor)), float(np.std(impostor))
    sd_g = float(np.std(genuine))
    rng = np.random.default_rng(SEED)
    beta2 = max(1 / mu_g - 1, 1e-3)
    mu_c, sd_c = mu_i * (1 + beta2), sd_i * (1 + beta2)
    s = 0.3
    for _ in range(6):
        a2 = max(min(mu_c, 0.95), 0.0) / (1 - max(min(mu_c, 0.95), 0.0))
        k = int(np.clip(round(1 / (sd_c * (1 + a2)) ** 2), 2, dim))
        gen = Generator(dim, float(np.sqrt(a2)), k, float(np.sqrt(beta2)), s)
        g, i = synthetic_scores(gen, rng, 8000)
        # multiplicative corrections towards the real moments
        beta2 *= float(np.clip((1 / mu_g - 1) / max(1 / max(np.mean(g), 1e-3) - 1, 1e-3), 0.5, 2.0))
        mu_c *= float(np.clip(mu_i / max(np.mean(i), 1e-4), 0.5, 2.0)) if mu_i > 0 else 1.0
        sd_c *= float(np.clip(sd_i / max(np.std(i), 1e-4), 0.5, 2.0))
        s = float(np.clip(s * (sd_g / max(np.std(g), 1e-4)) ** 0.5, 0.0, 1.5))
    return gen


def quantiles(values: np.ndarray) -> dict[str, float]:
    return {f"q{q:g}": round(float(np.quantile(values, q)), 4) for q in QUANTILES} | {
        "mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}


# -- one gallery: synthetic identities + the LFW 1:N gallery ----------------------------------------------
@dataclass
class Workload:
    model_id: str
    size: int
    templates: np.ndarray        # (size, d) synthetic templates, identity i is "syn-<i>"
    genuine_queries: np.ndarray  # another picture of an enrolled synthetic identity
    genuine_of: np.ndarray       # which identity
    impostor_queries: np.ndarray  # pictures of never-enrolled synthetic people
    enroll_extra: np.ndarray     # new identities for the enrollment-throughput measurement


def workload(gen: Generator, model_id: str, size: int, queries: int, extra: int) -> Workload:
    rng = np.random.default_rng([SEED, size, gen.dim, sum(map(ord, model_id))])
    templates = np.empty((size, gen.dim), dtype=np.float32)
    genuine_of = np.sort(rng.choice(size, queries // 2, replace=False))
    genuine = np.empty((len(genuine_of), gen.dim), dtype=np.float32)
    for start in range(0, size, 100_000):
        stop = min(size, start + 100_000)
        centres = gen.centres(rng, stop - start)
        templates[start:stop] = gen.pictures(rng, centres)
        inside = (genuine_of >= start) & (genuine_of < stop)
        genuine[inside] = gen.pictures(rng, centres[genuine_of[inside] - start])
    impostor = gen.pictures(rng, gen.centres(rng, queries - len(genuine_of)))
    return Workload(model_id, size, templates, genuine, genuine_of, impostor, gen.pictures(rng, gen.centres(rng, extra)))


def bulk_load(folder: Path, model_id: str, names: list[str], vectors: np.ndarray) -> float:
    """Create the gallery with the store's own schema (Gallery.open), then insert identities and
    templates with executemany, one transaction per BULK_BATCH. Returns identities a second."""
    from facelink.cloud.gallery import Gallery
    from facelink.cloud.gallery.gallery import DB_NAME

    Gallery(folder).close()
    conn = sqlite3.connect(folder / DB_NAME, isolation_level=None)
    started = time.perf_counter()
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        now = time.time_ns() // 1000
        for start in range(0, len(names), BULK_BATCH):
            part = names[start:start + BULK_BATCH]
            conn.execute("BEGIN IMMEDIATE")
            first = (conn.execute("SELECT COALESCE(MAX(id), 0) FROM identities").fetchone()[0]) + 1
            conn.executemany("INSERT INTO identities(id, name, created_us, metadata) VALUES (?, ?, ?, '{}')",
                             ((first + i, n, now) for i, n in enumerate(part)))
            rows = vectors[start:start + len(part)].astype("<f4")
            conn.executemany(
                "INSERT INTO templates(identity_id, model_id, dim, vector, source, created_us) VALUES (?, ?, ?, ?, NULL, ?)",
                ((first + i, model_id, rows.shape[1], rows[i].tobytes(), now) for i in range(len(part))))
            conn.execute("COMMIT")
    finally:
        conn.close()
    return len(names) / (time.perf_counter() - started)


def index_config(kind: str, ef_search: int | None, nprobe: int | None = None) -> Any:
    from facelink.config import GalleryIndexConfig

    base = GalleryIndexConfig()
    if kind == "flat":  # never HNSW, no snapshot: what a gallery below the threshold does
        return base.model_copy(update={"hnsw_min_templates": 1 << 62, "snapshot": False})
    if kind == "ivf":
        return base.model_copy(update={"hnsw_min_templates": 1, "large_kind": "ivf",
                                       **({"ivf_nprobe": nprobe} if nprobe else {})})
    return base.model_copy(update={"hnsw_min_templates": 1, "large_kind": "hnsw",
                                   **({"hnsw_ef_search": ef_search} if ef_search else {})})


# -- the measured child process -------------------------------------------------------------------------
def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def probe(args: argparse.Namespace) -> int:
    """Open the gallery, time searches, enrollments and erasures; write what was seen as JSON."""
    import faiss
    from facelink.cloud.gallery import Gallery, GalleryLimits, GallerySettings

    faiss.omp_set_num_threads(1)
    spec = json.loads(Path(args.probe).read_text())
    data = np.load(spec["queries"])
    base_rss = rss_mb()
    started = time.perf_counter()
    # A million synthetic identities plus LFW's people pass GalleryLimits' default of 1,000,000.
    limits = GalleryLimits(max_identities=spec["identities"] + 10 * len(data["extra"]))
    g = Gallery(spec["folder"], limits,
                settings=GallerySettings(index=index_config(spec["kind"], spec.get("ef_search"), spec.get("nprobe"))))
    startup = time.perf_counter() - started
    loaded = g._indexes[spec["model"]]  # private: what the open loaded
    out: dict[str, Any] = {"startup_s": startup, "rss_mb": rss_mb(), "rss_before_open_mb": base_rss,
                           "index_kind": loaded.kind, "ef_search": loaded.config.hnsw_ef_search if loaded.kind == "hnsw" else None}
    if loaded.kind == "ivf":
        ivf = loaded.vectors.index
        out |= {"nprobe": int(ivf.nprobe), "nlist": int(ivf.nlist), "trained_at": loaded.vectors.trained_at}
    model, queries = spec["model"], data["queries"]
    for q in queries[:20]:  # warm-up: page faults, first-call allocations
        g.search(model, q[None], K)
    times, top = [], []
    for q in queries:
        t = time.perf_counter()
        result = g.search(model, q[None], K)[0]
        times.append(time.perf_counter() - t)
        top.append(result[0].identity if result else "")
    out["search_ms"] = [1e3 * t for t in times]
    out["top1"] = top
    ann = getattr(g._indexes[model].vectors, "index", None)  # the sweep sets efSearch / nprobe directly
    knob = (ann.hnsw, "efSearch") if loaded.kind == "hnsw" else (ann, "nprobe")
    sweep = {}
    for ef in spec.get("ef_sweep" if loaded.kind == "hnsw" else "nprobe_sweep", []) if ann is not None else []:
        default = getattr(*knob)
        setattr(*knob, ef)
        ms, names = [], []
        for q in queries:
            t = time.perf_counter()
            result = g.search(model, q[None], K)[0]
            ms.append(1e3 * (time.perf_counter() - t))
            names.append(result[0].identity if result else "")
        sweep[str(ef)] = {"search_ms": ms, "top1": names}
        setattr(*knob, default)
    out["ef_sweep"] = sweep
    if "lfw" in data:
        names, scores = [], []
        for q in data["lfw"]:
            result = g.search(model, q[None], 2)[0]
            names.append([m.identity for m in result] + [""] * (2 - len(result)))
            scores.append([m.score for m in result] + [-1.0] * (2 - len(result)))
        out["lfw_names"], out["lfw_scores"] = names, scores
    extra = data["extra"]
    t = time.perf_counter()
    for i, v in enumerate(extra):
        g.enroll(f"new-{i:06d}", model, v[None])
    out["enroll_per_s"] = len(extra) / (time.perf_counter() - t)
    t = time.perf_counter()
    for i in range(len(extra)):
        g.remove(f"new-{i:06d}")
    out["remove_per_s"] = len(extra) / (time.perf_counter() - t)
    t = time.perf_counter()
    g.close()
    out["close_s"] = time.perf_counter() - t
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def _normal_priority() -> None:
    """Measured children run at normal priority even when the benchmark itself is niced."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 0)
    except OSError:
        pass  # not permitted: the child stays niced, which the results record


def run_probe(spec: dict[str, Any], work: Path, lock: bool) -> dict[str, Any]:
    spec_file = work / "probe.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "facelink.benchmarks.gallery_scale", "--probe", str(spec_file)]
    if Path("/usr/bin/taskset").exists() or Path("/bin/taskset").exists():
        cmd = ["taskset", "-c", "0", *cmd]
    if lock:
        cmd = ["flock", LOCK, *cmd]
    subprocess.run(cmd, check=True, preexec_fn=_normal_priority)
    result = json.loads(Path(spec["out"]).read_text())
    result["niceness"] = "0 (reset for the measurement)" if os.getuid() == 0 else f"{os.nice(0)} (inherited)"
    return result


def build(folder: Path, model: str, ef_search: int | None, kind: str = "hnsw") -> float:
    """The first HNSW (IVF) open: builds the index from the store and writes the snapshot (niced child)."""
    code = ("import sys,time;from facelink.cloud.gallery import Gallery, GallerySettings;"
            "from facelink.benchmarks.gallery_scale import index_config;"
            f"t=time.perf_counter();g=Gallery({str(folder)!r},settings=GallerySettings(index=index_config({kind!r},{ef_search!r})));"
            "b=time.perf_counter()-t;g.close();print(b)")
    done = subprocess.run(["nice", "-n", "19", sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def ivf_copy(folder: Path, model: str, stamp: dict[str, Any]) -> dict[str, Any]:
    """<folder>-ivf: a copy of the gallery's store whose snapshot is the IVF index (built once)."""
    target = folder.with_name(folder.name + "-ivf")
    marker = target / "bench-ready.json"
    if marker.exists() and json.loads(marker.read_text()).get("stamp") == stamp:
        return json.loads(marker.read_text())
    if target.exists():
        subprocess.run(["rm", "-rf", str(target)], check=True)
    target.mkdir(mode=0o700)
    for p in folder.iterdir():
        if p.name.startswith("gallery.sqlite3"):
            subprocess.run(["cp", "--sparse=always", str(p), str(target / p.name)], check=True)
    log.info("building the IVF index in %s (first open, niced)", target)
    made = {"stamp": stamp, "build_s": build(target, model, None, "ivf")}
    marker.write_text(json.dumps(made))
    return made


def default_kind(identities: int) -> str:
    from facelink.config import GalleryIndexConfig

    config = GalleryIndexConfig()
    return config.large_kind if identities >= config.hnsw_min_templates else "flat"


# -- exact answers ----------------------------------------------------------------------------------------
def exact_top(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index.search(queries, k)


def open_set_point(target_scores: np.ndarray, other_scores: np.ndarray, distractor_best: np.ndarray) -> dict[str, float]:
    """rank-1 and DIR @ FAR through open_set's functions, from each genuine probe's score to its
    own entry and its best other entry, and each distractor probe's best score."""
    from .open_set import dir_at_far, rank1

    scores = np.stack([target_scores, other_scores], axis=1)
    target = np.zeros(len(scores), dtype=np.int64)
    rate, threshold = dir_at_far(scores, target, distractor_best[:, None], FAR)
    return {"rank1": rank1(scores, target), "dir_at_far": rate, "threshold": threshold}


# -- the whole run ---------------------------------------------------------------------------------------
def run_model(model: str, sizes: list[int], args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from .gallery_lfw import embed_lfw
    from .open_set import open_set_protocol

    lfw = embed_lfw(model, args.data, args.limit_people)
    genuine, impostor = real_scores(lfw.embeddings, lfw.identities, np.random.default_rng(SEED))
    gen = fit_generator(lfw.embeddings.shape[1], genuine, impostor)
    syn_g, syn_i = synthetic_scores(gen, np.random.default_rng(SEED + 1))
    fit = {"generator": asdict(gen), "real_genuine": quantiles(genuine), "synthetic_genuine": quantiles(syn_g),
           "real_impostor": quantiles(impostor), "synthetic_impostor": quantiles(syn_i),
           "real_pairs": {"genuine": int(genuine.size), "impostor": int(impostor.size)}, "lfw_cache": lfw.cache}
    protocol = open_set_protocol(lfw.names, lfw.identities)
    lfw_gallery = lfw.embeddings[protocol.gallery]
    lfw_names = [f"lfw-{lfw.identities[i]}" for i in protocol.gallery]
    probes = np.concatenate([lfw.embeddings[protocol.genuine], lfw.embeddings[protocol.distractors]])
    n_gen = len(protocol.genuine)
    true_scores = np.einsum("ij,ij->i", lfw.embeddings[protocol.genuine], lfw_gallery[protocol.target])
    rows, curve = [], []
    for size in sorted(set(sizes) | ({CURVE_EXTRA} if not args.quick else set())):
        w = workload(gen, lfw.model_id, size, args.queries, args.enrollments)
        everything = np.concatenate([w.templates, lfw_gallery])
        # exact LFW open set: one template per identity, so top-2 templates are top-2 identities
        scores, ids = exact_top(everything, probes, 2)
        target_pos = size + protocol.target
        own_first = ids[:n_gen, 0] == target_pos
        other = np.where(own_first, scores[:n_gen, 1], scores[:n_gen, 0])
        point = {"distractors": size, "gallery": len(everything), "exact": open_set_point(true_scores, other, scores[n_gen:, 0])}
        curve.append(point)
        if size not in sizes:
            continue
        queries = np.concatenate([w.genuine_queries, w.impostor_queries])
        _, exact_ids = exact_top(everything, queries, 1)
        all_names = np.array([f"syn-{i:07d}" for i in range(size)] + lfw_names)
        exact_top1 = all_names[exact_ids[:, 0]]
        folder = root / f"{lfw.model_id.replace('@', '_')}-{size}"
        marker = folder / "bench-ready.json"
        stamp = {"seed": SEED, "generator": asdict(gen), "lfw_people": len(lfw_names), "version": 1}
        if not marker.exists() or json.loads(marker.read_text()).get("stamp") != stamp:
            if folder.exists():
                subprocess.run(["rm", "-rf", str(folder)], check=True)
            log.info("%s: bulk-loading %d identities into %s", model, len(all_names), folder)
            rate = bulk_load(folder, lfw.model_id, all_names.tolist(), everything)
            log.info("%s: building the HNSW index of %d templates (first open, niced)", model, len(all_names))
            build_s = build(folder, lfw.model_id, args.ef_search)
            marker.write_text(json.dumps({"stamp": stamp, "bulk_per_s": rate, "build_s": build_s}))
        made = json.loads(marker.read_text())
        made_ivf = ivf_copy(folder, lfw.model_id, stamp) if "ivf" in args.kinds else {}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for kind in args.kinds:
                where = folder.with_name(folder.name + "-ivf") if kind == "ivf" else folder
                n_q = len(queries) if kind != "flat" else min(len(queries), max(100, int(4e9 // (len(everything) * gen.dim))))
                take = np.r_[0:n_q // 2, len(w.genuine_queries):len(w.genuine_queries) + n_q - n_q // 2]
                payload = {"queries": queries[take], "extra": w.enroll_extra}
                if kind != "flat":
                    payload["lfw"] = probes
                np.savez(work / "q.npz", **payload)
                log.info("%s N=%d %s: measuring (timing lock, one core)", model, size, kind)
                r = run_probe({"folder": str(where), "model": lfw.model_id, "kind": kind, "queries": str(work / "q.npz"),
                               "identities": len(everything),
                               "out": str(work / "out.json"), "ef_search": args.ef_search, "nprobe": args.nprobe,
                               "ef_sweep": args.ef_sweep, "nprobe_sweep": args.nprobe_sweep}, work, not args.no_lock)
                ms = np.asarray(r.pop("search_ms"))
                agree = np.asarray(r.pop("top1")) == exact_top1[take]
                # Mated queries whose exact answer is their own identity: where a miss costs a match.
                right = exact_top1[take][: n_q // 2] == all_names[w.genuine_of[take[: n_q // 2]]]
                sweep = {ef: {"search_p50_ms": float(np.percentile(v["search_ms"], 50)),
                              "search_p99_ms": float(np.percentile(v["search_ms"], 99)),
                              "recall_at_1": float(np.mean(np.asarray(v["top1"]) == exact_top1[take])),
                              "recall_at_1_genuine": float(np.mean((np.asarray(v["top1"]) == exact_top1[take])[:n_q // 2])),
                              "recall_at_1_exact_right": float(np.mean((np.asarray(v["top1"]) == exact_top1[take])[:n_q // 2][right]))}
                         for ef, v in r.pop("ef_sweep").items()}
                half = n_q // 2
                row = {"model": lfw.model_id, "dim": gen.dim, "identities": len(everything), "synthetic": size,
                       "kind": kind, "default_kind": default_kind(len(everything)),
                       "queries": int(n_q), "search_p50_ms": float(np.percentile(ms, 50)), "search_p99_ms": float(np.percentile(ms, 99)),
                       "recall_at_1": float(agree.mean()), "recall_at_1_genuine": float(agree[:half].mean()),
                       "recall_at_1_impostor": float(agree[half:].mean()),
                       "exact_right_fraction": float(right.mean()), "recall_at_1_exact_right": float(agree[:half][right].mean()),
                       "bulk_load_per_s": made["bulk_per_s"], "hnsw_build_s": made["build_s"] if kind == "hnsw" else None,
                       "ivf_build_s": made_ivf.get("build_s") if kind == "ivf" else None,
                       "snapshot_mb": (sum(p.stat().st_size for p in where.glob("index-*.snap")) / 2**20) if kind != "flat" else None,
                       "ef_search": r.get("ef_search"), ("nprobe_sweep" if kind == "ivf" else "ef_sweep"): sweep,
                       **{k: v for k, v in r.items() if not k.startswith("lfw_")}}
                rows.append(row)
                if "lfw_names" in r:
                    names, sc = np.asarray(r["lfw_names"]), np.asarray(r["lfw_scores"])
                    want = np.asarray(lfw_names)[protocol.target]
                    first = names[:n_gen, 0] == want
                    second = names[:n_gen, 1] == want
                    other_h = np.where(first, sc[:n_gen, 1], sc[:n_gen, 0])
                    true_h = np.where(first, sc[:n_gen, 0], np.where(second, sc[:n_gen, 1], true_scores))
                    point[kind] = open_set_point(true_h, other_h, sc[n_gen:, 0])
                print(_row_line(row), flush=True)
    return {"model": lfw.model_id, "manifest": model, "fit": fit, "rows": rows, "open_set": curve,
            "lfw": {"enrolled": len(lfw_names), "genuine_probes": n_gen, "distractor_probes": len(protocol.distractors)}}


def _row_line(row: dict[str, Any]) -> str:
    return (f"{row['model']:<22} N={row['identities']:>8} {row['kind']:<4} start {row['startup_s']:6.2f} s  "
            f"p50 {row['search_p50_ms']:7.3f} ms  p99 {row['search_p99_ms']:7.3f} ms  recall@1 {row['recall_at_1']:.4f}  "
            f"RSS {row['rss_mb']:7.0f} MB  enroll {row['enroll_per_s']:6.0f}/s  erase {row['remove_per_s']:6.0f}/s")


def format_report(payload: dict[str, Any]) -> str:
    lines = [f"command: {payload['command']}", reporting.machine_line(payload["machine"]), f"date: {payload['date']}",
             "note: " + payload["note"], ""]
    for m in payload["models"]:
        fit = m["fit"]
        lines.append(f"## {m['model']}: score distributions, real LFW vs synthetic (generator {fit['generator']})")
        header = ["", *[k for k in fit["real_genuine"]]]
        lines += reporting.markdown_table(header, [[name, *[f"{v:.3f}" for v in fit[name].values()]]
                                                   for name in ("real_genuine", "synthetic_genuine", "real_impostor", "synthetic_impostor")])
        lines.append("")
        lines += reporting.markdown_table(
            ["identities", "index", "start-up s", "RSS MB", "p50 ms", "p99 ms", "recall@1 (gen/imp)", "enroll/s", "erase/s", "build s"],
            [[f"{r['identities']:,}", r["kind"] + (" *" if r["kind"] == r["default_kind"] else ""), f"{r['startup_s']:.2f}",
              f"{r['rss_mb']:.0f}", f"{r['search_p50_ms']:.3f}", f"{r['search_p99_ms']:.3f}",
              f"{r['recall_at_1']:.4f} ({r['recall_at_1_genuine']:.3f}/{r['recall_at_1_impostor']:.3f})",
              f"{r['enroll_per_s']:.0f}", f"{r['remove_per_s']:.0f}", f"{built:.0f}" if (built := r["hnsw_build_s"] or r.get("ivf_build_s")) else ""]
             for r in m["rows"]])
        lines.append("")
        lines.append(f"LFW open set ({m['lfw']['enrolled']} people enrolled, {m['lfw']['genuine_probes']} genuine and "
                     f"{m['lfw']['distractor_probes']} never-enrolled probes) as synthetic distractors grow:")
        approx = [k for k in ("hnsw", "ivf") if any(k in p for p in m["open_set"])]
        lines += reporting.markdown_table(
            ["distractors", "rank-1 exact", "DIR@FAR1% exact", "threshold",
             *[f"{c} {k.upper()}" for k in approx for c in ("rank-1", "DIR@FAR1%")]],
            [[f"{p['distractors']:,}", f"{p['exact']['rank1']:.4f}", f"{p['exact']['dir_at_far']:.4f}", f"{p['exact']['threshold']:.3f}",
              *[f"{p[k][c]:.4f}" if k in p else "" for k in approx for c in ("rank1", "dir_at_far")]]
             for p in m["open_set"]])
        lines.append("")
    lines.append("* the kind GalleryIndexConfig's default threshold picks at that size")
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in payload["models"]:
        pts = m["open_set"]
        x = [p["distractors"] for p in pts]
        for ax, key in zip(axes, ("rank1", "dir_at_far")):
            line, = ax.plot(x, [p["exact"][key] for p in pts], marker="o", label=f"{m['model']} exact")
            for kind, style in (("hnsw", "--"), ("ivf", ":")):
                h = [(p["distractors"], p[kind][key]) for p in pts if kind in p]
                if h:
                    ax.plot(*zip(*h), marker="x", linestyle=style, color=line.get_color(), label=f"{m['model']} {kind.upper()}")
    for ax, title in zip(axes, ("rank-1 identification", f"DIR at FAR = {FAR:.0%}")):
        ax.set_xscale("log")
        ax.set_xlabel("synthetic distractors in the gallery")
        ax.set_title(f"LFW open set: {title}")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facelink bench gallery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="synthetic identities per gallery")
    p.add_argument("--models", nargs="+", default=list(MODELS), help="recogniser manifest names")
    p.add_argument("--queries", type=int, default=1000, help="timed single queries per gallery (half genuine)")
    p.add_argument("--enrollments", type=int, default=200, help="identities enrolled then erased through the API")
    p.add_argument("--ef-search", type=int, help="HNSW efSearch (default: GalleryIndexConfig's)")
    p.add_argument("--ef-sweep", type=int, nargs="*", default=[32, 64, 256, 512],
                   help="also measure these efSearch values (HNSW rows' ef_sweep)")
    p.add_argument("--kinds", nargs="+", choices=("flat", "hnsw", "ivf"), default=["flat", "hnsw"],
                   help="index kinds measured (ivf: in a copy of each gallery, built once)")
    p.add_argument("--nprobe", type=int, help="IVF lists probed (default: GalleryIndexConfig's)")
    p.add_argument("--nprobe-sweep", type=int, nargs="*", default=[16, 32, 64, 128, 256],
                   help="also measure these nprobe values (IVF rows' nprobe_sweep)")
    p.add_argument("--data", help="LFW folder (default: $FACELINK_DATA, ../shared/data/lfw)")
    p.add_argument("--limit-people", type=int, help="only the first N LFW people by name (quick runs)")
    p.add_argument("--galleries", type=Path, help="where the galleries are kept (default $FACELINK_CACHE/gallery-scale)")
    p.add_argument("--quick", action="store_true", help="tiny: 2000 identities, 40 LFW people, 100 queries")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK} around measurements")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument("--png", type=Path, help="plot (default: next to --json)")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    args = build_parser().parse_args(argv)
    if args.probe:
        return probe(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.sizes, args.queries, args.enrollments = [2000], min(args.queries, 100), min(args.enrollments, 20)
        args.limit_people = args.limit_people or 40
    from facelink.config import cache_dir
    from facelink.datasets import DatasetNotFoundError

    root = args.galleries or cache_dir() / "gallery-scale"
    root.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["facelink", "bench", "gallery", *argv])
    models: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for model in args.models:
        try:
            models.append(run_model(model, args.sizes, args, root))
        except DatasetNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except (FileNotFoundError, RuntimeError) as error:  # weights not reachable: say so, go on
            log.warning("%s: skipped (%s)", model, error)
            skipped[model] = str(error)
        write(args, command, root, models, skipped)  # each model as it finishes: a long run keeps its work
    payload = write(args, command, root, models, skipped)
    print(format_report(payload))
    print(f"wrote {args.json} and {args.png or args.json.with_suffix('.png')}")
    return 0


def write(args: argparse.Namespace, command: str, root: Path, models: list[dict[str, Any]],
          skipped: dict[str, str]) -> dict[str, Any]:
    payload = {
        "benchmark": "gallery_scale",
        "command": command,
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(shared="2 cores shared with other niced background jobs; measurements "
                                          "pinned to core 0 under the timing lock"),
        "note": ("synthetic identities fitted per model to real LFW score distributions; galleries bulk-loaded by SQL "
                 "(enrollment through the API is the enroll/s column); search k=5, one thread, one core"),
        "galleries": str(root),
        "k": K,
        "far": FAR,
        "models": models,
        "skipped": skipped,
    }
    reporting.write_results(args.json, payload)
    plot(payload, args.png or args.json.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    sys.exit(main())
