"""Serve a gallery enrolled with recogniser A by recogniser B, without re-enrolling anyone.

`upgrade_gallery` gives every stored picture that has an A template but no native B template a
B template transformed from A's stored embedding (`runtime.upgrade`): no picture is read, so it
works where the gallery kept embeddings only. A transformed template is stored with status "ok"
and a `reason` starting "transformed" (see `Gallery.templates_of`), so an operator can tell the
two kinds apart; a server started with B as its recogniser matches against both.

It goes through the public `Gallery.rebuild_derived`, which replaces every template of B in one
transaction from the stored templates of A and B, picture by picture: a picture with a native B
template keeps that vector (the deriver hands it back untouched, reason none), one with only A
gets the transform's output, one with only B keeps it. Which B templates are transformed is read
first from `templates_of` (by picture), so running the upgrade again -- with a retrained transform,
say -- re-derives the transformed ones and never mistakes them for native ones. A search sees
the old B templates or the new ones, never a mix. Native B templates get new ids and creation
times (the vectors, status and pictures are kept).

Lazily native: once B is the recogniser, every picture enrolled (or re-enrolled with replace)
stores B's own embedding, which takes precedence over a transform at the next upgrade run; a
re-enrollment with replace drops the identity's transformed templates at once. What is NOT
replaced by itself: a person never enrolled again keeps transformed templates, since the gallery
holds no picture to re-embed; and a recognised face (an observation) is not enrolled
automatically, so it does not refresh a template either.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from facelink.runtime.upgrade import TRANSFORMED, Upgrade

from .gallery import Gallery
from .gallery.store import Templates

#: Identities read per page when collecting which templates are transformed.
PAGE = 500


@dataclass(frozen=True)
class UpgradeReport:
    source_model: str     # the primary old model; `source_models` lists every one a transform reads
    target_model: str
    transformed: int      # B templates transformed from A by this run
    native: int           # B templates computed from pictures, kept as they were
    identities: int
    seconds: float
    templates_per_s: float
    source_models: tuple[str, ...] = ()


class UpgradeDeriver:
    """What `Gallery.rebuild_derived` asks of a deriver (model_id, gallery_models, derive), for
    the new recogniser: native B vectors back untouched, the others transformed from A."""

    def __init__(self, upgrade: Upgrade, transformed_pictures: set[str]) -> None:
        self.upgrade = upgrade
        self.transformed_pictures = transformed_pictures
        self.counts = {"transformed": 0, "native": 0}

    @property
    def model_id(self) -> str:
        return self.upgrade.target_model

    @property
    def gallery_models(self) -> tuple[str, ...]:
        return (*self.upgrade.source_models, self.upgrade.target_model)

    def derive(self, embeddings: Mapping[str, np.ndarray], sources: Sequence[str | None]) -> Templates:
        # The gallery hands over pictures holding the same subset of these models together; a
        # picture lacking some source model is transformed from the ones it holds (the ensemble
        # renormalises their weights), as a query model's templates are derived.
        target = self.upgrade.target_model
        given = [m for m in self.upgrade.source_models if m in embeddings]
        n = len(sources)
        marked = np.array([s is not None and s in self.transformed_pictures for s in sources], dtype=bool)
        # Kept as stored: a native B template; and a transformed one whose A templates are gone
        # (nothing to re-derive it from). Everything else is (re)transformed from A.
        keep = np.zeros(n, dtype=bool) if target not in embeddings else (~marked if given else np.ones(n, bool))
        vectors = np.empty((n, self.upgrade.manifest.dim), dtype=np.float32)
        if keep.any():
            vectors[keep] = embeddings[target][keep]
        if (~keep).any():
            vectors[~keep] = self.upgrade.ensemble.transform({m: embeddings[m][~keep] for m in given}).vectors
        transformed = ~keep | marked
        reason = self.upgrade.reason()
        self.counts["native"] += int((~transformed).sum())
        self.counts["transformed"] += int(transformed.sum())
        return Templates(target, vectors, list(sources), ["ok"] * n, [None] * n,
                         [reason if t else None for t in transformed.tolist()])


def transformed_pictures(gallery: Gallery, model_id: str) -> tuple[set[str], int]:
    """The picture keys whose `model_id` template is a transformed one, and how many identities."""
    pictures: set[str] = set()
    offset, total = 0, None
    while total is None or offset < total:
        page, total = gallery.list(offset, PAGE)
        if not page:
            break
        for record in page:
            for template in gallery.templates_of(record.identity):
                if template.model_id == model_id and template.picture and (template.reason or "").startswith(TRANSFORMED):
                    pictures.add(template.picture)
        offset += len(page)
    return pictures, total or 0


def upgrade_gallery(gallery: Gallery, upgrade: Upgrade) -> UpgradeReport:
    """Give every picture of `gallery` a template of the upgrade's target model (see the module doc)."""
    started = time.perf_counter()
    earlier, identities = transformed_pictures(gallery, upgrade.target_model)
    deriver = UpgradeDeriver(upgrade, earlier)
    gallery.rebuild_derived(deriver)  # type: ignore[arg-type]  # duck-typed: model_id, gallery_models, derive
    seconds = time.perf_counter() - started
    done = deriver.counts["transformed"] + deriver.counts["native"]
    return UpgradeReport(upgrade.source_model, upgrade.target_model, deriver.counts["transformed"],
                         deriver.counts["native"], identities, seconds, done / seconds if seconds > 0 else 0.0,
                         upgrade.source_models)
