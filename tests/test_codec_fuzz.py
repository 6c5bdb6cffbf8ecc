"""Every payload decoder answers any bytes with an image or a CodecError, in bounded time and memory.

A seeded sample of the long fuzz run (`python -m facelink.benchmarks.fuzz_codecs --inputs 1000000`):
mutated streams of every codec id and bitstream version, their checksums recomputed so the
mutations reach the parsers, and random bytes. Then one test per bug that fuzzing found, on a
hand-made input, so that each stays fixed with a clear name.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest

from facelink.benchmarks import fuzz_codecs
from facelink.runtime.codecs import CodecError, bitstream, create_codec, decode_image
from facelink.runtime.codecs.learned import LearnedFaceCodec, codec_manifests

from .learned_codec_fixture import make_bundle

SAMPLE_INPUTS = 10000
HANG_SECONDS = 10.0  # generous: a decode here takes milliseconds; this only catches a hang


@pytest.fixture(scope="module")
def seeds() -> list[fuzz_codecs.Seed]:
    # Synthetic pictures only (no ../shared), every codec id, learned qualities at both ends.
    pictures = fuzz_codecs.synthetic_pictures(np.random.default_rng(0), fuzz_codecs.DEFAULT_SIZES)
    return fuzz_codecs.seed_streams(pictures, learned_qualities=(1, 3, 5))


def test_the_seeds_cover_every_codec_and_bitstream_version(seeds: list[fuzz_codecs.Seed]) -> None:
    from facelink.runtime.codecs import available_codecs

    assert {s.target for s in seeds} == set(available_codecs()) | {fuzz_codecs.IMAGE_TARGET}
    learned = [s for s in seeds if s.target.startswith("flc-")]
    assert {bitstream.unpack(s.data)[0].version for s in learned} == set(bitstream.VERSIONS)


def test_mutated_learned_streams_get_past_the_checksum(seeds: list[fuzz_codecs.Seed]) -> None:
    """Otherwise the sample below would only ever test the CRC check."""
    learned = [s for s in seeds if s.target.startswith("flc-")]
    items = [fuzz_codecs.make_input(i, learned) for i in range(500)]
    refused = 0
    for item in items:
        try:
            bitstream.unpack(item.data)
        except CodecError as error:
            refused += "checksum" in str(error)
    assert refused < 0.05 * len(items)


def test_a_seeded_sample_of_fuzzed_inputs_raises_nothing_but_codec_error(seeds: list[fuzz_codecs.Seed], tmp_path: Path) -> None:
    config = fuzz_codecs.RunConfig(SAMPLE_INPUTS, workers=2, seed=20240518, hang_seconds=HANG_SECONDS,
                                   save_dir=tmp_path, quiet_native=True)
    result = fuzz_codecs.run_fuzz(config, seeds)
    found = {"other exceptions": result["other_exceptions"], "hangs": result["hangs"], "crashes": result["crashes"]}
    assert not any(found.values()), f"{found}; examples: {result['examples']}"
    assert result["inputs"] == SAMPLE_INPUTS
    assert result["slowest"]["seconds"] < HANG_SECONDS
    assert set(result["by_target"]) == {s.target for s in seeds}
    assert result["decoded"] > 0 and result["codec_errors"] > 0  # both paths were exercised


# -- the bugs fuzzing found, one input each -----------------------------------------------------
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> LearnedFaceCodec:
    return LearnedFaceCodec.load(make_bundle(tmp_path_factory.mktemp("codec")), quality=1)


def _stream(codec: LearnedFaceCodec, payload: bytes, width: int = 16, height: int = 16) -> bytes:
    return bitstream.pack(bitstream.Header(codec.manifest.tag, 1, width, height), payload)


def _escape_payload(codec: LearnedFaceCodec, nbits: int) -> bytes:
    """A one-cell latent whose first channel is escaped, with an escape length of `nbits` and no
    value after it: bytes no encoder writes when nbits > 24 (constriction cannot code them)."""
    from facelink.runtime.codecs import ans  # bit-exact with constriction, and present everywhere

    coder = codec.entropy_coder(1)
    tables = coder.tables
    symbols = np.full(coder.channels, -int(tables.offset[0]), np.int32)[:, None]  # the symbol 0
    symbols[0] = tables.length[0] - 1  # the escape
    packed = ans.AnsCoder()
    packed.encode_reverse(np.array([nbits], np.int32), ans.Uniform(32))
    for c in reversed(range(coder.channels)):
        packed.encode_reverse(symbols[c], ans.Categorical(tables.pmf[c, : tables.length[c]].astype(np.float64)))
    return packed.get_compressed().astype("<u4").tobytes()


@pytest.mark.parametrize("nbits", [25, 31])
def test_an_escape_longer_than_the_coder_writes_is_a_codec_error(synthetic: LearnedFaceCodec, nbits: int) -> None:
    """Was: constriction's Uniform(2**25+) panicked (pyo3's PanicException, a BaseException that no
    `except Exception` catches: the gRPC stream never completed), and Uniform(2**31) overflowed."""
    with pytest.raises(CodecError, match=f"escaped value of {nbits} bits"):
        synthetic.decode(_stream(synthetic, _escape_payload(synthetic, nbits)))


def test_the_encoder_refuses_a_value_it_cannot_code(synthetic: LearnedFaceCodec) -> None:
    symbols = np.zeros((synthetic.entropy_coder(1).channels, 1, 1), np.int64)
    symbols[0, 0, 0] = 1 << 26
    with pytest.raises(ValueError, match="out of range"):
        synthetic.entropy_coder(1).encode(symbols)


def test_a_payload_ending_in_a_zero_word_is_a_codec_error(synthetic: LearnedFaceCodec) -> None:
    """Was: constriction's ValueError from building the coder, outside the code that mapped errors."""
    with pytest.raises(CodecError, match="entropy decoder failed"):
        synthetic.decode(_stream(synthetic, b"\x01\x00\x00\x00" + b"\x00" * 4))


def _shipped() -> list[str]:
    return sorted(codec_manifests())


@pytest.mark.parametrize("name", _shipped())
def test_extreme_symbols_decode_to_defined_pixels(name: str) -> None:
    """Was: the network overflowed to NaN, and the cast to uint8 was undefined (a RuntimeWarning,
    and pixels that depend on the platform)."""
    codec = LearnedFaceCodec.load(name, quality=1)
    symbols = np.random.default_rng(1).integers(-(1 << 23), 1 << 23, size=(codec.manifest.latent_channels, 2, 3))
    data = _stream(codec, codec.entropy_coder(1).encode(symbols), 48, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = codec.decode(data)
    assert image.shape == (32, 48, 3) and image.dtype == np.uint8


def test_a_pixel_budget_refuses_a_large_stream_before_decoding_it(synthetic: LearnedFaceCodec, monkeypatch) -> None:
    data = synthetic.encode(np.zeros((600, 800, 3), np.uint8))
    monkeypatch.setattr(LearnedFaceCodec, "entropy_coder", lambda *a: pytest.fail("decoded despite the budget"))
    with pytest.raises(CodecError, match="800x600 picture .* over the budget of 262,144 pixels"):
        synthetic.decode(data, max_pixels=512 * 512)
    tall = _stream(synthetic, b"", 1, 4096)  # 4096 pixels, but decoded as 16x4096
    with pytest.raises(CodecError, match=r"16x4096 once padded .* over the budget"):
        synthetic.decode(tall, max_pixels=16 * 4096 - 1)


def test_the_budget_passes_a_streamed_crop_and_the_default_is_unchanged(synthetic: LearnedFaceCodec) -> None:
    crop = synthetic.encode(np.full((128, 128, 3), 90, np.uint8))
    assert synthetic.decode(crop, max_pixels=128 * 128).shape == (128, 128, 3)
    assert synthetic.decode(synthetic.encode(np.zeros((600, 800, 3), np.uint8))).shape == (600, 800, 3)


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(create_codec("jpeg", 80).encode(np.full((32, 32, 3), 128, np.uint8)))
    offset = fuzz_codecs._jpeg_size_offset(bytes(data))
    assert offset is not None
    data[offset : offset + 4] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_picture_claiming_a_huge_size_is_refused_from_its_header() -> None:
    """Was: a 700-byte JPEG face payload claiming 30000x30000 decoded for seconds into gigabytes."""
    bomb = _jpeg_claiming(30000, 30000)
    with pytest.raises(CodecError, match="30000x30000, over the budget of 2,097,152 pixels"):
        create_codec("jpeg").decode(bomb)
    with pytest.raises(CodecError, match="30000x30000, over the budget of 262,144"):
        decode_image(bomb, max_pixels=512 * 512)
    with pytest.raises(CodecError, match="larger than 4096 pixels on a side"):
        decode_image(bomb, max_side=4096)
    png = create_codec("png").encode(np.zeros((40, 30, 3), np.uint8))
    assert decode_image(png, max_pixels=1200).shape == (40, 30, 3)
    with pytest.raises(CodecError, match="30x40, over the budget of 1,199"):
        decode_image(png, max_pixels=1199)


def test_a_face_codec_decodes_only_its_own_format() -> None:
    png = create_codec("png").encode(np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(CodecError, match="could not be decoded: not a JPEG picture \\(png"):
        create_codec("jpeg").decode(png)
    bmp = b"BM" + bytes(60)
    with pytest.raises(CodecError, match="not a WEBP picture \\(unknown format"):
        create_codec("webp").decode(bmp)


def test_a_tiny_webp_with_a_side_limit_is_not_a_cv2_error() -> None:
    """Was: the 1/8-scale probe decode of a picture under 8 pixels wide raised cv2.error."""
    webp = create_codec("webp", 90).encode(np.zeros((40, 1, 3), np.uint8))
    assert decode_image(webp, max_side=4096).shape == (40, 1, 3)


def test_a_png_chunk_longer_than_the_payload_is_refused_before_opencv_allocates_it() -> None:
    """Was: OpenCV allocated the declared length first: 4 GB and 15 s for a 700-byte payload."""
    png = bytearray(create_codec("png").encode(np.zeros((16, 16, 3), np.uint8)))
    idat = png.index(b"IDAT") - 4
    png[idat : idat + 4] = struct.pack(">I", 0xFFFF7FC1)
    bomb = fuzz_codecs.fix_png_crcs(bytes(png))
    for decode in (create_codec("png").decode, decode_image):
        with pytest.raises(CodecError, match="'IDAT' chunk claims 4,294,934,465 bytes"):
            decode(bomb)


def test_an_animated_png_is_refused() -> None:
    """Was: a corrupt APNG frame sequence (first fcTL renamed, a bad filter byte) crashed the whole
    process with SIGSEGV inside OpenCV's APNG reader; the same bytes without acTL are refused."""
    import cv2

    if not hasattr(cv2, "imencodeanimation"):
        pytest.skip("this OpenCV has no APNG writer")
    animation = cv2.Animation()
    animation.frames, animation.durations = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)], [40, 40]
    ok, apng = cv2.imencodeanimation(".png", animation)
    assert ok
    for decode in (create_codec("png").decode, decode_image):
        with pytest.raises(CodecError, match="animated PNG"):
            decode(apng.tobytes())


def test_a_jpeg_with_hundreds_of_scans_is_refused() -> None:
    """Each scan is a pass over the picture (3000 empty scans: ~0.4 s on 2 MP here)."""
    jpeg = create_codec("jpeg").encode(np.zeros((16, 16, 3), np.uint8))
    start = jpeg.index(b"\xff\xda")
    empty_scan = jpeg[start : start + 2 + struct.unpack(">H", jpeg[start + 2 : start + 4])[0]] + b"\x00" * 4
    spun = jpeg[:-2] + empty_scan * 200 + jpeg[-2:]
    with pytest.raises(CodecError, match="201 scans, more than the 100"):
        decode_image(spun)


def test_random_bytes_behind_a_valid_learned_header_raise_only_codec_error(synthetic: LearnedFaceCodec) -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        body = bitstream.MAGIC + bytes([rng.integers(1, 3)]) + synthetic.manifest.tag + rng.bytes(int(rng.integers(1, 64)))
        data = body + struct.pack("<I", zlib.crc32(body))
        try:
            synthetic.decode(data)
        except CodecError:
            pass


# -- memory ------------------------------------------------------------------------------------
_RSS_PROBE = textwrap.dedent("""
    import gc, sys
    from pathlib import Path
    import numpy as np
    from facelink.runtime.codecs.learned import LearnedFaceCodec

    def rss_mb():
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
        return int(line.split()[1]) / 1024

    codec = LearnedFaceCodec.load(sys.argv[1], quality=1)
    y, x = np.mgrid[0:720, 0:1280]
    picture = np.stack([x * 255 // 1280, y * 255 // 720, ((x // 40 + y // 40) % 2) * 200], -1).astype(np.uint8)
    large = codec.encode(picture)
    crop = codec.encode(picture[:128, :128].copy())
    del codec.encoder_backend  # only the decoder's memory is measured
    codec.decode(crop); gc.collect()
    before = rss_mb()
    codec.decode(large); gc.collect()
    print(rss_mb() - before)
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RSS from /proc")
def test_memory_is_given_back_after_a_large_decode() -> None:
    """Was: ONNX Runtime's CPU arena kept the largest decode's activations for the life of the
    process (about 0.9 GB after one 1920x1080 picture; about 400 MB after 1280x720)."""
    name = "default" if "default" in _shipped() else (_shipped() or pytest.skip("no learned codec is bundled"))[0]
    probe = subprocess.run([sys.executable, "-c", _RSS_PROBE, name], capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    grown = float(probe.stdout.split()[-1])
    assert grown < 100, f"RSS grew by {grown:.0f} MB after a 1280x720 decode and stayed there"
