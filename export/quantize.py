"""Reduced precision for ONNX models: fp16 conversion and int8 QDQ static quantisation.

fp16 converts weights and activations with onnxconverter-common, keeping float32 inputs and
outputs, so the runtime's preprocessing (float32) and callers are untouched; the casts at the
edges cost nothing next to the convolutions.

int8 is ONNX Runtime's static quantisation in QDQ form (QuantizeLinear / DequantizeLinear pairs
around each quantised op): one file runs on ONNX Runtime's CPU int8 kernels and is what
TensorRT's explicit quantisation parses. Weights are per-channel symmetric int8. Activation
ranges come from calibration on real inputs (`deploy.samples`); two recipes:

* `cpu`: uint8 activations (asymmetric) x int8 weights, ONNX Runtime's recommendation for x86
  (and fine on ARM);
* `tensorrt`: int8 symmetric activations, as TensorRT requires for Q/DQ networks.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from facelink.export.deploy.samples import Samples

Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8")
#: Calibration runs this many inputs at a time when the model has a dynamic batch.
CALIBRATION_BATCH = 16


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxconverter_common import float16

    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    # With inferred value_info present, the converter mistypes the float32 output of the ops it
    # keeps in float32 (YuNet's Resize) and the next Add mixes types; without it, it inserts casts.
    del plain.graph.value_info[:]
    with warnings.catch_warnings():
        # One warning per tiny weight clamped to fp16's smallest normal (1e-7): expected, not news.
        warnings.filterwarnings("ignore", message="the float32 number", category=UserWarning)
        converted = float16.convert_float_to_float16(plain, keep_io_types=True)
    return _retype_float_casts(converted)


def _retype_float_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """Point the graph's own Cast-to-float32 nodes at float16 where the converter typed their
    output float16. The converter retypes tensors but not a Cast's `to` (EdgeFace's positional
    encoding casts a bool mask to float), which leaves the graph invalid; its own input/output
    casts have float32 outputs and are left alone."""
    fp16 = {v.name for v in model.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in fp16:
            for attribute in node.attribute:
                if attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT:
                    attribute.i = onnx.TensorProto.FLOAT16
    return model


@dataclass(frozen=True)
class Int8Recipe:
    name: str
    activations: Literal["QUInt8", "QInt8"]
    symmetric_activations: bool


CPU = Int8Recipe("cpu", "QUInt8", symmetric_activations=False)
TENSORRT = Int8Recipe("tensorrt", "QInt8", symmetric_activations=True)
RECIPES = {r.name: r for r in (CPU, TENSORRT)}


def calibration_reader(samples: Samples, batch: int):  # noqa: ANN201 (the ORT base class is imported lazily)
    """An ONNX Runtime CalibrationDataReader over `samples`, `batch` inputs per call."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = list(samples.batches(batch))
            self._next = 0

        def get_next(self) -> dict | None:
            if self._next == len(self._batches):
                return None
            self._next += 1
            return self._batches[self._next - 1]

        def rewind(self) -> None:
            self._next = 0

    return _Reader()


def quantize_int8(
    model: onnx.ModelProto, samples: Samples, *, batch: int, recipe: Int8Recipe = CPU
) -> onnx.ModelProto:
    """`model` (fp32) as a QDQ int8 model calibrated on `samples` (`batch` per run: the model's own
    static batch, or `CALIBRATION_BATCH` when its batch is dynamic)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not samples.real:
        raise ValueError(
            "int8 calibration needs real inputs, not random ones (--calib lfw, a folder, or a .npz)"
        )
    usable = len(samples) - len(samples) % batch
    if usable == 0:
        raise ValueError(
            f"int8 calibration needs at least {batch} inputs for a batch of {batch}, got {len(samples)}"
        )
    samples = Samples({k: v[:usable] for k, v in samples.tensors.items()}, samples.origin, samples.real)
    with tempfile.TemporaryDirectory(prefix="facelink-int8-") as tmp:
        fp32, prepared, quantised = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, fp32)
        # ONNX Runtime's recommended preparation (graph optimisation, shape inference), so that
        # Conv+activation patterns are visible to the quantiser. Its symbolic shape inference is
        # for transformer graphs and gives up on YuNet's dynamic sizes; ONNX's own is enough here.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantised),
            calibration_reader(samples, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=getattr(QuantType, recipe.activations),
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={
                "ActivationSymmetric": recipe.symmetric_activations,
                "WeightSymmetric": True,
            },
        )
        return onnx.load(quantised)
