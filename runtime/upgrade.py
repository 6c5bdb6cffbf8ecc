"""Recogniser upgrades without re-enrollment: model A's stored embeddings mapped into model B's space.

A deployed gallery holds embeddings, not always pictures, so changing the recogniser used to mean
re-enrolling everyone. An upgrade transform is the asymmetric machinery with one member: an
ensemble manifest (`EnsembleManifest`) whose "query model" is the NEW recogniser B and whose one
transform maps the OLD recogniser A's unit embedding into B's space (a residual linear map plus a
two-layer MLP, trained by `facelink.export.query.transforms` from the two models' stored embeddings
of the training faces -- never an enrolled person's picture). `GalleryEnsemble.transform` applies
it as it is: one member, so its gallery vector is the re-normalised transformed embedding and
there is no disagreement to measure.

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
        return self.manifest.transforms[0].gallery_model

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
        return f"{TRANSFORMED} from {self.source_model} by {self.manifest.name} (backfill-free upgrade, no picture read)"


def load_upgrade(name_or_path: str | Path, backend: BackendConfig | None = None) -> Upgrade:
    """An upgrade transform by bundled name or path; a ManifestError if it is not a one-model map."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        bundled = bundled_upgrades()
        if str(name_or_path) not in bundled:
            raise ManifestError(f"no upgrade named {str(name_or_path)!r}; bundled: {', '.join(sorted(bundled)) or 'none'}")
        path = bundled[str(name_or_path)]
    manifest, path = load_ensemble_manifest(path)
    if len(manifest.transforms) != 1 or manifest.query_member:
        raise ManifestError(f"{path}: an upgrade maps exactly one old model into the new one's space "
                            f"(got {len(manifest.transforms)} transform(s), query_member={manifest.query_member})")
    if manifest.transforms[0].gallery_model == manifest.query_model:
        raise ManifestError(f"{path}: maps {manifest.query_model} onto itself")
    return Upgrade(manifest, path, GalleryEnsemble(manifest, path.parent, backend or BackendConfig()))


def find_upgrade(to: str | Path, stored: Collection[str], backend: BackendConfig | None = None) -> Upgrade:
    """The bundled upgrade into recogniser `to` (manifest name or path) from one of the `stored`
    model ids; the new model's weights must be the ones the transform was trained for."""
    target = load_manifest(to)
    candidates = []
    for path in sorted(bundled_upgrades().values()):
        manifest, _ = load_ensemble_manifest(path)
        if manifest.query_model == target.model_id and manifest.transforms[0].gallery_model in stored:
            candidates.append(path)
    if not candidates:
        known = ", ".join(sorted(bundled_upgrades())) or "none"
        raise ManifestError(f"no bundled upgrade into {target.model_id} from a model this gallery stores "
                            f"({', '.join(sorted(stored)) or 'none'}); bundled upgrades: {known}")
    upgrade = load_upgrade(candidates[0], backend)
    if upgrade.manifest.query_sha256 and target.sha256 and upgrade.manifest.query_sha256 != target.sha256:
        raise ManifestError(f"{upgrade.path} was trained for {target.model_id} weights {upgrade.manifest.query_sha256[:12]}, "
                            f"but {to} has {target.sha256[:12]}: it would map into the wrong place")
    return upgrade
