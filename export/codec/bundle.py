"""Turn a training checkpoint into the run-time bundle: two ONNX graphs, entropy tables, a manifest.

    python -m facelink.export.codec.bundle --checkpoint ~/.cache/facelink/runs/codec-v1/checkpoint.pt \\
        --name default --out runtime/manifests/codecs

writes `codec-<name>-encoder.onnx`, `codec-<name>-decoder.onnx`, `codec-<name>-tables.npz` and
`codec-<name>.json` (each file's sha256, the architecture, how the weights were trained), which
`facelink.runtime.codecs.learned.LearnedFaceCodec.load(name)` reads without torch. Then it checks
the bundle against the torch model on held-out faces and prints the parity table: the latent
symbols the run time entropy-codes must be exactly the symbols CompressAI codes (mismatch rate
0), and the decoded pictures must agree to rounding.

Table layout (see runtime/codecs/entropy.py): per quality, CompressAI's quantised CDFs (16-bit
precision) become probability rows `pmf` with the escape last, `length` entries per channel,
and `offset`, the symbol of a channel's first entry.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from .model import FaceCodecModel, create_codec_model
from .speed import DecoderGraph, EncoderGraph, export_onnx, exportable
from .train import TrainConfig, train_command

CDF_PRECISION = 16


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_trained(checkpoint: Path) -> tuple[FaceCodecModel, dict]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    config = TrainConfig.from_dict(state["config"])
    model = create_codec_model(config.model)
    model.load_state_dict(state["model"])
    model.eval()
    model.update(force=True)  # the quantised CDFs the tables are made of
    return model, state


def entropy_tables(model: FaceCodecModel) -> dict[str, np.ndarray]:
    qualities, channels = model.arch.qualities, model.arch.latent_channels
    bottlenecks = model.entropy_bottlenecks
    width = max(int(b._cdf_length.max()) - 1 for b in bottlenecks)
    pmf = np.zeros((qualities, channels, width), dtype=np.float64)
    length = np.zeros((qualities, channels), dtype=np.int32)
    for q, bottleneck in enumerate(bottlenecks):
        cdf = bottleneck._quantized_cdf.numpy().astype(np.int64)
        for c in range(channels):
            n = int(bottleneck._cdf_length[c])
            # n CDF points bound n - 1 symbols (the last one the escape); the 16-bit integer
            # differences are exact in float64, so both ends rebuild the same model.
            pmf[q, c, : n - 1] = np.diff(cdf[c, :n]) / float(1 << CDF_PRECISION)
            length[q, c] = n - 1
    return {
        "gain": np.stack([model.gains.gain(q).flatten().detach().numpy() for q in range(qualities)]).astype(np.float32),
        "inverse_gain": np.stack([model.gains.inverse_gain(q).flatten().detach().numpy() for q in range(qualities)]).astype(
            np.float32
        ),
        "medians": np.stack([b.quantiles[:, 0, 1].detach().numpy() for b in bottlenecks]).astype(np.float32),
        "pmf": pmf,
        "length": length,
        "offset": np.stack([b._offset.numpy() for b in bottlenecks]).astype(np.int32),
    }


def write_bundle(checkpoint: Path, name: str, out: Path, command: str, default_quality: int | None = None,
                 border_ring_quality: int | None = None) -> Path:
    model, state = load_trained(checkpoint)
    graphs = exportable(model)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"codec-{name}"
    files = {
        "encoder": out / f"{stem}-encoder.onnx",
        "decoder": out / f"{stem}-decoder.onnx",
        "tables": out / f"{stem}-tables.npz",
    }
    latent = model.arch.latent_channels
    export_onnx(EncoderGraph(graphs), torch.rand(1, 3, 128, 128), files["encoder"], "image", "latent", dynamic_size=True)
    export_onnx(DecoderGraph(graphs), torch.zeros(1, latent, 8, 8), files["decoder"], "latent", "image", dynamic_size=True)
    np.savez(files["tables"], **entropy_tables(model))
    progress = state["progress"]
    manifest = {
        "name": name,
        "version": f"{checkpoint.parent.name}-step{progress['step']}",
        **{key: {"file": path.name, "sha256": _sha256(path)} for key, path in files.items()},
        "stride": 16,
        "qualities": model.arch.qualities,
        **({"default_quality": default_quality} if default_quality else {}),
        **({"border_ring_quality": border_ring_quality} if border_ring_quality else {}),
        "latent_channels": latent,
        "license": "Apache-2.0 (facelink's own weights)",
        "description": "Identity-preserving learned face codec: factorized prior, gain units, MobileFaceNet identity loss.",
        "training": {
            "command": f"{train_command(TrainConfig.from_dict(state['config']), '~/.cache/facelink/runs/' + checkpoint.parent.name)} "
            f"(learning-rate schedule: export/codec/runs/README.md; then: {command})",
            "architecture": model.arch.to_dict(),
            "config": state["config"],
            "progress": progress,
            "data": "celeba-dev (all but 32 held-out identities) + LFW images pairs.txt does not reference",
        },
    }
    path = out / f"{stem}.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def parity(manifest_path: Path, checkpoint: Path, faces: np.ndarray) -> list[list[str]]:
    """Runtime (ONNX + constriction) against torch + CompressAI, per quality, on `faces`."""
    from facelink.runtime.codecs import bitstream
    from facelink.runtime.codecs.learned import LearnedFaceCodec

    model, _ = load_trained(checkpoint)
    rows = []
    for quality in range(1, model.arch.qualities + 1):
        codec = LearnedFaceCodec.load(manifest_path, quality=quality)
        q = quality - 1
        mismatched = total = 0
        runtime_bytes, compressai_bytes, max_diff = [], [], 0.0
        for face in faces:
            x = torch.from_numpy(face.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
            with torch.no_grad():
                y = model.g_a(x) * model.gains.gain(q)
                medians = model.entropy_bottlenecks[q].quantiles[:, 0, 1].view(1, -1, 1, 1)
                reference = torch.round(y - medians).numpy().astype(np.int64)[0]
                strings = model.compress(x, quality)["strings"]
                reference_image = model.decompress(strings, torch.Size(y.shape[-2:]), quality)["x_hat"]
            data = codec.encode(face)
            header, payload = bitstream.unpack(data)
            symbols = codec.entropy_coder(quality).decode(payload, *codec.latent_size(header.width, header.height))
            mismatched += int((symbols != reference).sum())
            total += reference.size
            runtime_bytes.append(len(data))
            compressai_bytes.append(len(strings[0][0]))
            decoded = codec.decode(data).astype(np.float32)
            torch_pixels = (reference_image[0].permute(1, 2, 0).numpy() * 255.0).round()
            max_diff = max(max_diff, float(np.abs(decoded - torch_pixels).max()))
        rows.append(
            [
                str(quality),
                f"{mismatched / total:.2e}",
                f"{np.mean(runtime_bytes):.0f}",
                f"{np.mean(compressai_bytes):.0f}",
                f"{max_diff:.0f}",
            ]
        )
    return rows


def held_out_faces(run_dir: Path, count: int) -> np.ndarray:
    """Canonical crops of identities the run never trained on (its `split.json`)."""
    from .data import build_cache, training_sources

    cache = build_cache(training_sources(), progress=False)
    held_out = set(json.loads((run_dir / "split.json").read_text())["val_identities"])
    indices = np.flatnonzero(np.isin(cache.identities(), list(held_out)))
    chosen = np.random.default_rng(0).choice(indices, size=min(count, len(indices)), replace=False)
    return np.stack([cache.crops[i] for i in sorted(chosen)])


def main(argv: list[str] | None = None) -> int:
    from facelink.benchmarks.reporting import markdown_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a codec training checkpoint.pt")
    parser.add_argument("--name", default="default", help="bundle name (codec id flc-<name>-<tag>)")
    parser.add_argument("--out", type=Path, default=Path("runtime/manifests/codecs"), help="where the bundle goes")
    parser.add_argument("--check-faces", type=int, default=32, help="faces for the parity check (0 skips it)")
    parser.add_argument("--default-quality", type=int,
                        help="the quality the edge uses unless told: the lowest at recognition parity "
                             "(facelink bench rate-accuracy); default: the middle one")
    parser.add_argument("--border-ring-quality", type=int,
                        help="the edge's quality when the crop's border ring is coded at quality 1 (its default): "
                             "the lowest at parity that way (rate-accuracy --face-aware); default: --default-quality")
    args = parser.parse_args(argv)
    command = "python -m facelink.export.codec.bundle " + shlex.join(sys.argv[1:] if argv is None else argv)
    manifest = write_bundle(args.checkpoint, args.name, args.out, command, args.default_quality,
                            args.border_ring_quality)
    print(f"wrote {manifest} and its three files")
    if args.check_faces:
        rows = parity(manifest, args.checkpoint, held_out_faces(args.checkpoint.parent, args.check_faces))
        header = ["quality", "symbol mismatch rate", "bytes/face (facelink v1)", "bytes/face (CompressAI string)", "max |pixel diff|"]
        print("\n".join(markdown_table(header, rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
