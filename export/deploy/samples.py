"""Model inputs for calibration and parity checks, made the way the runtime makes them.

`--calib DATA` (and the parity check) take:

* `lfw` - LFW pictures that pairs.txt does NOT reference (`LFW.training_images()`), shuffled
  with a fixed seed: never the View 2 test set;
* a folder of pictures (searched recursively);
* an `.npz` file of ready tensors keyed by input name (`(N, ...)` arrays): for models whose
  inputs are not pictures (a codec's decoder takes latents);
* `random` - standard-normal tensors: parity only, never calibration.

Pictures become tensors through the runtime's own code: a recogniser's inputs are faces found
by the runtime's detector (`create_detector()`, the face nearest the centre), warped to the
manifest's template by `warp_face`, plus their mirror images when the manifest averages flipped
embeddings, normalised by `OnnxRecognizer.preprocess`. A detector's inputs are whole pictures
letterboxed into the frame size, normalised as its manifest's `input` says, or, without one,
as OpenCV's FaceDetectorYN feeds YuNet (BGR, 0-255, no scaling). A learned codec's encoder
sees canonical crops as the edge makes them, its decoder their dequantised latents; an
ensemble's transform sees its gallery model's embeddings of faces.
Calibration takes pictures from the front of the shuffled list, parity from the back, so the
two never share a picture (unless a folder is too small for both).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from facelink.runtime.alignment import Template
from facelink.runtime.manifest import InputSpec, ModelManifest

from .graph import TensorSpec
from .source import ModelSource

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: How OpenCV's FaceDetectorYN feeds YuNet: BGR pixels as they are.
OPENCV_DETECTOR_INPUT = InputSpec(width=1, height=1, color="BGR", scale=1.0)
DEFAULT_FRAME = (256, 256)  # LFW's 250x250 pictures padded to YuNet's stride of 32
SEED = 0


@dataclass(frozen=True)
class Samples:
    tensors: dict[str, np.ndarray]  # input name -> (N, ...), the same N for every input
    origin: str  # where they came from, for reports
    real: bool  # False for random tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), size):
            yield {name: t[start : start + size] for name, t in self.tensors.items()}

    @property
    def digest(self) -> str:
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            digest.update(name.encode() + np.ascontiguousarray(self.tensors[name]).tobytes())
        return digest.hexdigest()


def make_samples(
    source: ModelSource,
    specs: list[TensorSpec],
    data: str,
    count: int,
    *,
    for_parity: bool,
    frame: tuple[int, int] | None = None,
) -> Samples:
    if data == "random":
        return _random(specs, count, frame)
    path = Path(data)
    if path.suffix == ".npz":
        return _from_npz(path, specs, count, for_parity)
    images = _pictures(data)
    if for_parity:
        images = images[::-1]
    manifest = source.manifest
    if source.codec_part is not None:
        return _codec_inputs(source, specs[0].name, images, count, data)
    if source.gallery_model is not None:
        return _transform_inputs(source.gallery_model, specs[0].name, images, count, data)
    if manifest is not None and manifest.task == "recognition":
        return _faces(manifest, images, count, data)
    if manifest is not None and manifest.task == "detection":
        return _frames(manifest, specs, images, count, frame or DEFAULT_FRAME, data)
    raise ValueError(
        f"{source.label}: facelink does not know how to turn pictures into this model's inputs; "
        "pass a .npz of real input tensors keyed by input name (--calib FILE.npz)"
    )


def _pictures(data: str) -> list[Path]:
    if data == "lfw":
        from facelink.datasets import LFW

        images = LFW.locate().training_images()  # never an image pairs.txt references
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"calibration data {data!r}: not 'lfw', 'random', a folder of pictures or a .npz file"
            )
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"calibration data {data!r}: no pictures found")
    return [images[i] for i in np.random.default_rng(SEED).permutation(len(images))]


def _read_rgb(path: Path) -> np.ndarray | None:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _aligned(template: Template, images: list[Path], count: int, data: str) -> tuple[np.ndarray, str]:
    """Up to `count` faces (the one nearest each picture's centre, found by the runtime's
    detector) warped to `template`; and a description of where they came from."""
    from facelink.edge.pipeline import select_faces
    from facelink.runtime.alignment import warp_face
    from facelink.runtime.detection import create_detector

    detector = create_detector()
    crops = []
    for path in images:
        image = _read_rgb(path)
        faces = select_faces(detector.detect(image), "central", image.shape) if image is not None else []
        if faces:
            crops.append(warp_face(image, faces[0].landmarks, template)[0])
        if len(crops) == count:
            break
    if not crops:
        raise ValueError(f"no face found in the calibration pictures ({data})")
    return np.stack(crops), f"{len(crops)} faces from {_describe(data)} ({getattr(detector, 'name', 'detector')})"


def _faces(manifest: ModelManifest, images: list[Path], count: int, data: str) -> Samples:
    from facelink.runtime.recognition import OnnxRecognizer

    recognizer = OnnxRecognizer(manifest)
    stack, origin = _aligned(manifest.template, images, count, data)
    assert manifest.embedding is not None
    mirrored = manifest.embedding.flip_augmentation
    if mirrored:  # the runtime also runs every face mirrored: calibrate on what it will see
        stack = np.concatenate([stack, stack[:, :, ::-1]])
        origin += " + mirror images"
    tensors = {recognizer.backend.input_names[0]: recognizer.preprocess(stack)}
    return Samples(tensors, f"{origin}, {manifest.model_id} template", real=True)


def _transform_inputs(gallery_model: str, name: str, images: list[Path], count: int, data: str) -> Samples:
    """An embedding transform sees its gallery model's embeddings of faces, as enrollment makes them."""
    from facelink.runtime.manifest import bundled_manifests, load_manifest
    from facelink.runtime.recognition import OnnxRecognizer

    manifest = next(
        (m for m in map(load_manifest, bundled_manifests()) if m.model_id == gallery_model and m.format == "onnx"),
        None,
    )
    if manifest is None:
        raise ValueError(f"no bundled ONNX manifest has the model id {gallery_model!r}: pass --calib FILE.npz")
    crops, origin = _aligned(manifest.template, images, count, data)
    embeddings = OnnxRecognizer(manifest).embed_aligned(crops)
    return Samples({name: embeddings.astype(np.float32)}, f"{manifest.model_id} embeddings of {origin}", real=True)


def _codec_inputs(source: ModelSource, name: str, images: list[Path], count: int, data: str) -> Samples:
    """A learned codec's encoder sees canonical crops as the edge makes them; its decoder sees
    those crops' dequantised latents, from the fp32 encoder, at every quality in turn."""
    from facelink.config import CanonicalCrop
    from facelink.runtime.alignment import canonical_template

    crop = CanonicalCrop()
    crops, origin = _aligned(canonical_template(crop.size, crop.scale), images, count, data)
    codec = source.codec()
    inputs = [codec.encoder_input(c)[0] for c in crops]
    x = np.stack(inputs)
    origin = f"{origin}, canonical {crop.size}x{crop.size} crops"
    if source.codec_part == "encoder":
        return Samples({name: x}, origin, real=True)
    encoder = codec.encoder_backend
    qualities = codec.manifest.qualities
    latents = []
    for i, one in enumerate(x):
        quality = i % qualities + 1
        latent = encoder.run({encoder.input_names[0]: one[None]})[0][0]
        latents.append(codec.dequantize(codec.quantize(latent, quality), quality))
    return Samples({name: np.stack(latents)}, f"{origin}, encoded at qualities 1-{qualities} in turn", real=True)


def _frames(
    manifest: ModelManifest,
    specs: list[TensorSpec],
    images: list[Path],
    count: int,
    frame: tuple[int, int],
    data: str,
) -> Samples:
    spec = manifest.input or OPENCV_DETECTOR_INPUT
    width, height = frame
    frames = []
    for path in images[:count]:
        image = _read_rgb(path)
        if image is None:
            continue
        scale = min(1.0, width / image.shape[1], height / image.shape[0])  # only ever shrink
        if scale < 1.0:
            image = cv2.resize(
                image,
                (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                interpolation=cv2.INTER_AREA,
            )
        canvas = np.zeros((height, width, 3), np.uint8)  # zero padding right and below, as OpenCV pads
        canvas[: image.shape[0], : image.shape[1]] = image
        frames.append(canvas)
    x = np.stack(frames).astype(np.float32)
    if spec.color == "BGR":
        x = x[..., ::-1]
    x = (x / spec.scale - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    origin = f"{len(frames)} pictures from {_describe(data)} letterboxed to {width}x{height}"
    return Samples({specs[0].name: np.ascontiguousarray(x)}, origin, real=True)


def _from_npz(path: Path, specs: list[TensorSpec], count: int, for_parity: bool) -> Samples:
    with np.load(path) as archive:
        missing = [s.name for s in specs if s.name not in archive.files]
        if missing:
            raise ValueError(
                f"{path} has no array for input(s) {', '.join(missing)} (has: {', '.join(archive.files)})"
            )
        tensors = {s.name: archive[s.name].astype(s.dtype) for s in specs}
    n = len(next(iter(tensors.values())))
    pick = slice(max(n - count, 0), n) if for_parity else slice(0, count)
    return Samples(
        {k: v[pick] for k, v in tensors.items()}, f"{min(count, n)} tensors from {path}", real=True
    )


def _random(specs: list[TensorSpec], count: int, frame: tuple[int, int] | None) -> Samples:
    rng = np.random.default_rng(SEED)
    tensors = {}
    for spec in specs:
        # Dynamic dimensions: the frame's height and width for an image (C, H, W), else 64.
        fill = [0, frame[1], frame[0]] if frame and len(spec.shape) == 4 else [64] * (len(spec.shape) - 1)
        dims = [d if isinstance(d, int) else (fill[i] or 64) for i, d in enumerate(spec.shape[1:])]
        tensors[spec.name] = rng.standard_normal((count, *dims)).astype(spec.dtype)
    return Samples(
        tensors, f"{count} random standard-normal inputs (no real data for this model)", real=False
    )


def _describe(data: str) -> str:
    return "LFW pictures pairs.txt does not use" if data == "lfw" else data
