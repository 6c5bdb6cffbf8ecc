"""The 1:N open-set protocol and its metrics, pure functions on score matrices.

Used by benchmarks/asymmetric.py; kept apart because nothing here knows about models, images or
files: who is enrolled with which picture (`open_set_protocol`), rank-1 and DIR at a FAR
(`rank1`, `dir_at_far`), and the selective risk of a gallery from which the most uncertain
pictures were rejected (`selective_risk`, `RiskCoverage`, `risk_coverage`). The definitions are
in benchmarks/asymmetric.py's module docstring.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from .verification import threshold_at_far

REJECTION_MAX = 0.30
REJECTION_STEP = 0.01


# -- who is enrolled, who probes ----------------------------------------------------------------------
@dataclass(frozen=True)
class OpenSet:
    """Who is enrolled with which image, and which images probe. Indices refer to the set's images."""

    gallery: np.ndarray           # (G,) image index of each enrolled identity's gallery image
    enrolled: tuple               # (G,) identity of each gallery entry
    genuine: np.ndarray           # (P,) image index of each probe of an enrolled identity
    target: np.ndarray            # (P,) position in `gallery` of each genuine probe's identity
    distractors: np.ndarray       # (D,) image index of each probe of a never-enrolled identity

    def summary(self) -> dict[str, int]:
        return {"gallery": int(self.gallery.size), "genuine_probes": int(self.genuine.size),
                "distractors": int(self.distractors.size)}


def open_set_protocol(names: Sequence[str], identities: Sequence[Hashable],
                      never_enrolled: Collection[Hashable] = ()) -> OpenSet:
    """The 1:N split of a set of images (`names[i]` is image i's name, `identities[i]` its person).

    Every identity with two or more images and not in `never_enrolled` is enrolled with its first
    image by name; its other images are genuine probes. Every image of the other identities (one
    image, or never enrolled) is a distractor. Deterministic: image order does not matter.
    """
    if len(names) != len(identities):
        raise ValueError(f"{len(names)} names but {len(identities)} identities")
    if len(set(names)) != len(names):
        raise ValueError("image names must be unique")
    by_identity: dict[Hashable, list[int]] = {}
    for index in sorted(range(len(names)), key=lambda i: names[i]):
        by_identity.setdefault(identities[index], []).append(index)
    excluded = set(never_enrolled)
    gallery, enrolled, genuine, target, distractors = [], [], [], [], []
    for identity in sorted(by_identity, key=lambda i: names[by_identity[i][0]]):
        images = by_identity[identity]
        if len(images) >= 2 and identity not in excluded:
            genuine += images[1:]
            target += [len(gallery)] * (len(images) - 1)
            gallery.append(images[0])
            enrolled.append(identity)
        else:
            distractors += images
    as_index = lambda values: np.array(values, dtype=np.int64)  # noqa: E731
    return OpenSet(as_index(gallery), tuple(enrolled), as_index(genuine), as_index(target), as_index(distractors))


def cosine_matrix(probes: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(P, d) x (G, d) -> (P, G) cosine similarities (rows re-normalised, whatever the model did)."""
    def unit(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return unit(probes) @ unit(gallery).T


def confusers(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(P, G) bool: gallery entries other than the probe's own that score at least as high as it."""
    scores = np.asarray(scores, dtype=np.float64)
    rows = np.arange(scores.shape[0])
    above = scores >= scores[rows, target][:, None]
    above[rows, target] = False
    return above


def identification(scores: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(correct, true score) per genuine probe: correct when its own gallery entry scores strictly
    above every other one (a tie counts as an error)."""
    scores = np.asarray(scores, dtype=np.float64)
    true = scores[np.arange(scores.shape[0]), target]
    return ~confusers(scores, target).any(axis=1), true


def rank1(scores: np.ndarray, target: np.ndarray) -> float:
    """Closed-set rank-1 identification rate of genuine probes (`scores`: probes x gallery)."""
    correct, _ = identification(scores, target)
    if correct.size == 0:
        raise ValueError("no genuine probes")
    return float(correct.mean())


def dir_threshold(distractor_scores: np.ndarray, far: float) -> float:
    """The lowest threshold at which at most floor(far x D) distractors' best scores pass."""
    best = np.asarray(distractor_scores, dtype=np.float64).max(axis=1)
    return threshold_at_far(best, np.zeros(best.size, dtype=bool), far)


def dir_at_far(genuine_scores: np.ndarray, target: np.ndarray, distractor_scores: np.ndarray,
               far: float) -> tuple[float, float]:
    """(DIR, threshold): detection and identification rate at the threshold where `far` of the
    distractors are falsely accepted (by their best gallery score)."""
    threshold = dir_threshold(distractor_scores, far)
    correct, true = identification(genuine_scores, target)
    return float(np.mean(correct & (true >= threshold))), threshold


def selective_risk(scores: np.ndarray, target: np.ndarray, enrolled: np.ndarray) -> tuple[float, int]:
    """(rank-1 error, probes counted) over the genuine probes whose gallery entry is still enrolled,
    matched against the enrolled entries only (`enrolled`: (G,) bool)."""
    enrolled = np.asarray(enrolled, dtype=bool)
    keep = enrolled[np.asarray(target)]
    if not keep.any():
        return float("nan"), 0
    position = np.cumsum(enrolled) - 1  # old gallery index -> index among the enrolled
    error = 1.0 - rank1(np.asarray(scores)[keep][:, enrolled], position[np.asarray(target)[keep]])
    return error, int(keep.sum())


class RiskCoverage:
    """Selective risk of one (probe, gallery) setting under any gallery rejection, computed fast:
    the comparisons that decide rank-1 are made once, each rejection only masks them."""

    def __init__(self, genuine_scores: np.ndarray, target: np.ndarray, distractor_scores: np.ndarray,
                 threshold: float) -> None:
        self.target = np.asarray(target)
        self.confusers = confusers(genuine_scores, self.target)
        self.true_passes = genuine_scores[np.arange(len(self.target)), self.target] >= threshold
        self.distractor_passes = np.asarray(distractor_scores) >= threshold  # (D, G)

    def at(self, enrolled: np.ndarray) -> dict[str, float]:
        enrolled = np.asarray(enrolled, dtype=bool)
        keep = enrolled[self.target]
        correct = ~(self.confusers[keep] & enrolled).any(axis=1)
        n = int(keep.sum())
        return {
            "risk": float(1 - correct.mean()) if n else float("nan"),
            "open_set_error": float(1 - (correct & self.true_passes[keep]).mean()) if n else float("nan"),
            "distractor_far": float((self.distractor_passes[:, enrolled]).any(axis=1).mean())
            if self.distractor_passes.shape[0] else float("nan"),
            "probes": n,
            "enrolled": int(enrolled.sum()),
        }


def rejection_fractions(maximum: float = REJECTION_MAX, step: float = REJECTION_STEP) -> np.ndarray:
    return np.round(np.arange(0, maximum + step / 2, step), 6)


def risk_coverage(curve: RiskCoverage, uncertainty: np.ndarray, fractions: Sequence[float]) -> list[dict[str, float]]:
    """Drop the most uncertain fraction of the gallery (the runtime's `RejectionPolicy`) at each step."""
    from facelink.runtime.asymmetric import RejectionPolicy

    points = []
    for fraction in fractions:
        accepted = RejectionPolicy(float(fraction), "drop").apply(uncertainty).accepted
        points.append({"fraction": float(fraction), "rejected": int((~accepted).sum()), **curve.at(accepted)})
    return points


def random_risk_coverage(curve: RiskCoverage, size: int, fractions: Sequence[float], repeats: int,
                         seed: int = 0) -> dict[str, list[float]]:
    """The control: the same rejections in `repeats` random orders; mean and std per fraction."""
    rng = np.random.default_rng(seed)
    runs = [risk_coverage(curve, rng.random(size), fractions) for _ in range(repeats)]
    out: dict[str, list[float]] = {}
    for key in ("risk", "open_set_error", "distractor_far"):
        values = np.array([[p[key] for p in run] for run in runs])
        out[f"{key}_mean"] = [float(v) for v in np.nanmean(values, axis=0)]
        out[f"{key}_std"] = [float(v) for v in np.nanstd(values, axis=0)]
    return out


def relative_reduction(before: float, after: float) -> float:
    """(before - after) / before; NaN when there is no error to reduce."""
    return float((before - after) / before) if before > 0 else float("nan")
