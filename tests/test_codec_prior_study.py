"""export/codec/prior_study.py's estimate: cross-entropy of held-out symbols under per-context tables."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch", reason="the codec's training side needs torch (pip install '.[export]')")

from facelink.export.codec.prior_study import contexts, cross_entropy_bytes  # noqa: E402


def test_a_context_that_decides_the_symbol_removes_its_bits() -> None:
    rng = np.random.default_rng(0)
    # One channel, 8 positions: 0 at positions 0-3 and 1 at 4-7, a function of the position.
    by_position = np.tile((np.arange(8) >= 4).astype(np.int64), (2000, 1)).reshape(2000, 1, 1, 8)
    flips = rng.integers(0, 2, size=(2000, 1, 1, 8))
    none = np.zeros_like(by_position)
    where = np.broadcast_to(np.arange(8).reshape(1, 1, 1, 8), by_position.shape)
    # Without context: half 0s, half 1s -> 1 bit a symbol, 8 symbols = 1 byte a picture.
    assert cross_entropy_bytes(by_position, none, 1, 1000) == pytest.approx(1.0, abs=0.01)
    assert cross_entropy_bytes(by_position, where, 8, 1000) < 0.01
    # Independent coin flips: no context helps.
    assert cross_entropy_bytes(flips, where, 8, 1000) == pytest.approx(1.0, abs=0.03)


def test_contexts_stay_in_range() -> None:
    symbols = np.random.default_rng(1).integers(-6, 7, size=(3, 4, 8, 8))
    for name, (context, count) in contexts(symbols).items():
        assert context.shape == symbols.shape and 0 <= context.min() and context.max() < count, name
