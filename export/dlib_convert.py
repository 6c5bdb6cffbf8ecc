"""Convert dlib's ResNet face recogniser to torch and ONNX, and check it against dlib itself.

dlib's 128-d recogniser (`dlib_face_recognition_resnet_model_v1.dat`, PyPI package
face_recognition_models) costs ~65 ms per face through dlib. This module reads dlib's binary
serialization of that network without dlib, rebuilds it as a torch `nn.Module`, exports ONNX
(opset 17, dynamic batch) and verifies the export against dlib's own descriptors on LFW:

    python -m facelink.export.dlib_convert --out ~/.cache/facelink/models/dlib-resnet.onnx

The ONNX file is derived from a PyPI package and is not committed: the manifest
`runtime/manifests/dlib-resnet-onnx.json` points at `${cache}/models/dlib-resnet.onnx`.

The network (dlib's examples/dnn_face_recognition_ex.cpp, `anet_type`), input end first:
con 7x7/2 (32) -> affine -> relu -> max_pool 3x3/2 -> 14 residual blocks -> avg_pool_everything
-> fc 128 (no bias) -> loss_metric (no parameters). Blocks: 3 x 32; 64 (down) + 3 x 64;
128 (down) + 2 x 128; 256 (down) + 2 x 256; 256 (down). `affine` is batch norm frozen into a
per-channel scale and shift.

Format references (dlib sources): dlib/serialize.h (integers, bools, strings), dlib/float_details.h
(floats), dlib/dnn/tensor.h (tensors), dlib/dnn/core.h (add_layer, add_tag_layer,
add_skip_layer, add_loss_layer), dlib/dnn/layers.h (con_, affine_, relu_, max_pool_,
avg_pool_, add_prev_, fc_), dlib/dnn/input.h (input_rgb_image_sized), dlib/dnn/loss.h.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:  # torch is only needed to convert, never to run the result
    import torch

DAT_NAME = "dlib_face_recognition_resnet_model_v1.dat"
MANIFEST_NAME = "dlib-resnet-onnx"
OPSET = 17
INPUT_SIZE = 150  # input_rgb_image_sized<150>

# The residual blocks, input end first: (filters, downsample). From `anet_type`:
# alevel4 = ares<32> x3, alevel3 = ares_down<64> + ares<64> x3, alevel2 = ares_down<128> + ares<128> x2,
# alevel1 = ares_down<256> + ares<256> x2, alevel0 = ares_down<256>.
BLOCKS: tuple[tuple[int, bool], ...] = (
    ((32, False),) * 3
    + ((64, True),) + ((64, False),) * 3
    + ((128, True),) + ((128, False),) * 2
    + ((256, True),) + ((256, False),) * 2
    + ((256, True),)
)
EMBEDDING_DIM = 128


class DlibFormatError(ValueError):
    """The file is not the dlib network this converter knows how to read."""


# --- dlib's serialization primitives ------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise DlibFormatError(f"unexpected end of file at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def read_int(self) -> int:
        # serialize.h pack_int: a control byte (bit 0x80 = negative, low 4 bits = byte count,
        # bits 0x70 always 0), then |value| little-endian in that many bytes. Zero is "01 00".
        control = self._take(1)[0]
        size = control & 0x0F
        if control & 0x70 or size > 8:
            raise DlibFormatError(f"bad integer control byte 0x{control:02x} at byte {self.pos - 1}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def read_bool(self) -> bool:
        # serialize.h: a bool is the ASCII character '1' or '0'.
        char = self._take(1)
        if char not in (b"0", b"1"):
            raise DlibFormatError(f"bad bool {char!r} at byte {self.pos - 1}")
        return char == b"1"

    def read_string(self) -> str:
        # std::string: its length as an integer, then the raw characters.
        return self._take(self.read_int()).decode("latin-1")

    def read_float(self) -> float:
        # float_details (portable across float formats): the int64 mantissa then the int16
        # exponent, each as an integer above; value = mantissa * 2**exponent, except that
        # exponents 32000/32001/32002 mean inf/-inf/nan. A first byte with any bit of 0x70 set
        # is dlib's older ASCII float format (those bits are always 0 in a control byte); models
        # saved by dlib's DNN code never use it.
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise DlibFormatError(f"old ASCII float format at byte {self.pos}: not supported")
        mantissa, exponent = self.read_int(), self.read_int()
        special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        return special[exponent] if exponent in special else math.ldexp(mantissa, exponent)

    def read_tensor(self) -> np.ndarray:
        # tensor.h: version, then num_samples, k, nr, nc (NCHW), then the values. Version 2
        # writes them as raw little-endian IEEE float32 (compact; this model uses it); the older
        # version 1 wrote each value as a float_details.
        version = self.read_int()
        shape = tuple(self.read_int() for _ in range(4))
        count = math.prod(shape)
        if version == 2:
            values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        elif version == 1:
            values = np.array([self.read_float() for _ in range(count)], dtype=np.float32)
        else:
            raise DlibFormatError(f"unknown tensor version {version}")
        return values.reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        # An alias_tensor is a view into a layer's params: version 1 and its four dimensions.
        self.expect_version("alias_tensor", {1})
        n, k, nr, nc = (self.read_int() for _ in range(4))
        return n, k, nr, nc

    def expect_version(self, what: str, allowed: set[int]) -> int:
        version = self.read_int()
        if version not in allowed:
            raise DlibFormatError(f"{what}: version {version} at byte {self.pos}, expected one of {sorted(allowed)}")
        return version

    def at_end(self) -> bool:
        return self.pos == len(self.data)


# --- the layers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Conv:
    weight: np.ndarray  # (out, in, kh, kw), same layout as torch
    bias: np.ndarray    # (out,)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Affine:
    gamma: np.ndarray  # (C,): y = x * gamma + beta per channel
    beta: np.ndarray


@dataclass(frozen=True)
class Pool:
    kind: str  # "max" or "avg"
    window: tuple[int, int]  # (0, 0) = the whole input (avg_pool_everything)
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Fc:
    weight: np.ndarray  # (out, in), torch's nn.Linear layout
    bias: np.ndarray | None


@dataclass(frozen=True)
class Relu:
    pass


@dataclass(frozen=True)
class AddPrev:
    pass


Layer = Union[Conv, Affine, Pool, Fc, Relu, AddPrev]


@dataclass(frozen=True)
class DlibNet:
    mean_rgb: tuple[float, float, float]  # input_rgb_image_sized: x = (pixel - mean) / 256
    input_size: tuple[int, int]
    layers: list[Layer]  # computational layers, input end first
    margin: float  # loss_metric's training settings, kept for the record
    distance_threshold: float


def _read_layer(r: _Reader) -> Layer:
    """One layer's details: each starts with its type name, which doubles as the format version."""
    name = r.read_string()
    if name == "con_4":
        # layers.h con_ ("con_4"): params (all filters, then the biases, one flat tensor),
        # num_filters, nr, nc, stride_y, stride_x, padding_y, padding_x, the filters and biases
        # alias_tensors (shapes into params), then four learning-rate/weight-decay multipliers.
        params = r.read_tensor().ravel()
        _filters, _nr, _nc = r.read_int(), r.read_int(), r.read_int()
        stride = (r.read_int(), r.read_int())
        padding = (r.read_int(), r.read_int())
        wshape, bshape = r.read_alias_tensor(), r.read_alias_tensor()
        for _ in range(4):
            r.read_float()
        nw = math.prod(wshape)
        return Conv(params[:nw].reshape(wshape), params[nw : nw + math.prod(bshape)].copy(), stride, padding)
    if name == "affine_":
        # affine_: params (gamma then beta), the gamma and beta alias_tensors, and the mode:
        # 0 = CONV_MODE (one scale/shift per channel), 1 = FC_MODE (one per element).
        params = r.read_tensor().ravel()
        gshape, bshape = r.read_alias_tensor(), r.read_alias_tensor()
        mode = r.read_int()
        if mode != 0:
            raise DlibFormatError("affine_ in FC_MODE: only per-channel (CONV_MODE) affine layers are supported")
        ng = math.prod(gshape)
        return Affine(params[:ng].copy(), params[ng : ng + math.prod(bshape)].copy())
    if name in ("max_pool_2", "avg_pool_2"):
        # pooling "_2": nr, nc (0 = the whole input), stride_y, stride_x, padding_y, padding_x.
        window = (r.read_int(), r.read_int())
        stride = (r.read_int(), r.read_int())
        padding = (r.read_int(), r.read_int())
        return Pool(name[:3], window, stride, padding)
    if name == "fc_2":
        # fc_ ("fc_2"): num_outputs, num_inputs, params, weights and biases alias_tensors,
        # bias_mode (0 = FC_HAS_BIAS, 1 = FC_NO_BIAS), four multipliers. The weights are a
        # (num_inputs, num_outputs) matrix and the layer computes x @ W: torch wants W.T.
        outputs, inputs = r.read_int(), r.read_int()
        params = r.read_tensor().ravel()
        wshape, bshape = r.read_alias_tensor(), r.read_alias_tensor()
        bias_mode = r.read_int()
        for _ in range(4):
            r.read_float()
        if math.prod(wshape) != inputs * outputs:
            raise DlibFormatError(f"fc_ weights {wshape} do not hold {inputs}x{outputs} values")
        nw = inputs * outputs
        bias = params[nw : nw + outputs].copy() if bias_mode == 0 and math.prod(bshape) == outputs else None
        return Fc(params[:nw].reshape(inputs, outputs).T.copy(), bias)
    if name == "relu_":
        return Relu()  # no parameters, only the name
    if name == "add_prev_":
        return AddPrev()  # which tag it adds is in the type, not the file: see _wrappers()
    raise DlibFormatError(f"unsupported dlib layer {name!r}: this reader knows the layer versions of anet_type")


def _wrappers() -> list[str]:
    """What `anet_type` expands to, input end first: layer details or tag1/tag2/skip1 wrappers.

    The file does not name its wrappers (every wrapper is just a version integer), so the
    architecture has to come from the C++ type. `ares<N>` is relu<add_prev1<block<tag1<S>>>>,
    `ares_down<N>` is relu<add_prev2<avg_pool<2,2,2,2,skip1<tag2<block<stride 2, tag1<S>>>>>>>,
    and block is affine<con 3x3/1<relu<affine<con 3x3/stride>>>>.
    """
    kinds = ["con_", "affine_", "relu_", "max_pool_"]
    for _filters, down in BLOCKS:
        kinds += ["tag1", "con_", "affine_", "relu_", "con_", "affine_"]
        if down:
            kinds += ["tag2", "skip1", "avg_pool_"]
        kinds += ["add_prev_", "relu_"]
    return kinds + ["avg_pool_", "fc_"]


_LAYER_KINDS: dict[type, str] = {Conv: "con_", Affine: "affine_", Relu: "relu_", AddPrev: "add_prev_", Fc: "fc_"}


def read_dlib_net(path: str | os.PathLike[str]) -> DlibNet:
    """Parse the .dat file (written by dlib's `serialize(net)`) into plain numpy arrays."""
    r = _Reader(Path(path).read_bytes())
    # add_loss_layer: version 1, the loss details, then the network under it.
    r.expect_version("add_loss_layer", {1})
    loss = r.read_string()
    if loss != "loss_metric_2":
        raise DlibFormatError(f"expected a loss_metric network, found {loss!r}")
    margin, distance_threshold = r.read_float(), r.read_float()

    # Every add_layer writes its version, then its whole subnetwork, then its own details; so
    # the file holds all the wrappers' versions top-down first, and the details input end first.
    kinds = _wrappers()
    versions: list[int] = []
    for depth, kind in enumerate(reversed(kinds)):
        if kind in ("tag1", "tag2", "skip1"):
            allowed = {1}  # add_tag_layer / add_skip_layer: version 1, no details of their own
        elif depth == len(kinds) - 1:
            allowed = {2, 3}  # the add_layer right on the input layer (3 adds sample_expansion_factor)
        else:
            allowed = {1, 2}  # version 2 adds params_grad
        versions.append(r.expect_version(f"wrapper {kind} at depth {depth}", allowed))
    versions.reverse()

    # input_rgb_image_sized: the name, avg_red, avg_green, avg_blue (floats), NR, NC.
    if (name := r.read_string()) != "input_rgb_image_sized":
        raise DlibFormatError(f"expected input_rgb_image_sized, found {name!r}")
    mean = (r.read_float(), r.read_float(), r.read_float())
    size = (r.read_int(), r.read_int())

    layers: list[Layer] = []
    for index, (kind, version) in enumerate(zip(kinds, versions)):
        if kind in ("tag1", "tag2", "skip1"):
            continue
        layer = _read_layer(r)
        found = f"{layer.kind}_pool_" if isinstance(layer, Pool) else _LAYER_KINDS[type(layer)]
        if found != kind:
            raise DlibFormatError(f"layer {index}: found {found}, anet_type has {kind} there")
        # Then the add_layer's state: this_layer_setup_called, gradient_input_is_stale,
        # get_output_and_gradient_input_disabled (bools), x_grad and cached_output (tensors,
        # empty in a saved model), and params_grad (version 2) or, for the layer on the input,
        # grad_final plus, from version 3, _sample_expansion_factor.
        for _ in range(3):
            r.read_bool()
        r.read_tensor(), r.read_tensor()
        if index == 0:
            r.read_tensor()
            if version >= 3:
                r.read_int()
        elif version == 2:
            r.read_tensor()
        layers.append(layer)
    if not r.at_end():
        raise DlibFormatError(f"{len(r.data) - r.pos} unread bytes after the network")
    return DlibNet(mean, size, layers, margin, distance_threshold)


# --- torch -----------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _torch_modules():  # noqa: ANN202 - defines the classes lazily so that reading needs no torch
    import torch
    import torch.nn.functional as F
    from torch import nn

    class AffineLayer(nn.Module):
        """dlib's affine_ (CONV_MODE): batch norm frozen into a per-channel scale and shift."""

        def __init__(self, channels: int) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
            self.shift = nn.Parameter(torch.zeros(1, channels, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + self.shift

    def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
        return (size + 2 * padding - kernel) // stride + 1  # floor, like dlib and torch

    class ResidualBlock(nn.Module):
        """ares / ares_down: relu(block(x) + shortcut(x)), with dlib's add_prev size rules."""

        def __init__(self, in_channels: int, channels: int, downsample: bool, in_size: int) -> None:
            super().__init__()
            stride = 2 if downsample else 1
            # dlib's con_ pads by kernel/2 when the stride is 1 and not at all otherwise.
            self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1 if stride == 1 else 0)
            self.affine1 = AffineLayer(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1)
            self.affine2 = AffineLayer(channels)
            # The shortcut is avg_pool<2,2,2,2> (no padding) of the input when downsampling.
            self.pool = nn.AvgPool2d(2, 2) if downsample else nn.Identity()
            main = conv_out(in_size, 3, stride, self.conv1.padding[0])
            short = conv_out(in_size, 2, 2, 0) if downsample else in_size
            # add_prev adds tensors of different shapes into one of the largest of each
            # dimension, zero-filling what a tensor lacks at the end (bottom/right, last
            # channels). Here: 8x8 -> conv 3x3/2 gives 3x3 but the 2x2/2 pool gives 4x4, and
            # 4x4 -> 1x1 vs 2x2; the shortcut also has fewer channels. The pads are static so
            # the ONNX graph gets constant Pad nodes.
            self.out_size = max(main, short)
            self.pad_main = self.out_size - main
            self.pad_short = self.out_size - short
            self.pad_channels = channels - in_channels

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
            s = self.pool(x)
            if self.pad_main:
                y = F.pad(y, (0, self.pad_main, 0, self.pad_main))
            if self.pad_short or self.pad_channels:
                s = F.pad(s, (0, self.pad_short, 0, self.pad_short, 0, self.pad_channels))
            return F.relu(y + s)

    class DlibFaceResNet(nn.Module):
        """dlib's `anet_type`. Input: (N, 3, 150, 150) RGB, normalised as dlib's input layer,
        (pixel - mean) / 256. Output: the raw 128-d descriptor (dlib does not normalise it)."""

        def __init__(self, size: int = INPUT_SIZE) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 32, 7, 2, padding=0)  # stride 2: dlib does not pad
            self.affine = AffineLayer(32)
            self.pool = nn.MaxPool2d(3, 2)  # max_pool<3,3,2,2>: no padding either
            size = conv_out(conv_out(size, 7, 2, 0), 3, 2, 0)
            blocks, channels = [], 32
            for filters, down in BLOCKS:
                blocks.append(ResidualBlock(channels, filters, down, size))
                channels, size = filters, blocks[-1].out_size
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(channels, EMBEDDING_DIM, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.pool(F.relu(self.affine(self.conv(x))))
            x = self.blocks(x)
            return self.fc(x.mean(dim=(2, 3)))  # avg_pool_everything, then fc_no_bias

    return DlibFaceResNet


def build_torch(net: DlibNet) -> torch.nn.Module:
    """The torch module with dlib's weights, in eval mode."""
    import torch

    model = _torch_modules()()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    affines = [m for m in model.modules() if type(m).__name__ == "AffineLayer"]
    fcs = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # modules() walks in definition order, which is the input-end-first order of the file.
    by_type: dict[type, list] = {Conv: [], Affine: [], Fc: []}
    for layer in net.layers:
        if type(layer) in by_type:
            by_type[type(layer)].append(layer)
    if (len(by_type[Conv]), len(by_type[Affine]), len(by_type[Fc])) != (len(convs), len(affines), len(fcs)):
        raise DlibFormatError("the file's layer counts do not match the torch module")
    with torch.no_grad():
        for module, layer in zip(convs, by_type[Conv]):
            ours = (tuple(module.weight.shape), module.stride, module.padding)
            if ours != (layer.weight.shape, layer.stride, layer.padding):
                raise DlibFormatError(
                    f"conv mismatch: torch {tuple(module.weight.shape)} /{module.stride} pad {module.padding}, "
                    f"dlib {layer.weight.shape} /{layer.stride} pad {layer.padding}"
                )
            module.weight.copy_(torch.from_numpy(layer.weight))
            module.bias.copy_(torch.from_numpy(layer.bias))
        for module, layer in zip(affines, by_type[Affine]):
            module.scale.copy_(torch.from_numpy(layer.gamma).view(module.scale.shape))
            module.shift.copy_(torch.from_numpy(layer.beta).view(module.shift.shape))
        (fc,), (fc_layer,) = fcs, by_type[Fc]
        if fc.weight.shape != fc_layer.weight.shape or fc_layer.bias is not None:
            raise DlibFormatError(f"fc mismatch: torch {tuple(fc.weight.shape)}, dlib {fc_layer.weight.shape}")
        fc.weight.copy_(torch.from_numpy(fc_layer.weight))
    pools = [layer for layer in net.layers if isinstance(layer, Pool)]
    expected_pools = [Pool("max", (3, 3), (2, 2), (0, 0))] + [Pool("avg", (2, 2), (2, 2), (0, 0))] * sum(
        d for _, d in BLOCKS
    ) + [Pool("avg", (0, 0), (1, 1), (0, 0))]
    if pools != expected_pools:
        raise DlibFormatError(f"pooling layers differ from anet_type: {pools}")
    return model.eval()


def normalise(chips: np.ndarray, mean_rgb: tuple[float, float, float]) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> the network input, exactly as input_rgb_image_sized does it:
    (pixel - avg) / 256 in float32, NCHW."""
    x = (chips.astype(np.float32) - np.asarray(mean_rgb, dtype=np.float32)) / np.float32(256.0)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --- ONNX --------------------------------------------------------------------------------------------
def _constant_pad_symbolic(g, input, pad, mode, value):  # noqa: ANN001, ANN202 - torch's symbolic API
    """aten::pad with constant amounts -> one ONNX Pad whose `pads` is a constant.

    The stock opset >= 11 symbolic computes `pads` with a Slice of step -1, which the exporter's
    constant folding cannot fold, so every Pad would sit behind a ConstantOfShape/Concat/
    Reshape/Slice/Transpose/Cast chain; TensorRT and graph tools want constant pads.
    """
    import torch
    from torch.onnx import symbolic_helper

    if symbolic_helper._parse_arg(mode, "s") != "constant" or not symbolic_helper._is_none(value):
        raise NotImplementedError("only zero padding is exported")
    amounts = symbolic_helper._parse_arg(pad, "is")
    rank = symbolic_helper._get_tensor_rank(input)
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(amounts) // 2):  # torch lists (begin, end) pairs from the last dimension back
        begins[rank - 1 - i], ends[rank - 1 - i] = amounts[2 * i], amounts[2 * i + 1]
    pads = g.op("Constant", value_t=torch.tensor(begins + ends, dtype=torch.int64))
    return g.op("Pad", input, pads, mode_s="constant")


def export_onnx(model: torch.nn.Module, out: Path) -> Path:
    """ONNX opset 17 with a dynamic batch axis; input "input" (N,3,150,150), output "embedding"."""
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.onnx.register_custom_op_symbolic("aten::pad", _constant_pad_symbolic, OPSET)
    try:
        with warnings.catch_warnings():
            # dynamo=False, knowingly: the TorchScript exporter (deprecated since torch 2.9)
            # needs no onnxscript and writes the same bytes for the same weights.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE),),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["embedding"],
                dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                do_constant_folding=True,
            )
        import onnx

        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.replace(out)  # never leave a half-written file where the manifest looks
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::pad", OPSET)
        tmp.unlink(missing_ok=True)
    return out


def ort_session(path: Path, threads: int = 1):  # noqa: ANN201 - onnxruntime is untyped
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def convert(dat: Path, out: Path, torch_out: Path | None = None) -> tuple[DlibNet, torch.nn.Module]:
    """Read the .dat, build the torch module, write the ONNX file (and the torch weights)."""
    import torch

    net = read_dlib_net(dat)
    model = build_torch(net)
    export_onnx(model, out)
    if torch_out is not None:
        torch_out.parent.mkdir(parents=True, exist_ok=True)
        # A state_dict, not a pickled module: load it into `torch_model()`.
        torch.save({"state_dict": model.state_dict(), "mean_rgb": net.mean_rgb, "scale": 256.0}, torch_out)
    return net, model


def torch_model(weights: Path | None = None) -> torch.nn.Module:
    """An empty DlibFaceResNet, or one loaded from a `--torch-out` file."""
    import torch

    model = _torch_modules()()
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu")["state_dict"])
    return model.eval()


# --- verification against dlib ----------------------------------------------------------------------
def lfw_chips(lfw_dir: Path, count: int) -> tuple[list[np.ndarray], list[Path]]:
    """dlib's own 150x150 face chips for `count` LFW images: HOG, the 5-point shape predictor and
    get_face_chip(size=150, padding=0.25), as face_recognition and dlib's examples do.
    One image per person, people in name order, so the faces are fixed and varied."""
    import cv2

    from facelink.runtime.dlib_models import dlib_model_path, import_dlib

    dlib = import_dlib()
    hog = dlib.get_frontal_face_detector()
    shape5 = dlib.shape_predictor(str(dlib_model_path("shape_predictor_5_face_landmarks.dat")))
    chips, paths = [], []
    for person in sorted(p for p in lfw_dir.iterdir() if p.is_dir()):
        image = min(person.glob("*.jpg"), default=None)
        if image is None:
            continue
        rgb = cv2.cvtColor(cv2.imread(str(image)), cv2.COLOR_BGR2RGB)
        rects = hog(rgb, 1)
        if len(rects) == 0:
            continue
        rect = max(rects, key=lambda r: r.area())
        chips.append(np.asarray(dlib.get_face_chip(rgb, shape5(rgb, rect), size=INPUT_SIZE, padding=0.25)))
        paths.append(image)
        if len(chips) == count:
            break
    return chips, paths


@dataclass(frozen=True)
class Parity:
    min_cosine: float
    mean_cosine: float
    max_abs_error: float

    @classmethod
    def of(cls, reference: np.ndarray, other: np.ndarray) -> Parity:
        cos = np.sum(reference * other, 1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(other, axis=1))
        return cls(float(cos.min()), float(cos.mean()), float(np.abs(reference - other).max()))


def dlib_descriptors(dat: Path, chips: list[np.ndarray]) -> np.ndarray:
    from facelink.runtime.dlib_models import import_dlib

    model = import_dlib().face_recognition_model_v1(str(dat))
    return np.array([np.array(model.compute_face_descriptor(c)) for c in chips], dtype=np.float32)


def _time_per_face(run, inputs: list) -> tuple[float, float]:  # noqa: ANN001
    """(median wall ms per face, CPU time / wall time). The median shrugs off the moments another
    job takes the core; CPU/wall says how many cores the call really used."""
    run(inputs[0])  # warm-up: first-call allocations and, for ONNX Runtime, kernel selection
    times, cpu = [], time.process_time()
    for item in inputs:
        start = time.perf_counter()
        run(item)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)), (time.process_time() - cpu) / sum(times)


def main(argv: list[str] | None = None) -> int:
    from facelink.config import cache_dir, shared_dir
    from facelink.runtime.dlib_models import dlib_model_path, import_dlib
    from facelink.runtime.manifest import file_sha256, load_manifest

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = cache_dir() / "models" / "dlib-resnet.onnx"  # where the manifest's ${cache}/ looks
    parser.add_argument("--out", type=Path, default=default_out, help=f"ONNX file to write (default {default_out})")
    parser.add_argument("--torch-out", type=Path, help="also save the torch weights (a state_dict) here")
    parser.add_argument("--dat", type=Path, help=f"dlib model (default: {DAT_NAME} from face_recognition_models)")
    parser.add_argument("--lfw", type=Path, default=shared_dir() / "data" / "lfw" / "lfw-deepfunneled")
    parser.add_argument("--faces", type=int, default=100, help="LFW faces to verify on (0: skip verification)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # the export and this check are small; leave the cores to others
    dat = args.dat or dlib_model_path(DAT_NAME)
    out = args.out.expanduser()
    net, model = convert(dat, out, args.torch_out.expanduser() if args.torch_out else None)
    digest = file_sha256(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {digest})")
    with tempfile.TemporaryDirectory() as tmp:
        again = export_onnx(build_torch(read_dlib_net(dat)), Path(tmp) / "again.onnx")
        print(f"byte-reproducible (second export from a fresh parse): {again.read_bytes() == out.read_bytes()}")
    pinned = load_manifest(MANIFEST_NAME).sha256
    if pinned is not None and pinned != digest:
        print(
            f"warning: the manifest {MANIFEST_NAME} pins sha256 {pinned}; this export (torch {torch.__version__}) "
            "differs. The weights are dlib's either way, but the manifest refuses this file until its sha256 "
            "is updated.",
            file=sys.stderr,
        )
    if args.faces <= 0:
        return 0
    if not args.lfw.is_dir():
        print(f"no LFW at {args.lfw}: skipping the check against dlib (--lfw, or --faces 0)", file=sys.stderr)
        return 0

    chips, _ = lfw_chips(args.lfw, args.faces)
    reference = dlib_descriptors(dat, chips)
    x = normalise(np.stack(chips), net.mean_rgb)
    with torch.no_grad():
        torch_out = model(torch.from_numpy(x)).numpy()
    session = ort_session(out, threads=1)
    onnx_out = np.concatenate([session.run(None, {"input": x[i : i + 1]})[0] for i in range(len(x))])
    print(f"\nparity with dlib on {len(chips)} LFW faces (raw descriptors):")
    print(f"{'':14} {'min cosine':>12} {'mean cosine':>12} {'max abs err':>12}")
    for name, values in (("torch", torch_out), ("onnxruntime", onnx_out)):
        p = Parity.of(reference, values)
        print(f"{name:14} {p.min_cosine:12.8f} {p.mean_cosine:12.8f} {p.max_abs_error:12.2e}")

    dlib_model = import_dlib().face_recognition_model_v1(str(dat))
    faces = chips[: min(len(chips), 50)]
    dlib_ms, dlib_cores = _time_per_face(dlib_model.compute_face_descriptor, faces)
    ort_ms, ort_cores = _time_per_face(lambda i: session.run(None, {"input": x[i : i + 1]}), list(range(len(faces))))
    print(f"\nspeed per face, batch 1, median of {len(faces)} faces (CPU/wall = cores actually used):")
    print(f"  dlib          {dlib_ms:7.1f} ms  (CPU/wall {dlib_cores:.2f})")
    print(f"  onnxruntime   {ort_ms:7.1f} ms  (1 intra-op thread, CPU/wall {ort_cores:.2f})  "
          f"{dlib_ms / ort_ms:.1f}x faster")
    print("  (dlib's time includes its pixel normalisation; it runs single-threaded in dlib-bin, no BLAS)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
