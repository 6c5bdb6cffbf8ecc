"""ONNX Runtime: the backend that runs everywhere.

Execution providers come from `BackendConfig.providers`, in order of preference. Each entry is
a provider name, optionally followed by its options:

    "CPUExecutionProvider"
    "CUDAExecutionProvider:device_id=0"
    "TensorrtExecutionProvider:trt_fp16_enable=1,trt_engine_cache_path=/var/cache/facelink/trt"

TensorRT execution provider options worth knowing (all strings; ONNX Runtime documents the
rest): `trt_fp16_enable` (1: let TensorRT pick fp16 kernels), `trt_int8_enable` (1: int8; give
it a QDQ model from `facelink export MODEL --int8`, or a calibration table through
`trt_int8_calibration_table_name`), `trt_engine_cache_enable` / `trt_engine_cache_path` (keep
built engines on disk), `trt_timing_cache_enable` / `trt_timing_cache_path`,
`trt_max_workspace_size` (bytes), `device_id`. TensorRT 11 removed weak typing: there the fp16 /
int8 flags do nothing, and the precision comes from the model file itself (`--half`, `--int8`).

facelink turns the engine and timing caches on by default, because without them the provider
rebuilds every engine at each process start (minutes on a Jetson). The default cache folder is
named after the ONNX Runtime and TensorRT versions: ONNX Runtime does not invalidate cached
engines when either changes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from facelink.config import BackendConfig, cache_dir

from .base import BackendUnavailableError
from .tensorrt_backend import tensorrt_version

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"

_INSTALL_HINT = {
    CUDA: "install onnxruntime-gpu (x86_64), or NVIDIA's onnxruntime-gpu wheel for Jetson (see deploy/jetson/README.md)",
    TENSORRT: "install onnxruntime-gpu with TensorRT's libraries on the library path (on a Jetson: JetPack + NVIDIA's "
    "onnxruntime-gpu wheel, see deploy/jetson/README.md)",
}


def parse_provider(spec: str) -> tuple[str, dict[str, str]]:
    """ "Name" or "Name:key=value,key=value" -> (name, options)."""
    name, _, rest = spec.partition(":")
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(
                f"provider {spec!r}: options are key=value pairs separated by commas, got {item!r}"
            )
        options[key.strip()] = value.strip()
    return name.strip(), options


#: Short names that `facelink edge --providers` takes, and the options each brings. TensorRT gets
#: fp16 kernels (on TensorRT before 11, where precision flags still exist; a Jetson's 8.6/10.x);
#: its engine and timing caches are turned on for every TensorRT entry (`tensorrt_provider_defaults`).
PROVIDER_ALIASES: dict[str, str] = {"tensorrt": TENSORRT, "trt": TENSORRT, "cuda": CUDA, "cpu": CPU}
ALIAS_OPTIONS: dict[str, dict[str, str]] = {TENSORRT: {"trt_fp16_enable": "1"}}


def providers_from_names(text: str) -> tuple[str, ...]:
    """`--providers` text -> `BackendConfig.providers`.

    Comma-separated, in order of preference: short names (`tensorrt`/`trt`, `cuda`, `cpu`, any
    case), or full ONNX Runtime names with options after a colon. Since options are separated by
    commas too, a `key=value` item continues the provider before it:

        "tensorrt,cuda,cpu" -> ("TensorrtExecutionProvider:trt_fp16_enable=1", "CUDAExecutionProvider",
                                "CPUExecutionProvider")
        "TensorrtExecutionProvider:trt_fp16_enable=0,device_id=0,cpu" -> two providers
    """
    entries: list[list[str]] = []  # [name, option, option, ...]
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        head = item.partition(":")[0]
        if "=" in head:  # key=value: an option of the provider before it
            if not entries:
                raise ValueError(f"--providers {text!r}: option {item!r} comes before any provider")
            entries[-1].append(item)
            continue
        name, _, options = item.partition(":")
        name = name.strip()
        full = PROVIDER_ALIASES.get(name.lower())
        if full is None:
            if not name.endswith("ExecutionProvider"):
                raise ValueError(
                    f"--providers: unknown provider {name!r}; use {', '.join(sorted(PROVIDER_ALIASES))} or a full "
                    "ONNX Runtime name (e.g. CUDAExecutionProvider)"
                )
            full = name
        defaults = [f"{k}={v}" for k, v in ALIAS_OPTIONS.get(full, {}).items()] if full != name else []
        entries.append([full, *defaults, *(o.strip() for o in options.split(",") if o.strip())])
    if not entries:
        raise ValueError("--providers: give at least one provider, e.g. tensorrt,cuda,cpu or cpu")
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"--providers {text!r}: a provider is named twice")
    specs = []
    for name, *options in entries:
        merged: dict[str, str] = {}
        for option in options:  # later ones win: "tensorrt:trt_fp16_enable=0" turns the alias's fp16 off
            key, _, value = option.partition("=")
            merged[key.strip()] = value.strip()
        spec = name + (":" + ",".join(f"{k}={v}" for k, v in merged.items()) if merged else "")
        parse_provider(spec)  # the same checks as BackendConfig's entries
        specs.append(spec)
    return tuple(specs)


def check_providers(specs: tuple[str, ...]) -> list[str]:
    """Raises BackendUnavailableError naming each provider the installed onnxruntime lacks
    (and how to get it); returns the available ones. Call it at start, before a camera opens."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    session_providers(specs, available)
    return available


def tensorrt_provider_defaults() -> dict[str, str]:
    folder = cache_dir() / "ort-tensorrt" / f"ort-{_ort_version()}-trt-{tensorrt_version() or 'unknown'}"
    return {
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(folder),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(folder),
    }


def session_providers(specs: tuple[str, ...], available: list[str]) -> list[tuple[str, dict[str, str]]]:
    """`BackendConfig.providers` as ONNX Runtime takes them; a clear error for one not in this build."""
    providers = [parse_provider(spec) for spec in specs]
    missing = [name for name, _ in providers if name not in available]
    if missing:
        hints = "; ".join(f"{name}: {_INSTALL_HINT[name]}" for name in missing if name in _INSTALL_HINT)
        raise BackendUnavailableError(
            f"ONNX Runtime execution provider(s) {', '.join(missing)} are not in the installed onnxruntime build "
            f"(available: {', '.join(available)})" + (f". {hints}" if hints else "")
        )
    return [
        (name, {**tensorrt_provider_defaults(), **options} if name == TENSORRT else options)
        for name, options in providers
    ]


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


@cache
def _malloc_trim() -> Callable[[int], object] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hands the C heap's free memory back to the system (glibc's malloc_trim; elsewhere nothing).

    Call it after a run with `release_memory` on a large input, once its outputs are converted:
    glibc keeps much of a freed heap mapped (about 150 MB after a 1920x1080 decode).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class OnnxRuntimeBackend:
    """One ONNX Runtime session.

    `release_memory`: for a model whose input size changes from call to call with what arrives
    from the network (the learned codec's decoder: the picture size is in each stream's header).
    ONNX Runtime's CPU memory arena grows to the largest run a session has seen and keeps that
    memory for the life of the process (about 0.9 GB after one 1920x1080 decode), and memory
    patterns cache an allocation plan per input shape. With both off, a run's tensors come
    from malloc and go back after it (see `release_freed_memory` for the rest); a 128x128 decode
    is no slower (measured: ~5 ms either way).
    """

    def __init__(self, path: str | Path, config: BackendConfig = BackendConfig(), *, release_memory: bool = False) -> None:
        import onnxruntime as ort  # imported here so that manifests and alignment load without it

        options = ort.SessionOptions()
        if release_memory:
            options.enable_cpu_mem_arena = False
            options.enable_mem_pattern = False
        options.intra_op_num_threads = config.intra_op_threads
        # One inference at a time per session: parallelism across faces comes from the caller,
        # and inter-op threads only add contention on a 2-core board.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = session_providers(config.providers, ort.get_available_providers())
        for name, provider_options in providers:
            if name == TENSORRT:
                Path(provider_options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        # A provider that is compiled in but cannot load its libraries (no CUDA driver, no
        # libnvinfer) makes ONNX Runtime fall back silently; a deployment must know.
        requested, active = providers[0][0], self.session.get_providers()
        if requested not in active:
            raise BackendUnavailableError(
                f"ONNX Runtime could not start {requested} for {path} (active: {', '.join(active)}); "
                "its libraries (CUDA, cuDNN, TensorRT) are probably missing from the library path"
            )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, inputs)
