"""Train the face codec on the CPU, resumably.

    python -m facelink.export.codec.train --run-dir ~/.cache/facelink/runs/codec-v1 [--resume] [--max-minutes 150]

A run directory holds everything about one run:

* `config.json`   -- the `TrainConfig` (written when the run starts, read back on resume);
* `checkpoint.pt` -- model, both optimisers and the position in the schedule, written every
                     `checkpoint_minutes`, at the end of each epoch, and when the run stops
                     (time budget, Ctrl-C, SIGTERM); always tmp + rename, so a crash mid-write
                     never destroys the previous one;
* `train.jsonl`   -- every `log_every` steps: per quality, the window's mean loss, bpp
                     (estimated from the likelihoods), PSNR and teacher cosine; aux loss; speed;
* `val.jsonl`     -- after every epoch, on held-out celeba-dev identities, per quality: real
                     bytes per 128x128 face (CompressAI's rANS coder after `update()`), PSNR of
                     the decoded uint8 image, and the flip-augmented teacher cosine, mean and 5th
                     percentile;
* `split.json`    -- the held-out identities (keep them out of any later training, and use them
                     for the celeba-dev evaluation).

If the run directory has a checkpoint, training resumes from it (with `--resume` a missing
checkpoint is an error). Batches are drawn from (seed, epoch, batch number) and the torch noise
is reseeded each step from the same, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from facelink.config import CropRegionCoding
from facelink.runtime.codecs.learned import load_codec_manifest
from facelink.runtime.manifest import ManifestError

from ..training import Checkpoints, Progress, StopRequest, append_jsonl, config_from_dict, open_run
from .batches import Batch, BatchSampler, ring_region, split_by_identity
from .data import FaceCache, build_cache, training_sources
from .losses import LossTerms, RateDistortionIdentityLoss
from .model import CODEC_MODELS, FaceCodecModel, create_codec_model
from .teacher import FaceTeacher, template_matrices, warp_to_template
from .unbundle import checkpoint_state, codec_from_bundle, is_bundle_reference
from .widen import widen_codec


#: What a run trains: everything, or the decoder alone (see TrainConfig.train).
Trainable = Literal["all", "decoder"]


@dataclass
class TrainConfig:
    model: str = "default"
    # One (lambda, mu) per quality, lowest rate first. Lambda doubles per level (rates roughly
    # 150-600 bytes per 128x128 face); mu = 1000 * lambda keeps the identity term about as
    # strong as the distortion term at every level (1 - cos shrinks as the rate grows).
    lambdas: tuple[float, ...] = (0.0004, 0.0008, 0.0016, 0.0032, 0.0064)
    identity_weights: tuple[float, ...] = (0.4, 0.8, 1.6, 3.2, 6.4)
    batch_size: int = 16
    # 5e-4, not CompressAI's 1e-4: a run here is ~10k steps, not millions (gradients are clipped,
    # and a non-finite step is skipped).
    lr: float = 5e-4
    aux_lr: float = 1e-3
    clip_norm: float = 1.0
    frame_fraction: float = 0.25
    frame_sides: tuple[int, ...] = (128, 256)
    val_identities: int = 32
    val_images: int = 256
    epochs: int = 200
    seed: int = 0
    # torch intra-op threads. With another busy process on the 2 cores, 2 OpenMP threads wait at
    # every barrier for a descheduled sibling: measured 5-10x slower than 1 thread; use 1 then.
    threads: int = 2
    log_every: int = 25
    checkpoint_minutes: float = 5.0
    # A new run may start from another run's model weights (fresh optimizers and progress): the
    # way to retune the loss weights without paying again for what the codec already learned.
    init_from: str | None = None
    # "decoder": train the synthesis transform (and its inverse gains) only. The encoder, its
    # gains and the entropy model stay frozen, so every face codes to the very same bytes and a
    # loss weighted towards identity costs no rate: the decoder can only get better at what
    # the bits already carry. Meant with --init-from.
    train: Trainable = "all"
    # Share of the aligned batches above quality 1 coded as the edge codes its crops: the border
    # ring of latent cells at quality 1 (`batches.ring_region`), so that the encoder learns what
    # to leave to the ring and the decoder learns the seam; 0: every cell at the batch's quality.
    ring_fraction: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return config_from_dict(cls, data)


#: Settings that may change when a run is resumed; the rest define the run.
RESUMABLE_OVERRIDES = ("threads", "lr", "epochs", "log_every", "checkpoint_minutes")


def save_checkpoint(
    path: Path,
    model: FaceCodecModel,
    optimizer: torch.optim.Optimizer,
    aux_optimizer: torch.optim.Optimizer,
    progress: Progress,
    config: TrainConfig,
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "aux_optimizer": aux_optimizer.state_dict(),
            "progress": asdict(progress),
            "config": asdict(config),
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: FaceCodecModel, optimizer: torch.optim.Optimizer, aux_optimizer: torch.optim.Optimizer
) -> Progress:
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    aux_optimizer.load_state_dict(state["aux_optimizer"])
    return Progress(**state["progress"])


TRAINABLE: tuple[str, ...] = get_args(Trainable)


def freeze_for(model: FaceCodecModel, train: str) -> None:
    """Freeze what a `train` setting keeps fixed (see TrainConfig.train)."""
    if train not in TRAINABLE:
        raise ValueError(f"train must be one of {', '.join(TRAINABLE)}, got {train!r}")
    if train == "decoder":
        model.g_a.requires_grad_(False)
        model.gains.log_gain.requires_grad_(False)
        model.entropy_bottlenecks.requires_grad_(False)


def make_optimizers(
    model: FaceCodecModel, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    return (
        torch.optim.Adam(model.main_parameters(), lr=config.lr),
        torch.optim.Adam(model.aux_parameters(), lr=config.aux_lr),
    )


def _step_seed(seed: int, epoch: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, number, 2]).generate_state(1)[0])


def train_step(
    model: FaceCodecModel,
    criterion: RateDistortionIdentityLoss,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    aux_optimizer: torch.optim.Optimizer,
    clip_norm: float,
) -> tuple[LossTerms, float, bool]:
    """One optimiser step on the main loss and one on the entropy bottlenecks' aux loss.

    Returns the loss terms, the aux loss, and whether the main step was taken: a batch whose
    gradient is not finite is skipped rather than allowed to poison the weights of an
    unattended run (GDN at this learning rate can spike).
    """
    model.train()
    terms = criterion(model(batch.images, batch.quality, batch.region, batch.background), batch)
    optimizer.zero_grad(set_to_none=True)
    terms.loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.main_parameters(), clip_norm)
    stepped = bool(torch.isfinite(norm))  # a non-finite loss gives a non-finite norm too
    if stepped:
        optimizer.step()
    aux = model.aux_loss()
    if any(p.requires_grad for p in model.aux_parameters()):  # frozen with the entropy model otherwise
        aux_optimizer.zero_grad(set_to_none=True)
        aux.backward()
        aux_optimizer.step()
    return terms, aux.item(), stepped


class Window:
    """Running means over the last logging window, per quality (and per quality with the ring)."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[str, float]] = {}
        self.aux = 0.0
        self.steps = 0
        self.skipped = 0
        self.samples = 0
        self.started = time.perf_counter()

    def add(self, label: str, terms: LossTerms, aux: float, samples: int, stepped: bool) -> None:
        """One step of a batch coded as `label` says (`Batch.label`: the quality, 'r' with the ring)."""
        self.aux += aux
        self.steps += 1
        self.samples += samples
        if not stepped:
            self.skipped += 1
            return
        row = self.sums.setdefault(label, {"n": 0, "loss": 0.0, "bpp": 0.0, "mse": 0.0, "cos": 0.0})
        row["n"] += 1
        row["loss"] += terms.loss.item()
        row["bpp"] += terms.bpp.item()
        row["mse"] += terms.mse.item()
        row["cos"] += terms.cosine.item()

    def summary(self) -> dict:
        per_quality = {}
        for label, row in sorted(self.sums.items()):
            n = row["n"]
            per_quality[f"q{label}"] = {
                "n": n,
                "loss": round(row["loss"] / n, 5),
                "bpp": round(row["bpp"] / n, 5),
                "psnr": round(10 * math.log10(1 / max(row["mse"] / n, 1e-10)), 3),
                "cos": round(row["cos"] / n, 5),
            }
        elapsed = time.perf_counter() - self.started
        return {
            "aux": round(self.aux / max(self.steps, 1), 3),
            "skipped": self.skipped,
            "samples_per_s": round(self.samples / max(elapsed, 1e-9), 2),
            **per_quality,
        }


@dataclass
class Validation:
    """Held-out crops, their teacher matrices and the originals' flip-augmented embeddings."""

    images: Tensor
    matrices: Tensor
    reference: Tensor

    @classmethod
    def build(cls, cache: FaceCache, indices: np.ndarray, teacher: FaceTeacher) -> Validation:
        indices = np.sort(indices)
        images = torch.from_numpy(np.array(cache.crops[indices])).permute(0, 3, 1, 2).float() / 255
        matrices = torch.from_numpy(template_matrices(cache.crop_landmarks[indices], teacher.template))
        with torch.no_grad():
            reference = teacher.flip_augmented(warp_to_template(images, matrices, teacher.template.size))
        return cls(images, matrices, reference)


def _coded(model: FaceCodecModel, x: Tensor, quality: int, inside: Tensor | None, background: int) -> tuple[list[int], Tensor]:
    """Real bitstreams of `x` at `quality` (with `inside`: those cells only, the rest at
    `background`, as bitstream v2 codes them, one stream per part): bytes per image, and the
    decoded images rounded to uint8 as the cloud recognises them."""
    if inside is None:
        encoded = model.compress(x, quality)
        x_hat = model.decompress(encoded["strings"], encoded["shape"], quality)["x_hat"]
        return [len(s) for s in encoded["strings"][0]], torch.round(x_hat * 255) / 255
    y = model.g_a(x)
    sizes = [0] * len(x)
    for q, cells in ((quality, inside), (background, ~inside)):
        part = (y * model.gains.gain(q - 1))[:, :, cells].unsqueeze(2)  # (B, C, 1, cells)
        sizes = [n + len(s) for n, s in zip(sizes, model.entropy_bottlenecks[q - 1].compress(part))]
    # In eval mode the forward pass rounds around the medians: what decompress gives back.
    return sizes, torch.round(model(x, quality, inside, background)["x_hat"].clamp(0, 1) * 255) / 255


@torch.no_grad()
def validate(model: FaceCodecModel, teacher: FaceTeacher, data: Validation, chunk: int = 32) -> dict:
    """Real bitstreams for every quality (`q<n>`), and for every quality above the ring's with the
    crop's border ring at quality 1 as the edge sends it (`q<n>r`): bytes, PSNR and teacher cosine
    of the decoded uint8 faces."""
    model.eval()
    # Re-fit the bottlenecks' quantiles to their densities by bisection before building the
    # tables: the aux loss gets there too, but at its learning rate only after many thousand
    # steps, and until then the tables would be too narrow or too wide and the bytes misleading.
    model.update(force=True, update_quantiles=True)
    _, _, height, width = data.images.shape
    ring, inside = CropRegionCoding(), ring_region(height)
    settings = [(f"q{q}", q, None) for q in range(1, model.arch.qualities + 1)]
    settings += [(f"q{q}r", q, inside) for q in range(ring.background_quality + 1, model.arch.qualities + 1)]
    result = {}
    for key, quality, cells in settings:
        sizes, errors, cosines = [], [], []
        for start in range(0, len(data.images), chunk):
            x = data.images[start : start + chunk]
            coded, x_hat = _coded(model, x, quality, cells, ring.background_quality)
            sizes += coded
            errors.append(((x_hat - x) ** 2).mean(dim=(1, 2, 3)))
            faces = warp_to_template(x_hat, data.matrices[start : start + chunk], teacher.template.size)
            cosines.append((teacher.flip_augmented(faces) * data.reference[start : start + chunk]).sum(dim=1))
        mse, cos = torch.cat(errors), torch.cat(cosines)
        result[key] = {
            "bytes": round(float(np.mean(sizes)), 1),
            "bpp": round(float(np.mean(sizes)) * 8 / (height * width), 5),
            "psnr": round(float(10 * torch.log10(1 / mse.mean())), 3),
            "cos": round(float(cos.mean()), 5),
            "cos_p5": round(float(torch.quantile(cos, 0.05)), 5),
        }
    model.train()
    return result


def init_state(init_from: str) -> dict:
    """The weights `--init-from` names: a checkpoint, or a shipped bundle (its name or manifest),
    recovered into a trainable model (`unbundle`), so a run can continue what shipped even where
    the checkpoint that made it is gone."""
    if is_bundle_reference(init_from):
        model, name, report = codec_from_bundle(init_from)
        print(f"--init-from {init_from}: recovered from the bundle: {json.dumps(report)}", flush=True)
        return checkpoint_state(model, name, report)
    return torch.load(Path(init_from).expanduser(), map_location="cpu", weights_only=True)


def run(
    run_dir: Path,
    config: TrainConfig,
    *,
    max_minutes: float | None = None,
    cache: FaceCache | None = None,
    teacher: FaceTeacher | None = None,
    progress_bar: bool = True,
) -> Progress:
    """Train (or resume) the run in `run_dir` until `config.epochs` or `max_minutes`; returns where
    it stopped. `cache` and `teacher` default to the real ones (tests pass small stand-ins)."""
    started = time.perf_counter()
    checkpoint = open_run(run_dir, config)

    cache = cache or build_cache(training_sources())
    train_indices, val_indices = split_by_identity(cache, config.val_identities, config.seed)
    held_out = sorted(set(cache.identities()[val_indices].tolist()))
    (run_dir / "split.json").write_text(
        json.dumps(
            {"val_identities": held_out, "train_crops": len(train_indices), "val_crops": len(val_indices)},
            indent=1,
        )
        + "\n"
    )
    teacher = teacher or FaceTeacher()
    torch.manual_seed(config.seed)  # the initial weights, so a run is reproducible from its config
    model = create_codec_model(config.model).to(memory_format=torch.channels_last)
    freeze_for(model, config.train)
    if len(config.lambdas) != model.arch.qualities:
        raise ValueError(f"{len(config.lambdas)} lambdas for a model with {model.arch.qualities} qualities")
    criterion = RateDistortionIdentityLoss(teacher, config.lambdas, config.identity_weights)
    optimizer, aux_optimizer = make_optimizers(model, config)
    progress = Progress()
    if checkpoint.is_file():
        progress = load_checkpoint(checkpoint, model, optimizer, aux_optimizer)
        for group in optimizer.param_groups:  # --lr on resume takes effect
            group["lr"] = config.lr
    elif config.init_from:
        state = init_state(config.init_from)
        source = state.get("config", {}).get("model", config.model)
        if source == config.model:
            model.load_state_dict(state["model"])
        else:  # a wider architecture starts as exactly the trained narrower codec (Net2Net)
            trained = create_codec_model(source)
            trained.load_state_dict(state["model"])
            widen_codec(trained, model, seed=config.seed)
    sampler = BatchSampler(
        cache,
        train_indices,
        teacher.template,
        batch_size=config.batch_size,
        frame_fraction=config.frame_fraction,
        frame_sides=config.frame_sides,
        qualities=model.arch.qualities,
        seed=config.seed,
        ring_fraction=config.ring_fraction,
    )
    validation = Validation.build(cache, val_indices[: config.val_images], teacher)
    if config.init_from and progress.step == 0 and not (run_dir / "val.jsonl").is_file():
        # Where a run from other weights starts (epoch -1), so that its epochs can be read against
        # it (`frontier --reference RUN/val.jsonl --reference-epoch -1`).
        append_jsonl(run_dir / "val.jsonl", {"epoch": -1, "step": 0, **validate(model, teacher, validation)})
    print(
        f"{len(cache)} crops: {len(train_indices)} train, {len(val_indices)} held out "
        f"({len(held_out)} celeba-dev identities, {len(validation.images)} validated per epoch); "
        f"model {config.model} {model.arch.to_dict()}, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params; "
        f"resuming at epoch {progress.epoch} batch {progress.batch} step {progress.step}",
        flush=True,
    )

    with StopRequest() as stop:
        return _loop(
            run_dir,
            config,
            model,
            criterion,
            optimizer,
            aux_optimizer,
            sampler,
            validation,
            progress,
            stop,
            deadline=None if max_minutes is None else started + max_minutes * 60,
            progress_bar=progress_bar,
        )


def _loop(
    run_dir: Path,
    config: TrainConfig,
    model: FaceCodecModel,
    criterion: RateDistortionIdentityLoss,
    optimizer: torch.optim.Optimizer,
    aux_optimizer: torch.optim.Optimizer,
    sampler: BatchSampler,
    validation: Validation,
    progress: Progress,
    stop: StopRequest,
    *,
    deadline: float | None,
    progress_bar: bool,
) -> Progress:
    checkpoint = run_dir / "checkpoint.pt"
    checkpoints = Checkpoints(
        lambda: save_checkpoint(checkpoint, model, optimizer, aux_optimizer, progress, config),
        progress, config.checkpoint_minutes, stop, deadline,
    )

    window = Window()
    while progress.epoch < config.epochs:
        plan = sampler.epoch_plan(progress.epoch)
        bar = tqdm(
            total=len(plan),
            initial=progress.batch,
            desc=f"epoch {progress.epoch}",
            unit="batch",
            disable=not progress_bar,
            dynamic_ncols=True,
            mininterval=1 if sys.stderr.isatty() else 30,
        )
        while progress.batch < len(plan):
            batch = sampler.batch(plan[progress.batch], progress.epoch, progress.batch)
            torch.manual_seed(_step_seed(config.seed, progress.epoch, progress.batch))
            terms, aux, stepped = train_step(
                model, criterion, batch, optimizer, aux_optimizer, config.clip_norm
            )
            progress.batch += 1
            progress.step += 1
            progress.samples += len(batch.images)
            window.add(batch.label, terms, aux, len(batch.images), stepped)
            bar.update(1)
            if progress.step % config.log_every == 0:
                summary = window.summary()
                append_jsonl(
                    run_dir / "train.jsonl",
                    {
                        "step": progress.step,
                        "epoch": progress.epoch,
                        "samples": progress.samples,
                        "lr": config.lr,
                        **summary,
                    },
                )
                bar.set_postfix_str(
                    " ".join(
                        f"{k}:{v['bpp']:.3f}bpp/{v['cos']:.3f}"
                        for k, v in summary.items()
                        if k.startswith("q")
                    )
                    + f" {summary['samples_per_s']:.1f}/s"
                )
                window = Window()
            if checkpoints.after_step():
                bar.close()
                return progress
        bar.close()
        append_jsonl(
            run_dir / "val.jsonl",
            {
                "epoch": progress.epoch,
                "step": progress.step,
                **validate(model, criterion.teacher, validation),
            },
        )
        progress.epoch += 1
        progress.batch = 0
        checkpoints.save()
    return progress


def train_command(config: TrainConfig, run_dir: str = "RUN") -> str:
    """The command line that starts a run with `config` (the settings that differ from the defaults).
    Settings a resume may change (the learning rate, epochs, threads) are left out: a run's
    schedule of them is in its logs, not in its config."""
    flags = {
        "model": "--model", "batch_size": "--batch-size", "seed": "--seed", "lambdas": "--lambdas",
        "identity_weights": "--identity-weights", "init_from": "--init-from", "train": "--train",
        "ring_fraction": "--ring-fraction",
    }
    default = TrainConfig()
    parts = ["python", "-m", "facelink.export.codec.train", "--run-dir", run_dir]
    for field_name, flag in flags.items():
        value = getattr(config, field_name)
        if value != getattr(default, field_name):
            parts += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return " ".join(parts)  # not shlex.join: a quoted ~ would not expand where the command is pasted


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument(
        "--resume", action="store_true", help="require a checkpoint in --run-dir (resuming is automatic)"
    )
    parser.add_argument("--max-minutes", type=float, help="checkpoint and stop after this much wall time")
    parser.add_argument("--model", choices=sorted(CODEC_MODELS), help="new runs only")
    parser.add_argument("--batch-size", type=int, help="new runs only")
    parser.add_argument("--seed", type=int, help="new runs only")
    parser.add_argument(
        "--lambdas", type=_floats, help="new runs only: distortion weight per quality, comma-separated"
    )
    parser.add_argument(
        "--identity-weights", type=_floats, help="new runs only: identity weight per quality, comma-separated"
    )
    parser.add_argument(
        "--init-from", help="new runs only: start from this checkpoint's model weights, or a shipped bundle's "
        "(its name, e.g. wide, or manifest path; facelink.export.codec.unbundle); with a wider --model than "
        "the source's, grown into it function-preserving (facelink.export.codec.widen)"
    )
    parser.add_argument("--train", choices=TRAINABLE,
                        help="new runs only: 'decoder' trains the decoder alone, every face keeps its bytes")
    parser.add_argument("--ring-fraction", type=float, help="new runs only: share of the aligned batches above "
                        "quality 1 coded with the crop's border ring at quality 1, as the edge sends them (default 0)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args(argv)

    run_dir = args.run_dir.expanduser()
    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "lambdas": args.lambdas,
            "identity_weights": args.identity_weights,
            "init_from": args.init_from,
            "train": args.train,
            "ring_fraction": args.ring_fraction,
            "threads": args.threads,
            "lr": args.lr,
            "epochs": args.epochs,
        }.items()
        if v is not None
    }
    saved = run_dir / "config.json"
    if (run_dir / "checkpoint.pt").is_file():
        config = TrainConfig.from_dict(json.loads(saved.read_text()))
        fixed = {
            k: v for k, v in overrides.items() if k not in RESUMABLE_OVERRIDES and v != getattr(config, k)
        }
        if fixed:
            parser.error(
                f"{run_dir} is an existing run: cannot change {', '.join(fixed)} (use a new --run-dir)"
            )
    elif args.resume:
        parser.error(f"--resume: no checkpoint in {run_dir}")
    else:
        config = TrainConfig()
    config = TrainConfig(**{**asdict(config), **overrides})
    if config.init_from and not (run_dir / "checkpoint.pt").is_file():  # say so now, not after the cache is built
        if is_bundle_reference(config.init_from):
            try:
                load_codec_manifest(config.init_from)
            except (ManifestError, FileNotFoundError, ValueError) as error:
                parser.error(f"--init-from {config.init_from}: {error}")
        elif not Path(config.init_from).expanduser().is_file():
            parser.error(f"--init-from {config.init_from}: no such checkpoint (or give a bundled codec's name or manifest)")
    if not 0 <= config.ring_fraction <= 1:
        parser.error(f"--ring-fraction must be in 0..1, got {config.ring_fraction}")
    progress = run(run_dir, config, max_minutes=args.max_minutes)
    print(
        f"stopped at epoch {progress.epoch} batch {progress.batch}, step {progress.step}, "
        f"{progress.samples} samples, {progress.seconds / 3600:.2f} h of training in total",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
