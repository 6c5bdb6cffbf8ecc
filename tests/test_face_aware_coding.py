"""Whole pictures coded with their bits on the faces: bitstream v2, regions, the face-aware codec.

The synthetic bundle's decoder is one 1x1 convolution and a nearest upsampling, so every latent
cell decodes to its own 16x16 block: a region's pixels must come out exactly as a uniform stream
at the same quality decodes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facelink.config import CropRegionCoding, FaceRegionCoding
from facelink.runtime.codecs import CodecError, bitstream
from facelink.runtime.codecs.bitstream import Background, Region
from facelink.runtime.codecs.face_aware import AlignedCropCodec, FaceAwareCodec
from facelink.runtime.codecs.learned import LearnedFaceCodec
from facelink.runtime.detection.base import Detection

from .learned_codec_fixture import make_bundle
from .test_learned_codec_runtime import smooth_face

COARSE = Background(quality=1, step=4)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("codec"))


def noisy_picture(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(smooth_face(height, width) + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def test_regions_decode_as_a_uniform_stream_and_the_background_is_coarser(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=2)
    picture = noisy_picture()
    data = codec.encode(picture, regions=[(20, 10, 60, 40)], background=COARSE)  # cells x 1..3, y 0..2
    header, _ = bitstream.unpack(data)
    assert header.version == bitstream.REGIONS_VERSION
    assert header.regions == (Region(1, 0, 4, 3),) and header.background == COARSE
    decoded, uniform = codec.decode(data), codec.decode(codec.encode(picture))
    np.testing.assert_array_equal(decoded[0:48, 16:64], uniform[0:48, 16:64])
    outside = np.ones(decoded.shape[:2], bool)
    outside[0:48, 16:64] = False
    assert not np.array_equal(decoded[outside], uniform[outside])
    error = lambda image: np.abs(image.astype(float) - picture)[outside].mean()  # noqa: E731
    assert error(decoded) > error(uniform)  # a 4x coarser step loses more
    assert codec.decode(data).tobytes() == decoded.tobytes()


def test_regions_covering_the_picture_decode_exactly_as_the_uniform_stream(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=1)
    picture = noisy_picture(50, 70, seed=1)
    whole = codec.encode(picture, regions=[(0, 0, 70, 50), (-5, -5, 20, 20)], background=COARSE)
    assert bitstream.unpack(whole)[0].regions == (Region(0, 0, 5, 4), Region(0, 0, 2, 2))
    np.testing.assert_array_equal(codec.decode(whole), codec.decode(codec.encode(picture)))


def test_no_region_inside_the_picture_writes_version_1(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=1)
    picture = noisy_picture(32, 32)
    data = codec.encode(picture, regions=[(100, 100, 120, 120)], background=COARSE)
    assert data == codec.encode(picture) and bitstream.unpack(data)[0].version == bitstream.VERSION
    with pytest.raises(ValueError, match="needs a background level"):
        codec.encode(picture, regions=[(0, 0, 16, 16)])
    with pytest.raises(ValueError, match="background quality must be in 1..2"):
        codec.encode(picture, regions=[(0, 0, 16, 16)], background=Background(3))


def _forge(header: bitstream.Header, payload: bytes) -> bytes:
    """A well-formed container (valid checksum) around fields the codec must refuse."""
    return bitstream.pack(header, payload)


def test_corrupt_version_2_streams_raise_typed_errors(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=2)
    data = codec.encode(noisy_picture(), regions=[(20, 10, 60, 40)], background=COARSE)
    header, payload = bitstream.unpack(data)
    inside, outside = bitstream.split_payload(payload)
    sizes_end = 8 + len(bitstream.varint(128)) + len(bitstream.varint(96))  # magic, version, tag, quality, sizes
    cut = data[:sizes_end] + bitstream.struct.pack("<I", bitstream.zlib.crc32(data[:sizes_end]))
    cases = {
        "outside the 8x6 latent": _forge(
            bitstream.Header(header.codec_tag, 2, 128, 96, (Region(6, 0, 9, 2),), COARSE), payload),
        "background quality 3 is outside 1..2": _forge(
            bitstream.Header(header.codec_tag, 2, 128, 96, header.regions, Background(3, 1)), payload),
        "regions' payload .* runs past the end": _forge(header, bitstream.varint(len(payload) + 9) + payload),
        "entropy decoder failed|data left over": _forge(header, bitstream.join_payload(inside, outside[:-4])),
        "ends inside the background level": cut,
    }
    for message, stream in cases.items():
        with pytest.raises(CodecError, match=message):
            codec.decode(stream)


def test_region_fields_are_validated_on_both_sides() -> None:
    tag = b"\0" * bitstream.TAG_BYTES
    with pytest.raises(ValueError, match="background exactly when it has regions"):
        bitstream.pack(bitstream.Header(tag, 1, 16, 16, (Region(0, 0, 1, 1),)), b"")
    with pytest.raises(ValueError, match="non-empty rectangle"):
        bitstream.pack(bitstream.Header(tag, 1, 16, 16, (Region(1, 0, 1, 1),), COARSE), b"")
    good = bitstream.pack(bitstream.Header(tag, 1, 16, 16, (Region(0, 0, 1, 1),), COARSE), b"\0\0")
    body = bytearray(good[:-4])
    body[12] = 0  # the region count: after magic, version, tag, quality (8), the sizes (2), the background (2)
    bad = bytes(body) + bitstream.struct.pack("<I", bitstream.zlib.crc32(bytes(body)))
    with pytest.raises(CodecError, match="0 regions"):
        bitstream.unpack(bad)


class FixedFaces:
    """A detector that reports the faces it is given (the face-aware codec's plumbing only;
    the real detector runs in `test_face_aware_codec_on_an_lfw_picture`)."""

    name = "fixed"

    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections

    def detect(self, image: np.ndarray) -> list[Detection]:
        return self.detections


def test_face_aware_codec_codes_each_face_crop_and_the_whole_picture_without_faces(bundle: Path) -> None:
    from facelink.runtime.alignment import ARCFACE_112

    codec = LearnedFaceCodec.load(bundle, quality=2)
    picture = noisy_picture(160, 160)
    face = Detection(np.array([40, 40, 60, 60], np.float32), ARCFACE_112 * 0.5 + 50, 0.9)
    aware = FaceAwareCodec(codec, FixedFaces([face]), FaceRegionCoding(background_step=3))
    header, _ = bitstream.unpack(aware.encode(picture))
    # Landmarks at half the ArcFace template's scale, shifted by 50: the 128x128 canonical crop
    # (the template shifted by 8) maps to pixels 46..110, the cells 2..6 (16 px each).
    assert header.regions == (Region(2, 2, 7, 7),) and header.background == Background(1, 3)
    assert aware.decode(aware.encode(picture)).shape == picture.shape and aware.codec_id == codec.codec_id
    nobody = FaceAwareCodec(codec, FixedFaces([]))
    header, _ = bitstream.unpack(nobody.encode(picture))
    assert header.regions == (Region(0, 0, 10, 10),)
    np.testing.assert_array_equal(nobody.decode(nobody.encode(picture)), codec.decode(codec.encode(picture)))
    with pytest.raises(ValueError, match="background quality must be one of the codec's qualities 1..2"):
        FaceAwareCodec(codec, FixedFaces([]), FaceRegionCoding(background_quality=3))


def test_aligned_crop_codec_codes_the_border_ring_at_the_background(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=2)
    ring = AlignedCropCodec(codec, CropRegionCoding(background_step=4))
    crop = noisy_picture(128, 128, seed=2)
    header, _ = bitstream.unpack(ring.encode(crop))
    assert header.regions == (Region(1, 1, 7, 7),) and header.background == Background(1, 4)
    decoded, uniform = ring.decode(ring.encode(crop)), codec.decode(codec.encode(crop))
    np.testing.assert_array_equal(decoded[16:112, 16:112], uniform[16:112, 16:112])
    assert not np.array_equal(decoded[:16], uniform[:16])
    small = noisy_picture(32, 40)  # no room for a ring: the whole crop at the quality
    np.testing.assert_array_equal(ring.decode(ring.encode(small)), codec.decode(codec.encode(small)))
    assert ring.version == bitstream.REGIONS_VERSION and ring.versions == (1, 2)


def test_face_aware_codec_on_an_lfw_picture() -> None:
    """The bundled `wide` codec and YuNet on a real picture: fewer bytes, the face as sharp."""
    from facelink.config import DetectorConfig
    from facelink.datasets import LFW, DatasetNotFoundError
    from facelink.runtime.codecs.learned import codec_manifests
    from facelink.runtime.detection import create_detector

    try:
        lfw = LFW.locate(download=False)
    except DatasetNotFoundError as error:
        pytest.skip(f"LFW is not available: {error}")
    if "wide" not in codec_manifests():
        pytest.skip("the learned codec 'wide' is not bundled")
    import cv2

    path = lfw.image_dir / "Aaron_Peirsol" / "Aaron_Peirsol_0001.jpg"
    picture = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    codec = LearnedFaceCodec.load("wide", quality=4)
    detector = create_detector(DetectorConfig())
    aware = FaceAwareCodec(codec, detector)
    data, uniform = aware.encode(picture), codec.encode(picture)
    assert len(data) < 0.8 * len(uniform)
    (face,) = detector.detect(picture)
    x, y, w, h = face.box.astype(int)
    decoded, reference = aware.decode(data), codec.decode(uniform)
    error = lambda image: np.abs(image[y : y + h, x : x + w].astype(float) - picture[y : y + h, x : x + w]).mean()  # noqa: E731
    assert error(decoded) < 1.1 * error(reference)
