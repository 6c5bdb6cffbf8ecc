"""Face recognisers: each one owns its preprocessing, described by its manifest.

A recogniser takes any image of a face plus the five landmarks in that image's coordinates,
warps it to its own template, normalises it as its manifest says, and returns an
L2-normalised embedding. Callers never prepare tensors themselves, so swapping
MobileFaceNet for another ONNX model (or for dlib's ResNet) is a manifest change.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from facelink.config import BackendConfig

from .alignment import warp_face
from .backends import create_backend
from .manifest import ManifestError, ModelManifest, load_manifest


class Recognizer(Protocol):
    manifest: ModelManifest

    @property
    def model_id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    @property
    def match_threshold(self) -> float: ...

    @property
    def embedding_space(self) -> str:
        """The model id of the space its embeddings live in: its own, or its source's for an export."""
        ...

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """The crop this model sees: `image` warped to the model's template."""
        ...

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) RGB crops already at the model's template -> (N, dim) unit vectors."""
        ...

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """One face (RGB image + its 5 landmarks) -> a (dim,) unit vector."""
        ...


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.maximum(norm, 1e-12)


class _RecognizerBase:
    manifest: ModelManifest

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def dim(self) -> int:
        assert self.manifest.embedding is not None
        return self.manifest.embedding.dim

    @property
    def match_threshold(self) -> float:
        assert self.manifest.embedding is not None
        return self.manifest.embedding.match_threshold

    @property
    def embedding_space(self) -> str:
        assert self.manifest.embedding is not None
        return self.manifest.embedding.space or self.model_id

    def align(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return warp_face(image, landmarks, self.manifest.template)[0]

    def embed(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        return self.embed_aligned(self.align(image, landmarks)[None])[0]

    def embed_aligned(self, crops: np.ndarray) -> np.ndarray:
        assert self.manifest.embedding is not None
        crops = np.asarray(crops)
        embeddings = self._forward(crops)
        if self.manifest.embedding.flip_augmentation:
            # Summing the embeddings of the face and its mirror image cancels part of the
            # pose-dependent noise: +0.2-0.5 points on LFW for the price of a second pass.
            embeddings = embeddings + self._forward(crops[:, :, ::-1])
        return l2_normalize(embeddings.astype(np.float32)) if self.manifest.embedding.normalize else embeddings

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        raise NotImplementedError


#: Faces per ONNX Runtime call for models with a dynamic batch: the memory grows linearly with
#: the batch, the throughput does not (the latency benchmark's best batch is 16 or less).
MAX_BATCH = 64


class OnnxRecognizer(_RecognizerBase):
    """Any ONNX recogniser described by a manifest (MobileFaceNet, ArcFace R50/R100, ...)."""

    def __init__(self, manifest: ModelManifest, backend: BackendConfig = BackendConfig()) -> None:
        if manifest.task != "recognition" or manifest.input is None:
            raise ManifestError(f"{manifest.name!r} is not a recognition model")
        self.manifest = manifest
        self.backend = create_backend(manifest.weights(), backend)
        spec = manifest.input
        self._mean = np.array(spec.mean, dtype=np.float32)
        self._inv_std = 1.0 / np.array(spec.std, dtype=np.float32)
        self._input_name = self.backend.input_names[0]
        shape = getattr(self.backend, "session", None)
        batch = shape.get_inputs()[0].shape[0] if shape is not None else None
        # Models exported with a fixed batch of 1 (MobileFaceNet from ../shared is) run one
        # face at a time; a dynamic batch dimension takes up to MAX_BATCH faces a call. Not the
        # whole stack: ONNX Runtime holds every activation of a call at once, and LFW's 7,701
        # faces in one call took 24 GB at 96x96 (the kernel killed the training run).
        self._max_batch = batch if isinstance(batch, int) and batch > 0 else MAX_BATCH

    def preprocess(self, crops: np.ndarray) -> np.ndarray:
        spec = self.manifest.input
        assert spec is not None
        if crops.shape[1:3] != (spec.height, spec.width):
            raise ValueError(f"{self.model_id} expects {spec.width}x{spec.height} crops, got {crops.shape[2]}x{crops.shape[1]}")
        x = crops.astype(np.float32)
        if spec.color == "BGR":
            x = x[..., ::-1]
        x = (x / spec.scale - self._mean) * self._inv_std
        if spec.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        x = self.preprocess(crops)
        if len(x) > self._max_batch:
            chunks = [x[i : i + self._max_batch] for i in range(0, len(x), self._max_batch)]
            return np.concatenate([self.backend.run({self._input_name: c})[0] for c in chunks])
        return self.backend.run({self._input_name: x})[0]


class DlibRecognizer(_RecognizerBase):
    """dlib's ResNet-29 (128-d, from PyPI's face_recognition_models): the no-../shared fallback."""

    def __init__(self, manifest: ModelManifest) -> None:
        from .dlib_models import dlib_model_path, import_dlib

        self.manifest = manifest
        dlib = import_dlib()
        # dlib's weights ship inside the face_recognition_models package: `file` names one of them.
        path = dlib_model_path(manifest.file)
        if manifest.sha256 is not None:
            manifest.model_copy(update={"file": str(path)}).weights()  # verify the sha256
        self._model = dlib.face_recognition_model_v1(str(path))
        self._lock = threading.Lock()

    def _forward(self, crops: np.ndarray) -> np.ndarray:
        with self._lock:
            chips = [np.ascontiguousarray(c) for c in crops]
            return np.array(self._model.compute_face_descriptor(chips), dtype=np.float32)


#: What `auto` tries, strongest first; the first whose weights are reachable is the primary.
#: EdgeFace-XS leads on measurement (docs/recognisers.md: LFW View 2 and 1:N on LFW's unseen
#: people, at about MobileFaceNet's cost a face); dlib's ResNet, installable from PyPI, is the
#: fallback of a machine without ../shared.
AUTO_PREFERENCE: tuple[str, ...] = ("edgeface-xs", "mobilefacenet", "dlib-resnet")


def auto_recognizer_name() -> str:
    """The manifest `auto` means on this machine: the first of AUTO_PREFERENCE whose weights exist
    and match their sha256 (dlib's, last, is checked when it loads)."""
    for name in AUTO_PREFERENCE[:-1]:
        try:
            load_manifest(name).weights()
        except ManifestError:
            continue
        return name
    return AUTO_PREFERENCE[-1]


def create_recognizer(name_or_path: str | Path = "auto", backend: BackendConfig = BackendConfig()) -> Recognizer:
    """A recogniser by bundled manifest name or manifest path.

    `auto` takes the strongest bundled recogniser whose weights are reachable (`AUTO_PREFERENCE`:
    EdgeFace-XS, then MobileFaceNet, from ../shared or $FACELINK_SHARED), otherwise dlib's
    ResNet, which any machine can install from PyPI.
    """
    if str(name_or_path) == "auto":
        name_or_path = auto_recognizer_name()
    manifest = load_manifest(name_or_path)
    if manifest.format == "dlib":
        return DlibRecognizer(manifest)
    return OnnxRecognizer(manifest, backend)
