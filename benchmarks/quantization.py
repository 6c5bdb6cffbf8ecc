"""What reduced precision costs a recogniser in accuracy: LFW View 2 at fp32, fp16 and int8.

Each precision is exported by the same code as `facelink export MODEL [--half|--int8]` (an
export with the same source and settings is reused), then all of them run through
`benchmarks.verification` in one pass (one detection per picture, YuNet landmarks, the
original picture: codec none), and the accuracy, TAR@FAR=1e-3 and EER are compared with fp32
in points. The issue's target: int8 within 0.2 points of fp32.

    facelink bench quantization
    facelink bench quantization -- --recognizer dlib-resnet-onnx --precision int8
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

from facelink.config import cache_dir

from . import reporting
from . import verification

DEFAULT_JSON = Path("benchmarks/results/quantization.json")
TARGET_POINTS = 0.2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelink bench quantization",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--recognizer", default="mobilefacenet", help="manifest name or path (default mobilefacenet)"
    )
    p.add_argument(
        "--precision",
        action="append",
        choices=["fp16", "int8"],
        help="precisions to compare with fp32; repeat (default: fp16 and int8)",
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    command = shlex.join(["facelink", "bench", "quantization", *argv])

    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source

    source = resolve_source(args.recognizer)
    if source.task != "recognition":
        print(f"error: {args.recognizer} is not a recogniser", file=sys.stderr)
        return 2
    out = args.out or cache_dir() / "exports"
    variants: list[tuple[str, str, dict]] = [
        ("fp32", args.recognizer, {"file": str(source.onnx_path), "parity": None})
    ]
    for precision in dict.fromkeys(args.precision or ["fp16", "int8"]):
        options = ExportOptions(
            precision=precision, calib=args.calib, calib_count=args.calib_count, command=f"{command} (export)"
        )
        exported = export_onnx(source, options, out, reuse=True)
        variants.append(
            (
                precision,
                str(exported.manifest_path),
                {
                    "file": str(exported.path),
                    "parity": exported.parity[0].as_dict(),
                    "calibration": json.loads(exported.record_path.read_text())["calibration"],
                },
            )
        )

    with tempfile.TemporaryDirectory() as tmp:
        rows_json = Path(tmp) / "verification.json"
        # --no-cache: verification caches embeddings by model id, and exports with other calibration
        # settings share one ("...-int8"); stale embeddings must never stand in for this run's.
        verify = ["--codec", "none", "--no-cache", "--threads", str(args.threads), "--json", str(rows_json)]
        for _, manifest, _ in variants:
            verify += ["--recognizer", manifest]
        if args.limit_pairs:
            verify += ["--limit-pairs", str(args.limit_pairs)]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # its own report is long; ours quotes what matters
            status = verification.main(verify)
        if status != 0:
            print(log.getvalue())
            return status
        verified = json.loads(rows_json.read_text())

    rows = []
    reference = verified["rows"][0]
    for (precision, manifest, extra), row in zip(variants, verified["rows"]):
        size = Path(extra["file"]).stat().st_size
        rows.append(
            {
                "precision": precision,
                "manifest": manifest,
                "model_id": row["recognizer"],
                "bytes": size,
                **extra,
                "accuracy_mean": row["accuracy_mean"],
                "accuracy_std": row["accuracy_std"],
                "delta_points": row["accuracy_mean"] - reference["accuracy_mean"],
                "tar_at_far": row["tar_at_far"],
                "eer": row["eer"],
                "ms_per_face": row["ms_per_face"],
                "pairs": row["pairs"],
            }
        )
    machine = reporting.machine_info(intra_op_threads=args.threads)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(format_report(rows, command, machine, date))
    reporting.write_results(
        args.json,
        {
            "benchmark": "quantization",
            "command": command,
            "date": reporting.utc_now(),
            "machine": machine,
            "data": "LFW View 2 (pairs.txt), codec none, YuNet landmarks",
            "target_points": TARGET_POINTS,
            "rows": rows,
        },
    )
    print(f"wrote {args.json}")
    return 0


def format_report(rows: list[dict], command: str, machine: dict, date: str) -> str:
    def parity(row: dict) -> str:
        p = row["parity"]
        return "-" if p is None else f"{p['mean_cosine']:.5f} / {p['min_cosine']:.5f}"

    table = [
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
    ]
    verdicts = [
        f"{r['precision']}: {r['delta_points']:+.2f} points vs fp32 "
        f"({'within' if r['delta_points'] >= -TARGET_POINTS else 'OUTSIDE'} the {TARGET_POINTS} target)"
        for r in rows
        if r["precision"] != "fp32"
    ]
    return "\n".join(
        [
            f"command: {command}",
            f"{reporting.machine_line(machine)} ({machine['intra_op_threads']} intra-op thread(s)); date: {date}",
            f"data: LFW View 2, {rows[0]['pairs']} pairs, 10 folds; YuNet landmarks, original picture (codec none)",
            "",
            *reporting.markdown_table(
                [
                    "precision",
                    "model id",
                    "MB",
                    "cosine vs fp32 (mean / min)",
                    "accuracy %",
                    "Δ points",
                    "TAR@FAR=1e-3",
                    "EER",
                    "ms/face",
                ],
                table,
            ),
            "",
            "cosine vs fp32: the export's parity check (raw embeddings of faces from LFW pictures pairs.txt does not use);",
            "ms/face: recogniser with its flip pass, from the verification run (not a latency benchmark).",
            *verdicts,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
