"""What every benchmark report shares: the machine it ran on, the date, tables, the JSON file.

A number is only worth quoting with the command that produced it and the machine it ran on,
so every benchmark prints both above its table and stores both in its JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks/results")


def cpu_count() -> int:
    """Cores this process may use (the affinity mask, not the host's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def bench_argv(argv: Sequence[str] | None) -> list[str]:
    """A benchmark's arguments: the process's by default, without the leading `--` that
    `facelink bench NAME -- ...` passes through."""
    args = list(sys.argv[1:] if argv is None else argv)
    return args[1:] if args[:1] == ["--"] else args


def machine_info(**extra: Any) -> dict[str, Any]:
    import cv2
    import onnxruntime

    return {
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "opencv": cv2.__version__,
        **extra,
    }


def machine_line(machine: dict[str, Any]) -> str:
    return (
        f"machine: {machine['arch']} {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}, "
        f"ONNX Runtime {machine['onnxruntime']}"
    )


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A table that pastes into GitHub markdown and still reads well in a terminal."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *[line(row) for row in rows]]


def _path_prefixes() -> list[tuple[str, str]]:
    """Machine folders -> how a results file names them, longest first (a cache may sit in the repo)."""
    from facelink.config import REPO_ROOT, cache_dir, shared_dir

    roots = {
        str(REPO_ROOT.resolve()): ".",
        str(shared_dir()): "../shared",
        str(cache_dir().expanduser().resolve()): "$FACELINK_CACHE",
        str(Path(os.environ.get("TMPDIR", "/tmp")).resolve()): "$TMPDIR",
    }
    return sorted(roots.items(), key=lambda item: -len(item[0]))


def portable(value: Any, prefixes: list[tuple[str, str]] | None = None) -> Any:
    """`value` with every absolute path of this machine written relative to the repository,
    ../shared, $FACELINK_CACHE or $TMPDIR, in any string (commands and messages too): a results
    file must read the same on every machine that reproduces it."""
    prefixes = _path_prefixes() if prefixes is None else prefixes
    if isinstance(value, str):
        for root, name in prefixes:
            value = re.sub(rf"{re.escape(root)}(?![\w.-])", name, value)  # a whole folder name, not a prefix of one
        return value[2:] if value.startswith("./") else value
    if isinstance(value, dict):
        return {key: portable(item, prefixes) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(item, prefixes) for item in value]
    return value


def write_results(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(payload), indent=2, ensure_ascii=False) + "\n")
