"""Synthetic camera scenes made from LFW pictures, for the edge's track tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facelink.edge.sources import Frame

from .support import lfw_image, read_rgb

FPS = 25.0
T0_US = 1_700_000_000_000_000  # an arbitrary epoch for capture times


def face_picture(name: str, index: int = 1, *, blur: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """An LFW picture (RGB), optionally blurred and/or shrunk (a far-away, out-of-focus person)."""
    image = read_rgb(lfw_image(name, index))
    if blur > 0:
        image = cv2.GaussianBlur(image, (0, 0), blur)
    if scale != 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


def canvas(picture: np.ndarray | None, x: int, y: int, size: tuple[int, int] = (480, 640)) -> np.ndarray:
    """`picture` pasted at (x, y) on a grey frame (None: an empty frame)."""
    frame = np.full((*size, 3), 90, dtype=np.uint8)
    if picture is not None:
        h, w = picture.shape[:2]
        frame[y: y + h, x: x + w] = picture
    return frame


def scene(appearances: list[tuple[str, int, int, dict]], gap: int = 0) -> list[Frame]:
    """Frames at 25 fps: for each (person, picture index, frames, picture options) the person drifts
    slowly to the right for that many frames; `gap` empty frames between appearances."""
    frames: list[Frame] = []
    for name, index, count, options in appearances:
        for i in range(count):
            blur = options.get("blur", 0.0) if i < options.get("blur_frames", count) else 0.0
            picture = face_picture(name, index, blur=blur, scale=options.get("scale", 1.0))
            frames.append(_frame(canvas(picture, 100 + i // 2, 100), len(frames)))
        for _ in range(gap):
            frames.append(_frame(canvas(None, 0, 0), len(frames)))
    return frames


def _frame(image: np.ndarray, index: int) -> Frame:
    return Frame(image=image, index=index, timestamp_us=T0_US + int(index * 1e6 / FPS), name=f"frame-{index:06d}")


def write_video(path: Path, frames: list[Frame]) -> bool:
    """The frames as an MJPG AVI at 25 fps; False when this OpenCV cannot write one."""
    h, w = frames[0].image.shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (w, h))
    if not writer.isOpened():
        return False
    for frame in frames:
        writer.write(cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))
    writer.release()
    return True
