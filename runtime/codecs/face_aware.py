"""The learned codec with its bits on the faces: whole pictures steered by a face detector, and
aligned crops whose border is known to matter least.

    codec = FaceAwareCodec(LearnedFaceCodec.load("wide", quality=4), create_detector(DetectorConfig()))
    data = codec.encode(picture)   # faces at quality 4, the rest coarse (bitstream v2)
    picture = codec.decode(data)   # any LearnedFaceCodec of the same bundle decodes it too

    codec = AlignedCropCodec(LearnedFaceCodec.load("wide", quality=4))
    data = codec.encode(crop)      # the canonical crop's face at quality 4, its border ring at 1

A learned codec trained on faces spreads its bits evenly over a whole picture, background
included. Here the encoder finds the faces first (it runs on the board, which detects anyway)
and asks the codec for its quality only on the latent cells under each face's canonical crop:
the region the cloud aligns and recognises from. An aligned crop needs no detector: its face is
where the template put it, and the ring of cells along its edges (margin, hair, background)
is what recognisers weigh least. Where the regions are travels in the header, in latent cells,
so the decoder needs no detector and decoding depends only on the bytes.
"""

from __future__ import annotations

import numpy as np

from facelink.config import CropRegionCoding, FaceRegionCoding

from ..alignment import canonical_template, crop_footprint
from ..detection.base import FaceDetector
from . import bitstream
from .learned import Box, LearnedFaceCodec


class _RegionCodec:
    """What both share: a learned codec, a background level, and the codec's identity."""

    versions = LearnedFaceCodec.versions

    def __init__(self, codec: LearnedFaceCodec, background: bitstream.Background) -> None:
        if not 1 <= background.quality <= codec.manifest.qualities:
            raise ValueError(f"background quality must be one of the codec's qualities 1..{codec.manifest.qualities}, "
                             f"got {background.quality}")
        self.codec = codec
        self.background = background

    @property
    def codec_id(self) -> str:
        return self.codec.codec_id

    @property
    def version(self) -> int:
        return bitstream.REGIONS_VERSION

    @property
    def quality(self) -> int:
        return self.codec.quality

    @property
    def description(self) -> str:
        return f"{self.codec.description}, faces at quality {self.quality}, the rest at {self.background}"

    def regions(self, image: np.ndarray) -> list[Box]:
        raise NotImplementedError

    def encode(self, image: np.ndarray) -> bytes:
        return self.codec.encode(image, regions=self.regions(image), background=self.background)

    def decode(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        return self.codec.decode(data, max_pixels)


class AlignedCropCodec(_RegionCodec):
    """A `LearnedFaceCodec` for aligned crops: the ring of latent cells along the crop's edges at
    the background level, the rest at the codec's quality."""

    def __init__(self, codec: LearnedFaceCodec, config: CropRegionCoding = CropRegionCoding()) -> None:
        super().__init__(codec, bitstream.Background(config.background_quality, config.background_step))
        self.config = config

    def regions(self, image: np.ndarray) -> list[Box]:
        """The crop inside its border ring (the whole crop when it is too small to have one)."""
        height, width = image.shape[:2]
        border = self.config.border_cells * self.codec.manifest.stride
        if width <= 2 * border or height <= 2 * border:
            return [(0.0, 0.0, float(width), float(height))]
        return [(float(border), float(border), float(width - border), float(height - border))]


class FaceAwareCodec(_RegionCodec):
    """A `LearnedFaceCodec` that codes whole pictures with their faces at its quality."""

    def __init__(self, codec: LearnedFaceCodec, detector: FaceDetector, config: FaceRegionCoding = FaceRegionCoding()) -> None:
        super().__init__(codec, bitstream.Background(config.background_quality, config.background_step))
        self.detector = detector
        self.config = config
        self._template = canonical_template(config.crop.size, config.crop.scale)

    def regions(self, image: np.ndarray) -> list[Box]:
        """The pixel boxes coded at the codec's quality: each detected face's canonical crop, or
        the whole picture when no face is found (the cloud may still find one)."""
        height, width = image.shape[:2]
        m = self.config.margin
        boxes = []
        for face in self.detector.detect(image):
            x0, y0, x1, y1 = crop_footprint(face.landmarks, self._template)
            boxes.append((x0 - m, y0 - m, x1 + m, y1 + m))
        return boxes or [(0.0, 0.0, float(width), float(height))]
