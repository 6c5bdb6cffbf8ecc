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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_validation(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def qualities(row: dict) -> list[str]:
    return sorted((k for k in row if k.startswith("q") and k[1:].isdigit()), key=lambda k: int(k[1:]))


def at_equal_bytes(row: dict, reference: dict, metric: str) -> dict[str, float]:
    """row's `metric` minus the reference curve's at the same bytes, per quality."""
    ref = qualities(reference)
    x = np.array([reference[q]["bytes"] for q in ref])
    y = np.array([reference[q][metric] for q in ref])
    return {q: float(row[q][metric] - np.interp(row[q]["bytes"], x, y)) for q in qualities(row)}


def bytes_at_equal(row: dict, reference: dict, metric: str) -> dict[str, float]:
    """row's bytes over the reference's bytes at the same `metric`, minus 1, per quality (NaN
    outside the reference's range: no extrapolation). The reference's metric must rise with bytes."""
    ref = qualities(reference)
    x = np.array([reference[q][metric] for q in ref])
    y = np.array([reference[q]["bytes"] for q in ref])
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"the reference's {metric} does not rise with its bytes: {x.tolist()}")
    out = {}
    for q in qualities(row):
        value = row[q][metric]
        out[q] = float(row[q]["bytes"] / np.interp(value, x, y) - 1) if x[0] <= value <= x[-1] else float("nan")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.codec.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's val.jsonl")
    parser.add_argument("--reference", type=Path, required=True, help="the val.jsonl whose last epoch is the reference curve")
    args = parser.parse_args(argv)
    reference = read_validation(args.reference)[-1]
    for row in read_validation(args.run):
        cos, psnr = at_equal_bytes(row, reference, "cos"), at_equal_bytes(row, reference, "psnr")
        saved = bytes_at_equal(row, reference, "cos")
        print(f"epoch {row['epoch']:>3}  cosine at equal bytes " + " ".join(f"{q} {v:+.4f}" for q, v in cos.items())
              + "  |  PSNR " + " ".join(f"{v:+.2f}" for v in psnr.values())
              + "  |  bytes at equal cosine " + " ".join("  ---" if np.isnan(v) else f"{100 * v:+.1f}%" for v in saved.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
