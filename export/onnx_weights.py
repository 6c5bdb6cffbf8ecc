"""Weights read back from an ONNX graph, for models that continue from what was exported.

The exporter stores a tensor that several parameters share by value (a fresh model's zero
biases, say) once, and gives the others its value through Identity nodes: reading initializers by
name alone would miss them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


def graph_tensors(onnx_path: str | Path) -> dict[str, np.ndarray]:
    """Every initializer by name, and every Identity node's output that aliases one."""
    graph = onnx.load(str(onnx_path)).graph
    tensors = {init.name: numpy_helper.to_array(init).copy() for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in tensors:
            tensors[node.output[0]] = tensors[node.input[0]]
    return tensors


def conv_weights(onnx_path: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of every Conv node, in graph order."""
    graph = onnx.load(str(onnx_path)).graph
    tensors = graph_tensors(onnx_path)
    return [(tensors[node.input[1]], tensors[node.input[2]]) for node in graph.node if node.op_type == "Conv"]
