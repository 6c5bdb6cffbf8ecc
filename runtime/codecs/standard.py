"""Standard image codecs through OpenCV: the baseline payloads (JPEG, PNG, WebP)."""

from __future__ import annotations

from typing import ClassVar

import cv2
import numpy as np

from .base import CodecError


def check_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} with shape {image.shape}")
    return image


def decode_image(data: bytes, *, what: str = "image", max_side: int | None = None) -> np.ndarray:
    """Any OpenCV-readable picture -> HxWx3 uint8 RGB, or a CodecError that says why not."""
    if not data:
        raise CodecError(f"empty {what}")
    buffer = np.frombuffer(data, dtype=np.uint8)
    if max_side is not None:
        # Refuse decompression bombs before allocating the full picture: a 1/8-scale decode
        # costs 1/64 of the memory and tells the size to within 8 pixels.
        reduced = cv2.imdecode(buffer, cv2.IMREAD_REDUCED_GRAYSCALE_8)
        if reduced is not None and (max(reduced.shape[:2]) - 1) * 8 > max_side:
            raise CodecError(f"{what} is about {reduced.shape[1] * 8}x{reduced.shape[0] * 8}, larger than {max_side} pixels on a side")
    bgr = cv2.imdecode(buffer, cv2.IMREAD_COLOR)
    if bgr is None:
        raise CodecError(f"{what} could not be decoded ({len(data)} bytes): corrupt or not a supported format")
    if max_side is not None and max(bgr.shape[:2]) > max_side:
        raise CodecError(f"{what} is {bgr.shape[1]}x{bgr.shape[0]}, larger than {max_side} pixels on a side")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


class _OpenCvCodec:
    codec_id: ClassVar[str]
    versions: ClassVar[tuple[int, ...]] = (1,)
    description: ClassVar[str]
    _extension: ClassVar[str]
    _quality_flag: ClassVar[int | None]

    def __init__(self, quality: int = 90) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality}")
        self.quality = quality

    @property
    def version(self) -> int:
        return self.versions[-1]

    def encode(self, image: np.ndarray) -> bytes:
        bgr = cv2.cvtColor(check_image(image), cv2.COLOR_RGB2BGR)
        params = [self._quality_flag, self.quality] if self._quality_flag is not None else []
        ok, buffer = cv2.imencode(self._extension, bgr, params)
        if not ok:
            raise RuntimeError(f"OpenCV failed to encode {self.codec_id}")
        return buffer.tobytes()

    def decode(self, data: bytes) -> np.ndarray:
        return decode_image(data, what=f"{self.codec_id} payload")


class JpegCodec(_OpenCvCodec):
    codec_id = "jpeg"
    description = "baseline JPEG (libjpeg via OpenCV), 4:2:0"
    _extension = ".jpg"
    _quality_flag = cv2.IMWRITE_JPEG_QUALITY


class WebpCodec(_OpenCvCodec):
    codec_id = "webp"
    description = "WebP (libwebp via OpenCV), lossy"
    _extension = ".webp"
    _quality_flag = cv2.IMWRITE_WEBP_QUALITY


class PngCodec(_OpenCvCodec):
    codec_id = "png"
    description = "PNG, lossless"
    _extension = ".png"
    _quality_flag = None
