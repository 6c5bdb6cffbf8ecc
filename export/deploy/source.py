"""What `facelink export MODEL` exports: one ONNX file named by a manifest, and its manifest.

MODEL is a bundled manifest name or a path to a manifest, optionally followed by
`:component`. A model manifest (runtime.manifest.ModelManifest) names one file. Bundles
name several (a learned codec's manifest has `encoder` and `decoder`, each an object with
`file` and `sha256`): `codec-default:encoder` picks one. Both are handled as plain JSON, so a
new kind of manifest plugs in with no change here as long as its ONNX files sit in
`{"file": ..., "sha256": ...}` objects resolved by the runtime's rules (`${shared}/`,
`${cache}/`, or relative to the manifest). Objects in a list are components too, named by
their `gallery_model` (an ensemble's transforms: `ensemble-facelink-query-v9:dlib-resnet-onnx@v1`)
or `<key>.<index>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facelink.runtime.asymmetric import bundled_ensembles
from facelink.runtime.codecs.learned import CODEC_PREFIX, codec_manifests
from facelink.runtime.manifest import (
    ManifestError,
    ModelManifest,
    bundled_manifests,
    file_sha256,
    load_manifest,
)


ENSEMBLE_PREFIX = "ensemble-"


@dataclass(frozen=True)
class ModelSource:
    label: str  # "mobilefacenet", "codec-default:encoder"
    manifest_path: Path
    data: dict[str, Any]  # the manifest's JSON
    component: str | None  # None: the manifest's top-level `file`
    onnx_path: Path
    sha256: str
    manifest: ModelManifest | None  # typed, when the JSON is a model manifest

    @property
    def name(self) -> str:
        base = str(self.data.get("name", self.manifest_path.stem))
        return f"{base}-{self.component}" if self.component else base

    @property
    def task(self) -> str | None:
        return self.manifest.task if self.manifest is not None else None

    @property
    def gallery_model(self) -> str | None:
        """The gallery model's id when this is an ensemble's embedding transform."""
        if not self.component:
            return None
        return onnx_components(self.data)[self.component].get("gallery_model")

    @property
    def codec_part(self) -> str | None:
        """'encoder' or 'decoder' when this is one half of a learned codec bundle."""
        is_codec = self.component in ("encoder", "decoder") and "stride" in self.data and "tables" in self.data
        return self.component if is_codec else None

    def codec(self, quality: int = 1):  # noqa: ANN201 - LearnedFaceCodec, imported lazily
        """The runtime codec of this bundle (its fp32 source files), for a codec part."""
        from facelink.runtime.codecs.learned import CodecManifest, LearnedFaceCodec

        return LearnedFaceCodec(CodecManifest.model_validate(self.data), self.manifest_path.parent, quality)


def _manifest_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ManifestError(f"manifest {path} does not exist")
        return path.resolve()
    # Model manifests by name, learned codec bundles by file stem (codec-default), ensembles
    # of transforms by their query model's name with a prefix (ensemble-facelink-query-v9).
    bundled = (
        bundled_manifests()
        | {f"{CODEC_PREFIX}{name}": path for name, path in codec_manifests().items()}
        | {f"{ENSEMBLE_PREFIX}{name}": path for name, path in bundled_ensembles().items()}
    )
    if name_or_path not in bundled:
        raise ManifestError(
            f"no manifest named {name_or_path!r}; bundled: {', '.join(sorted(bundled))}, "
            "or pass a path to a .json file"
        )
    return bundled[name_or_path]


def onnx_components(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Component name -> the JSON object (inside `data`) naming one ONNX file."""
    def is_onnx(value: Any) -> bool:
        return isinstance(value, dict) and str(value.get("file", "")).endswith(".onnx")

    found = {}
    for key, value in data.items():
        if is_onnx(value):
            found[key] = value
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if is_onnx(item):
                    found[str(item.get("gallery_model") or f"{key}.{index}")] = item
    return found


def resolve_source(model: str) -> ModelSource:
    """The ONNX file behind MODEL, checked against the manifest's sha256."""
    name_or_path, _, component = model.partition(":")
    path = _manifest_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {path} is not valid JSON: {error}") from error
    components = onnx_components(data)
    if not component and "file" not in data and components:
        raise ManifestError(
            f"{name_or_path} is a bundle of several ONNX files: export one of them as "
            + " or ".join(f"{name_or_path}:{c}" for c in components)
        )
    if component:
        if component not in components:
            identity = any(isinstance(t, dict) and t.get("gallery_model") == component and not t.get("file")
                           for t in data.get("transforms", ()))
            why = ": that gallery model joins the ensemble untransformed (an identity transform, no file)" \
                if identity else ""
            raise ManifestError(
                f"{path} has no ONNX component {component!r}{why} (has: {', '.join(components) or 'none'})"
            )
        entry, manifest = components[component], None
    else:
        manifest = load_manifest(path)
        if manifest.format != "onnx":
            raise ManifestError(
                f"{manifest.name!r} is a {manifest.format} model, not ONNX: nothing to export "
                "(dlib-resnet has an ONNX twin: dlib-resnet-onnx)"
            )
        entry = {"file": manifest.file, "sha256": manifest.sha256}
    # The runtime's own resolution and sha256 check, whatever kind of manifest this is.
    resolver = ModelManifest.model_validate(
        {
            "name": str(data.get("name", "model")),
            "task": "detection",
            "file": entry["file"],
            "sha256": entry.get("sha256"),
            "origin": path,
        }
    )
    onnx_path = resolver.weights()
    label = f"{name_or_path}:{component}" if component else name_or_path
    return ModelSource(label, path, data, component or None, onnx_path, file_sha256(onnx_path), manifest)
