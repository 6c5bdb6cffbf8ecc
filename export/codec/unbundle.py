"""A shipped codec bundle back into a trainable model, so training can continue from what shipped.

    python -m facelink.export.codec.train --run-dir RUN --model wide --init-from wide   # or a manifest path
    python -m facelink.export.codec.unbundle wide --out wide.pt                          # the same, as a file

A run's `checkpoint.pt` lives on the machine that trained it (`~/.cache/facelink/runs/`); the
bundle (`runtime/manifests/codecs/`) is what the repository keeps. Everything the model computes
is in the bundle, though not in the form training holds it:

* the encoder and decoder ONNX graphs carry every convolution under its state-dict name, and
  each GDN's *effective* beta and gamma (`speed.StaticGDN`), which go back through the inverse of
  CompressAI's non-negative reparametrisation;
* the tables carry each quality's gains, inverse gains and medians as numbers, and its density
  only as the quantised probabilities of the integer symbols. The factorised density network
  that made them is fitted back to those probabilities (cross-entropy, about a minute on one
  core), so the recovered model's rate term starts where the bundle's entropy coder is: on `wide`
  0.001-0.003 bits a symbol over the tables' own entropy, about 0.2% of the bytes (the report's
  `density_excess_bits_per_symbol`).

What is not in a bundle: the optimisers' state and the step count. A run started from a bundle is
a warm restart with fresh Adam moments, as `--init-from` a checkpoint already is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from torch import Tensor

from facelink.runtime.codecs.learned import LearnedFaceCodec, load_codec_manifest

from ..onnx_weights import graph_tensors
from .model import CODEC_MODELS, CodecArch, FaceCodecModel, create_codec_model


def _registry_name(arch: CodecArch) -> str:
    for name, known in CODEC_MODELS.items():
        if known == arch:
            return name
    raise ValueError(f"the bundle's architecture {arch.to_dict()} is not a registered codec model "
                     f"({', '.join(sorted(CODEC_MODELS))})")


@torch.no_grad()
def _load_transform(model: FaceCodecModel, prefix: str, graph: Path) -> None:
    """The transform `prefix` (g_a, g_s) from its ONNX graph, whose tensors carry the state-dict
    names: convolutions as they are, GDN beta / gamma from their effective values."""
    weights = {key: torch.from_numpy(value) for key, value in graph_tensors(graph).items()
               if key.startswith(prefix + ".")}
    state = model.state_dict()
    trained = {key for key, _ in model.named_parameters() if key.startswith(prefix + ".")}
    missing = trained - set(weights)
    if missing:
        raise ValueError(f"the bundle's {prefix} graph lacks {', '.join(sorted(missing))}")
    for key, value in weights.items():
        prefix, index, field = key.split(".")
        layer = getattr(model, prefix)[int(index)]
        if isinstance(layer, GDN):
            if field == "beta":
                layer.beta.copy_(layer.beta_reparam.init(value))
            else:  # exported as a (C, C, 1, 1) kernel, trained as (C, C)
                layer.gamma.copy_(layer.gamma_reparam.init(value.reshape(layer.gamma.shape)))
        else:
            if state[key].shape != value.shape:
                raise ValueError(f"{key}: the bundle has {tuple(value.shape)}, the model {tuple(state[key].shape)}")
            getattr(layer, field).copy_(value)


def _symbol_support(tables: dict[str, np.ndarray], q: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per channel: medians, the lowest symbol's distance below them, the highest's above.

    The tables hold, per channel, `length` probabilities: the `length - 1` symbols from
    `medians + offset` upwards, then the escape (CompressAI's update(): offset = -minima,
    pmf_length = minima + maxima + 1)."""
    medians = torch.from_numpy(tables["medians"][q].astype(np.float32))
    minima = torch.from_numpy(-tables["offset"][q].astype(np.int64))
    maxima = torch.from_numpy(tables["length"][q].astype(np.int64) - 1) - 1 - minima
    return medians, minima, maxima


def fit_density(bottleneck: EntropyBottleneck, pmf: Tensor, symbols: Tensor, start: Tensor, steps: int = 1500) -> float:
    """Fit `bottleneck`'s factorised density to a table: per channel c, `pmf[c, k]` is the
    probability of the integer `start[c] + k` for k < `symbols[c]`, and `pmf[c, symbols[c]]` that of
    the escape, the mass of both tails (CompressAI's `update()`: the likelihood at each symbol,
    then the sigmoid tails beyond the first and the last). Minimises the cross-entropy of the
    table under the density; returns its excess over the table's entropy, in bits per symbol
    averaged over channels."""
    width = pmf.shape[1]
    samples = (torch.arange(width, dtype=torch.float32)[None, :] + start[:, None])[:, None, :]
    inside = torch.arange(width)[None, :] < symbols[:, None]
    escape = pmf.gather(1, symbols[:, None])[:, 0]
    target = pmf * inside
    params = [p for name, p in bottleneck.named_parameters() if name != "quantiles"]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    entropy = -(pmf * torch.log2(pmf.clamp_min(1e-12))).sum(1).mean()
    for step in range(steps):
        if step == steps * 2 // 3:
            for group in optimizer.param_groups:
                group["lr"] = 1e-3
        likelihood, lower, upper = bottleneck._likelihood(samples)
        tails = torch.sigmoid(lower[:, 0, 0]) + torch.sigmoid(-upper[:, 0, :].gather(1, symbols[:, None] - 1)[:, 0])
        cross = -(target * torch.log2(likelihood[:, 0, :].clamp_min(1e-9))).sum(1) - escape * torch.log2(
            tails.clamp_min(1e-9)
        )
        optimizer.zero_grad()
        cross.mean().backward()
        optimizer.step()
    return float(cross.detach().mean() - entropy)


def codec_from_bundle(name_or_path: str | Path, density_steps: int = 1500) -> tuple[FaceCodecModel, str, dict]:
    """(model, its registry name, what the recovery measured) from a bundle's name or manifest path."""
    manifest, manifest_path = load_codec_manifest(name_or_path)
    codec = LearnedFaceCodec(manifest, manifest_path.parent, manifest.preferred_quality)
    architecture = manifest.training.get("architecture")
    if not isinstance(architecture, dict):
        raise ValueError(f"{manifest_path}: the manifest records no training architecture")
    name = _registry_name(CodecArch(**architecture))
    model = create_codec_model(name)
    _load_transform(model, "g_a", codec.bundle_file("encoder"))
    _load_transform(model, "g_s", codec.bundle_file("decoder"))
    with np.load(codec.bundle_file("tables")) as npz:
        tables = {key: npz[key] for key in npz.files}
    excess = []
    with torch.no_grad():
        model.gains.log_gain.copy_(torch.from_numpy(np.log(tables["gain"])))
        model.gains.log_inverse_gain.copy_(torch.from_numpy(np.log(tables["inverse_gain"])))
    for q, bottleneck in enumerate(model.entropy_bottlenecks):
        medians, minima, maxima = _symbol_support(tables, q)
        with torch.no_grad():
            bottleneck.quantiles[:, 0, 0] = medians - minima
            bottleneck.quantiles[:, 0, 1] = medians
            bottleneck.quantiles[:, 0, 2] = medians + maxima
        pmf = torch.from_numpy(tables["pmf"][q]).float()
        symbols = torch.from_numpy(tables["length"][q].astype(np.int64)) - 1  # the last entry is the escape
        excess.append(fit_density(bottleneck, pmf, symbols, medians - minima, density_steps))
    model.eval()
    model.update(force=True)
    report = {"bundle": manifest.name, "version": manifest.version, "model": name,
              "density_excess_bits_per_symbol": [round(x, 5) for x in excess]}
    return model, name, report


def checkpoint_state(model: FaceCodecModel, name: str, report: dict) -> dict:
    """What `train.run` reads from an `--init-from` checkpoint: the weights and the model name."""
    return {"model": model.state_dict(), "config": {"model": name}, "recovered_from": report}


def is_bundle_reference(value: str | Path) -> bool:
    """A bundle's name (`wide`) or manifest (`.json`), as opposed to a checkpoint path."""
    text = str(value)
    return text.endswith(".json") or ("/" not in text and not text.endswith(".pt"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.codec.unbundle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="a bundled codec's name (default, wide) or its manifest path")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write (weights only)")
    args = parser.parse_args(argv)
    model, name, report = codec_from_bundle(args.bundle)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint_state(model, name, report), args.out)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
