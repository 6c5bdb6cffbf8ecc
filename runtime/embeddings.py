"""How an embedding travels: float32, float16, or int8 with one scale (128 bytes for 128-d)."""

from __future__ import annotations

from typing import Literal

import numpy as np

EmbeddingDType = Literal["float32", "float16", "int8"]
_ITEMSIZE = {"float32": 4, "float16": 2, "int8": 1}


def pack_embedding(vector: np.ndarray, dtype: EmbeddingDType = "float32") -> tuple[bytes, float]:
    """(bytes, scale). int8 uses a symmetric per-vector scale: max |x| maps to 127."""
    vector = np.asarray(vector, dtype=np.float32).ravel()
    if not np.isfinite(vector).all():
        raise ValueError("embedding contains NaN or infinity")
    if dtype == "float32":
        return vector.astype("<f4").tobytes(), 1.0
    if dtype == "float16":
        return vector.astype("<f2").tobytes(), 1.0
    if dtype == "int8":
        scale = float(np.abs(vector).max()) / 127.0 or 1.0
        return np.clip(np.round(vector / scale), -127, 127).astype(np.int8).tobytes(), scale
    raise ValueError(f"unknown embedding dtype {dtype!r}")


def unpack_embedding(data: bytes, dtype: EmbeddingDType, dim: int, scale: float = 1.0) -> np.ndarray:
    if dtype not in _ITEMSIZE:
        raise ValueError(f"unknown embedding dtype {dtype!r}")
    expected = dim * _ITEMSIZE[dtype]
    if dim <= 0 or len(data) != expected:
        raise ValueError(f"embedding of dim {dim} as {dtype} needs {expected} bytes, got {len(data)}")
    if dtype == "int8":
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"int8 embedding needs a positive scale, got {scale}")
        vector = np.frombuffer(data, dtype=np.int8).astype(np.float32) * scale
    else:
        vector = np.frombuffer(data, dtype="<f4" if dtype == "float32" else "<f2").astype(np.float32)
    if not np.isfinite(vector).all():
        raise ValueError("embedding contains NaN or infinity")
    return vector
