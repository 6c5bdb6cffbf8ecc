"""Training batches: what a step sees, drawn deterministically from (seed, epoch, batch number).

Two kinds of batch, interleaved within each epoch:

* aligned: canonical 128x128 crops from the cache (what the edge sends), with their cached
  teacher embeddings as the identity targets;
* frames: random square crops with background (128 or 256 px) of the full source pictures,
  which the issue's full-frame protocol codes; their identity targets are computed by the
  torch teacher on the original, through the same warp as the reconstruction. Fewer pictures
  per batch at 256 px, to keep the pixels (and so the step time) per batch about constant.

Every random choice of a batch comes from a generator seeded with (seed, epoch, batch number),
so a run resumed from a checkpoint sees exactly the batches the uninterrupted run would have.

Mirroring: each picture is mirrored with probability 1/2 before coding (a free doubling of the
faces), and the teacher looks at the plain or the mirrored view with probability 1/2 each, so
that both views of the flip-augmented embedding the cloud computes are trained for, at the
cost of one teacher pass per face instead of two. The warp to the teacher's template always
undoes the input mirroring first, so the landmark matrices never need mirroring.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from facelink.config import CropRegionCoding
from facelink.runtime.alignment import Template
from torch import Tensor

from .data import FaceCache
from .model import STRIDE
from .teacher import template_matrices

#: Side of the aligned crops and the reference for the frame batches' picture count.
CROP_SIDE = 128
#: A frame crop keeps the five landmarks at least this far (px) inside when the picture allows.
FRAME_MARGIN = 8


@dataclass
class Batch:
    images: Tensor  # (B, 3, S, S) float RGB in [0, 1], channels-last
    matrices: Tensor  # (B, 2, 3) un-mirrored image -> teacher template (cv2 convention)
    mirrored: Tensor  # (B,) bool: the codec input is the mirror image
    views: Tensor  # (B,) bool: the teacher looks at the mirrored face
    targets: Tensor | None  # (B, dim) the original's embedding for that view, if cached
    quality: int
    kind: str  # "aligned" or "frames"
    # Latent cells coded at `quality` (the rest at `background`), as the edge codes its crops
    # (`CropRegionCoding`: the border ring at quality 1); None: every cell at `quality`.
    region: Tensor | None = None
    background: int | None = None

    @property
    def label(self) -> str:
        """How the batch was coded, for the logs: the quality, 'r' when with the ring."""
        return f"{self.quality}r" if self.region is not None else str(self.quality)


def ring_region(side: int, coding: CropRegionCoding = CropRegionCoding()) -> Tensor:
    """The inner latent cells of a `side` x `side` crop, those outside its border ring."""
    cells = side // STRIDE
    inside = torch.zeros(cells, cells, dtype=torch.bool)
    inside[coding.border_cells : cells - coding.border_cells, coding.border_cells : cells - coding.border_cells] = True
    return inside


def mirror_where(images: Tensor, which: Tensor) -> Tensor:
    """Mirror (flip left-right) the images selected by the boolean mask `which`."""
    return torch.where(which.view(-1, 1, 1, 1), images.flip(-1), images)


def split_by_identity(cache: FaceCache, val_identities: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) crop indices; validation = all crops of `val_identities` celeba-dev
    identities drawn with `seed`. LFW crops always train (LFW is evaluated on pairs.txt)."""
    labels = cache.identities()
    celeba = sorted(set(labels[cache.datasets() == "celeba"]))
    held_out = set(np.random.default_rng(seed).choice(celeba, size=val_identities, replace=False).tolist())
    is_val = np.array([label in held_out for label in labels])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _to_tensor(images: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last)


def frame_crop(
    image: np.ndarray, landmarks: np.ndarray, side: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random `side` x `side` crop of `image` that keeps the face, and the landmarks in it.

    Pictures smaller than `side` are first padded by replicating their border, as the codec's
    run time pads (centred here rather than bottom-right, so the face's position varies). The offset is uniform over the positions that keep every landmark
    `FRAME_MARGIN` px inside; where none does, the crop is centred on the landmarks.
    """
    height, width = image.shape[:2]
    pad_y, pad_x = max(0, side - height), max(0, side - width)
    if pad_x or pad_y:
        image = cv2.copyMakeBorder(
            image, pad_y // 2, pad_y - pad_y // 2, pad_x // 2, pad_x - pad_x // 2, cv2.BORDER_REPLICATE
        )
        landmarks = landmarks + np.array([pad_x // 2, pad_y // 2], dtype=np.float32)
    offset = []
    for axis, extent in ((0, image.shape[1]), (1, image.shape[0])):
        low = max(0, int(np.ceil(landmarks[:, axis].max() + FRAME_MARGIN - side)))
        high = min(extent - side, int(np.floor(landmarks[:, axis].min() - FRAME_MARGIN)))
        if low <= high:
            offset.append(int(rng.integers(low, high + 1)))
        else:
            offset.append(int(np.clip(round(landmarks[:, axis].mean() - side / 2), 0, extent - side)))
    x0, y0 = offset
    return image[y0 : y0 + side, x0 : x0 + side], landmarks - np.array([x0, y0], dtype=np.float32)


class BatchSampler:
    """Plans epochs and builds their batches from the cache's training indices."""

    def __init__(
        self,
        cache: FaceCache,
        indices: np.ndarray,
        template: Template,
        *,
        batch_size: int,
        frame_fraction: float,
        frame_sides: tuple[int, ...],
        qualities: int,
        seed: int,
        ring_fraction: float = 0.0,
    ) -> None:
        self.cache = cache
        self.indices = np.asarray(indices)
        self.template = template
        self.batch_size = batch_size
        self.frame_fraction = frame_fraction
        self.frame_sides = frame_sides
        self.qualities = qualities
        self.seed = seed
        self.ring_fraction = ring_fraction
        self.ring = CropRegionCoding()
        # Crop -> template matrices, once: the crop landmarks never change.
        self.matrices = template_matrices(cache.crop_landmarks, template)

    def epoch_plan(self, epoch: int) -> list[np.ndarray | None]:
        """The epoch's batches in order: crop indices for an aligned batch, None for a frame batch.

        An epoch is one pass over the training crops (the last partial batch dropped), with
        frame batches making up `frame_fraction` of all batches, at random positions.
        """
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.indices)
        aligned = [
            order[i : i + self.batch_size]
            for i in range(0, len(order) - self.batch_size + 1, self.batch_size)
        ]
        n_frames = round(len(aligned) * self.frame_fraction / (1 - self.frame_fraction))
        plan: list[np.ndarray | None] = list(aligned)
        for position in np.sort(rng.choice(len(aligned) + n_frames, size=n_frames, replace=False)):
            plan.insert(int(position), None)
        return plan

    def batch(self, entry: np.ndarray | None, epoch: int, number: int) -> Batch:
        rng = np.random.default_rng([self.seed, epoch, number, 1])
        quality = int(rng.integers(1, self.qualities + 1))
        if entry is None:
            return self._frames(rng, quality)
        indices = np.sort(entry)  # ascending reads from the memory map
        mirrored = rng.random(len(indices)) < 0.5
        views = rng.random(len(indices)) < 0.5
        images = np.array(self.cache.crops[indices])
        images[mirrored] = images[mirrored, :, ::-1]
        return Batch(
            images=_to_tensor(images),
            matrices=torch.from_numpy(self.matrices[indices]),
            mirrored=torch.from_numpy(mirrored),
            views=torch.from_numpy(views),
            targets=torch.from_numpy(self.cache.embeddings[indices, views.astype(int)]),
            quality=quality,
            kind="aligned",
            **self._ring(epoch, number, quality),
        )

    def _ring(self, epoch: int, number: int, quality: int) -> dict:
        """Whether an aligned batch is coded as the edge codes its crops, with the border ring at
        the background quality. A stream of its own, so runs without the ring draw the same
        batches as before it existed."""
        if quality <= self.ring.background_quality or self.ring_fraction <= 0:
            return {}
        if np.random.default_rng([self.seed, epoch, number, 2]).random() >= self.ring_fraction:
            return {}
        return {"region": ring_region(CROP_SIDE, self.ring), "background": self.ring.background_quality}

    def _frames(self, rng: np.random.Generator, quality: int) -> Batch:
        side = int(rng.choice(self.frame_sides))
        count = max(1, round(self.batch_size * (CROP_SIDE / side) ** 2))
        images, landmarks = [], []
        for index in rng.choice(self.indices, size=count, replace=False):
            frame, points = self.cache.frame(int(index))
            crop, points = frame_crop(frame, points, side, rng)
            images.append(crop)
            landmarks.append(points)
        stack = np.stack(images)
        mirrored = rng.random(count) < 0.5
        stack[mirrored] = stack[mirrored, :, ::-1]
        return Batch(
            images=_to_tensor(stack),
            matrices=torch.from_numpy(template_matrices(np.stack(landmarks), self.template)),
            mirrored=torch.from_numpy(mirrored),
            views=torch.from_numpy(rng.random(count) < 0.5),
            targets=None,
            quality=quality,
            kind="frames",
        )
