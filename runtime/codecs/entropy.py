"""Static entropy coding of the latent with per-channel tables (a factorised prior).

The tables are exported once with the weights, so encoder and decoder hold exactly the same
probabilities on every machine: decoding depends only on the bytes. Coding is done by an rANS
coder (32-bit words, 64-bit state, 24-bit probabilities); this module only maps latent values
onto its symbols. Two interchangeable backends write and read the very same bytes:

- `constriction` (Rust, fast), used when it is importable. It has wheels for x86_64 and macOS
  only, so it is an optional dependency on other platforms (a Jetson: Linux aarch64);
- `runtime/codecs/ans.py`, a pure-Python + numpy reimplementation of exactly what is used here
  (the ANS stack coder, `Categorical(p, perfect=False)` and `Uniform`), bit-exact with it and
  slower (see ans.py), used when constriction is not installed.

`FACELINK_ENTROPY=python|constriction` (or `FactorizedEntropyCoder(tables, backend=...)`)
forces one, for tests and benchmarks; `entropy_backend()` says which one is used.

Per channel c the table covers symbols `offset[c] .. offset[c] + len(pmf[c]) - 2`; the last
entry of `pmf[c]` is an escape for values outside that range (CompressAI's layout). Escaped
values travel after all regular symbols: their bit length (uniform over 0..31), then their
bits (uniform), so that a rare outlier costs a few bytes instead of breaking the stream.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import CodecError

_MAX_ESCAPE_BITS = 31  # an escape's bit length is coded uniformly over 0..31 (the wire format)
#: constriction's `Uniform` model has 24-bit precision: it codes at most 2**24 values, and a larger
#: one panics. So no stream carries an escape longer than 24 bits, and a decoder that reads one
#: is reading garbage.
_MAX_CODED_ESCAPE_BITS = 24
#: What an escape costs at least: its bit length, uniform over 32 values (and its escape symbol,
#: which is improbable, costs far more).
_MIN_BITS_PER_ESCAPE = 5


@contextmanager
def _corrupt_on_failure() -> Iterator[None]:
    """Whatever constriction raises on garbage, as a CodecError.

    It raises ValueError for some bad input (data that does not end in a zero word) and reports a
    violated assertion as pyo3's PanicException, which derives from BaseException so that a plain
    `except Exception` (a gRPC handler's) lets it through and the call never completes. The checks
    in `decode` keep the known panics from happening; this keeps an unknown one a corrupt stream.
    """
    try:
        yield
    except CodecError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of the coder on these bytes
        raise CodecError(f"corrupt payload: the entropy decoder failed ({error})") from error
    except BaseException as error:
        if type(error).__name__ != "PanicException":
            raise
        raise CodecError(f"corrupt payload: the entropy decoder failed ({error})") from error


#: Environment variable that forces an entropy-coder backend: "python" or "constriction".
ENTROPY_BACKEND_ENV = "FACELINK_ENTROPY"
BACKENDS = ("constriction", "python")


@dataclass(frozen=True)
class EntropyBackend:
    """The seam between this module and an ANS implementation: constriction's API, reduced to
    what is used here. Both backends produce identical bytes."""

    name: str
    ans_coder: Callable[..., Any]  # AnsCoder() to encode, AnsCoder(uint32 words) to decode
    categorical: Callable[[np.ndarray], Any]  # float64 probabilities -> a fixed model (perfect=False)
    uniform: Callable[[int], Any]  # size -> a uniform model (24-bit precision)
    #: (coder, (C, N) rows, C models): push every row, the last channel first, each reversed
    encode_channels: Callable[[Any, np.ndarray, list[Any]], None]
    #: (coder, C models, N) -> the (C, N) symbols, channel 0 first
    decode_channels: Callable[[Any, list[Any], int], np.ndarray]


def _encode_each_channel(coder, rows: np.ndarray, models: list[Any]) -> None:  # noqa: ANN001
    for c in reversed(range(len(models))):
        coder.encode_reverse(rows[c], models[c])


def _decode_each_channel(coder, models: list[Any], count: int) -> np.ndarray:  # noqa: ANN001
    return np.stack([coder.decode(model, count) for model in models])


def _constriction_backend() -> EntropyBackend | None:
    try:
        from constriction import stream
    except ImportError:
        return None
    return EntropyBackend("constriction", stream.stack.AnsCoder,
                          lambda p: stream.model.Categorical(p, perfect=False), stream.model.Uniform,
                          _encode_each_channel, _decode_each_channel)


def _python_backend() -> EntropyBackend:
    from . import ans

    return EntropyBackend("python", ans.AnsCoder, ans.Categorical, ans.Uniform,
                          ans.encode_channels_reverse, ans.decode_channels)


def entropy_backend(name: str | None = None) -> EntropyBackend:
    """The backend called `name`, else the one $FACELINK_ENTROPY names, else constriction when it
    is importable and the pure-Python coder otherwise."""
    name = name or os.environ.get(ENTROPY_BACKEND_ENV, "").strip().lower() or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown entropy backend {name!r} (from {ENTROPY_BACKEND_ENV} or the caller): "
                         f"use one of {', '.join(BACKENDS)}")
    if name == "python":
        return _python_backend()
    backend = _constriction_backend()
    if backend is None:
        if name == "constriction":
            raise CodecError("the constriction entropy backend was asked for but is not installed: "
                             "pip install constriction (wheels: x86_64 and macOS), or unset "
                             f"{ENTROPY_BACKEND_ENV} to use the pure-Python coder")
        return _python_backend()
    return backend


@dataclass(frozen=True)
class ChannelTables:
    """Probability tables for one rate point: `pmf` (C, L) zero-padded rows, `length` (C,), `offset` (C,)."""

    pmf: np.ndarray
    length: np.ndarray
    offset: np.ndarray

    def __post_init__(self) -> None:
        if self.pmf.ndim != 2 or self.length.shape != (self.pmf.shape[0],) or self.offset.shape != self.length.shape:
            raise ValueError("entropy tables: pmf (C, L), length (C,) and offset (C,) do not agree")
        if (self.length < 2).any() or (self.length > self.pmf.shape[1]).any():
            raise ValueError("entropy tables: every channel needs 2..L entries (symbols + escape)")


class FactorizedEntropyCoder:
    """Encodes (C, H, W) integer latents channel by channel with fixed per-channel models."""

    def __init__(self, tables: ChannelTables, backend: str | None = None) -> None:
        """`backend`: "constriction" or "python" (default: see `entropy_backend`)."""
        self._backend = entropy_backend(backend)
        self.backend = self._backend.name
        self.tables = tables
        # Built once: constructing a model quantises its probabilities to fixed point, a
        # deterministic step that both ends must do identically (perfect=False on both).
        self._models = [
            self._backend.categorical(tables.pmf[c, : tables.length[c]].astype(np.float64))
            for c in range(tables.pmf.shape[0])
        ]
        self._bits = self._backend.uniform(_MAX_ESCAPE_BITS + 1)
        # An escaped value of n bits is coded uniformly over 0 .. 2**n - 1 (n >= 1).
        self._values = [None] + [self._backend.uniform(1 << n) for n in range(1, _MAX_CODED_ESCAPE_BITS + 1)]
        # Every symbol costs at least its channel's likeliest value's information: a floor on the
        # payload of a latent of a given size, so that a forged header claiming a huge picture is
        # refused at once instead of decoding millions of symbols out of a few bytes.
        likeliest = np.array([row[:n].max() / row[:n].sum() for row, n in zip(tables.pmf, tables.length)])
        self._min_bits_per_cell = float(-np.log2(likeliest).sum())

    @property
    def channels(self) -> int:
        return len(self._models)

    def encode(self, symbols: np.ndarray) -> bytes:
        """(C, H, W) int latent (already rounded around the medians) -> bytes."""
        if symbols.ndim != 3 or symbols.shape[0] != self.channels:
            raise ValueError(f"expected a ({self.channels}, H, W) latent, got {symbols.shape}")
        escape = (self.tables.length - 1).astype(np.int64)[:, None]  # index of each channel's escape
        values = symbols.reshape(self.channels, -1).astype(np.int64) - self.tables.offset[:, None]
        outside = (values < 0) | (values >= escape)
        coded = np.where(outside, escape, values).astype(np.int32)
        # Escaped values as non-negative integers (zig-zag), in channel-major order.
        overflow = values[outside]
        overflow = np.where(overflow < 0, -2 * overflow - 1, 2 * (overflow - np.broadcast_to(escape, values.shape)[outside]))
        coder = self._backend.ans_coder()
        # A stack: push in the reverse of the decoding order (regular symbols first, then escapes).
        for value in overflow[::-1]:
            nbits = int(value).bit_length()
            if nbits > _MAX_CODED_ESCAPE_BITS:
                raise ValueError(f"latent value out of range ({value})")
            if nbits:
                coder.encode_reverse(np.array([value], np.int32), self._values[nbits])
            coder.encode_reverse(np.array([nbits], np.int32), self._bits)
        self._backend.encode_channels(coder, coded, self._models)
        words = coder.get_compressed()
        if sys.byteorder == "big":  # pragma: no cover - the wire format is little-endian
            words = words.byteswap()
        return words.astype("<u4").tobytes()

    def min_bytes(self, cells: int) -> int:
        """A lower bound on the payload of `cells` latent positions (with slack for the coder's
        fixed-point probabilities and its final state)."""
        return max(0, int(0.9 * cells * self._min_bits_per_cell / 8) - 8)

    def decode(self, payload: bytes, height: int, width: int) -> np.ndarray:
        """Bytes -> the (C, height, width) int latent, or a CodecError that says what is wrong."""
        self._check_payload_size(payload, height, width)
        words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
        count = height * width
        escape = (self.tables.length - 1).astype(np.int64)[:, None]  # index of each channel's escape
        with _corrupt_on_failure():
            coder = self._backend.ans_coder(words)
            coded = self._backend.decode_channels(coder, self._models, count).astype(np.int64)
            outside = coded == escape
            overflow = self._decode_escapes(coder, int(outside.sum()), len(payload))
            if not coder.is_empty():
                raise CodecError("corrupt payload: data left over after the last symbol")
        values = coded
        if overflow:
            zigzag = np.array(overflow, dtype=np.int64)
            high = np.broadcast_to(escape, values.shape)[outside]
            values[outside] = np.where(zigzag % 2 == 1, -(zigzag + 1) // 2, high + zigzag // 2)
        return (values + self.tables.offset[:, None]).reshape(self.channels, height, width)

    def _check_payload_size(self, payload: bytes, height: int, width: int) -> None:
        if len(payload) % 4:
            raise CodecError(f"corrupt payload: {len(payload)} bytes is not a whole number of 32-bit words")
        if len(payload) < self.min_bytes(height * width):
            raise CodecError(
                f"corrupt payload: {len(payload)} bytes cannot hold a {width}x{height} latent "
                f"(at least {self.min_bytes(height * width)} bytes)"
            )

    def _decode_escapes(self, coder, count: int, payload_bytes: int) -> list[int]:  # noqa: ANN001
        """The values of `count` escaped symbols, which travel after the regular ones."""
        # Garbage can decode into escapes everywhere; a valid payload pays at least 5 bits for
        # each (slack: the coder's 64-bit state). Refusing more keeps the Python loop below in
        # proportion to the bytes received.
        if count * _MIN_BITS_PER_ESCAPE > payload_bytes * 8 + 64:
            raise CodecError(f"corrupt payload: {count} escaped values cannot fit in {payload_bytes} bytes")
        overflow = []
        for _ in range(count):
            nbits = int(coder.decode(self._bits, 1)[0])
            if nbits > _MAX_CODED_ESCAPE_BITS:
                raise CodecError(f"corrupt payload: an escaped value of {nbits} bits (the coder writes at most "
                                 f"{_MAX_CODED_ESCAPE_BITS})")
            overflow.append(int(coder.decode(self._values[nbits], 1)[0]) if nbits else 0)
        return overflow
