"""Recogniser upgrades without re-enrollment: model A's stored embeddings mapped into model B's space.

A deployed gallery holds embeddings, not always pictures, so changing the recogniser used to mean
re-enrolling everyone. An upgrade transform is the asymmetric machinery: an ensemble manifest
(`EnsembleManifest`) whose "query model" is the NEW recogniser B and whose transform maps the OLD
recogniser A's unit embedding into B's space (a residual linear map plus a two-layer MLP, trained
by `facelink.export.query.transforms` from the models' stored embeddings of the training faces --
never an enrolled person's picture). A multi-source upgrade has one transform per old model the
gallery stores (MobileFaceNet and dlib's ResNet on a default server), trained jointly, and
`GalleryEnsemble.transform` averages their outputs with the manifest's weights; a picture that
lacks a source is transformed from the ones it holds.

What differs from a query-model ensemble, and why upgrades live in their own folder
(`manifests/upgrades/`, never picked by `ensembles: auto`): B is served as the primary recogniser
itself, so the gallery must keep B's native templates (pictures enrolled after the upgrade) and
mark the transformed ones, rather than derive every template of B; `facelink.cloud.upgrade` does
that through `Gallery.rebuild_derived`.

The manifest's `training["measured"]` holds what the upgrade costs in accuracy, written by
`facelink bench upgrade --record` (LFW 1:N over people no training run saw: rank-1 and DIR@FAR=1%
of B probes against transformed vs native B templates), so `facelink cloud upgrade` can say it.
numpy + ONNX Runtime only.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from facelink.config import BackendConfig

from .asymmetric import EnsembleManifest, GalleryEnsemble, load_ensemble_manifest
from .manifest import ManifestError, load_manifest

#: Upgrade transforms live in this subfolder of the bundled manifests.
UPGRADE_FOLDER = "upgrades"
#: Where a transformed template says what it is (`TemplateRecord.reason` starts with it).
TRANSFORMED = "transformed"


def bundled_upgrades() -> dict[str, Path]:
    folder = resources.files("facelink.runtime") / "manifests" / UPGRADE_FOLDER
    if not folder.is_dir():
        return {}
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


@dataclass(frozen=True)
class Upgrade:
    """A loaded upgrade transform: old model id -> new model id, and the one-member ensemble."""

    manifest: EnsembleManifest
    path: Path
    ensemble: GalleryEnsemble

    @property
    def source_model(self) -> str:
        """The primary old model (the first transform's): the one the gallery served before."""
        return self.manifest.transforms[0].gallery_model

    @property
    def source_models(self) -> tuple[str, ...]:
        """Every old model a transform maps (a multi-source upgrade averages their transformed
        embeddings with the manifest's weights; a picture lacking one is derived from the others)."""
        return self.ensemble.gallery_models

    @property
    def target_model(self) -> str:
        return self.manifest.query_model

    @property
    def measured(self) -> dict[str, object]:
        """What `facelink bench upgrade --record` measured (empty if it never ran)."""
        measured = self.manifest.training.get("measured")
        return measured if isinstance(measured, dict) else {}

    def reason(self) -> str:
        """The `reason` a transformed template is stored with: what made it, and from what."""
        return f"{TRANSFORMED} from {' + '.join(self.source_models)} by {self.manifest.name} (backfill-free upgrade, no picture read)"


def load_upgrade(name_or_path: str | Path, backend: BackendConfig | None = None) -> Upgrade:
    """An upgrade transform by bundled name or path; a ManifestError if it is not a map from one or
    more old models (and never the new one itself) into the new one's space."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        bundled = bundled_upgrades()
        if str(name_or_path) not in bundled:
            raise ManifestError(f"no upgrade named {str(name_or_path)!r}; bundled: {', '.join(sorted(bundled)) or 'none'}")
        path = bundled[str(name_or_path)]
    manifest, path = load_ensemble_manifest(path)
    if not manifest.transforms or manifest.query_member:
        raise ManifestError(f"{path}: an upgrade maps one or more old models into the new one's space, and only those "
                            f"(got {len(manifest.transforms)} transform(s), query_member={manifest.query_member})")
    if any(t.gallery_model == manifest.query_model for t in manifest.transforms):
        raise ManifestError(f"{path}: maps {manifest.query_model} onto itself")
    return Upgrade(manifest, path, GalleryEnsemble(manifest, path.parent, backend or BackendConfig()))


def find_upgrade(to: str | Path, stored: Collection[str], backend: BackendConfig | None = None) -> Upgrade:
    """The bundled upgrade into recogniser `to` (manifest name or path) from the `stored` model ids;
    the new model's weights must be the ones the transform was trained for.

    Its primary (first) source must be stored. Among those, the one that reads the most stored
    models wins (a multi-source upgrade measured better than its primary source alone), then the
    one with the fewest sources: a gallery holding only MobileFaceNet gets the transform trained
    for MobileFaceNet alone, not a multi-source one running on a single member.
    """
    target = load_manifest(to)
    candidates = []
    for path in sorted(bundled_upgrades().values()):
        manifest, _ = load_ensemble_manifest(path)
        sources = [t.gallery_model for t in manifest.transforms]
        if manifest.query_model == target.model_id and sources[0] in stored:
            candidates.append((-len(set(sources) & set(stored)), len(sources), str(path)))
    if not candidates:
        known = ", ".join(sorted(bundled_upgrades())) or "none"
        raise ManifestError(f"no bundled upgrade into {target.model_id} from a model this gallery stores "
                            f"({', '.join(sorted(stored)) or 'none'}); bundled upgrades: {known}")
    upgrade = load_upgrade(min(candidates)[2], backend)
    if upgrade.manifest.query_sha256 and target.sha256 and upgrade.manifest.query_sha256 != target.sha256:
        raise ManifestError(f"{upgrade.path} was trained for {target.model_id} weights {upgrade.manifest.query_sha256[:12]}, "
                            f"but {to} has {target.sha256[:12]}: it would map into the wrong place")
    return upgrade
