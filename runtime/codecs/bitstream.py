"""The learned codec's bitstream, version 1: a small self-describing, checksummed container.

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
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .base import CodecError

MAGIC = b"\xfa\xce"
VERSION = 1
TAG_BYTES = 4
_MAX_SIDE = 1 << 16


class BitstreamError(CodecError):
    """A bitstream that is not a valid facelink learned-codec stream."""


@dataclass(frozen=True)
class Header:
    codec_tag: bytes
    quality: int
    width: int
    height: int


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, pos: int, what: str) -> tuple[int, int]:
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
        if shift > 21:  # sides are < 2^16: three varint bytes at most
            raise BitstreamError(f"corrupt bitstream: the {what} is not a valid size")


def pack(header: Header, payload: bytes) -> bytes:
    if len(header.codec_tag) != TAG_BYTES:
        raise ValueError(f"codec tag must be {TAG_BYTES} bytes")
    if not 1 <= header.quality <= 255:
        raise ValueError(f"quality must be in 1..255, got {header.quality}")
    if not (0 < header.width < _MAX_SIDE and 0 < header.height < _MAX_SIDE):
        raise ValueError(f"picture sides must be in 1..{_MAX_SIDE - 1}, got {header.width}x{header.height}")
    body = MAGIC + bytes([VERSION]) + header.codec_tag + bytes([header.quality])
    body += _varint(header.width) + _varint(header.height) + payload
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes) -> tuple[Header, bytes]:
    """(header, payload), or a BitstreamError that says what is wrong with the bytes."""
    if len(data) < len(MAGIC) + 1 + TAG_BYTES + 1 + 2 + 4:
        raise BitstreamError(f"truncated bitstream: {len(data)} bytes is shorter than any valid stream")
    if data[:2] != MAGIC:
        raise BitstreamError(f"not a facelink learned-codec bitstream (magic {data[:2].hex()}, expected {MAGIC.hex()})")
    version = data[2]
    if version != VERSION:
        raise BitstreamError(f"bitstream version {version} is not supported by this build (supported: {VERSION})")
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
    return Header(tag, quality, width, height), body[pos:]
