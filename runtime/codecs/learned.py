"""The learned, identity-preserving face codec at run time: ONNX Runtime + static entropy tables.

    codec = LearnedFaceCodec.load("default", quality=3)
    data = codec.encode(face)        # HxWx3 uint8 RGB, any size -> a few hundred bytes
    face = codec.decode(data)        # bytes -> HxWx3 uint8 RGB, or a CodecError
    data = codec.encode(picture, regions=[(x0, y0, x1, y1)], background=Background(1, 2))
                                     # the regions at `quality`, the rest coarser (bitstream v2)

A codec bundle is a manifest (`runtime/manifests/codecs/codec-<name>.json`) naming three files with
their sha256: the analysis transform (`encoder`), the synthesis transform (`decoder`), both
ONNX, and the entropy tables (`tables`, .npz: per-quality gains, inverse gains, medians and
per-channel probability tables). They are produced by `facelink.export.codec` (torch); nothing
here needs torch. The codec id on the wire, `flc-<name>-<tag>`, carries a tag derived from the
decoder's and the tables' hashes, so bytes are never decoded by weights other than those they
were made for (any export of the matching encoder, fp32, fp16 or int8, makes such bytes).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facelink.config import BackendConfig

from ..backends import OnnxRuntimeBackend, create_backend
from ..backends.onnxruntime_backend import release_freed_memory
from ..manifest import ManifestError, file_sha256, load_named_json
from . import bitstream
from .base import MAX_PIXELS, CodecError  # MAX_PIXELS lived here first: still importable from here
from .bitstream import Background, Region
from .entropy import ChannelTables, FactorizedEntropyCoder
from .standard import check_image

CODEC_PREFIX = "codec-"
CODEC_FOLDER = "codecs"
#: After decoding a picture this large (padded), the freed heap goes back to the system: its
#: activations were hundreds of megabytes (a 128x128 crop's are a few).
RELEASE_AFTER_PIXELS = 1 << 19


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class BundleFile(_Strict):
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class CodecManifest(_Strict):
    manifest_version: int = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = "1"
    encoder: BundleFile
    decoder: BundleFile
    tables: BundleFile
    stride: int = Field(16, gt=0, description="total downsampling: pictures are padded to a multiple of it")
    qualities: int = Field(gt=0)
    default_quality: int | None = Field(
        None, gt=0, description="the quality used unless one is asked for: set to the lowest that keeps "
        "recognition at parity (`facelink bench rate-accuracy`); None: the middle one"
    )
    latent_channels: int = Field(gt=0)
    border_ring_quality: int | None = Field(
        None, gt=0, description="the quality used when the crop's border ring is coded at quality 1 "
        "(`AlignedCropCodec`, the edge's default): the lowest that keeps recognition at parity that way; "
        "None: default_quality"
    )
    license: str | None = None
    description: str | None = None
    training: dict[str, object] = Field(default_factory=dict, description="how the weights were made")

    @model_validator(mode="after")
    def _default_quality_exists(self) -> CodecManifest:
        for field in ("default_quality", "border_ring_quality"):
            value = getattr(self, field)
            if value is not None and value > self.qualities:
                raise ValueError(f"{field} {value} is not one of the qualities 1..{self.qualities}")
        return self

    @property
    def preferred_quality(self) -> int:
        return self.default_quality or (self.qualities + 1) // 2

    @property
    def tag(self) -> bytes:
        # Bound to what decoding depends on, the decoder and the entropy tables, and not to the
        # encoder: an int8 or fp16 export of the encoder writes streams the same decoder reads,
        # so the board may run one while the cloud keeps the fp32 bundle.
        digest = hashlib.sha256((self.decoder.sha256 + self.tables.sha256).encode())
        return digest.digest()[: bitstream.TAG_BYTES]

    @property
    def codec_id(self) -> str:
        return f"flc-{self.name}-{self.tag.hex()}"


def codec_manifests() -> dict[str, Path]:
    """Bundled learned codecs by name (`manifests/codecs/codec-<name>.json`), apart from the
    model manifests that `load_manifest` validates."""
    folder = resources.files("facelink.runtime") / "manifests" / CODEC_FOLDER
    if not folder.is_dir():
        return {}
    return {
        Path(str(p)).stem[len(CODEC_PREFIX) :]: Path(str(p))
        for p in folder.iterdir()
        if Path(str(p)).name.startswith(CODEC_PREFIX) and str(p).endswith(".json")
    }


def load_codec_manifest(name_or_path: str | Path) -> tuple[CodecManifest, Path]:
    return load_named_json(CodecManifest, name_or_path, codec_manifests(), "learned codec")


#: A rectangle of a picture in pixels: x0, y0, x1, y1 (x1, y1 exclusive).
Box = tuple[float, float, float, float]


class LearnedFaceCodec:
    versions = bitstream.VERSIONS

    def __init__(self, manifest: CodecManifest, folder: Path, quality: int, backend: BackendConfig = BackendConfig()) -> None:
        if not 1 <= quality <= manifest.qualities:
            raise ValueError(f"codec {manifest.name!r} has qualities 1..{manifest.qualities}, got {quality}")
        self.manifest = manifest
        self.quality = quality
        self._folder = folder
        self._backend = backend
        self._lock = threading.Lock()  # lazily built sessions are shared by gRPC worker threads
        tables = np.load(self._verified(manifest.tables, "tables"))
        self._gain = tables["gain"].astype(np.float32)
        self._inverse_gain = tables["inverse_gain"].astype(np.float32)
        self._medians = tables["medians"].astype(np.float32)
        self._tables = [
            ChannelTables(tables["pmf"][q], tables["length"][q].astype(np.int64), tables["offset"][q].astype(np.int64))
            for q in range(manifest.qualities)
        ]
        self._coders: dict[int, FactorizedEntropyCoder] = {}

    @classmethod
    def load(cls, name: str | Path = "default", quality: int = 3, backend: BackendConfig = BackendConfig()) -> "LearnedFaceCodec":
        manifest, path = load_codec_manifest(name)
        return cls(manifest, path.parent, quality, backend)

    def at_quality(self, quality: int) -> "LearnedFaceCodec":
        """The same bundle at another quality."""
        return LearnedFaceCodec(self.manifest, self._folder, quality, self._backend)

    # -- identity ----------------------------------------------------------------------------
    @property
    def codec_id(self) -> str:
        return self.manifest.codec_id

    @property
    def version(self) -> int:
        """What `encode(picture)` writes (with regions it writes `bitstream.REGIONS_VERSION`)."""
        return bitstream.VERSION

    @property
    def description(self) -> str:
        return f"facelink learned face codec {self.manifest.name!r}, qualities 1-{self.manifest.qualities}"

    # -- models, built on first use ----------------------------------------------------------
    def _verified(self, entry: BundleFile, what: str) -> Path:
        path = Path(entry.file) if Path(entry.file).is_absolute() else self._folder / entry.file
        if not path.is_file():
            raise ManifestError(f"codec {self.manifest.name!r}: {what} file {path} does not exist")
        if file_sha256(path) != entry.sha256:
            raise ManifestError(f"codec {self.manifest.name!r}: {path} does not match the sha256 in the manifest")
        return path

    def bundle_file(self, part: str) -> Path:
        """One of the bundle's files ('encoder', 'decoder' or 'tables'), checked against the
        manifest's sha256."""
        return self._verified(getattr(self.manifest, part), part)

    @cached_property
    def encoder_backend(self):  # noqa: ANN202
        with self._lock:
            return create_backend(self._verified(self.manifest.encoder, "encoder"), self._backend)

    @cached_property
    def decoder_backend(self):  # noqa: ANN202
        with self._lock:
            path = self._verified(self.manifest.decoder, "decoder")
            if path.suffix.lower() == ".onnx":
                # The decoder's input size follows each stream's header: one large picture must
                # not leave ONNX Runtime's memory arena at its size for the life of the process.
                return OnnxRuntimeBackend(path, self._backend, release_memory=True)
            return create_backend(path, self._backend)

    def entropy_coder(self, quality: int) -> FactorizedEntropyCoder:
        """The static-table coder of one quality's symbols (the payload, without the header)."""
        coder = self._coders.get(quality)
        if coder is None:
            coder = self._coders[quality] = FactorizedEntropyCoder(self._tables[quality - 1])
        return coder

    # -- the codec ---------------------------------------------------------------------------
    def latent_size(self, width: int, height: int) -> tuple[int, int]:
        stride = self.manifest.stride
        return math.ceil(height / stride), math.ceil(width / stride)

    @staticmethod
    def _check_area(width: int, height: int, error: type[ValueError]) -> None:
        if width * height > MAX_PIXELS:
            raise error(f"a {width}x{height} picture is larger than the learned codec's limit of {MAX_PIXELS:,} pixels")

    def _check_budget(self, width: int, height: int, max_pixels: int) -> None:
        """A caller's pixel budget, on the area the decoder synthesises: the picture padded to the
        stride (a 1x4096 picture is decoded as 16x4096)."""
        h, w = self.latent_size(width, height)
        stride = self.manifest.stride
        if (h * stride) * (w * stride) > max_pixels:
            raise CodecError(
                f"a {width}x{height} picture ({w * stride}x{h * stride} once padded to the codec's stride) "
                f"is over the budget of {max_pixels:,} pixels"
            )

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """The encoder's (1, 3, H, W) input: the picture padded to a multiple of the stride, in [0, 1]."""
        image = check_image(image)
        height, width = image.shape[:2]
        self._check_area(width, height, ValueError)
        h, w = self.latent_size(width, height)
        stride = self.manifest.stride
        # Edge-replicate padding: a flat border costs almost no bits and leaves no seam.
        padded = np.pad(image, ((0, h * stride - height), (0, w * stride - width), (0, 0)), mode="edge")
        return np.ascontiguousarray((padded.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])

    def quantize(self, latent: np.ndarray, quality: int, step: int = 1) -> np.ndarray:
        """The integer symbols of a (C, ...) latent at `quality`: what the entropy coder codes.

        `step` > 1 quantises `step` times more coarsely than the quality's own step (a background).
        """
        q = quality - 1
        shape = (-1,) + (1,) * (latent.ndim - 1)
        scaled = latent * self._gain[q].reshape(shape) - self._medians[q].reshape(shape)
        return np.rint(scaled / step if step != 1 else scaled).astype(np.int64)

    def dequantize(self, symbols: np.ndarray, quality: int, step: int = 1) -> np.ndarray:
        """The decoder's (C, ...) input from decoded symbols."""
        q = quality - 1
        shape = (-1,) + (1,) * (symbols.ndim - 1)
        values = symbols.astype(np.float32) * np.float32(step)
        return (values + self._medians[q].reshape(shape)) * self._inverse_gain[q].reshape(shape)

    def cells(self, box: Box, width: int, height: int) -> Region | None:
        """The latent cells a pixel box touches (rounded outwards), or None if it misses the picture."""
        h, w = self.latent_size(width, height)
        stride = self.manifest.stride
        x0, y0, x1, y1 = box
        region = Region(max(0, math.floor(x0 / stride)), max(0, math.floor(y0 / stride)),
                        min(w, math.ceil(x1 / stride)), min(h, math.ceil(y1 / stride)))
        return region if region.x0 < region.x1 and region.y0 < region.y1 else None

    def _region_mask(self, regions: Sequence[Region], h: int, w: int) -> np.ndarray:
        mask = np.zeros((h, w), dtype=bool)
        for r in regions:
            if r.x1 > w or r.y1 > h:
                raise CodecError(f"corrupt bitstream: region {r} lies outside the {w}x{h} latent")
            mask[r.y0 : r.y1, r.x0 : r.x1] = True
        return mask

    def _check_quality(self, quality: int, what: str) -> None:
        if not 1 <= quality <= self.manifest.qualities:
            raise CodecError(f"corrupt bitstream: {what} {quality} is outside 1..{self.manifest.qualities}")

    def _latent(self, image: np.ndarray) -> np.ndarray:
        backend = self.encoder_backend
        return backend.run({backend.input_names[0]: self.encoder_input(image)})[0][0]

    def encode(self, image: np.ndarray, regions: Sequence[Box] = (), background: Background | None = None) -> bytes:
        """A picture -> bytes. With `regions` (pixel boxes), only their latent cells are coded at
        this codec's quality and every other cell at `background` (bitstream version 2)."""
        image = check_image(image)
        height, width = image.shape[:2]
        y = self._latent(image)
        cells = tuple(dict.fromkeys(c for c in (self.cells(b, width, height) for b in regions) if c is not None))
        if not cells:
            payload = self.entropy_coder(self.quality).encode(self.quantize(y, self.quality))
            return bitstream.pack(bitstream.Header(self.manifest.tag, self.quality, width, height), payload)
        if background is None:
            raise ValueError("coding regions needs a background level (bitstream.Background)")
        if not 1 <= background.quality <= self.manifest.qualities:
            raise ValueError(f"background quality must be in 1..{self.manifest.qualities}, got {background.quality}")
        mask = self._region_mask(cells, *y.shape[1:])
        inside = self.entropy_coder(self.quality).encode(self.quantize(y[:, mask], self.quality)[:, None, :])
        outside = b""
        if not mask.all():
            symbols = self.quantize(y[:, ~mask], background.quality, background.step)
            outside = self.entropy_coder(background.quality).encode(symbols[:, None, :])
        header = bitstream.Header(self.manifest.tag, self.quality, width, height, cells, background)
        return bitstream.pack(header, bitstream.join_payload(inside, outside))

    def decode(self, data: bytes, max_pixels: int | None = None) -> np.ndarray:
        """Bytes -> HxWx3 uint8 RGB, or a CodecError that says what is wrong with them.

        A picture larger than `max_pixels` (padded to the stride; None: the codec's own limit,
        `MAX_PIXELS`) is refused from its header, before any symbol is decoded or memory allocated.
        """
        header, payload = bitstream.unpack(data)
        if header.codec_tag != self.manifest.tag:
            raise CodecError(
                f"bitstream was made by another codec (tag {header.codec_tag.hex()}, this is {self.manifest.tag.hex()}: "
                f"{self.codec_id})"
            )
        self._check_quality(header.quality, "quality")
        self._check_area(header.width, header.height, CodecError)
        if max_pixels is not None:
            self._check_budget(header.width, header.height, max_pixels)
        y_hat = self._decode_latent(header, payload)
        return self._synthesise(y_hat, header.width, header.height)

    def _decode_latent(self, header: bitstream.Header, payload: bytes) -> np.ndarray:
        """The decoder's (C, h, w) input from the payload's symbols."""
        h, w = self.latent_size(header.width, header.height)
        if not header.regions:
            return self.dequantize(self.entropy_coder(header.quality).decode(payload, h, w), header.quality)
        background = header.background
        assert background is not None  # unpack sets it with the regions
        self._check_quality(background.quality, "background quality")
        mask = self._region_mask(header.regions, h, w)
        inside, outside = bitstream.split_payload(payload)
        y_hat = np.empty((self.manifest.latent_channels, h, w), dtype=np.float32)
        symbols = self.entropy_coder(header.quality).decode(inside, 1, int(mask.sum()))[:, 0, :]
        y_hat[:, mask] = self.dequantize(symbols, header.quality)
        if mask.all():
            if outside:
                raise CodecError("corrupt payload: background data, but the regions cover the whole picture")
        else:
            symbols = self.entropy_coder(background.quality).decode(outside, 1, int((~mask).sum()))[:, 0, :]
            y_hat[:, ~mask] = self.dequantize(symbols, background.quality, background.step)
        return y_hat

    def _synthesise(self, y_hat: np.ndarray, width: int, height: int) -> np.ndarray:
        """The decoder network on a latent -> the picture, cropped to the header's size."""
        backend = self.decoder_backend  # outside the try: a missing or tampered file is not the stream's fault
        try:
            x = backend.run({backend.input_names[0]: np.ascontiguousarray(y_hat[None])})[0][0]
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: this stream cannot be decoded here
            raise CodecError(f"the decoder failed on a {width}x{height} picture: {error}") from error
        image = _to_pixels(x[:, :height, :width])
        if x.shape[1] * x.shape[2] >= RELEASE_AFTER_PIXELS:
            del x
            release_freed_memory()
        return image


def _to_pixels(x: np.ndarray) -> np.ndarray:
    """(3, H, W) float output in [0, 1] -> HxWx3 uint8, converted in place (a 1920x1080 picture's
    float copies are 25 MB each). Extreme escaped values are valid symbols but can overflow the
    network to inf or NaN, which no cast to uint8 defines: they become 0 or 255 like any pixel
    out of range."""
    if not x.flags.writeable:  # a backend's output buffer that is not ours to change
        x = x.copy()
    np.multiply(x, np.float32(255.0), out=x)
    np.nan_to_num(x, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.rint(x, out=x)
    np.clip(x, 0, 255, out=x)
    return x.transpose(1, 2, 0).astype(np.uint8, order="C")
