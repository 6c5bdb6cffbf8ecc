"""A pure-Python (+ numpy) rANS coder, bit-exact with the parts of `constriction` the learned codec uses.

`constriction` (Rust) has wheels for x86_64 and macOS only: no Linux aarch64 wheel and no source
package, so a Jetson cannot install it. This module reproduces exactly what
`runtime/codecs/entropy.py` asks of it, so that the streams written by either coder are the same
bytes and each decodes the other's:

- `AnsCoder`: `constriction.stream.stack.AnsCoder`, i.e. Rust's `DefaultAnsCoder`
  (`AnsCoder<u32, u64>`): a stack of 32-bit words below a 64-bit state, 24-bit probabilities.
  Encoding a symbol with left cumulative `l` and probability `p` (both out of 2**24):
  if `state >> 40 >= p` the low word of the state is pushed and the state shifted right by 32;
  then `state = (state // p) << 24 | (l + state % p)`. Decoding inverts it: with
  `q = state & (2**24 - 1)`, find the symbol whose interval holds `q`, then
  `state = (state >> 24) * p + q - l`, and if `state < 2**32` and a word is left, pull the
  topmost word back in: `state = state << 32 | word`. The compressed data is the word stack,
  bottom first, followed by the state's nonzero 32-bit words least significant first (so the last
  word is never zero: constriction's `from_compressed` refuses data that ends in one). The
  initial state is read from the end: the last word, then one more while the state is < 2**32.
- `Categorical(probabilities, perfect=False)`: `DefaultContiguousCategoricalEntropyModel::
  from_floating_point_probabilities_fast` (constriction >= 0.4 with `perfect=False`). With `n`
  float probabilities, `free = 2**24 - n`, `scale = free / sum(p)` (a left-to-right sum in the
  input's float type), the left cumulative of symbol `i` is
  `trunc(scale * (p[0] + ... + p[i-1])) + i` (again summed left to right), and the last symbol's
  interval ends at 2**24. Every symbol gets at least probability 1 / 2**24. Only `perfect=False`
  is implemented (`perfect=True` is constriction's slow KL-optimal quantisation, which facelink
  does not use).
- `Uniform(size)`: `DefaultUniformModel` (`UniformModel<u32, 24>`): every symbol gets
  `2**24 // size`, the last symbol the rest.

Decoding never fails on garbage except for compressed data that ends in a zero word (a
CodecError, as constriction's ValueError is in entropy.py); every decode loop runs exactly the
number of symbols asked for, and decoding past the end of the data is deterministic (as in
constriction: the state just runs down).
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from .base import CodecError

PRECISION = 24
_TOTAL = 1 << PRECISION
_QUANTILE_MASK = _TOTAL - 1
_WORD_BITS = 32
_WORD_MASK = (1 << _WORD_BITS) - 1
_STATE_BITS = 64
_RENORM_SHIFT = _STATE_BITS - PRECISION  # encoder: flush a word when state >> 40 >= probability
_STATE_MIN = 1 << (_STATE_BITS - _WORD_BITS)  # decoder: refill while state < 2**32


def quantized_cdf(probabilities: np.ndarray) -> np.ndarray:
    """constriction's `fast_quantized_cdf` at 24-bit precision: the (n + 1,) int64 CDF, 0 .. 2**24.

    The arithmetic runs in the input's float type (float64 or float32), as constriction's does.
    """
    p = np.asarray(probabilities)
    if p.ndim != 1:
        raise ValueError("probabilities must be a rank-1 array")
    if p.dtype not in (np.float32, np.float64):
        p = p.astype(np.float64)
    n = len(p)
    if n < 2 or n >= _TOTAL - 1:
        raise ValueError(f"a categorical model needs 2 .. 2**24 - 2 probabilities, got {n}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    ftype = p.dtype.type
    # Left-to-right sums (np.cumsum is a sequential accumulation, like Rust's iterator sum).
    cumulative = np.cumsum(p, dtype=p.dtype)
    normalization = cumulative[-1]
    if not (np.isfinite(normalization) and normalization >= np.finfo(p.dtype).tiny):
        raise ValueError("probabilities are not normalisable (their sum is zero, subnormal or infinite)")
    scale = ftype(_TOTAL - n) / normalization
    left = np.empty(n, dtype=p.dtype)
    left[0] = 0
    left[1:] = cumulative[:-1]
    scaled = left * scale  # element-wise IEEE products in the input's type, as in Rust
    # Rust's `as u32`: truncation towards zero (the products are in [0, 2**24]).
    cdf = np.empty(n + 1, dtype=np.int64)
    cdf[:n] = np.trunc(scaled).astype(np.int64) + np.arange(n, dtype=np.int64)
    cdf[n] = _TOTAL
    return cdf


class Categorical:
    """A fixed categorical model over 0 .. n-1 (constriction's `Categorical(p, perfect=False)`)."""

    def __init__(self, probabilities: np.ndarray, perfect: bool = False, lazy: bool | None = None) -> None:
        if perfect:
            raise NotImplementedError("only perfect=False (constriction's fast quantisation) is implemented")
        cdf = quantized_cdf(probabilities)
        self.cdf = cdf
        self.probabilities = np.diff(cdf)  # fixed point, out of 2**24, each >= 1
        self.support = len(cdf) - 1
        self._cdf_list: list[int] = cdf.tolist()
        self._prob_list: list[int] = self.probabilities.tolist()

    def _intervals(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if symbols.size and (symbols.min() < 0 or symbols.max() >= self.support):
            raise ValueError(f"symbol outside the categorical model's support 0..{self.support - 1}")
        probability = self.probabilities[symbols]
        if symbols.size and probability.min() == 0:
            # constriction's fast quantisation of float32 input can leave the last symbol an empty
            # interval (its scaled cumulative rounds up to 2**24); it refuses to encode it too.
            raise ValueError("symbol has zero probability under the categorical model")
        return self.cdf[symbols], probability


class Uniform:
    """A uniform model over 0 .. size-1 (constriction's `Uniform(size)`, 24-bit precision)."""

    def __init__(self, size: int) -> None:
        size = int(size)
        if not 2 <= size <= _TOTAL:
            raise ValueError(f"a uniform model needs 2 .. 2**24 symbols, got {size}")
        self.size = size
        self.per_bin = _TOTAL // size
        self.last = size - 1
        self.last_left = self.last * self.per_bin
        self.last_probability = _TOTAL - self.last_left

    def _intervals(self, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if symbols.size and (symbols.min() < 0 or symbols.max() > self.last):
            raise ValueError(f"symbol outside the uniform model's range 0..{self.last}")
        left = symbols * self.per_bin
        probability = np.where(symbols == self.last, self.last_probability, self.per_bin)
        return left, probability



class AnsCoder:
    """constriction's `stream.stack.AnsCoder` (32-bit words, 64-bit state, 24-bit precision).

    `AnsCoder()` to encode; `AnsCoder(words)` (uint32 array, as `get_compressed` returns) to decode.
    """

    def __init__(self, compressed: np.ndarray | None = None) -> None:
        self._bulk: list[int] = []
        self._state = 0
        if compressed is None:
            return
        words = np.asarray(compressed)
        if words.ndim != 1:
            raise ValueError("compressed data must be a rank-1 array of 32-bit words")
        bulk = words.astype(np.uint32, copy=False).tolist()
        if not bulk:
            return
        state = bulk.pop()
        if state == 0:
            raise CodecError("corrupt payload: the entropy decoder failed (ANS compressed data never ends in a zero word)")
        if bulk:  # the first word is nonzero, so one more makes the state >= 2**32
            state = (state << _WORD_BITS) | bulk.pop()
        self._state = state
        self._bulk = bulk

    # -- state -----------------------------------------------------------------------------------
    def is_empty(self) -> bool:
        return self._state == 0

    def num_words(self) -> int:
        return len(self._bulk) + len(self._state_words())

    def _state_words(self) -> list[int]:
        state = self._state
        if state == 0:
            return []
        if state <= _WORD_MASK:
            return [state]
        return [state & _WORD_MASK, state >> _WORD_BITS]

    def get_compressed(self) -> np.ndarray:
        return np.array(self._bulk + self._state_words(), dtype=np.uint32)

    # -- encoding --------------------------------------------------------------------------------
    def encode_reverse(self, symbols: np.ndarray, model: "Categorical | Uniform") -> None:
        """Push `symbols` (rank 1) so that `decode` gives them back in their order."""
        symbols = np.asarray(symbols)
        if symbols.ndim == 0:
            symbols = symbols[None]
        if symbols.ndim != 1 or symbols.dtype.kind not in "iu":
            raise ValueError("symbols must be a rank-1 integer array")
        left, probability = model._intervals(symbols.astype(np.int64, copy=False)[::-1])
        self._push(left.tolist(), probability.tolist())

    def _push(self, lefts: list[int], probabilities: list[int]) -> None:
        # The hot loop, with the constants inlined: 40 = _RENORM_SHIFT, 32 = _WORD_BITS, 24 = PRECISION.
        state = self._state
        flush = self._bulk.append
        for left, probability in zip(lefts, probabilities):
            if state >> 40 >= probability:
                flush(state & 0xFFFFFFFF)
                state >>= 32
            prefix, remainder = divmod(state, probability)
            state = (prefix << 24) | (left + remainder)
        self._state = state

    # -- decoding --------------------------------------------------------------------------------
    def decode(self, model: "Categorical | Uniform", amt: int | None = None) -> np.ndarray | int:
        """Pop `amt` symbols (an int32 array), or one symbol (an int) when `amt` is None."""
        count = 1 if amt is None else int(amt)
        if count < 0:
            raise ValueError("cannot decode a negative number of symbols")
        if isinstance(model, Categorical):
            out = self._pop_categorical(model, count)
        else:
            out = self._pop_uniform(model, count)
        return out[0] if amt is None else np.array(out, dtype=np.int32)

    def _pop_categorical(self, model: Categorical, count: int) -> list[int]:
        # The hot loop, constants inlined: 0xFFFFFF = _QUANTILE_MASK, 24 = PRECISION, 2**32 = _STATE_MIN.
        cdf, probabilities = model._cdf_list, model._prob_list
        state, bulk = self._state, self._bulk
        refill = bulk.pop
        out = [0] * count
        for i in range(count):
            quantile = state & 0xFFFFFF
            symbol = bisect_right(cdf, quantile) - 1
            state = (state >> 24) * probabilities[symbol] + quantile - cdf[symbol]
            if state < 0x100000000 and bulk:
                state = (state << 32) | refill()
            out[i] = symbol
        self._state = state
        return out

    def _pop_uniform(self, model: Uniform, count: int) -> list[int]:
        per_bin, last, last_left, last_probability = model.per_bin, model.last, model.last_left, model.last_probability
        state, bulk = self._state, self._bulk
        out = [0] * count
        for i in range(count):
            quantile = state & _QUANTILE_MASK
            symbol = quantile // per_bin
            if symbol < last:
                state = (state >> PRECISION) * per_bin + quantile - symbol * per_bin
            else:
                symbol = last
                state = (state >> PRECISION) * last_probability + quantile - last_left
            if state < _STATE_MIN and bulk:
                state = (state << _WORD_BITS) | bulk.pop()
            out[i] = symbol
        self._state = state
        return out


# -- all channels at once (what entropy.py codes): the same words, less numpy per channel --------
def encode_channels_reverse(coder: AnsCoder, rows: np.ndarray, models: "list[Categorical]") -> None:
    """Push `rows[c]` (C, N) with `models[c]` for c = C-1 .. 0, each row reversed, so that
    `decode_channels` pops row 0 first: the same words as C calls of `encode_reverse`."""
    rows = np.asarray(rows)
    if rows.ndim != 2 or len(rows) != len(models) or rows.dtype.kind not in "iu":
        raise ValueError("rows must be a (channels, N) integer array, one row per model")
    rows = rows.astype(np.int64, copy=False)
    supports = np.array([m.support for m in models], dtype=np.int64)
    if rows.size and ((rows < 0) | (rows >= supports[:, None])).any():
        raise ValueError("symbol outside its channel's categorical support")
    lefts = np.concatenate([m.cdf[r] for m, r in zip(models, rows)]) if len(models) else np.zeros(0, np.int64)
    probabilities = np.concatenate([m.probabilities[r] for m, r in zip(models, rows)]) if len(models) else lefts
    if probabilities.size and probabilities.min() == 0:
        raise ValueError("symbol has zero probability under its channel's categorical model")
    coder._push(lefts[::-1].tolist(), probabilities[::-1].tolist())


def decode_channels(coder: AnsCoder, models: "list[Categorical]", count: int) -> np.ndarray:
    """Pop `count` symbols per model, model 0 first: the (C, count) int32 array."""
    out: list[int] = []
    for model in models:
        out += coder._pop_categorical(model, count)
    return np.array(out, dtype=np.int32).reshape(len(models), count)

