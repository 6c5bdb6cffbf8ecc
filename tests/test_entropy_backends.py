"""The learned codec's two entropy backends write and read the very same bytes.

`constriction` (Rust) has no Linux aarch64 wheel, so a Jetson codes with the pure-Python coder in
runtime/codecs/ans.py. These tests prove the two interchangeable: random models, latents and
escapes coded by both give identical bytes, each decodes the other's streams (and garbage the same
way), the committed golden streams decode identically with FACELINK_ENTROPY=python, and the pure
coder answers mutated learned-codec streams with nothing but CodecError, quickly. The
differential tests need constriction (x86_64 / macOS); the rest run anywhere.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

from facelink.runtime.codecs import CodecError, ans, bitstream
from facelink.runtime.codecs.entropy import (
    ENTROPY_BACKEND_ENV,
    ChannelTables,
    FactorizedEntropyCoder,
    entropy_backend,
)
from facelink.runtime.codecs.learned import LearnedFaceCodec, codec_manifests

from .learned_codec_fixture import laplace_tables
from .test_learned_codec_runtime import coder as golden_entropy_coder

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent

try:
    from constriction import stream
except ImportError:  # a Jetson: only the pure coder, and the golden streams to check it against
    stream = None
needs_constriction = pytest.mark.skipif(stream is None, reason="the differential tests need constriction (x86_64/macOS)")


def _random_pmf(rng: np.random.Generator, kind: int) -> np.ndarray:
    n = int(rng.choice([2, 3, int(rng.integers(4, 70)), int(rng.integers(70, 3000))]))
    if kind == 0:
        p = rng.random(n)
    elif kind == 1:  # sparse: exact zeros, which still get the smallest probability
        p = rng.laplace(size=n) ** 2 * (rng.random(n) < 0.6)
    elif kind == 2:  # a peaked discrete Laplace, with tails far below 2**-24
        p = np.exp(-np.abs(np.arange(n) - rng.random() * n) * rng.random() * 4)
    elif kind == 3:
        p = rng.dirichlet(np.full(n, 0.05))
    else:  # a huge dynamic range, unnormalised
        p = 10.0 ** rng.uniform(-300, 300, n)
    if not p.sum() > 0:
        p[0] = 1.0
    return p


def _seeded(coder_class, rng: np.random.Generator):  # noqa: ANN001, ANN202
    """An ANS coder holding a random state (and a few words below it)."""
    words = rng.integers(0, 1 << 32, size=int(rng.integers(1, 4)), dtype=np.uint64).astype(np.uint32)
    words[-1] |= 1
    return coder_class(words)


# -- the models and the coder, against constriction ------------------------------------------------
@needs_constriction
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_symbol_of_random_categoricals_codes_to_the_same_words(dtype: type) -> None:
    """Pushing one symbol on a random state reveals its fixed-point interval: constriction's
    float -> 24-bit quantisation (perfect=False) is reproduced exactly, symbol by symbol."""
    rng = np.random.default_rng(11)
    refused = 0
    for trial in range(150):
        with np.errstate(over="ignore"):
            p = _random_pmf(rng, trial % 5).astype(dtype)
        if not np.isfinite(p.sum()) or not p.sum() > 0:
            continue  # float32 overflow or underflow of the wide-range kind
        theirs, ours = stream.model.Categorical(p, perfect=False), ans.Categorical(p)
        for symbol in np.unique(np.r_[0, len(p) - 1, rng.integers(0, len(p), 40)]):
            seed = rng.integers(0, 1 << 30)
            a, b = _seeded(stream.stack.AnsCoder, np.random.default_rng(seed)), _seeded(ans.AnsCoder, np.random.default_rng(seed))
            try:
                a.encode_reverse(np.array([symbol], np.int32), theirs)
            except KeyError:  # float32 rounding can leave constriction's last symbol empty
                with pytest.raises(ValueError, match="zero probability"):
                    b.encode_reverse(np.array([symbol], np.int32), ours)
                refused += 1
                continue
            b.encode_reverse(np.array([symbol], np.int32), ours)
            np.testing.assert_array_equal(a.get_compressed(), b.get_compressed(), err_msg=f"trial {trial} symbol {symbol}")
    assert refused < 5


@needs_constriction
def test_random_sequences_give_identical_words_and_cross_decode() -> None:
    rng = np.random.default_rng(12)
    for trial in range(120):
        p = _random_pmf(rng, trial % 5)
        size = int(rng.choice([2, 3, 32, 1000, 1 << 13, (1 << 24) - 1, 1 << 24, int(rng.integers(2, 1 << 24))]))
        symbols = rng.integers(0, len(p), int(rng.integers(0, 400))).astype(np.int32)
        uniform = rng.integers(0, size, int(rng.integers(0, 6))).astype(np.int32)
        theirs = stream.stack.AnsCoder()
        theirs.encode_reverse(uniform, stream.model.Uniform(size))
        theirs.encode_reverse(symbols, stream.model.Categorical(p, perfect=False))
        ours = ans.AnsCoder()
        ours.encode_reverse(uniform, ans.Uniform(size))
        ours.encode_reverse(symbols, ans.Categorical(p))
        words = theirs.get_compressed()
        np.testing.assert_array_equal(ours.get_compressed(), words, err_msg=f"trial {trial}")
        # Each decodes the other's words.
        for decoder, model, uniform_model in (
            (ans.AnsCoder(words), ans.Categorical(p), ans.Uniform(size)),
            (stream.stack.AnsCoder(ours.get_compressed()), stream.model.Categorical(p, perfect=False), stream.model.Uniform(size)),
        ):
            np.testing.assert_array_equal(decoder.decode(model, len(symbols)), symbols)
            np.testing.assert_array_equal(decoder.decode(uniform_model, len(uniform)), uniform)
            assert decoder.is_empty()


@needs_constriction
def test_garbage_decodes_to_the_same_symbols_and_leftover() -> None:
    """ANS decodes any words (and past their end) deterministically: both must agree there too,
    or a corrupt stream could be refused by one backend and decoded by the other."""
    rng = np.random.default_rng(13)
    for trial in range(150):
        p = _random_pmf(rng, trial % 5)
        size = int(rng.integers(2, (1 << 24) + 1))
        words = rng.integers(0, 1 << 32, size=int(rng.integers(1, 30)), dtype=np.uint64).astype(np.uint32)
        words[-1] |= rng.integers(1, 1 << 32, dtype=np.uint64).astype(np.uint32)
        theirs, ours = stream.stack.AnsCoder(words), ans.AnsCoder(words)
        count = int(rng.integers(0, 300))
        np.testing.assert_array_equal(ours.decode(ans.Categorical(p), count), theirs.decode(stream.model.Categorical(p, perfect=False), count))
        np.testing.assert_array_equal(ours.decode(ans.Uniform(size), 3), theirs.decode(stream.model.Uniform(size), 3))
        assert ours.is_empty() == theirs.is_empty()
        np.testing.assert_array_equal(ours.get_compressed(), theirs.get_compressed())


def _random_tables(rng: np.random.Generator) -> ChannelTables:
    channels = int(rng.integers(1, 12))
    width = int(rng.integers(3, 60))
    length = rng.integers(2, width + 1, channels)
    pmf = np.zeros((channels, width), np.float32)
    for c, n in enumerate(length):
        row = np.exp(-np.abs(np.arange(n - 1) - (n - 1) / 2) * rng.uniform(0.05, 2))
        pmf[c, : n - 1] = row / row.sum() * (1 - 1e-4)
        pmf[c, n - 1] = rng.choice([1e-4, 1e-9, 0.0])  # the escape
    offset = -(length - 1) // 2 + rng.integers(-2, 3, channels)
    return ChannelTables(pmf, length.astype(np.int64), offset.astype(np.int64))


@needs_constriction
def test_random_latents_with_escapes_give_identical_payloads_and_cross_decode() -> None:
    rng = np.random.default_rng(14)
    for trial in range(40):
        tables = _random_tables(rng)
        h, w = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        symbols = np.rint(rng.laplace(0, rng.uniform(0.3, 4), (len(tables.length), h, w))).astype(np.int64)
        escapes = rng.random(symbols.shape) < 0.05
        symbols[escapes] = rng.integers(-(1 << 23), 1 << 23, int(escapes.sum()))
        rust = FactorizedEntropyCoder(tables, backend="constriction")
        python = FactorizedEntropyCoder(tables, backend="python")
        assert (rust.backend, python.backend) == ("constriction", "python")
        payload = rust.encode(symbols)
        assert python.encode(symbols) == payload, f"trial {trial}"
        np.testing.assert_array_equal(python.decode(payload, h, w), symbols)
        np.testing.assert_array_equal(rust.decode(payload, h, w), symbols)


# -- the committed streams, with the pure coder ---------------------------------------------------
def test_the_golden_entropy_stream_with_the_pure_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "python")
    golden = np.load(DATA / "golden_entropy.npz")
    coder = golden_entropy_coder()
    assert coder.backend == "python"
    np.testing.assert_array_equal(coder.decode(golden["payload"].tobytes(), 4, 4), golden["symbols"])
    assert coder.encode(golden["symbols"]) == golden["payload"].tobytes()


@pytest.mark.parametrize("name", sorted(codec_manifests()))
def test_shipped_golden_streams_with_the_pure_coder(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same bytes -> same symbols -> same pixels, and the same symbols -> the same bytes."""
    golden = np.load(DATA / f"golden_codec_{name}.npz")
    data = golden["stream"].tobytes()
    header, payload = bitstream.unpack(data)
    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "python")
    codec = LearnedFaceCodec.load(name, quality=header.quality)
    coder = codec.entropy_coder(header.quality)
    assert coder.backend == "python"
    symbols = coder.decode(payload, *codec.latent_size(header.width, header.height))
    np.testing.assert_array_equal(symbols, golden["symbols"])
    assert coder.encode(symbols) == payload
    pixels = codec.decode(data)
    if stream is not None:
        monkeypatch.setenv(ENTROPY_BACKEND_ENV, "constriction")
        np.testing.assert_array_equal(LearnedFaceCodec.load(name, quality=header.quality).decode(data), pixels)


def test_a_round_trip_through_a_shipped_codec_with_the_pure_coder(monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_learned_codec_runtime import smooth_face

    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "python")
    name = "default" if "default" in codec_manifests() else sorted(codec_manifests())[0]
    codec = LearnedFaceCodec.load(name, quality=2)
    data = codec.encode(smooth_face(112, 96))
    assert codec.decode(data).shape == (112, 96, 3)
    if stream is not None:  # what a Jetson sends, the cloud (constriction) reads, and back
        monkeypatch.setenv(ENTROPY_BACKEND_ENV, "constriction")
        other = LearnedFaceCodec.load(name, quality=2)
        assert other.encode(smooth_face(112, 96)) == data
        np.testing.assert_array_equal(other.decode(data), codec.decode(data))


# -- garbage, with the pure coder -----------------------------------------------------------------
def _escape_payload(coder: FactorizedEntropyCoder, nbits: int) -> bytes:
    """A one-cell latent whose first channel is escaped, with an escape length of `nbits` and no
    value after it (bytes no encoder writes when nbits > 24), made with the pure coder."""
    tables = coder.tables
    symbols = np.zeros(coder.channels, np.int32)
    symbols[0] = tables.length[0] - 1
    packed = ans.AnsCoder()
    packed.encode_reverse(np.array([nbits], np.int32), ans.Uniform(32))
    for c in reversed(range(coder.channels)):
        packed.encode_reverse(symbols[c : c + 1], ans.Categorical(tables.pmf[c, : tables.length[c]].astype(np.float64)))
    return packed.get_compressed().astype("<u4").tobytes()


@pytest.mark.parametrize("nbits", [25, 31])
def test_the_pure_coder_refuses_an_escape_longer_than_any_encoder_writes(nbits: int) -> None:
    coder = golden_entropy_coder_python()
    with pytest.raises(CodecError, match=f"escaped value of {nbits} bits"):
        coder.decode(_escape_payload(coder, nbits), 1, 1)


def golden_entropy_coder_python() -> FactorizedEntropyCoder:
    t = laplace_tables()
    tables = ChannelTables(t["pmf"][1], t["length"][1].astype(np.int64), t["offset"][1].astype(np.int64))
    return FactorizedEntropyCoder(tables, backend="python")


def test_the_pure_coder_refuses_a_trailing_zero_word_and_odd_lengths() -> None:
    coder = golden_entropy_coder_python()
    with pytest.raises(CodecError, match="entropy decoder failed"):
        coder.decode(b"\x01\x00\x00\x00" + b"\x00" * 4, 1, 1)
    with pytest.raises(CodecError, match="whole number of 32-bit words"):
        coder.decode(b"\x01\x00\x00", 1, 1)
    with pytest.raises(ValueError, match="out of range"):
        symbols = np.zeros((coder.channels, 1, 1), np.int64)
        symbols[0, 0, 0] = 1 << 26
        coder.encode(symbols)


def test_random_words_give_only_codec_errors_or_symbols() -> None:
    coder = golden_entropy_coder_python()
    rng = np.random.default_rng(15)
    for _ in range(300):
        payload = rng.bytes(4 * int(rng.integers(0, 40)))
        try:
            symbols = coder.decode(payload, int(rng.integers(1, 5)), int(rng.integers(1, 5)))
        except CodecError:
            continue
        assert symbols.dtype == np.int64 and symbols.shape[0] == coder.channels


FUZZ_INPUTS = 500


def test_mutated_learned_streams_through_the_pure_coder_give_only_codec_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample of the fuzzer's mutations of shipped-codec streams (header and payload), decoded
    with FACELINK_ENTROPY=python in this process: an image or a CodecError, nothing else, fast;
    and where constriction is installed, the very same outcome with it."""
    from facelink.benchmarks import fuzz_codecs
    from facelink.runtime.codecs import available_codecs

    learned = sorted(c for c in available_codecs() if c.startswith("flc-"))
    if not learned:
        pytest.skip("no learned codec is bundled")
    pictures = fuzz_codecs.synthetic_pictures(np.random.default_rng(0), ((128, 128), (37, 53), (16, 16)))
    seeds = [s for codec_id in learned for s in fuzz_codecs._learned_seeds(codec_id, pictures, (1, 3))]
    items = [fuzz_codecs.make_input(i, seeds, base_seed=7) for i in range(FUZZ_INPUTS)]

    def outcomes(backend: str) -> list[tuple[str, object]]:
        monkeypatch.setenv(ENTROPY_BACKEND_ENV, backend)
        decoders, found = fuzz_codecs.Decoders(), []
        for item in items:
            start = time.perf_counter()
            try:
                image = decoders.decode(item.target, item.data, item.max_pixels)
                found.append(("decoded", image.tobytes()))
            except CodecError as error:
                found.append(("codec error", str(error)))
            assert time.perf_counter() - start < 5.0, f"input {item.index} ({item.kind}) took too long"
        return found

    start = time.perf_counter()
    python = outcomes("python")
    elapsed = time.perf_counter() - start
    kinds = {kind for kind, _ in python}
    assert kinds == {"decoded", "codec error"}  # both paths were exercised
    assert elapsed < 120, f"{FUZZ_INPUTS} inputs took {elapsed:.0f} s with the pure coder"
    if stream is not None:
        rust = outcomes("constriction")
        differ = [i for i, (a, b) in enumerate(zip(python, rust)) if a[0] != b[0] or (a[0] == "decoded" and a != b)]
        assert not differ, f"the backends disagree on inputs {differ[:10]}"


# -- choosing the backend -------------------------------------------------------------------------
def test_the_backend_follows_the_environment_and_falls_back_without_constriction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "python")
    assert entropy_backend().name == "python"
    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="unknown entropy backend 'bogus'"):
        entropy_backend()
    monkeypatch.delenv(ENTROPY_BACKEND_ENV)
    assert entropy_backend().name == ("python" if stream is None else "constriction")
    monkeypatch.setitem(sys.modules, "constriction", None)  # as on a Jetson: the import fails
    assert entropy_backend().name == "python"
    assert golden_entropy_coder().backend == "python"
    monkeypatch.setenv(ENTROPY_BACKEND_ENV, "constriction")
    with pytest.raises(CodecError, match="not installed"):
        entropy_backend()


def test_constriction_is_only_required_where_it_has_wheels() -> None:
    """Its wheels: manylinux x86_64, Windows AMD64, macOS. A Jetson (Linux aarch64) installs
    without it and codes with the pure coder."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    Marker = pytest.importorskip("packaging.markers").Marker
    Requirement = pytest.importorskip("packaging.requirements").Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (line,) = [d for d in dependencies if Requirement(d).name == "constriction"]
    marker = Requirement(line).marker
    assert isinstance(marker, Marker)

    def wanted(machine: str, platform: str) -> bool:
        return marker.evaluate({"platform_machine": machine, "sys_platform": platform, "python_version": "3.10"})

    assert wanted("x86_64", "linux") and wanted("AMD64", "win32") and wanted("arm64", "darwin") and wanted("x86_64", "darwin")
    assert not wanted("aarch64", "linux") and not wanted("armv7l", "linux")
