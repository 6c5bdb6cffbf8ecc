"""Payload codecs by id: what the edge may send and the cloud will decode.

    codec = create_codec("jpeg", quality=90)       # a standard codec, quality 1-100
    codec = create_codec("learned", quality=3)     # the default learned codec, quality 1-5
    data = codec.encode(crop)                      # HxWx3 uint8 RGB -> bytes
    crop = codec.decode(data)                      # bytes -> HxWx3 uint8 RGB, or CodecError

Learned codecs are registered under the id their weights give them (`flc-<name>-<tag>`, see
`learned.py`), and `learned` / `learned:<name>` are aliases the edge's configuration may use;
`learned:<path.json>` loads a bundle manifest from anywhere (the int8 encoder `facelink export
codec-default:encoder --int8` writes shares the bundled codec's id: the cloud decodes its streams).
Whole pictures with the bits on the faces: `face_aware.FaceAwareCodec` (bitstream version 2,
decoded by the same learned codec).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from facelink.config import BackendConfig

from .base import CodecError, FaceCodec, UnknownCodecError
from .standard import JpegCodec, PngCodec, WebpCodec, decode_image

__all__ = [
    "CodecError", "CodecInfo", "FaceCodec", "UnknownCodecError", "available_codecs", "create_codec", "decode_image",
    "default_quality",
]

LEARNED_ALIAS = "learned"


@dataclass(frozen=True)
class CodecInfo:
    codec_id: str
    versions: tuple[int, ...]
    description: str
    # (quality, backend) -> codec; the backend (ONNX Runtime providers) matters to learned codecs only
    create: Callable[[int, BackendConfig | None], FaceCodec]
    default_quality: int


def _standard() -> dict[str, CodecInfo]:
    return {
        cls.codec_id: CodecInfo(cls.codec_id, cls.versions, cls.description, lambda quality, _backend=None, c=cls: c(quality), 90)
        for cls in (JpegCodec, WebpCodec, PngCodec)
    }


def _learned() -> dict[str, CodecInfo]:
    from .learned import LearnedFaceCodec, codec_manifests, load_codec_manifest

    infos = {}
    for name in codec_manifests():
        manifest, path = load_codec_manifest(name)
        infos[manifest.codec_id] = CodecInfo(
            manifest.codec_id,
            LearnedFaceCodec.versions,
            f"facelink learned face codec {name!r} (qualities 1-{manifest.qualities})",
            lambda quality, backend=None, m=manifest, p=path: LearnedFaceCodec(m, p.parent, quality, backend or BackendConfig()),
            manifest.preferred_quality,
        )
    return infos


def available_codecs() -> dict[str, CodecInfo]:
    """Every codec this build can encode and decode, by wire id."""
    return {**_standard(), **_learned()}


def resolve_codec_id(codec_id: str) -> str:
    """`learned` and `learned:<name>` -> that learned codec's wire id; other ids unchanged."""
    if codec_id == LEARNED_ALIAS or codec_id.startswith(LEARNED_ALIAS + ":"):
        from .learned import load_codec_manifest

        name = codec_id.partition(":")[2] or "default"
        return load_codec_manifest(name)[0].codec_id
    return codec_id


def default_quality(codec_id: str) -> int:
    """The quality `create_codec(codec_id)` uses when none is given."""
    name = codec_id.partition(":")[2] if codec_id.startswith(LEARNED_ALIAS + ":") else ""
    if name.endswith(".json"):
        from .learned import load_codec_manifest

        return load_codec_manifest(name)[0].preferred_quality
    info = available_codecs().get(resolve_codec_id(codec_id))
    if info is None:
        raise UnknownCodecError(f"unknown codec {codec_id!r}; available: {', '.join(sorted(available_codecs()))}")
    return info.default_quality


def create_codec(codec_id: str, quality: int | None = None, backend: BackendConfig | None = None) -> FaceCodec:
    """A codec by id; `backend` chooses where a learned codec's networks run (the edge's --providers)."""
    name = codec_id.partition(":")[2] if codec_id.startswith(LEARNED_ALIAS + ":") else ""
    if name.endswith(".json"):  # a bundle outside the package, e.g. `facelink export`'s int8 encoder
        from .learned import LearnedFaceCodec, load_codec_manifest

        manifest, path = load_codec_manifest(name)
        return LearnedFaceCodec(manifest, path.parent, manifest.preferred_quality if quality is None else quality,
                                backend or BackendConfig())
    codecs = available_codecs()
    info = codecs.get(resolve_codec_id(codec_id))
    if info is None:
        raise UnknownCodecError(f"unknown codec {codec_id!r}; available: {', '.join(sorted(codecs))}")
    return info.create(info.default_quality if quality is None else quality, backend)
