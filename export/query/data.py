"""What the query model trains on: the codec's cached crops, a held-out split, augmented views.

The training set is `facelink.export.codec.data`'s cache (aligned 128x128 canonical crops of
celeba-dev and of LFW's training images, with landmarks and identities), reused as is.

Split: the crops of `val_identities` celeba-dev identities drawn with `seed` are held out --
the same rule and defaults as the codec's run (32 identities, seed 0), so one celeba-dev
evaluation set is unseen by every model. LFW crops always train: LFW is evaluated on
pairs.txt, whose images the cache never contains.

Views. Every view is a random similarity jitter of the face's alignment (rotation, scale,
shift: the landmark noise a detector adds on a board), optionally mirrored, then mild
photometric changes (brightness, contrast, colour saturation, occasional grey). The teacher
(MobileFaceNet at 112x112) and the student (at its own input size, 64-96 px) are warped from
the same crop with the same jitter and see the same pixels up to resolution: "function
matching" (Beyer et al., CVPR 2022, "Knowledge distillation: a good teacher is patient and
consistent"). With only ~9,000 faces, consistent views with the teacher run on the fly let the
student match the teacher on as many inputs as we can afford to draw, instead of memorising
9,000 fixed targets; the cached embeddings are only valid for the unjittered crop. The teacher
costs ~6 ms per face on one core against ~3.5 ms for the student's forward and backward.

Mixup (`Augment.mixup`, off by default): a share of the views is blended with another face of
the same batch, the same blend for teacher and student. Beyer et al. found function matching on
mixed images the strongest of their variants on small datasets: a blend is not a face the
training set holds, so every one is a new point of the teacher's function to match, between the
faces instead of only around them. The partner's weight stays under `mixup_max`, so the view
remains mostly one face; the label (used only by the optional CosFace term) is the dominant one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from facelink.export.codec.data import FaceCache
from facelink.export.codec.teacher import template_matrices, warp_to_template
from facelink.runtime.alignment import ARCFACE, Template


def split_by_identity(cache: FaceCache, val_identities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) crop indices; validation: every crop of `val_identities` celeba-dev
    identities drawn with `seed` (the codec's rule, so both hold out the same people)."""
    labels = cache.identities()
    celeba = sorted(set(labels[cache.datasets() == "celeba"]))
    held_out = set(np.random.default_rng(seed).choice(celeba, size=val_identities, replace=False).tolist())
    is_val = np.array([label in held_out for label in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def query_template(size: int) -> Template:
    """The ArcFace 112x112 template scaled to a `size` x `size` input: the same face region."""
    return Template(ARCFACE.points * (size / ARCFACE.size[0]), (size, size))


@dataclass(frozen=True)
class Augment:
    rotate_deg: float = 8.0       # uniform in +-
    scale: float = 0.08           # log-uniform in 1 +- (relative face size)
    shift: float = 0.04           # uniform in +-, as a fraction of the crop side
    mirror: float = 0.5           # probability
    brightness: float = 0.15      # additive, uniform in +-
    contrast: float = 0.25        # multiplicative, uniform in 1 +-
    saturation: float = 0.3       # multiplicative, uniform in 1 +-
    grey: float = 0.05            # probability
    mixup: float = 0.0            # probability that a view is blended with another face of its batch
    mixup_max: float = 0.5        # the partner's weight, uniform in [0, mixup_max]


def _jitter(rng: np.random.Generator, n: int, augment: Augment, side: float) -> np.ndarray:
    """(n, 3, 3) similarity transforms about the centre of a `side` x `side` template."""
    angle = np.deg2rad(rng.uniform(-augment.rotate_deg, augment.rotate_deg, n))
    scale = np.exp(rng.uniform(np.log(1 - augment.scale), np.log(1 + augment.scale), n))
    shift = rng.uniform(-augment.shift, augment.shift, (n, 2)) * side
    centre = side / 2
    cos, sin = scale * np.cos(angle), scale * np.sin(angle)
    jitter = np.zeros((n, 3, 3))
    jitter[:, 0, 0], jitter[:, 0, 1], jitter[:, 1, 0], jitter[:, 1, 1] = cos, -sin, sin, cos
    jitter[:, :2, 2] = centre - np.einsum("nij,j->ni", jitter[:, :2, :2], [centre, centre]) + shift
    jitter[:, 2, 2] = 1
    return jitter


def _compose(jitter: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """jitter (n, 3, 3) after matrices (n, 2, 3) -> (n, 2, 3)."""
    full = np.concatenate([matrices, np.broadcast_to([[[0, 0, 1]]], (len(matrices), 1, 3))], axis=1)
    return (jitter @ full)[:, :2].astype(np.float32)


def _photometric(x: Tensor, rng: np.random.Generator, augment: Augment) -> Tensor:
    n = x.shape[0]

    def draw(low: float, high: float) -> Tensor:
        return torch.from_numpy(rng.uniform(low, high, n).astype(np.float32)).view(n, 1, 1, 1)

    grey = x.mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    saturation = draw(1 - augment.saturation, 1 + augment.saturation)
    saturation[torch.from_numpy(rng.random(n) < augment.grey)] = 0
    x = grey + (x - grey) * saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * draw(1 - augment.contrast, 1 + augment.contrast)
    return (x + draw(-augment.brightness, augment.brightness)).clamp(0, 1)


def _mixup(teacher: Tensor, student: Tensor, rng: np.random.Generator, augment: Augment) -> tuple[Tensor, Tensor]:
    """Blend a share of the views with a partner from the batch; the same partner and weight for both."""
    n = teacher.shape[0]
    partner = torch.from_numpy(rng.permutation(n))
    weight = rng.uniform(0, augment.mixup_max, n) * (rng.random(n) < augment.mixup)
    w = torch.from_numpy(weight.astype(np.float32)).view(n, 1, 1, 1)
    return teacher.lerp(teacher[partner], w), student.lerp(student[partner], w)


@dataclass
class Views:
    student: Tensor   # (B, 3, s, s) RGB in [0, 1]
    teacher: Tensor   # (B, 3, 112, 112) RGB in [0, 1], the same view
    labels: Tensor    # (B,) identity class


class ViewSampler:
    """Epoch plans and their augmented batches, drawn deterministically from (seed, epoch, batch)."""

    def __init__(self, cache: FaceCache, indices: np.ndarray, labels: np.ndarray, student_size: int,
                 teacher_template: Template, *, batch_size: int, augment: Augment, seed: int) -> None:
        self.cache = cache
        self.indices = np.asarray(indices)
        self.labels = np.asarray(labels)
        self.batch_size = batch_size
        self.augment = augment
        self.seed = seed
        self.student_size = student_size
        self.teacher_size = teacher_template.size[0]
        # crop -> teacher template, once; the student's is the same map scaled to its size.
        self.matrices = template_matrices(cache.crop_landmarks, teacher_template)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """One pass over the training crops in a random order, the last partial batch dropped."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        return [order[i : i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1, self.batch_size)]

    def batch(self, positions: np.ndarray, epoch: int, number: int) -> Views:
        rng = np.random.default_rng([self.seed, epoch, number, 1])
        positions = np.sort(positions)  # ascending reads from the memory map
        indices = self.indices[positions]
        crops = torch.from_numpy(np.array(self.cache.crops[indices])).permute(0, 3, 1, 2).float().div_(255)
        teacher_matrices = _compose(_jitter(rng, len(indices), self.augment, self.teacher_size), self.matrices[indices])
        to_student = np.diag([self.student_size / self.teacher_size] * 2 + [1.0])
        student_matrices = _compose(to_student[None], teacher_matrices)
        teacher = warp_to_template(crops, torch.from_numpy(teacher_matrices), (self.teacher_size, self.teacher_size))
        student = warp_to_template(crops, torch.from_numpy(student_matrices), (self.student_size, self.student_size))
        mirror = torch.from_numpy(rng.random(len(indices)) < self.augment.mirror).view(-1, 1, 1, 1)
        teacher = torch.where(mirror, teacher.flip(-1), teacher)
        student = torch.where(mirror, student.flip(-1), student)
        # One draw of the photometric change for both: the same picture at two resolutions.
        photometric_seed = rng.integers(2**63)
        teacher = _photometric(teacher, np.random.default_rng(photometric_seed), self.augment)
        student = _photometric(student, np.random.default_rng(photometric_seed), self.augment)
        if self.augment.mixup > 0:  # drawn last: a run without mixup sees exactly the views it always did
            teacher, student = _mixup(teacher, student, rng, self.augment)
        return Views(student.contiguous(), teacher.contiguous(), torch.from_numpy(self.labels[positions]))


def unaugmented(cache: FaceCache, indices: np.ndarray, template: Template) -> Tensor:
    """The crops warped to `template` without any augmentation: (N, 3, h, w) in [0, 1]."""
    crops = torch.from_numpy(np.array(cache.crops[np.asarray(indices)])).permute(0, 3, 1, 2).float().div_(255)
    matrices = torch.from_numpy(template_matrices(cache.crop_landmarks[np.asarray(indices)], template))
    return warp_to_template(crops, matrices, template.size)
