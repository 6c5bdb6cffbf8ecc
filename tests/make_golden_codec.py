"""Rewrite tests/data/golden_codec_<name>.npz after a bundled learned codec changes.

    python -m tests.make_golden_codec            # every bundled codec
    python -m tests.make_golden_codec wide       # one of them

The golden stream is a bundled codec's encoding of a fixed synthetic 128x128 picture at
quality 3, kept with the symbols it must decode to: `test_shipped_codec_decodes_its_golden_stream`
then proves, on every machine CI runs on, that the same bytes give the same symbols.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from facelink.runtime.codecs import bitstream
from facelink.runtime.codecs.learned import LearnedFaceCodec, codec_manifests

from .test_learned_codec_runtime import smooth_face

GOLDEN_QUALITY = 3


def golden_path(name: str) -> Path:
    return Path(__file__).parent / "data" / f"golden_codec_{name}.npz"


def write_golden(name: str) -> Path:
    codec = LearnedFaceCodec.load(name, quality=GOLDEN_QUALITY)
    stream = codec.encode(smooth_face(128, 128))
    header, payload = bitstream.unpack(stream)
    symbols = codec.entropy_coder(header.quality).decode(payload, *codec.latent_size(header.width, header.height))
    path = golden_path(name)
    np.savez(path, stream=np.frombuffer(stream, np.uint8), symbols=symbols.astype(np.int32))
    print(f"wrote {path}: {codec.codec_id}, {len(stream)} bytes")
    return path


def main(argv: list[str] | None = None) -> int:
    names = (sys.argv[1:] if argv is None else argv) or sorted(codec_manifests())
    for name in names:
        write_golden(name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
