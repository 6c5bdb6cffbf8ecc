"""Does a run move the codec's frontier? Each epoch's held-out figures against a reference run's curve.

    python -m facelink.export.codec.frontier export/codec/runs/codec-v5/val.jsonl \\
        --reference export/codec/runs/codec-v2/val.jsonl

A quality level that merely spends more bytes slides along the frontier; what counts is the
identity cosine (and PSNR) at equal bytes. For every epoch of the run and every quality, the
reference's last epoch is interpolated (linearly in bytes, between its qualities) at the run's
bytes, and the difference printed: positive means more identity for the same bytes.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.codec.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run's val.jsonl")
    parser.add_argument("--reference", type=Path, required=True, help="the val.jsonl whose last epoch is the reference curve")
    args = parser.parse_args(argv)
    reference = read_validation(args.reference)[-1]
    for row in read_validation(args.run):
        cos, psnr = at_equal_bytes(row, reference, "cos"), at_equal_bytes(row, reference, "psnr")
        print(f"epoch {row['epoch']:>3}  cosine at equal bytes " + " ".join(f"{q} {v:+.4f}" for q, v in cos.items())
              + "  |  PSNR " + " ".join(f"{v:+.2f}" for v in psnr.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
