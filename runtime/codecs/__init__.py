"""Payload codecs by id: what the edge may send and the cloud will decode.

    codec = create_codec("jpeg", quality=90)
    data = codec.encode(crop)          # HxWx3 uint8 RGB -> bytes
    crop = codec.decode(data)          # bytes -> HxWx3 uint8 RGB, or CodecError
"""

from __future__ import annotations

from .base import CodecError, FaceCodec, UnknownCodecError
from .standard import JpegCodec, PngCodec, WebpCodec, decode_image

__all__ = ["CodecError", "FaceCodec", "UnknownCodecError", "available_codecs", "create_codec", "decode_image"]

_REGISTRY: dict[str, type] = {cls.codec_id: cls for cls in (JpegCodec, WebpCodec, PngCodec)}


def available_codecs() -> dict[str, type]:
    return dict(_REGISTRY)


def create_codec(codec_id: str, quality: int = 90) -> FaceCodec:
    try:
        cls = _REGISTRY[codec_id]
    except KeyError:
        raise UnknownCodecError(f"unknown codec {codec_id!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return cls(quality=quality)
