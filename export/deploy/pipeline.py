"""`facelink export MODEL --format onnx|engine|triton`: one model in, deployable files out.

Every export writes, into the output folder, the model file, a manifest for it (the source
manifest's fields with the new file and sha256, and the precision in `description`; a
precision other than fp32 also suffixes `version`, so the model id on the wire, the gallery
and the embedding caches never mix embeddings of different precisions), and
`<stem>.export.json`: what was done, from which source sha256, with which tools, and the
parity measured against the fp32 source.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx

from facelink.runtime.backends import create_backend
from facelink.runtime.manifest import CACHE_PREFIX, SHARED_PREFIX, file_sha256

from . import graph
from .parity import ParityRow, compare, reference_outputs, run_batched
from .samples import DEFAULT_FRAME, Samples, make_samples
from .source import ModelSource, onnx_components

Batch = int | Literal["dynamic", "keep"]
PARITY_BATCH = 8  # a dynamic-batch export is checked in batches of this size against per-image outputs
TOOLS = ("onnx", "onnxruntime", "onnxslim", "onnxconverter-common", "tensorrt")


class ExportParityError(ValueError):
    """An export that no longer computes what its source computes (parity below the floor)."""


@dataclass(frozen=True)
class ExportOptions:
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    batch: Batch = "keep"
    input_size: tuple[int, int] | None = None  # (width, height) for image inputs with dynamic size
    calib: str = "lfw"
    calib_count: int = 256  # faces (pictures for a detector)
    parity_count: int = 64
    int8_recipe: str = "cpu"
    max_batch: int = 16  # TensorRT profile / Triton max for a dynamic batch
    # An export whose embeddings point elsewhere than the source's is refused, not shipped:
    # MobileFaceNet's int8 QDQ keeps a mean cosine of 0.994, EdgeFace's static int8 falls to 0.15
    # (LFW 78%), and nothing between is a model anyone should deploy without looking. 0 disables.
    min_parity_cosine: float = 0.95
    command: str = ""

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "command"}


@dataclass
class Exported:
    path: Path
    manifest_path: Path
    record_path: Path
    parity: list[ParityRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    onnx_path: Path | None = None  # the ONNX file `path` is or was built from (I/O names, dims, dtypes)


def stem(source: ModelSource, options: ExportOptions) -> str:
    parts = [source.name]
    if options.batch == "dynamic":
        parts.append("dyn")
    elif isinstance(options.batch, int):
        parts.append(f"b{options.batch}")
    if options.input_size:
        parts.append("{}x{}".format(*options.input_size))
    if options.precision != "fp32":
        parts.append(options.precision)
    return "-".join(parts)


# -- ONNX --------------------------------------------------------------------------------------
def prepare(source: ModelSource, options: ExportOptions) -> onnx.ModelProto:
    """The fp32 model at the pinned opset, with the requested batch and input size, simplified and checked."""
    model = graph.to_opset(onnx.load(source.onnx_path))
    if options.batch != "keep":
        model = graph.set_batch(model, None if options.batch == "dynamic" else options.batch)
    if options.input_size:
        model = graph.set_input_size(model, *options.input_size)
    model = graph.simplify(model)
    try:
        model = graph.check(model)
        if options.batch != "keep":
            graph.check_batch(model, None if options.batch == "dynamic" else options.batch)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as error:
        raise ValueError(
            f"{source.label}: the rewritten graph is not valid ({error})"
            + (
                " - is the input size a multiple of the model's stride (32 for YuNet)?"
                if options.input_size
                else ""
            )
        ) from error
    return model


def static_batch(model: onnx.ModelProto) -> int | None:
    first = graph.inputs(model)[0].shape[0]
    return first if isinstance(first, int) else None


def _frame(options: ExportOptions) -> tuple[int, int]:
    return options.input_size or DEFAULT_FRAME


def _parity_data(source: ModelSource, options: ExportOptions) -> str:
    if options.calib != "lfw" or source.task in ("recognition", "detection") or source.codec_part or source.gallery_model:
        return options.calib
    return "random"  # no known way to make this model's inputs from pictures


def calibration_samples(source: ModelSource, model: onnx.ModelProto, options: ExportOptions) -> Samples:
    return make_samples(
        source,
        graph.inputs(model),
        options.calib,
        options.calib_count,
        for_parity=False,
        frame=_frame(options),
    )


def export_onnx(source: ModelSource, options: ExportOptions, out: Path, *, reuse: bool = False) -> Exported:
    from facelink.export import quantize

    out.mkdir(parents=True, exist_ok=True)
    name = stem(source, options)
    if reuse and (found := _reusable(out / name, source, options)):
        return found
    base = prepare(source, options)
    notes = []
    calibration: Samples | None = None
    if options.precision == "fp16":
        model = quantize.to_fp16(base)
        note = "fp16 weights and activations (onnxconverter-common), float32 inputs and outputs"
    elif options.precision == "int8":
        calibration = calibration_samples(source, base, options)
        recipe = quantize.RECIPES[options.int8_recipe]
        model = quantize.quantize_int8(
            base, calibration, batch=static_batch(base) or quantize.CALIBRATION_BATCH, recipe=recipe
        )
        note = (
            f"int8 QDQ (ONNX Runtime static quantisation, '{recipe.name}' recipe: per-channel int8 weights, "
            f"{'symmetric int8' if recipe.symmetric_activations else 'uint8'} activations calibrated on "
            f"{calibration.origin})"
        )
        notes.append(f"calibration: {calibration.origin}")
    else:
        model, note = base, "fp32"
    model = graph.check(model)
    path = out / f"{name}.onnx"
    onnx.save(model, path)
    exported = _finish(
        source,
        options,
        path,
        note,
        tag=None if options.precision == "fp32" else options.precision,
        calibration=calibration,
    )
    exported.notes[:0] = notes
    exported.onnx_path = path
    return exported


# -- TensorRT ------------------------------------------------------------------------------------
def engine_shapes(model: onnx.ModelProto, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    shapes = {}
    for spec in graph.inputs(model):
        rest = spec.shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(
                f"input {spec.name!r} has dynamic dimensions {spec.shape}: TensorRT needs them bounded; "
                "pin them with --input-size WxH"
            )
        if isinstance(spec.shape[0], int):
            shapes[spec.name] = ((spec.shape[0], *rest),) * 3
        else:
            opt = min(PARITY_BATCH, max_batch)
            shapes[spec.name] = ((1, *rest), (opt, *rest), (max_batch, *rest))
    return shapes


def export_engine(source: ModelSource, options: ExportOptions, out: Path) -> Exported:
    from facelink.export import tensorrt as builder
    from facelink.runtime.backends.cuda import CudaRuntime
    from facelink.runtime.backends.tensorrt_backend import EngineKey, import_tensorrt, read_meta, write_meta

    trt = import_tensorrt()
    cuda = CudaRuntime()
    device = cuda.device()
    typed = builder.strongly_typed(trt)
    # TensorRT 11 reads the precision from the ONNX file; earlier versions take the fp32 file and flags.
    onnx_options = replace(options, int8_recipe="tensorrt") if typed else replace(options, precision="fp32")
    onnx_export = export_onnx(source, onnx_options, out)
    model = onnx.load(onnx_export.path)
    shapes = engine_shapes(model, options.max_batch)
    settings: dict[str, Any] = {
        "precision": options.precision,
        "shapes": shapes,
        "strongly_typed": typed,
        "workspace": builder.WORKSPACE_BYTES,
    }
    batches, calibration = None, None
    if options.precision == "int8" and not typed:  # implicit quantisation: TensorRT calibrates itself
        calibration = calibration_samples(source, model, options)
        batches = builder.CalibrationBatches(calibration, static_batch(model) or PARITY_BATCH)
        settings["calibration"] = calibration.digest
    name = f"{stem(source, options)}-trt"
    settings = json.loads(json.dumps(settings))  # as the meta file stores it (tuples -> lists), to compare equal
    key = EngineKey(
        device.name, device.compute_capability, str(trt.__version__), file_sha256(onnx_export.path), settings
    )
    cached = (
        builder.timing_cache_path(device, trt.__version__).parent
        / "engines"
        / f"{name}-{key.digest[:16]}.engine"
    )
    if not (cached.is_file() and read_meta(cached) == key):
        calibrator = (
            None
            if batches is None
            else builder.make_entropy_calibrator(trt, batches, cuda, cached.with_suffix(".calibration"))
        )
        plan = builder.build_engine(
            trt,
            onnx_export.path,
            options.precision,
            shapes,
            device,
            calibrator=calibrator,
            calibration_shapes=None if batches is None or static_batch(model) else batches.shapes(),
        )
        builder.write_atomic(cached, plan)
        write_meta(cached, key)
    path = out / f"{name}.engine"
    shutil.copyfile(cached, path)
    write_meta(path, key)
    note = (
        f"TensorRT {trt.__version__} engine, {options.precision}, for {device.name} "
        f"(compute capability {device.compute_capability}); built from {onnx_export.path.name}"
    )
    exported = _finish(source, options, path, note, tag=f"trt-{options.precision}", calibration=calibration)
    exported.onnx_path = onnx_export.path
    return exported


# -- shared ----------------------------------------------------------------------------------------
def _finish(
    source: ModelSource,
    options: ExportOptions,
    path: Path,
    note: str,
    tag: str | None,
    calibration: Samples | None,
) -> Exported:
    sha = file_sha256(path)
    manifest = derived_manifest(source, path.name, sha, note, tag)
    manifest_path = path.with_suffix(".json")
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    parity, parity_origin = check_parity(source, options, path)
    record = {
        "source": {
            "model": source.label,
            "manifest": str(source.manifest_path),
            "file": str(source.onnx_path),
            "sha256": source.sha256,
        },
        "output": {"file": path.name, "sha256": sha, "manifest": manifest_path.name, "opset": graph.OPSET},
        "settings": options.settings(),
        "calibration": None
        if calibration is None
        else {"origin": calibration.origin, "inputs": len(calibration), "digest": calibration.digest},
        "parity": [row.as_dict() for row in parity],
        "parity_inputs": parity_origin,
        "tools": _tool_versions(),
        "command": options.command,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    record_path = path.with_name(path.stem + ".export.json")
    broken = [r for r in parity if r.mean_cosine is not None and r.mean_cosine < options.min_parity_cosine]
    if broken:
        # No manifest is left behind for a model that does not compute its source's embeddings:
        # a manifest is what a server or a board would load. The record stays, for the autopsy.
        manifest_path.unlink(missing_ok=True)
        record["refused"] = f"mean cosine to the fp32 source below {options.min_parity_cosine}"
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        worst = min(broken, key=lambda r: r.mean_cosine or 0.0)
        raise ExportParityError(
            f"{path.name}: {options.precision} export of {source.label} does not keep its embeddings: mean cosine "
            f"{worst.mean_cosine:.3f} (min {worst.min_cosine:.3f}) to the fp32 source on {worst.inputs} inputs, below "
            f"{options.min_parity_cosine}; no manifest written (record: {record_path}). Try --half, or the model's "
            "own int8 file if it has one; --min-parity-cosine 0 keeps it anyway"
        )
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return Exported(path, manifest_path, record_path, parity, [f"parity inputs: {parity_origin}"])


def check_parity(source: ModelSource, options: ExportOptions, path: Path) -> tuple[list[ParityRow], str]:
    """Parity rows of the file at `path` against the fp32 source, and where the inputs came from."""
    backend = create_backend(path)
    specs = graph.inputs(onnx.load(source.onnx_path))
    samples = make_samples(
        source,
        specs,
        _parity_data(source, options),
        options.parity_count,
        for_parity=True,
        frame=_frame(options),
    )
    batch = (
        options.batch
        if isinstance(options.batch, int)
        else (PARITY_BATCH if options.batch == "dynamic" else 1)
    )
    candidate = run_batched(backend, samples, batch, static=options.batch != "dynamic")
    reference = reference_outputs(source.onnx_path, samples)
    rows = compare(
        source.label,
        path.name,
        backend.output_names,
        reference,
        candidate,
        batch,
        embeddings=source.task == "recognition" or source.gallery_model is not None,
    )
    if source.codec_part == "encoder":
        # What decides a codec encoder's parity is not its float error but whether the symbols
        # it hands the entropy coder change (a changed symbol costs bits and fidelity).
        rows = [replace(rows[0], symbol_mismatch=symbol_mismatch(source.codec(), reference[0], candidate[0]))]
    return rows, samples.origin


def symbol_mismatch(codec, reference: np.ndarray, candidate: np.ndarray) -> float:  # noqa: ANN001
    """Fraction of latent symbols that differ between two encoders' outputs, over every quality."""
    qualities = range(1, codec.manifest.qualities + 1)
    differ = sum(
        int(np.count_nonzero(codec.quantize(ref, q) != codec.quantize(got, q)))
        for q in qualities
        for ref, got in zip(reference, candidate)
    )
    return differ / (reference.size * len(qualities))


def derived_manifest(
    source: ModelSource, file_name: str, sha256: str, note: str, tag: str | None
) -> dict[str, Any]:
    data = json.loads(json.dumps(source.data))
    if source.component:
        # The other files of a bundle stay where they are (whatever their kind: tables, the
        # other half of a codec, an ensemble's query manifest).
        for key, value in data.items():
            for entry in value if isinstance(value, list) else [value]:
                # An entry without a file (an ensemble member joining untransformed) has nothing to move.
                if isinstance(entry, dict) and entry.get("file"):
                    entry["file"] = _absolute(entry["file"], source.manifest_path)
            if key.endswith("_manifest") and isinstance(value, str) and value.endswith(".json"):
                data[key] = _absolute(value, source.manifest_path)
        onnx_components(data)[source.component].update(file=file_name, sha256=sha256)
    else:
        data["file"], data["sha256"] = file_name, sha256
    if tag and (source.component is None or "version" in data):  # a bundle without one (an ensemble) keeps none
        data["version"] = f"{data.get('version', '1')}-{tag}"
        if source.manifest is not None and isinstance(data.get("embedding"), dict):
            # Its own id keeps galleries and caches apart; its embeddings stay in the source's space.
            data["embedding"]["space"] = source.manifest.embedding.space or source.manifest.model_id
    origin = f"{source.label} (sha256 {source.sha256[:12]}...)"
    data["description"] = (
        f"{data.get('description') or ''} Precision: {note}; exported from {origin}.".strip()
    )
    return data


def _absolute(file: str, manifest: Path) -> str:
    if file.startswith((SHARED_PREFIX, CACHE_PREFIX)) or Path(file).is_absolute():
        return file
    return str((manifest.parent / file).resolve())


def _reusable(base: Path, source: ModelSource, options: ExportOptions) -> Exported | None:
    """A previous ONNX export of the same source with the same settings, if its file is intact."""
    path, manifest_path = base.with_name(base.name + ".onnx"), base.with_name(base.name + ".json")
    record_path = base.with_name(base.name + ".export.json")
    if not (path.is_file() and record_path.is_file() and manifest_path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    settings = json.loads(json.dumps(options.settings()))  # tuples -> lists, as stored
    if (record["source"]["sha256"], record["settings"], record["output"]["sha256"]) != (
        source.sha256,
        settings,
        file_sha256(path),
    ):
        return None
    return Exported(
        path,
        manifest_path,
        record_path,
        [ParityRow(**row) for row in record["parity"]],
        [
            f"parity inputs: {record['parity_inputs']}",
            "reused the previous export (same source and settings)",
        ],
        onnx_path=path,
    )


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            continue
    return versions


# -- Triton ------------------------------------------------------------------------------------------
def export_triton(
    source: ModelSource, options: ExportOptions, repository: Path, platform: str, triton: Any, work: Path
) -> tuple[Path, Exported]:
    """A Triton model repository entry; the ONNX export (or engine) is built in `work` first.

    `platform` is "onnxruntime_onnx" or "tensorrt_plan"; `triton` a `facelink.export.triton.TritonOptions`.
    """
    from facelink.export.triton import MODEL_FILES, write_model

    exported = (
        export_engine(source, options, work)
        if platform == "tensorrt_plan"
        else export_onnx(source, options, work)
    )
    assert exported.onnx_path is not None
    model = onnx.load(exported.onnx_path)
    manifest = json.loads(exported.manifest_path.read_text())
    version_file = f"{triton.version}/{MODEL_FILES[platform]}"
    if source.component:
        manifest[source.component]["file"] = version_file
    else:
        manifest["file"] = version_file
    name = "-".join([source.name] + ([options.precision] if options.precision != "fp32" else []))
    folder = write_model(
        repository, name, platform, exported.path, graph.inputs(model), graph.outputs(model), manifest, triton
    )
    return folder, exported
