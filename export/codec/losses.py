"""The training objective: rate + lambda * distortion + mu * identity, per quality level.

    loss = bpp + lambda_q * 255^2 * MSE + mu_q * (1 - cos(teacher(original), teacher(reconstruction)))

* rate: bits per pixel from the entropy bottleneck's likelihoods (noisy latents in training);
* distortion: MSE on the 0-255 scale, as in CompressAI's `RateDistortionLoss`, so lambda values
  compare with its zoo's (0.0018 ... 0.0483);
* identity: what the issue asks for, the frozen recogniser's cosine between the original and the
  reconstruction, each re-warped to the recogniser's template as the cloud does. MSE stays in
  the objective on purpose: identity alone would let the codec spend its bits on whatever
  MobileFaceNet in particular looks at, and the target is parity with a recogniser it never saw
  (dlib's ResNet) too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .batches import Batch, mirror_where
from .teacher import FaceTeacher, warp_to_template


@dataclass
class LossTerms:
    loss: Tensor
    bpp: Tensor
    mse: Tensor  # on [0, 1] pixels
    cosine: Tensor  # mean teacher cosine, original vs reconstruction


def bits_per_pixel(likelihoods: dict[str, Tensor], pixels: int) -> Tensor:
    return sum((-torch.log2(l)).sum() for l in likelihoods.values()) / pixels


def teacher_embeddings(teacher: FaceTeacher, images: Tensor, batch: Batch) -> Tensor:
    """The teacher's view of each image: un-mirror the codec input, warp to the template, then
    mirror again where the batch asks for the mirrored view (see `batches`)."""
    faces = warp_to_template(mirror_where(images, batch.mirrored), batch.matrices, teacher.template.size)
    return teacher(mirror_where(faces, batch.views))


class RateDistortionIdentityLoss(nn.Module):
    def __init__(
        self, teacher: FaceTeacher, lambdas: tuple[float, ...], identity_weights: tuple[float, ...]
    ) -> None:
        super().__init__()
        if len(lambdas) != len(identity_weights):
            raise ValueError(
                "one lambda and one identity weight per quality: "
                f"got {len(lambdas)} and {len(identity_weights)}"
            )
        self.teacher = teacher
        self.lambdas = lambdas
        self.identity_weights = identity_weights

    def forward(self, output: dict, batch: Batch) -> LossTerms:
        x, x_hat = batch.images, output["x_hat"]
        batch_size, _, height, width = x.shape
        bpp = bits_per_pixel(output["likelihoods"], batch_size * height * width)
        mse = torch.mean((x_hat - x) ** 2)
        target = batch.targets
        if target is None:
            with torch.no_grad():
                target = teacher_embeddings(self.teacher, x, batch)
        # The cloud decodes to uint8, so the recogniser never sees values outside [0, 1].
        cosine = torch.sum(teacher_embeddings(self.teacher, x_hat.clamp(0, 1), batch) * target, dim=1).mean()
        q = batch.quality - 1
        loss = bpp + self.lambdas[q] * 255**2 * mse + self.identity_weights[q] * (1 - cosine)
        return LossTerms(loss=loss, bpp=bpp, mse=mse, cosine=cosine)
