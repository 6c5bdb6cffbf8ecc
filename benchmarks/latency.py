"""Latency, size and memory of each model on each backend this machine has, and of the edge path.

Per model (MobileFaceNet, YuNet, the query model, the encoder and decoder of both bundled learned codecs, any
manifest given with --model, `BUNDLE:COMPONENT` for one file of a bundle), precision (fp32, fp16, int8:
exported by the same code as `facelink export`, reused when unchanged) and backend available
here (ONNX Runtime CPU; ONNX Runtime CUDA / TensorRT execution providers and native TensorRT
where installed), at 1 thread and all cores:

* p50 / p99 latency of one call at batch 1 and at every batch in --batches (dynamic-batch
  exports), and the batch with the lowest time per input ("best batch");
* model size on disk;
* peak memory: each configuration runs in its own process, which reports its peak resident
  set (VmHWM) and how much of it the model and its runs added over the imports.

The edge path per face runs in its own process too: detect (YuNet through OpenCV, as on the
board) + align to the canonical crop + encode with each --codec (any id `create_codec` knows,
`ID@QUALITY`; the learned codec runs its encoder exported at each --edge-precision and, as the
edge does by default, codes the crop's border ring at quality 1 unless --no-crop-border) + the query
model's embedding (align to its template + embed, at the same precision) + build and serialise
the FaceObservation. "align + encode + query" is the issue's edge-path figure.

Numbers are only worth quoting from a quiet machine: every process here competes for the
same cores with whatever else runs.

    facelink bench latency
    facelink bench latency -- --model mobilefacenet --precision int8 --threads 1 --batches 1,8
    facelink bench latency -- --model none --codec learned@3 --edge-precision int8 --threads 1
    facelink bench latency -- --seconds 0.2 --batches 1,2 --edge-frames 10   # a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facelink.config import DEFAULT_QUERY_MODEL, cache_dir

from . import reporting

DEFAULT_JSON = Path("benchmarks/results/latency.json")
DEFAULT_QUERY = DEFAULT_QUERY_MODEL
DEFAULT_BATCHES = (1, 2, 4, 8, 16)
DEFAULT_FRAME = (640, 480)  # a VGA camera frame; YuNet needs multiples of 32
BACKEND_PROVIDERS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}
GPU_BACKENDS = ("ort-cuda", "ort-tensorrt", "tensorrt")


def _bundled_codecs() -> list[str]:
    """Every bundled learned codec's name, the edge's default first."""
    from facelink.runtime.codecs.learned import codec_manifests

    return sorted(codec_manifests(), key=lambda name: (name != "default", name))


def default_models() -> tuple[str, ...]:
    """The recognisers and detector, then each bundled learned codec's encoder and decoder."""
    from facelink.runtime.codecs.learned import CODEC_PREFIX

    codecs = [f"{CODEC_PREFIX}{name}:{part}" for name in _bundled_codecs() for part in ("encoder", "decoder")]
    return ("mobilefacenet", "yunet", DEFAULT_QUERY_MODEL, *codecs)


def default_codecs() -> tuple[str, ...]:
    """JPEG, and every bundled learned codec at its bundle's default quality (`learned` = 'default')."""
    from facelink.runtime.codecs import LEARNED_ALIAS

    learned = (LEARNED_ALIAS if name == "default" else f"{LEARNED_ALIAS}:{name}" for name in _bundled_codecs())
    return ("jpeg@90", *learned)


@dataclass(frozen=True)
class ModelRun:
    """One configuration, run in a worker process."""

    model: str
    precision: str
    backend: str
    file: str
    threads: int
    batch: int
    shapes: dict[str, list[int]]  # input name -> shape of ONE input (no batch)
    dtypes: dict[str, str]
    seconds: float
    min_iters: int


@dataclass(frozen=True)
class EdgeRun:
    codec: str  # what `create_codec` takes (a learned codec: `learned:<exported manifest>`)
    label: str  # the codec as the report names it
    quality: int | None
    precision: str
    query: str | None  # the query model's manifest (exported at `precision`), or None
    threads: int
    frames: int
    crop_border: bool = False  # a learned codec codes the crop's border ring at quality 1 (the edge's default)


# -- measuring (worker side) -------------------------------------------------------------------------
def _rss_bytes() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_bytes()


def _peak_bytes() -> int:
    """Peak resident set of this process. Linux's ru_maxrss carries the parent's peak across
    fork + exec, so VmHWM (the high-water mark of this process's own memory) comes first."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _timed(call, seconds: float, min_iters: int) -> np.ndarray:  # noqa: ANN001
    warmup_end = time.perf_counter() + min(0.5, seconds / 4)
    call()
    while time.perf_counter() < warmup_end:
        call()
    times = []
    end = time.perf_counter() + seconds
    while len(times) < min_iters or time.perf_counter() < end:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return np.array(times) * 1e3


def measure_model(run: ModelRun) -> dict:
    from facelink.config import BackendConfig
    from facelink.runtime.backends import create_backend

    baseline = _rss_bytes()
    providers = (BACKEND_PROVIDERS[run.backend],) if run.backend in BACKEND_PROVIDERS else ()
    config = BackendConfig(intra_op_threads=run.threads, providers=providers or BackendConfig().providers)
    backend = create_backend(run.file, config)
    rng = np.random.default_rng(0)
    inputs = {
        name: rng.standard_normal((run.batch, *shape)).astype(run.dtypes[name])
        for name, shape in run.shapes.items()
    }
    times = _timed(lambda: backend.run(inputs), run.seconds, run.min_iters)
    peak = _peak_bytes()
    return {
        **asdict(run),
        "iterations": int(times.size),
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "p50_ms_per_input": float(np.percentile(times, 50) / run.batch),
        "inputs_per_s": float(run.batch * 1e3 / np.percentile(times, 50)),
        "peak_rss_mb": peak / 1e6,
        "model_rss_mb": (peak - baseline) / 1e6,
        "size_mb": Path(run.file).stat().st_size / 1e6,
    }


def measure_edge(run: EdgeRun) -> dict:
    import cv2

    from facelink.config import BackendConfig, CanonicalCrop, CropRegionCoding, DetectorConfig
    from facelink.datasets import LFW
    from facelink.edge.pipeline import box_to_proto, landmarks_to_proto
    from facelink.runtime.alignment import canonical_template, warp_face
    from facelink.runtime.codecs import create_codec, default_quality
    from facelink.runtime.codecs.face_aware import AlignedCropCodec
    from facelink.runtime.codecs.learned import LearnedFaceCodec
    from facelink.runtime.detection import create_detector
    from facelink.runtime.recognition import create_recognizer
    from facelink.v1 import common_pb2, recognition_pb2

    cv2.setNumThreads(run.threads)
    detector = create_detector(DetectorConfig())
    backend = BackendConfig(intra_op_threads=run.threads)
    if run.codec.startswith("learned:"):  # its ONNX sessions at the run's thread count
        codec = LearnedFaceCodec.load(run.codec.partition(":")[2], run.quality or default_quality(run.codec), backend)
        if run.crop_border:
            codec = AlignedCropCodec(codec, CropRegionCoding())
    else:
        codec = create_codec(run.codec, quality=run.quality)
    query = create_recognizer(run.query, backend) if run.query else None
    crop = CanonicalCrop()
    template = canonical_template(crop.size, crop.scale)
    pictures = LFW.locate().training_images()[: run.frames]
    stages: dict[str, list[float]] = {"detect per face": [], "align": [], "encode": []}
    if query is not None:
        stages["query embedding"] = []
    stages |= {"serialise": [], "align + encode + query": [], "total": []}
    sizes = []
    for path in pictures:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        started = time.perf_counter()
        faces = detector.detect(image)
        detect = (time.perf_counter() - started) * 1e3 / max(len(faces), 1)
        for face in faces:
            t0 = time.perf_counter()
            canonical, points = warp_face(image, face.landmarks, template)
            t1 = time.perf_counter()
            data = codec.encode(canonical)
            t2 = time.perf_counter()
            if query is not None:
                query.embed(image, face.landmarks)
            t3 = time.perf_counter()
            wire = recognition_pb2.FaceObservation(
                camera_id="bench",
                box=box_to_proto(face.box),
                landmarks=landmarks_to_proto(face.landmarks),
                payload_landmarks=landmarks_to_proto(points),
                face=common_pb2.EncodedFace(codec_id=codec.codec_id, codec_version=codec.version, data=data),
            ).SerializeToString()
            t4 = time.perf_counter()
            times = {
                "detect per face": detect,
                "align": (t1 - t0) * 1e3,
                "encode": (t2 - t1) * 1e3,
                "query embedding": (t3 - t2) * 1e3,
                "serialise": (t4 - t3) * 1e3,
                "align + encode + query": (t3 - t0) * 1e3,
                "total": detect + (t4 - t0) * 1e3,
            }
            for key, values in stages.items():
                values.append(times[key])
            sizes.append(len(wire))
    if not sizes:
        raise RuntimeError("the edge benchmark found no face in its pictures")
    return {
        **asdict(run),
        "faces": len(sizes),
        "detector": getattr(detector, "name", "detector"),
        "query_model": query.model_id if query is not None else None,
        "p50_ms": {k: float(np.percentile(v, 50)) for k, v in stages.items()},
        "p99_ms": {k: float(np.percentile(v, 99)) for k, v in stages.items()},
        "mean_observation_bytes": float(np.mean(sizes)),
        "peak_rss_mb": _peak_bytes() / 1e6,
    }


def _worker(kind: str, spec: str) -> int:
    data = json.loads(spec)
    result = measure_model(ModelRun(**data)) if kind == "model" else measure_edge(EdgeRun(**data))
    print(json.dumps(result))
    return 0


def _in_subprocess(kind: str, spec: object) -> dict:
    """Run one measurement in a fresh process, so its peak memory is its own."""
    done = subprocess.run(
        [sys.executable, "-m", "facelink.benchmarks.latency", f"--worker-{kind}", json.dumps(asdict(spec))],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{kind} measurement {spec} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- planning (parent side) --------------------------------------------------------------------------
def available_backends() -> list[str]:
    import onnxruntime as ort

    found = [
        name for name, provider in BACKEND_PROVIDERS.items() if provider in ort.get_available_providers()
    ]
    try:
        import tensorrt  # noqa: F401

        found.append("tensorrt")
    except ImportError:
        pass
    return found


def plan_runs(args: argparse.Namespace, backends: list[str]) -> tuple[list[ModelRun], list[str]]:
    """Export every (model, precision) needed, and list the runs; also returns notes."""
    import onnx

    from facelink.export.deploy import graph
    from facelink.export.deploy.pipeline import ExportOptions, export_engine, export_onnx
    from facelink.export.deploy.source import resolve_source

    out = cache_dir() / "exports"
    cores = reporting.cpu_count()
    thread_counts = sorted({1, cores} if args.threads is None else {args.threads})
    runs, notes = [], []
    models = [] if args.model == ["none"] else args.model or default_models()
    for model in models:
        source = resolve_source(model)
        is_detector = source.task == "detection"
        for precision in args.precision or ["fp32", "fp16", "int8"]:
            options = ExportOptions(
                precision=precision,
                batch="dynamic",
                calib_count=args.calib_count,
                input_size=tuple(args.frame) if is_detector else None,  # a camera's fixed frame
                command="facelink bench latency (export)",
            )
            exported = export_onnx(source, options, out, reuse=True)
            onnx_model = onnx.load(exported.path)
            specs = graph.inputs(onnx_model)
            width, height = _spatial_size(source, args.frame)
            shapes = {
                s.name: [
                    d if isinstance(d, int) else (height if i == 1 else width)
                    for i, d in enumerate(s.shape[1:])
                ]
                for s in specs
            }
            dtypes = {s.name: str(s.dtype) for s in specs}
            for backend in backends:
                file = exported.path
                if backend == "tensorrt":
                    file = export_engine(source, options, out).path
                for threads in [1] if backend in GPU_BACKENDS else thread_counts:
                    for batch in args.batches:
                        runs.append(
                            ModelRun(
                                source.label,
                                precision,
                                backend,
                                str(file),
                                threads,
                                batch,
                                shapes,
                                dtypes,
                                args.seconds,
                                args.min_iters,
                            )
                        )
        if is_detector:
            notes.append(
                f"{source.label}: {args.frame[0]}x{args.frame[1]} frames (the edge runs YuNet through OpenCV; "
                "these rows are the raw network through ONNX Runtime / TensorRT)"
            )
        if source.codec_part:
            side = _spatial_size(source, args.frame)[0]
            what = "canonical face" if source.codec_part == "encoder" else "latent of a canonical face"
            notes.append(f"{source.label}: one {side}x{side} {what} per input")
    return runs, notes


def _spatial_size(source, frame: tuple[int, int]) -> tuple[int, int]:  # noqa: ANN001 - a ModelSource
    """Width, height of a model's dynamic image dimensions: a detector sees camera frames; a
    codec encoder the canonical crop, its decoder that crop's latent (the crop / the stride)."""
    from facelink.config import CanonicalCrop

    if source.codec_part is None:
        return frame
    side = CanonicalCrop().size
    if source.codec_part == "decoder":
        side = -(-side // int(source.data["stride"]))
    return side, side


def plan_edge(args: argparse.Namespace) -> list[EdgeRun]:
    """One edge run per codec, precision and thread count; exports what each precision needs."""
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source
    from facelink.runtime.codecs import LEARNED_ALIAS, default_quality
    from facelink.runtime.codecs.learned import CODEC_PREFIX, load_codec_manifest

    codecs = [c for c in (args.codec or default_codecs()) if c != "none"]
    if not codecs:
        return []
    out = cache_dir() / "exports"
    thread_counts = sorted({1, reporting.cpu_count()} if args.threads is None else {args.threads})

    def exported(model: str, precision: str) -> str:
        options = ExportOptions(precision=precision, calib_count=args.calib_count, command="facelink bench latency (export)")
        return str(export_onnx(resolve_source(model), options, out, reuse=True).manifest_path)

    runs = []
    for spec in codecs:
        codec, _, quality = spec.partition("@")
        for precision in args.edge_precision or ["fp32", "int8"]:
            wire, ring = codec, False
            level = int(quality) if quality else default_quality(codec)  # named in the report and the JSON
            if codec == LEARNED_ALIAS or codec.startswith(LEARNED_ALIAS + ":"):
                name = codec.partition(":")[2] or "default"
                wire = f"{LEARNED_ALIAS}:{exported(f'{CODEC_PREFIX}{name}:encoder', precision)}"
                ring = args.crop_border
                if ring:  # as the edge: the face at the bundle's border_ring_quality unless @QUALITY says
                    level = int(quality) if quality else (load_codec_manifest(name)[0].border_ring_quality or level)
            query = None if args.query == "none" else exported(args.query, precision)
            for threads in thread_counts:
                runs.append(EdgeRun(wire, codec, level, precision, query, threads, args.edge_frames, ring))
    return runs


# -- report --------------------------------------------------------------------------------------------
def summarise(rows: list[dict]) -> list[list[str]]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["precision"], row["backend"], row["threads"]), []).append(row)
    table = []
    for (model, precision, backend, threads), group in groups.items():
        single = next((r for r in group if r["batch"] == 1), None)
        best = min(group, key=lambda r: r["p50_ms_per_input"])
        table.append(
            [
                model,
                precision,
                backend,
                str(threads),
                "-" if single is None else f"{single['p50_ms']:.2f} / {single['p99_ms']:.2f}",
                f"{best['batch']}: {best['p50_ms_per_input']:.2f} ({best['inputs_per_s']:.0f}/s)",
                f"{best['size_mb']:.2f}",
                f"{max(r['peak_rss_mb'] for r in group):.0f}",
                f"{max(r['model_rss_mb'] for r in group):.0f}",
            ]
        )
    return table


def format_report(payload: dict) -> str:
    machine = payload["machine"]
    lines = [
        f"command: {payload['command']}",
        f"{reporting.machine_line(machine)}; date: {payload['date']}",
        "",
        *reporting.markdown_table(
            [
                "model",
                "precision",
                "backend",
                "threads",
                "batch 1 p50 / p99 ms",
                "best batch: ms per input (throughput)",
                "MB on disk",
                "peak RSS MB",
                "RSS added by model MB",
            ],
            summarise(payload["rows"]),
        ),
        "",
        "batch 1: one call, one input; best batch: the batch with the lowest p50 time per input among "
        + ",".join(map(str, payload["batches"]))
        + f"; each configuration ran >= {payload['seconds']} s in its own process.",
        *payload["notes"],
    ]
    if payload["edge"]:
        edge = payload["edge"]
        stages = list(edge[0]["p50_ms"])
        query = next((e["query_model"] for e in edge if e["query_model"]), None)
        lines += [
            "",
            f"edge path per face ({edge[0]['detector']} + canonical crop + codec"
            + (f" + {query} embedding" if query else "")
            + " + FaceObservation), p50 ms (p99 for the total); precision applies to the learned "
            "encoder and the query model:",
            "",
            *reporting.markdown_table(
                ["codec", "precision", "threads", "faces", *stages, "total p99", "bytes on the wire"],
                [
                    [
                        e["label"] + (f" q{e['quality']}" if e["quality"] else "")
                        + (", border ring q1" if e.get("crop_border") else ""),
                        e["precision"],
                        str(e["threads"]),
                        str(e["faces"]),
                        *[f"{e['p50_ms'][s]:.2f}" for s in stages],
                        f"{e['p99_ms']['total']:.2f}",
                        f"{e['mean_observation_bytes']:.0f}",
                    ]
                    for e in edge
                ],
            ),
        ]
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        help="manifest name or path, BUNDLE:COMPONENT for one file of a bundle; repeat; 'none' skips the "
        f"model rows (default: {', '.join(default_models())})",
    )
    p.add_argument(
        "--precision", action="append", choices=["fp32", "fp16", "int8"], help="repeat (default: all three)"
    )
    p.add_argument(
        "--backend",
        action="append",
        help="limit to these backends: ort-cpu, ort-cuda, ort-tensorrt, tensorrt "
        "(default: every one available here)",
    )
    p.add_argument(
        "--batches",
        type=lambda s: [int(b) for b in s.split(",")],
        default=list(DEFAULT_BATCHES),
        help="batch sizes, comma-separated (default 1,2,4,8,16)",
    )
    p.add_argument("--threads", type=int, help="one thread count (default: 1 and all cores)")
    p.add_argument("--frame", type=_size, default=DEFAULT_FRAME, help="detector input WxH (default 640x480)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per configuration (default 3)")
    p.add_argument("--min-iters", type=int, default=20, help="at least this many timed calls (default 20)")
    p.add_argument(
        "--calib-count", type=int, default=256, help="int8 calibration faces/pictures (default 256)"
    )
    p.add_argument(
        "--codec",
        action="append",
        help="edge path codec as ID@QUALITY, repeat (default: "
        f"{', '.join(default_codecs())}); 'none' skips the edge path",
    )
    p.add_argument(
        "--edge-precision",
        action="append",
        choices=["fp32", "fp16", "int8"],
        help="precision of the learned encoder and query model on the edge path, repeat (default: fp32, int8)",
    )
    p.add_argument(
        "--query", default=DEFAULT_QUERY, help=f"edge path query model, 'none' to leave it out (default {DEFAULT_QUERY})"
    )
    p.add_argument(
        "--edge-frames", type=int, default=300, help="LFW pictures for the edge path (default 300)"
    )
    p.add_argument(
        "--crop-border", action=argparse.BooleanOptionalAction, default=True,
        help="learned codecs on the edge path code the crop's border ring at quality 1, the face at the "
        "bundle's border_ring_quality, as the edge does by default (default on)",
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    p.add_argument("--worker-model", help=argparse.SUPPRESS)
    p.add_argument("--worker-edge", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    args = build_parser().parse_args(argv)
    if args.worker_model or args.worker_edge:
        return _worker("model" if args.worker_model else "edge", args.worker_model or args.worker_edge)
    command = shlex.join(["facelink", "bench", "latency", *argv])

    backends = available_backends()
    if args.backend:
        unknown = sorted(set(args.backend) - set(backends))
        if unknown:
            print(
                f"error: backend(s) {', '.join(unknown)} not available here (available: {', '.join(backends)})",
                file=sys.stderr,
            )
            return 2
        backends = [b for b in backends if b in args.backend]
    runs, notes = plan_runs(args, backends)
    rows = []
    for index, run in enumerate(runs, 1):
        print(
            f"[{index}/{len(runs)}] {run.model} {run.precision} {run.backend} threads={run.threads} batch={run.batch}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(_in_subprocess("model", run))
    edge = []
    for run in plan_edge(args):
        print(f"edge path: {run.label} {run.precision} threads={run.threads}", file=sys.stderr, flush=True)
        edge.append(_in_subprocess("edge", run))
    payload = {
        "benchmark": "latency",
        "command": command,
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(backends=backends),
        "batches": args.batches,
        "seconds": args.seconds,
        "notes": notes,
        "rows": rows,
        "edge": edge,
    }
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
