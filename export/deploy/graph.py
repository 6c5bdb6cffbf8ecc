"""ONNX graph surgery for deployment: pinned opset, batch dimension, input size, simplification.

Every function takes and returns an `onnx.ModelProto` and leaves its argument alone. `check`
is the gate every written file passes: the full ONNX checker plus strict shape inference, so
a rewritten batch dimension that breaks a downstream shape fails here, not on the board.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference, version_converter

#: The opset every export is converted to. TensorRT 8.6 to 11 and ONNX Runtime >= 1.17 all
#: parse it, per-channel QDQ needs >= 13, and the dlib converter already writes 17.
OPSET = 17
BATCH_DIM = "batch"
_PROBE_BATCH = 3
_PROBE_SIDE = 128  # a multiple of every detector stride (8, 16, 32)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str, ...]  # an int, or a symbolic name for a dynamic dimension

    @property
    def dynamic_batch(self) -> bool:
        return bool(self.shape) and not isinstance(self.shape[0], int)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
    return TensorSpec(value.name, np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims)


def inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph's real inputs (initializers listed as inputs by old exporters are left out)."""
    weights = {i.name for i in model.graph.initializer}
    return [_spec(v) for v in model.graph.input if v.name not in weights]


def outputs(model: onnx.ModelProto) -> list[TensorSpec]:
    return [_spec(v) for v in model.graph.output]


def opset_of(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def to_opset(model: onnx.ModelProto, opset: int = OPSET) -> onnx.ModelProto:
    if opset_of(model) != opset:
        model = version_converter.convert_version(model, opset)
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    # The converter keeps the old IR version; the checker and TensorRT expect the one the opset implies.
    converted.ir_version = max(
        converted.ir_version, helper.find_min_ir_version_for(list(converted.opset_import))
    )
    return converted


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def set_batch(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """Give every input and output the batch `batch` (None: dynamic, named "batch").

    Exporters that traced with a batch of 1 bake that 1 into Reshape targets (MobileFaceNet's
    `[1, -1]`, YuNet's `[1, -1, k]`). Such a leading 1 becomes 0, ONNX's "copy this dimension
    from the input", which carries whatever batch comes in. Anything else that hard-codes the
    batch is caught by `check` or by the batch parity test of the export.
    """
    first = inputs(model)[0].shape[0]
    model = _with_io_batch(model, batch)
    if isinstance(first, int):
        constants = _constants(model)
        for node in model.graph.node:
            target = (
                constants.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
            )
            allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
            if (
                target is not None
                and target.ndim == 1
                and target.size
                and target[0] == first
                and not allow_zero
            ):
                shape = target.copy()
                shape[0] = 0
                name = f"{node.input[1]}__batch_{node.name or len(model.graph.initializer)}"
                model.graph.initializer.append(numpy_helper.from_array(shape.astype(np.int64), name))
                node.input[1] = name
    return model


def _with_io_batch(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    model = _copy(model)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            if batch is None:
                dims[0].dim_param = BATCH_DIM
            else:
                dims[0].dim_value = batch
    del model.graph.value_info[:]  # shapes inferred for the old batch would contradict the new one
    return model


def set_input_size(model: onnx.ModelProto, width: int, height: int) -> onnx.ModelProto:
    """Pin the spatial dimensions of NCHW image inputs (TensorRT builds static shapes fastest)."""
    model = _copy(model)
    weights = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in weights or len(dims) != 4:
            continue
        for dim, size in zip(dims[2:], (height, width)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ValueError(
                    f"input {value.name!r} has a fixed size {dim.dim_value}; cannot pin it to {size}"
                )
            dim.Clear()
            dim.dim_value = size
    del model.graph.value_info[:]
    return model


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, dead-node removal and fusions (onnxslim: pure Python, no build step)."""
    import onnxslim

    return onnxslim.slim(_copy(model))


def check(model: onnx.ModelProto) -> onnx.ModelProto:
    """The full ONNX checker and strict shape inference; returns the model with inferred shapes."""
    onnx.checker.check_model(model, full_check=True)
    return shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)


def check_batch(model: onnx.ModelProto, batch: int | None) -> None:
    """Shape inference, with the declared output shapes erased, must carry the batch from the
    inputs to every output: proof that no node in between still assumes the traced batch.

    A dynamic batch is probed with a concrete batch of 3 (other dynamic dimensions pinned to
    `_PROBE_SIDE`), because ONNX's symbolic inference loses a named batch at nodes like Resize
    even when the graph is right.
    """
    want = _PROBE_BATCH if batch is None else batch
    probe = _with_io_batch(model, want)
    for value in probe.graph.input:
        for dim in value.type.tensor_type.shape.dim[1:]:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = _PROBE_SIDE
    for value in probe.graph.output:
        value.type.tensor_type.ClearField("shape")
    inferred = shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    for spec in outputs(inferred):
        if not spec.shape or spec.shape[0] != want:
            raise ValueError(
                f"output {spec.name!r}: for a batch of {want}, shape inference gives "
                f"{spec.shape}: some node still assumes the traced batch"
            )


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
