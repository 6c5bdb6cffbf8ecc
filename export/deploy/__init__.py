"""Deployment export: ONNX graph surgery, calibration inputs, parity checks, the export pipeline.

`facelink export MODEL --format onnx|engine|triton` (facelink/cli.py) drives
`pipeline.export_onnx` / `pipeline.export_engine` and `facelink.export.triton`; precision
conversion lives in `facelink.export.quantize`, the TensorRT builder in
`facelink.export.tensorrt`. Nothing here needs torch.
"""
