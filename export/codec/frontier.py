"""Does a run move the codec's frontier? Each epoch's held-out figures against a reference run's curve.

    python -m facelink.export.codec.frontier export/codec/runs/codec-v5/val.jsonl \\
        --reference export/codec/runs/codec-v2/val.jsonl

A quality level that merely spends more bytes slides along the frontier; what counts is the
identity cosine (and PSNR) at equal bytes. For every epoch of the run and every quality, the
reference's last epoch is interpolated (linearly in bytes, between its qualities) at the run's
bytes, and the difference printed: positive means more identity for the same bytes. Then the
other way round, what a rate target reads: the run's bytes against the bytes the reference needs
for the same identity cosine (negative: fewer bytes; blank where the reference's curve does not
reach that cosine).

`--ring` compares the curves of the crop coded as the edge sends it, the border ring at quality 1
(`q<n>r` in val.jsonl), instead of the whole crop at each quality. `--reference-epoch -1` takes the
reference run's starting point (the row a run started from other weights logs before its first step).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_validation(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def qualities(row: dict, ring: bool = False) -> list[str]:
    """The row's rate points in order: `q<n>` (the whole crop) or, with `ring`, `q<n>r`."""
    suffix = "r" if ring else ""
    keys = [k for k in row if k.startswith("q") and k.endswith(suffix) and k[1 : len(k) - len(suffix)].isdigit()]
    return sorted(keys, key=lambda k: int(k[1 : len(k) - len(suffix)]))


def at_equal_bytes(row: dict, reference: dict, metric: str, ring: bool = False) -> dict[str, float]:
    """row's `metric` minus the reference curve's at the same bytes, per quality."""
    ref = qualities(reference, ring)
    x = np.array([reference[q]["bytes"] for q in ref])
    y = np.array([reference[q][metric] for q in ref])
    return {q: float(row[q][metric] - np.interp(row[q]["bytes"], x, y)) for q in qualities(row, ring)}


def bytes_at_equal(row: dict, reference: dict, metric: str, ring: bool = False) -> dict[str, float]:
    """row's bytes over the reference's bytes at the same `metric`, minus 1, per quality (NaN
    outside the reference's range: no extrapolation). The reference's metric must rise with bytes."""
    ref = qualities(reference, ring)
    x = np.array([reference[q][metric] for q in ref])
    y = np.array([reference[q]["bytes"] for q in ref])
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"the reference's {metric} does not rise with its bytes: {x.tolist()}")
    out = {}
    for q in qualities(row, ring):
        value = row[q][metric]
        out[q] = float(row[q]["bytes"] / np.interp(value, x, y) - 1) if x[0] <= value <= x[-1] else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.codec.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's val.jsonl")
    parser.add_argument("--reference", type=Path, required=True, help="the val.jsonl whose last epoch is the reference curve")
    parser.add_argument("--reference-epoch", type=int, help="that epoch of the reference instead (-1: its starting point)")
    parser.add_argument("--ring", action="store_true", help="compare the crops coded with the border ring at quality 1")
    args = parser.parse_args(argv)
    rows = read_validation(args.reference)
    if args.reference_epoch is None:
        reference = rows[-1]
    else:
        reference = next((r for r in rows if r["epoch"] == args.reference_epoch), None)
        if reference is None:
            parser.error(f"{args.reference} has no epoch {args.reference_epoch}")
    if not qualities(reference, args.ring):
        parser.error(f"{args.reference}: the reference row has no {'ring ' if args.ring else ''}rate points")
    for row in read_validation(args.run):
        if not qualities(row, args.ring):
            continue
        cos, psnr = at_equal_bytes(row, reference, "cos", args.ring), at_equal_bytes(row, reference, "psnr", args.ring)
        saved = bytes_at_equal(row, reference, "cos", args.ring)
        print(f"epoch {row['epoch']:>3}  cosine at equal bytes " + " ".join(f"{q} {v:+.4f}" for q, v in cos.items())
              + "  |  PSNR " + " ".join(f"{v:+.2f}" for v in psnr.values())
              + "  |  bytes at equal cosine " + " ".join("  ---" if np.isnan(v) else f"{100 * v:+.1f}%" for v in saved.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
