"""The recognition engine: faces in, decisions out. No gRPC here (service.py speaks the wire).

One engine serves every stream and unary call of a server. Its models are shared between
threads; ONNX Runtime sessions are safe to call concurrently, and the detectors lock
internally.

Models. The primary recogniser identifies decoded faces and pictures. Enrollment runs every
gallery model (the primary among them) once on each picture and stores each embedding; for
every accepted query model (asymmetric matching: a weak device runs a small query model and
sends its embedding) the gallery also holds a template derived from those embeddings. An
embedding payload is matched against the templates of the model that produced it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Literal

import numpy as np

from facelink.config import CloudConfig
from facelink.logsafe import printable
from facelink.runtime.alignment import check_face_geometry
from facelink.runtime.asymmetric import (
    EnsembleManifest,
    GalleryEnsemble,
    RejectionPolicy,
    bundled_ensembles,
    load_ensemble_manifest,
    own_key,
)
from facelink.runtime.detection import FaceDetector, create_detector, largest
from facelink.runtime.manifest import ManifestError, ModelManifest, bundled_manifests, load_manifest
from facelink.runtime.recognition import OnnxRecognizer, Recognizer, create_recognizer

from .errors import InvalidArgument
from .gallery import Gallery, QueryModel
from .unknowns import UNKNOWNS_DB, UnknownClusters

log = logging.getLogger(__name__)



class Decision(Enum):
    MATCH = "match"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Identification:
    identity: str  # best gallery identity, "" when the gallery is empty
    score: float
    decision: Decision
    threshold: float
    model_id: str
    # The primary recogniser's unit embedding of the face, when the engine computed it
    # (identify_aligned): what unknown people are clustered by (cloud/unknowns.py).
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class AcceptedModel:
    """A model whose embeddings the engine matches, as the capabilities list it."""

    model_id: str
    role: Literal["recognizer", "query"]  # recognizer: runs here on faces; query: runs on devices
    dim: int
    threshold: float  # cosine for a MATCH
    input: str  # what the model sees, e.g. "112x112 RGB"; "" if unknown
    sha256: str  # of the weights the id is bound to; "" if its manifest names none


@dataclass(frozen=True)
class EnrollFace:
    image: np.ndarray             # HxWx3 uint8 RGB
    landmarks: np.ndarray | None  # (5, 2) in the image, or None to detect


class RecognitionEngine:
    def __init__(
        self,
        config: CloudConfig,
        gallery: Gallery,
        recognizer: Recognizer | None = None,
        detector: FaceDetector | None = None,
    ) -> None:
        self.config = config
        self.gallery = gallery
        self.recognizer = recognizer or create_recognizer(config.recognizer, config.backend)
        self._detector = detector
        self.threshold = config.match_threshold if config.match_threshold is not None else self.recognizer.match_threshold
        self.recognizers = self._gallery_recognizers()
        self._warn_if_primary_has_no_templates()
        self.models = {
            model_id: _recognizer_model(r, self.threshold if r is self.recognizer else r.match_threshold)
            for model_id, r in self.recognizers.items()
        }
        self.query_models: dict[str, QueryModel] = {}
        # Query models that are members of their own ensemble: run at enrollment and stored
        # under `own_key`, never served as recognisers.
        self.members: dict[str, Recognizer] = {}
        for manifest, path in self._ensembles():
            query_model, accepted = self._query_model(manifest, path)
            self.query_models[accepted.model_id] = query_model
            self.models[accepted.model_id] = accepted
            if manifest.query_member:
                self.members[own_key(manifest.query_model)] = OnnxRecognizer(_query_manifest(manifest, path), config.backend)
        # Registering a query model derives its templates from the stored embeddings alone
        # (backfill-free). Done at every start - seconds for 100k pictures - so the derived
        # gallery always matches the transforms and rejection settings this server runs with,
        # including pictures enrolled while the query model was not served.
        for query_model in self.query_models.values():
            gallery.rebuild_derived(query_model)
        # Unknown people, clustered in the primary recogniser's space (the file is created at
        # the first sighting; with unknowns.enabled off none is recorded, what is kept still
        # expires and can be listed, enrolled or erased).
        unknowns = config.unknowns
        self.unknowns = UnknownClusters(
            Path(gallery.directory) / UNKNOWNS_DB, unknowns, self.recognizer.model_id,
            self.threshold if unknowns.threshold is None else unknowns.threshold,
        )

    def _gallery_recognizers(self) -> dict[str, Recognizer]:
        """The primary recogniser first, then the configured gallery models, by model id."""
        recognizers: dict[str, Recognizer] = {self.recognizer.model_id: self.recognizer}
        for entry in self.config.gallery_models:
            for name in self._auto_gallery_models() if entry == "auto" else [entry]:
                if load_manifest(name).model_id not in recognizers:
                    recognizer = create_recognizer(name, self.config.backend)
                    recognizers[recognizer.model_id] = recognizer
        return recognizers

    def _warn_if_primary_has_no_templates(self) -> None:
        """A gallery enrolled under another primary (MobileFaceNet, before `auto` chose EdgeFace)
        holds no templates in this one's space: every face would come back unknown. Say so, and
        how to keep serving it, at start rather than through a silent drop in matches."""
        primary = self.recognizer.model_id
        if len(self.gallery) == 0 or self.gallery.dim(primary) is not None:
            return
        held = [m for m in self.recognizers if m != primary and self.gallery.dim(m) is not None]
        log.warning(
            "the gallery holds %d identities but no templates of the primary recogniser %s: none of them can be "
            "recognised until re-enrolled or upgraded (facelink cloud upgrade --to MODEL, docs/model-upgrade.md)%s",
            len(self.gallery), primary,
            f"; its templates are in {', '.join(held)}: set the cloud's recognizer to that model to keep serving "
            "them" if held else "",
        )

    def _auto_gallery_models(self) -> list[str]:
        """What `auto` stores besides the primary: every gallery model of each bundled ensemble
        whose gallery models are all reachable here, so that `ensembles: auto` can serve it
        whichever recogniser is the primary (the v9 ensemble needs MobileFaceNet and dlib's
        ResNet in ONNX Runtime, also when EdgeFace identifies). An ensemble short of a model
        adds nothing: its other models would cost enrollment time and serve no one."""
        by_id = _bundled_recognizers_by_id()
        chosen: list[str] = []
        for path in sorted(bundled_ensembles().values()):
            manifest, _ = load_ensemble_manifest(path)
            needed = [t.gallery_model for t in manifest.transforms if t.gallery_model != self.recognizer.model_id]
            missing = {m: _unreachable(by_id.get(m)) for m in needed}
            missing = {m: why for m, why in missing.items() if why}
            if missing:
                log.warning("bundled ensemble %s: gallery model(s) left out, it cannot be served: %s", path.name,
                            "; ".join(f"{m}: {why}" for m, why in missing.items()))
                continue
            chosen += [by_id[m] for m in needed if by_id[m] not in chosen]
        return chosen

    def _ensembles(self) -> list[tuple[EnsembleManifest, Path]]:
        """The configured ensemble manifests, once each; `auto` takes the bundled ones this
        server runs every gallery model of."""
        chosen: dict[Path, EnsembleManifest] = {}
        for entry in self.config.ensembles:
            for name_or_path in sorted(bundled_ensembles().values()) if entry == "auto" else [entry]:
                manifest, path = load_ensemble_manifest(name_or_path)
                missing = [t.gallery_model for t in manifest.transforms if t.gallery_model not in self.recognizers]
                if entry == "auto" and missing:
                    log.info("bundled ensemble %s not served: it needs gallery model(s) %s", path.name, ", ".join(missing))
                    continue
                chosen[path.resolve()] = manifest
        return [(manifest, path) for path, manifest in chosen.items()]

    def _query_model(self, manifest: EnsembleManifest, path: Path) -> tuple[QueryModel, AcceptedModel]:
        """An ensemble checked against the models served here, and its query model's card."""
        where = f"ensemble {path}"
        for spec in manifest.transforms:
            recognizer = self.recognizers.get(spec.gallery_model)
            if recognizer is None:
                raise ManifestError(
                    f"{where} maps gallery model {spec.gallery_model}, which this server does not run "
                    f"(it runs {', '.join(self.recognizers)}); add it to the gallery models"
                )
            # A transform trained for other weights would map into the wrong place, silently.
            served = recognizer.manifest.sha256
            if spec.gallery_sha256 and served and spec.gallery_sha256 != served:
                raise ManifestError(f"{where}: its transform for {spec.gallery_model} was trained for other weights "
                                    f"(sha256 {spec.gallery_sha256}, served {served})")
        if manifest.query_model in self.models:
            raise ManifestError(f"{where}: model {manifest.query_model} is already served; one ensemble per query model")
        query = _query_manifest(manifest, path)
        assert query.embedding is not None  # checked by _query_manifest
        accepted = AcceptedModel(
            manifest.query_model, "query", manifest.dim, query.embedding.match_threshold,
            _describe_input(query), manifest.query_sha256 or "",
        )
        ensemble = GalleryEnsemble(manifest, path.parent, self.config.backend)
        return QueryModel(ensemble, self._policy(manifest)), accepted

    def _policy(self, manifest: EnsembleManifest) -> RejectionPolicy:
        fraction, action = self.config.rejection_fraction, self.config.rejection_action
        if fraction == 0 or manifest.members < 2:  # nothing to reject, or no disagreement to measure
            return RejectionPolicy(0.0, action)
        try:
            # The threshold calibrated on the transforms' training faces: each picture is judged
            # on its own, the same at enrollment and at every rebuild.
            return RejectionPolicy.from_manifest(manifest, fraction, action)
        except ValueError as error:
            raise ManifestError(f"{error}; choose one of those rejection fractions") from error

    @property
    def detector(self) -> FaceDetector:
        # Loaded on first use: a server fed only aligned crops with landmarks never needs it.
        if self._detector is None:
            self._detector = create_detector(self.config.detector)
        return self._detector

    def locate_face(self, image: np.ndarray, landmarks: np.ndarray | None, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        """Landmarks given, validated; or the largest detected face's. Returns (landmarks, box)."""
        if landmarks is not None:
            try:
                return check_face_geometry(landmarks, image.shape), None
            except ValueError as error:
                raise InvalidArgument(f"{what}: {error}") from error
        face = largest(self.detector.detect(image))
        if face is None:
            raise InvalidArgument(f"{what}: no face found ({image.shape[1]}x{image.shape[0]} image)")
        return face.landmarks, face.box

    def accepted(self, model_id: str) -> AcceptedModel:
        model = self.models.get(model_id)
        if model is None:
            raise InvalidArgument(f"embeddings of model {model_id!r} are not accepted; accepted: {', '.join(self.models)}")
        return model

    def identify_embedding(self, embedding: np.ndarray, model_id: str) -> Identification:
        """Match an embedding of a gallery model or of an accepted query model against that
        model's templates (a query model's are the transformed, ensembled gallery)."""
        model = self.accepted(model_id)
        if embedding.shape != (model.dim,):
            raise InvalidArgument(f"model {model_id!r} embeddings have {model.dim} dimensions, got {embedding.size}")
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm):
            raise InvalidArgument("embedding holds NaN or infinity")
        if norm < 1e-6:
            raise InvalidArgument("embedding is all zeros")
        return self.match((embedding / norm)[None], model_id)[0]

    def match(self, embeddings: np.ndarray, model_id: str) -> list[Identification]:
        """Decisions for L2-normalised (N, dim) embeddings of `model_id`, searched as one batch."""
        model = self.models[model_id]
        decisions = []
        for matches in self.gallery.search(model_id, embeddings, k=1):
            if not matches:
                decisions.append(Identification("", 0.0, Decision.UNKNOWN, model.threshold, model_id))
                continue
            best = matches[0]
            decision = Decision.MATCH if best.score >= model.threshold else Decision.UNKNOWN
            decisions.append(Identification(best.identity, best.score, decision, model.threshold, model_id))
        return decisions

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The primary recogniser's crop of a located face (cheap: the batcher runs the model)."""
        return self.recognizer.align(image, landmarks)

    def identify_aligned(self, crops: np.ndarray) -> list[Identification]:
        """A batch of aligned crops through the primary recogniser and the gallery; each
        decision carries its embedding."""
        embeddings = self.recognizer.embed_aligned(crops)
        decisions = self.match(embeddings, self.recognizer.model_id)
        return [replace(found, embedding=vector) for found, vector in zip(decisions, embeddings, strict=True)]

    def identify(self, image: np.ndarray, landmarks: np.ndarray) -> Identification:
        return self.identify_aligned(self.align(image, landmarks)[None])[0]

    def enroll(
        self, identity: str, faces: list[EnrollFace], *, replace: bool = False, metadata: dict[str, str] | None = None
    ) -> tuple[int, int, list[np.ndarray | None]]:
        """All faces or none: every picture is checked before anything is stored.

        Each face is located once and embedded by every gallery model; the gallery stores those
        embeddings and derives each query model's template from them. Returns (pictures added,
        pictures the identity holds, the face box found in each picture or None).
        """
        stored = {**self.recognizers, **self.members}
        embeddings: dict[str, list[np.ndarray]] = {key: [] for key in stored}
        boxes = []
        for index, face in enumerate(faces):
            landmarks, box = self.locate_face(face.image, face.landmarks, f"image {index}")
            for key, recognizer in stored.items():
                embeddings[key].append(recognizer.embed(face.image, landmarks))
            boxes.append(box)
        added, total = self.gallery.enroll_pictures(
            identity,
            {model_id: np.stack(vectors) for model_id, vectors in embeddings.items()},
            list(self.query_models.values()),
            replace=replace,
            metadata=metadata,
        )
        log.info("enrolled %s: %d picture(s) added, %d in total", printable(identity), added, total)
        return added, total, boxes


def _bundled_recognizers_by_id() -> dict[str, str]:
    """Bundled recognition manifests' names by model id (what ensembles name their members by)."""
    names = {}
    for name in sorted(bundled_manifests()):
        try:
            manifest = load_manifest(name)
        except ManifestError:
            continue
        if manifest.task == "recognition":
            names.setdefault(manifest.model_id, name)
    return names


def _unreachable(name: str | None) -> str:
    """Why a bundled recogniser's weights cannot be used here, or "" when they can."""
    if name is None:
        return "no bundled manifest has this model id"
    manifest = load_manifest(name)
    if manifest.format == "dlib":
        return ""  # from PyPI; create_recognizer says what to install when it is missing
    try:
        manifest.weights()
    except ManifestError as error:
        hint = " (python -m facelink.export.dlib_convert makes it)" if name == "dlib-resnet-onnx" else ""
        return f"{error}{hint}"
    return ""


def _describe_input(manifest: ModelManifest) -> str:
    spec = manifest.input
    return f"{spec.width}x{spec.height} {spec.color}" if spec else ""


def _recognizer_model(recognizer: Recognizer, threshold: float) -> AcceptedModel:
    manifest = recognizer.manifest
    return AcceptedModel(recognizer.model_id, "recognizer", recognizer.dim, threshold, _describe_input(manifest), manifest.sha256 or "")


def _query_manifest(ensemble: EnsembleManifest, path: Path) -> ModelManifest:
    """The query model's own manifest, named by the ensemble: its input, and its match threshold."""
    where = f"ensemble {path}"
    if ensemble.query_manifest is None:
        raise ManifestError(f"{where} names no query_manifest, so the query model's match threshold is unknown")
    reference = ensemble.query_manifest
    query = load_manifest(path.parent / reference if reference.endswith(".json") else reference)
    if query.model_id != ensemble.query_model or query.embedding is None or query.embedding.dim != ensemble.dim:
        raise ManifestError(f"{where}: its query manifest describes {query.model_id} "
                            f"({query.embedding.dim if query.embedding else '?'}-d), not {ensemble.query_model} ({ensemble.dim}-d)")
    if ensemble.query_sha256 and query.sha256 and ensemble.query_sha256 != query.sha256:
        raise ManifestError(f"{where}: trained for {ensemble.query_model} weights with sha256 {ensemble.query_sha256}, "
                            f"its manifest says {query.sha256}")
    return query
