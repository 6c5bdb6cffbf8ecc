"""The query model: a slimmed MobileFaceNet that runs on the ArcFace face region at 64x64.

Where the cost goes. MobileFaceNet spends ~85% of its 234 MMACs (counted on its ONNX graph by
`facelink.export.flops`) in the 1x1 convolutions of its inverted-residual bottlenecks, and the
MACs of every layer scale with the pixels of its feature map. The query model keeps the
MobileFaceNet topology (stem, 5 + 7 + 3 bottlenecks, 512-channel head, global depthwise
convolution, 128-d linear embedding) but

* reads the ArcFace 112x112 region downscaled to 64x64: (64/112)^2 = 0.33 of the pixels, so
  feature maps of 32, 16, 8 and 4 px instead of 56, 28, 14 and 7, and a 4x4 global depthwise
  kernel instead of 7x7;
* keeps half of each bottleneck's expansion channels (`expand_keep`), the channels the block
  adds back into the residual stream -- the stream widths (64, 128) stay, so the pruned network
  still starts from MobileFaceNet's own weights (`init_from_mobilefacenet`).

Together: 42.0 MMACs against MobileFaceNet's 233.8 (5.6x fewer), 0.56 M parameters (2.3 MB
fp32).
Only Conv (dense, depthwise, 1x1), ReLU/ReLU6 (Clip), Add and Flatten: ops that every
ARM/Jetson runtime (ONNX Runtime, TensorRT, TFLite, NCNN) runs natively and fuses.

Why start from MobileFaceNet's weights: the query model is trained on ~9,000 faces, far too
few to learn face features from scratch; the deployed MobileFaceNet already has them.
Shrinking its input and pruning its expansion channels by measured importance keeps most of
what it knows, and distillation then adapts the rest to the smaller input.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..onnx_weights import conv_weights

#: MobileFaceNet's bottlenecks: (input channels, expansion channels, output channels, stride).
MOBILEFACENET_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (64, 128, 64, 2), *((64, 128, 64, 1),) * 4,
    (64, 256, 128, 2), *((128, 256, 128, 1),) * 6,
    (128, 512, 128, 2), *((128, 256, 128, 1),) * 2,
)
STEM_CHANNELS = 64
#: The network's total stride: the head sees a ceil(input / 16) square map.
TOTAL_STRIDE = 16
#: Input normalisation, MobileFaceNet's (ImageNet mean/std on RGB in [0, 1]): kept because the
#: weights start from MobileFaceNet's.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class QueryArch:
    input_size: int = 64        # side of the square input: the ArcFace 112 region scaled to it
    expand_keep: float = 0.5    # fraction of each bottleneck's expansion channels kept
    head_channels: int = 512    # the 1x1 convolution before the global depthwise one
    dim: int = 128              # embedding size

    @property
    def feature_size(self) -> int:
        """Side of the last feature map (the global depthwise kernel's size)."""
        return math.ceil(self.input_size / TOTAL_STRIDE)

    def blocks(self) -> list[tuple[int, int, int, int]]:
        return [(cin, _round8(expand * self.expand_keep), cout, stride) for cin, expand, cout, stride in MOBILEFACENET_BLOCKS]

    def to_dict(self) -> dict:
        return asdict(self)


def _round8(channels: float) -> int:
    """Channel counts in multiples of 8: what NEON/CUDA kernels vectorise over."""
    return max(8, int(round(channels / 8)) * 8)


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Bias instead of BatchNorm: MobileFaceNet's deployed graph has its BatchNorms folded into the
    # convolutions, which is the form we start from and the form we export.
    return nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=True)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, linear 1x1 project."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = _conv(cin, expand)
        self.depthwise = _conv(expand, expand, 3, stride, groups=expand)
        self.project = _conv(expand, cout)
        self.act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.project(self.act(self.depthwise(self.act(self.expand(x)))))
        return x + y if self.residual else y


class QueryNet(nn.Module):
    """(B, 3, S, S) normalised RGB -> (B, dim) embedding (not normalised: the runtime does it)."""

    def __init__(self, arch: QueryArch = QueryArch()) -> None:
        super().__init__()
        self.arch = arch
        self.stem = _conv(3, STEM_CHANNELS, 3, 2)
        self.stem_dw = _conv(STEM_CHANNELS, STEM_CHANNELS, 3, groups=STEM_CHANNELS)
        self.stem_pw = _conv(STEM_CHANNELS, STEM_CHANNELS)
        self.blocks = nn.Sequential(*(Bottleneck(*spec) for spec in arch.blocks()))
        last = MOBILEFACENET_BLOCKS[-1][2]
        self.head = _conv(last, arch.head_channels)
        k = arch.feature_size
        self.gdconv = nn.Conv2d(arch.head_channels, arch.head_channels, k, groups=arch.head_channels, bias=True)
        self.embed = _conv(arch.head_channels, arch.dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.clamp(self.stem(x), 0, 6)
        x = torch.relu(self.stem_pw(torch.relu(self.stem_dw(x))))
        x = self.blocks(x)
        x = self.gdconv(torch.clamp(self.head(x), 0, 6))
        return torch.flatten(self.embed(x), 1)

    def convolutions(self) -> list[nn.Conv2d]:
        """Every convolution in MobileFaceNet's ONNX graph order."""
        return [m for m in self.modules() if isinstance(m, nn.Conv2d)]


#: name -> architecture. A new query model is a new entry (and a new manifest), never an edit.
QUERY_MODELS: dict[str, QueryArch] = {
    "mfn64-half": QueryArch(input_size=64, expand_keep=0.5),
    # MobileFaceNet's full width at 64 px: 76 M MACs a pass. Within the 4x budget only in one
    # pass a face (6.1x fewer than MobileFaceNet with its mirror pass; 3.1x with one of its own),
    # so it is exported with `--no-flip`.
    "mfn64": QueryArch(input_size=64, expand_keep=1.0),
    # Half the expansion channels at 96 px: 94 M MACs a pass (4.9x fewer than MobileFaceNet's
    # two), trading width for the resolution at which MobileFaceNet's filters were trained.
    "mfn96-half": QueryArch(input_size=96, expand_keep=0.5),
    # Full width at 72 px (feature maps 36, 18, 9, 5): the largest input in the 4x budget with one
    # pass a face (80 px costs 1.56x mfn64, over it). Meant to continue an mfn64 run (`--init`).
    "mfn72": QueryArch(input_size=72, expand_keep=1.0),
}
DEFAULT_QUERY_MODEL = "mfn64-half"


def create_query_model(name: str = DEFAULT_QUERY_MODEL) -> QueryNet:
    if name not in QUERY_MODELS:
        raise KeyError(f"no query model {name!r}; known: {', '.join(sorted(QUERY_MODELS))}")
    return QueryNet(QUERY_MODELS[name])


# -- initialisation from MobileFaceNet -----------------------------------------------------------------
def full_mobilefacenet(onnx_path: str | Path, input_size: int = 112) -> QueryNet:
    """MobileFaceNet itself as a QueryNet (expand_keep 1): the source the pruned model is cut from.

    At 112 px it reproduces the ONNX model's output (the tests check it), which proves the layer
    mapping before any pruning relies on it.
    """
    net = QueryNet(QueryArch(input_size=input_size, expand_keep=1.0))
    weights = conv_weights(onnx_path)  # MobileFaceNet's deployed graph: BatchNorm folded
    convs = net.convolutions()
    if len(weights) != len(convs):
        raise ValueError(f"{onnx_path}: {len(weights)} convolutions, the MobileFaceNet topology has {len(convs)}")
    with torch.no_grad():
        for conv, (weight, bias) in zip(convs, weights):
            weight_t = torch.from_numpy(weight.copy())
            if conv is net.gdconv and weight_t.shape != conv.weight.shape:
                weight_t = resample_gdconv(weight_t, conv.weight.shape[-1])
            if weight_t.shape != conv.weight.shape:
                raise ValueError(f"{onnx_path}: weight {tuple(weight.shape)} where {tuple(conv.weight.shape)} is expected")
            conv.weight.copy_(weight_t)
            conv.bias.copy_(torch.from_numpy(bias.copy()))
    return net


def resample_gdconv(weight: Tensor, size: int) -> Tensor:
    """A (C, 1, k, k) global depthwise kernel resampled to (C, 1, size, size).

    The kernel weighs each position of the last feature map; on a map of another size each new
    cell covers (k / size)^2 old ones, so we area-average and scale by that ratio: a feature map
    that is the same smooth function of position gives the same output (on a larger map the
    average runs over the old cells each new one overlaps).
    """
    k = weight.shape[-1]
    resized = nn.functional.adaptive_avg_pool2d(weight, size)
    return resized * (k / size) ** 2


@torch.no_grad()
def expansion_statistics(net: QueryNet, images: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per bottleneck, per expansion channel: (mean activation, importance) on `images`.

    The activation is the channel's output after the depthwise ReLU6 (what the projection reads);
    importance is its mean times the L2 norm of the channel's column in the projection: a channel
    that rarely fires or whose projection is small changes the residual stream little, and is the
    one to prune.
    """
    activations: list[Tensor] = []
    hooks = [block.depthwise.register_forward_hook(_mean_relu6(activations)) for block in net.blocks]
    net.eval()
    net(images)
    for hook in hooks:
        hook.remove()
    return [(act, act * block.project.weight[:, :, 0, 0].norm(dim=0)) for act, block in zip(activations, net.blocks)]


def _mean_relu6(store: list[Tensor]) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store.append(output.clamp(0, 6).mean(dim=(0, 2, 3)))
    return hook


@torch.no_grad()
def init_from_mobilefacenet(net: QueryNet, onnx_path: str | Path, images: Tensor) -> QueryNet:
    """Copy MobileFaceNet's weights into `net`, keeping each bottleneck's most important channels.

    `images`: a batch of normalised faces at `net`'s input size, on which importance is measured
    (a few hundred training faces are plenty). Returns `net`.
    """
    source = full_mobilefacenet(onnx_path, net.arch.input_size)
    statistics = expansion_statistics(source, images)
    for name in ("stem", "stem_dw", "stem_pw", "head", "gdconv", "embed"):
        getattr(net, name).load_state_dict(getattr(source, name).state_dict())
    for block, full, (mean, score) in zip(net.blocks, source.blocks, statistics):
        keep = torch.zeros_like(score, dtype=torch.bool)
        keep[torch.topk(score, block.expand.out_channels).indices] = True
        block.expand.weight.copy_(full.expand.weight[keep])
        block.expand.bias.copy_(full.expand.bias[keep])
        block.depthwise.weight.copy_(full.depthwise.weight[keep])
        block.depthwise.bias.copy_(full.depthwise.bias[keep])
        projection = full.project.weight[:, :, 0, 0]
        block.project.weight.copy_(full.project.weight[:, keep])
        # The dropped channels' average contribution moves into the bias, so the block's output
        # keeps its mean and the layers after it see the statistics they were trained on.
        block.project.bias.copy_(full.project.bias + projection[:, ~keep] @ mean[~keep])
    return net
