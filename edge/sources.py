"""Frame sources for the edge device: image folders, single images, video files, cameras, RTSP.

Everything the rest of the edge pipeline sees is a :class:`Frame` with an **RGB** uint8 image.
OpenCV decodes to BGR; the conversion happens here, once, so no later stage has to guess the
channel order.

Two kinds of sources exist and they must be treated differently downstream:

* file sources (an image folder, an explicit list of images, one image, a video file) are
  ``live = False``: every frame is meant to be processed, a consumer must never drop any;
* live sources (a camera, an RTSP/HTTP stream, a GStreamer pipeline) are ``live = True``: frames
  keep coming whether or not we keep up, so a slow consumer may drop frames to stay current
  (edge/live.py hands over the newest frame from a capture thread, and reopens a lost camera).

Capture times: a video file's frames are stamped with their position in the stream
(``CAP_PROP_POS_MSEC``) from the moment the file was opened, so a track's time is the video's
time however fast the edge decodes it; live frames and pictures with the wall clock at the read.

Use :func:`open_source` rather than the classes directly; it picks the right one from a spec
(a camera index, a URL, a folder or a file) and raises :class:`SourceError` with a hint when
the source cannot be opened.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "NETWORK_SCHEMES",
    "Camera",
    "Frame",
    "FrameSource",
    "GStreamerPipeline",
    "ImageFiles",
    "NetworkStream",
    "SourceError",
    "VideoFile",
    "open_source",
]

logger = logging.getLogger(__name__)

#: File extensions (lower case) that are read as still images; anything else is tried as video.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})

#: URL schemes that are opened as network streams through OpenCV's FFMPEG backend.
NETWORK_SCHEMES: frozenset[str] = frozenset({"rtsp", "rtsps", "http", "https"})

# A network stream that glitches (a lost RTP packet, a server hiccup) usually recovers within a
# second, so a few spaced retries avoid ending a long-running stream on one bad read, while a
# stream that is really gone still ends in about a second rather than hanging forever.
LIVE_READ_RETRIES = 5
LIVE_RETRY_SLEEP_S = 0.2

# Without explicit timeouts FFMPEG waits ~30 s on an unreachable host; a device should say
# "unreachable" much sooner. (Properties accepted by OpenCV >= 4.5.2; others ignore them.)
NETWORK_OPEN_TIMEOUT_MS = 10_000
NETWORK_READ_TIMEOUT_MS = 5_000

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class SourceError(RuntimeError):
    """A source cannot be opened (or used); the message names it and says what to check."""


@dataclass(frozen=True)
class Frame:
    """One image from a source.

    ``image`` is HxWx3 uint8 in **RGB** order. ``index`` is the frame's position in its source
    (the file's position in the sorted folder or list, the frame's position in a video, the
    number of frames read so far from a camera); it strictly increases along one pass but can
    have gaps (``stride``, skipped unreadable images). ``timestamp_us`` is the capture time in
    microseconds since the Unix epoch: the wall clock at the read for live sources and pictures,
    the time the file was opened plus the frame's position in the stream for a video file.
    """

    image: np.ndarray
    index: int
    timestamp_us: int
    name: str
    label: str | None = None


def _now_us() -> int:
    return time.time_ns() // 1000


def _to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR / BGRA / gray (any of which a backend may hand us) -> contiguous HxWx3 RGB."""
    if image.dtype == np.uint16:
        # IMREAD_COLOR already gives 8 bits; this only guards capture backends delivering 16 bits.
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"unexpected image dtype {image.dtype}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)  # alpha dropped
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    raise ValueError(f"unexpected image shape {image.shape}")


def _redact(url: str) -> str:
    """The URL with any password replaced, so camera credentials never reach logs or errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


class FrameSource(ABC):
    """An iterable of :class:`Frame`, with ``stride`` and ``max_frames`` applied.

    Subclasses implement :meth:`_frames` (already honouring ``stride``, because how to skip
    cheaply differs: a folder skips files unread, a video grabs without converting) and
    :meth:`_raw_total`. ``max_frames`` counts *yielded* frames and is applied here, per pass.
    """

    description: str
    live: bool

    def __init__(self, *, max_frames: int | None = None, stride: int = 1) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if max_frames is not None and max_frames < 0:
            raise ValueError(f"max_frames must be >= 0 or None, got {max_frames}")
        self.stride = int(stride)
        self.max_frames = max_frames
        #: Unreadable inputs skipped in the current (or last) pass: images that failed to
        #: decode; for live sources, failed reads (each retry counts).
        self.skipped = 0
        self._closed = False

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def _frames(self) -> Iterator[Frame]:
        """Yield frames for one pass, honouring ``stride`` but not ``max_frames``."""

    def _raw_total(self) -> int | None:
        """Number of underlying frames before stride/max_frames, if known."""
        return None

    def _release(self) -> None:
        """Free OS resources (captures); called once by :meth:`close`."""

    # -- public API ---------------------------------------------------------------------
    @property
    def total(self) -> int | None:
        """How many frames one pass will yield at most, if known (skipped images reduce it)."""
        raw = self._raw_total()
        if raw is None:
            return self.max_frames  # a live source with a cap still has a known upper bound
        n = math.ceil(raw / self.stride)
        return n if self.max_frames is None else min(n, self.max_frames)

    def __len__(self) -> int:
        # len() must return an int; for an unknown length raise TypeError, which is what
        # tools such as tqdm expect from an iterable without a length.
        n = self.total
        if n is None:
            raise TypeError(f"{self.description} has no known length")
        return n

    def __bool__(self) -> bool:
        # Without this, `if source:` would call __len__ (and fail for live sources or be
        # False for an empty pass) -- a source object is always "something".
        return True

    def __iter__(self) -> Iterator[Frame]:
        if self._closed:
            raise SourceError(f"{self.description} is closed")
        self.skipped = 0
        if self.max_frames == 0:
            return
        yielded = 0
        for frame in self._frames():
            yield frame
            yielded += 1
            if self.max_frames is not None and yielded >= self.max_frames:
                return

    def close(self) -> None:
        """Release the underlying capture; idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description!r} live={self.live}>"


# ---------------------------------------------------------------------------------------
# Still images
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ImageEntry:
    path: Path
    name: str
    label: str | None


class ImageFiles(FrameSource):
    """A fixed list of image files (a folder, an explicit list, or one image); ``live = False``.

    Re-iterable: each pass starts again at the first file. An image that cannot be decoded is
    logged and skipped (``skipped += 1``); it never raises and never stops the stream, because
    one bad file in a 13 000-image folder must not abort a run.
    """

    live = False

    def __init__(
        self,
        entries: Sequence[_ImageEntry],
        description: str,
        *,
        max_frames: int | None = None,
        stride: int = 1,
    ) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self._entries = list(entries)
        self.description = description

    @property
    def paths(self) -> list[Path]:
        """The image files, in the order they are streamed (before stride)."""
        return [e.path for e in self._entries]

    def _raw_total(self) -> int:
        return len(self._entries)

    def _frames(self) -> Iterator[Frame]:
        for index in range(0, len(self._entries), self.stride):
            entry = self._entries[index]
            image = cv2.imread(str(entry.path), cv2.IMREAD_COLOR)
            if image is None or image.size == 0:
                self.skipped += 1
                logger.warning("unreadable image skipped: %s", entry.path)
                continue
            yield Frame(
                image=_to_rgb(image),
                index=index,
                timestamp_us=_now_us(),
                name=entry.name,
                label=entry.label,
            )


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _scan_folder(root: Path, recursive: bool) -> list[_ImageEntry]:
    """Image files under ``root``, sorted by path components so the order is deterministic.

    Sorting by components (not by the joined string) keeps each folder's files together:
    ``A/x.jpg`` comes before ``A-B/y.jpg``. Hidden files and folders (``.DS_Store``,
    macOS ``._*`` resource forks) are ignored: they are never photos and would only show up
    as "unreadable". Symlinked folders are followed, once each (guards against loops).
    """
    found: list[tuple[tuple[str, ...], Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        for fn in filenames:
            if fn.startswith("."):
                continue
            path = Path(dirpath) / fn
            if _is_image_file(path):
                found.append((path.relative_to(root).parts, path))
    found.sort(key=lambda item: item[0])
    entries = []
    for parts, path in found:
        # LFW layout: <root>/<person>/<file>; a file directly in root has no label.
        label = parts[-2] if len(parts) >= 2 else None
        entries.append(_ImageEntry(path=path, name="/".join(parts), label=label))
    return entries


def _list_entries(image_list: Sequence[str | os.PathLike[str]], base: Path | None) -> list[_ImageEntry]:
    """Entries for an explicit list; relative items are resolved against ``base`` (a folder)."""
    entries: list[_ImageEntry] = []
    missing: list[str] = []
    for item in image_list:
        path = Path(item).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
        if not path.is_file():
            missing.append(str(path))
            continue
        # The name mirrors a folder source's (<person>/<file>) so results line up with LFW ids.
        try:
            name = path.relative_to(base).as_posix() if base is not None else None
        except ValueError:
            name = None
        if name is None:
            name = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
        entries.append(_ImageEntry(path=path, name=name, label=path.parent.name or None))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise SourceError(f"no such image file: {', '.join(missing[:3])}{more}; check the image list")
    return entries


# ---------------------------------------------------------------------------------------
# OpenCV captures: video files, cameras, network streams
# ---------------------------------------------------------------------------------------
class _CaptureSource(FrameSource):
    """Shared logic for sources backed by ``cv2.VideoCapture``."""

    def __init__(self, *, max_frames: int | None, stride: int) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self._cap: cv2.VideoCapture | None = None

    @abstractmethod
    def _open_capture(self) -> cv2.VideoCapture:
        """Open and return a capture, or raise SourceError with a hint."""

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    @property
    def fps(self) -> float | None:
        """The frame rate the backend reports, if any (often 0 / unreliable for cameras)."""
        if self._cap is None:
            return None
        fps = float(self._cap.get(cv2.CAP_PROP_FPS))
        return fps if math.isfinite(fps) and fps > 0 else None


class VideoFile(_CaptureSource):
    """A video file decoded in order; ``index`` is the frame's position in the file."""

    live = False

    def __init__(self, path: Path, *, max_frames: int | None = None, stride: int = 1) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self.path = path
        self._cap = self._open_capture()
        self._frame_count = self._read_frame_count(self._cap)
        count = f"{self._frame_count} frames" if self._frame_count is not None else "unknown length"
        self.description = f"video file {path} ({count})"
        self._fresh = True  # the capture is at frame 0; after a pass it must be reopened

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open video file {self.path}: the codec or container is not supported by this "
                "OpenCV build (see the Video I/O section of cv2.getBuildInformation()) or the file is damaged"
            )
        return cap

    @staticmethod
    def _read_frame_count(cap: cv2.VideoCapture) -> int | None:
        # Containers without an index report 0 or -1; treat those as unknown, not as empty.
        n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        return int(n) if math.isfinite(n) and n > 0 else None

    def _raw_total(self) -> int | None:
        return self._frame_count

    @staticmethod
    def _position_us(cap: cv2.VideoCapture, position: int, fps: float | None) -> int:
        """The frame just read's time in the stream: the container's timestamp, or position / fps
        where the backend reports none (some give 0 for every frame)."""
        msec = float(cap.get(cv2.CAP_PROP_POS_MSEC))
        if math.isfinite(msec) and (msec > 0 or position == 0):
            return int(msec * 1000)
        return int(position * 1e6 / (fps or 25.0))

    def _frames(self) -> Iterator[Frame]:
        if not self._fresh or self._cap is None:
            # Seeking back (CAP_PROP_POS_FRAMES) is not exact for every codec; reopening is.
            self._release()
            self._cap = self._open_capture()
        self._fresh = False
        cap = self._cap
        position = 0
        opened_us = _now_us()
        fps = self.fps
        while True:
            if position % self.stride != 0:
                # grab() skips the BGR conversion of frames we are not going to keep.
                if not cap.grab():
                    break
                position += 1
                continue
            ok, image = cap.read()
            if not ok or image is None:
                break
            yield Frame(
                image=_to_rgb(image),
                index=position,
                timestamp_us=opened_us + self._position_us(cap, position, fps),
                name=f"frame-{position:06d}",
            )
            position += 1
        if self._frame_count is not None and position < self._frame_count:
            # Some containers overestimate; a real decode error also ends up here.
            logger.debug("%s: decoding ended at frame %d of %d", self.description, position, self._frame_count)


class _LiveSource(_CaptureSource):
    """A camera or network stream: reads until the stream fails for good."""

    live = True

    def __init__(self, *, max_frames: int | None, stride: int) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        # Counts every frame read from the device across passes, so indices keep increasing
        # even if the source is iterated again.
        self._position = 0

    def _read(self, cap: cv2.VideoCapture, keep: bool) -> tuple[bool, np.ndarray | None]:
        """One frame (decoded only if ``keep``), retrying short outages before giving up."""
        for attempt in range(LIVE_READ_RETRIES + 1):
            if keep:
                ok, image = cap.read()
                ok = ok and image is not None
            else:
                ok, image = cap.grab(), None
            if ok:
                return True, image
            self.skipped += 1
            if attempt < LIVE_READ_RETRIES:
                time.sleep(LIVE_RETRY_SLEEP_S)
        logger.warning("%s: no frame after %d retries, ending the stream", self.description, LIVE_READ_RETRIES)
        return False, None

    def _frames(self) -> Iterator[Frame]:
        if self._cap is None:
            self._cap = self._open_capture()
        cap = self._cap
        while True:
            keep = self._position % self.stride == 0
            ok, image = self._read(cap, keep)
            if not ok:
                # Let go of the dead capture: iterating again opens a new one (edge/live.py reconnects so).
                self._release()
                return
            position = self._position
            self._position += 1
            if keep:
                assert image is not None
                yield Frame(
                    image=_to_rgb(image),
                    index=position,
                    timestamp_us=_now_us(),
                    name=f"frame-{position:06d}",
                )


class Camera(_LiveSource):
    """A local camera by index (``cv2.VideoCapture(index)``)."""

    def __init__(self, index: int, *, max_frames: int | None = None, stride: int = 1) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self.index = index
        self.description = f"camera {index}"
        self._cap = self._open_capture()

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.index)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open camera {self.index}: check that a camera is connected at index {self.index} "
                "(ls /dev/video* on Linux), that no other process is using it, and that this user may access it"
            )
        # Keep the driver queue short so frames are fresh when the consumer is slower than the
        # camera (backends that do not support it ignore the call).
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap


class NetworkStream(_LiveSource):
    """An RTSP / HTTP(S) stream through OpenCV's FFMPEG backend."""

    def __init__(self, url: str, *, max_frames: int | None = None, stride: int = 1) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self.url = url
        self.description = f"network stream {_redact(url)}"
        self._cap = self._open_capture()

    def _open_capture(self) -> cv2.VideoCapture:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_OPEN_TIMEOUT_MS,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_READ_TIMEOUT_MS,
        ]
        cap = cv2.VideoCapture(self.url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open network stream {_redact(self.url)}: check that the URL is reachable from this "
                "device (host, port, path, credentials), that the stream's codec is supported by this OpenCV "
                "build (FFMPEG in cv2.getBuildInformation()), and for RTSP behind a firewall try "
                "OPENCV_FFMPEG_CAPTURE_OPTIONS='rtsp_transport;tcp'"
            )
        return cap


class GStreamerPipeline(_LiveSource):
    """A GStreamer pipeline string ending in ``appsink`` (``cv2.CAP_GSTREAMER``), e.g. a CSI camera
    through ``nvarguscamerasrc`` or an RTSP stream decoded in hardware on a Jetson."""

    def __init__(self, pipeline: str, *, max_frames: int | None = None, stride: int = 1) -> None:
        super().__init__(max_frames=max_frames, stride=stride)
        self.pipeline = pipeline
        self.description = f"GStreamer pipeline {_redact_pipeline(pipeline)}"
        self._cap = self._open_capture()

    def _open_capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(self.pipeline, cv2.CAP_GSTREAMER)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open {self.description}: check that this OpenCV build has GStreamer "
                "(GStreamer: YES in cv2.getBuildInformation(); JetPack's OpenCV does, pip's opencv-python "
                "does not), that the pipeline runs with gst-launch-1.0, and that it ends in appsink"
            )
        return cap


def _redact_pipeline(pipeline: str) -> str:
    """A pipeline with the password of any URL in it (rtspsrc location=...) replaced."""
    return _CREDENTIALS_RE.sub(r"\1:***@", pipeline)


_CREDENTIALS_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):[^\s@/]*@")


def _is_gstreamer(text: str) -> bool:
    """A pipeline string: elements joined by '!' (gst-launch syntax), ending in an appsink."""
    return " ! " in text or text.startswith("gst:")


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------
def open_source(
    spec: str | int | os.PathLike[str] | None,
    *,
    max_frames: int | None = None,
    stride: int = 1,
    recursive: bool = True,
    image_list: Sequence[str | os.PathLike[str]] | None = None,
) -> FrameSource:
    """Open a frame source from a spec.

    * ``image_list`` given: exactly those image files, in that order (labels from each file's
      parent folder); relative items are resolved against ``spec`` if it is a folder
      (``spec`` may then also be None);
    * an int, or a string of digits: a camera index;
    * ``rtsp://``, ``rtsps://``, ``http://``, ``https://``: a network stream;
    * a GStreamer pipeline (elements joined by `` ! ``, ending in ``appsink``; or ``gst:`` + one);
    * an existing folder: its images (extensions in :data:`IMAGE_EXTENSIONS`, any case),
      recursively unless ``recursive=False``, in sorted order, labelled by parent folder;
    * an existing image file: that one image;
    * any other existing file: a video file.

    ``stride`` keeps every n-th frame, ``max_frames`` stops after that many yielded frames.
    Raises :class:`SourceError` if the spec names nothing that exists or cannot be opened.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if max_frames is not None and max_frames < 0:
        raise ValueError(f"max_frames must be >= 0 or None, got {max_frames}")
    opts = {"max_frames": max_frames, "stride": stride}

    if image_list is not None:
        base: Path | None = None
        if spec is not None and not isinstance(spec, int) and str(spec) != "":
            base = Path(spec).expanduser()
            if not base.is_dir():
                raise SourceError(f"image list base is not a folder: {spec}")
        entries = _list_entries(image_list, base)
        where = f" under {spec}" if base is not None else ""
        return ImageFiles(entries, f"image list ({len(entries)} images{where})", **opts)

    if spec is None:
        raise SourceError("no source given: pass a camera index, a URL, a folder, a file or an image list")

    # bool is an int subclass; `True` as a camera index is almost surely a mistake.
    if isinstance(spec, bool):
        raise SourceError(f"not a source: {spec!r}")
    if isinstance(spec, int):
        return Camera(spec, **opts)

    text = os.fspath(spec)
    if isinstance(text, bytes):  # PathLike may give bytes; keep one code path
        text = os.fsdecode(text)
    if isinstance(spec, str):
        if _is_gstreamer(text):
            return GStreamerPipeline(text.removeprefix("gst:").strip(), **opts)
        if text.strip().isdigit():
            return Camera(int(text.strip()), **opts)
        m = _URL_RE.match(text)
        if m:
            scheme = m.group(1).lower()
            if scheme in NETWORK_SCHEMES:
                return NetworkStream(text, **opts)
            raise SourceError(
                f"unsupported URL scheme {scheme!r} in {_redact(text)}: use one of "
                f"{', '.join(sorted(NETWORK_SCHEMES))}, a camera index, or a local path"
            )

    path = Path(text).expanduser()
    if path.is_dir():
        entries = _scan_folder(path, recursive)
        if not entries:
            raise SourceError(
                f"no images in folder {text} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}"
                f"{', recursively' if recursive else ', top level only'})"
            )
        return ImageFiles(entries, f"image folder {text} ({len(entries)} images)", **opts)
    if path.is_file():
        if _is_image_file(path):
            entry = _ImageEntry(path=path, name=path.name, label=None)
            return ImageFiles([entry], f"image {text}", **opts)
        return VideoFile(path, **opts)
    raise SourceError(f"no such file or folder: {text}")
