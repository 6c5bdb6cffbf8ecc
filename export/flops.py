"""Multiply-accumulates and parameters of an ONNX graph: the cost of the model that is deployed.

Counted from the exported graph rather than from the torch module, so the figure is the one the
board runs (whatever the exporter fused or unrolled) and works for any ONNX recogniser a
manifest names. Only the ops that dominate a CNN are counted:

* Conv: every output element costs (C_in / group) * kH * kW MACs;
* ConvTranspose: every input element scatters into (C_out / group) * kH * kW outputs;
* Gemm / MatMul: M * K * N per (broadcast) batch.

Element-wise ops (BatchNormalization, PRelu, Relu, Clip, Add, ...) cost one operation per element,
under 2% of a MobileFaceNet-style network: they are left out, as in the papers we compare with.
FLOPs are reported as 2 * MACs. Parameters are the elements of the float initializers (and of
float `Constant` nodes, where some exporters put the weights).

Symbolic dimensions are fixed before shape inference: the batch to 1, any other one from
`input_shape` (a model with a dynamic spatial size has no single cost).

    python -m facelink.export.flops mobilefacenet            # a manifest name, path, or .onnx file
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ModelCost:
    macs: int
    params: int
    macs_by_op: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def summary(self) -> str:
        parts = ", ".join(f"{op} {macs / 1e6:.1f}M" for op, macs in sorted(self.macs_by_op.items(), key=lambda kv: -kv[1]))
        return f"{self.macs / 1e6:.1f} MMACs ({self.flops / 1e6:.1f} MFLOPs), {self.params / 1e6:.3f} M parameters [{parts}]"


def _fix_input_shapes(model: onnx.ModelProto, input_shape: tuple[int, ...] | None) -> None:
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    for value in inputs:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0:
                dim.dim_value = 1
            elif input_shape is not None and len(input_shape) == len(dims):
                dim.dim_value = int(input_shape[axis])
            else:
                raise ValueError(f"input {value.name!r} has a symbolic dimension {axis}: pass input_shape")


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in inferred.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(onnx.helper.get_attribute_value(attr))
    return default


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    def shape(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise ValueError(f"{node.op_type} {node.name!r}: no static shape for {name!r}")
        return shapes[name]

    op = node.op_type
    if op == "Conv":
        weight = shape(node.input[1])  # (C_out, C_in / group, kH, kW)
        return int(np.prod(shape(node.output[0]))) * int(np.prod(weight[1:]))
    if op == "ConvTranspose":
        weight = shape(node.input[1])  # (C_in, C_out / group, kH, kW)
        return int(np.prod(shape(node.input[0]))) * int(np.prod(weight[1:]))
    if op == "Gemm":
        a, b = shape(node.input[0]), shape(node.input[1])
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else a
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return int(m * k * n)
    if op == "MatMul":
        a, b = shape(node.input[0]), shape(node.input[1])
        out = shape(node.output[0])
        k = a[-1]
        return int(np.prod(out)) * int(k) if len(b) > 1 or len(a) > 1 else int(k)
    return 0


def _params(model: onnx.ModelProto) -> int:
    total = sum(int(np.prod(init.dims)) for init in model.graph.initializer if init.data_type in _FLOAT_TYPES)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            # Scalars (clip bounds, epsilons) are not weights.
            if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES and numpy_helper.to_array(attr.t).size > 1:
                total += int(np.prod(attr.t.dims))
    return total


def count_model(model: onnx.ModelProto | str | Path, input_shape: tuple[int, ...] | None = None) -> ModelCost:
    """MACs and parameters of an ONNX model (a path or a loaded ModelProto, which is not modified)."""
    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    _fix_input_shapes(model, input_shape)
    shapes = _shapes(model)
    by_op: Counter[str] = Counter()
    for node in model.graph.node:
        macs = _node_macs(node, shapes)
        if macs:
            by_op[node.op_type] += macs
    return ModelCost(macs=sum(by_op.values()), params=_params(model), macs_by_op=dict(by_op))


def _resolve(target: str) -> tuple[Path, tuple[int, ...] | None]:
    """An .onnx path, or a manifest (name or path) -> its weights and its NCHW/NHWC input shape."""
    if target.endswith(".onnx"):
        return Path(target), None
    from facelink.runtime.manifest import load_manifest

    manifest = load_manifest(target)
    spec = manifest.input
    shape = None
    if spec is not None:
        shape = (1, 3, spec.height, spec.width) if spec.layout == "NCHW" else (1, spec.height, spec.width, 3)
    return manifest.weights(), shape


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="manifest names or paths, or .onnx files")
    args = parser.parse_args(argv)
    for target in args.models:
        path, shape = _resolve(target)
        print(f"{target}: {count_model(path, shape).summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
