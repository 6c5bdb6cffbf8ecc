"""Face detectors: YuNet (default, from ../shared) and dlib's HOG (fallback from PyPI).

YuNet runs through OpenCV (`cv2.FaceDetectorYN`, CPU) or through ONNX Runtime (`yunet-ort`, on
the configured execution providers: the GPU path). Which one `auto` and `yunet` take: see
`DetectorConfig` and `uses_onnxruntime`.
"""

from __future__ import annotations

from facelink.config import BackendConfig, DetectorConfig

from ..manifest import ManifestError, load_manifest
from .base import Detection, FaceDetector, largest

__all__ = ["Detection", "FaceDetector", "create_detector", "largest", "uses_onnxruntime"]

_CPU = "CPUExecutionProvider"


def uses_onnxruntime(config: DetectorConfig, backend: BackendConfig | None = None) -> bool:
    """Whether YuNet runs through ONNX Runtime: always for `yunet-ort`; for `auto` and `yunet`
    when the first provider asked for is not the CPU's (a GPU was chosen), else OpenCV."""
    providers = (backend or config.backend).providers
    if config.kind == "yunet-ort":
        return True
    return config.kind in ("auto", "yunet") and providers[0].partition(":")[0].strip() != _CPU


def create_detector(config: DetectorConfig = DetectorConfig(), backend: BackendConfig | None = None) -> FaceDetector:
    """The configured detector; `auto` takes YuNet when its weights are present, else dlib.

    `backend` (default `config.backend`): the ONNX Runtime providers of the YuNet ONNX Runtime path.
    """
    if config.kind in ("auto", "yunet", "yunet-ort"):
        manifest = load_manifest("yunet")
        try:
            manifest.weights()
        except ManifestError:
            if config.kind != "auto":
                raise
        else:
            if uses_onnxruntime(config, backend):
                from .yunet_ort import YuNetOrtDetector

                return YuNetOrtDetector(manifest, config, backend)
            from .yunet import YuNetDetector

            return YuNetDetector(manifest, config)
    from .dlib_hog import DlibHogDetector

    return DlibHogDetector(config)
