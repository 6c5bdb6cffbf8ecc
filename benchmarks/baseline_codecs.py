"""Standard codecs the learned face codec is measured against: HEVC (x265), JPEG, WebP, AVIF, JPEG XL.

Each baseline is a small class with a family `name`, one `quality` knob, and
`encode(HxWx3 uint8 RGB) -> bytes` / `decode(bytes) -> HxWx3 uint8 RGB`. The bytes are what a
receiver needs to rebuild the picture, and nothing else:

- `x265`: HEVC through PyAV's libx265, one still frame (an intra picture), yuv420p, CRF as the
  knob (lower = finer; 23 is ffmpeg's default and the literature's reference point), preset
  `medium` by default. The bytes are the encoded packets only: the Annex B stream with its
  VPS/SPS/PPS and the slice, no container. `x265-params` sets `info=0`, because by default x265
  writes its version and full option string into an SEI message, about 2,300 bytes that carry no
  picture, and `log-level=error`. `pools` pins the encoder to `threads` worker threads (1 by
  default, so its times compare with the learned codec's single-thread ONNX Runtime times; the
  bitstream does not depend on it). 4:2:0 needs even sides: an odd-sided picture is padded by
  repeating its last row/column, and one marker byte in front of the stream (never 0x00, which
  every Annex B stream starts with) tells the decoder what to crop back. Even-sided pictures
  (every LFW picture and face crop) carry no marker.
- `jpeg`: libjpeg-turbo through imagecodecs, 4:2:0, standard Huffman tables: the same bytes as
  OpenCV's encoder, so the same as the edge's `jpeg` payload codec today. Its headers (JFIF,
  quantisation and Huffman tables) take about 600 bytes whatever the picture: 0.3 bpp of a
  128x128 crop before a single coefficient.
- `webp`: libwebp, lossy (always 4:2:0), method 4 (libwebp's default effort).
- `avif`: libavif with libaom, 8-bit 4:2:0, speed 6, one thread. The bytes include the HEIF
  container (ftyp and meta boxes and the mdat header: 275 bytes), as an AVIF file does.
- `jxl`: libjxl, effort 7 (its default), one thread; the knob is libjxl's quality (mapped to a
  Butteraugli distance); no container.

`create_baseline(name, quality)` builds one; `BASELINES` lists them. PyAV and imagecodecs are
the `bench` extra (`pip install 'facelink[bench]'`); a missing one fails with that hint when a
codec is built, not when this module is imported.
"""

from __future__ import annotations

import importlib
from fractions import Fraction
from types import ModuleType
from typing import Any, ClassVar, Protocol

import numpy as np

from facelink.runtime.codecs.standard import check_image

INSTALL_HINT = "pip install 'facelink[bench]'"


class BaselineCodec(Protocol):
    name: str
    knob: str  # what `quality` means: "crf" or "q"
    finer_when_higher: bool  # does a larger `quality` spend more bytes?
    quality: int

    @property
    def label(self) -> str: ...

    def settings(self) -> dict[str, Any]:
        """Everything that decides the bytes (for cache keys and the report)."""
        ...

    def encode(self, image: np.ndarray) -> bytes: ...

    def decode(self, data: bytes) -> np.ndarray: ...


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the baseline codecs need {module!r}: {INSTALL_HINT}") from error


def _check_rgb(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(check_image(image))  # the C encoders want contiguous rows


def _check_range(name: str, quality: int, low: int, high: int) -> int:
    if not low <= quality <= high:
        raise ValueError(f"{name} quality must be in {low}..{high}, got {quality}")
    return int(quality)


class _Baseline:
    name: ClassVar[str]
    knob: ClassVar[str] = "q"
    finer_when_higher: ClassVar[bool] = True
    quality: int

    @property
    def label(self) -> str:
        return f"{self.name} {self.knob}{self.quality}"

    def settings(self) -> dict[str, Any]:
        return {"codec": self.name, self.knob: self.quality}


class X265Codec(_Baseline):
    """HEVC intra picture through libx265 (see the module docstring for what is counted)."""

    name = "x265"
    knob = "crf"
    finer_when_higher = False
    _MARKER = 0x80  # | 1: width was odd, | 2: height was odd

    def __init__(self, quality: int = 23, preset: str = "medium", threads: int = 1) -> None:
        self.quality = _check_range("x265 CRF", quality, 0, 51)
        self.preset = preset
        self.threads = threads
        self._av = _require("av")

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "preset": self.preset,
            "pix_fmt": "yuv420p",
            "x265-params": "info=0",
            "pyav": self._av.__version__,
        }

    def encode(self, image: np.ndarray) -> bytes:
        image = _check_rgb(image)
        height, width = image.shape[:2]
        odd_w, odd_h = width % 2, height % 2
        if odd_w or odd_h:
            image = np.pad(image, ((0, odd_h), (0, odd_w), (0, 0)), mode="edge")
        context = self._av.CodecContext.create("libx265", "w")
        context.width, context.height = image.shape[1], image.shape[0]
        context.pix_fmt = "yuv420p"
        context.time_base = Fraction(1, 25)
        context.options = {
            "crf": str(self.quality),
            "preset": self.preset,
            "x265-params": f"info=0:log-level=error:pools={self.threads}",
        }
        frame = self._av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        frame.pts = 0
        packets = [*context.encode(frame), *context.encode(None)]
        stream = b"".join(bytes(packet) for packet in packets)
        if odd_w or odd_h:
            return bytes([self._MARKER | odd_w | odd_h << 1]) + stream
        return stream

    def decode(self, data: bytes) -> np.ndarray:
        if not data:
            raise ValueError("empty x265 stream")
        odd_w = odd_h = 0
        if data[0] != 0:  # the odd-size marker (an Annex B stream starts with 0x00)
            odd_w, odd_h = data[0] & 1, data[0] >> 1 & 1
            data = data[1:]
        context = self._av.CodecContext.create("hevc", "r")
        context.thread_count = self.threads
        frames = [*context.decode(self._av.Packet(data)), *context.decode(None)]
        if len(frames) != 1:
            raise ValueError(f"expected one picture in the x265 stream, decoded {len(frames)}")
        image = frames[0].to_ndarray(format="rgb24")
        return np.ascontiguousarray(image[: image.shape[0] - odd_h, : image.shape[1] - odd_w])


class _ImagecodecsCodec(_Baseline):
    """A still-image codec from imagecodecs: `_encode(image, level, **_options)` / `_decode(bytes)`."""

    _encoder: ClassVar[str]
    _decoder: ClassVar[str]
    _range: ClassVar[tuple[int, int]] = (1, 100)

    def __init__(self, quality: int, **options: Any) -> None:
        self.quality = _check_range(self.name, quality, *self._range)
        self._options = options
        self._codecs = _require("imagecodecs")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "options": self._options, "imagecodecs": self._codecs.__version__}

    def encode(self, image: np.ndarray) -> bytes:
        return bytes(getattr(self._codecs, self._encoder)(_check_rgb(image), self.quality, **self._options))

    def decode(self, data: bytes) -> np.ndarray:
        image = np.asarray(getattr(self._codecs, self._decoder)(data))
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{self.name} decoded to {image.dtype} {image.shape}, expected HxWx3 uint8")
        return np.ascontiguousarray(image)


class JpegCodec(_ImagecodecsCodec):
    name = "jpeg"
    _encoder, _decoder = "jpeg8_encode", "jpeg8_decode"

    def __init__(self, quality: int = 75) -> None:
        super().__init__(quality, subsampling="420", optimize=False)


class WebpCodec(_ImagecodecsCodec):
    name = "webp"
    _encoder, _decoder = "webp_encode", "webp_decode"
    _range = (0, 100)

    def __init__(self, quality: int = 75) -> None:
        super().__init__(quality, lossless=False, method=4)


class AvifCodec(_ImagecodecsCodec):
    name = "avif"
    _encoder, _decoder = "avif_encode", "avif_decode"
    _range = (0, 99)  # 100 is lossless

    def __init__(self, quality: int = 50, speed: int = 6) -> None:
        super().__init__(
            quality, codec="aom", pixelformat="yuv420", bitspersample=8, speed=speed, numthreads=1
        )


class JpegXlCodec(_ImagecodecsCodec):
    name = "jxl"
    _encoder, _decoder = "jpegxl_encode", "jpegxl_decode"
    _range = (1, 99)  # 100 is lossless

    def __init__(self, quality: int = 75, effort: int = 7) -> None:
        super().__init__(quality, effort=effort, numthreads=1)


BASELINES: dict[str, type[_Baseline]] = {
    cls.name: cls for cls in (X265Codec, JpegCodec, WebpCodec, AvifCodec, JpegXlCodec)
}


def create_baseline(name: str, quality: int, **options: Any) -> BaselineCodec:
    """A baseline by family name (`x265`, `jpeg`, `webp`, `avif`, `jxl`) at one quality."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline codec {name!r}; available: {', '.join(BASELINES)}")
    return BASELINES[name](quality, **options)  # type: ignore[call-arg]
