"""Export a query model to ONNX and describe it with a manifest, so the runtime loads it like any recogniser.

    python -m facelink.export.query.export --run-dir ~/.cache/facelink/runs/query-v9 \\
        --out runtime/manifests/facelink-query-v9.json --version v9 --no-flip

The ONNX graph takes (batch, 3, S, S) RGB normalised with MobileFaceNet's mean/std and returns
the unnormalised (batch, 128) embedding; opset 17, dynamic batch, fp32 weights. The manifest
names the file relative to itself (it is written beside it) with its sha256, the ArcFace
template scaled to S, and the match threshold (calibrate it with `facelink bench verification`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from facelink.runtime.manifest import file_sha256, load_manifest

from .data import query_template
from .model import MEAN, STD, QueryNet, create_query_model

OPSET = 17


def export_onnx(model: QueryNet, path: Path) -> Path:
    """Write `model` as ONNX to `path` (tmp + rename: a reader never sees half a file)."""
    model.eval()
    size = model.arch.input_size
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, (torch.zeros(1, 3, size, size),), str(tmp), input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=OPSET, dynamo=False,
    )
    tmp.replace(path)
    return path


def manifest_dict(model: QueryNet, onnx_path: Path, *, name: str, version: str, match_threshold: float,
                  flip_augmentation: bool, source: str, description: str) -> dict:
    size = model.arch.input_size
    template = query_template(size)
    return {
        "name": name,
        "version": version,
        "task": "recognition",
        "format": "onnx",
        "file": onnx_path.name,
        "sha256": file_sha256(onnx_path),
        "input": {"width": size, "height": size, "color": "RGB", "layout": "NCHW", "scale": 255.0,
                  "mean": list(MEAN), "std": list(STD)},
        "alignment": {"template": [[round(float(x), 4), round(float(y), 4)] for x, y in template.points]},
        "embedding": {"dim": model.arch.dim, "normalize": True, "flip_augmentation": flip_augmentation,
                      "match_threshold": match_threshold},
        "license": "Apache-2.0 (weights derived from MobileFaceNet, foamliu/MobileFaceNet)",
        "source": source,
        "description": description,
    }


def write_manifest(model: QueryNet, manifest_path: Path, **fields: object) -> Path:
    """Export `model` beside `manifest_path` (same stem, .onnx) and write the manifest; returns it.

    The manifest is read back through `load_manifest`, which validates it and checks the sha256.
    """
    onnx_path = export_onnx(model, manifest_path.with_suffix(".onnx"))
    manifest = manifest_dict(model, onnx_path, **fields)  # type: ignore[arg-type]
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(manifest_path)
    load_manifest(manifest_path).weights()
    return manifest_path


def load_trained(run_dir: Path) -> tuple[QueryNet, dict, dict]:
    """The query model of a run's latest checkpoint, its progress, and its training config."""
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    model = create_query_model(state["config"]["model"])
    model.load_state_dict(state["model"])
    return model, state["progress"], state["config"]


def lineage(run_dir: Path) -> list[tuple[Path, dict, dict]]:
    """(run directory, config, progress) of the run and of every run it was warm-started from
    (`--init` a checkpoint), oldest first: what it takes to reproduce the weights. A run started
    from an exported manifest ends the chain: the manifest records how its own weights were made."""
    from .train import FRESH_INITS  # train imports this module (it writes manifests)

    runs: list[tuple[Path, dict, dict]] = []
    while True:
        if any(run_dir.resolve() == seen.resolve() for seen, _, _ in runs):
            raise ValueError(f"{run_dir}: its runs' --init checkpoints form a loop")
        state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
        runs.append((run_dir, state["config"], state["progress"]))
        if state["config"].get("init", "mobilefacenet") in FRESH_INITS or state["config"]["init"].endswith(".json"):
            return runs[::-1]
        init = Path(state["config"]["init"]).expanduser()
        run_dir = init if init.is_dir() else init.parent


def last_validation(run_dir: Path) -> dict | None:
    path = run_dir / "val.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return json.loads(lines[-1]) if lines else None


def train_command(config: dict, run_dir: Path) -> str:
    """The training command that reproduces `config` (a run's config.json): the flags that differ
    from TrainConfig's defaults."""
    from .train import TrainConfig  # train imports this module (it writes manifests)

    defaults = asdict(TrainConfig())
    # In the order of `train --help`; mixup lives in `augment` (absent from runs older than the option).
    values = {**config, "mixup": config.get("augment", {}).get("mixup", 0.0)}
    defaults["mixup"] = defaults["augment"]["mixup"]
    flags = {"model": "--model", "init": "--init", "batch_size": "--batch-size", "lr": "--lr",
             "identity_weight": "--identity-weight", "seed": "--seed", "view_seed": "--view-seed",
             "mixup": "--mixup", "epochs": "--epochs", "threads": "--threads"}
    args = [f"{flag} {values[key]}" for key, flag in flags.items() if key in values and values[key] != defaults[key]]
    return _home_relative(" ".join(["python -m facelink.export.query.train --run-dir", str(run_dir), *args]))


def _home_relative(text: str) -> str:
    """`text` with the home folder written as ~, so a recorded command reads the same on any machine."""
    home = str(Path.home())
    return text.replace(home + "/", "~/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.query.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="manifest path; the .onnx goes beside it")
    parser.add_argument("--name", default="facelink-query")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--threshold", type=float, default=0.4, help="match threshold (cosine)")
    parser.add_argument("--no-flip", action="store_true", help="one pass per face instead of face + mirror")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.expanduser()
    model, _, config = load_trained(run_dir)
    arch = model.arch
    validation = last_validation(run_dir)
    measured = ""
    if validation is not None and "lfw" in validation:
        lfw = validation["lfw"]["flip" if not args.no_flip else "single"]
        measured = (f" LFW View 2 after epoch {validation['epoch']} (the run's own evaluation through this ONNX export): "
                    f"{lfw['accuracy']:.2f}% +- {lfw['accuracy_std']:.2f}, TAR@FAR=1e-3 {lfw['tar_at_far']:.2f}%.")
    runs = lineage(run_dir)
    origin = runs[0][1].get("init", "mobilefacenet")
    start = {"random": "random", "mobilefacenet": "MobileFaceNet's"}.get(origin, f"{Path(origin).name}'s")
    commands = ", then ".join(f"`{train_command(c, d)}`" for d, c, _ in runs)
    if origin.endswith(".json"):  # continued from what shipped: how that was made comes first
        commands = f"{load_manifest(origin).source}, then {commands}"
    schedules = ", then continued with a fresh schedule ".join(
        f"({p['epoch']} epochs, {p['samples']} views, {p['seconds'] / 3600:.2f} h on {c.get('threads', 1)} CPU thread(s))"
        for _, c, p in runs)
    path = write_manifest(
        model, args.out, name=args.name, version=args.version, match_threshold=args.threshold,
        flip_augmentation=not args.no_flip,
        source=(f"{commands} (every other setting: TrainConfig's defaults, export/query/train.py), "
                f"then `python -m facelink.export.query.export "
                f"{_home_relative(' '.join(sys.argv[1:] if argv is None else argv))}`"),
        description=(f"facelink's query model '{config['model']}': MobileFaceNet's topology with "
                     f"{arch.expand_keep:.0%} of each bottleneck's expansion channels, on the ArcFace face region at "
                     f"{arch.input_size}x{arch.input_size}, {arch.dim}-d, "
                     f"{'one pass a face' if args.no_flip else 'face + mirror'}; "
                     f"initialised from {start} weights and distilled from MobileFaceNet on celeba-dev and LFW training "
                     f"images {schedules}.{measured}"),
    )
    print(f"wrote {path} and {path.with_suffix('.onnx')} ({path.with_suffix('.onnx').stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
