"""Frame sources: image folders, image lists, single images, video files, and open errors.

All data is synthesised in tmp_path; nothing here needs ../shared or a camera.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest

from facelink.edge import sources
from facelink.edge.sources import Frame, SourceError, open_source

BLUE_BGR = (255, 0, 0)  # OpenCV order: pure blue is B=255


def _solid(color_bgr: tuple[int, int, int], h: int = 24, w: int = 32) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = color_bgr
    return img


@pytest.fixture()
def lfw_like(tmp_path: Path) -> Path:
    """<root>/<person>/<file> with PNG and JPEG, an upper-case extension, a nested folder,
    a corrupt .jpg, a non-image file, a hidden file, and an image directly in the root."""
    root = tmp_path / "faces"
    (root / "Bob").mkdir(parents=True)
    (root / "Alice").mkdir()
    (root / "Carol" / "extra").mkdir(parents=True)
    assert cv2.imwrite(str(root / "Alice" / "Alice_0002.png"), _solid((0, 255, 0)))
    assert cv2.imwrite(str(root / "Alice" / "Alice_0001.png"), _solid(BLUE_BGR))
    assert cv2.imwrite(str(root / "Bob" / "Bob_0001.jpg"), _solid((0, 0, 255)))
    assert cv2.imwrite(str(root / "Carol" / "extra" / "Carol_0001.JPG"), _solid((9, 9, 9)))
    assert cv2.imwrite(str(root / "loose.bmp"), _solid((1, 2, 3)))
    rng = np.random.default_rng(0)
    (root / "Bob" / "Bob_0002.jpg").write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    (root / "Bob" / "notes.txt").write_text("not an image")
    (root / "Bob" / "._Bob_0001.jpg").write_bytes(b"macOS resource fork")
    return root


EXPECTED_NAMES = [
    "Alice/Alice_0001.png",
    "Alice/Alice_0002.png",
    "Bob/Bob_0001.jpg",
    "Bob/Bob_0002.jpg",  # corrupt: listed, but skipped when read
    "Carol/extra/Carol_0001.JPG",
    "loose.bmp",
]


def test_folder_order_labels_rgb_and_skips(lfw_like: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = open_source(lfw_like)
    assert not src.live
    assert src.total == len(src) == len(EXPECTED_NAMES)  # the corrupt file is only found on reading
    assert f"({len(EXPECTED_NAMES)} images)" in src.description

    with caplog.at_level(logging.WARNING, logger=sources.__name__):
        frames = list(src)

    expected = [n for n in EXPECTED_NAMES if n != "Bob/Bob_0002.jpg"]
    assert [f.name for f in frames] == expected
    assert [f.label for f in frames] == ["Alice", "Alice", "Bob", "extra", None]
    # index is the position in the sorted listing, so the skipped file leaves a gap.
    assert [f.index for f in frames] == [0, 1, 2, 4, 5]
    assert src.skipped == 1
    assert any("unreadable image" in r.getMessage() and "Bob_0002.jpg" in r.getMessage() for r in caplog.records)

    blue = frames[0].image
    assert blue.dtype == np.uint8 and blue.shape == (24, 32, 3) and blue.flags.c_contiguous
    assert tuple(blue[0, 0]) == (0, 0, 255)  # RGB: blue is the last channel
    assert tuple(frames[2].image[0, 0]) == pytest.approx((255, 0, 0), abs=2)  # red JPEG
    assert all(isinstance(f, Frame) and f.timestamp_us > 1_600_000_000_000_000 for f in frames)

    # Re-iterable, and the skip count is per pass.
    assert [f.name for f in src] == expected
    assert src.skipped == 1


def test_folder_not_recursive(lfw_like: Path) -> None:
    src = open_source(lfw_like, recursive=False)
    assert [(f.name, f.label) for f in src] == [("loose.bmp", None)]


def test_max_frames_and_stride(lfw_like: Path) -> None:
    src = open_source(lfw_like, max_frames=2)
    assert src.total == 2
    assert [f.name for f in src] == EXPECTED_NAMES[:2]

    src = open_source(lfw_like, stride=2)  # keeps listing positions 0, 2, 4
    assert src.total == 3
    assert [f.index for f in src] == [0, 2, 4]

    # max_frames counts frames actually yielded: the skipped corrupt file does not use one up.
    src = open_source(lfw_like, stride=1, max_frames=4)
    assert [f.index for f in src] == [0, 1, 2, 4]

    with pytest.raises(ValueError):
        open_source(lfw_like, stride=0)


def test_grayscale_and_alpha_become_rgb(tmp_path: Path) -> None:
    gray = np.full((10, 12), 77, np.uint8)
    bgra = np.zeros((10, 12, 4), np.uint8)
    bgra[..., 0], bgra[..., 3] = 200, 10  # blue, almost transparent: alpha is dropped, not blended
    assert cv2.imwrite(str(tmp_path / "a_gray.png"), gray)
    assert cv2.imwrite(str(tmp_path / "b_alpha.png"), bgra)
    frames = list(open_source(tmp_path))
    assert [f.image.shape for f in frames] == [(10, 12, 3), (10, 12, 3)]
    assert tuple(frames[0].image[0, 0]) == (77, 77, 77)
    assert tuple(frames[1].image[0, 0]) == (0, 0, 200)


def test_single_image(tmp_path: Path) -> None:
    path = tmp_path / "Dave" / "Dave_0001.png"
    path.parent.mkdir()
    assert cv2.imwrite(str(path), _solid(BLUE_BGR))
    with open_source(str(path)) as src:
        assert src.total == 1 and not src.live
        frames = list(src)
    assert len(frames) == 1
    assert frames[0].name == "Dave_0001.png" and frames[0].index == 0 and frames[0].label is None
    assert tuple(frames[0].image[0, 0]) == (0, 0, 255)
    assert src.closed
    with pytest.raises(SourceError, match="closed"):
        list(src)


def test_image_list(lfw_like: Path) -> None:
    chosen = [lfw_like / "Bob" / "Bob_0001.jpg", str(lfw_like / "Alice" / "Alice_0001.png")]
    src = open_source(None, image_list=chosen)
    frames = list(src)
    assert src.total == 2
    assert [(f.name, f.label, f.index) for f in frames] == [
        ("Bob/Bob_0001.jpg", "Bob", 0),
        ("Alice/Alice_0001.png", "Alice", 1),
    ]

    # Relative to a root folder, the way the demo picks LFW files; names match the folder source.
    src = open_source(lfw_like, image_list=["Carol/extra/Carol_0001.JPG", "Bob/Bob_0002.jpg"])
    frames = list(src)
    assert [(f.name, f.label) for f in frames] == [("Carol/extra/Carol_0001.JPG", "extra")]
    assert src.skipped == 1

    with pytest.raises(SourceError, match="Nobody_0001.jpg"):
        open_source(lfw_like, image_list=["Nobody/Nobody_0001.jpg"])


def test_video_file(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG/AVI (no video writer backend)")
    n = 7
    for i in range(n):
        writer.write(_solid((i * 30, 0, 0), 48, 64))  # brightness encodes the frame number
    writer.release()

    src = open_source(path)
    assert not src.live
    assert src.total == len(src) == n
    frames = list(src)
    assert [f.index for f in frames] == list(range(n))
    assert [f.name for f in frames] == [f"frame-{i:06d}" for i in range(n)]
    assert all(f.image.shape == (48, 64, 3) and f.label is None for f in frames)
    # Blue in BGR is channel 2 in RGB; MJPEG is lossy, so compare loosely.
    assert [int(round(f.image[..., 2].mean() / 30)) for f in frames] == list(range(n))
    assert frames[3].image[..., 0].mean() < 10

    # A second pass starts over.
    assert len(list(src)) == n

    src = open_source(path, stride=3, max_frames=2)
    assert src.total == 2
    assert [f.index for f in src] == [0, 3]
    src.close()

    src = open_source(path, stride=3)
    assert src.total == 3
    assert [f.index for f in src] == [0, 3, 6]
    src.close()


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "clip.mp4"
    with pytest.raises(SourceError, match="no such file or folder") as info:
        open_source(missing)
    assert str(missing) in str(info.value)


def test_empty_folder_and_unopenable_video(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(tmp_path / "empty")
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"\x00" * 64)
    with pytest.raises(SourceError, match="codec") as info:
        open_source(bogus)
    assert str(bogus) in str(info.value)


def test_network_and_camera_errors_name_the_source() -> None:
    # Port 1 on localhost refuses at once, so this does not wait for a timeout.
    url = "rtsp://user:secret@127.0.0.1:1/stream"
    with pytest.raises(SourceError, match="reachable") as info:
        open_source(url)
    assert "127.0.0.1:1/stream" in str(info.value) and "secret" not in str(info.value)

    with pytest.raises(SourceError, match="unsupported URL scheme"):
        open_source("ftp://example.com/clip.mp4")

    with pytest.raises(SourceError, match="camera 97"):
        open_source("97")  # a string of digits is a camera index


class _FlakyCapture:
    """Stands in for cv2.VideoCapture: fails `fail` reads after `good` frames, then recovers."""

    def __init__(self, good: int, fail: int, then: int) -> None:
        self.script = [True] * good + [False] * fail + [True] * then
        self.released = False

    def _next(self) -> bool:
        return self.script.pop(0) if self.script else False

    def read(self) -> tuple[bool, np.ndarray | None]:
        ok = self._next()
        return ok, (_solid(BLUE_BGR) if ok else None)

    def grab(self) -> bool:
        return self._next()

    def release(self) -> None:
        self.released = True


def _live(cap: _FlakyCapture, **kw: int) -> sources.NetworkStream:
    src = sources.NetworkStream.__new__(sources.NetworkStream)
    sources._LiveSource.__init__(src, max_frames=kw.get("max_frames"), stride=kw.get("stride", 1))
    src.url, src.description, src._cap = "rtsp://fake", "network stream rtsp://fake", cap  # type: ignore[assignment]
    return src


def test_live_source_retries_then_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "LIVE_RETRY_SLEEP_S", 0.0)
    # A glitch shorter than the retry budget is ridden out...
    src = _live(_FlakyCapture(good=2, fail=sources.LIVE_READ_RETRIES, then=2))
    assert src.live and src.total is None
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert tuple(frames[0].image[0, 0]) == (0, 0, 255)
    # ...one longer ends the stream (with a warning) instead of hanging.
    src = _live(_FlakyCapture(good=2, fail=sources.LIVE_READ_RETRIES + 1, then=5))
    assert [f.index for f in src] == [0, 1]
    src.close()
    # stride and max_frames on a live source.
    src = _live(_FlakyCapture(good=10, fail=0, then=0), stride=2, max_frames=3)
    assert src.total == 3
    assert [f.index for f in src] == [0, 2, 4]
