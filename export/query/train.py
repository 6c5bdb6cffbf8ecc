"""Train the query model on the CPU by distillation from MobileFaceNet, resumably.

    python -m facelink.export.query.train [--run-dir ~/.cache/facelink/runs/query-v1] [--max-minutes 120]

Loss, per augmented view (see `data`): 1 - cos(query(view at 64-96 px), MobileFaceNet(view at 112 px)),
the teacher run on the fly on the very same view. Optionally (`--identity-weight`) a CosFace
margin term over the training identities, through a classifier on the normalised embedding; off
by default, because 1,650 of the ~2,200 training identities have a single picture (LFW's long
tail) and the teacher, trained on MS-Celeb-1M, already knows identity far better than those
labels can teach.

The student starts from MobileFaceNet's weights, pruned (`model.init_from_mobilefacenet`), or
from another run's (`--init`: a warm restart, possibly at a larger input size), and is trained
with Adam, a linear warm-up and a cosine decay over `epochs`.

A run directory holds everything about one run:

* `config.json`    -- the `TrainConfig` (written when the run starts, read back on resume);
* `checkpoint.pt`  -- model, classifier, optimiser, position in the schedule; written every
                      `checkpoint_minutes`, at the end of each epoch and when the run stops
                      (time budget, Ctrl-C, SIGTERM); tmp + rename, so a crash mid-write never
                      destroys the previous one;
* `train.jsonl`    -- every `log_every` steps: mean loss terms, cosine to the teacher, lr, speed;
* `val.jsonl`      -- after every epoch: held-out celeba-dev proxy and LFW View 2 (single view and
                      flip-augmented) through the ONNX export (`evaluate`);
* `split.json`     -- the held-out identities;
* `eval/`          -- the latest epoch's ONNX export and manifest (what `val.jsonl` measured).

A run directory with a checkpoint resumes from it. Batches are drawn from (view seed, epoch, batch
number) and nothing else is random, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from facelink.config import cache_dir
from facelink.export.codec.data import FaceCache, build_cache, training_sources
from facelink.runtime.alignment import ARCFACE
from facelink.runtime.manifest import ManifestError, load_manifest

from ..onnx_weights import conv_weights
from ..training import Checkpoints, Progress, StopRequest, append_jsonl, config_from_dict, open_run
from .data import Augment, ViewSampler, query_template, split_by_identity, unaugmented
from .evaluate import LfwProbe, both_views, held_out_metrics, raw_recognizer
from .export import write_manifest
from .model import (
    DEFAULT_QUERY_MODEL,
    MEAN,
    QUERY_MODELS,
    STD,
    QueryNet,
    create_query_model,
    full_mobilefacenet,
    init_from_mobilefacenet,
    resample_gdconv,
)

DEFAULT_RUN_DIR = cache_dir() / "runs" / "query-v1"
#: `TrainConfig.init` values that start from scratch weights; anything else names a checkpoint.
FRESH_INITS = ("mobilefacenet", "random")
TEACHER_MANIFEST = "mobilefacenet"


@dataclass
class TrainConfig:
    model: str = DEFAULT_QUERY_MODEL
    init: str = "mobilefacenet"        # or "random", or a run's checkpoint.pt (warm restart)
    batch_size: int = 64
    lr: float = 1e-3                   # peak; cosine decay to lr * final_lr_ratio
    final_lr_ratio: float = 0.01
    warmup_steps: int = 200
    weight_decay: float = 0.0          # the weights start from a trained network: no pull to zero
    epochs: int = 60
    identity_weight: float = 0.0
    cosface_margin: float = 0.35
    cosface_scale: float = 32.0
    augment: Augment = field(default_factory=Augment)
    val_identities: int = 32
    init_images: int = 256             # training faces on which pruning importance is measured
    seed: int = 0                      # the held-out identities, the model's random parts, the views
    # The views alone (None: `seed`). A warm restart keeps `seed`, so that it holds out the same
    # people, but should not replay the finished run's views epoch for epoch: give it its own.
    view_seed: int | None = None
    threads: int = 1
    log_every: int = 25
    checkpoint_minutes: float = 4.0

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return config_from_dict(cls, data)


#: Settings that may change when a run is resumed; the rest define the run.
RESUMABLE_OVERRIDES = ("threads", "epochs", "log_every", "checkpoint_minutes")


class CosFaceHead(nn.Module):
    """Large-margin cosine classifier (Wang et al., CVPR 2018): s * (cos(theta_y) - m) for the true class."""

    def __init__(self, dim: int, classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) * 0.01)
        self.scale, self.margin = scale, margin

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        cosine = F.normalize(embeddings, dim=1) @ F.normalize(self.weight, dim=1).T
        cosine = cosine - self.margin * F.one_hot(labels, cosine.shape[1])
        return F.cross_entropy(self.scale * cosine, labels)


class Normalize(nn.Module):
    """RGB in [0, 1] -> the query model's (and MobileFaceNet's) input normalisation."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


@dataclass
class Trainee:
    """Everything a step updates."""

    model: QueryNet
    head: CosFaceHead | None
    optimizer: torch.optim.Optimizer


def make_trainee(config: TrainConfig, classes: int) -> Trainee:
    model = create_query_model(config.model).to(memory_format=torch.channels_last)
    head = CosFaceHead(model.arch.dim, classes, config.cosface_scale, config.cosface_margin) if config.identity_weight > 0 else None
    params = [*model.parameters(), *(head.parameters() if head is not None else [])]
    return Trainee(model, head, torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay))


def learning_rate(config: TrainConfig, step: int, steps_per_epoch: int) -> float:
    total = max(1, config.epochs * steps_per_epoch)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = config.lr * config.final_lr_ratio
    return floor + 0.5 * (config.lr - floor) * (1 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    loss: float
    distill: float
    identity: float
    cosine: float


def train_step(trainee: Trainee, teacher: nn.Module, normalize: Normalize, views, config: TrainConfig, lr: float) -> StepResult:
    """One optimiser step of distillation (+ CosFace when enabled) on a batch of views."""
    with torch.inference_mode():
        target = F.normalize(teacher(normalize(views.teacher)), dim=1)
    target = target.clone()  # inference tensors cannot enter autograd
    trainee.model.train()
    embedding = trainee.model(normalize(views.student))
    cosine = (F.normalize(embedding, dim=1) * target).sum(dim=1)
    distill = (1 - cosine).mean()
    identity = trainee.head(embedding, views.labels) if trainee.head is not None else torch.zeros(())
    loss = distill + config.identity_weight * identity
    for group in trainee.optimizer.param_groups:
        group["lr"] = lr
    trainee.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainee.optimizer.step()
    return StepResult(loss.item(), distill.item(), identity.item(), cosine.mean().item())


def save_checkpoint(path: Path, trainee: Trainee, progress: Progress, config: TrainConfig) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": trainee.model.state_dict(),
                "head": trainee.head.state_dict() if trainee.head is not None else None,
                "optimizer": trainee.optimizer.state_dict(),
                "progress": asdict(progress),
                "config": asdict(config)}, tmp)
    os.replace(tmp, path)


def _checkpoint_weights(path: Path) -> tuple[str, dict[str, Tensor]]:
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"--init {path}: neither mobilefacenet, random, a run's checkpoint.pt nor a query manifest")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["config"]["model"], dict(state["model"])


def _manifest_weights(path: Path) -> tuple[str, dict[str, Tensor]]:
    """An exported query model's weights, so that what shipped can be trained on where the run's
    checkpoint is gone: its Conv nodes in graph order are the model's convolutions in order. The
    architecture is the registered one with those shapes at the manifest's input size."""
    manifest = load_manifest(path)
    convs = conv_weights(manifest.weights())
    for name, arch in QUERY_MODELS.items():
        if arch.input_size != manifest.input.width:
            continue
        model = create_query_model(name)
        names = [key for key, module in model.named_modules() if isinstance(module, nn.Conv2d)]
        if len(names) != len(convs):
            continue
        weights = {}
        for key, (weight, bias) in zip(names, convs):
            weights[f"{key}.weight"], weights[f"{key}.bias"] = torch.from_numpy(weight), torch.from_numpy(bias)
        if all(weights[k].shape == v.shape for k, v in model.state_dict().items()):
            return name, weights
    raise ValueError(f"--init {path}: its ONNX graph is no registered query model at {manifest.input.width} px")


def init_from_checkpoint(model: QueryNet, name: str, path: Path) -> None:
    """A warm restart: the weights of another run's checkpoint (or of an exported query model's
    manifest), a fresh optimiser and schedule -- a longer, "patient" distillation continued from a
    finished run.

    The source's architecture must be this run's, or differ only in input size: every
    convolution but the global depthwise one is blind to the size of its input, and that one is
    resampled to the new last feature map (`resample_gdconv`), so a model can continue at a
    higher resolution from what it learned at a lower one."""
    source, weights = _manifest_weights(path) if path.suffix == ".json" else _checkpoint_weights(path)
    if source != name:
        arch = QUERY_MODELS.get(source)
        if arch is None or replace(arch, input_size=model.arch.input_size) != model.arch:
            raise ValueError(f"--init {path}: a {source} model, this run trains {name} "
                             "(a warm restart may change the input size, nothing else)")
    if weights["gdconv.weight"].shape != model.gdconv.weight.shape:
        weights["gdconv.weight"] = resample_gdconv(weights["gdconv.weight"], model.arch.feature_size)
    model.load_state_dict(weights)


def load_checkpoint(path: Path, trainee: Trainee) -> Progress:
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainee.model.load_state_dict(state["model"])
    if trainee.head is not None:
        trainee.head.load_state_dict(state["head"])
    trainee.optimizer.load_state_dict(state["optimizer"])
    return Progress(**state["progress"])


class Window:
    """Running means over the last logging window."""

    def __init__(self) -> None:
        self.sums = {"loss": 0.0, "distill": 0.0, "identity": 0.0, "cos": 0.0}
        self.steps = self.samples = 0
        self.started = time.perf_counter()

    def add(self, result: StepResult, samples: int) -> None:
        for key, value in (("loss", result.loss), ("distill", result.distill), ("identity", result.identity), ("cos", result.cosine)):
            self.sums[key] += value
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict:
        elapsed = time.perf_counter() - self.started
        return {**{k: round(v / max(self.steps, 1), 5) for k, v in self.sums.items()},
                "samples_per_s": round(self.samples / max(elapsed, 1e-9), 1)}


@dataclass
class Evaluation:
    """What every epoch is measured on: held-out faces (aligned as the cloud aligns a canonical
    crop) with MobileFaceNet's flip-augmented embeddings, and LFW (None when LFW is absent)."""

    faces: np.ndarray
    reference: np.ndarray
    labels: np.ndarray
    lfw: LfwProbe | None

    def measure(self, model: QueryNet, out_dir: Path, epoch: int) -> dict:
        manifest = write_manifest(model, out_dir / "query.json", name="query-eval", version=f"epoch{epoch}",
                                  match_threshold=0.4, flip_augmentation=True, source="training run", description="per-epoch evaluation export")
        plain, flipped = both_views(raw_recognizer(load_manifest(manifest)), self.faces)
        result = {"held_out": {"single": held_out_metrics(plain, self.reference, self.labels),
                               "flip": held_out_metrics(flipped, self.reference, self.labels)}}
        if self.lfw is not None:
            result["lfw"] = self.lfw.evaluate(manifest)
        return result


def build_evaluation(cache: FaceCache, indices: np.ndarray, model: QueryNet, run_dir: Path, with_lfw: bool) -> Evaluation:
    # A throwaway export only to get the recogniser's own alignment for this input size.
    manifest = load_manifest(write_manifest(model, run_dir / "eval" / "query.json", name="query-eval", version="init",
                                            match_threshold=0.4, flip_augmentation=True, source="training run",
                                            description="per-epoch evaluation export"))
    recognizer = raw_recognizer(manifest)
    faces = np.stack([recognizer.align(np.asarray(cache.crops[i]), cache.crop_landmarks[i]) for i in indices])
    pair = cache.embeddings[indices]
    reference = pair[:, 0] + pair[:, 1]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    lfw = LfwProbe.build(manifest, run_dir / "lfw-landmarks.npz") if with_lfw else None
    return Evaluation(faces, reference, cache.identities()[indices], lfw)


def load_teacher() -> QueryNet:
    """MobileFaceNet in torch from the deployed ONNX file (sha256 checked through its manifest).

    Our own module with the ONNX weights (`model.full_mobilefacenet`, equal to ONNX Runtime to
    3e-6, tested) rather than the onnx2torch graph: 6 instead of 9 ms per face on one core.
    """
    teacher = full_mobilefacenet(load_manifest(TEACHER_MANIFEST).weights()).to(memory_format=torch.channels_last)
    return teacher.eval().requires_grad_(False)


def run(run_dir: Path, config: TrainConfig, *, max_minutes: float | None = None, cache: FaceCache | None = None,
        teacher: nn.Module | None = None, with_lfw: bool = True, progress_bar: bool = True) -> Progress:
    """Train (or resume) the run in `run_dir` until `config.epochs` or `max_minutes`; returns where
    it stopped. `cache` and `teacher` default to the real ones (tests pass small stand-ins)."""
    started = time.perf_counter()
    checkpoint = open_run(run_dir, config)

    cache = cache or build_cache(training_sources())
    train_indices, val_indices = split_by_identity(cache, config.val_identities, config.seed)
    identities = cache.identities()
    classes = sorted(set(identities[train_indices].tolist()))
    class_of = {name: i for i, name in enumerate(classes)}
    labels = np.array([class_of[name] for name in identities[train_indices]], dtype=np.int64)
    (run_dir / "split.json").write_text(json.dumps({
        "val_identities": sorted(set(identities[val_indices].tolist())), "train_crops": len(train_indices),
        "val_crops": len(val_indices), "train_identities": len(classes)}, indent=1) + "\n")

    teacher = teacher or load_teacher()
    torch.manual_seed(config.seed)  # the random parts of a new model (classifier, random init)
    trainee = make_trainee(config, len(classes))
    normalize = Normalize()
    size = trainee.model.arch.input_size
    progress = Progress()
    if checkpoint.is_file():
        progress = load_checkpoint(checkpoint, trainee)
    elif config.init == "mobilefacenet":
        chosen = np.random.default_rng(config.seed).choice(train_indices, size=config.init_images, replace=False)
        init_from_mobilefacenet(trainee.model, load_manifest(TEACHER_MANIFEST).weights(),
                                normalize(unaugmented(cache, np.sort(chosen), query_template(size))))
    elif config.init != "random":
        init_from_checkpoint(trainee.model, config.model, Path(config.init).expanduser())

    sampler = ViewSampler(cache, train_indices, labels, size, ARCFACE, batch_size=config.batch_size,
                          augment=config.augment, seed=config.seed if config.view_seed is None else config.view_seed)
    evaluation = build_evaluation(cache, val_indices, trainee.model, run_dir, with_lfw)
    params = sum(p.numel() for p in trainee.model.parameters())
    print(f"{len(cache)} crops: {len(train_indices)} train ({len(classes)} identities), {len(val_indices)} held out; "
          f"model {config.model} {trainee.model.arch.to_dict()}, {params / 1e6:.3f}M params; "
          f"resuming at epoch {progress.epoch} batch {progress.batch} step {progress.step}", flush=True)

    with StopRequest() as stop:
        return _loop(run_dir, config, trainee, teacher, normalize, sampler, evaluation, progress, stop,
                     deadline=None if max_minutes is None else started + max_minutes * 60, progress_bar=progress_bar)


def _loop(run_dir: Path, config: TrainConfig, trainee: Trainee, teacher: nn.Module, normalize: Normalize,
          sampler: ViewSampler, evaluation: Evaluation, progress: Progress, stop: StopRequest, *,
          deadline: float | None, progress_bar: bool) -> Progress:
    checkpoint = run_dir / "checkpoint.pt"
    checkpoints = Checkpoints(lambda: save_checkpoint(checkpoint, trainee, progress, config), progress,
                              config.checkpoint_minutes, stop, deadline)

    window = Window()
    while progress.epoch < config.epochs:
        plan = sampler.epoch_plan(progress.epoch)
        bar = tqdm(total=len(plan), initial=progress.batch, desc=f"epoch {progress.epoch}", unit="batch",
                   disable=not progress_bar, dynamic_ncols=True, mininterval=1 if sys.stderr.isatty() else 30)
        while progress.batch < len(plan):
            views = sampler.batch(plan[progress.batch], progress.epoch, progress.batch)
            lr = learning_rate(config, progress.step, len(plan))
            result = train_step(trainee, teacher, normalize, views, config, lr)
            progress.batch += 1
            progress.step += 1
            progress.samples += len(views.labels)
            window.add(result, len(views.labels))
            bar.update(1)
            if progress.step % config.log_every == 0:
                summary = window.summary()
                append_jsonl(run_dir / "train.jsonl", {"step": progress.step, "epoch": progress.epoch,
                                                        "samples": progress.samples, "lr": round(lr, 7), **summary})
                bar.set_postfix_str(f"cos {summary['cos']:.4f} {summary['samples_per_s']:.0f}/s")
                window = Window()
            if checkpoints.after_step():
                bar.close()
                return progress
        bar.close()
        measured = evaluation.measure(trainee.model, run_dir / "eval", progress.epoch)
        append_jsonl(run_dir / "val.jsonl", {"epoch": progress.epoch, "step": progress.step, "samples": progress.samples,
                                              "hours": round(checkpoints.hours, 3),
                                              **measured})
        print(f"epoch {progress.epoch}: {json.dumps(measured)}", flush=True)
        progress.epoch += 1
        progress.batch = 0
        checkpoints.save()
    return progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.query.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help=f"default {DEFAULT_RUN_DIR}")
    parser.add_argument("--max-minutes", type=float, help="checkpoint and stop after this much wall time")
    parser.add_argument("--model", choices=sorted(QUERY_MODELS), help="new runs only")
    parser.add_argument("--init", help="mobilefacenet (pruned, the default), random, or a finished run's directory or "
                        "checkpoint.pt, or an exported query model's manifest (e.g. runtime/manifests/facelink-query-v9.json), "
                        "to continue from with a fresh schedule (same --model, or one that differs only in input size, "
                        "e.g. mfn64 -> mfn72); new runs only")
    parser.add_argument("--batch-size", type=int, help="new runs only")
    parser.add_argument("--lr", type=float, help="peak learning rate; new runs only")
    parser.add_argument("--identity-weight", type=float, help="CosFace term weight (0: off); new runs only")
    parser.add_argument("--seed", type=int, help="held-out identities, initialisation and views; new runs only")
    parser.add_argument("--view-seed", type=int, help="the augmented views alone (default: --seed); new runs only")
    parser.add_argument("--mixup", type=float, help="share of views blended with another face of the batch "
                        "(default 0; see facelink.export.query.data); new runs only")
    parser.add_argument("--epochs", type=int, help="the cosine schedule's length (changing it on resume bends the schedule)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default 1: leaves a core to other jobs)")
    parser.add_argument("--no-lfw", action="store_true", help="skip the per-epoch LFW View 2 evaluation")
    args = parser.parse_args(argv)

    run_dir = args.run_dir.expanduser()
    overrides = {k: v for k, v in {"model": args.model, "init": args.init, "batch_size": args.batch_size, "lr": args.lr,
                                   "identity_weight": args.identity_weight, "seed": args.seed, "view_seed": args.view_seed,
                                   "threads": args.threads, "epochs": args.epochs}.items() if v is not None}
    if (run_dir / "checkpoint.pt").is_file():
        config = TrainConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
        fixed = {k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and v != getattr(config, k)}
        if fixed:
            parser.error(f"{run_dir} is an existing run: cannot change {', '.join(fixed)} (use a new --run-dir)")
    else:
        config = TrainConfig()
    augment = config.augment if args.mixup is None else replace(config.augment, mixup=args.mixup)
    if (run_dir / "checkpoint.pt").is_file() and augment != config.augment:
        parser.error(f"{run_dir} is an existing run: cannot change mixup (use a new --run-dir)")
    config = TrainConfig(**{**asdict(config), **overrides, "augment": augment})
    if config.init not in FRESH_INITS and not Path(config.init).expanduser().exists():
        parser.error(f"--init {config.init}: neither mobilefacenet, random nor an existing run directory, checkpoint "
                     "or query manifest")
    if config.init.endswith(".json") and not (run_dir / "checkpoint.pt").is_file():  # now, not after the cache is built
        try:
            init_from_checkpoint(create_query_model(config.model), config.model, Path(config.init).expanduser())
        except (ManifestError, ValueError) as error:
            parser.error(str(error))
    progress = run(run_dir, config, max_minutes=args.max_minutes, with_lfw=not args.no_lfw)
    print(f"stopped at epoch {progress.epoch} batch {progress.batch}, step {progress.step}, "
          f"{progress.samples} samples, {progress.seconds / 3600:.2f} h of training in total", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
