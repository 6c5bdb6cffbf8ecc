"""The payload codec interface: face crop in, bytes out, and back.

A codec is registered under an id that travels on the wire (`EncodedFace.codec_id`) together
with its bitstream version. The cloud decodes only what its registry holds, so a device cannot
make it run an arbitrary decoder.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

#: The largest picture a face codec decodes unless the caller gives a budget (1920x1080 fits): a
#: face codec's pictures are crops and camera frames, and the learned decoder's activations grow
#: with the area (about a gigabyte at this size). A service that knows better (a streamed crop
#: is 128x128) passes a far smaller `max_pixels`.
MAX_PIXELS = 1 << 21


class CodecError(ValueError):
    """Bytes that cannot be decoded: corrupt, truncated, or not this codec's bitstream."""


class UnknownCodecError(CodecError):
    pass


class FaceCodec(Protocol):
    versions: tuple[int, ...]  # bitstream versions this build decodes; the last is written

    @property
    def codec_id(self) -> str: ...

    @property
    def version(self) -> int: ...

    def encode(self, image: np.ndarray) -> bytes:
        """HxWx3 uint8 RGB -> bitstream."""
        ...

    def decode(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """Bitstream -> HxWx3 uint8 RGB. Raises CodecError on anything that is not a valid stream,
        and, before decoding anything, on a picture larger than `max_pixels` (None: MAX_PIXELS)."""
        ...
