"""Encoder / decoder as ONNX graphs, and what they cost: MACs, parameters, ONNX Runtime latency.

    python -m facelink.export.codec.speed [--model default] [--sizes 128 112] [--checkpoint run/checkpoint.pt]

The graphs are what the board and the cloud run (`facelink.runtime.codecs.learned`): the
encoder maps an RGB image in [0, 1] to the latent, the decoder maps the dequantised latent to
the clamped image; gains, rounding and entropy coding happen outside, with static tables.
Latency is measured the way the issue's targets are stated: ONNX Runtime, fp32, one intra-op
thread, batch 1, median of runs.

CompressAI's GDN bounds its parameters with a custom autograd function, which the ONNX exporter
cannot trace; for export each GDN is replaced by `StaticGDN`, the same arithmetic with the
reparametrised beta and gamma baked in as constants.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from compressai.layers import GDN
from torch import Tensor, nn

from .model import FaceCodecModel, create_codec_model


class StaticGDN(nn.Module):
    """A trained GDN / inverse GDN with its effective beta and gamma frozen as buffers."""

    def __init__(self, gdn: GDN) -> None:
        super().__init__()
        channels = gdn.beta.numel()
        self.inverse = gdn.inverse
        with torch.no_grad():
            self.register_buffer("beta", gdn.beta_reparam(gdn.beta).clone())
            self.register_buffer(
                "gamma", gdn.gamma_reparam(gdn.gamma).reshape(channels, channels, 1, 1).clone()
            )

    def forward(self, x: Tensor) -> Tensor:
        norm = F.conv2d(x * x, self.gamma, self.beta)
        return x * (torch.sqrt(norm) if self.inverse else torch.rsqrt(norm))


def exportable(model: FaceCodecModel) -> FaceCodecModel:
    """A copy of `model` in eval mode with every GDN replaced by a `StaticGDN`."""
    model = copy.deepcopy(model).eval()
    for transform in (model.g_a, model.g_s):
        for index, layer in enumerate(transform):
            if isinstance(layer, GDN):
                transform[index] = StaticGDN(layer)
    return model


class EncoderGraph(nn.Module):
    """x (1, 3, H, W) in [0, 1] -> the latent y, before the quality's gain and rounding.

    The graphs are the same for every quality: the per-quality gains, inverse gains and medians
    are a few numbers per channel that the run time applies around them, with the entropy tables.
    """

    def __init__(self, model: FaceCodecModel) -> None:
        super().__init__()
        self.g_a = model.g_a

    def forward(self, x: Tensor) -> Tensor:
        return self.g_a(x)


class DecoderGraph(nn.Module):
    """The dequantised latent, already multiplied by the inverse gain -> the image in [0, 1]."""

    def __init__(self, model: FaceCodecModel) -> None:
        super().__init__()
        self.g_s = model.g_s

    def forward(self, y_hat: Tensor) -> Tensor:
        return self.g_s(y_hat).clamp(0, 1)


def export_onnx(graph: nn.Module, example: Tensor, path: Path, input_name: str = "input", output_name: str = "output",
                dynamic_size: bool = False) -> None:
    """`graph` as ONNX. Static shapes (the timing here) let ONNX Runtime plan memory once for the
    one face size the board sends; a bundle's graphs take any height and width (the edge codes
    128x128 crops, the full-frame protocol 256x256)."""
    size = {2: "height", 3: "width"}
    torch.onnx.export(
        graph.eval(),
        (example,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: size, output_name: size} if dynamic_size else None,
    )


def count_macs(graph: nn.Module, example: Tensor) -> int:
    """Multiply-accumulates of the convolutions and GDNs (the rest is negligible)."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += (
                output.numel()
                * module.in_channels
                // module.groups
                * module.kernel_size[0]
                * module.kernel_size[1]
            )
        elif isinstance(module, nn.ConvTranspose2d):
            total += inputs[0].numel() * module.out_channels * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, StaticGDN):
            total += output.numel() * output.shape[1]

    handles = [m.register_forward_hook(hook) for m in graph.modules()]
    with torch.no_grad():
        graph(example)
    for handle in handles:
        handle.remove()
    return total


def ort_latency_ms(path: Path, example: np.ndarray, runs: int = 100) -> float:
    """Median wall time of one ONNX Runtime call, one intra-op thread, after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def measure(model: FaceCodecModel, size: int) -> dict[str, float]:
    """Parameters, MACs and 1-thread ONNX Runtime latency of the encoder and decoder at size x size."""
    model = exportable(model)
    latent = model.arch.latent_channels
    x = torch.rand(1, 3, size, size)
    y = torch.randn(1, latent, size // 16, size // 16)
    result: dict[str, float] = {"size": size}
    with tempfile.TemporaryDirectory() as tmp:
        for name, graph, example in (
            ("encoder", EncoderGraph(model), x),
            ("decoder", DecoderGraph(model), y),
        ):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(graph, example, path)
            result[f"{name}_params"] = sum(t.numel() for t in (*graph.parameters(), *graph.buffers()))
            result[f"{name}_mmacs"] = count_macs(graph, example) / 1e6
            result[f"{name}_ms"] = ort_latency_ms(path, example.numpy())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m facelink.export.codec.speed", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 112])
    parser.add_argument("--checkpoint", type=Path, help="load trained weights from a training checkpoint")
    args = parser.parse_args(argv)
    model = create_codec_model(args.model)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"])
    print(f"model {args.model!r}: {model.arch.to_dict()}")
    for size in args.sizes:
        r = measure(model, size)
        print(
            f"{size}x{size}: encoder {r['encoder_params'] / 1e3:.0f}k params, {r['encoder_mmacs']:.0f} MMAC, "
            f"{r['encoder_ms']:.2f} ms | decoder {r['decoder_params'] / 1e3:.0f}k params, "
            f"{r['decoder_mmacs']:.0f} MMAC, {r['decoder_ms']:.2f} ms (ONNX Runtime, 1 thread)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
