"""Model manifests: a JSON file that says everything needed to run a model correctly.

A recogniser is more than its weights: the crop it expects (alignment template and size),
colour order, normalisation, whether to average the embedding of the horizontally flipped
face, and the cosine threshold at which two faces are the same person. Putting all of it in
a manifest lets any off-the-shelf ONNX recogniser be dropped in without code, and binds a
model id to exact weights through their sha256.

File references: a relative `file` is resolved against the manifest's folder; a `file`
starting with `${shared}/` is resolved against the shared data/models folder
(`facelink.config.shared_dir()`), which is how the default bundle reaches ../shared; a `file`
starting with `${cache}/` is resolved against facelink's cache (`facelink.config.cache_dir()`,
$FACELINK_CACHE or ~/.cache/facelink), where models converted on this machine are written
(e.g. dlib's ResNet as ONNX, which is derived from a PyPI package and never committed).
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from facelink.config import cache_dir, shared_dir

from .alignment import Template

MANIFEST_VERSION = 1
SHARED_PREFIX = "${shared}/"
CACHE_PREFIX = "${cache}/"


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match its weights."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class InputSpec(_Strict):
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    color: Literal["RGB", "BGR"] = "RGB"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    # x_normalised = (x / scale - mean) / std, per channel in `color` order.
    scale: float = Field(255.0, gt=0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @field_validator("std")
    @classmethod
    def _nonzero_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s == 0 for s in std):
            raise ValueError("std must be non-zero")
        return std


class AlignmentSpec(_Strict):
    """Five-point template in the model's input pixels (order: see runtime.alignment)."""

    template: list[tuple[float, float]] = Field(min_length=5, max_length=5)


class EmbeddingSpec(_Strict):
    dim: int = Field(gt=0)
    normalize: bool = True
    flip_augmentation: bool = Field(False, description="average with the embedding of the mirrored face")
    match_threshold: float = Field(ge=-1.0, le=1.0, description="cosine at which two faces are one person")
    space: str | None = Field(
        None,
        description="the model id whose embedding space this model computes, when it is not its own: an "
        "fp16/int8 export of a query model keeps its source's space, so the cloud matches what a board "
        "running it sends against the source's gallery",
    )


class ModelManifest(_Strict):
    manifest_version: int = MANIFEST_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = "1"
    task: Literal["recognition", "detection"]
    format: Literal["onnx", "dlib"] = "onnx"
    file: str = Field(min_length=1)
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    input: InputSpec | None = None  # required for recognition models
    alignment: AlignmentSpec | None = None
    embedding: EmbeddingSpec | None = None
    license: str | None = None
    source: str | None = None
    description: str | None = None

    # Where the manifest was read from; set by `load_manifest`, used to resolve `file`.
    origin: Path | None = Field(None, exclude=True)

    @field_validator("manifest_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version > MANIFEST_VERSION:
            raise ValueError(f"manifest_version {version} is newer than this facelink understands ({MANIFEST_VERSION})")
        return version

    @property
    def model_id(self) -> str:
        """The id that travels on the wire: name and version, bound to the weights by sha256."""
        return f"{self.name}@{self.version}"

    @property
    def template(self) -> Template:
        if self.alignment is None:
            raise ManifestError(f"model {self.name!r} has no alignment template")
        assert self.input is not None  # validated by load_manifest
        return Template(np.array(self.alignment.template, dtype=np.float32), (self.input.width, self.input.height))

    def resolve_file(self, shared: Path | None = None) -> Path:
        if self.file.startswith(SHARED_PREFIX):
            return (shared or shared_dir()) / self.file[len(SHARED_PREFIX):]
        if self.file.startswith(CACHE_PREFIX):
            return cache_dir() / self.file[len(CACHE_PREFIX):]
        path = Path(self.file)
        if not path.is_absolute() and self.origin is not None:
            path = self.origin.parent / path
        return path

    def weights(self, *, verify: bool = True, shared: Path | None = None) -> Path:
        """The weights file, checked to exist and (when the manifest has one) to match sha256."""
        path = self.resolve_file(shared)
        if not path.is_file():
            raise ManifestError(f"model {self.name!r}: weights file {path} does not exist (manifest field 'file')")
        if verify and self.sha256 is not None:
            actual = file_sha256(path)
            if actual != self.sha256:
                raise ManifestError(
                    f"model {self.name!r}: {path} has sha256 {actual}, the manifest expects {self.sha256}; "
                    "the file is not the model this manifest describes"
                )
        return path


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


M = TypeVar("M", bound=BaseModel)


def load_named_json(model: type[M], name_or_path: str | Path, bundled: dict[str, Path], what: str) -> tuple[M, Path]:
    """A JSON manifest of kind `model`, by bundled name or by path to a .json file; returns it and
    its path. Anything wrong (no such name, unreadable, invalid) is a ManifestError naming it."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        if str(name_or_path) not in bundled:
            raise ManifestError(f"no {what} named {str(name_or_path)!r}; bundled: {', '.join(sorted(bundled)) or 'none'}")
        path = bundled[str(name_or_path)]
    try:
        return model.model_validate(json.loads(path.read_text())), path
    except (OSError, json.JSONDecodeError, ValidationError) as error:
        raise ManifestError(f"{what} manifest {path} is invalid: {error}") from error


def bundled_manifests() -> dict[str, Path]:
    """The manifests shipped with facelink, by name."""
    folder = resources.files("facelink.runtime") / "manifests"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def load_manifest(name_or_path: str | Path) -> ModelManifest:
    """Load a manifest by bundled name (e.g. "mobilefacenet") or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.suffix == ".json":
        bundled = bundled_manifests()
        if str(name_or_path) not in bundled:
            raise ManifestError(
                f"no manifest named {str(name_or_path)!r}; bundled: {', '.join(sorted(bundled))}, or pass a path to a .json file"
            )
        path = bundled[str(name_or_path)]
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {path} is not valid JSON: {error}") from error
    try:
        manifest = ModelManifest.model_validate({**data, "origin": path.resolve()})
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(root)'}: {e['msg']}" for e in error.errors())
        raise ManifestError(f"manifest {path} is invalid: {problems}") from error
    if manifest.task == "recognition" and None in (manifest.input, manifest.embedding, manifest.alignment):
        raise ManifestError(f"manifest {path}: a recognition model needs 'input', 'embedding' and 'alignment'")
    return manifest
