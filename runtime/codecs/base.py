"""The payload codec interface: face crop in, bytes out, and back.

A codec is registered under an id that travels on the wire (`EncodedFace.codec_id`) together
with its bitstream version. The cloud decodes only what its registry holds, so a device cannot
make it run an arbitrary decoder.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


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

    def decode(self, data: bytes) -> np.ndarray:
        """Bitstream -> HxWx3 uint8 RGB. Raises CodecError on anything that is not a valid stream."""
        ...
