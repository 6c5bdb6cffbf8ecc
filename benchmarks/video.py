"""The edge on a ground-truth video: one decision per person and track, from a file and a live stream.

    facelink bench video                             # 90 s video, file and live, every|first|best, outages
    facelink bench video -- --seconds 30 --no-outages
    facelink bench video -- --outage-seconds 10      # shorter camera and cloud outages, for a quick look

The video is made here, deterministically from `--seed`: LFW people (../shared) pasted onto a
fixed background frame, entering and leaving through the frame's edges, walking across,
approaching (growing) and receding (shrinking), two at once, small (far away) and blurred
(out of focus, or coming into focus), with empty stretches between them. People in the gallery
are enrolled from *other* pictures of them than the one in the video; strangers (never
enrolled) walk through too, and distractor identities fill the gallery. The video is written
with cv2.VideoWriter (MJPG, 25 fps) to a temporary file; its ground truth (per appearance: the
person or a stranger, the frame range, the face's box in every frame) stays in memory and goes
into the JSON.

It is played to the real edge loop (edge/run.py `run_cameras`, the default EdgeConfig but for
`--codec`) against a real cloud: `facelink cloud serve` in its own process, the people enrolled
through the Gallery service with an `enroll` token, the edge holding a device token (scope
`recognize` only, as a deployed camera has). Two ways:

* file: the video file as a source (every frame, as fast as the edge goes);
* live: a paced camera (:class:`PacedVideo`) that delivers the video's frames at 25 fps in real
  time, stamped with the wall clock; the edge's capture thread (edge/live.py) hands over the
  newest frame and drops the ones it had no time for, as with an RTSP camera.

For each policy (`--send every|first|best`) and way it measures, per appearance of the ground
truth: identified correctly, wrongly, left unknown (or never decided); strangers matched to
someone (target 0); observations and bytes per appearance and per second of video; time to a
decision; lag behind live (live); the edge's CPU per frame (the process's CPU time over frames
processed: detection, tracking, quality, encoding, the stream client, and for live the capture
thread's decoding; the cloud is another process).

Definitions:

* an edge track belongs to the appearance whose ground-truth box overlaps its boxes most
  (IoU >= 0.3 in most of its frames); tracks that belong to none are *spurious*;
* an appearance is *correct* when some of its tracks ends matched to its person and none to
  anybody else, *wrong* when any of its tracks ends matched to someone else (for a stranger:
  to anyone, *stranger matched*), *unknown* when its tracks ended UNKNOWN, *undecided* when no
  track of it sent a shot (never good enough, or never detected);
* its first recognisable shot is the first frame where the edge saw its face at or above the
  quality gate (`TrackPolicy.min_quality`, the quality of edge/quality.py); time to a decision
  runs from that frame's capture time (live: the camera's wall clock; file: when the edge read
  the frame) to the track's first decision event;
* observations: shots the edge encoded and sent; bytes: their FaceObservation messages as
  serialised on the wire (payload, landmarks, box, ids).

Outage checks (live, send=best; `--no-outages` skips them): the camera stops delivering for
`--outage-seconds` (its stream ends, reopening fails until it is back) and the edge must
reconnect by itself; then the cloud process is killed for `--outage-seconds` and restarted on
the same port and gallery, and no track may be lost (every appearance seen decided, nothing
dropped or left unanswered).

Writes benchmarks/results/video.json and a PNG timeline of the ground truth, the edge's tracks,
shots and decisions (benchmarks/results/video_timeline.png).
"""

from __future__ import annotations

import argparse
import bisect
import logging
import math
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facelink.edge.sources import Frame, FrameSource, SourceError

from . import reporting

log = logging.getLogger(__name__)

FPS = 25.0
WIDTH, HEIGHT = 640, 480
#: The part of a 250x250 LFW (deep-funneled) picture that is pasted: the head and a margin.
CROP = (50, 35, 150, 180)  # x, y, w, h
POLICIES = ("every", "first", "best")
MODES = ("file", "live")
IOU_MATCH = 0.3
DECISION_TARGET_S = 1.0
REDUCTION_TARGET = 50.0
LAG_TARGET_S = 1.0


# -- the ground truth ----------------------------------------------------------------------------
@dataclass
class Appearance:
    """One person's appearance in the video: who, when (frames [start, end)), where (the face's box
    in every frame, x y w h in frame pixels, clipped to the frame)."""

    id: int
    person: str                  # the LFW name (strangers too: they are simply not enrolled)
    stranger: bool
    picture: str                 # the LFW picture pasted (never one used for enrollment)
    kind: str                    # walk, approach, recede, small, blurred, focus
    start: int
    end: int
    lane: int = 0                # for the timeline: 0, or 1 for the second of two at once
    blur: float = 0.0
    blur_until: int = 0          # frames from start that are blurred
    scale: tuple[float, float] = (1.0, 1.0)
    path: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x0, y0, x1, y1 of the patch's top left
    boxes: dict[int, tuple[float, float, float, float]] = field(default_factory=dict, repr=False)
    face_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # in the crop at scale 1

    @property
    def seconds(self) -> float:
        return (self.end - self.start) / FPS

    def summary(self) -> dict[str, Any]:
        keys = sorted(self.boxes)
        track = [[k, *(round(v, 1) for v in self.boxes[k])] for k in keys[::5]]
        return {
            "id": self.id, "person": None if self.stranger else self.person, "stranger": self.stranger,
            "lfw_name": self.person, "picture": self.picture, "kind": self.kind,
            "frames": [self.start, self.end], "seconds": [round(self.start / FPS, 2), round(self.end / FPS, 2)],
            "blur_sigma": self.blur, "blurred_frames": self.blur_until, "scale": list(self.scale),
            "box_track_every_5_frames": track,
        }


@dataclass
class Scene:
    seed: int
    frames: int
    appearances: list[Appearance]
    enrolled: dict[str, list[str]]   # identity -> enrollment pictures
    distractors: dict[str, str]      # identity -> its one enrollment picture (never in the video)
    background: np.ndarray = field(repr=False, default_factory=lambda: np.zeros((1, 1, 3), np.uint8))
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.frames / FPS

    def active(self, frame: int) -> list[Appearance]:
        return [a for a in self.appearances if a.start <= frame < a.end]


def _background(rng: np.random.Generator) -> np.ndarray:
    """A still room: a wall gradient, a floor, a door and windows, some texture (RGB)."""
    y = np.linspace(0, 1, HEIGHT)[:, None, None]
    top, bottom = rng.uniform(60, 110, 3), rng.uniform(120, 170, 3)
    image = (top * (1 - y) + bottom * y) * np.ones((1, WIDTH, 1))
    floor = int(HEIGHT * rng.uniform(0.72, 0.8))
    image[floor:] = rng.uniform(50, 90, 3)
    for _ in range(4):
        w, h = int(rng.uniform(50, 140)), int(rng.uniform(60, 200))
        x, yy = int(rng.uniform(0, WIDTH - w)), int(rng.uniform(0, floor - h))
        image[yy: yy + h, x: x + w] = rng.uniform(40, 200, 3)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _feather(w: int, h: int, edge: float = 0.08) -> np.ndarray:
    """An alpha mask for a patch: 1 inside, ramping to 0 over the border (no hard rectangle)."""
    ys = np.minimum(np.arange(h), np.arange(h)[::-1]) / max(1.0, edge * h)
    xs = np.minimum(np.arange(w), np.arange(w)[::-1]) / max(1.0, edge * w)
    return np.clip(np.minimum(ys[:, None], xs[None, :]), 0, 1).astype(np.float32)


def _read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _face_in_crop(detector: Any, picture: Path) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
    """The pasted crop of an LFW picture and its one face's box, or None when that crop does not
    show exactly one clearly detected, roughly frontal face (a poor picture for a ground truth)."""
    from facelink.edge.quality import pose_angles

    image = _read_rgb(picture)
    x, y, w, h = CROP
    crop = np.ascontiguousarray(image[y: y + h, x: x + w])
    faces = detector.detect(crop)
    if len(faces) != 1 or faces[0].score < 0.85:
        return None
    yaw, _, eyes = pose_angles(faces[0].landmarks)
    if abs(yaw) > 0.2 or eyes < 30:
        return None
    bx, by, bw, bh = (float(v) for v in faces[0].box)
    return crop, (bx, by, bw, bh)


def _has_face(detector: Any, picture: Path) -> bool:
    return any(d.score >= 0.8 for d in detector.detect(_read_rgb(picture)))


# Segments of the scene, cycled until the video is full: (kinds, strangers) per segment; a
# segment with two kinds is two people at once (left and right halves of the frame).
PATTERN: list[tuple[tuple[str, ...], tuple[bool, ...]]] = [
    (("walk", "approach"), (False, True)),
    (("walk",), (False,)),
    (("gap",), ()),
    (("approach",), (False,)),
    (("small",), (False,)),
    (("blurred",), (False,)),
    (("walk",), (True,)),
    (("recede",), (False,)),
    (("focus",), (False,)),
    (("walk", "recede"), (False, False)),
    (("small",), (True,)),
]


def _motion(kind: str, rng: np.random.Generator, half: int | None) -> dict[str, Any]:
    """Duration (s), scale from/to, patch path, blur for one appearance of `kind`; `half` 0/1
    keeps it to the left/right part of the frame (two people at once)."""
    lo, hi = (0, WIDTH) if half is None else ((0, WIDTH // 2 - 20) if half == 0 else (WIDTH // 2 + 20, WIDTH))
    cw, ch = CROP[2], CROP[3]
    spec: dict[str, Any] = {"blur": 0.0, "blur_part": 0.0}
    if kind == "walk":
        s = rng.uniform(0.8, 1.0) if half is None else rng.uniform(0.7, 0.85)
        spec["scale"] = (s, s * rng.uniform(0.9, 1.1))
        pw = cw * s
        y = rng.uniform(50, HEIGHT - ch * s - 80)
        a, b = lo - 0.55 * pw, hi - 0.45 * pw  # enters and leaves through the frame's edge
        if half == 1:
            a = lo  # the right lane comes from the right edge and leaves towards the middle
        if half == 0:
            b = hi - pw
        spec["path"] = (a, y, b, y + rng.uniform(-20, 20)) if rng.random() < 0.5 or half == 0 else (b, y, a, y)
        spec["seconds"] = rng.uniform(3.5, 5.0)
    elif kind in ("approach", "recede"):
        small, large = rng.uniform(0.4, 0.5), rng.uniform(1.05, 1.25) if half is None else rng.uniform(0.85, 0.95)
        spec["scale"] = (small, large) if kind == "approach" else (large, small)
        cx = rng.uniform(lo + cw * large / 2, hi - cw * large / 2)
        cy = rng.uniform(HEIGHT * 0.35, HEIGHT * 0.5)
        (s0, s1), drift = spec["scale"], rng.uniform(-30, 30)
        spec["path"] = (cx - cw * s0 / 2, cy - ch * s0 / 2, cx + drift - cw * s1 / 2, cy - ch * s1 / 2)
        spec["seconds"] = rng.uniform(4.0, 6.0)
    elif kind == "small":
        s = rng.uniform(0.42, 0.48)
        spec["scale"] = (s, s)
        x = rng.uniform(lo + 60, hi - 60 - cw * s)
        y = rng.uniform(60, HEIGHT * 0.6)
        spec["path"] = (x, y, x + rng.uniform(-50, 50), y + rng.uniform(-10, 10))
        spec["seconds"] = rng.uniform(3.5, 5.0)
    elif kind in ("blurred", "focus"):
        s = rng.uniform(0.7, 0.9)
        spec["scale"] = (s, s * rng.uniform(0.95, 1.1))
        x = rng.uniform(lo + 40, hi - 40 - cw * s * 1.1)
        y = rng.uniform(40, HEIGHT * 0.5)
        spec["path"] = (x, y, x + rng.uniform(-60, 60), y + rng.uniform(-15, 15))
        spec["blur"] = rng.uniform(2.2, 2.8) if kind == "blurred" else 3.0
        spec["blur_part"] = 1.0 if kind == "blurred" else 0.4
        spec["seconds"] = rng.uniform(4.0, 5.5)
    else:
        raise ValueError(kind)
    return spec


def build_scene(seconds: float, seed: int, data: str | None, distractors: int) -> Scene:
    """The ground truth: who appears when and where, and the pictures to paste (module docstring)."""
    from facelink.datasets import LFW
    from facelink.runtime.detection import create_detector

    rng = np.random.default_rng(seed)
    people = LFW.locate(data, download=False).people()
    names = sorted(people)
    order = [names[i] for i in rng.permutation(len(names))]
    detector = create_detector()
    used: set[str] = set()

    def pick(stranger: bool) -> tuple[str, Path, np.ndarray, tuple[float, float, float, float]]:
        """The next person of `order` with a good picture to paste: enrolled people need two more
        pictures than the pasted one (their enrollment pictures)."""
        for name in order:
            paths = people[name]
            if name in used or len(paths) < (1 if stranger else 3):
                continue
            candidates = paths if stranger else paths[2:]
            if not stranger and not all(_has_face(detector, p) for p in paths[:2]):
                used.add(name)  # an enrollment picture without a clear face: not a person to enroll
                continue
            for path in candidates[:4]:
                found = _face_in_crop(detector, path)
                if found is not None:
                    used.add(name)
                    return name, path, *found
            used.add(name)  # no usable picture: never again
        raise RuntimeError("LFW has no more usable people")

    total = int(round(seconds * FPS))
    appearances: list[Appearance] = []
    patches: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    cursor = 0.6  # seconds: an empty first stretch
    step = 0
    while True:
        kinds, strangers = PATTERN[step % len(PATTERN)]
        step += 1
        if kinds == ("gap",):
            cursor += rng.uniform(4.0, 6.0)
            continue
        specs = [_motion(k, rng, None if len(kinds) == 1 else i) for i, k in enumerate(kinds)]
        offsets = [0.0] + [rng.uniform(1.0, 1.8) for _ in kinds[1:]]
        end_s = cursor + max(o + s["seconds"] for o, s in zip(offsets, specs))
        if end_s > seconds - 0.8:
            break
        for lane, (kind, stranger, spec, offset) in enumerate(zip(kinds, strangers, specs, offsets)):
            name, path, crop, box = pick(stranger)
            start = int(round((cursor + offset) * FPS))
            end = min(total, start + int(round(spec["seconds"] * FPS)))
            a = Appearance(
                id=len(appearances), person=name, stranger=stranger, picture=f"{path.parent.name}/{path.name}",
                kind=kind, start=start, end=end, lane=lane, blur=round(spec["blur"], 2),
                blur_until=int(round(spec["blur_part"] * (end - start))),
                scale=tuple(round(v, 3) for v in spec["scale"]), path=tuple(round(v, 1) for v in spec["path"]),
                face_box=box,
            )
            patches[a.id] = (crop, _feather(crop.shape[1], crop.shape[0]))
            appearances.append(a)
        cursor = end_s + rng.uniform(1.2, 3.0)
    enrolled = {a.person: [str(p) for p in people[a.person][:2]] for a in appearances if not a.stranger}
    in_video = {a.person for a in appearances}
    spare = [n for n in order if n not in used and n not in in_video]
    distractor_names = [n for n in spare[: distractors * 2] if _has_face(detector, people[n][0])][:distractors]
    scene = Scene(
        seed=seed, frames=total, appearances=appearances, enrolled=enrolled,
        distractors={n: str(people[n][0]) for n in distractor_names},
        background=_background(rng), patches=patches,
    )
    for a in appearances:  # the boxes, once, so the video and the evaluation agree
        for frame in range(a.start, a.end):
            placed = _placement(a, frame)
            if placed is not None:
                a.boxes[frame] = placed[3]
    return scene


def _placement(a: Appearance, frame: int) -> tuple[float, float, float, tuple[float, float, float, float]] | None:
    """(x, y, scale, face box clipped to the frame) of appearance `a` at `frame`; None when its
    face is out of the frame."""
    n = max(1, a.end - a.start - 1)
    u = (frame - a.start) / n
    s = a.scale[0] + (a.scale[1] - a.scale[0]) * u
    x = a.path[0] + (a.path[2] - a.path[0]) * u
    y = a.path[1] + (a.path[3] - a.path[1]) * u
    bx, by, bw, bh = a.face_box
    x0, y0 = x + bx * s, y + by * s
    x1, y1 = x0 + bw * s, y0 + bh * s
    cx0, cy0, cx1, cy1 = max(0.0, x0), max(0.0, y0), min(float(WIDTH), x1), min(float(HEIGHT), y1)
    if cx1 - cx0 < 2 or cy1 - cy0 < 2:
        return None
    return x, y, s, (cx0, cy0, cx1 - cx0, cy1 - cy0)


def render(scene: Scene, frame: int) -> np.ndarray:
    """Frame `frame` of the video (RGB)."""
    image = scene.background.astype(np.float32)
    for a in scene.active(frame):
        placed = _placement(a, frame)
        if placed is None:
            continue
        x, y, s, _ = placed
        crop, alpha = scene.patches[a.id]
        w, h = max(2, int(round(crop.shape[1] * s))), max(2, int(round(crop.shape[0] * s)))
        interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
        patch = cv2.resize(crop, (w, h), interpolation=interpolation).astype(np.float32)
        if a.blur and frame - a.start < a.blur_until:
            patch = cv2.GaussianBlur(patch, (0, 0), a.blur)
        mask = cv2.resize(alpha, (w, h), interpolation=cv2.INTER_LINEAR)[..., None]
        ix, iy = int(round(x)), int(round(y))
        fx0, fy0, fx1, fy1 = max(0, ix), max(0, iy), min(WIDTH, ix + w), min(HEIGHT, iy + h)
        if fx1 <= fx0 or fy1 <= fy0:
            continue
        px0, py0 = fx0 - ix, fy0 - iy
        part = patch[py0: py0 + fy1 - fy0, px0: px0 + fx1 - fx0]
        m = mask[py0: py0 + fy1 - fy0, px0: px0 + fx1 - fx0]
        image[fy0:fy1, fx0:fx1] = image[fy0:fy1, fx0:fx1] * (1 - m) + part * m
    return np.clip(image, 0, 255).astype(np.uint8)


def write_video(scene: Scene, path: Path) -> None:
    """The scene as an MJPG AVI at 25 fps (cv2.VideoWriter)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    if not writer.isOpened():
        raise RuntimeError("this OpenCV build cannot write MJPG/AVI (cv2.VideoWriter)")
    try:
        for frame in range(scene.frames):
            writer.write(cv2.cvtColor(render(scene, frame), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


# -- a live camera playing the video -------------------------------------------------------------------
class PacedVideo(FrameSource):
    """A live camera whose picture is the video: frame k is there at t0 + k / fps (wall clock),
    stamped with that time, whether anybody reads it or not. A reader that is late gets the frame
    of *now* (the ones in between are gone, as with a camera); the edge's capture thread
    (edge/live.py) then hands its loop only the newest. `outage` = (from_s, to_s) in video time:
    the stream ends at from_s and cannot be opened again before to_s (a camera that lost power or
    its network); `finished` is set once the video's last frame was delivered."""

    live = True

    def __init__(self, path: Path, frames: int, outage: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.path = path
        self.frames = frames
        self.outage = outage
        self.description = f"paced camera ({path.name}, {FPS:g} fps)"
        self.t0: float | None = None
        self.finished = threading.Event()
        self.delivered = 0
        self.skipped_frames = 0       # frames of the video nobody read (the camera moved on)
        self.outage_frames = 0        # frames the camera did not send (the outage)
        self.opens = 0
        self.failed_opens = 0
        self.first_after_outage: int | None = None
        self._cap: cv2.VideoCapture | None = None
        self._position = 0            # the capture's next frame
        self._last: np.ndarray | None = None

    def start(self, t0: float) -> None:
        self.t0 = t0

    def _now_frame(self) -> int:
        assert self.t0 is not None
        return int(math.floor((time.time() - self.t0) * FPS))

    def _in_outage(self, frame: int) -> bool:
        return self.outage is not None and self.outage[0] * FPS <= frame < self.outage[1] * FPS

    def _frames(self) -> Iterator[Frame]:
        if self.t0 is None:
            self.t0 = time.time()
        if self._in_outage(max(0, self._now_frame())):
            self.failed_opens += 1
            raise SourceError(f"{self.description}: unreachable (outage)")
        self.opens += 1
        if self._cap is None:
            self._cap = cv2.VideoCapture(str(self.path))
            self._position = 0
            if not self._cap.isOpened():
                raise SourceError(f"cannot open {self.path}")
        reconnected = self.opens > 1
        while True:
            now = self._now_frame()
            if now < self._position:  # early: wait for the frame's time
                time.sleep(max(0.0, self.t0 + self._position / FPS - time.time()))
                continue
            target = now
            if target >= self.frames:
                # The video is over; the camera still looks at the empty room until it is closed
                # (a live feed never ends by itself: the benchmark stops the edge).
                self.finished.set()
                if self._last is None:
                    return
                yield Frame(image=self._last, index=target, timestamp_us=int((self.t0 + target / FPS) * 1e6),
                            name=f"frame-{target:06d}")
                self._position = target + 1
                continue
            if self._in_outage(target):
                return  # the stream is lost: the edge must reconnect by itself
            gap = target - self._position
            if gap:
                outage = sum(1 for f in range(self._position, target) if self._in_outage(f))
                self.outage_frames += outage
                self.skipped_frames += gap - outage
                if gap > 10:  # MJPG frames are all key frames: seeking is exact
                    self._cap.set(cv2.CAP_PROP_POS_FRAMES, target)
                else:
                    for _ in range(gap):
                        self._cap.grab()
                self._position = target
            ok, image = self._cap.read()
            self._position += 1
            if not ok:
                self.finished.set()
                return
            if reconnected and self.first_after_outage is None:
                self.first_after_outage = target
            self.delivered += 1
            self._last = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
            yield Frame(image=self._last, index=target,
                        timestamp_us=int((self.t0 + target / FPS) * 1e6), name=f"frame-{target:06d}")

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


# -- the cloud ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cloud:
    """`facelink cloud serve` in its own process on a fixed port; can be killed and started again."""

    def __init__(self, gallery_dir: Path, port: int | None = None) -> None:
        self.gallery_dir = gallery_dir
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = gallery_dir.parent / "cloud.log"

    def start(self, timeout: float = 180.0) -> float:
        """Start it and wait until it serves; returns the seconds that took."""
        started = time.monotonic()
        command = [sys.executable, "-m", "facelink.cli", "cloud", "serve", "--gallery", str(self.gallery_dir),
                   "--port", str(self.port)]
        log_file = open(self.log_path, "a")  # noqa: SIM115 - the process owns it
        self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, text=True)
        log_file.close()
        self._wait_ready(timeout)
        return time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"the cloud exited: {self.log_path.read_text()[-2000:]}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError(f"the cloud did not start within {timeout:g} s")

    def kill(self) -> None:
        """A crash or a power cut: SIGKILL, nothing drained."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


def enroll(cloud: Cloud, token: str, scene: Scene) -> tuple[int, list[str]]:
    """Enroll the scene's people (two other pictures each) and the distractors through the Gallery
    service; returns the templates added and the identities that got none (with why)."""
    import grpc
    from pydantic import SecretStr

    from facelink.transport import ClientSecurity, client_channel
    from facelink.v1 import common_pb2, gallery_pb2, gallery_pb2_grpc

    templates, failed = 0, []
    people = [(name, paths) for name, paths in scene.enrolled.items()]
    people += [(name, [path]) for name, path in scene.distractors.items()]
    with client_channel(cloud.address, ClientSecurity(token=SecretStr(token))) as channel:
        stub = gallery_pb2_grpc.GalleryStub(channel)
        for name, paths in people:
            images = [gallery_pb2.EnrollImage(image=common_pb2.Image(format=common_pb2.IMAGE_FORMAT_JPEG,
                                                                     data=Path(p).read_bytes())) for p in paths]
            try:
                added = stub.Enroll(gallery_pb2.EnrollRequest(identity=name, images=images), timeout=120).templates_added
            except grpc.RpcError as error:
                added, why = 0, f"{error.code().name}: {error.details()}"
            else:
                why = "no face found"
            templates += added
            if not added:
                failed.append(f"{name} ({why})")
    return templates, failed


# -- one run of the edge ---------------------------------------------------------------------------------
@dataclass
class ShotSeen:
    frame: int
    track: int
    box: tuple[float, float, float, float]
    quality: float
    t_ref: float       # the frame's capture time (live) or when the edge read it (file), epoch s


@dataclass
class ShotSent:
    frame: int
    track: int
    wire_bytes: int
    payload_bytes: int
    quality: float


@dataclass
class RunRecord:
    mode: str
    policy: str
    label: str
    shots: list[ShotSeen] = field(default_factory=list)
    sent: list[ShotSent] = field(default_factory=list)
    events: list[tuple[float, Any]] = field(default_factory=list)   # (wall time, TrackEvent)
    frame_read: list[tuple[float, int]] = field(default_factory=list)  # (wall time, frame) as the edge read them
    lags: list[float] = field(default_factory=list)
    answers: int = 0
    rejected: int = 0
    stats: Any = None
    cpu_s: float = 0.0
    wall_s: float = 0.0
    t0: float = 0.0               # live: the camera's wall clock at frame 0
    source: Any = None
    outage: dict[str, Any] | None = None


def _recording_pipeline(config: Any, record: RunRecord, live: bool) -> Any:
    from facelink.edge.pipeline import EdgePipeline

    class RecordingPipeline(EdgePipeline):
        """The edge's pipeline, unchanged, noting each frame's faces and each shot sent."""

        def shots(self, frame: Any, tracker: Any = None, faces: str | None = None) -> list[Any]:
            read = time.time()
            found = super().shots(frame, tracker, faces)
            t_ref = frame.timestamp_us / 1e6 if live else read
            record.frame_read.append((read, frame.index))
            if live:
                record.lags.append(read - t_ref)
            record.shots += [ShotSeen(frame.index, s.track_id, s.box, s.quality.score, t_ref) for s in found]
            return found

        def observe(self, shot: Any, *, camera_id: str | None = None) -> Any:
            face = super().observe(shot, camera_id=camera_id)
            o = face.observation
            record.sent.append(ShotSent(shot.frame.index, shot.track_id, o.ByteSize(),
                                        len(o.face.data or o.embedding.data), shot.quality.score))
            return face

    return RecordingPipeline(config)


def run_edge_once(
    scene: Scene, video: Path, cloud: Cloud, token: str, mode: str, policy: str, codec: str,
    camera_outage: tuple[float, float] | None = None, cloud_outage: tuple[float, float] | None = None,
    label: str | None = None,
) -> RunRecord:
    """One run of the edge loop over the video (file, or the paced live camera) against `cloud`."""
    from pydantic import SecretStr

    from facelink.config import EdgeConfig, StreamConfig, TrackPolicy
    from facelink.edge.run import CameraInput, StopSignal, run_cameras
    from facelink.edge.sources import open_source
    from facelink.transport import ClientSecurity
    from facelink.v1 import recognition_pb2

    label = label or f"{mode}-{policy}"
    record = RunRecord(mode, policy, label)
    live = mode == "live"
    config = EdgeConfig(
        codec=codec,
        stream=StreamConfig(server=cloud.address, camera_id=label, security=ClientSecurity(token=SecretStr(token)),
                            overflow="drop_oldest" if live else "block"),
        tracks=TrackPolicy(send=policy),
    )
    pipeline = _recording_pipeline(config, record, live)
    stop = StopSignal()

    def on_event(event: Any) -> None:
        record.events.append((time.time(), event))

    def on_result(result: Any, face: Any, ms: float) -> None:
        record.answers += 1
        record.rejected += result.decision == recognition_pb2.DECISION_REJECTED

    watchers: list[threading.Thread] = []
    if live:
        source = PacedVideo(video, scene.frames, camera_outage)
        record.t0 = time.time() + 1.0  # the camera starts a second from now (the loop is ready by then)
        source.start(record.t0)

        def end_when_finished() -> None:  # a live feed never ends by itself: stop once the video is over
            while not source.finished.wait(0.2):
                if stop.is_set():
                    return
            time.sleep(0.5)
            stop.set()

        watchers.append(threading.Thread(target=end_when_finished, daemon=True))
        if cloud_outage is not None:
            outage: dict[str, Any] = {"kind": "cloud", "planned_s": list(cloud_outage)}
            record.outage = outage

            def cloud_down_and_up() -> None:
                time.sleep(max(0.0, record.t0 + cloud_outage[0] - time.time()))
                cloud.kill()
                outage["killed_at_s"] = round(time.time() - record.t0, 2)
                time.sleep(max(0.0, record.t0 + cloud_outage[1] - time.time()))
                outage["restart_s"] = round(cloud.start(), 2)
                outage["serving_again_at_s"] = round(time.time() - record.t0, 2)

            watchers.append(threading.Thread(target=cloud_down_and_up, daemon=True))
        if camera_outage is not None:
            record.outage = {"kind": "camera", "planned_s": list(camera_outage)}
    else:
        source = open_source(video)
    record.source = source
    cpu0, wall0 = time.process_time(), time.time()
    for w in watchers:
        w.start()
    try:
        record.stats = run_cameras([CameraInput(label, source)], config, on_result, pipeline=pipeline, stop=stop,
                                   on_event=on_event, progress=False)
    finally:
        stop.set()
        source.close()
    record.cpu_s = time.process_time() - cpu0
    record.wall_s = time.time() - wall0
    for w in watchers:
        w.join(300)
    if not live:
        record.t0 = record.frame_read[0][0] if record.frame_read else wall0
    return record


# -- evaluation ---------------------------------------------------------------------------------------------
def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def assign_tracks(scene: Scene, shots: list[ShotSeen]) -> dict[int, int | None]:
    """Edge track -> the appearance its boxes overlap most often (None: spurious)."""
    votes: dict[int, Counter] = defaultdict(Counter)
    for s in shots:
        best, best_iou = None, IOU_MATCH
        for a in scene.active(s.frame):
            box = a.boxes.get(s.frame)
            if box is not None and (v := _iou(s.box, box)) >= best_iou:
                best, best_iou = a.id, v
        votes[s.track][best] += 1
    out: dict[int, int | None] = {}
    for track, counter in votes.items():
        (winner, n), = counter.most_common(1)
        if winner is None and len(counter) > 1:
            # A track mostly unmatched (partly out of the frame) but overlapping one appearance.
            second = [k for k, _ in counter.most_common() if k is not None][0]
            winner = second if counter[second] >= max(3, n // 4) else None
        out[track] = winner
    return out


def evaluate(scene: Scene, record: RunRecord, min_quality: float) -> dict[str, Any]:
    """Per appearance and overall: outcome, observations, bytes, time to a decision (module docstring)."""
    owner = assign_tracks(scene, record.shots)
    tracks_of: dict[int, list[int]] = defaultdict(list)
    for track, a in owner.items():
        if a is not None:
            tracks_of[a].append(track)
    first_gated: dict[int, ShotSeen] = {}
    for s in record.shots:
        if s.quality >= min_quality and s.track not in first_gated:
            first_gated[s.track] = s
    sent_by_track: dict[int, list[ShotSent]] = defaultdict(list)
    for s in record.sent:
        sent_by_track[s.track].append(s)
    first_decision: dict[int, tuple[float, Any]] = {}
    final: dict[int, Any] = {}
    for wall, event in record.events:
        if event.type == "decision" and event.track not in first_decision:
            first_decision[event.track] = (wall, event)
        # A track's final decision is its track_ended event's (else its latest, should none come).
        if event.type == "track_ended" or getattr(final.get(event.track), "type", None) != "track_ended":
            final[event.track] = event
    frames_read = sorted(record.frame_read)
    read_walls = [w for w, _ in frames_read]

    def video_time_at(wall: float) -> float:
        """Where in the video the edge was when `wall` came (live: the camera's clock)."""
        if record.mode == "live":
            return wall - record.t0
        i = bisect.bisect_right(read_walls, wall) - 1
        return frames_read[max(0, i)][1] / FPS if frames_read else 0.0

    rows = []
    for a in scene.appearances:
        tracks = sorted(tracks_of.get(a.id, []))
        seen_frames = sorted({s.frame for s in record.shots if owner.get(s.track) == a.id})
        decisions = [final[t] for t in tracks if t in final]
        matched = [e.identity for e in decisions if e.decision == "match"]
        if a.stranger:
            outcome = "stranger_matched" if matched else ("unknown" if decisions else "undecided")
        elif any(m != a.person for m in matched):
            outcome = "wrong"
        elif matched:
            outcome = "correct"
        else:
            outcome = "unknown" if decisions else "undecided"
        gated = [first_gated[t] for t in tracks if t in first_gated]
        first_shot = min(gated, key=lambda s: s.t_ref) if gated else None
        decided = [first_decision[t] for t in tracks if t in first_decision]
        first = min(decided, key=lambda d: d[0]) if decided else None
        to_decision = (first[0] - first_shot.t_ref) if first and first_shot else None
        right_at = None  # when its decision first became the right one (a match of the person; a stranger: UNKNOWN)
        want = "unknown" if a.stranger else "match"
        for wall, event in record.events:
            if event.track in tracks and event.decision == want and (a.stranger or event.identity == a.person):
                right_at = wall
                break
        sent = [s for t in tracks for s in sent_by_track.get(t, [])]
        rows.append({
            "appearance": a.id, "person": None if a.stranger else a.person, "stranger": a.stranger, "kind": a.kind,
            "frames": [a.start, a.end], "frames_seen": len(seen_frames), "tracks": len(tracks),
            "outcome": outcome, "identities": sorted(set(matched)),
            "observations": len(sent), "wire_bytes": sum(s.wire_bytes for s in sent),
            "first_recognisable_frame": first_shot.frame if first_shot else None,
            "time_to_decision_s": round(to_decision, 3) if to_decision is not None else None,
            "time_to_right_decision_s": round(right_at - first_shot.t_ref, 3) if right_at and first_shot else None,
            "decided_at_video_s": round(video_time_at(first[0]), 2) if first else None,
            "first_decision": first[1].decision if first else None,
        })
    spurious = [t for t, a in owner.items() if a is None]
    spurious_matched = sum(1 for t in spurious if t in final and final[t].decision == "match")
    return {"appearances": rows, "spurious_tracks": len(spurious), "spurious_matched": spurious_matched,
            "owner": owner, "video_time_at": video_time_at}


def summarise(scene: Scene, record: RunRecord, evaluation: dict[str, Any]) -> dict[str, Any]:
    # A camera outage hides the appearances inside it: they are not the edge's to decide.
    rows = [r for r in evaluation["appearances"] if not _in_camera_outage(r, record)]
    n = len(rows)
    enrolled = [r for r in rows if not r["stranger"]]
    strangers = [r for r in rows if r["stranger"]]
    outcomes = Counter(r["outcome"] for r in rows)
    right = outcomes["correct"] + sum(1 for r in strangers if r["outcome"] in ("unknown",))
    observations = len(record.sent)
    wire = sum(s.wire_bytes for s in record.sent)
    times = [r["time_to_decision_s"] for r in rows if r["time_to_decision_s"] is not None]
    gated = [r for r in rows if r["first_recognisable_frame"] is not None]
    right_times = [r["time_to_right_decision_s"] for r in rows
                   if r["time_to_right_decision_s"] is not None and r["outcome"] in ("correct", "unknown")
                   and (r["stranger"] or r["outcome"] == "correct")]
    stats = record.stats
    camera = stats.cameras[0]
    frames = camera.frames
    stream = stats.stream
    out = {
        "run": record.label, "mode": record.mode, "policy": record.policy,
        "appearances": n, "enrolled_appearances": len(enrolled), "stranger_appearances": len(strangers),
        "right": right, "accuracy": round(right / n, 4) if n else None,
        "correct": outcomes["correct"], "wrong": outcomes["wrong"],
        "unknown": sum(1 for r in enrolled if r["outcome"] == "unknown"),
        "undecided": sum(1 for r in enrolled if r["outcome"] == "undecided"),
        "strangers_matched": outcomes["stranger_matched"],
        "strangers_undecided": sum(1 for r in strangers if r["outcome"] == "undecided"),
        "spurious_tracks": evaluation["spurious_tracks"], "spurious_matched": evaluation["spurious_matched"],
        "tracks_per_appearance": round(sum(r["tracks"] for r in rows) / n, 2) if n else None,
        "observations": observations,
        "observations_per_appearance": round(sum(r["observations"] for r in rows) / n, 2) if n else None,
        "observations_per_s": round(observations / scene.seconds, 2),
        "wire_bytes_per_appearance": round(sum(r["wire_bytes"] for r in rows) / n, 1) if n else None,
        "wire_bytes_per_s": round(wire / scene.seconds, 1),
        "payload_bytes_mean": round(float(np.mean([s.payload_bytes for s in record.sent])), 1)
        if record.sent else None,
        "decided_with_recognisable_shot": f"{len(times)}/{len(gated)}",
        "time_to_decision_s_median": round(float(np.median(times)), 3) if times else None,
        "time_to_decision_s_max": round(max(times), 3) if times else None,
        "time_to_right_decision_s_max": round(max(right_times), 3) if right_times else None,
        "decided_within_1s": sum(1 for t in times if t <= DECISION_TARGET_S),
        "frames_processed": frames,
        "edge_cpu_ms_per_frame": round(record.cpu_s / frames * 1e3, 2) if frames else None,
        "edge_cpu_cores": round(record.cpu_s / record.wall_s, 2) if record.wall_s else None,
        "wall_s": round(record.wall_s, 1),
        "answers": record.answers, "rejected": record.rejected,
        "stream": {"submitted": stream.submitted, "answered": stream.answered, "dropped": stream.dropped,
                   "resent": stream.resent, "reconnects": stream.reconnects, "timed_out": stream.timed_out,
                   "unanswered": stream.unanswered, "errors": stream.errors[:3]},
    }
    if record.mode == "live":
        feed = camera.feed
        lags = record.lags
        out.update({
            "lag_s_max": round(camera.lag_s_max, 3), "lag_s_mean": round(camera.lag_s_mean, 3),
            "lag_at_read_s_p99": round(float(np.percentile(lags, 99)), 3) if lags else None,
            "frames_from_camera": feed.frames_read, "stale_frames_dropped": feed.dropped,
            "camera_frames_nobody_read": record.source.skipped_frames,
            "reconnects": feed.reconnects, "failed_opens": feed.failed_opens,
        })
    if record.outage:
        out["outage"] = outage_verdict(record, rows, out)
    return out


def _in_camera_outage(row: dict[str, Any], record: RunRecord) -> bool:
    """An appearance the camera could not show (mostly inside the camera outage)."""
    if not record.outage or record.outage["kind"] != "camera":
        return False
    a0, a1 = row["frames"]
    o0, o1 = (v * FPS for v in record.outage["planned_s"])
    inside = max(0.0, min(a1, o1) - max(a0, o0))
    return inside > 0.5 * (a1 - a0)


def outage_verdict(record: RunRecord, rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    outage = dict(record.outage or {})
    stream = summary["stream"]
    seen = [r for r in rows if r["first_recognisable_frame"] is not None]
    lost = [r["appearance"] for r in seen if r["outcome"] == "undecided" or r["time_to_decision_s"] is None]
    if outage["kind"] == "camera":
        source = record.source
        after = source.first_after_outage
        outage.update({
            "edge_reconnects": summary.get("reconnects"), "failed_opens": summary.get("failed_opens"),
            "first_frame_after_outage_s": round(after / FPS, 2) if after is not None else None,
            "back_after_s": round(after / FPS - outage["planned_s"][1], 2) if after is not None else None,
            "appearances_after_outage": sum(1 for r in rows if r["frames"][0] >= outage["planned_s"][1] * FPS),
            "appearances_seen_not_decided": lost,
            # Shown after the camera was back, but the edge had not reconnected yet (its backoff).
            "missed_after_camera_back": [r["appearance"] for r in rows if not r["frames_seen"]
                                         and r["frames"][1] > outage["planned_s"][1] * FPS],
            # Tracks on screen when the camera went: how long after their last frame they ended.
            "track_ended_after_last_seen_s": _ended_delays(record, before=outage["planned_s"][0]),
        })
        outage["pass"] = bool(after is not None and summary.get("reconnects", 0) >= 1 and not lost)
    else:
        late = [r["time_to_decision_s"] for r in seen if r["time_to_decision_s"] is not None]
        outage.update({
            "appearances_seen": len(seen), "appearances_seen_not_decided": lost,
            "dropped": stream["dropped"], "unanswered": stream["unanswered"], "timed_out": stream["timed_out"],
            "stream_reconnects": stream["reconnects"], "resent": stream["resent"],
            "latest_decision_s": round(max(late), 2) if late else None,
        })
        outage["pass"] = not lost and stream["dropped"] == 0 and stream["unanswered"] == 0 and stream["timed_out"] == 0
    return outage


def _ended_delays(record: RunRecord, before: float) -> list[float]:
    """Live: for each track last seen within 3 s before `before` (video s), the seconds from its
    last frame to its track_ended event."""
    last: dict[int, int] = {}
    for shot in record.shots:
        last[shot.track] = max(last.get(shot.track, 0), shot.frame)
    out = []
    for wall, event in record.events:
        frame = last.get(event.track)
        if event.type == "track_ended" and frame is not None and before - 3.0 <= frame / FPS <= before:
            out.append(round(wall - record.t0 - frame / FPS, 2))
    return out


def _gated(run: dict[str, Any]) -> int:
    """Appearances with a recognisable shot (the denominator of 'decided within 1 s')."""
    return int(run["decided_with_recognisable_shot"].split("/")[1])


def targets(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, per way of playing the video (file, live)."""
    verdicts: dict[str, Any] = {}
    by = {(r["mode"], r["policy"]): r for r in runs if "outage" not in r}
    for mode in MODES:
        every, best = by.get((mode, "every")), by.get((mode, "best"))
        if not (every and best):
            continue
        reduction = (every["observations_per_appearance"] / best["observations_per_appearance"]
                     if best["observations_per_appearance"] else math.inf)
        v = {
            "observation_reduction_vs_every": round(reduction, 1),
            "reduction_at_least_50x": reduction >= REDUCTION_TARGET,
            "accuracy_best_vs_every": [best["right"], every["right"], best["appearances"]],
            "accuracy_equal_or_better": best["right"] >= every["right"],
            "strangers_matched_best": best["strangers_matched"],
            "no_stranger_matched": best["strangers_matched"] == 0,
            "decided_within_1s_best": f"{best['decided_within_1s']}/{_gated(best)}",
            "every_appearance_within_1s": best["time_to_decision_s_max"] is not None
            and best["time_to_decision_s_max"] <= DECISION_TARGET_S
            and best["decided_within_1s"] == _gated(best),
        }
        if mode == "live":
            v["lag_s_max_best"] = best["lag_s_max"]
            v["lag_under_1s"] = best["lag_s_max"] < LAG_TARGET_S
        verdicts[mode] = v
    for r in runs:
        if "outage" in r:
            outage = r["outage"]
            verdicts[f"{outage['kind']}_outage"] = {"pass": outage["pass"], "seconds": outage["planned_s"]}
    return verdicts


# -- the timeline ------------------------------------------------------------------------------------------
def plot_timeline(scene: Scene, records: list[RunRecord], evaluations: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    panels = 1 + len(records)
    fig, axes = plt.subplots(panels, 1, figsize=(16, 1.15 * panels + 1.2), sharex=True)
    axes = np.atleast_1d(axes)
    colours = {"correct": "#2ca02c", "wrong": "#d62728", "stranger_matched": "#d62728", "unknown": "#ff7f0e",
               "undecided": "#bbbbbb", "right_unknown": "#1f77b4"}
    ax = axes[0]
    for a in scene.appearances:
        colour = "#7f7f7f" if a.stranger else "#1f77b4"
        ax.broken_barh([(a.start / FPS, a.seconds)], (a.lane - 0.4, 0.8), facecolors=colour, alpha=0.8)
        tag = "stranger" if a.stranger else a.person.split("_")[-1]
        extra = {"small": ", small", "blurred": ", blurred", "focus": ", focusing"}.get(a.kind, "")
        text = f"{a.id}: {tag}{extra}"
        ax.text(a.start / FPS + 0.1, a.lane, text[: max(4, int(a.seconds * 2.6))], va="center", fontsize=6.5,
                color="white", clip_on=True)
        if a.blur_until:
            ax.broken_barh([(a.start / FPS, a.blur_until / FPS)], (a.lane + 0.25, 0.15), facecolors="#dddddd")
    ax.set_ylim(-0.6, 1.6)
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["lane 0", "lane 1"], fontsize=7)
    ax.set_title("ground truth (blue: enrolled person, grey: stranger; light strip: blurred frames)",
                 fontsize=9, loc="left")
    for ax, record, evaluation in zip(axes[1:], records, evaluations):
        owner = evaluation["owner"]
        rows = {r["appearance"]: r for r in evaluation["appearances"]}
        lane = {a.id: a.lane for a in scene.appearances}
        spans: dict[int, list[int]] = defaultdict(list)
        for s in record.shots:
            spans[s.track].append(s.frame)
        for track, frames in spans.items():
            a = owner.get(track)
            y = lane.get(a, 0) if a is not None else 1.45
            outcome = rows[a]["outcome"] if a is not None else "undecided"
            if a is not None and rows[a]["stranger"] and outcome == "unknown":
                outcome = "right_unknown"
            ax.broken_barh([(min(frames) / FPS, (max(frames) - min(frames) + 1) / FPS)], (y - 0.3, 0.6),
                           facecolors=colours[outcome], alpha=0.75)
        sent_x = [s.frame / FPS for s in record.sent]
        sent_y = [lane.get(owner[s.track], 0) if owner.get(s.track) is not None else 1.45 for s in record.sent]
        ax.scatter(sent_x, sent_y, marker="|", s=30, color="black", linewidths=0.6, zorder=3)
        for wall, event in record.events:
            if event.type == "track_ended":
                continue
            a = owner.get(event.track)
            y = lane.get(a, 0) if a is not None else 1.45
            ax.scatter([evaluation["video_time_at"](wall)], [y + 0.35], marker="v", s=22, zorder=4,
                       color="#2ca02c" if event.decision == "match" else "#ff7f0e", edgecolors="black", linewidths=0.4)
        if record.outage:
            o0, o1 = record.outage["planned_s"]
            ax.axvspan(o0, o1, color="#f4cccc", alpha=0.5, zorder=0)
        ax.set_ylim(-0.6, 1.9)
        ax.set_yticks([])
        title = f"{record.label}: {len(record.sent)} observations"
        if record.outage:
            title += f" ({record.outage['kind']} outage shaded)"
        ax.set_title(title, fontsize=8, loc="left")
    axes[-1].set_xlabel("video time (s)")
    axes[-1].set_xlim(0, scene.seconds)
    legend = [Patch(color=colours["correct"], label="track of a person, ended correct"),
              Patch(color=colours["wrong"], label="matched wrongly / stranger matched"),
              Patch(color=colours["unknown"], label="person left unknown"),
              Patch(color=colours["right_unknown"], label="stranger left unknown"),
              Patch(color=colours["undecided"], label="nothing sent (or spurious track, top)"),
              Line2D([], [], color="black", marker="|", linestyle="", label="shot sent"),
              Line2D([], [], color="#2ca02c", marker="v", linestyle="", markeredgecolor="black",
                     label="decision/update arrives (green match, orange unknown) at the video time the edge was at")]
    fig.legend(handles=legend, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the benchmark ---------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    from facelink.cloud.auth import AuthStore
    from facelink.config import TrackPolicy

    started = time.time()
    scene = build_scene(args.seconds, args.seed, args.data, args.distractors)
    print(f"scene: {scene.seconds:.0f} s, {len(scene.appearances)} appearances "
          f"({sum(a.stranger for a in scene.appearances)} strangers), {len(scene.enrolled)} people enrolled "
          f"+ {len(scene.distractors)} distractors", flush=True)
    min_quality = TrackPolicy().min_quality
    records: list[RunRecord] = []
    with tempfile.TemporaryDirectory(prefix="facelink-video-") as tmp:
        video = Path(args.video) if args.video else Path(tmp) / "scene.avi"
        write_video(scene, video)
        gallery_dir = Path(tmp) / "gallery"
        store = AuthStore(gallery_dir / "auth.json")
        admin = store.create_token("bench-enroll", ["enroll"])[1]
        device = store.create_token("bench-camera", ["recognize"])[1]
        cloud = Cloud(gallery_dir)
        try:
            cloud.start()
            templates, enroll_failures = enroll(cloud, admin, scene)
            if enroll_failures:
                print(f"warning: not enrolled: {', '.join(enroll_failures)}", file=sys.stderr)
            for mode, policy in _runs(args):
                record = run_edge_once(scene, video, cloud, device, mode, policy, args.codec)
                records.append(record)
                print(f"  {record.label}: {len(record.sent)} observations, {record.stats.frames} frames in "
                      f"{record.wall_s:.0f} s", flush=True)
            if args.outages:
                span = (args.outage_at, args.outage_at + args.outage_seconds)
                if span[1] + 5 > scene.seconds:
                    raise SystemExit(
                        f"--outage-at + --outage-seconds must end 5 s before the video ({scene.seconds:g} s)")
                for kind in ("camera", "cloud"):
                    record = run_edge_once(scene, video, cloud, device, "live", "best", args.codec,
                                           camera_outage=span if kind == "camera" else None,
                                           cloud_outage=span if kind == "cloud" else None,
                                           label=f"live-best-{kind}-outage")
                    records.append(record)
                    print(f"  {record.label}: {len(record.sent)} observations, {record.stats.frames} frames",
                          flush=True)
        finally:
            cloud.stop()
        video_bytes = video.stat().st_size if video.exists() else 0
    evaluations = [evaluate(scene, r, min_quality) for r in records]
    runs = [summarise(scene, r, e) for r, e in zip(records, evaluations)]
    for summary, evaluation in zip(runs, evaluations):
        summary["per_appearance"] = evaluation["appearances"]
    if args.png:
        plot_timeline(scene, records, evaluations, args.png)
    return {
        "benchmark": "video",
        "command": _command(args),
        "date": reporting.utc_now(),
        "machine": reporting.machine_info(),
        "setup": {
            "seconds": scene.seconds, "fps": FPS, "frame_size": [WIDTH, HEIGHT], "seed": args.seed,
            "video_bytes": video_bytes, "codec": args.codec, "min_quality": min_quality,
            "people_enrolled": len(scene.enrolled), "distractors_enrolled": len(scene.distractors),
            "templates": templates, "not_enrolled": enroll_failures, "appearances": len(scene.appearances),
            "strangers": sum(a.stranger for a in scene.appearances),
            "two_at_once": sum(1 for a in scene.appearances if a.lane == 1),
            "kinds": dict(Counter(a.kind for a in scene.appearances)),
            "outage_seconds": args.outage_seconds if args.outages else None,
            "total_wall_s": round(time.time() - started, 1),
        },
        "ground_truth": [a.summary() for a in scene.appearances],
        "runs": runs,
        "targets": targets(runs),
    }


def _command(args: argparse.Namespace) -> str:
    extra = reporting.bench_argv(args.argv)
    return "facelink bench video" + (f" -- {shlex.join(extra)}" if extra else "")


def _runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(mode, policy) of each run: --runs, else every mode with every policy."""
    if args.runs:
        return [tuple(r.split("-", 1)) for r in args.runs]  # type: ignore[misc]
    return [(mode, policy) for mode in args.modes for policy in args.policies]


def format_report(payload: dict[str, Any]) -> str:
    header = ["run", "right", "correct", "wrong", "unknown", "undecided", "strangers matched", "obs/appearance",
              "obs/s", "bytes/appearance", "bytes/s", "decision s (median/max)", "<= 1 s", "lag s (max)",
              "CPU ms/frame"]
    rows = []
    for r in payload["runs"]:
        rows.append([
            r["run"], f"{r['right']}/{r['appearances']}", f"{r['correct']}/{r['enrolled_appearances']}", str(r["wrong"]),
            str(r["unknown"]), str(r["undecided"]), f"{r['strangers_matched']}/{r['stranger_appearances']}",
            f"{r['observations_per_appearance']:.1f}", f"{r['observations_per_s']:.2f}",
            f"{r['wire_bytes_per_appearance']:.0f}", f"{r['wire_bytes_per_s']:.0f}",
            f"{_num(r['time_to_decision_s_median'])}/{_num(r['time_to_decision_s_max'])}",
            f"{r['decided_within_1s']}/{_gated(r)}",
            _num(r.get("lag_s_max")), f"{r['edge_cpu_ms_per_frame']:.1f}",
        ])
    setup = payload["setup"]
    lines = [
        f"command: {payload['command']}",
        reporting.machine_line(payload["machine"]),
        f"date: {payload['date']}",
        f"video: {setup['seconds']:.0f} s at {setup['fps']:g} fps, {setup['appearances']} appearances "
        f"({setup['strangers']} strangers, {setup['two_at_once']} with two people at once; "
        f"{', '.join(f'{k} {v}' for k, v in setup['kinds'].items())}); {setup['people_enrolled']} people enrolled "
        f"from other pictures + {setup['distractors_enrolled']} distractors; codec {setup['codec']}; seed {setup['seed']}",
        "",
        *reporting.markdown_table(header, rows),
        "",
    ]
    for mode, v in payload["targets"].items():
        if mode.endswith("_outage"):
            continue
        lines.append(
            f"targets ({mode}): best sends {v['observation_reduction_vs_every']:g}x fewer observations per appearance "
            f"than every ({'ok' if v['reduction_at_least_50x'] else 'MISSED'} >= 50x); right "
            f"{v['accuracy_best_vs_every'][0]} vs {v['accuracy_best_vs_every'][1]} of {v['accuracy_best_vs_every'][2]} "
            f"({'ok' if v['accuracy_equal_or_better'] else 'MISSED'}); strangers matched {v['strangers_matched_best']} "
            f"({'ok' if v['no_stranger_matched'] else 'MISSED'}); decided within 1 s {v['decided_within_1s_best']} "
            f"({'ok' if v['every_appearance_within_1s'] else 'MISSED'})"
            + (f"; lag max {v['lag_s_max_best']:.2f} s ({'ok' if v['lag_under_1s'] else 'MISSED'} < 1 s)"
               if "lag_s_max_best" in v else "")
        )
    for r in payload["runs"]:
        o = r.get("outage")
        if not o:
            continue
        if o["kind"] == "camera":
            lines.append(
                f"camera outage {o['planned_s'][0]:g}-{o['planned_s'][1]:g} s: the edge reconnected by itself "
                f"({o['edge_reconnects']} reconnect attempts, {o['failed_opens']} failed opens), frames again from "
                f"{_num(o['first_frame_after_outage_s'])} s ({_num(o['back_after_s'])} s after the camera was back); "
                f"appearances seen but not decided: {o['appearances_seen_not_decided'] or 'none'}, missed after the "
                f"camera was back: {o['missed_after_camera_back'] or 'none'}; tracks on screen when it went ended "
                f"{o['track_ended_after_last_seen_s'] or '-'} s after last seen -> {'PASS' if o['pass'] else 'FAIL'}")
        else:
            lines.append(
                f"cloud outage: killed at {_num(o.get('killed_at_s'))} s, serving again at "
                f"{_num(o.get('serving_again_at_s'))} s (restart {_num(o.get('restart_s'))} s); {o['appearances_seen']} "
                f"appearances seen, not decided: {o['appearances_seen_not_decided'] or 'none'}; dropped {o['dropped']}, "
                f"unanswered {o['unanswered']}, timed out {o['timed_out']}, resent {o['resent']}, latest decision "
                f"{_num(o['latest_decision_s'])} s after its first recognisable shot -> {'PASS' if o['pass'] else 'FAIL'}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facelink bench video", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the video (default 90)")
    parser.add_argument("--seed", type=int, default=0, help="the scene's seed (default 0)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="send policies to run")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="file, live or both")
    parser.add_argument("--runs", nargs="+", choices=[f"{m}-{p}" for m in MODES for p in POLICIES],
                        metavar="MODE-POLICY",
                        help="exactly these runs, e.g. file-every live-best (instead of --modes x --policies)")
    parser.add_argument("--codec", default="learned",
                        help="the edge's payload codec (default learned, the edge's default)")
    parser.add_argument("--distractors", type=int, default=40, help="other LFW people enrolled (default 40)")
    parser.add_argument("--outages", action=argparse.BooleanOptionalAction, default=True,
                        help="live, send=best: a camera outage, then a cloud outage (default on)")
    parser.add_argument("--outage-seconds", type=float, default=30.0, help="length of each outage (default 30)")
    parser.add_argument("--outage-at", type=float, default=12.0, help="video time the outages start (default 12 s)")
    parser.add_argument("--video", help="write the video here (default: a temporary file)")
    parser.add_argument("--data", help="LFW folder (default: ../shared)")
    parser.add_argument("--json", type=Path, default=reporting.RESULTS_DIR / "video.json",
                        help="where to write the results")
    parser.add_argument("--png", type=Path, default=reporting.RESULTS_DIR / "video_timeline.png",
                        help="the timeline (default benchmarks/results/video_timeline.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(reporting.bench_argv(argv))
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    payload = run(args)
    print(format_report(payload))
    reporting.write_results(args.json, payload)
    print(f"wrote {args.json}" + (f" and {args.png}" if args.png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
