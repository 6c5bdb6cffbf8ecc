"""Generate the Python stubs of the facelink wire contract, or check that they are current.

    python protos/generate.py          # (re)write protos/facelink/v1/*_pb2*.py(i)
    python protos/generate.py --check  # exit 1 if the committed stubs differ from a fresh run

The stubs are committed so that an edge install needs no protoc. They are reproducible
because grpcio-tools is pinned in pyproject.toml's `dev` extra; CI runs `--check`.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "facelink" / "v1"


def _generated_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*_pb2*.py*"))


def generate(out_root: Path) -> None:
    from grpc_tools import protoc  # dev-only dependency
    import grpc_tools

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PACKAGE_DIR.glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed: see the message above")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with a fresh run instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        print(f"wrote {', '.join(_generated_names(PACKAGE_DIR))}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir = Path(tmp) / "facelink" / "v1"
        fresh, committed = _generated_names(fresh_dir), _generated_names(PACKAGE_DIR)
        stale = sorted(set(fresh) ^ set(committed))
        stale += [n for n in fresh if n in committed and not filecmp.cmp(fresh_dir / n, PACKAGE_DIR / n, shallow=False)]
    if stale:
        print(f"stubs out of date: {', '.join(stale)}; run `make protos` and commit", file=sys.stderr)
        return 1
    print("stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
