"""How many bytes would a richer entropy model save on the bundled codec's latents?

    python -m facelink.export.codec.prior_study [--codec default]

The bundled codec codes each latent channel with one static, factorised table (what makes its
bitstream decode identically everywhere). Before building a context model or a hyperprior
(and solving their cross-device determinism), this measures what conditioning the static
tables could gain at all on the canonical 128x128 crops the edge sends, whose 8x8 latents are
aligned: eyes, nose and mouth always fall on the same latent positions.

For each quality, the symbols of every crop of the codec's training set (the held-out celeba-dev
identities of `export.codec.batches.split_by_identity`, seed 0, apart) are histogrammed per
channel and per context on the training crops; the table reports the cross-entropy of the
held-out crops' symbols (bytes per face) under:

* `per channel`: one table a channel, as shipped (the same estimate, so rows compare fairly);
* `+ position`: one table per channel and latent position (64 per channel);
* `+ left/up`: per channel and the left and upper neighbours' symbols (each clipped to -2..2),
  what a raster-order context model would see;
* `+ previous channel`: per channel and the previous channel's symbol at the same position
  (clipped to -3..3).

The codec's transforms stay as trained: a model trained with a richer prior would reshape its
latents, so these are a first-order estimate of the gain, not its bound. `real payload` is
what the runtime coder writes for the same held-out crops.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facelink.benchmarks import reporting
from facelink.runtime.codecs.learned import LearnedFaceCodec

from .batches import split_by_identity
from .data import build_cache, training_sources

DEFAULT_JSON = reporting.RESULTS_DIR / "codec_prior_study.json"
#: Additive smoothing of every histogram bin: a symbol never seen in training still costs finite bits.
SMOOTHING = 0.05


def cross_entropy_bytes(symbols: np.ndarray, context: np.ndarray, contexts: int, n_train: int) -> float:
    """Mean bytes per picture of `symbols[n_train:]` under tables fitted on `symbols[:n_train]`,
    one table per (channel, context). `symbols` (N, C, H, W) ints; `context` the same shape,
    values in [0, contexts)."""
    low = int(symbols.min())
    width = int(symbols.max()) - low + 1
    channels = symbols.shape[1]
    index = ((np.arange(channels)[None, :, None, None] * contexts + context) * width + (symbols - low)).astype(np.int64)
    counts = np.bincount(index[:n_train].ravel(), minlength=channels * contexts * width).astype(np.float64)
    counts = counts.reshape(channels * contexts, width) + SMOOTHING
    probability = (counts / counts.sum(axis=1, keepdims=True)).ravel()
    return float(-np.log2(probability[index[n_train:].ravel()]).sum() / (len(symbols) - n_train) / 8)


def contexts(symbols: np.ndarray) -> dict[str, tuple[np.ndarray, int]]:
    """Each conditioning of the study: (context array, number of contexts)."""
    n, c, h, w = symbols.shape
    left = np.pad(symbols, ((0, 0), (0, 0), (0, 0), (1, 0)))[..., :-1]
    up = np.pad(symbols, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]
    previous = np.pad(symbols, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    return {
        "per channel": (np.zeros_like(symbols), 1),
        "+ position": (np.broadcast_to(np.arange(h * w).reshape(1, 1, h, w), symbols.shape), h * w),
        "+ left/up": ((np.clip(left, -2, 2) + 2) * 5 + np.clip(up, -2, 2) + 2, 25),
        "+ previous channel": (np.clip(previous, -3, 3) + 3, 7),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.codec.prior_study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", default="default", help="codec bundle (name or manifest path)")
    parser.add_argument("--val-identities", type=int, default=32, help="held-out celeba-dev identities (the training split)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results (default {DEFAULT_JSON})")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    cache = build_cache(training_sources())
    train_rows, val_rows = split_by_identity(cache, args.val_identities, seed=0)
    rows = np.concatenate([train_rows, val_rows])
    codec = LearnedFaceCodec.load(args.codec, quality=1)
    encoder = codec.encoder_backend
    latents = np.stack([encoder.run({encoder.input_names[0]: codec.encoder_input(cache.crops[r])})[0][0]
                        for r in tqdm(rows, desc="latents", unit="face")])

    results = []
    for quality in range(1, codec.manifest.qualities + 1):
        symbols = np.stack([codec.quantize(latent, quality) for latent in latents])
        held_out = symbols[len(train_rows):]
        real = float(np.mean([len(codec.entropy_coder(quality).encode(s)) for s in held_out]))
        estimates = {name: round(cross_entropy_bytes(symbols, context, k, len(train_rows)), 1)
                     for name, (context, k) in contexts(symbols).items()}
        results.append({"quality": quality, "real_payload_bytes": round(real, 1), "bytes": estimates})

    names = list(results[0]["bytes"])
    header = ["quality", "real payload B", *(f"{n} B" for n in names), "best saving"]
    table = []
    for row in results:
        base = row["bytes"]["per channel"]
        best = min(v for k, v in row["bytes"].items() if k != "per channel")
        table.append([str(row["quality"]), f"{row['real_payload_bytes']:.0f}", *(f"{row['bytes'][n]:.0f}" for n in names),
                      f"{100 * (1 - best / base):.1f}%"])
    machine = reporting.machine_info()
    command = shlex.join(["python", "-m", "facelink.export.codec.prior_study", *argv])
    print(f"\n{command}\n{reporting.machine_line(machine)}, {reporting.utc_now()}")
    print(f"{len(train_rows)} training crops, {len(val_rows)} held-out crops ({args.val_identities} identities); "
          f"codec {codec.codec_id}\n")
    print("\n".join(reporting.markdown_table(header, table)))
    reporting.write_results(args.json, {"command": command, "machine": machine, "date": reporting.utc_now(),
                                        "codec": codec.codec_id, "train_crops": len(train_rows),
                                        "held_out_crops": len(val_rows), "smoothing": SMOOTHING, "rows": results})
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
