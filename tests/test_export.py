"""`facelink export`: graph surgery, fp16 / int8 exports with parity, manifests, Triton configs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from onnx import TensorProto, helper, numpy_helper

from facelink.cli import main
from facelink.export.deploy import graph
from facelink.export.deploy.graph import TensorSpec
from facelink.export.triton import TritonOptions, config_text, preferred_batch_sizes

from .support import needs_shared


# -- graph surgery on a tiny model (no ../shared needed) ----------------------------------------------
def _traced_at_batch_1() -> onnx.ModelProto:
    """Conv -> Reshape([1, -1]): the pattern exporters leave when they trace with a batch of 1."""
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32), "w"
    )
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["c", "shape"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "traced",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [weight, shape],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 11)])


def test_dynamic_batch_rewrite_runs_any_batch_and_keeps_per_input_outputs() -> None:
    import onnxruntime as ort

    source = _traced_at_batch_1()
    model = graph.check(graph.simplify(graph.set_batch(graph.to_opset(source), None)))
    graph.check_batch(model, None)
    assert graph.opset_of(model) == graph.OPSET
    assert graph.inputs(model)[0].shape[0] == graph.BATCH_DIM and graph.outputs(model)[0].dynamic_batch
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8)).astype(np.float32)
    batched = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    reference = ort.InferenceSession(source.SerializeToString())
    single = np.concatenate([reference.run(None, {"x": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_check_batch_catches_a_graph_that_still_assumes_batch_1() -> None:
    model = graph.to_opset(_traced_at_batch_1())
    for value in [*model.graph.input, *model.graph.output]:  # batch declared dynamic, Reshape untouched
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ValueError, match="still assumes the traced batch"):
        graph.check_batch(model, None)


# -- real models ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mobilefacenet():
    from facelink.export.deploy.source import resolve_source

    return resolve_source("mobilefacenet")


@needs_shared
def test_dynamic_batch_export_runs_a_batch_of_3_like_single_images(mobilefacenet, tmp_path: Path) -> None:
    from facelink.export.deploy.parity import reference_outputs
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.samples import make_samples
    from facelink.runtime.backends import OnnxRuntimeBackend
    from facelink.runtime.recognition import create_recognizer

    exported = export_onnx(mobilefacenet, ExportOptions(batch="dynamic", parity_count=4), tmp_path)
    assert exported.parity[0].max_abs_error < 1e-4
    backend = OnnxRuntimeBackend(exported.path)
    assert backend.session.get_inputs()[0].shape[0] == graph.BATCH_DIM
    crops = make_samples(mobilefacenet, graph.inputs(onnx.load(exported.path)), "lfw", 2, for_parity=True)
    three = {k: v[:3] for k, v in crops.tensors.items()}
    (batched,) = backend.run(three)
    (single,) = reference_outputs(mobilefacenet.onnx_path, crops)
    np.testing.assert_allclose(batched, single[:3], atol=1e-4)
    # The written manifest runs as a recogniser, with the same model id (fp32).
    recognizer = create_recognizer(exported.manifest_path)
    assert recognizer.model_id == "mobilefacenet@ms1m-1"
    assert recognizer.embed_aligned(np.zeros((5, 112, 112, 3), np.uint8)).shape == (5, 128)


@needs_shared
def test_int8_export_from_8_calibration_crops_is_qdq_and_close(mobilefacenet, tmp_path: Path) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.runtime.recognition import create_recognizer

    exported = export_onnx(
        mobilefacenet, ExportOptions(precision="int8", calib_count=8, parity_count=8), tmp_path
    )
    ops = {node.op_type for node in onnx.load(exported.path).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    (row,) = exported.parity
    assert row.mean_cosine > 0.98, row
    record = json.loads(exported.record_path.read_text())
    assert record["calibration"]["inputs"] == 16  # 8 faces + their mirror images
    assert record["source"]["sha256"] == mobilefacenet.sha256
    manifest = json.loads(exported.manifest_path.read_text())
    assert manifest["version"] == "ms1m-1-int8" and "Precision: int8 QDQ" in manifest["description"]
    recognizer = create_recognizer(exported.manifest_path)
    assert recognizer.model_id == "mobilefacenet@ms1m-1-int8"  # its own id: galleries never mix precisions
    assert recognizer.embedding_space == "mobilefacenet@ms1m-1"  # what an edge embedding payload names


@needs_shared
def test_fp16_export_keeps_cosine_above_0999(mobilefacenet, tmp_path: Path) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx

    exported = export_onnx(mobilefacenet, ExportOptions(precision="fp16", parity_count=8), tmp_path)
    (row,) = exported.parity
    assert row.min_cosine > 0.999, row
    model = onnx.load(exported.path)
    assert graph.inputs(model)[0].dtype == np.float32  # the runtime still feeds float32
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)


@needs_shared
def test_detector_export_with_pinned_input_size(tmp_path: Path) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source

    exported = export_onnx(
        resolve_source("yunet"), ExportOptions(batch=2, input_size=(320, 256), parity_count=4), tmp_path
    )
    assert graph.inputs(onnx.load(exported.path))[0].shape == (2, 3, 256, 320)
    assert len(exported.parity) == 12 and max(r.max_abs_error for r in exported.parity) < 1e-3
    assert all(r.mean_cosine is None for r in exported.parity)  # raw detector outputs: abs error only


@needs_shared
def test_codec_encoder_int8_export_counts_changed_symbols_and_keeps_the_codec_id(tmp_path: Path) -> None:
    """The learned codec's halves export like any model; the int8 encoder's streams are the
    bundled codec's (same id), so the cloud decodes what a board running it sends."""
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source
    from facelink.runtime.codecs import create_codec

    options = ExportOptions(precision="int8", batch="dynamic", calib_count=16, parity_count=8)
    exported = export_onnx(resolve_source("codec-default:encoder"), options, tmp_path)
    (row,) = exported.parity
    assert row.symbol_mismatch is not None and 0 <= row.symbol_mismatch < 0.1, row
    board = create_codec(f"learned:{exported.manifest_path}", quality=2)
    cloud = create_codec("learned", quality=2)
    assert board.codec_id == cloud.codec_id
    face = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    assert cloud.decode(board.encode(face)).shape == (128, 128, 3)

    decoder = export_onnx(resolve_source("codec-default:decoder"), ExportOptions(precision="fp16", parity_count=5), tmp_path)
    assert "encoded at qualities 1-5" in decoder.notes[0] and decoder.parity[0].symbol_mismatch is None


@needs_shared
def test_an_ensemble_transform_exports_on_its_gallery_models_embeddings(tmp_path: Path) -> None:
    from facelink.export.deploy.pipeline import ExportOptions, export_onnx
    from facelink.export.deploy.source import resolve_source
    from facelink.runtime.asymmetric import GalleryEnsemble

    from facelink.config import DEFAULT_QUERY_MODEL
    from facelink.runtime.manifest import ManifestError, load_manifest

    # The bundled ensemble's MobileFaceNet joins untransformed: nothing to export, and the error says so.
    with pytest.raises(ManifestError, match="joins the ensemble untransformed"):
        resolve_source(f"ensemble-{DEFAULT_QUERY_MODEL}:mobilefacenet@ms1m-1")
    try:  # parity runs the transform on the gallery model's own embeddings
        load_manifest("dlib-resnet-onnx").weights()
    except (ManifestError, FileNotFoundError) as error:
        pytest.skip(f"dlib's ONNX model is not converted on this machine: {error}")
    source = resolve_source(f"ensemble-{DEFAULT_QUERY_MODEL}:dlib-resnet-onnx@v1")
    assert source.gallery_model == "dlib-resnet-onnx@v1"
    exported = export_onnx(source, ExportOptions(precision="fp16", parity_count=4), tmp_path)
    (row,) = exported.parity
    assert row.min_cosine > 0.999 and "dlib-resnet-onnx@v1 embeddings of 4 faces" in exported.notes[0]
    # The derived ensemble still finds its other member and its query model's manifest.
    ensemble = GalleryEnsemble.load(exported.manifest_path)
    assert ensemble.gallery_models == ("mobilefacenet@ms1m-1", "dlib-resnet-onnx@v1", "edgeface-xs@webface-1")


def test_export_cli_rejects_calib_without_int8(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "mobilefacenet", "--calib", "lfw"]) == 2
    assert "--calib only applies with --int8" in capsys.readouterr().err


def test_export_cli_reports_a_non_onnx_model_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "dlib-resnet"]) == 2
    assert "not ONNX" in capsys.readouterr().err


# -- Triton ------------------------------------------------------------------------------------------
def _model_config_class():  # noqa: ANN202
    """The part of Triton's ModelConfig message (model_config.proto) a facelink config uses, so
    that protobuf's own text-format parser validates the generated file."""
    f = descriptor_pb2.FileDescriptorProto(
        name="triton_model_config_subset.proto", package="inference", syntax="proto3"
    )
    f.enum_type.add(name="DataType").value.extend(
        descriptor_pb2.EnumValueDescriptorProto(name=n, number=i)
        for i, n in enumerate(
            [
                "TYPE_INVALID",
                "TYPE_BOOL",
                "TYPE_UINT8",
                "TYPE_UINT16",
                "TYPE_UINT32",
                "TYPE_UINT64",
                "TYPE_INT8",
                "TYPE_INT16",
                "TYPE_INT32",
                "TYPE_INT64",
                "TYPE_FP16",
                "TYPE_FP32",
                "TYPE_FP64",
                "TYPE_STRING",
            ]
        )
    )
    field = descriptor_pb2.FieldDescriptorProto
    opt, rep = field.LABEL_OPTIONAL, field.LABEL_REPEATED

    def message(name: str, *fields: tuple[str, int, int, str | None], parent=None):  # noqa: ANN001, ANN202
        m = (parent.nested_type if parent else f.message_type).add(name=name)
        for number, (fname, ftype, label, type_name) in enumerate(fields, 1):
            added = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                added.type_name = type_name
        return m

    tensor = [
        ("name", field.TYPE_STRING, opt, None),
        ("data_type", field.TYPE_ENUM, opt, ".inference.DataType"),
        ("dims", field.TYPE_INT64, rep, None),
    ]
    message("ModelInput", *tensor)
    message("ModelOutput", *tensor)
    group = message(
        "ModelInstanceGroup",
        ("count", field.TYPE_INT32, opt, None),
        ("kind", field.TYPE_ENUM, opt, ".inference.ModelInstanceGroup.Kind"),
    )
    group.enum_type.add(name="Kind").value.extend(
        descriptor_pb2.EnumValueDescriptorProto(name=n, number=i)
        for i, n in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU"])
    )
    message(
        "ModelDynamicBatching",
        ("preferred_batch_size", field.TYPE_INT32, rep, None),
        ("max_queue_delay_microseconds", field.TYPE_UINT64, opt, None),
    )
    policy = message(
        "ModelVersionPolicy", ("specific", field.TYPE_MESSAGE, opt, ".inference.ModelVersionPolicy.Specific")
    )
    message("Specific", ("versions", field.TYPE_INT64, rep, None), parent=policy)
    message(
        "ModelConfig",
        ("name", field.TYPE_STRING, opt, None),
        ("platform", field.TYPE_STRING, opt, None),
        ("max_batch_size", field.TYPE_INT32, opt, None),
        ("version_policy", field.TYPE_MESSAGE, opt, ".inference.ModelVersionPolicy"),
        ("input", field.TYPE_MESSAGE, rep, ".inference.ModelInput"),
        ("output", field.TYPE_MESSAGE, rep, ".inference.ModelOutput"),
        ("dynamic_batching", field.TYPE_MESSAGE, opt, ".inference.ModelDynamicBatching"),
        ("instance_group", field.TYPE_MESSAGE, rep, ".inference.ModelInstanceGroup"),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def test_triton_config_has_io_from_the_graph_and_dynamic_batching() -> None:
    inputs = [TensorSpec("input", np.dtype(np.float32), ("batch", 3, 112, 112))]
    outputs = [
        TensorSpec("output", np.dtype(np.float32), ("batch", 128)),
        TensorSpec("kps_8", np.dtype(np.float16), ("batch", "anchors", 10)),
    ]
    text = config_text(
        "mobilefacenet",
        "onnxruntime_onnx",
        inputs,
        outputs,
        TritonOptions(max_batch_size=32, queue_delay_us=250, instances=2),
    )
    config = text_format.Parse(text, _model_config_class()())
    assert (config.name, config.platform, config.max_batch_size) == ("mobilefacenet", "onnxruntime_onnx", 32)
    assert [(i.name, list(i.dims)) for i in config.input] == [("input", [3, 112, 112])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("output", [128]), ("kps_8", [-1, 10])]
    types = type(config).DESCRIPTOR.file.enum_types_by_name["DataType"]
    assert [types.values_by_number[o.data_type].name for o in config.output] == ["TYPE_FP32", "TYPE_FP16"]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 250
    assert (config.instance_group[0].count, config.instance_group[0].kind) == (2, 1)  # KIND_GPU
    assert list(config.version_policy.specific.versions) == [1]


def test_triton_config_for_a_static_batch_lists_full_dims_and_no_batching() -> None:
    spec = [TensorSpec("input", np.dtype(np.float32), (1, 3, 112, 112))]
    text = config_text(
        "m",
        "tensorrt_plan",
        spec,
        [TensorSpec("output", np.dtype(np.float32), (1, 128))],
        TritonOptions(instance_kind="KIND_CPU"),
    )
    config = text_format.Parse(text, _model_config_class()())
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert list(config.input[0].dims) == [1, 3, 112, 112] and config.instance_group[0].kind == 2  # KIND_CPU
    assert preferred_batch_sizes(2) == [2] and preferred_batch_sizes(20) == [4, 8, 16]


@needs_shared
def test_triton_repository_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FACELINK_CACHE", str(tmp_path / "cache"))  # the intermediate export goes there
    repo = tmp_path / "repo"
    assert (
        main(["export", "mobilefacenet", "--format", "triton", "--out", str(repo), "--parity-count", "2"])
        == 0
    )
    folder = repo / "mobilefacenet"
    assert (folder / "1" / "model.onnx").is_file()
    config = text_format.Parse((folder / "config.pbtxt").read_text(), _model_config_class()())
    assert config.max_batch_size == 16 and list(config.input[0].dims) == [3, 112, 112]
    assert json.loads((folder / "facelink-manifest.json").read_text())["file"] == "1/model.onnx"
    assert "| mobilefacenet" in capsys.readouterr().out
