"""What reduced precision costs in accuracy: recognisers and the query model on LFW View 2, and
the learned codec's encoder on LFW View 2 through the codec, at fp32, fp16 and int8.

Each precision is exported by the same code as `facelink export MODEL [--half|--int8]` (an
export with the same source and settings is reused), then run through `benchmarks.verification`
(one detection per picture, YuNet landmarks):

* recognisers (`--recognizer`, default MobileFaceNet and the query model): the original picture
  (codec none); accuracy, TAR@FAR=1e-3 and EER against the same model at fp32;
* the learned codec (`--codec`, default the bundled `default`): its encoder exported at each
  precision codes the canonical crop at each of `--qualities`; the cloud's fp32 decoder and
  MobileFaceNet at fp32 decide. Bytes per face and accuracy against the fp32 encoder at the same
  quality, and the export's symbol mismatch rate.

The issue's target: int8 within 0.2 points of fp32 for the recognisers and the query model.

    facelink bench quantization
    facelink bench quantization -- --recognizer dlib-resnet-onnx --precision int8 --codec none
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from facelink.config import DEFAULT_QUERY_MODEL, cache_dir

from . import reporting
from . import verification

DEFAULT_JSON = Path("benchmarks/results/quantization.json")
DEFAULT_RECOGNIZERS = ("mobilefacenet", DEFAULT_QUERY_MODEL)
TARGET_POINTS = 0.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench quantization",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recognizer",
        action="append",
        help=f"manifest name or path; repeat (default: {', '.join(DEFAULT_RECOGNIZERS)}); 'none' skips",
    )
    p.add_argument(
        "--precision",
        action="append",
        choices=["fp16", "int8"],
        help="precisions to compare with fp32; repeat (default: fp16 and int8)",
    )
    p.add_argument(
        "--codec", action="append", help="learned codec bundle name; repeat (default: default); 'none' skips"
    )
    p.add_argument(
        "--qualities", type=lambda s: [int(q) for q in s.split(",")], default=[1, 3, 5],
        help="codec qualities, comma-separated (default 1,3,5)",
    )
    p.add_argument(
        "--codec-recognizer", default="mobilefacenet", help="recogniser behind the codec (default mobilefacenet)"
    )
    p.add_argument(
        "--calib", default="lfw", help="int8 calibration data (default lfw: pictures pairs.txt does not use)"
    )
    p.add_argument("--calib-count", type=int, default=256, help="calibration faces (default 256)")
    p.add_argument("--out", type=Path, default=None, help="export folder (default ~/.cache/facelink/exports)")
    p.add_argument(
        "--limit-pairs", type=int, metavar="N", help="passed to the verification benchmark (smoke tests)"
    )
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    return p


def _verify(arguments: list[str], args: argparse.Namespace) -> dict:
    """One verification run (quietly: its own report is long; ours quotes what matters)."""
    with tempfile.TemporaryDirectory() as tmp:
        rows_json = Path(tmp) / "verification.json"
        # --no-cache: an export with other calibration settings keeps its model id; stale
        # embeddings must never stand in for this run's.
        command = [*arguments, "--no-cache", "--threads", str(args.threads), "--json", str(rows_json)]
        if args.limit_pairs:
            command += ["--limit-pairs", str(args.limit_pairs)]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            status = verification.main(command)
        if status != 0:
            raise RuntimeError(f"verification {shlex.join(command)} failed:\n{log.getvalue()[-2000:]}")
        return json.loads(rows_json.read_text())


def _exports(model: str, args: argparse.Namespace, command: str) -> list[tuple[str, str, dict]]:
    """(precision, manifest, facts) for fp32 (the source) and each requested precision."""
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source

    source = resolve_source(model)
    variants = [("fp32", str(source.manifest_path), {"file": str(source.onnx_path), "parity": None})]
    for precision in dict.fromkeys(args.precision or ["fp16", "int8"]):
        options = ExportOptions(
            precision=precision,
            batch="dynamic" if source.codec_part else "keep",
            calib=args.calib,
            calib_count=args.calib_count,
            command=f"{command} (export)",
        )
        exported = export_onnx(source, options, args.out or cache_dir() / "exports", reuse=True)
        facts = {
            "file": str(exported.path),
            "parity": exported.parity[0].as_dict(),
            "calibration": json.loads(exported.record_path.read_text())["calibration"],
        }
        variants.append((precision, str(exported.manifest_path), facts))
    return variants


def recognizer_rows(models: list[str], args: argparse.Namespace, command: str) -> list[dict]:
    from facelink.export.deploy.source import resolve_source

    variants = []
    for model in models:
        if resolve_source(model).task != "recognition":
            raise ValueError(f"{model} is not a recogniser")
        variants += [(model, *variant) for variant in _exports(model, args, command)]
    arguments = ["--codec", "none"]
    for _, _, manifest, _ in variants:
        arguments += ["--recognizer", manifest]
    verified = _verify(arguments, args)["rows"]
    rows, reference = [], {}
    for (model, precision, manifest, facts), row in zip(variants, verified):
        reference.setdefault(model, row)
        rows.append(
            {
                "model": model,
                "precision": precision,
                "manifest": manifest,
                "model_id": row["recognizer"],
                "bytes": Path(facts["file"]).stat().st_size,
                **facts,
                "accuracy_mean": row["accuracy_mean"],
                "accuracy_std": row["accuracy_std"],
                "delta_points": row["accuracy_mean"] - reference[model]["accuracy_mean"],
                "tar_at_far": row["tar_at_far"],
                "eer": row["eer"],
                "ms_per_face": row["ms_per_face"],
                "pairs": row["pairs"],
            }
        )
    return rows


def codec_rows(names: list[str], args: argparse.Namespace, command: str) -> list[dict]:
    rows = []
    for name in names:
        variants = _exports(f"codec-{name}:encoder", args, command)
        for quality in args.qualities:
            arguments = ["--recognizer", args.codec_recognizer, "--quality", str(quality)]
            for _, manifest, _ in variants:
                arguments += ["--codec", f"learned:{manifest}"]
            verified = _verify(arguments, args)["rows"]
            for (precision, manifest, facts), row in zip(variants, verified):
                rows.append(
                    {
                        "codec": name,
                        "codec_id": row["codec_id"],
                        "precision": precision,
                        "quality": quality,
                        "manifest": manifest,
                        "encoder_bytes": Path(facts["file"]).stat().st_size,
                        "symbol_mismatch": (facts["parity"] or {}).get("symbol_mismatch"),
                        "recognizer": row["recognizer"],
                        "mean_bytes_per_face": row["mean_bytes_per_face"],
                        "accuracy_mean": row["accuracy_mean"],
                        "accuracy_std": row["accuracy_std"],
                        "delta_points": row["accuracy_mean"] - verified[0]["accuracy_mean"],
                        "delta_bytes": row["mean_bytes_per_face"] - verified[0]["mean_bytes_per_face"],
                        "pairs": row["pairs"],
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = reporting.bench_argv(argv)
    args = build_parser().parse_args(argv)
    command = shlex.join(["facelink", "bench", "quantization", *argv])
    recognizers = [] if args.recognizer == ["none"] else list(dict.fromkeys(args.recognizer or DEFAULT_RECOGNIZERS))
    codecs = [] if args.codec == ["none"] else list(dict.fromkeys(args.codec or ["default"]))
    try:
        rows = recognizer_rows(recognizers, args, command) if recognizers else []
        codec = codec_rows(codecs, args, command) if codecs else []
    except (ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    machine = reporting.machine_info(intra_op_threads=args.threads)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(format_report(rows, codec, command, machine, date))
    reporting.write_results(
        args.json,
        {
            "benchmark": "quantization",
            "command": command,
            "date": reporting.utc_now(),
            "machine": machine,
            "data": "LFW View 2 (pairs.txt), YuNet landmarks; recognisers on the original picture",
            "target_points": TARGET_POINTS,
            "rows": rows,
            "codec_rows": codec,
        },
    )
    print(f"wrote {args.json}")
    return 0


def format_report(rows: list[dict], codec: list[dict], command: str, machine: dict, date: str) -> str:
    def parity(row: dict) -> str:
        p = row["parity"]
        return "-" if p is None else f"{p['mean_cosine']:.5f} / {p['min_cosine']:.5f}"

    lines = [
        f"command: {command}",
        f"{reporting.machine_line(machine)} ({machine['intra_op_threads']} intra-op thread(s)); date: {date}",
    ]
    if rows:
        lines += [
            f"data: LFW View 2, {rows[0]['pairs']} pairs, 10 folds; YuNet landmarks, original picture (codec none)",
            "",
            *reporting.markdown_table(
                ["precision", "model id", "MB", "cosine vs fp32 (mean / min)", "accuracy %", "Δ points",
                 "TAR@FAR=1e-3", "EER", "ms/face"],
                [
                    [
                        r["precision"],
                        r["model_id"],
                        f"{r['bytes'] / 1e6:.2f}",
                        parity(r),
                        f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                        "-" if r["precision"] == "fp32" else f"{r['delta_points']:+.2f}",
                        f"{r['tar_at_far']:.2f}%",
                        f"{r['eer']:.2f}%",
                        f"{r['ms_per_face']:.2f}",
                    ]
                    for r in rows
                ],
            ),
            "",
            "cosine vs fp32: the export's parity check (raw embeddings of faces from LFW pictures pairs.txt does not use);",
            "ms/face: recogniser with its flip pass, from the verification run (not a latency benchmark).",
            *[
                f"{r['model']} {r['precision']}: {r['delta_points']:+.2f} points vs fp32 "
                f"({'within' if r['delta_points'] >= -TARGET_POINTS else 'OUTSIDE'} the {TARGET_POINTS} target)"
                for r in rows
                if r["precision"] != "fp32"
            ],
        ]
    if codec:
        lines += [
            "",
            f"learned codec encoder at each precision (fp32 decoder, {codec[0]['recognizer']} fp32 decides), "
            f"LFW View 2, {codec[0]['pairs']} pairs:",
            "",
            *reporting.markdown_table(
                ["codec", "quality", "encoder", "encoder MB", "symbols changed", "bytes/face", "Δ bytes",
                 "accuracy %", "Δ points"],
                [
                    [
                        r["codec"],
                        str(r["quality"]),
                        r["precision"],
                        f"{r['encoder_bytes'] / 1e6:.2f}",
                        "-" if r["symbol_mismatch"] is None else f"{100 * r['symbol_mismatch']:.2f}%",
                        f"{r['mean_bytes_per_face']:.0f}",
                        "-" if r["precision"] == "fp32" else f"{r['delta_bytes']:+.0f}",
                        f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f}",
                        "-" if r["precision"] == "fp32" else f"{r['delta_points']:+.2f}",
                    ]
                    for r in codec
                ],
            ),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
