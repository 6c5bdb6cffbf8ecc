"""Standard image codecs through OpenCV: the baseline payloads (JPEG, PNG, WebP).

Bytes from the network are checked before OpenCV sees them: the picture's size is read from the
format's own header (JPEG's frame header, PNG's IHDR, WebP's VP8/VP8L/VP8X chunk) and refused
when it is over the caller's budget, so that a few hundred bytes claiming a 30000x30000 picture
cost nothing instead of gigabytes and seconds of decoding. A face codec decodes only its own
format: a `jpeg` payload never reaches OpenCV's TIFF, EXR or JPEG 2000 readers.
"""

from __future__ import annotations

import struct
from typing import ClassVar

import cv2
import numpy as np

from .base import MAX_PIXELS, CodecError

#: More scans than any encoder writes (progressive JPEGs have about ten): each scan is a pass over
#: the whole picture, so thousands of tiny scans are a cheap way to make the decoder spin.
MAX_JPEG_SCANS = 100
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"


def check_image(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.dtype} with shape {image.shape}")
    return image


# -- sizes from headers --------------------------------------------------------------------
def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from the leading bytes; None for anything else."""
    if data.startswith(JPEG_SOI):
        return "jpeg"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first SOFn frame header, walking the markers as libjpeg does."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # libjpeg skips stray bytes between markers (with a warning)
            pos += 1
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0x00) or 0xD0 <= marker <= 0xD8:  # no length field
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return width, height
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        pos += 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:  # extended: the canvas
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":  # lossy key frame
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # lossless
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) that a JPEG, PNG or WebP's header declares, without decoding anything;
    None when the bytes are none of these or the header cannot be read."""
    reader = {"jpeg": _jpeg_size, "png": _png_size, "webp": _webp_size}.get(image_format(data) or "")
    return reader(data) if reader else None


# -- decoding ------------------------------------------------------------------------------
def _check_declared_size(data: bytes, what: str, max_side: int | None, max_pixels: int | None) -> None:
    """Refuses a picture over the limits from its header alone, before anything is allocated."""
    size = image_size(data)
    if size is None:
        if max_pixels is not None:
            raise CodecError(f"{what} is not a JPEG, PNG or WebP picture whose size can be read ({len(data)} bytes)")
        if max_side is not None:
            _check_side_reduced(data, what, max_side)  # another format OpenCV reads: the old way
        return
    width, height = size
    if width == 0 or height == 0:
        raise CodecError(f"{what} declares an empty {width}x{height} picture")
    if max_side is not None and max(width, height) > max_side:
        raise CodecError(f"{what} is {width}x{height}, larger than {max_side} pixels on a side")
    if max_pixels is not None and width * height > max_pixels:
        raise CodecError(f"{what} is {width}x{height}, over the budget of {max_pixels:,} pixels")


def _check_png_chunks(data: bytes, what: str) -> None:
    """Refuses a PNG whose chunk claims more bytes than the payload has left, and an animated one.

    OpenCV's PNG reader allocates a chunk's declared length before it checks that the buffer
    holds it: a 700-byte payload whose IDAT claims 4 GB cost 4 GB and 15 s before the refusal.
    Its APNG reader (OpenCV >= 4.11) crashes the process (SIGSEGV) on a corrupt frame sequence
    that the still-picture path refuses cleanly, and a face or a picture is never animated.
    """
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I", data[pos : pos + 4])[0], data[pos + 4 : pos + 8]
        if pos + 12 + length > len(data):
            raise CodecError(
                f"{what} is a corrupt PNG: its {kind.decode('latin-1')!r} chunk claims {length:,} bytes, "
                f"{len(data) - pos - 12:,} are left"
            )
        if kind == b"acTL":
            raise CodecError(f"{what} is an animated PNG (APNG): only still pictures are decoded")
        if kind == b"IEND":
            return
        pos += 12 + length


def _check_jpeg_scans(data: bytes, what: str) -> None:
    # Inside entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so
    # every FF DA is a start-of-scan marker (or one of an embedded thumbnail's: an overcount).
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise CodecError(f"{what} has {scans} scans, more than the {MAX_JPEG_SCANS} any encoder writes")


def _check_side_reduced(data: bytes, what: str, max_side: int) -> None:
    # A format without a header reader here: a 1/8-scale decode costs 1/64 of the memory (for
    # JPEG; others decode whole and shrink) and tells the size to within 8 pixels.
    reduced = _imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8, what)
    if reduced is not None and (max(reduced.shape[:2]) - 1) * 8 > max_side:
        raise CodecError(f"{what} is about {reduced.shape[1] * 8}x{reduced.shape[0] * 8}, larger than {max_side} pixels on a side")


def _imdecode(data: bytes, flags: int, what: str) -> np.ndarray | None:
    try:
        return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as error:  # e.g. a 1/8-scale decode of a picture less than 8 pixels wide
        raise CodecError(f"{what} could not be decoded ({len(data)} bytes): {error.err or error}") from error


def decode_image(
    data: bytes, *, what: str = "image", max_side: int | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Any OpenCV-readable picture -> HxWx3 uint8 RGB, or a CodecError that says why not.

    `max_side` / `max_pixels` refuse a larger picture before it is decoded. With `max_pixels` the
    bytes must be a JPEG, PNG or WebP, whose headers say the size; with neither, any format OpenCV
    reads is decoded, as large as OpenCV allows.
    """
    if not data:
        raise CodecError(f"empty {what}")
    data = bytes(data)  # the header readers below slice and search it (a memoryview cannot)
    kind = image_format(data)
    if kind == "png":
        _check_png_chunks(data, what)
    elif kind == "jpeg":
        _check_jpeg_scans(data, what)
    if max_side is not None or max_pixels is not None:
        _check_declared_size(data, what, max_side, max_pixels)
    bgr = _imdecode(data, cv2.IMREAD_COLOR, what)
    if bgr is None:
        raise CodecError(f"{what} could not be decoded ({len(data)} bytes): corrupt or not a supported format")
    if max_side is not None and max(bgr.shape[:2]) > max_side:
        raise CodecError(f"{what} is {bgr.shape[1]}x{bgr.shape[0]}, larger than {max_side} pixels on a side")
    if max_pixels is not None and bgr.shape[0] * bgr.shape[1] > max_pixels:
        raise CodecError(f"{what} is {bgr.shape[1]}x{bgr.shape[0]}, over the budget of {max_pixels:,} pixels")
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

    def decode(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """This codec's bytes -> HxWx3 uint8 RGB, refused unless they are this codec's format and
        at most `max_pixels` (default: `MAX_PIXELS`, as for the learned codec) in area."""
        what = f"{self.codec_id} payload"
        found = image_format(bytes(data[:16]))
        if data and found != self.codec_id:
            raise CodecError(
                f"{what} could not be decoded: not a {self.codec_id.upper()} picture ({found or 'unknown format'}, {len(data)} bytes)"
            )
        return decode_image(data, what=what, max_pixels=MAX_PIXELS if max_pixels is None else max_pixels)


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
