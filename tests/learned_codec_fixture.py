"""A tiny, fully synthetic learned-codec bundle: real ONNX graphs and tables, no training.

It exercises everything around the trained networks (padding, gains, rounding, entropy
coding, the bitstream, manifests and hashes) in milliseconds, on any machine.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CHANNELS = 8
STRIDE = 16
SUPPORT = 41  # symbols -20..20, then the escape


def _save(model: onnx.ModelProto, path: Path) -> str:
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _encoder(weights: np.ndarray) -> onnx.ModelProto:
    """image (1,3,H,W) -> 16x16 average pooling -> 1x1 conv to CHANNELS latent channels."""
    nodes = [
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[STRIDE, STRIDE], strides=[STRIDE, STRIDE]),
        helper.make_node("Conv", ["pooled", "w"], ["latent"]),
    ]
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [1, CHANNELS, "h", "w"])],
        [numpy_helper.from_array(weights, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _decoder(weights: np.ndarray) -> onnx.ModelProto:
    """latent -> 1x1 conv back to RGB -> nearest upsampling by 16."""
    scales = numpy_helper.from_array(np.array([1, 1, STRIDE, STRIDE], np.float32), "scales")
    nodes = [
        helper.make_node("Conv", ["latent", "w"], ["rgb"]),
        helper.make_node("Resize", ["rgb", "", "scales"], ["image"], mode="nearest"),
    ]
    graph = helper.make_graph(
        nodes, "decoder",
        [helper.make_tensor_value_info("latent", TensorProto.FLOAT, [1, CHANNELS, "h", "w"])],
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [numpy_helper.from_array(weights, "w"), scales],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def laplace_tables(qualities: int = 2) -> dict[str, np.ndarray]:
    symbols = np.arange(SUPPORT) - SUPPORT // 2
    pmf = np.zeros((qualities, CHANNELS, SUPPORT + 1))
    for c in range(CHANNELS):
        p = np.exp(-np.abs(symbols) / (1.0 + c))
        pmf[:, c, :SUPPORT] = p / p.sum() * (1 - 1e-6)
        pmf[:, c, SUPPORT] = 1e-6  # the escape
    return {
        "gain": np.tile(np.array([[0.5], [1.0]])[:qualities], (1, CHANNELS)).astype(np.float32),
        "inverse_gain": np.tile(np.array([[2.0], [1.0]])[:qualities], (1, CHANNELS)).astype(np.float32),
        "medians": np.zeros((qualities, CHANNELS), np.float32),
        "pmf": pmf,
        "length": np.full((qualities, CHANNELS), SUPPORT + 1, np.int32),
        "offset": np.full((qualities, CHANNELS), -(SUPPORT // 2), np.int32),
    }


def make_bundle(folder: Path, name: str = "synthetic", seed: int = 0) -> Path:
    """Writes encoder.onnx, decoder.onnx, tables.npz and codec-<name>.json; returns the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    encode_w = (rng.normal(size=(CHANNELS, 3, 1, 1)) * 10).astype(np.float32)
    decode_w = np.linalg.pinv(encode_w[:, :, 0, 0])[:, :, None, None].astype(np.float32)
    files = {
        "encoder": _save(_encoder(encode_w), folder / "encoder.onnx"),
        "decoder": _save(_decoder(decode_w), folder / "decoder.onnx"),
    }
    np.savez(folder / "tables.npz", **laplace_tables())
    files["tables"] = hashlib.sha256((folder / "tables.npz").read_bytes()).hexdigest()
    manifest = {
        "name": name,
        "encoder": {"file": "encoder.onnx", "sha256": files["encoder"]},
        "decoder": {"file": "decoder.onnx", "sha256": files["decoder"]},
        "tables": {"file": "tables.npz", "sha256": files["tables"]},
        "stride": STRIDE,
        "qualities": 2,
        "latent_channels": CHANNELS,
    }
    path = folder / f"codec-{name}.json"
    path.write_text(json.dumps(manifest))
    return path
