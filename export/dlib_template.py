"""Derive the five-point template of dlib's 150x150 face chips, for the dlib recogniser manifest.

dlib aligns with its own 5-point model (eye corners and nose base) and `get_face_chip`
(size 150, padding 0.25). facelink speaks a different five points, so we measure where
facelink's landmarks land inside dlib's chips, averaged over many faces, and store that as the
template in runtime/manifests/dlib-resnet.json:

    python -m facelink.export.dlib_template --images 400

Uses LFW images that pairs.txt does not reference (never the test set).
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
from tqdm import tqdm

from facelink.config import DetectorConfig
from facelink.datasets import LFW
from facelink.runtime.detection import largest
from facelink.runtime.detection.yunet import YuNetDetector
from facelink.runtime.dlib_models import dlib_model_path, import_dlib
from facelink.runtime.manifest import load_manifest


def measure(n_images: int, seed: int = 0) -> np.ndarray:
    dlib = import_dlib()
    hog = dlib.get_frontal_face_detector()
    shape5 = dlib.shape_predictor(str(dlib_model_path("shape_predictor_5_face_landmarks.dat")))
    detector = YuNetDetector(load_manifest("yunet"), DetectorConfig(score_threshold=0.5))
    images = LFW.locate().training_images()
    rng = np.random.default_rng(seed)
    points = []
    for path in tqdm(rng.permutation(images)[: n_images * 2], desc="dlib chips"):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        rects = hog(rgb, 1)
        if len(rects) != 1:
            continue
        chip = dlib.get_face_chip(rgb, shape5(rgb, rects[0]), size=150, padding=0.25)
        face = largest(detector.detect(chip))
        if face is not None:
            points.append(face.landmarks)
        if len(points) == n_images:
            break
    return np.median(np.stack(points), axis=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    args = parser.parse_args()
    template = measure(args.images)
    print(json.dumps({"template": [[round(float(x), 2), round(float(y), 2)] for x, y in template]}))


if __name__ == "__main__":
    main()
