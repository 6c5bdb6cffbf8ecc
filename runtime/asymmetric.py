"""Asymmetric matching: gallery embeddings of N large models mapped into one small query model's space.

A weak board runs one lightweight query model; the cloud, which builds the gallery once, can
afford several large gallery models. A small transformation per gallery model (an ONNX MLP)
maps that model's embedding into the query model's space. Per gallery image:

* the N transformed embeddings are L2-normalised and averaged (with per-member weights when the
  manifest has them), and the mean re-normalised: the gallery vector that query embeddings are
  matched against (cosine);
* their disagreement is the image's uncertainty: 1 - the mean pairwise cosine of the N unit
  vectors (0 when they agree exactly; it grows as they spread). Independent gallery models
  agree on clear faces and scatter on poor ones (blur, pose, occlusion, wrong face), so the
  most uncertain gallery images are the ones most likely to cause matching errors, and a
  rejection policy can flag or drop them at enrollment.

An ensemble manifest (`manifests/asymmetric/<query model>.json`) names the query model and one
transformation per gallery model, each bound to the weights it was trained for by sha256 (a
transform trained for other weights would silently map into the wrong place), plus the
uncertainty quantiles of its training faces, which turn "reject the most uncertain x%" into a
per-image threshold at enrollment time, when the rest of the gallery is not at hand.

A transform without a file is the identity: for the gallery model the query model was distilled
from, whose space the query model was trained to share, its raw embedding may serve better than
a map fitted to the query model's (imperfect) copy of it -- the trainer measures both.

With `query_member`, the query model is one of the gallery models too, through the identity
transform: where the cloud ran it at enrollment (it does for the ensembles it serves), its own
embedding of the picture joins the mean and the disagreement. It is the member whose view
decides whether a query will match, so its disagreement with the large models is the most
telling sign of a picture that will cause errors.

Transforms are trained by `facelink.export.query.transforms` from stored embeddings only, so a
new query model never requires re-reading a gallery image (pictures enrolled before it was
served are derived from the large models' members alone). numpy + ONNX Runtime only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from facelink.config import BackendConfig

from .backends import create_backend
from .manifest import ManifestError, file_sha256, load_named_json

ENSEMBLE_MANIFEST_VERSION = 1
#: Ensemble manifests live in this subfolder of the bundled manifests, apart from the model
#: manifests that `load_manifest` validates.
ENSEMBLE_FOLDER = "asymmetric"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TransformSpec(_Strict):
    gallery_model: str = Field(min_length=1, description="model id (name@version) of the gallery recogniser")
    gallery_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="its weights")
    file: str | None = Field(
        None, min_length=1,
        description="ONNX file, relative to the manifest; none: the identity (the gallery model's own space "
                    "is the query space, as for the model the query model was distilled from)")
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    input_dim: int = Field(gt=0)
    output_dim: int = Field(gt=0)

    @model_validator(mode="after")
    def _identity_fits(self) -> TransformSpec:
        if self.file is None and (self.input_dim != self.output_dim or self.sha256 is not None):
            raise ValueError(f"transform for {self.gallery_model}: an identity transform (no file) needs "
                             f"input_dim == output_dim (got {self.input_dim} -> {self.output_dim}) and no sha256")
        return self

    @property
    def identity(self) -> bool:
        return self.file is None


class EnsembleManifest(_Strict):
    manifest_version: int = ENSEMBLE_MANIFEST_VERSION
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    query_model: str = Field(min_length=1, description="model id of the query recogniser")
    query_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    query_manifest: str | None = Field(None, description="bundled name or path (relative to this file) of its manifest")
    transforms: list[TransformSpec] = Field(min_length=1)
    query_member: bool = Field(
        False, description="the query model's own embedding of a gallery picture is a member too (identity transform)"
    )
    member_weights: dict[str, float] = Field(
        default_factory=dict,
        description="weight of each member in the gallery vector, by member key (gallery model id, or "
                    "own_key(query model)); empty: equal weights. Uncertainty stays unweighted.")
    uncertainty_quantiles: dict[str, float] = Field(
        default_factory=dict, description="fraction of training faces above -> uncertainty threshold, e.g. {'0.1': 0.21}")
    training: dict[str, object] = Field(default_factory=dict, description="how the transforms were made")
    description: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleManifest:
        models = [t.gallery_model for t in self.transforms]
        if len(set(models)) != len(models):
            raise ValueError(f"one transform per gallery model, got {models}")
        if len({t.output_dim for t in self.transforms}) != 1:
            raise ValueError("every transform must map into the same (query) dimension")
        if self.member_weights:
            members = set(models) | ({own_key(self.query_model)} if self.query_member else set())
            if set(self.member_weights) != members:
                raise ValueError(f"member_weights must weigh every member ({', '.join(sorted(members))}), "
                                 f"got {', '.join(sorted(self.member_weights))}")
            if not all(w > 0 for w in self.member_weights.values()):
                raise ValueError(f"member_weights must be positive, got {self.member_weights}")
        for fraction in self.uncertainty_quantiles:
            if not 0 < float(fraction) < 1:
                raise ValueError(f"uncertainty_quantiles: fraction {fraction} is not in (0, 1)")
        return self

    @property
    def dim(self) -> int:
        return self.transforms[0].output_dim

    @property
    def members(self) -> int:
        """How many embeddings of a picture the ensemble averages when all are stored."""
        return len(self.transforms) + int(self.query_member)


def own_key(query_model: str) -> str:
    """The key under which a gallery stores a query model's own embeddings of its pictures (a
    member of the ensemble), apart from the query model's id, which names its derived templates."""
    return f"{query_model}+own"


def bundled_ensembles() -> dict[str, Path]:
    folder = resources.files("facelink.runtime") / "manifests" / ENSEMBLE_FOLDER
    if not folder.is_dir():
        return {}
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".json")}


def load_ensemble_manifest(name_or_path: str | Path) -> tuple[EnsembleManifest, Path]:
    """An ensemble manifest by bundled name (the query model's) or path; returns it and its path."""
    return load_named_json(EnsembleManifest, name_or_path, bundled_ensembles(), "ensemble")


# -- the arithmetic (pure numpy) --------------------------------------------------------------------
def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def ensemble_mean(members: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """(N, M, d) transformed embeddings -> (N, d): the re-normalised (weighted) mean of their unit
    vectors. `weights` (M,) need not sum to one: only their ratios matter."""
    u = unit(members)
    if weights is None:
        return unit(u.mean(axis=1))
    w = np.asarray(weights, dtype=np.float32).reshape(1, -1, 1)
    if w.shape[1] != u.shape[1]:
        raise ValueError(f"{w.shape[1]} weights for {u.shape[1]} members")
    return unit((u * w).sum(axis=1))


def disagreement(members: np.ndarray) -> np.ndarray:
    """(N, M, d) -> (N,) uncertainty: 1 - mean pairwise cosine of the M unit vectors (M >= 2).

    Uses sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - M, so it costs one pass whatever M is. It is
    0 when the members coincide and 1 when they are on average orthogonal (at most 1 + 1/(M-1)).
    """
    m = members.shape[1]
    if m < 2:
        raise ValueError("uncertainty needs at least two gallery models")
    u = unit(members).astype(np.float64)
    pair_sum = (np.square(u.sum(axis=1)).sum(axis=1) - m) / (m * (m - 1))
    return (1.0 - pair_sum).astype(np.float32)


# -- rejection ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejection:
    """The policy's verdict on a set of gallery images."""

    accepted: np.ndarray            # (N,) bool: enrolled (a flagged image is still enrolled under "flag")
    flagged: np.ndarray             # (N,) bool: among the most uncertain
    reasons: list[str | None]       # per image: why it was flagged, else None


_PAST = {"flag": "flagged", "drop": "dropped"}


@dataclass(frozen=True)
class RejectionPolicy:
    """Flag or drop the most uncertain `fraction` of gallery images.

    With `threshold` set (from an ensemble manifest's `uncertainty_quantiles`, or a previous
    gallery) images are judged one by one against it, as enrollment needs. Without it, `apply`
    takes the top `fraction` of the images it is given (a whole gallery at once).
    """

    fraction: float = 0.1
    action: Literal["flag", "drop"] = "flag"
    threshold: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.fraction < 1:
            raise ValueError(f"fraction must be in [0, 1), got {self.fraction}")
        if self.action not in ("flag", "drop"):
            raise ValueError(f"action must be flag or drop, got {self.action!r}")

    @classmethod
    def from_manifest(cls, manifest: EnsembleManifest, fraction: float, action: Literal["flag", "drop"] = "flag") -> RejectionPolicy:
        """The policy with the threshold calibrated for `fraction` on the transforms' training faces."""
        key = next((k for k in manifest.uncertainty_quantiles if abs(float(k) - fraction) < 1e-9), None)
        if key is None:
            known = ", ".join(sorted(manifest.uncertainty_quantiles)) or "none"
            raise ValueError(f"{manifest.name}: no uncertainty threshold calibrated for fraction {fraction} (has: {known})")
        return cls(fraction, action, manifest.uncertainty_quantiles[key])

    def apply(self, uncertainty: np.ndarray) -> Rejection:
        u = np.asarray(uncertainty, dtype=np.float64).ravel()
        if self.threshold is not None:
            threshold, rule = self.threshold, f"the calibrated threshold for the {self.fraction:.0%} most uncertain"
            flagged = u >= threshold
        else:
            count = int(np.floor(self.fraction * u.size + 1e-9))
            flagged = np.zeros(u.size, dtype=bool)
            flagged[np.argsort(-u, kind="stable")[:count]] = True
            threshold = float(u[flagged].min()) if count else float("inf")
            rule = f"the {self.fraction:.0%} most uncertain of {u.size} images"
        reasons: list[str | None] = [
            f"gallery models disagree: uncertainty {value:.4f} >= {threshold:.4f} ({rule}); {_PAST[self.action]}"
            if hit else None
            for value, hit in zip(u, flagged)
        ]
        accepted = ~flagged if self.action == "drop" else np.ones(u.size, dtype=bool)
        return Rejection(accepted, flagged, reasons)


# -- the ensemble -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransformedGallery:
    vectors: np.ndarray      # (N, d) unit gallery vectors in the query space
    members: np.ndarray      # (N, M, d) unit transformed embeddings, in `models` order
    uncertainty: np.ndarray  # (N,) disagreement of the members (zeros when M == 1)
    models: tuple[str, ...]  # gallery model ids, in member order


class EmbeddingTransform:
    """One gallery model's embedding -> the query space, through its ONNX file (or as it is, for
    an identity spec)."""

    def __init__(self, spec: TransformSpec, folder: Path, backend: BackendConfig = BackendConfig()) -> None:
        self.spec = spec
        self.backend = None
        if spec.file is None:
            return
        path = Path(spec.file) if Path(spec.file).is_absolute() else folder / spec.file
        if not path.is_file():
            raise ManifestError(f"transform for {spec.gallery_model}: {path} does not exist")
        if spec.sha256 is not None and file_sha256(path) != spec.sha256:
            raise ManifestError(f"transform for {spec.gallery_model}: {path} does not match its sha256")
        self.backend = create_backend(path, backend)
        self._input = self.backend.input_names[0]

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = unit(np.asarray(embeddings, dtype=np.float32).reshape(-1, self.spec.input_dim))
        return x if self.backend is None else unit(self.backend.run({self._input: x})[0])


class GalleryEnsemble:
    """The gallery side of asymmetric matching for one query model."""

    def __init__(self, manifest: EnsembleManifest, folder: Path, backend: BackendConfig = BackendConfig()) -> None:
        self.manifest = manifest
        self.transforms = {spec.gallery_model: EmbeddingTransform(spec, folder, backend) for spec in manifest.transforms}

    @classmethod
    def load(cls, name_or_path: str | Path, backend: BackendConfig = BackendConfig()) -> GalleryEnsemble:
        manifest, path = load_ensemble_manifest(name_or_path)
        return cls(manifest, path.parent, backend)

    @property
    def query_model(self) -> str:
        return self.manifest.query_model

    @property
    def gallery_models(self) -> tuple[str, ...]:
        """The large models mapped by a transform (the ensemble needs them stored)."""
        return tuple(self.transforms)

    @property
    def member_models(self) -> tuple[str, ...]:
        """The keys of every stored embedding that joins the ensemble: the gallery models' ids,
        then `own_key(query model)` when the query model is a member."""
        return self.gallery_models + ((own_key(self.query_model),) if self.manifest.query_member else ())

    def _member(self, model: str, embeddings: np.ndarray) -> np.ndarray:
        if model in self.transforms:
            return self.transforms[model](embeddings)
        return unit(np.asarray(embeddings, dtype=np.float32).reshape(-1, self.manifest.dim))  # the identity

    def transform(self, embeddings: Mapping[str, np.ndarray]) -> TransformedGallery:
        """Stored gallery embeddings {member model id: (N, d_model)} -> the gallery in the query space.

        Any non-empty subset of the ensemble's member models may be given (uncertainty needs two);
        every array must hold the same N images in the same order.
        """
        unknown = set(embeddings) - set(self.member_models)
        if unknown:
            raise KeyError(f"no transform for {', '.join(sorted(unknown))}; this ensemble maps {', '.join(self.member_models)}")
        models = tuple(m for m in self.member_models if m in embeddings)
        if not models:
            raise ValueError("no gallery embeddings given")
        sizes = {len(np.atleast_2d(embeddings[m])) for m in models}
        if len(sizes) != 1:
            raise ValueError(f"gallery models hold different numbers of images: {sorted(sizes)}")
        members = np.stack([self._member(m, embeddings[m]) for m in models], axis=1)
        uncertainty = disagreement(members) if len(models) > 1 else np.zeros(len(members), dtype=np.float32)
        return TransformedGallery(ensemble_mean(members, self.weights(models)), members, uncertainty, models)

    def weights(self, models: tuple[str, ...]) -> np.ndarray | None:
        """The manifest's weights of these members (a subset is renormalised by the mean itself);
        None for equal weights."""
        if not self.manifest.member_weights:
            return None
        return np.array([self.manifest.member_weights[m] for m in models], dtype=np.float32)
