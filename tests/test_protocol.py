"""The wire: message round trips, embedding packing, codecs, and the committed stubs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.codecs import CodecError, UnknownCodecError, create_codec, decode_image
from facelink.runtime.embeddings import pack_embedding, unpack_embedding
from facelink.v1 import common_pb2, gallery_pb2, recognition_pb2

REPO = Path(__file__).resolve().parent.parent


def _observation(**payload) -> recognition_pb2.FaceObservation:
    return recognition_pb2.FaceObservation(
        camera_id="door-1",
        frame_sequence=2**40 + 7,
        capture_time_us=1_764_000_000_000_000,
        track_id=3,
        face_index=1,
        box=common_pb2.Box(x=1.5, y=2.5, width=30, height=40),
        landmarks=common_pb2.Landmarks(points=[common_pb2.Point(x=i, y=2 * i) for i in range(5)]),
        request_id=99,
        **payload,
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"face": common_pb2.EncodedFace(codec_id="jpeg", codec_version=1, data=b"\xff\xd8abc")},
        {"embedding": common_pb2.Embedding(model_id="q@1", dtype=common_pb2.DTYPE_INT8, dim=4, scale=0.5, data=b"\x01\x02\x03\x04")},
        {"image": common_pb2.Image(format=common_pb2.IMAGE_FORMAT_PNG, data=b"\x89PNG")},
    ],
)
def test_observation_round_trip(payload: dict) -> None:
    message = _observation(**payload)
    parsed = recognition_pb2.FaceObservation.FromString(message.SerializeToString())
    assert parsed == message
    assert parsed.WhichOneof("payload") == next(iter(payload))
    assert parsed.frame_sequence == 2**40 + 7 and len(parsed.landmarks.points) == 5


def test_result_and_gallery_round_trips() -> None:
    result = recognition_pb2.FaceResult(
        camera_id="c", frame_sequence=5, decision=recognition_pb2.DECISION_REJECTED,
        error=recognition_pb2.Error(code=3, message="undecodable"), server_latency_us=1234,
    )
    assert recognition_pb2.FaceResult.FromString(result.SerializeToString()) == result
    request = gallery_pb2.EnrollRequest(identity="Ada", metadata={"team": "x"}, replace=True)
    assert gallery_pb2.EnrollRequest.FromString(request.SerializeToString()) == request


def test_unknown_fields_from_a_newer_peer_are_kept() -> None:
    """A v1 receiver must accept messages from a sender that added fields (forward compatibility)."""
    newer = _observation().SerializeToString() + bytes([0xF8, 0x3E, 0x01])  # field 999, varint 1
    parsed = recognition_pb2.FaceObservation.FromString(newer)
    assert parsed.camera_id == "door-1"
    assert parsed.SerializeToString().endswith(bytes([0xF8, 0x3E, 0x01]))


@pytest.mark.parametrize("dtype, tolerance", [("float32", 0.0), ("float16", 1e-3), ("int8", 1e-2)])
def test_embedding_packing_round_trip(dtype: str, tolerance: float) -> None:
    vector = np.random.default_rng(0).normal(size=128).astype(np.float32)
    vector /= np.linalg.norm(vector)
    data, scale = pack_embedding(vector, dtype)  # type: ignore[arg-type]
    assert len(data) == 128 * {"float32": 4, "float16": 2, "int8": 1}[dtype]
    restored = unpack_embedding(data, dtype, 128, scale)  # type: ignore[arg-type]
    np.testing.assert_allclose(restored, vector, atol=tolerance)


@pytest.mark.parametrize(
    "data, dtype, dim, scale, message",
    [
        (b"\x00" * 10, "float32", 4, 1.0, "needs 16 bytes"),
        (b"\x00" * 4, "int8", 4, 0.0, "positive scale"),
        (np.array([np.nan] * 4, "<f4").tobytes(), "float32", 4, 1.0, "NaN"),
        (b"", "bfloat", 0, 1.0, "unknown embedding dtype"),
    ],
)
def test_bad_embeddings_are_refused(data: bytes, dtype: str, dim: int, scale: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unpack_embedding(data, dtype, dim, scale)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec_id", ["jpeg", "webp", "png"])
def test_codecs_round_trip(codec_id: str) -> None:
    # A smooth picture, like a face: white noise would measure chroma subsampling, not the codec.
    y, x = np.mgrid[0:128, 0:128]
    image = np.stack([x * 2, y * 2, (x + y)], axis=-1).clip(0, 255).astype(np.uint8)
    codec = create_codec(codec_id, quality=95)
    decoded = codec.decode(codec.encode(image))
    assert decoded.shape == image.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < (0.01 if codec_id == "png" else 4)


def test_codec_errors_are_typed_and_clear() -> None:
    with pytest.raises(UnknownCodecError, match="available: .*jpeg"):
        create_codec("hevc-nonexistent")
    jpeg = create_codec("jpeg")
    with pytest.raises(CodecError, match="could not be decoded"):
        jpeg.decode(b"\x00garbage" * 10)
    with pytest.raises(CodecError, match="empty"):
        jpeg.decode(b"")
    truncated = jpeg.encode(np.zeros((64, 64, 3), np.uint8))[:20]
    with pytest.raises(CodecError):
        jpeg.decode(truncated)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        jpeg.encode(np.zeros((64, 64), np.uint8))


def test_oversized_picture_is_refused_before_decoding() -> None:
    big = create_codec("jpeg", 50).encode(np.zeros((2000, 1200, 3), np.uint8))
    with pytest.raises(CodecError, match="larger than 1024"):
        decode_image(big, max_side=1024)
    assert decode_image(big, max_side=4096).shape == (2000, 1200, 3)


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_committed_stubs_match_the_protos() -> None:
    check = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
