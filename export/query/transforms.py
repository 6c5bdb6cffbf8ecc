"""Gallery -> query embedding transformations, trained from stored embeddings only.

    python -m facelink.export.query.transforms --query runtime/manifests/facelink-query-v9.json \\
        --gallery mobilefacenet --gallery dlib-resnet-onnx [--out runtime/manifests/asymmetric/facelink-query-v9.json]

One small model per gallery model (Linial et al., "Asymmetric face recognition with cross model
compatible ensembles", 2023): T(g) = A g + MLP(g), a residual linear map plus a two-layer MLP,
from the gallery model's unit embedding to the query model's space. A starts at the ridge
least-squares map from gallery to query embeddings and the MLP's last layer at zero, so
training starts from the best linear alignment and learns only what is non-linear.

Losses, for a batch of faces with query embeddings q_i and transformed gallery embeddings
t_i = T(g_i) / |T(g_i)| (the three of the paper):

* similarity:  1 - <t_i, q_i>, the transformed embedding lands on the query embedding of the
  same face;
* KL:          KL(softmax_j(<q_i, q_j> / tau) || softmax_j(<t_i, q_j> / tau)): t_i relates to the
  batch's query embeddings as q_i does -- what 1:N matching against queries needs;
* classifier:  a CosFace classifier over the training identities, SHARED by every transform and
  anchored in the query space by also classifying the q_i: transformed embeddings must fall
  in their identity's region of the query space, not just near one picture's point.

A gallery model may instead join through the identity (`--identity`): the one the query model
was distilled from already lives in the query space, and a map regressed onto the query model's
embeddings learns that model's errors too. `evaluate` prints both rows ("query vs T(m)" and
"query vs m (raw)") so the choice is a measured one.

All transforms train jointly (the shared classifier couples them) on the faces of the
training split; the held-out celeba-dev identities measure them (cosine to the query
embedding, all-pairs asymmetric verification, and the ensemble). Training takes seconds on one
core; embedding the reference faces takes a minute per model the first time, then never again
(`embeddings.EmbeddingStore`). `train_transforms` takes any `PairedEmbeddings`, so the cloud can
retrain from the embeddings it stores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelink.benchmarks.verification import FAR_TARGET, eer, tar_at_far
from facelink.config import REPO_ROOT
from facelink.runtime.asymmetric import (
    ENSEMBLE_FOLDER,
    EnsembleManifest,
    TransformSpec,
    disagreement,
    ensemble_mean,
    own_key,
    unit,
)
from facelink.runtime.manifest import file_sha256, load_manifest

from .embeddings import DEFAULT_ROOT, EmbeddingStore, PairedEmbeddings

#: Fractions of gallery images the manifest calibrates rejection thresholds for.
REJECTION_FRACTIONS = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class TransformConfig:
    hidden: int = 512
    epochs: int = 40
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ridge: float = 1e-2             # regulariser of the least-squares initialisation
    kl_weight: float = 1.0
    kl_temperature: float = 0.05
    # Chosen on a nested split (32 more celeba-dev identities carved out of the training faces):
    # 0.1 -> 0.5 raised the ensemble's held-out TAR@FAR=1e-3 slightly, 0.5 to 2 were flat.
    class_weight: float = 0.5
    class_scale: float = 32.0
    class_margin: float = 0.2
    seed: int = 0
    threads: int = 1


class EmbeddingTransform(nn.Module):
    """T(g) = A g + MLP(g): unnormalised output in the query space."""

    def __init__(self, input_dim: int, output_dim: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, output_dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, output_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, g: Tensor) -> Tensor:
        return self.linear(g) + self.mlp(g)

    @torch.no_grad()
    def init_least_squares(self, g: Tensor, q: Tensor, ridge: float) -> None:
        """A = argmin |g A^T - q|^2 + ridge * n * |A|^2 (closed form)."""
        gram = g.T @ g + ridge * len(g) * torch.eye(g.shape[1], dtype=g.dtype)
        self.linear.weight.copy_(torch.linalg.solve(gram, g.T @ q).T)


def transform_losses(t: Tensor, q: Tensor, labels: Tensor, classifier: Tensor, config: TransformConfig) -> dict[str, Tensor]:
    """The three terms for one transform; `t` unnormalised, `q` unit, `classifier` (classes, d)."""
    t = F.normalize(t, dim=1)
    similarity = (1 - (t * q).sum(dim=1)).mean()
    target = F.log_softmax(q @ q.T / config.kl_temperature, dim=1)
    predicted = F.log_softmax(t @ q.T / config.kl_temperature, dim=1)
    kl = F.kl_div(predicted, target, log_target=True, reduction="batchmean")
    return {"similarity": similarity, "kl": kl, "class": cosface(t, labels, classifier, config)}


def cosface(x: Tensor, labels: Tensor, classifier: Tensor, config: TransformConfig) -> Tensor:
    cosine = F.normalize(x, dim=1) @ F.normalize(classifier, dim=1).T
    cosine = cosine - config.class_margin * F.one_hot(labels, cosine.shape[1])
    return F.cross_entropy(config.class_scale * cosine, labels)


class IdentityTransform(nn.Module):
    """A gallery model whose embedding is used as it is (no parameters, no ONNX file)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, g: Tensor) -> Tensor:
        return g


@dataclass
class TrainedTransforms:
    transforms: dict[str, EmbeddingTransform | IdentityTransform]
    config: TransformConfig
    history: list[dict]

    @torch.no_grad()
    def apply(self, galleries: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Unit transformed embeddings (numpy), as the runtime computes them."""
        return {name: unit(self.transforms[name].eval()(torch.from_numpy(unit(g))).numpy()) for name, g in galleries.items()}


def train_transforms(data: PairedEmbeddings, config: TransformConfig = TransformConfig(), log_every: int = 10,
                     identity: tuple[str, ...] = ()) -> TrainedTransforms:
    """Train one transform per gallery model of `data` into `data.query`'s space; the models named
    in `identity` (ids, embedding as wide as the query's) join as they are."""
    torch.manual_seed(config.seed)
    torch.set_num_threads(config.threads)
    _, labels = np.unique(data.labels, return_inverse=True)
    y = torch.from_numpy(labels.astype(np.int64))
    q = torch.from_numpy(unit(data.query))
    galleries = {name: torch.from_numpy(unit(g)) for name, g in data.galleries.items()}
    unknown = set(identity) - set(galleries)
    if unknown:
        raise ValueError(f"--identity {', '.join(sorted(unknown))}: not a gallery model ({', '.join(galleries)})")
    wrong = [name for name in identity if galleries[name].shape[1] != q.shape[1]]
    if wrong:
        raise ValueError(f"--identity {', '.join(wrong)}: its embedding is not {q.shape[1]}-d like the query model's")
    transforms: dict[str, EmbeddingTransform | IdentityTransform] = {}
    for name, g in galleries.items():
        if name in identity:
            transforms[name] = IdentityTransform(g.shape[1])
        else:
            transforms[name] = EmbeddingTransform(g.shape[1], q.shape[1], config.hidden)
            transforms[name].init_least_squares(g, q, config.ridge)
    trainable = {name: t for name, t in transforms.items() if isinstance(t, EmbeddingTransform)}
    classifier = nn.Parameter(F.normalize(_class_means(q, y), dim=1))  # starts at the identity centres
    params = [classifier, *(p for t in transforms.values() for p in t.parameters())]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(q) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.epochs):
        order = torch.randperm(len(q), generator=generator)
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            batch = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss = config.class_weight * cosface(q[batch], y[batch], classifier, config)
            for name, transform in trainable.items():
                terms = transform_losses(transform(galleries[name][batch]), q[batch], y[batch], classifier, config)
                loss = loss + terms["similarity"] + config.kl_weight * terms["kl"] + config.class_weight * terms["class"]
                for key, value in terms.items():
                    sums[f"{name}/{key}"] = sums.get(f"{name}/{key}", 0.0) + value.item() / steps_per_epoch
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if epoch % log_every == 0 or epoch == config.epochs - 1:
            history.append({"epoch": epoch, **{k: round(v, 5) for k, v in sums.items()}})
    return TrainedTransforms(transforms, config, history)


def _class_means(x: Tensor, labels: Tensor) -> Tensor:
    sums = torch.zeros(int(labels.max()) + 1, x.shape[1]).index_add_(0, labels, x)
    return sums / torch.bincount(labels).clamp(min=1).unsqueeze(1).to(x.dtype)


# -- measurement ---------------------------------------------------------------------------------------
def verification(probe: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> dict:
    """All pairs i != j of held-out faces, probe i (query model) against gallery j: TAR@FAR=1e-3, EER."""
    scores = probe @ gallery.T
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    same = (labels[:, None] == labels[None, :])[off_diagonal]
    s = scores[off_diagonal]
    return {"tar_at_far": round(100 * tar_at_far(s, same, FAR_TARGET), 3), "eer": round(100 * eer(s, same), 3)}


def ensemble_members(trained: TrainedTransforms, data: PairedEmbeddings, query_member: bool) -> np.ndarray:
    """(N, M, d): every transformed gallery embedding, then the query model's own when it is a member."""
    members = list(trained.apply(data.galleries).values()) + ([unit(data.query)] if query_member else [])
    return np.stack(members, axis=1)


def fit_member_weights(members: np.ndarray, query: np.ndarray, labels: np.ndarray, step: float = 0.05) -> np.ndarray:
    """Weights (M,) on the simplex for the gallery vector, by grid search (`step`): the ones under
    which query embeddings verify best against it (all pairs, TAR@FAR=1e-3, then EER).

    Fitted on held-out faces: on the training faces every transform lands closer to the query
    embedding than it will on a new picture, and the weights would favour the transforms over the
    query model's own member, which is the same on both. With M members there are M - 1 free
    numbers, so a few hundred faces pin them down; the benchmark measures them on other people.
    """
    m = members.shape[1]
    if m == 1:
        return np.ones(1)
    # Every member keeps at least one step of weight: a picture enrolled with a subset of the
    # members must still have a gallery vector, and a zero would hide a member from the mean.
    ticks = np.round(np.arange(step, 1, step), 6)
    best, best_key = np.full(m, 1 / m), (-1.0, 0.0)
    for combo in np.array(np.meshgrid(*[ticks] * (m - 1), indexing="ij")).reshape(m - 1, -1).T:
        weights = np.append(combo, 1 - combo.sum())
        if weights[-1] < step - 1e-9:
            continue
        row = verification(unit(query), ensemble_mean(members, weights), labels)
        key = (row["tar_at_far"], -row["eer"])
        if key > best_key:
            best, best_key = weights, key
    return best


def evaluate(trained: TrainedTransforms, data: PairedEmbeddings, query_member: bool = False,
             weights: np.ndarray | None = None) -> dict:
    """Held-out figures: per transform and for the ensemble (equal and, given, fitted weights),
    plus both symmetric baselines."""
    q = unit(data.query)
    transformed = trained.apply(data.galleries)
    rows: dict[str, dict] = {"query symmetric": verification(q, q, data.labels)}
    for name, g in data.galleries.items():
        rows[f"{name} symmetric"] = verification(unit(g), unit(g), data.labels)
    for name, t in transformed.items():
        identity = isinstance(trained.transforms[name], IdentityTransform)
        label = f"query vs {name} (raw)" if identity else f"query vs T({name})"
        rows[label] = {"cos": round(float(np.einsum("ij,ij->i", t, q).mean()), 5), **verification(q, t, data.labels)}
        g = unit(data.galleries[name])
        if g.shape[1] == q.shape[1] and not identity:
            rows[f"query vs {name} (raw)"] = {"cos": round(float(np.einsum("ij,ij->i", g, q).mean()), 5),
                                             **verification(q, g, data.labels)}
    members = ensemble_members(trained, data, query_member)
    if members.shape[1] > 1:
        variants = {"query vs ensemble": None, **({"query vs weighted ensemble": weights} if weights is not None else {})}
        for name, w in variants.items():
            mean = ensemble_mean(members, w)
            rows[name] = {"cos": round(float(np.einsum("ij,ij->i", mean, q).mean()), 5), **verification(q, mean, data.labels)}
    return rows


def uncertainty_quantiles(trained: TrainedTransforms, data: PairedEmbeddings, query_member: bool = False) -> dict[str, float]:
    """Uncertainty above which the `REJECTION_FRACTIONS` of `data`'s faces lie."""
    members = ensemble_members(trained, data, query_member)
    if members.shape[1] < 2:
        return {}
    u = disagreement(members)
    return {str(f): round(float(np.quantile(u, 1 - f)), 6) for f in REJECTION_FRACTIONS}


# -- export --------------------------------------------------------------------------------------------
def export_transform(transform: EmbeddingTransform, path: Path) -> Path:
    transform.eval()
    tmp = path.with_name(path.name + ".tmp")
    torch.onnx.export(transform, (torch.zeros(1, transform.linear.in_features),), str(tmp), input_names=["embedding"],
                      output_names=["transformed"], dynamic_axes={"embedding": {0: "batch"}, "transformed": {0: "batch"}},
                      opset_version=17, dynamo=False)
    tmp.replace(path)
    return path


def write_ensemble(trained: TrainedTransforms, out: Path, *, query_manifest: str, gallery_manifests: dict[str, str],
                   quantiles: dict[str, float], training: dict, query_member: bool = False,
                   weights: np.ndarray | None = None) -> Path:
    """The transforms as ONNX files beside `out`, and the ensemble manifest `out` naming them."""
    query = load_manifest(query_manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    specs = []
    for model_id, transform in trained.transforms.items():
        gallery = load_manifest(gallery_manifests[model_id])
        if isinstance(transform, IdentityTransform):
            specs.append(TransformSpec(gallery_model=model_id, gallery_sha256=gallery.sha256,
                                       input_dim=transform.dim, output_dim=transform.dim))
            continue
        path = export_transform(transform, out.parent / f"{out.stem}--from--{gallery.name}.onnx")
        specs.append(TransformSpec(gallery_model=model_id, gallery_sha256=gallery.sha256, file=path.name,
                                   sha256=file_sha256(path), input_dim=transform.linear.in_features,
                                   output_dim=transform.linear.out_features))
    query_path = Path(query_manifest)
    reference = query.name if query_path.suffix != ".json" else _relative(query_path.resolve(), out.parent.resolve())
    keys = [*trained.transforms, *([own_key(query.model_id)] if query_member else [])]
    member_weights = {} if weights is None else {k: round(float(w), 6) for k, w in zip(keys, weights, strict=True)}
    manifest = EnsembleManifest(
        name=out.stem, query_model=query.model_id, query_sha256=query.sha256, query_manifest=reference,
        transforms=specs, query_member=query_member, member_weights=member_weights,
        uncertainty_quantiles=quantiles, training=training,
        description=(f"Gallery -> {query.model_id} embedding transformations (residual linear + 2-layer MLP"
                     + (f"; identity for {', '.join(t.gallery_model for t in specs if t.identity)}"
                        if any(t.identity for t in specs) else "") + "), trained "
                     "from stored embeddings by facelink.export.query.transforms; gallery vector = "
                     + ("weighted " if member_weights else "") + "mean of the unit transformed embeddings"
                     + (" and the query model's own (identity transform)" if query_member else "")
                     + "; uncertainty = 1 - their mean pairwise cosine."),
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(), indent=2) + "\n")
    tmp.replace(out)
    return out


def _relative(path: Path, folder: Path) -> str:
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(Path("..") / path.relative_to(folder.parent)) if path.is_relative_to(folder.parent) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m facelink.export.query.transforms", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query", required=True, help="query model manifest (name or path)")
    parser.add_argument("--gallery", action="append", required=True, help="gallery model manifest; repeat per model")
    parser.add_argument("--out", type=Path,
                        help="ensemble manifest to write (default: runtime/manifests/asymmetric/<query name>-<version>.json)")
    parser.add_argument("--store", type=Path, default=DEFAULT_ROOT, help=f"embedding store (default {DEFAULT_ROOT})")
    parser.add_argument("--epochs", type=int, default=TransformConfig.epochs)
    parser.add_argument("--hidden", type=int, default=TransformConfig.hidden, help="width of the MLP's hidden layer")
    parser.add_argument("--kl-weight", type=float, default=TransformConfig.kl_weight, help="weight of the KL term")
    parser.add_argument("--class-weight", type=float, default=TransformConfig.class_weight,
                        help="weight of the shared CosFace classifier's terms")
    parser.add_argument("--val-identities", type=int, default=32, help="held-out celeba-dev identities (the query model's split)")
    parser.add_argument("--query-member", action="store_true",
                        help="the query model's own embedding of a gallery picture joins the mean and the uncertainty")
    parser.add_argument("--identity", action="append", default=[], metavar="GALLERY",
                        help="this gallery model (one of --gallery) joins untransformed: for the model the query "
                             "model was distilled from; repeatable")
    parser.add_argument("--fit-weights", action="store_true",
                        help="weigh the members of the gallery vector, fitted on the held-out faces (default: equal)")
    args = parser.parse_args(argv)

    from facelink.export.codec.data import build_cache, training_sources

    from .data import split_by_identity

    started = time.perf_counter()
    cache = build_cache(training_sources())
    store = EmbeddingStore(cache, args.store)
    data = store.paired(args.query, args.gallery)
    gallery_manifests = {load_manifest(g).model_id: g for g in args.gallery}
    train_rows, val_rows = split_by_identity(cache, args.val_identities, seed=0)
    config = TransformConfig(epochs=args.epochs, hidden=args.hidden, kl_weight=args.kl_weight, class_weight=args.class_weight)
    embedded = time.perf_counter()
    missing = [g for g in args.identity if g not in args.gallery]
    if missing:
        parser.error(f"--identity {', '.join(missing)}: name it with --gallery too")
    identity = tuple(load_manifest(g).model_id for g in args.identity)
    trained = train_transforms(data.rows(train_rows), config, identity=identity)
    trained_at = time.perf_counter()
    held_out = data.rows(val_rows)
    weights = None
    if args.fit_weights:
        weights = fit_member_weights(ensemble_members(trained, held_out, args.query_member), held_out.query, held_out.labels)
        print("member weights (fitted on the held-out faces): " + ", ".join(f"{w:.2f}" for w in weights))
    measured = evaluate(trained, held_out, args.query_member, weights)
    # Calibrated on the held-out faces: like gallery images, the transforms never saw them (on the
    # training faces they agree more, and a threshold from there would reject far more than asked).
    quantiles = uncertainty_quantiles(trained, held_out, args.query_member)
    for row in trained.history:
        print(json.dumps(row))
    print(f"held out: {len(val_rows)} faces of {args.val_identities} celeba-dev identities; all pairs, probe = query model")
    for name, row in measured.items():
        print(f"  {name:40s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
    query = load_manifest(args.query)
    out = args.out or REPO_ROOT / "runtime" / "manifests" / ENSEMBLE_FOLDER / f"{query.name}-{query.version}.json"
    command = "python -m facelink.export.query.transforms " + " ".join(sys.argv[1:] if argv is None else argv)
    write_ensemble(trained, out, query_manifest=args.query, gallery_manifests=gallery_manifests, quantiles=quantiles,
                   training={"command": command, "config": asdict(config), "train_faces": len(train_rows),
                             "held_out_faces": len(val_rows), "held_out": measured},
                   query_member=args.query_member, weights=weights)
    print(f"wrote {out}; embeddings {embedded - started:.0f} s, training {trained_at - embedded:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
