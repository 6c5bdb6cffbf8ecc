"""The learned, identity-preserving face codec at run time: ONNX Runtime + static entropy tables.

    codec = LearnedFaceCodec.load("default", quality=3)
    data = codec.encode(face)        # HxWx3 uint8 RGB, any size -> a few hundred bytes
    face = codec.decode(data)        # bytes -> HxWx3 uint8 RGB, or a CodecError

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
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facelink.config import BackendConfig

from ..backends import create_backend
from ..manifest import ManifestError, file_sha256, load_named_json
from . import bitstream
from .base import CodecError
from .entropy import ChannelTables, FactorizedEntropyCoder
from .standard import check_image

CODEC_PREFIX = "codec-"
CODEC_FOLDER = "codecs"


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
    license: str | None = None
    description: str | None = None
    training: dict[str, object] = Field(default_factory=dict, description="how the weights were made")

    @model_validator(mode="after")
    def _default_quality_exists(self) -> CodecManifest:
        if self.default_quality is not None and self.default_quality > self.qualities:
            raise ValueError(f"default_quality {self.default_quality} is not one of the qualities 1..{self.qualities}")
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


class LearnedFaceCodec:
    versions = (bitstream.VERSION,)

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

    # -- identity ----------------------------------------------------------------------------
    @property
    def codec_id(self) -> str:
        return self.manifest.codec_id

    @property
    def version(self) -> int:
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

    @cached_property
    def encoder_backend(self):  # noqa: ANN202
        with self._lock:
            return create_backend(self._verified(self.manifest.encoder, "encoder"), self._backend)

    @cached_property
    def decoder_backend(self):  # noqa: ANN202
        with self._lock:
            return create_backend(self._verified(self.manifest.decoder, "decoder"), self._backend)

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

    def encoder_input(self, image: np.ndarray) -> np.ndarray:
        """The encoder's (1, 3, H, W) input: the picture padded to a multiple of the stride, in [0, 1]."""
        image = check_image(image)
        height, width = image.shape[:2]
        h, w = self.latent_size(width, height)
        stride = self.manifest.stride
        # Edge-replicate padding: a flat border costs almost no bits and leaves no seam.
        padded = np.pad(image, ((0, h * stride - height), (0, w * stride - width), (0, 0)), mode="edge")
        return np.ascontiguousarray((padded.astype(np.float32) / 255.0).transpose(2, 0, 1)[None])

    def quantize(self, latent: np.ndarray, quality: int) -> np.ndarray:
        """The integer symbols of one (C, h, w) latent at `quality`: what the entropy coder codes."""
        q = quality - 1
        return np.rint(latent * self._gain[q][:, None, None] - self._medians[q][:, None, None]).astype(np.int64)

    def dequantize(self, symbols: np.ndarray, quality: int) -> np.ndarray:
        """The decoder's (C, h, w) input from decoded symbols."""
        q = quality - 1
        return (symbols.astype(np.float32) + self._medians[q][:, None, None]) * self._inverse_gain[q][:, None, None]

    def encode(self, image: np.ndarray) -> bytes:
        image = check_image(image)
        height, width = image.shape[:2]
        backend = self.encoder_backend
        y = backend.run({backend.input_names[0]: self.encoder_input(image)})[0][0]
        payload = self.entropy_coder(self.quality).encode(self.quantize(y, self.quality))
        return bitstream.pack(bitstream.Header(self.manifest.tag, self.quality, width, height), payload)

    def decode(self, data: bytes) -> np.ndarray:
        header, payload = bitstream.unpack(data)
        if header.codec_tag != self.manifest.tag:
            raise CodecError(
                f"bitstream was made by another codec (tag {header.codec_tag.hex()}, this is {self.manifest.tag.hex()}: "
                f"{self.codec_id})"
            )
        if not 1 <= header.quality <= self.manifest.qualities:
            raise CodecError(f"corrupt bitstream: quality {header.quality} is outside 1..{self.manifest.qualities}")
        h, w = self.latent_size(header.width, header.height)
        y_hat = self.dequantize(self.entropy_coder(header.quality).decode(payload, h, w), header.quality)
        backend = self.decoder_backend
        x = backend.run({backend.input_names[0]: np.ascontiguousarray(y_hat[None])})[0][0]
        image = np.clip(np.rint(x.transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(image[: header.height, : header.width])
