"""YuNet through ONNX Runtime: the same ONNX file and decoding as cv2.FaceDetectorYN, on any
execution provider (CPU, CUDA, TensorRT).

OpenCV's detector (modules/objdetect/src/face_detect.cpp, 4.x) feeds the network the BGR frame
as float 0-255 (no mean, no scale), zero-padded on the right and bottom to a multiple of 32, and
decodes twelve outputs: `cls_<s>`, `obj_<s>`, `bbox_<s>`, `kps_<s>` for strides s = 8, 16, 32,
one prior per cell of each stride's grid (row-major). For the cell (row r, column c):

    score   = sqrt(clip(cls, 0, 1) * clip(obj, 0, 1))          kept when >= score_threshold
    centre  = ((c + bbox0) * s, (r + bbox1) * s)
    size    = (exp(bbox2) * s, exp(bbox3) * s)                  box = centre - size / 2, size
    point k = ((kps[2k] + c) * s, (kps[2k+1] + r) * s)          k = 0..4

then, when more than one face is left, non-maximum suppression on the boxes truncated to integer
rectangles (cv2.dnn.NMSBoxes, the call OpenCV makes, with top_k 5000). `decode_yunet` does exactly
this with numpy; the tests check it against cv2.FaceDetectorYN on LFW pictures.
"""

from __future__ import annotations

import cv2
import numpy as np

from facelink.config import BackendConfig, DetectorConfig

from ..manifest import ModelManifest
from .base import Detection, detection_input, rescaled, yunet_detections

STRIDES = (8, 16, 32)
DIVISOR = 32
TOP_K = 5000  # what runtime/detection/yunet.py gives cv2.FaceDetectorYN
OUTPUT_NAMES = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)


def padded_size(width: int, height: int) -> tuple[int, int]:
    """The network's input size for a frame: each side rounded up to a multiple of 32."""
    return ((width - 1) // DIVISOR + 1) * DIVISOR, ((height - 1) // DIVISOR + 1) * DIVISOR


def yunet_blob(bgr: np.ndarray) -> np.ndarray:
    """A BGR uint8 frame as YuNet's input: 1x3xHpxWp float32, zero-padded right and bottom."""
    height, width = bgr.shape[:2]
    pad_w, pad_h = padded_size(width, height)
    blob = np.zeros((1, 3, pad_h, pad_w), dtype=np.float32)
    blob[0, :, :height, :width] = bgr.transpose(2, 0, 1)
    return blob


def decode_yunet(
    outputs: dict[str, np.ndarray], pad_w: int, pad_h: int, score_threshold: float, nms_threshold: float,
    top_k: int = TOP_K,
) -> np.ndarray:
    """YuNet's outputs -> rows (x, y, w, h, 5 x/y landmark pairs, score) as cv2.FaceDetectorYN
    returns them (float32, NMS order); an empty (0, 15) array when nothing is found."""
    threshold = np.float32(score_threshold)
    parts = []
    for s in STRIDES:
        cols, rows = pad_w // s, pad_h // s
        cells = rows * cols
        cls = outputs[f"cls_{s}"].reshape(-1)
        obj = outputs[f"obj_{s}"].reshape(-1)
        bbox = outputs[f"bbox_{s}"].reshape(-1, 4)
        kps = outputs[f"kps_{s}"].reshape(-1, 10)
        if cls.shape[0] != cells or bbox.shape[0] != cells or kps.shape[0] != cells:
            raise ValueError(
                f"YuNet output for stride {s} has {cls.shape[0]} priors, expected {cells} for a {pad_w}x{pad_h} input"
            )
        cls = np.clip(cls.astype(np.float32), 0, 1)
        obj = np.clip(obj.astype(np.float32), 0, 1)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= threshold)  # row-major, as OpenCV's loops
        if idx.size == 0:
            continue
        stride = np.float32(s)
        c = (idx % cols).astype(np.float32)
        r = (idx // cols).astype(np.float32)
        b = bbox[idx].astype(np.float32)
        k = kps[idx].astype(np.float32)
        cx = (c + b[:, 0]) * stride
        cy = (r + b[:, 1]) * stride
        w = np.exp(b[:, 2]) * stride
        h = np.exp(b[:, 3]) * stride
        face = np.empty((idx.size, 15), dtype=np.float32)
        face[:, 0] = cx - w / np.float32(2)
        face[:, 1] = cy - h / np.float32(2)
        face[:, 2] = w
        face[:, 3] = h
        face[:, 4:14:2] = (k[:, 0::2] + c[:, None]) * stride
        face[:, 5:14:2] = (k[:, 1::2] + r[:, None]) * stride
        face[:, 14] = score[idx]
        parts.append(face)
    if not parts:
        return np.zeros((0, 15), dtype=np.float32)
    faces = np.concatenate(parts)
    if len(faces) == 1:  # OpenCV runs NMS only on more than one face
        return faces
    # C's int(): truncation toward zero, as OpenCV builds its Rect2i boxes.
    boxes = np.trunc(faces[:, :4]).astype(np.int32)
    keep = cv2.dnn.NMSBoxes(boxes.tolist(), faces[:, 14].tolist(), float(score_threshold), float(nms_threshold),
                            eta=1.0, top_k=top_k)
    keep = np.asarray(keep, dtype=np.int64).reshape(-1)
    return faces[keep]


class YuNetOrtDetector:
    """YuNet in an ONNX Runtime session on `backend.providers` (thread-safe: ONNX Runtime's `run` is)."""

    name = "yunet-ort"

    def __init__(
        self, manifest: ModelManifest, config: DetectorConfig = DetectorConfig(), backend: BackendConfig | None = None
    ) -> None:
        from ..backends import OnnxRuntimeBackend

        self.config = config
        self.manifest = manifest
        self.backend = OnnxRuntimeBackend(manifest.weights(), backend or config.backend)
        missing = sorted(set(OUTPUT_NAMES) - set(self.backend.output_names))
        if missing or len(self.backend.input_names) != 1:
            raise ValueError(
                f"{manifest.weights()} is not a YuNet model as cv2.FaceDetectorYN reads it "
                f"(one input; outputs {', '.join(OUTPUT_NAMES)}): missing {', '.join(missing) or 'nothing'}, "
                f"inputs {self.backend.input_names}"
            )
        self._input = self.backend.input_names[0]
        self._outputs = list(OUTPUT_NAMES)

    @property
    def providers(self) -> list[str]:
        return self.backend.session.get_providers()

    def raw(self, image: np.ndarray) -> np.ndarray:
        """Rows as cv2.FaceDetectorYN returns them, for an RGB image at its own size."""
        height, width = image.shape[:2]
        blob = yunet_blob(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        values = self.backend.session.run(self._outputs, {self._input: blob})
        pad_w, pad_h = padded_size(width, height)
        return decode_yunet(dict(zip(self._outputs, values)), pad_w, pad_h,
                            self.config.score_threshold, self.config.nms_threshold)

    def detect(self, image: np.ndarray) -> list[Detection]:
        small, sx, sy = detection_input(image, self.config.detect_size)
        return yunet_detections(rescaled(self.raw(small), sx, sy), self.config.min_face_size, self.config.max_faces)
