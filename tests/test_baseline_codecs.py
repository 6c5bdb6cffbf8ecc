"""benchmarks/baseline_codecs.py: every standard codec round-trips, spends more bytes when asked
for more quality, and counts only what a receiver needs."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("av", reason="the x265 baseline needs PyAV: pip install 'facelink[bench]'")
pytest.importorskip(
    "imagecodecs", reason="the image baselines need imagecodecs: pip install 'facelink[bench]'"
)

from facelink.benchmarks.baseline_codecs import BASELINES, X265Codec, create_baseline  # noqa: E402

#: A mid-range quality per family (roughly comparable: 30-40 dB on a face).
MID = {"x265": 23, "jpeg": 75, "webp": 75, "avif": 60, "jxl": 75}
#: Coarse to fine for each family.
SWEEP = {
    "x265": (40, 32, 23, 18),
    "jpeg": (10, 30, 60, 90),
    "webp": (10, 30, 60, 90),
    "avif": (10, 30, 60, 90),
    "jxl": (10, 30, 60, 90),
}


def face_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth shading, a few soft blobs and mild grain: compressible, but not trivially."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    image = np.stack(
        [90 + 80 * x / width, 70 + 60 * y / height, 120 + 40 * np.sin(x / 9) * np.cos(y / 13)], -1
    )
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(6, 25)
        image += rng.uniform(-60, 60, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("size", [(128, 128), (250, 250)])
def test_round_trip_keeps_size_and_quality(name: str, size: tuple[int, int]) -> None:
    codec = create_baseline(name, MID[name])
    image = face_like(*size)
    data = codec.encode(image)
    decoded = codec.decode(data)
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert psnr(image, decoded) > 30, f"{codec.label}: {psnr(image, decoded):.1f} dB"
    assert 50 < len(data) < image.size // 4  # really compressed, and not empty
    assert codec.label.startswith(name) and codec.settings()["codec"] == name


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_more_quality_costs_more_bytes(name: str) -> None:
    image = face_like(128, 128, seed=1)
    sizes = [len(create_baseline(name, q).encode(image)) for q in SWEEP[name]]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), f"{name}: {sizes}"
    assert BASELINES[name].finer_when_higher == (SWEEP[name][0] < SWEEP[name][-1])


def test_x265_crf23_is_a_sensible_hevc_intra_picture() -> None:
    image = face_like(128, 128)
    data = X265Codec(23).encode(image)
    # An intra picture of a 128x128 face at CRF 23 takes hundreds of bytes, not thousands: the
    # ~2,300-byte SEI with x265's version and options (info=1) must be gone.
    assert 100 < len(data) < 3000
    assert b"x265" not in data and b"options" not in data
    assert data[:4] == b"\x00\x00\x00\x01"  # Annex B, no container
    assert X265Codec(23).encode(image) == data  # deterministic


def test_x265_odd_sides_are_padded_and_cropped_back() -> None:
    image = face_like(61, 75)
    codec = X265Codec(23)
    data = codec.encode(image)
    assert data[0] == 0x80 | 1 | 2  # the one marker byte: odd width and odd height
    decoded = codec.decode(data)
    assert decoded.shape == image.shape and psnr(image, decoded) > 30
    assert codec.decode(codec.encode(face_like(61, 76)))[:, :, 0].shape == (61, 76)


def test_jpeg_is_420() -> None:
    data = create_baseline("jpeg", 75).encode(face_like(64, 64))
    sof = data.index(b"\xff\xc0")  # baseline frame header: length, precision, height, width, 3 components
    assert data[sof + 9] == 3
    luma, cb, cr = data[sof + 11], data[sof + 14], data[sof + 17]
    assert (luma, cb, cr) == (0x22, 0x11, 0x11)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        create_baseline("x265", 60)
    with pytest.raises(ValueError):
        create_baseline("heic", 50)
    with pytest.raises(ValueError):
        create_baseline("jpeg", 50).encode(np.zeros((8, 8), np.uint8))
