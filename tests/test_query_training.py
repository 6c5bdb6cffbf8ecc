"""The query model, its training loop and the gallery -> query transformations (torch side)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the query model's training needs torch (pip install '.[export]')")
onnx = pytest.importorskip("onnx", reason="needs onnx (pip install '.[export]')")

from facelink.export.codec.data import FaceCache, Source  # noqa: E402
from facelink.export.flops import count_model  # noqa: E402
from facelink.export.query import train  # noqa: E402
from facelink.export.query.embeddings import PairedEmbeddings  # noqa: E402
from facelink.export.query.model import (  # noqa: E402
    QueryArch,
    QueryNet,
    create_query_model,
    full_mobilefacenet,
    resample_gdconv,
)
from facelink.export.query.transforms import TransformConfig, evaluate, train_transforms  # noqa: E402
from facelink.runtime.alignment import canonical_template  # noqa: E402

from .support import SHARED_MOBILEFACENET, needs_shared  # noqa: E402


def onnx_of(model: torch.nn.Module, size: int) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, size, size),), buffer, input_names=["input"], dynamo=False)
    return onnx.load_from_string(buffer.getvalue())


def test_query_model_costs_at_least_4x_fewer_macs_than_mobilefacenet() -> None:
    query = create_query_model()
    size = query.arch.input_size
    query_cost = count_model(onnx_of(query, size))
    # MobileFaceNet's topology rebuilt (expand_keep 1, 112 px); checked against the real file below.
    mobilefacenet_cost = count_model(onnx_of(QueryNet(QueryArch(input_size=112, expand_keep=1.0)), 112))
    assert mobilefacenet_cost.macs >= 4 * query_cost.macs
    assert 200e6 < mobilefacenet_cost.macs < 250e6
    assert query_cost.params < 1.0e6
    if SHARED_MOBILEFACENET.is_file():
        assert count_model(SHARED_MOBILEFACENET).macs == mobilefacenet_cost.macs
    # The larger query models fit the budget in one pass against MobileFaceNet's two (face + mirror).
    for name in ("mfn64", "mfn72", "mfn96-half"):
        size = create_query_model(name).arch.input_size
        assert 2 * mobilefacenet_cost.macs >= 4 * count_model(onnx_of(create_query_model(name), size)).macs, name


@needs_shared
def test_mobilefacenet_rebuilt_in_torch_matches_onnx_runtime() -> None:
    import onnxruntime as ort

    x = np.random.default_rng(0).normal(size=(1, 3, 112, 112)).astype(np.float32)
    reference = ort.InferenceSession(str(SHARED_MOBILEFACENET), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with torch.no_grad():
        ours = full_mobilefacenet(SHARED_MOBILEFACENET)(torch.from_numpy(x)).numpy()
    assert np.abs(ours - reference).max() < 1e-4


def test_forward_shapes_and_onnx_export_agree() -> None:
    import onnxruntime as ort

    model = create_query_model().eval()
    size = model.arch.input_size
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 128)
    proto = onnx_of(model, size)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(session.run(None, {"input": x[:1].numpy()})[0], y[:1].numpy(), atol=1e-4)
    assert {node.op_type for node in proto.graph.node} <= {"Conv", "Clip", "Relu", "Add", "Flatten", "Constant", "Identity"}


# -- the training loop, on a tiny synthetic cache ---------------------------------------------------------
def tiny_cache(n: int = 24) -> FaceCache:
    rng = np.random.default_rng(0)
    sources = [Source(f"celeba/{i}.jpg", Path(f"{i}.jpg"), f"celeba:{i % 6}", "celeba") for i in range(n)]
    landmarks = np.repeat(canonical_template(128).points[None], n, axis=0) + rng.normal(0, 1, (n, 5, 2)).astype(np.float32)
    embeddings = rng.normal(size=(n, 2, 128)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=2, keepdims=True)
    return FaceCache(crops=rng.integers(0, 256, (n, 128, 128, 3), dtype=np.uint8), crop_landmarks=landmarks.astype(np.float32),
                     frame_landmarks=landmarks.astype(np.float32), source_index=np.arange(n), embeddings=embeddings,
                     sources=sources, skipped=0)


def tiny_teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 128)).eval()


def tiny_config(**changes: object) -> train.TrainConfig:
    return train.TrainConfig(**{"init": "random", "batch_size": 6, "epochs": 2, "warmup_steps": 2, "val_identities": 2,
                                "identity_weight": 0.1, "log_every": 1, **changes})


def test_one_step_changes_parameters_and_a_checkpoint_restores_exactly(tmp_path: Path) -> None:
    config = tiny_config()
    cache = tiny_cache()
    sampler_labels = np.arange(len(cache)) % 6
    from facelink.export.query.data import ViewSampler
    from facelink.runtime.alignment import ARCFACE

    sampler = ViewSampler(cache, np.arange(len(cache)), sampler_labels, 64, ARCFACE, batch_size=6, augment=config.augment, seed=0)
    torch.manual_seed(0)
    trainee = train.make_trainee(config, classes=6)
    before = {k: v.clone() for k, v in trainee.model.state_dict().items()}
    teacher, normalize = tiny_teacher(), train.Normalize()
    views = sampler.batch(sampler.epoch_plan(0)[0], 0, 0)
    train.train_step(trainee, teacher, normalize, views, config, lr=1e-3)
    assert any(not torch.equal(before[k], v) for k, v in trainee.model.state_dict().items())

    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, trainee, train.Progress(step=1), config)
    torch.manual_seed(123)
    restored = train.make_trainee(config, classes=6)
    assert train.load_checkpoint(path, restored).step == 1
    next_views = sampler.batch(sampler.epoch_plan(0)[1], 0, 1)
    for t in (trainee, restored):
        train.train_step(t, teacher, normalize, next_views, config, lr=1e-3)
    for (name, a), b in zip(trainee.model.state_dict().items(), restored.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_mixup_blends_teacher_and_student_views_alike_and_leaves_plain_runs_unchanged() -> None:
    from dataclasses import replace

    from facelink.export.query.data import Augment, ViewSampler
    from facelink.runtime.alignment import ARCFACE

    cache = tiny_cache()
    indices, labels = np.arange(len(cache)), np.arange(len(cache)) % 6

    def views(augment: Augment):
        sampler = ViewSampler(cache, indices, labels, 64, ARCFACE, batch_size=6, augment=augment, seed=3)
        return sampler.batch(sampler.epoch_plan(0)[0], 0, 0)

    plain = views(Augment())
    assert torch.equal(plain.teacher, views(replace(Augment(), mixup=0.0, mixup_max=0.9)).teacher)
    mixed = views(replace(Augment(), mixup=1.0, mixup_max=0.5))
    blended = 0
    for i in range(6):
        # Find the partner and weight that explain the teacher's view; the student's must fit them too.
        fits = []
        for j in range(6):
            d = (plain.teacher[j] - plain.teacher[i]).flatten()
            w = float((mixed.teacher[i] - plain.teacher[i]).flatten() @ d / max(float(d @ d), 1e-12))
            fits.append((float((plain.teacher[i].lerp(plain.teacher[j], w) - mixed.teacher[i]).abs().max()), j, w))
        error, j, w = min(fits)
        assert error < 1e-5 and -1e-6 <= w <= 0.5 + 1e-6
        assert torch.allclose(plain.student[i].lerp(plain.student[j], w), mixed.student[i], atol=1e-5)
        blended += w > 1e-3 and j != i
    assert blended >= 3


def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_result(tmp_path: Path) -> None:
    cache, config = tiny_cache(), tiny_config()
    straight = train.run(tmp_path / "a", config, cache=cache, teacher=tiny_teacher(), with_lfw=False, progress_bar=False)
    # max_minutes=0: every session stops (and checkpoints) right after its first step.
    sessions = 0
    while True:
        progress = train.run(tmp_path / "b", config, max_minutes=0, cache=cache, teacher=tiny_teacher(), with_lfw=False,
                             progress_bar=False)
        sessions += 1
        if progress.epoch >= config.epochs:
            break
    assert sessions > 2 and progress.step == straight.step
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "val.jsonl").read_text().count("\n") == config.epochs
    assert (tmp_path / "a" / "train.jsonl").is_file() and (tmp_path / "a" / "config.json").is_file()



def test_a_warm_restart_starts_from_the_finished_runs_weights_with_a_fresh_schedule(tmp_path: Path) -> None:
    cache = tiny_cache()
    first = train.run(tmp_path / "a", tiny_config(), cache=cache, teacher=tiny_teacher(), with_lfw=False, progress_bar=False)
    finished = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    restarted = train.make_trainee(tiny_config(), classes=6)
    train.init_from_checkpoint(restarted.model, tiny_config().model, tmp_path / "a")
    assert all(torch.equal(finished[k], v) for k, v in restarted.model.state_dict().items())
    # The continuation is a run of its own: its schedule starts at step 0.
    second = train.run(tmp_path / "b", tiny_config(init=str(tmp_path / "a" / "checkpoint.pt"), epochs=1, view_seed=1), cache=cache,
                       teacher=tiny_teacher(), with_lfw=False, progress_bar=False)
    assert first.step > 0 and second.step == first.step // 2
    # The exported manifest names both runs' commands: the weights need the whole chain.
    from facelink.export.query.export import lineage

    assert [run_dir for run_dir, _, _ in lineage(tmp_path / "b")] == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="mfn64-half model, this run trains mfn64"):
        train.init_from_checkpoint(create_query_model("mfn64"), "mfn64", tmp_path / "a")
    with pytest.raises(ValueError, match="neither mobilefacenet, random,"):
        train.init_from_checkpoint(restarted.model, tiny_config().model, tmp_path / "missing")


def test_a_warm_restart_may_raise_the_input_size_and_resamples_only_the_global_depthwise_kernel(tmp_path: Path) -> None:
    config = tiny_config(model="mfn64")
    torch.manual_seed(0)
    source = train.make_trainee(config, classes=6)
    train.save_checkpoint(tmp_path / "checkpoint.pt", source, train.Progress(), config)
    larger = create_query_model("mfn72")
    train.init_from_checkpoint(larger, "mfn72", tmp_path)
    before, after = source.model.state_dict(), larger.state_dict()
    assert before["gdconv.weight"].shape[-1] == 4 and after["gdconv.weight"].shape[-1] == 5
    assert all(torch.equal(before[k], v) for k, v in after.items() if k != "gdconv.weight")
    assert torch.equal(after["gdconv.weight"], resample_gdconv(before["gdconv.weight"], 5))
    with pytest.raises(ValueError, match="may change the input size, nothing else"):
        train.init_from_checkpoint(create_query_model("mfn96-half"), "mfn96-half", tmp_path)


def test_a_warm_restart_may_start_from_an_exported_query_models_manifest(tmp_path: Path) -> None:
    """What shipped can be trained on where the run's checkpoint is gone: the ONNX graph carries
    every weight under its state-dict name, and its shapes and input name the architecture."""
    from facelink.export.query.export import write_manifest

    torch.manual_seed(0)
    shipped = create_query_model("mfn64")
    manifest = write_manifest(shipped, tmp_path / "query.json", name="query-unit", version="v0", match_threshold=0.3,
                              flip_augmentation=False, source="test", description="test")
    again = create_query_model("mfn64")
    train.init_from_checkpoint(again, "mfn64", manifest)
    assert all(torch.equal(shipped.state_dict()[k], v) for k, v in again.state_dict().items())
    larger = create_query_model("mfn72")  # a warm restart at a larger input, as from a checkpoint
    train.init_from_checkpoint(larger, "mfn72", manifest)
    assert larger.gdconv.weight.shape[-1] == 5
    with pytest.raises(ValueError, match="mfn64 model, this run trains mfn96-half"):
        train.init_from_checkpoint(create_query_model("mfn96-half"), "mfn96-half", manifest)

    # A run from a manifest is the first of its lineage: the manifest says how it was made.
    from facelink.export.query.export import lineage

    tiny = write_manifest(create_query_model(tiny_config().model), tmp_path / "tiny.json", name="query-unit",
                          version="v0", match_threshold=0.3, flip_augmentation=False, source="made by hand",
                          description="test")
    train.run(tmp_path / "b", tiny_config(init=str(tiny), epochs=1), cache=tiny_cache(), teacher=tiny_teacher(),
              with_lfw=False, progress_bar=False)
    assert [run_dir for run_dir, _, _ in lineage(tmp_path / "b")] == [tmp_path / "b"]


def test_a_resampled_global_depthwise_kernel_weighs_a_uniform_feature_map_as_before() -> None:
    """Down (MobileFaceNet's 7x7 to 4x4) and up (mfn64's 4x4 to mfn72's 5x5): a kernel that is
    uniform keeps its total weight exactly, so a uniform map gives the same output; any kernel keeps
    it roughly (the cells of a non-divisible size overlap)."""
    for k, size in ((7, 4), (4, 5), (4, 4)):
        uniform = torch.full((3, 1, k, k), 0.5)
        assert torch.allclose(resample_gdconv(uniform, size).sum((1, 2, 3)), uniform.sum((1, 2, 3)))
        kernel = torch.rand(64, 1, k, k, generator=torch.Generator().manual_seed(k))
        ratio = resample_gdconv(kernel, size).sum((1, 2, 3)) / kernel.sum((1, 2, 3))
        assert resample_gdconv(kernel, size).shape == (64, 1, size, size) and ratio.sub(1).abs().max() < 0.25


# -- transformations ----------------------------------------------------------------------------------
def rotated_space(n: int, seed: int) -> PairedEmbeddings:
    """Query embeddings around 40 identity centres; two gallery 'models': random rotations + noise of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 64))
    labels = np.arange(n) % 40
    query = centres[labels] + 0.5 * rng.normal(size=(n, 64))
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    galleries = {}
    for name, dim in (("a@1", 64), ("b@1", 96)):
        rotation, _ = np.linalg.qr(np.random.default_rng(7 if name == "a@1" else 8).normal(size=(dim, dim)))
        g = np.pad(query, ((0, 0), (0, dim - 64))) @ rotation.T + 0.05 * rng.normal(size=(n, dim))
        galleries[name] = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
    return PairedEmbeddings(query.astype(np.float32), galleries, labels)


def test_transforms_learn_a_rotation_of_the_query_space_from_embeddings_alone() -> None:
    trained = train_transforms(rotated_space(2000, seed=0), TransformConfig(hidden=64, epochs=8, batch_size=128))
    held_out = rotated_space(400, seed=1)
    rows = evaluate(trained, held_out)
    assert rows["query vs T(a@1)"]["cos"] > 0.9 and rows["query vs T(b@1)"]["cos"] > 0.9
    assert rows["query vs ensemble"]["cos"] > 0.9


def model_manifests(folder: Path, data: PairedEmbeddings) -> dict[str, Path]:
    """Model manifests for the query model q@1 and `data`'s gallery models (write_ensemble binds to them)."""
    manifests = {}
    for model_id in ("q@1", *data.galleries):
        name, version = model_id.split("@")
        manifests[model_id] = folder / f"{name}.json"
        manifests[model_id].write_text(json.dumps({
            "name": name, "version": version, "task": "recognition", "file": f"{name}.onnx",
            "input": {"width": 8, "height": 8}, "alignment": {"template": [[1, 1], [6, 1], [4, 4], [2, 6], [6, 6]]},
            "embedding": {"dim": 64, "match_threshold": 0.5}}))
    return manifests


def test_exported_ensemble_runs_in_the_runtime_exactly_as_trained(tmp_path: Path) -> None:
    from facelink.export.query.transforms import uncertainty_quantiles, write_ensemble
    from facelink.runtime.asymmetric import GalleryEnsemble, RejectionPolicy

    data = rotated_space(600, seed=0)
    trained = train_transforms(data, TransformConfig(hidden=32, epochs=2, batch_size=128))
    manifests = model_manifests(tmp_path, data)
    out = write_ensemble(trained, tmp_path / "ensemble" / "q-1.json", query_manifest=str(manifests["q@1"]),
                         gallery_manifests={m: str(manifests[m]) for m in data.galleries},
                         quantiles=uncertainty_quantiles(trained, data), training={"test": True})
    ensemble = GalleryEnsemble.load(out)
    assert ensemble.query_model == "q@1" and ensemble.manifest.query_manifest == "../q.json"
    result = ensemble.transform(data.galleries)
    expected = trained.apply(data.galleries)
    for k, model in enumerate(result.models):
        assert np.allclose(result.members[:, k], expected[model], atol=1e-5)
    flagged = RejectionPolicy.from_manifest(ensemble.manifest, 0.1).apply(result.uncertainty).flagged
    assert abs(flagged.mean() - 0.1) < 0.01  # the calibrated threshold reproduces the fraction on its own data


def test_fitted_member_weights_favour_the_informative_member_and_reach_the_runtime(tmp_path: Path) -> None:
    from facelink.export.query.transforms import fit_member_weights, write_ensemble
    from facelink.runtime.asymmetric import GalleryEnsemble, ensemble_mean, unit

    data = rotated_space(400, seed=2)
    rng = np.random.default_rng(3)
    clean = unit(data.query + 0.3 * rng.normal(size=data.query.shape))
    noisy = unit(data.query + 3.0 * rng.normal(size=data.query.shape))
    weights = fit_member_weights(np.stack([noisy, clean], axis=1), data.query, data.labels, step=0.1)
    assert weights.sum() == pytest.approx(1) and weights[1] > weights[0] >= 0.1
    assert fit_member_weights(clean[:, None], data.query, data.labels).tolist() == [1.0]  # one member: nothing to fit

    trained = train_transforms(data, TransformConfig(hidden=16, epochs=1, batch_size=128))
    manifests = model_manifests(tmp_path, data)
    out = write_ensemble(trained, tmp_path / "ensemble" / "q-1.json", query_manifest=str(manifests["q@1"]),
                         gallery_manifests={m: str(manifests[m]) for m in data.galleries}, quantiles={},
                         training={"test": True}, weights=np.array([0.7, 0.3]))
    ensemble = GalleryEnsemble.load(out)
    assert ensemble.manifest.member_weights == {"a@1": 0.7, "b@1": 0.3}
    result = ensemble.transform(data.galleries)
    assert np.allclose(result.vectors, ensemble_mean(result.members, np.array([0.7, 0.3])), atol=1e-6)


def test_an_identity_member_trains_nothing_writes_no_file_and_joins_as_it_is(tmp_path: Path) -> None:
    from facelink.export.query.transforms import IdentityTransform, write_ensemble
    from facelink.runtime.asymmetric import GalleryEnsemble, TransformSpec, unit

    data = rotated_space(400, seed=4)
    data = PairedEmbeddings(data.query, {**data.galleries, "a@1": data.query}, data.labels)  # a@1 shares the query space
    trained = train_transforms(data, TransformConfig(hidden=16, epochs=1, batch_size=128), identity=("a@1",))
    assert isinstance(trained.transforms["a@1"], IdentityTransform)
    rows = evaluate(trained, data)
    assert "query vs b@1 (raw)" not in rows  # 96-d: no raw row to compare with
    assert "query vs a@1 (raw)" in rows and "query vs T(a@1)" not in rows  # the identity member is named as it is
    with pytest.raises(ValueError, match="not 64-d"):
        train_transforms(data, TransformConfig(epochs=1), identity=("b@1",))
    with pytest.raises(ValueError, match="not a gallery model"):
        train_transforms(data, TransformConfig(epochs=1), identity=("c@1",))

    manifests = model_manifests(tmp_path, data)
    out = write_ensemble(trained, tmp_path / "ensemble" / "q-1.json", query_manifest=str(manifests["q@1"]),
                         gallery_manifests={m: str(manifests[m]) for m in data.galleries}, quantiles={},
                         training={"test": True})
    ensemble = GalleryEnsemble.load(out)
    spec = next(t for t in ensemble.manifest.transforms if t.gallery_model == "a@1")
    assert spec.identity and spec.file is None
    assert sorted(p.name for p in out.parent.glob("*.onnx")) == ["q-1--from--b.onnx"]
    result = ensemble.transform(data.galleries)
    assert np.allclose(result.members[:, result.models.index("a@1")], unit(data.query), atol=1e-6)
    with pytest.raises(ValueError, match="identity transform"):
        TransformSpec(gallery_model="b@1", input_dim=96, output_dim=64)


def test_the_exported_manifest_names_the_training_command_of_its_run() -> None:
    from dataclasses import asdict

    from facelink.export.query.export import train_command
    from facelink.export.query.train import TrainConfig

    config = {**asdict(TrainConfig()), "model": "mfn64", "epochs": 22, "threads": 2}
    assert train_command(config, Path.home() / "runs" / "q") == \
        "python -m facelink.export.query.train --run-dir ~/runs/q --model mfn64 --epochs 22 --threads 2"
    warm = {**config, "init": str(Path.home() / "runs" / "q" / "checkpoint.pt"), "lr": 3e-4, "epochs": 40, "view_seed": 1}
    assert train_command(warm, Path.home() / "runs" / "r") == ("python -m facelink.export.query.train --run-dir ~/runs/r "
                                                              "--model mfn64 --init ~/runs/q/checkpoint.pt --lr 0.0003 "
                                                              "--view-seed 1 --epochs 40 --threads 2")
    mixed = {**warm, "augment": {**warm["augment"], "mixup": 0.5}}
    assert "--view-seed 1 --mixup 0.5 --epochs 40" in train_command(mixed, Path.home() / "runs" / "r")
    old = {**warm, "augment": {k: v for k, v in warm["augment"].items() if not k.startswith("mixup")}}
    assert "mixup" not in train_command(old, Path.home() / "runs" / "r")
