"""Rewrite tests/data/golden_codec_default.npz after the bundled learned codec changes.

    python -m tests.make_golden_codec

The golden stream is the bundled codec's encoding of a fixed synthetic 128x128 picture at
quality 3, kept with the symbols it must decode to: `test_shipped_codec_decodes_its_golden_stream`
then proves, on every machine CI runs on, that the same bytes give the same symbols.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facelink.runtime.codecs import bitstream
from facelink.runtime.codecs.learned import LearnedFaceCodec

from .test_learned_codec_runtime import smooth_face

GOLDEN = Path(__file__).parent / "data" / "golden_codec_default.npz"


def main() -> None:
    codec = LearnedFaceCodec.load("default", quality=3)
    stream = codec.encode(smooth_face(128, 128))
    header, payload = bitstream.unpack(stream)
    symbols = codec.entropy_coder(header.quality).decode(payload, *codec.latent_size(header.width, header.height))
    np.savez(GOLDEN, stream=np.frombuffer(stream, np.uint8), symbols=symbols.astype(np.int32))
    print(f"wrote {GOLDEN}: {codec.codec_id}, {len(stream)} bytes")


if __name__ == "__main__":
    main()
