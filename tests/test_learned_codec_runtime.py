"""The learned codec's run time: bitstream v1, entropy coding, padding, typed errors.

The networks here are synthetic (see learned_codec_fixture.py); the trained codec's own
tests live with its weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.codecs import CodecError
from facelink.runtime.codecs import bitstream
from facelink.runtime.codecs.entropy import ChannelTables, FactorizedEntropyCoder
from facelink.runtime.codecs.learned import LearnedFaceCodec

from .learned_codec_fixture import CHANNELS, laplace_tables, make_bundle

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("codec"))


def smooth_face(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1).astype(np.uint8)


def coder() -> FactorizedEntropyCoder:
    t = laplace_tables()
    return FactorizedEntropyCoder(ChannelTables(t["pmf"][1], t["length"][1].astype(np.int64), t["offset"][1].astype(np.int64)))


@pytest.mark.parametrize("size", [(128, 128), (112, 112), (37, 53), (250, 250)])
def test_any_picture_size_round_trips(bundle: Path, size: tuple[int, int]) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=2)
    data = codec.encode(smooth_face(*size))
    decoded = codec.decode(data)
    assert decoded.shape == (*size, 3) and decoded.dtype == np.uint8
    assert codec.decode(data).tobytes() == decoded.tobytes()  # decoding is a function of the bytes
    assert codec.codec_id.startswith("flc-synthetic-") and len(codec.codec_id) == len("flc-synthetic-") + 8


def test_entropy_coding_is_exact_including_escapes() -> None:
    rng = np.random.default_rng(3)
    symbols = rng.laplace(0, 3, size=(CHANNELS, 5, 7)).round().astype(np.int64)
    symbols[0, 0, 0], symbols[3, 2, 1], symbols[7, 4, 6] = 500, -70_000, 21  # outside the tables
    payload = coder().encode(symbols)
    np.testing.assert_array_equal(coder().decode(payload, 5, 7), symbols)


def test_golden_bitstream_decodes_to_the_committed_symbols() -> None:
    """Bytes written once and committed must decode to the same symbols on every machine."""
    golden = np.load(DATA / "golden_entropy.npz")
    np.testing.assert_array_equal(coder().decode(golden["payload"].tobytes(), 4, 4), golden["symbols"])
    assert coder().encode(golden["symbols"]) == golden["payload"].tobytes()


def test_corrupt_truncated_and_foreign_streams_raise_typed_errors(bundle: Path, tmp_path: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=1)
    data = codec.encode(smooth_face(128, 128))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    cases = {
        "checksum mismatch": bytes(flipped),
        "truncated": data[:9],
        "not a facelink learned-codec bitstream": b"\xff\xd8" + data[2:],
        "version 9 is not supported": data[:2] + b"\x09" + data[3:],
    }
    for message, stream in cases.items():
        with pytest.raises(CodecError, match=message):
            codec.decode(stream)
    other = LearnedFaceCodec.load(make_bundle(tmp_path / "other", name="other", seed=1), quality=1)
    with pytest.raises(CodecError, match="made by another codec"):
        other.decode(data)


def test_a_header_claiming_a_huge_picture_is_refused_at_once(bundle: Path) -> None:
    """A few bytes must not make the decoder decode millions of symbols (or allocate for them)."""
    codec = LearnedFaceCodec.load(bundle, quality=1)
    forge = lambda width, height: bitstream.pack(  # noqa: E731
        bitstream.Header(codec.manifest.tag, 1, width, height), b"\x01\x02\x03\x04")
    with pytest.raises(CodecError, match="larger than the learned codec's limit"):
        codec.decode(forge(65535, 65535))
    with pytest.raises(CodecError, match="4 bytes cannot hold a 63x63 latent"):
        codec.decode(forge(1000, 1000))
    with pytest.raises(ValueError, match="larger than the learned codec's limit"):
        codec.encode(np.zeros((1, 3_000_000, 3), np.uint8))


def test_header_fields_and_quality_bounds(bundle: Path) -> None:
    codec = LearnedFaceCodec.load(bundle, quality=1)
    header, _ = bitstream.unpack(codec.encode(smooth_face(40, 70)))
    assert (header.width, header.height, header.quality, header.codec_tag) == (70, 40, 1, codec.manifest.tag)
    with pytest.raises(ValueError, match="qualities 1..2"):
        LearnedFaceCodec.load(bundle, quality=3)


def test_a_tampered_weights_file_is_refused(bundle: Path, tmp_path: Path) -> None:
    from facelink.runtime.manifest import ManifestError

    folder = tmp_path / "tampered"
    manifest = make_bundle(folder)
    (folder / "decoder.onnx").write_bytes((folder / "decoder.onnx").read_bytes() + b"\0")
    codec = LearnedFaceCodec.load(manifest, quality=1)
    with pytest.raises(ManifestError, match="does not match the sha256"):
        codec.decode(codec.encode(smooth_face(32, 32)))


def _bundled_codecs() -> list[str]:
    from facelink.runtime.codecs.learned import codec_manifests

    return sorted(codec_manifests())


@pytest.mark.parametrize("name", _bundled_codecs() or [pytest.param("default", marks=pytest.mark.skip(reason="no learned codec is bundled"))])
def test_shipped_codec_decodes_its_golden_stream_to_the_committed_symbols(name: str) -> None:
    """Every bundled codec's own golden stream: same bytes, same symbols, on every machine.

    Retraining changes the codec tag: regenerate the file then (`python -m tests.make_golden_codec NAME`).
    """
    path = DATA / f"golden_codec_{name}.npz"
    assert path.is_file(), f"the bundled codec {name!r} has no golden stream: python -m tests.make_golden_codec {name}"
    golden = np.load(path)
    codec = LearnedFaceCodec.load(name, quality=3)
    header, payload = bitstream.unpack(golden["stream"].tobytes())
    assert header.codec_tag == codec.manifest.tag, f"the bundled codec changed: python -m tests.make_golden_codec {name}"
    symbols = codec.entropy_coder(header.quality).decode(payload, *codec.latent_size(header.width, header.height))
    np.testing.assert_array_equal(symbols, golden["symbols"])
    assert codec.decode(golden["stream"].tobytes()).shape == (128, 128, 3)


def test_a_bundle_names_its_default_quality(bundle: Path, tmp_path: Path) -> None:
    from facelink.runtime.codecs import create_codec, default_quality
    from facelink.runtime.manifest import ManifestError

    data = json.loads(bundle.read_text())
    assert create_codec(f"learned:{bundle}").quality == 1  # no default_quality: the middle of 1..2
    for value, expected in ((2, 2), (3, None)):
        path = bundle.parent / f"codec-q{value}.json"
        path.write_text(json.dumps({**data, "default_quality": value}))
        if expected is None:
            with pytest.raises(ManifestError, match="default_quality 3 is not one of the qualities 1..2"):
                create_codec(f"learned:{path}")
        else:
            assert create_codec(f"learned:{path}").quality == default_quality(f"learned:{path}") == expected
    path = bundle.parent / "codec-ring3.json"
    path.write_text(json.dumps({**data, "border_ring_quality": 3}))
    with pytest.raises(ManifestError, match="border_ring_quality 3 is not one of the qualities 1..2"):
        create_codec(f"learned:{path}")


def test_the_edge_codes_the_border_ring_at_the_bundles_border_ring_quality(bundle: Path) -> None:
    from facelink.config import EdgeConfig
    from facelink.edge.pipeline import crop_codec
    from facelink.runtime.codecs.face_aware import AlignedCropCodec

    data = json.loads(bundle.read_text())
    path = bundle.parent / "codec-ring2.json"
    path.write_text(json.dumps({**data, "border_ring_quality": 2}))
    ring = crop_codec(EdgeConfig(codec=f"learned:{path}"))
    assert isinstance(ring, AlignedCropCodec) and ring.quality == 2  # the bundle's, unless --quality says
    assert crop_codec(EdgeConfig(codec=f"learned:{path}", quality=1)).quality == 1
    whole = crop_codec(EdgeConfig(codec=f"learned:{path}", crop_border=None))
    assert isinstance(whole, LearnedFaceCodec) and whole.quality == 1  # no default_quality: the middle of 1..2
    assert not isinstance(crop_codec(EdgeConfig(codec="jpeg")), AlignedCropCodec)
