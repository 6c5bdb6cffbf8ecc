"""Numerical parity of an exported model against the fp32 reference, on the same inputs.

The reference is the source ONNX file run by ONNX Runtime on the CPU, one input at a time at
its own batch; the candidate runs through the runtime's backend for its file (ONNX Runtime or
TensorRT) in batches, so a dynamic-batch export is checked against per-image outputs too.
Embeddings (a recogniser's outputs) are compared by cosine similarity, the quantity matching
depends on; a codec encoder's latents also by the fraction of symbols that change once quantised
at each quality; everything else by its largest absolute difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facelink.benchmarks.reporting import markdown_table
from facelink.runtime.backends import Backend

from .samples import Samples


@dataclass(frozen=True)
class ParityRow:
    model: str
    variant: str
    output: str
    inputs: int
    batch: int
    max_abs_error: float
    mean_cosine: float | None
    min_cosine: float | None
    symbol_mismatch: float | None = None  # a codec encoder: fraction of entropy-coded symbols that change

    def as_dict(self) -> dict:
        return asdict(self)


def run_batched(backend: Backend, samples: Samples, batch: int, static: bool) -> list[np.ndarray]:
    """All outputs for `samples`, `batch` inputs per call; a static batch gets its last call padded."""
    results: list[list[np.ndarray]] = []
    for chunk in samples.batches(batch):
        n = len(next(iter(chunk.values())))
        if static and n < batch:
            chunk = {
                k: np.concatenate([v, np.zeros((batch - n, *v.shape[1:]), v.dtype)]) for k, v in chunk.items()
            }
        results.append([o[:n] for o in backend.run(chunk)])
    return [np.concatenate([r[i] for r in results]) for i in range(len(results[0]))]


def reference_outputs(path: Path, samples: Samples) -> list[np.ndarray]:
    """The fp32 source model, one input at a time (every bundled model was traced at batch 1)."""
    from facelink.runtime.backends import OnnxRuntimeBackend
    from facelink.config import BackendConfig

    backend = OnnxRuntimeBackend(path, BackendConfig(intra_op_threads=0))
    return run_batched(backend, samples, 1, static=True)


def compare(
    model: str,
    variant: str,
    names: list[str],
    reference: list[np.ndarray],
    candidate: list[np.ndarray],
    batch: int,
    embeddings: bool,
) -> list[ParityRow]:
    rows = []
    for name, ref, got in zip(names, reference, candidate):
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        mean_cos = min_cos = None
        if embeddings:
            a, b = ref64.reshape(len(ref64), -1), got64.reshape(len(got64), -1)
            cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
            mean_cos, min_cos = float(cos.mean()), float(cos.min())
        rows.append(
            ParityRow(
                model, variant, name, len(ref), batch, float(np.abs(ref64 - got64).max()), mean_cos, min_cos
            )
        )
    return rows


def parity_table(rows: list[ParityRow]) -> list[str]:
    def cos(value: float | None) -> str:
        return "-" if value is None else f"{value:.6f}"

    def mismatch(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.3f}%"

    return markdown_table(
        ["model", "variant", "output", "inputs", "batch", "max abs error", "mean cosine", "min cosine", "symbol mismatch"],
        [
            [
                r.model,
                r.variant,
                r.output,
                str(r.inputs),
                str(r.batch),
                f"{r.max_abs_error:.3g}",
                cos(r.mean_cosine),
                cos(r.min_cosine),
                mismatch(r.symbol_mismatch),
            ]
            for r in rows
        ],
    )
