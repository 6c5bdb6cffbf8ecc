"""The frozen recogniser the identity loss asks (MobileFaceNet), and the warp that feeds it.

The torch module is converted from the very ONNX file the cloud runs (through its manifest,
sha256 checked) with onnx2torch, rather than rebuilt by hand from `mobilefacenet.pt`: the graph
and the weights are then the deployed ones by construction, and the parity test against ONNX
Runtime checks it. The file was exported with a fixed batch of 1, so before converting we make
the batch dimension symbolic and turn the final Reshape's target `[1, -1]` into `[-1, dim]`.

`warp_to_template` is `cv2.warpAffine` (bilinear, replicated border) in torch, differentiable,
so the identity loss sees a reconstruction exactly the way the cloud will: re-warped from the
crop to the recogniser's template with the landmarks that travel with the crop.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from facelink.runtime.alignment import Template, similarity_transform
from facelink.runtime.manifest import ModelManifest, load_manifest
from onnx import numpy_helper
from onnx2torch import convert
from torch import Tensor, nn


def _batchable(model: onnx.ModelProto, dim: int) -> onnx.ModelProto:
    """The model with a symbolic batch dimension, refusing graphs whose batch-1 reshapes we do not know."""
    graph = model.graph
    for value in (*graph.input, *graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    initializers = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape":
            continue
        shape = initializers.get(node.input[1])
        target = None if shape is None else numpy_helper.to_array(shape).tolist()
        if target != [1, -1]:
            raise ValueError(
                f"cannot batch {node.name}: reshape target {target!r}, expected the constant [1, -1]"
            )
        shape.CopyFrom(numpy_helper.from_array(np.array([-1, dim], dtype=np.int64), shape.name))
    return model


class FaceTeacher(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] at the model's template size -> (B, dim) unit embeddings.

    Frozen: no parameter takes gradients and it stays in eval mode whatever `train()` is called
    with, but gradients do flow through it to its input (the identity loss needs exactly that).
    """

    def __init__(self, manifest: ModelManifest | None = None) -> None:
        super().__init__()
        self.manifest = manifest or load_manifest("mobilefacenet")
        spec, embedding = self.manifest.input, self.manifest.embedding
        if spec is None or embedding is None or self.manifest.format != "onnx":
            raise ValueError(f"{self.manifest.name!r} is not an ONNX recognition model")
        if spec.color != "RGB" or spec.layout != "NCHW":
            raise ValueError(
                f"{self.manifest.name!r}: the teacher expects RGB NCHW input, got {spec.color} {spec.layout}"
            )
        self.template: Template = self.manifest.template
        self.net = convert(_batchable(onnx.load(str(self.manifest.weights())), embedding.dim))
        # Inputs arrive in [0, 1]; the manifest's mean/std are given for pixels / `scale`.
        scale = 255.0 / spec.scale
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) / scale)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) / scale)
        self.requires_grad_(False)
        # Depthwise convolutions are ~15x faster channels-last on CPU (measured, MobileFaceNet batch 16).
        self.to(memory_format=torch.channels_last)
        self.train(False)

    def train(self, mode: bool = True) -> FaceTeacher:
        return super().train(False)

    def features(self, faces: Tensor) -> Tensor:
        """The raw (unnormalised) embeddings, as the ONNX model outputs them."""
        return self.net(((faces - self.mean) / self.std).contiguous(memory_format=torch.channels_last))

    def forward(self, faces: Tensor) -> Tensor:
        return F.normalize(self.features(faces), dim=1)

    def flip_augmented(self, faces: Tensor) -> Tensor:
        """The embedding the cloud computes when the manifest asks for flip augmentation:
        the sum of the raw embeddings of the face and of its mirror image, normalised."""
        return F.normalize(self.features(faces) + self.features(faces.flip(-1)), dim=1)


def template_matrices(landmarks: np.ndarray, template: Template) -> np.ndarray:
    """(N, 5, 2) landmarks -> (N, 2, 3) similarity matrices onto `template` (cv2 convention)."""
    return np.stack([similarity_transform(points, template.points) for points in landmarks]).astype(
        np.float32
    )


def warp_to_template(images: Tensor, matrices: Tensor, size: tuple[int, int]) -> Tensor:
    """`cv2.warpAffine(image, matrix, size, INTER_LINEAR, BORDER_REPLICATE)` for a batch, differentiable.

    `matrices` (B, 2, 3) map source pixel coordinates to output pixel coordinates, as cv2's do;
    `size` is (width, height). grid_sample wants the inverse map in normalised coordinates
    (align_corners=False: pixel i of n sits at (2i + 1) / n - 1), so we compose
    pixel->normalised(source) . inverse(matrix) . normalised->pixel(output).
    """
    batch, _, height, width = images.shape
    out_w, out_h = size
    dtype, device = images.dtype, images.device
    forward = torch.zeros(batch, 3, 3, dtype=dtype, device=device)
    forward[:, :2] = matrices.to(dtype)
    forward[:, 2, 2] = 1
    to_pixel = torch.tensor(
        [[out_w / 2, 0, (out_w - 1) / 2], [0, out_h / 2, (out_h - 1) / 2], [0, 0, 1]],
        dtype=dtype,
        device=device,
    )
    to_normalised = torch.tensor(
        [[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]],
        dtype=dtype,
        device=device,
    )
    theta = (to_normalised @ torch.linalg.inv(forward) @ to_pixel)[:, :2]
    grid = F.affine_grid(theta, [batch, images.shape[1], out_h, out_w], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
