"""The recognition engine: faces in, decisions out. No gRPC here (service.py speaks the wire).

One engine serves every stream and unary call of a server. Its models are shared between
threads; ONNX Runtime sessions are safe to call concurrently, and the detectors lock
internally.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import numpy as np

from facelink.config import CloudConfig
from facelink.runtime.alignment import check_landmarks
from facelink.runtime.detection import FaceDetector, create_detector, largest
from facelink.runtime.recognition import Recognizer, create_recognizer

from .errors import InvalidArgument
from .gallery import Gallery

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
                return check_landmarks(landmarks), None
            except ValueError as error:
                raise InvalidArgument(f"{what}: {error}") from error
        face = largest(self.detector.detect(image))
        if face is None:
            raise InvalidArgument(f"{what}: no face found ({image.shape[1]}x{image.shape[0]} image)")
        return face.landmarks, face.box

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return self.recognizer.embed(image, landmarks)

    def identify_embedding(self, embedding: np.ndarray, model_id: str) -> Identification:
        if model_id != self.recognizer.model_id:
            raise InvalidArgument(
                f"embeddings of model {model_id!r} are not accepted; accepted: {self.recognizer.model_id!r}"
            )
        if embedding.shape != (self.recognizer.dim,):
            raise InvalidArgument(f"model {model_id!r} embeddings have {self.recognizer.dim} dimensions, got {embedding.size}")
        norm = float(np.linalg.norm(embedding))
        if norm < 1e-6:
            raise InvalidArgument("embedding is all zeros")
        matches = self.gallery.search(model_id, (embedding / norm)[None], k=1)[0]
        if not matches:
            return Identification("", 0.0, Decision.UNKNOWN, self.threshold, model_id)
        best = matches[0]
        decision = Decision.MATCH if best.score >= self.threshold else Decision.UNKNOWN
        return Identification(best.identity, best.score, decision, self.threshold, model_id)

    def identify(self, image: np.ndarray, landmarks: np.ndarray) -> Identification:
        return self.identify_embedding(self.embed(image, landmarks), self.recognizer.model_id)

    def enroll(
        self, identity: str, faces: list[EnrollFace], *, replace: bool = False, metadata: dict[str, str] | None = None
    ) -> tuple[int, int, list[np.ndarray | None]]:
        """All faces or none: every picture is checked before anything is stored."""
        embeddings, boxes = [], []
        for index, face in enumerate(faces):
            landmarks, box = self.locate_face(face.image, face.landmarks, f"image {index}")
            embeddings.append(self.embed(face.image, landmarks))
            boxes.append(box)
        added, total = self.gallery.enroll(
            identity, self.recognizer.model_id, np.stack(embeddings), replace=replace, metadata=metadata
        )
        log.info("enrolled %r: %d template(s) added, %d in total", identity, added, total)
        return added, total, boxes
