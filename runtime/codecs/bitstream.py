"""The learned codec's bitstream: a small self-describing, checksummed container.

Version 1, a picture coded at one quality:

    offset  size  field
    0       2     magic b"\\xfa\\xce"
    2       1     bitstream version (1)
    3       4     codec tag: the first 4 bytes of a sha256 over the codec's decoder and entropy
                  tables, so a stream is never decoded by a model it was not made for
    7       1     quality (1-based rate point)
    8       2+    width, then height of the coded picture: unsigned LEB128 varints
    .       n     entropy-coded payload (the latent symbols)
    end-4   4     CRC-32 (zlib) of everything before it, little-endian

About 14 bytes in all for a 128x128 face: small next to a few hundred bytes of payload, and
worth it, since a stream that is corrupt, truncated or foreign is refused with a clear error
instead of decoding into garbage.

Version 2, a picture coded with its bits on the faces (`face_aware`: an aligned crop inside its
border ring, what the edge sends by default, or the faces of a whole picture): the latent cells
(one per `stride` x `stride` pixels) inside the regions are coded at the header's quality,
every other cell at a coarse background level. After the height:

    1       background quality (1-based rate point whose table codes the background)
    1       background step: the background's quantisation step, in multiples of that
            quality's (1-255; 2 halves the background's symbols)
    1+      number of regions (varint, at least 1)
    4 x 1+  each region's first column, first row, end column, end row, in latent cells
            (varints; half-open, so a region covers x0 <= x < x1, y0 <= y < y1)

and the payload is the regions' symbols (their cells in raster order), then the background's:
a varint with the length of the first part, the first part, the second part. Both ends derive
which cell is which from these integers alone, so decoding still depends only on the bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .base import CodecError

MAGIC = b"\xfa\xce"
VERSION = 1          # one quality over the whole picture
REGIONS_VERSION = 2  # regions at the header's quality, the rest at a background level
VERSIONS = (VERSION, REGIONS_VERSION)
TAG_BYTES = 4
_MAX_SIDE = 1 << 16
_MAX_REGIONS = 256


class BitstreamError(CodecError):
    """A bitstream that is not a valid facelink learned-codec stream."""


@dataclass(frozen=True)
class Region:
    """A rectangle of latent cells, half-open: x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass(frozen=True)
class Background:
    """How the cells outside every region are coded: a quality's table at `step` times its step."""

    quality: int
    step: int = 1


@dataclass(frozen=True)
class Header:
    codec_tag: bytes
    quality: int
    width: int
    height: int
    regions: tuple[Region, ...] = ()         # empty: one quality over the whole picture (version 1)
    background: Background | None = None     # set exactly when there are regions

    @property
    def version(self) -> int:
        return REGIONS_VERSION if self.regions else VERSION


def varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits a byte, the high bit set on every byte but the last."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int, what: str, max_shift: int = 21) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise BitstreamError(f"truncated bitstream: it ends inside the {what}")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > max_shift:  # sides are < 2^16: three varint bytes at most
            raise BitstreamError(f"corrupt bitstream: the {what} is not a valid size")


def join_payload(regions: bytes, background: bytes) -> bytes:
    """A version-2 payload: the regions' part, then the background's."""
    return varint(len(regions)) + regions + background


def split_payload(payload: bytes) -> tuple[bytes, bytes]:
    """The regions' and the background's parts of a version-2 payload."""
    length, pos = _read_varint(payload, 0, "length of the regions' payload", max_shift=28)
    if pos + length > len(payload):
        raise BitstreamError(f"corrupt bitstream: the regions' payload ({length} bytes) runs past the end")
    return payload[pos : pos + length], payload[pos + length :]


def pack(header: Header, payload: bytes) -> bytes:
    if len(header.codec_tag) != TAG_BYTES:
        raise ValueError(f"codec tag must be {TAG_BYTES} bytes")
    if not 1 <= header.quality <= 255:
        raise ValueError(f"quality must be in 1..255, got {header.quality}")
    if not (0 < header.width < _MAX_SIDE and 0 < header.height < _MAX_SIDE):
        raise ValueError(f"picture sides must be in 1..{_MAX_SIDE - 1}, got {header.width}x{header.height}")
    if bool(header.regions) != (header.background is not None):
        raise ValueError("a header has a background exactly when it has regions")
    body = MAGIC + bytes([header.version]) + header.codec_tag + bytes([header.quality])
    body += varint(header.width) + varint(header.height)
    if header.regions:
        background = header.background
        assert background is not None
        if not (1 <= background.quality <= 255 and 1 <= background.step <= 255):
            raise ValueError(f"background quality and step must be in 1..255, got {background}")
        if len(header.regions) > _MAX_REGIONS:
            raise ValueError(f"at most {_MAX_REGIONS} regions, got {len(header.regions)}")
        body += bytes([background.quality, background.step]) + varint(len(header.regions))
        for r in header.regions:
            if not (0 <= r.x0 < r.x1 and 0 <= r.y0 < r.y1):
                raise ValueError(f"a region must be a non-empty rectangle of cells, got {r}")
            body += b"".join(varint(v) for v in (r.x0, r.y0, r.x1, r.y1))
    body += payload
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload), or a BitstreamError that says what is wrong with the bytes."""
    if len(data) < len(MAGIC) + 1 + TAG_BYTES + 1 + 2 + 4:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than any valid stream")
    if data[:2] != MAGIC:
        raise BitstreamError(f"not a facelink learned-codec bitstream (magic {data[:2].hex()}, expected {MAGIC.hex()})")
    version = data[2]
    if version not in VERSIONS:
        supported = ", ".join(map(str, VERSIONS))
        raise BitstreamError(f"bitstream version {version} is not supported by this build (supported: {supported})")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise BitstreamError("corrupt bitstream: checksum mismatch (truncated or altered in transit)")
    pos = 3
    tag = body[pos : pos + TAG_BYTES]
    quality = body[pos + TAG_BYTES]
    width, pos = _read_varint(body, pos + TAG_BYTES + 1, "width")
    height, pos = _read_varint(body, pos, "height")
    if not (0 < width < _MAX_SIDE and 0 < height < _MAX_SIDE):
        raise BitstreamError(f"corrupt bitstream: picture size {width}x{height}")
    if version == VERSION:
        return Header(tag, quality, width, height), body[pos:]
    if pos + 2 > len(body):
        raise BitstreamError("truncated bitstream: it ends inside the background level")
    background = Background(body[pos], body[pos + 1])
    if not (background.quality and background.step):
        raise BitstreamError(f"corrupt bitstream: background quality {background.quality}, step {background.step}")
    count, pos = _read_varint(body, pos + 2, "number of regions")
    if not 1 <= count <= _MAX_REGIONS:
        raise BitstreamError(f"corrupt bitstream: {count} regions (a version-2 stream has 1..{_MAX_REGIONS})")
    regions = []
    for _ in range(count):
        values = []
        for what in ("first column", "first row", "end column", "end row"):
            value, pos = _read_varint(body, pos, f"region's {what}")
            values.append(value)
        region = Region(*values)
        if not (region.x0 < region.x1 and region.y0 < region.y1):
            raise BitstreamError(f"corrupt bitstream: empty region {region}")
        regions.append(region)
    return Header(tag, quality, width, height, tuple(regions), background), body[pos:]
