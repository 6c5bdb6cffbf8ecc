"""Per-epoch measurements of a query model: LFW View 2 through its ONNX export, and a held-out proxy.

LFW: the benchmark's own edge path (`facelink.benchmarks.verification`): YuNet, the face
nearest the centre, the fixed deep-funneled landmarks where no face is found, the recogniser's
own warp from the original picture, ONNX Runtime, flip augmentation as the manifest says, and the
benchmark's 10-fold protocol. The only shortcut: the landmarks are detected once per run and
kept in the run directory (`lfw-landmarks.npz`), and the aligned faces are kept in memory, so an
epoch's evaluation costs the ~15,000 forward passes and nothing else. LFW is never used to choose
anything during training (no early stopping, no schedule): it is reported, not optimised.

Held-out proxy: the celeba-dev identities of the split -- cosine of the query embedding to
MobileFaceNet's (flip-augmented, both single-view embeddings cached), and all-pairs
verification (TAR at FAR=1e-3, EER) among those faces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from facelink.benchmarks.verification import (
    FAR_TARGET,
    distinct_images,
    eer,
    fallback_landmarks,
    fold_accuracy,
    pair_scores,
    read_rgb,
    tar_at_far,
)
from facelink.datasets import LFW
from facelink.runtime.manifest import ModelManifest, load_manifest
from facelink.runtime.recognition import OnnxRecognizer, l2_normalize


def raw_recognizer(manifest: ModelManifest) -> OnnxRecognizer:
    """The manifest's model, one view per call and unnormalised: flip or not is decided by the caller."""
    assert manifest.embedding is not None
    single = manifest.embedding.model_copy(update={"flip_augmentation": False, "normalize": False})
    return OnnxRecognizer(manifest.model_copy(update={"embedding": single}))


def both_views(recognizer: OnnxRecognizer, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(plain, flip-augmented) unit embeddings of aligned faces, from one pass per view."""
    plain = recognizer.embed_aligned(faces)
    mirrored = recognizer.embed_aligned(faces[:, :, ::-1])
    return l2_normalize(plain), l2_normalize(plain + mirrored)


def lfw_landmarks(lfw: LFW, cache_file: Path) -> tuple[list[Path], np.ndarray]:
    """Every pairs.txt image and its face's landmarks, as the benchmark finds them (cached)."""
    images = distinct_images(lfw.pairs())
    names = np.array([str(p.relative_to(lfw.image_dir)) for p in images])
    if cache_file.is_file():
        stored = np.load(cache_file)
        if stored["names"].tolist() == names.tolist():
            return images, stored["landmarks"]
    from facelink.config import DetectorConfig
    from facelink.edge.pipeline import select_faces
    from facelink.runtime.detection import create_detector

    detector = create_detector(DetectorConfig())
    landmarks = np.zeros((len(images), 5, 2), dtype=np.float32)
    for i, path in enumerate(tqdm(images, desc="LFW landmarks", unit="image")):
        image = read_rgb(path)
        faces = select_faces(detector.detect(image), "central", image.shape)
        landmarks[i] = faces[0].landmarks if faces else fallback_landmarks(image.shape)
    tmp = cache_file.with_name(cache_file.name + ".tmp.npz")
    np.savez(tmp, names=names, landmarks=landmarks)
    tmp.replace(cache_file)
    return images, landmarks


@dataclass
class LfwProbe:
    """LFW View 2 for any recogniser whose input is `template`-aligned faces."""

    faces: np.ndarray   # (N, h, w, 3) uint8, aligned from the original pictures
    index_a: np.ndarray
    index_b: np.ndarray
    same: np.ndarray
    folds: np.ndarray

    @classmethod
    def build(cls, manifest: ModelManifest, landmark_cache: Path) -> LfwProbe:
        lfw = LFW.locate(download=False)
        images, landmarks = lfw_landmarks(lfw, landmark_cache)
        recognizer = raw_recognizer(manifest)
        faces = np.stack([recognizer.align(read_rgb(p), points) for p, points in zip(images, landmarks)])
        index = {p: i for i, p in enumerate(images)}
        pairs = lfw.pairs()
        return cls(faces, np.array([index[p.a] for p in pairs]), np.array([index[p.b] for p in pairs]),
                   np.array([p.same for p in pairs]), np.array([p.fold for p in pairs]))

    def evaluate(self, manifest_path: Path) -> dict:
        """Accuracy (10-fold, %), TAR at FAR=1e-3 (%) and EER (%), single view and flip-augmented."""
        plain, flipped = both_views(raw_recognizer(load_manifest(manifest_path)), self.faces)
        result = {}
        for label, embeddings in (("single", plain), ("flip", flipped)):
            scores = pair_scores(embeddings, self.index_a, self.index_b)
            accuracies, _ = fold_accuracy(scores, self.same, self.folds)
            result[label] = {"accuracy": round(100 * float(accuracies.mean()), 3),
                             "accuracy_std": round(100 * float(accuracies.std()), 3),
                             "tar_at_far": round(100 * tar_at_far(scores, self.same, FAR_TARGET), 3),
                             "eer": round(100 * eer(scores, self.same), 3)}
        return result


def held_out_metrics(query: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict:
    """Cosine to the teacher (both unit vectors, row by row) and all-pairs verification by identity."""
    cosine = np.einsum("ij,ij->i", query, teacher)
    upper = np.triu_indices(len(query), k=1)
    scores = (query @ query.T)[upper]
    same = (labels[:, None] == labels[None, :])[upper]
    return {"cos": round(float(cosine.mean()), 5), "cos_p5": round(float(np.percentile(cosine, 5)), 5),
            "tar_at_far": round(100 * tar_at_far(scores, same, FAR_TARGET), 3), "eer": round(100 * eer(scores, same), 3)}
