"""Grow a trained codec into a wider one that computes exactly the same function (Net2Net).

    wide = create_codec_model("wide"); widen_codec(trained, wide)   # wide(x) == trained(x)

A wider analysis transform may need fewer bits for the same identity, but trained from scratch
on two CPU cores it would spend its first hours relearning what the narrow codec already knows.
Net2WiderNet (Chen, Goodfellow and Shlens, ICLR 2016) starts it exactly where the narrow one is:
every new hidden channel copies an existing one, and the layer that reads the copies shares the
original's outgoing weights among them, so the output is unchanged. The share is not an even
split but random positive factors that sum to one: copies with identical outgoing weights would
get identical gradients and never become different features; with unequal ones they diverge
from the first step, while the function at step 0 is still the trained codec's.

GDN widens the same way: a copy's row repeats its source's beta and gamma, and a copy's column of
gamma takes its share of the source's, so each channel's normaliser sums the same squares. The
latent (its channels, gains and entropy models) is left as it is: the bitstream's symbols are
those of the trained codec until training moves them.
"""

from __future__ import annotations

import numpy as np
import torch
from compressai.layers import GDN
from torch import Tensor, nn

from .model import FaceCodecModel


def _mapping(old: int, new: int, rng: np.random.Generator, spread: float) -> tuple[Tensor, Tensor]:
    """(source channel of each new channel, its share of the source's outgoing weights)."""
    if new < old:
        raise ValueError(f"cannot narrow {old} channels to {new}")
    source = np.concatenate([np.arange(old), rng.integers(0, old, new - old)])
    share = np.ones(new)
    for c in np.unique(source[old:]):
        copies = np.flatnonzero(source == c)
        factors = np.clip(1 + spread * rng.standard_normal(len(copies)), 0.1, None)
        share[copies] = factors / factors.sum()
    return torch.from_numpy(source), torch.from_numpy(share).float()


def _convs(transform: nn.Sequential) -> list[nn.Conv2d | nn.ConvTranspose2d]:
    return [m for m in transform if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]


def _gdns(transform: nn.Sequential) -> list[GDN]:
    return [m for m in transform if isinstance(m, GDN)]


@torch.no_grad()
def widen_transform(src: nn.Sequential, dst: nn.Sequential, rng: np.random.Generator, spread: float = 0.1) -> None:
    """Copy `src` (conv, GDN, ..., conv) into the wider `dst` of the same layout, function-preserving."""
    src_convs, dst_convs, src_gdns, dst_gdns = _convs(src), _convs(dst), _gdns(src), _gdns(dst)
    if len(src_convs) != len(dst_convs) or len(src_gdns) != len(dst_gdns) or len(src_gdns) != len(src_convs) - 1:
        raise ValueError("the two transforms differ in layout, not only in width")

    def out_in(conv: nn.Module, weight: Tensor) -> Tensor:  # ConvTranspose2d stores (in, out, kh, kw)
        return weight.transpose(0, 1) if isinstance(conv, nn.ConvTranspose2d) else weight

    # One channel mapping per hidden boundary (between conv i and conv i + 1, through GDN i).
    maps = [_mapping(s.beta.shape[0], d.beta.shape[0], rng, spread) for s, d in zip(src_gdns, dst_gdns)]
    for i, (s, d) in enumerate(zip(src_convs, dst_convs)):
        weight, bias = out_in(s, s.weight), s.bias
        if i < len(maps):  # widen the outputs: each new channel repeats its source
            weight, bias = weight[maps[i][0]], bias[maps[i][0]]
        if i > 0:  # widen the inputs: the copies share their source's weights
            source, share = maps[i - 1]
            weight = weight[:, source] * share.view(1, -1, 1, 1)
        if out_in(d, d.weight).shape != weight.shape:
            raise ValueError(f"layer {i}: {tuple(out_in(d, d.weight).shape)} cannot take {tuple(weight.shape)}")
        out_in(d, d.weight).copy_(weight)
        d.bias.copy_(bias)
    for (source, share), s, d in zip(maps, src_gdns, dst_gdns):
        beta = s.beta_reparam(s.beta)[source]
        gamma = s.gamma_reparam(s.gamma)[source][:, source] * share.view(1, -1)
        d.beta.copy_(d.beta_reparam.init(beta))
        d.gamma.copy_(d.gamma_reparam.init(gamma))


@torch.no_grad()
def widen_codec(src: FaceCodecModel, dst: FaceCodecModel, seed: int = 0, spread: float = 0.1) -> None:
    """Load the trained `src` into the wider `dst`: same latent and qualities, wider hidden layers."""
    a, b = src.arch, dst.arch
    if (a.latent_channels, a.qualities) != (b.latent_channels, b.qualities):
        raise ValueError(f"widening keeps the latent: {a.to_dict()} -> {b.to_dict()} changes it")
    rng = np.random.default_rng(seed)
    widen_transform(src.g_a, dst.g_a, rng, spread)
    widen_transform(src.g_s, dst.g_s, rng, spread)
    # Gains and entropy models as they are; through the model's own load_state_dict, which sizes
    # the entropy bottlenecks' CDF buffers to the trained ones (a fresh model's are empty).
    kept = {k: v for k, v in src.state_dict().items() if k.startswith(("gains.", "entropy_bottlenecks."))}
    dst.load_state_dict({**dst.state_dict(), **kept})
