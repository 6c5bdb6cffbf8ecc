"""`facelink`: one command, with a subcommand for each job.

    facelink demo                              end-to-end on LFW: server + edge on loopback
    facelink cloud serve --gallery DIR         run the gRPC service
    facelink cloud enroll NAME PICTURE...      add a person to a running server's gallery
    facelink cloud token create NAME --scope S  a credential for a device, a person or a service
    facelink certs ca|server|device            a development PKI for TLS and mutual TLS
    facelink edge --source SRC --server ADDR   stream faces from a camera, video, RTSP or folder
    facelink export MODEL --format onnx|engine|triton [--half | --int8]
                                               export a bundled model for deployment
    facelink export manifest PATH              check a model manifest against its weights
    facelink bench NAME                        run a benchmark from benchmarks/
    facelink train JOB                         train, bundle or inspect facelink's own models

Every subcommand has --help with examples.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .cli_certs import add_certs_parser
from .cli_common import FORMATTER as _FORMATTER
from .cli_common import add_common as _add_common
from .cli_cloud import add_cloud_parser


# -- demo ---------------------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, main

    return main(
        DemoOptions(
            data=args.data,
            identities=args.identities,
            probes_per_identity=args.probes,
            distractors=args.distractors,
            seed=args.seed,
            codec=args.codec,
            quality=args.quality,
            recognizer=args.recognizer,
            threshold=args.threshold,
            json_path=args.json,
        )
    )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from .config import EdgeConfig

    p = sub.add_parser(
        "demo",
        help="end-to-end demo on LFW: server and edge on loopback, summary table",
        formatter_class=_FORMATTER,
        description="""\
Start the gRPC service on 127.0.0.1 with a fresh gallery in a temporary folder, enroll one
picture each of N LFW people who have two or more pictures, stream their other pictures and
pictures of people never enrolled through the edge pipeline, and print:
rank-1 accuracy on enrolled people, correct rejection of strangers, bytes per face, and
p50/p95 end-to-end latency.

LFW is looked for in: --data, then $FACELINK_DATA, then ../shared/data/lfw, then the cache
(~/.cache/facelink/lfw), and downloaded there (official archive, checksum verified) if absent.""",
        epilog="""\
examples:
  facelink demo
  facelink demo --identities 500 --probes 5 --json benchmarks/results/demo.json
  facelink demo --codec webp --quality 80
  facelink demo --recognizer dlib-resnet        # dlib's ResNet instead of MobileFaceNet""",
    )
    p.add_argument("--data", help="LFW folder (the one holding pairs.txt, or the image folder)")
    p.add_argument("--identities", type=int, default=300, help="people enrolled (default 300)")
    p.add_argument("--probes", type=int, default=3, help="probe pictures per enrolled person (default 3)")
    p.add_argument("--distractors", type=int, default=300, help="never-enrolled people streamed (default 300)")
    p.add_argument("--seed", type=int, default=0, help="which people take part (default 0)")
    defaults = EdgeConfig()
    p.add_argument("--codec", default=defaults.codec,
                   help=f"payload codec: jpeg, webp, png, learned (default {defaults.codec})")
    p.add_argument("--quality", type=int, default=defaults.quality,
                   help="codec quality: 1-100 for jpeg/webp, 1-5 for learned (default: the codec's own)")
    p.add_argument("--recognizer", default="auto", help="manifest name or path (default: auto)")
    p.add_argument("--threshold", type=float, help="match threshold (default: the recogniser manifest's)")
    p.add_argument("--json", type=Path, help="also write the summary as JSON here")
    _add_common(p)
    p.set_defaults(func=_demo)


# -- edge ---------------------------------------------------------------------------------------
def _add_edge(sub: argparse._SubParsersAction) -> None:
    from .cli_edge import add_edge_parser  # `facelink edge` lives in cli_edge.py

    add_edge_parser(sub)


# -- export -------------------------------------------------------------------------------------
def _export_manifest(name: str) -> int:
    from facelink.runtime.manifest import ManifestError, file_sha256, load_manifest

    try:
        manifest = load_manifest(name)
        path = manifest.resolve_file()
        weights = manifest.weights(verify=manifest.sha256 is not None)
    except ManifestError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{manifest.model_id}: {manifest.task}, {manifest.format}, weights {path}")
    print(f"sha256 {file_sha256(weights)} ({'verified' if manifest.sha256 else 'not pinned in the manifest'})")
    return 0


def _export_batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a batch size or 'dynamic', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a batch size must be at least 1, got {value}")
    return value


def _export_size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not (sep and width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 640x480, got {text!r}")
    return int(width), int(height)


def _export(args: argparse.Namespace) -> int:
    if args.model == "manifest":
        if not args.manifest:
            print("error: export manifest needs a manifest name or path", file=sys.stderr)
            return 2
        return _export_manifest(args.manifest)
    if args.manifest:
        print(f"error: unexpected argument {args.manifest!r}", file=sys.stderr)
        return 2
    if args.calib and not args.int8:
        print("error: --calib only applies with --int8", file=sys.stderr)
        return 2
    return _export_model(args)


def _export_model(args: argparse.Namespace) -> int:
    import shlex

    from facelink.config import cache_dir
    from facelink.export.deploy.parity import parity_table
    from facelink.export.deploy.pipeline import ExportOptions, export_engine, export_onnx, export_triton
    from facelink.export.deploy.source import resolve_source
    from facelink.export.triton import TritonOptions
    from facelink.runtime.backends import BackendUnavailableError

    precision = "fp16" if args.half else "int8" if args.int8 else "fp32"
    batch = args.batch or ("dynamic" if args.format == "triton" else "keep")
    out = args.out or (cache_dir() / "exports")
    options = ExportOptions(precision=precision, batch=batch, input_size=args.input_size, calib=args.calib or "lfw",
                            calib_count=args.calib_count, parity_count=args.parity_count, max_batch=args.max_batch,
                            min_parity_cosine=args.min_parity_cosine,
                            command=shlex.join(["facelink", "export", *sys.argv[2:]]))
    try:
        source = resolve_source(args.model)
        if args.format == "triton":
            triton = TritonOptions(max_batch_size=args.max_batch, queue_delay_us=args.queue_delay_us,
                                   instance_kind=f"KIND_{args.instance_kind.upper()}", instances=args.instances)
            folder, exported = export_triton(source, options, out, args.triton_platform, triton, cache_dir() / "exports")
            written = [folder / "config.pbtxt", folder / str(triton.version), exported.record_path]
        else:
            exported = (export_engine if args.format == "engine" else export_onnx)(source, options, out)
            written = [exported.path, exported.manifest_path, exported.record_path]
    except (ValueError, FileNotFoundError, BackendUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    for note in exported.notes:
        print(note)
    print()
    print("\n".join(parity_table(exported.parity)))
    print("\nparity: against the fp32 source run by ONNX Runtime one input at a time; cosine for embeddings, "
          "and for a codec encoder the share of latent symbols that change.")
    if args.format != "triton":
        print(f"run it: facelink cloud serve --recognizer {exported.manifest_path}   (or create_recognizer(path))"
              if source.task == "recognition" else f"manifest: {exported.manifest_path}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a model to ONNX (fp32/fp16/int8), a TensorRT engine or a Triton repository",
        formatter_class=_FORMATTER,
        description="""\
Export MODEL (a manifest name such as mobilefacenet, yunet or facelink-query-v9, a path to a
manifest, or BUNDLE:COMPONENT for one ONNX file of a bundle: codec-default:encoder,
codec-default:decoder, ensemble-facelink-query-v9:dlib-resnet-onnx@v1) for deployment:

  onnx    opset 17, ONNX checker, graph simplification (onnxslim), optional static or
          dynamic batch, fp16 (--half) or int8 QDQ (--int8, calibrated on --calib data)
  engine  a TensorRT engine built on THIS machine's GPU (cached under a key of GPU, compute
          capability, TensorRT version and model sha256; never loaded on another)
  triton  a Triton model repository entry under --out (config.pbtxt, 1/model.onnx or .plan)

Each file is written with a manifest (same fields, new file and sha256, the precision in
its description; fp16/int8 also suffix the version, so the model id differs) and a
<name>.export.json record, then checked against the fp32 source: max abs error, cosine
for embeddings (recognisers, transforms), the share of changed latent symbols for a codec
encoder, printed as a table. Calibration and parity inputs are made by the runtime's own
detector, alignment and preprocessing from LFW pictures pairs.txt does NOT reference: faces
for recognisers, canonical crops (and their latents) for the codec, a gallery model's
embeddings for its transform. A codec encoder's export keeps the codec id (the id binds
the decoder and tables), so `--codec learned:<its manifest>` on the board talks to a cloud
running the fp32 bundle; other models' fp16/int8 exports get their own model id.

`facelink export manifest NAME` checks a manifest against its weights' sha256.""",
        epilog="""\
examples:
  facelink export mobilefacenet --batch dynamic                 # fp32 ONNX, any batch
  facelink export mobilefacenet --int8 --calib lfw --batch dynamic
  facelink export mobilefacenet --half --out models/
  facelink export yunet --int8 --input-size 640x480 --calib photos/
  facelink export mobilefacenet --format engine --half          # on the Jetson / GPU host
  facelink export mobilefacenet --format triton --out triton-repo/ --max-batch 64
  facelink export manifest mobilefacenet                        # verify a manifest's weights""",
    )
    p.add_argument("model", metavar="MODEL", help="manifest name or path (NAME:COMPONENT for a bundle), or 'manifest'")
    p.add_argument("manifest", nargs="?", metavar="MANIFEST", help="with 'manifest': the manifest name or path to check")
    p.add_argument("--format", choices=["onnx", "engine", "triton"], default="onnx", help="what to write (default onnx)")
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--half", action="store_true", help="fp16")
    precision.add_argument("--int8", action="store_true", help="int8 (QDQ for ONNX; calibrated engine for TensorRT < 11)")
    p.add_argument("--calib", metavar="DATA",
                   help="int8 calibration data: lfw (default; pictures pairs.txt does not use), a folder of pictures, "
                        "or a .npz of input tensors keyed by input name")
    p.add_argument("--calib-count", type=int, default=256, metavar="N", help="calibration faces/pictures (default 256)")
    p.add_argument("--parity-count", type=int, default=64, metavar="N", help="inputs for the parity check (default 64)")
    p.add_argument("--min-parity-cosine", type=float, default=0.95, metavar="C",
                   help="refuse a recogniser export whose mean cosine to the fp32 source is below C (default 0.95; 0: keep any)")
    p.add_argument("--batch", type=_export_batch, metavar="N|dynamic",
                   help="static batch N or a dynamic batch (default: keep the source's; triton: dynamic)")
    p.add_argument("--input-size", type=_export_size, metavar="WxH",
                   help="pin a dynamic image size (TensorRT needs it for YuNet; a multiple of 32)")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="output folder (default ~/.cache/facelink/exports; for triton: the model repository)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="largest batch of a dynamic TensorRT profile / Triton's max_batch_size (default 16)")
    triton = p.add_argument_group("triton")
    triton.add_argument("--triton-platform", choices=["onnxruntime_onnx", "tensorrt_plan"], default="onnxruntime_onnx",
                        help="serve the ONNX file, or a TensorRT plan built here (default onnxruntime_onnx)")
    triton.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    triton.add_argument("--instance-kind", choices=["gpu", "cpu"], default="gpu", help="where instances run (default gpu)")
    triton.add_argument("--queue-delay-us", type=int, default=500,
                        help="how long Triton may hold a request to fill a batch (default 500 us)")
    _add_common(p)
    p.set_defaults(func=_export)


# -- bench --------------------------------------------------------------------------------------
BENCHMARKS = {
    "verification": "facelink.benchmarks.verification",
    "asymmetric": "facelink.benchmarks.asymmetric",
    "recognisers": "facelink.benchmarks.recognisers",
    "rate-accuracy": "facelink.benchmarks.rate_accuracy",
    "quantization": "facelink.benchmarks.quantization",
    "latency": "facelink.benchmarks.latency",
    "load": "facelink.benchmarks.load",
    "video": "facelink.benchmarks.video",
    "fuzz-codecs": "facelink.benchmarks.fuzz_codecs",
    "fuzz-wire": "facelink.benchmarks.fuzz_wire",
    "crash-durability": "facelink.benchmarks.crash_durability",
    "gallery": "facelink.benchmarks.gallery_scale",
    "upgrade": "facelink.benchmarks.upgrade",
    "gallery-backends": "facelink.benchmarks.gallery_backends",
}


def _passthrough(rest: list[str]) -> list[str]:
    """The options after `bench NAME` / `train JOB`, for the module's own parser. Whether argparse
    keeps the `--` that separates them has changed between Python versions: drop it here."""
    return rest[1:] if rest[:1] == ["--"] else rest


def _bench(args: argparse.Namespace) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.benchmark])
    return module.main(_passthrough(args.rest))


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark (prints a table, writes benchmarks/results/<name>.json)",
        formatter_class=_FORMATTER,
        description="Reproducible measurements. Each prints the command, machine and date with its table.",
        epilog="""\
benchmarks:
  verification   LFW View 2 10-fold verification accuracy of a recogniser through the
                 edge path (detect, align, optional codec round trip)
  rate-accuracy  verification accuracy against bytes per face: the learned codec, x265,
                 JPEG, WebP, AVIF, JPEG XL; edge and full-frame protocols
  quantization   LFW accuracy of a recogniser at fp32, fp16 and int8
  latency        p50/p99 latency, size and peak memory per model and backend, and the
                 whole edge path per face
  asymmetric     query model vs the transformed gallery ensemble: 1:1, 1:N, cost, rejection
  upgrade        a new recogniser served from the old one's stored embeddings (transformed
                 templates) against native ones: 1:1, 1:N, mixed galleries, upgrade speed
  recognisers    the cloud's recognisers side by side: LFW View 2, 1:N rank-1 and DIR@FAR=1%,
                 float16 storage, and where each match threshold sits
  load           the service under 1-256 streams of real learned-codec faces: faces/s,
                 p50/p99, health latency, server memory, against the in-process engine
  video          a ground-truth video of LFW people through the edge and a real cloud, per
                 send policy: appearances right/wrong/unknown, observations, time to decide
  fuzz-codecs    mutated bitstreams (checksums recomputed) through every decoder
  fuzz-wire      mutated observations and unary requests against a live server: one
                 typed answer each, no INTERNAL/UNKNOWN/hang, health answered throughout
  crash-durability  SIGKILL the service during enrollments, replacements and erasures;
                 restart and check every acknowledged call (lost, half-applied, audit)
  gallery-backends  the embedded gallery and Qdrant (local mode) at 1e5 identities:
                 enrollments/s, search p50/p99, erasure, reopen
  gallery        the embedded gallery at 1e4-1e6 identities, exact vs HNSW vs IVF, per model:
                 start-up, RAM, search p50/p99, recall@1, enroll/erase; LFW open set vs size

examples:
  facelink bench verification
  facelink bench verification -- --recognizer dlib-resnet --codec jpeg --quality 50""",
    )
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark (see its --help)")
    p.set_defaults(func=_bench)


# -- train ------------------------------------------------------------------------------------
# Each job is a module of export/ with its own --help; these need torch (the export extra).
TRAINING_JOBS = {
    "codec": "facelink.export.codec.train",
    "codec-bundle": "facelink.export.codec.bundle",
    "codec-unbundle": "facelink.export.codec.unbundle",
    "codec-frontier": "facelink.export.codec.frontier",
    "codec-speed": "facelink.export.codec.speed",
    "codec-prior-study": "facelink.export.codec.prior_study",
    "query": "facelink.export.query.train",
    "query-bundle": "facelink.export.query.export",
    "transforms": "facelink.export.query.transforms",
    "dlib-convert": "facelink.export.dlib_convert",
}


class ExportExtraMissing(RuntimeError):
    """A training job was asked for on an install without torch."""


def _train(args: argparse.Namespace) -> int:
    import importlib

    try:  # the jobs import torch at the top or inside main(): both land here
        return importlib.import_module(TRAINING_JOBS[args.job]).main(_passthrough(args.rest)) or 0
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in ("torch", "compressai", "onnx", "onnxscript"):
            raise ExportExtraMissing(
                f"'facelink train {args.job}' needs {error.name.split('.')[0]} (the export extra): "
                "pip install -e '.[export]' (or `make test-export`, which installs it)") from error
        raise


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train, bundle and inspect facelink's own models (needs the export extra: torch)",
        formatter_class=_FORMATTER,
        description="The model-making jobs of export/. Every run is checkpointed and resumable: run the same "
                    "command again to continue. Options after the job go to it (see `facelink train JOB -- --help`).",
        epilog="""\
jobs:
  codec              train the learned codec (rate + distortion + identity loss; resumable run folder)
  codec-frontier     compare a run's held-out figures with a reference run's at equal bytes
  codec-bundle       export a codec checkpoint to ONNX + entropy tables + manifest (no torch to run it)
  codec-unbundle     a shipped codec bundle back into a trainable checkpoint (or: codec --init-from NAME)
  codec-speed        MACs, parameters and ONNX Runtime ms of a codec architecture
  codec-prior-study  how many bytes richer static priors would save on held-out latents
  query              train the lightweight query model by distillation (resumable run folder)
  query-bundle       export a query run to ONNX + manifest
  transforms         fit the embedding transformations of a query ensemble (gallery -> query space)
  dlib-convert       convert dlib's ResNet recogniser to torch and ONNX, checked against dlib

examples:
  facelink train codec -- --run-dir ~/.cache/facelink/runs/my-codec --max-minutes 120
  facelink train codec -- --run-dir ~/.cache/facelink/runs/more-wide --model wide --init-from wide --lr 3e-5
  facelink train codec-frontier -- export/codec/runs/codec-v5/val.jsonl \\
      --reference export/codec/runs/codec-v2/val.jsonl
  facelink train query -- --run-dir ~/.cache/facelink/runs/my-query --model mfn72 --mixup 0.5
  facelink train query -- --help""",
    )
    p.add_argument("job", choices=sorted(TRAINING_JOBS))
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the job (see its --help)")
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelink", description=__doc__, formatter_class=_FORMATTER)
    parser.add_argument("--version", action="version", version=f"facelink {__import__('facelink').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,cloud,certs,edge,export,bench,train}")
    _add_demo(sub)
    add_cloud_parser(sub)
    add_certs_parser(sub)
    _add_edge(sub)
    _add_export(sub)
    _add_bench(sub)
    _add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(getattr(args, "verbose", 0), logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as error:
        # Missing data, a bad manifest, an unreadable source: the message says what to do,
        # a traceback would only bury it. -vv keeps the traceback for debugging.
        if level == logging.DEBUG:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _user_errors() -> tuple[type[BaseException], ...]:
    from facelink.datasets import DatasetNotFoundError
    from facelink.edge.sources import SourceError
    from facelink.runtime.codecs import CodecError
    from facelink.runtime.dlib_models import DlibUnavailableError
    from facelink.runtime.manifest import ManifestError
    from facelink.transport import TransportSecurityError

    # ValueError: what the credential store and the configuration say about a bad value.
    return (DatasetNotFoundError, SourceError, CodecError, DlibUnavailableError, ManifestError, ExportExtraMissing,
            TransportSecurityError, ValueError)


if __name__ == "__main__":
    sys.exit(main())
