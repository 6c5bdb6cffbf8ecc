"""The learned face codec: a factorised-prior autoencoder with per-quality gain units.

    x --g_a--> y --x gain[q]--> quantise + EntropyBottleneck[q] --x inverse_gain[q]--g_s--> x_hat

* `AnalysisTransform` / `SynthesisTransform`: four stride-2 stages (128x128 -> 8x8 latent) with
  GDN / inverse GDN, as in Balle et al. 2017 / CompressAI's `FactorizedPrior`, but sized for the
  edge: the first layer is 5x5 (cheap on 3 input channels, and it sees enough of the raw pixels),
  every other one 3x3, which costs 9/25 of CompressAI's 5x5 kernels. The decoder is wider than
  the encoder: the board only encodes, the cloud decodes, and at a few hundred bytes per face the
  synthesis does the heavy lifting.
* `GainUnits` (Cui et al. 2021, "Asymmetric Gained Deep Image Compression"): one model serves
  every rate point. Quality q scales the latent channel-wise before rounding (a larger gain is
  a finer quantisation step) and the decoder undoes it with its own learned inverse gain.
* One `EntropyBottleneck` per quality: the factorised prior has no hyperprior, so its tables are
  static and decoding is bit-exact across machines (issue 3, point 3); a table per quality
  avoids forcing one density to fit latents scaled by five different gains, for ~10k
  parameters each.

`create_codec_model(name, quality)` is the registry, in the manner of CompressAI's zoo.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.layers import GDN
from compressai.models import CompressionModel
from torch import Tensor, nn

#: Total downsampling of the four stride-2 stages: input sides must be multiples of it.
STRIDE = 16


@dataclass(frozen=True)
class CodecArch:
    """Everything that fixes a codec's graph (and so its weights' shapes)."""

    encoder_channels: int = 64
    decoder_channels: int = 96
    latent_channels: int = 128
    qualities: int = 5

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """Stride-2 convolution with 'same' padding: halves each side exactly."""
    return nn.Conv2d(in_channels, out_channels, kernel, stride=2, padding=kernel // 2)


def deconv(in_channels: int, out_channels: int, kernel: int) -> nn.ConvTranspose2d:
    """Stride-2 transposed convolution that doubles each side exactly (the inverse of `conv`).

    Transposed convolutions rather than sub-pixel ones: measured in ONNX Runtime on one core,
    a 3x3 sub-pixel stage costs 4x the MACs and twice the time for the same output.
    """
    return nn.ConvTranspose2d(
        in_channels, out_channels, kernel, stride=2, padding=kernel // 2, output_padding=1
    )


class AnalysisTransform(nn.Sequential):
    """(B, 3, H, W) RGB in [0, 1] -> (B, latent, H/16, W/16)."""

    def __init__(self, channels: int, latent: int) -> None:
        super().__init__(
            conv(3, channels, 5),
            GDN(channels),
            conv(channels, channels, 3),
            GDN(channels),
            conv(channels, channels, 3),
            GDN(channels),
            conv(channels, latent, 3),
        )


class SynthesisTransform(nn.Sequential):
    """(B, latent, h, w) -> (B, 3, 16h, 16w), unclamped (the loss sees the raw output)."""

    def __init__(self, channels: int, latent: int) -> None:
        super().__init__(
            deconv(latent, channels, 3),
            GDN(channels, inverse=True),
            deconv(channels, channels, 3),
            GDN(channels, inverse=True),
            deconv(channels, channels, 3),
            GDN(channels, inverse=True),
            deconv(channels, 3, 5),
        )


class GainUnits(nn.Module):
    """Per-quality channel gains on the latent and their learned inverses (Cui et al. 2021).

    Stored as logarithms so they stay positive under Adam. Initialised a factor sqrt(2) apart
    per quality level (gain 1 in the middle), so that the levels start ordered from coarse to
    fine quantisation and training only has to refine them.
    """

    def __init__(self, qualities: int, channels: int) -> None:
        super().__init__()
        levels = (torch.arange(qualities, dtype=torch.float32) - (qualities - 1) / 2) * (0.5 * math.log(2))
        self.log_gain = nn.Parameter(levels[:, None].repeat(1, channels))
        self.log_inverse_gain = nn.Parameter(-levels[:, None].repeat(1, channels))

    def gain(self, index: int) -> Tensor:
        return self.log_gain[index].exp().view(1, -1, 1, 1)

    def inverse_gain(self, index: int) -> Tensor:
        return self.log_inverse_gain[index].exp().view(1, -1, 1, 1)


class FaceCodecModel(CompressionModel):
    """The variable-rate face codec; `quality` runs from 1 (fewest bytes) to `arch.qualities`."""

    def __init__(self, arch: CodecArch = CodecArch(), quality: int | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.g_a = AnalysisTransform(arch.encoder_channels, arch.latent_channels)
        self.g_s = SynthesisTransform(arch.decoder_channels, arch.latent_channels)
        self.gains = GainUnits(arch.qualities, arch.latent_channels)
        # init_scale 1 rather than CompressAI's 10: these latents start with a std of ~0.1-1, and a
        # density ten times too wide costs ~2.7 bpp that takes thousands of steps to unlearn
        # (measured: 1.2 bpp at step 20 instead of 2.7, same PSNR and cosine trajectory).
        self.entropy_bottlenecks = nn.ModuleList(
            EntropyBottleneck(arch.latent_channels, init_scale=1.0) for _ in range(arch.qualities)
        )
        self.quality = self._check_quality(quality if quality is not None else arch.qualities)

    def _check_quality(self, quality: int) -> int:
        if not 1 <= quality <= self.arch.qualities:
            raise ValueError(f"quality must be in 1..{self.arch.qualities}, got {quality}")
        return quality

    def _index(self, quality: int | None) -> int:
        return self._check_quality(self.quality if quality is None else quality) - 1

    @staticmethod
    def _check_size(x: Tensor) -> None:
        height, width = x.shape[-2:]
        if height % STRIDE or width % STRIDE:
            raise ValueError(f"input sides must be multiples of {STRIDE}, got {width}x{height}")

    def _quantised(self, y: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """The latent at one quality: (what the decoder sees, already times the inverse gain; the
        likelihoods of its symbols)."""
        bottleneck = self.entropy_bottlenecks[index]
        y = y * self.gains.gain(index)
        y_noisy, likelihoods = bottleneck(y)
        if self.training:
            # Mixed quantisation (Minnen & Singh 2020): the rate sees additive uniform noise (a
            # differentiable stand-in for rounding), but the decoder sees the latent rounded
            # around the medians, exactly as at inference, with a straight-through gradient.
            medians = bottleneck.quantiles[:, 0, 1].detach().view(1, -1, 1, 1)
            y_hat = y + (torch.round(y - medians) + medians - y).detach()
        else:
            y_hat = y_noisy  # in eval mode the bottleneck already rounded around the medians
        return y_hat * self.gains.inverse_gain(index), likelihoods

    def forward(
        self, x: Tensor, quality: int | None = None, region: Tensor | None = None, background: int | None = None
    ) -> dict[str, Tensor | dict[str, Tensor]]:
        """Training / evaluation pass: reconstruction and the latent's likelihoods (for the rate).

        With `region` (a boolean map of latent cells) and `background` (a quality), the cells
        outside the region are coded at the background quality, as the run time's bitstream v2
        codes them (`runtime.codecs.face_aware`: the crop's border ring at quality 1)."""
        self._check_size(x)
        index = self._index(quality)
        y = self.g_a(x)
        y_hat, likelihoods = self._quantised(y, index)
        if region is not None and background is not None:
            inside = region.to(device=y.device, dtype=torch.bool)[None, None]
            if inside.shape[-2:] != y.shape[-2:]:
                raise ValueError(f"region of {tuple(inside.shape[-2:])} cells for a latent of {tuple(y.shape[-2:])}")
            outside_hat, outside_likelihoods = self._quantised(y, self._index(background))
            y_hat = torch.where(inside, y_hat, outside_hat)
            likelihoods = torch.where(inside, likelihoods, outside_likelihoods)
        x_hat = self.g_s(y_hat)
        return {"x_hat": x_hat, "likelihoods": {"y": likelihoods}}

    @torch.no_grad()
    def compress(self, x: Tensor, quality: int | None = None) -> dict[str, list[list[bytes]] | torch.Size]:
        """Real bitstreams (one per image), with CompressAI's rANS coder; call `update()` first."""
        self._check_size(x)
        index = self._index(quality)
        y = self.g_a(x) * self.gains.gain(index)
        strings = self.entropy_bottlenecks[index].compress(y)
        return {"strings": [strings], "shape": y.shape[-2:]}

    @torch.no_grad()
    def decompress(
        self, strings: list[list[bytes]], shape: torch.Size, quality: int | None = None
    ) -> dict[str, Tensor]:
        index = self._index(quality)
        y_hat = self.entropy_bottlenecks[index].decompress(strings[0], shape)
        x_hat = self.g_s(y_hat * self.gains.inverse_gain(index)).clamp(0, 1)
        return {"x_hat": x_hat}

    def main_parameters(self) -> list[nn.Parameter]:
        """Everything the rate-distortion-identity loss trains (all but the bottlenecks' quantiles
        and what is frozen)."""
        return [p for name, p in self.named_parameters() if not name.endswith(".quantiles") and p.requires_grad]

    def aux_parameters(self) -> list[nn.Parameter]:
        """The bottlenecks' quantiles: trained by the auxiliary loss only (CompressAI convention)."""
        return [p for name, p in self.named_parameters() if name.endswith(".quantiles")]


#: The registry: name -> architecture. Rate points are the qualities of one model.
CODEC_MODELS: dict[str, CodecArch] = {
    "default": CodecArch(encoder_channels=64, decoder_channels=96, latent_channels=128, qualities=5),
    # The default grown (`widen.widen_codec`): an analysis transform with 1.5x the channels (2.2x
    # the MACs, still inside the board's 5 ms) and a decoder with 1.5x (the cloud's 10 ms).
    "wide": CodecArch(encoder_channels=96, decoder_channels=144, latent_channels=128, qualities=5),
}


def create_codec_model(name: str = "default", quality: int | None = None) -> FaceCodecModel:
    """A freshly initialised codec of a registered architecture, set to `quality` (default: best)."""
    if name not in CODEC_MODELS:
        raise KeyError(f"unknown codec model {name!r}; known: {', '.join(sorted(CODEC_MODELS))}")
    return FaceCodecModel(CODEC_MODELS[name], quality)
