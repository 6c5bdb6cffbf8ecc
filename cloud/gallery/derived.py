"""Query-model templates, derived from the gallery models' stored templates.

A device running a small query model is matched against a gallery in that model's space. Each
picture's gallery-model embeddings are mapped into the query space by the ensemble's transforms
and averaged (`facelink.runtime.asymmetric`), with the query model's own embedding of the
picture when the ensemble counts it as a member and it was stored at enrollment, and the
rejection policy judges the picture by how much the transformed embeddings disagree. Because
this reads embeddings only, a new query model is served by deriving from what is stored,
without re-reading a single picture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from facelink.runtime.asymmetric import GalleryEnsemble, RejectionPolicy

from .store import Templates


class QueryModel:
    """A query model the gallery serves: its ensemble, and the rejection policy applied to it."""

    def __init__(self, ensemble: GalleryEnsemble, policy: RejectionPolicy) -> None:
        self.ensemble = ensemble
        self.policy = policy

    @property
    def model_id(self) -> str:
        return self.ensemble.query_model

    @property
    def gallery_models(self) -> tuple[str, ...]:
        """The stored embeddings its templates derive from (the ensemble's member models)."""
        return self.ensemble.member_models

    def derive(self, embeddings: Mapping[str, np.ndarray], sources: Sequence[str | None]) -> Templates:
        """The query-model templates of n pictures from their gallery-model embeddings.

        `embeddings` maps gallery model ids to (n, d) arrays of the same n pictures, in the
        order of `sources`; models outside the ensemble are ignored. A picture that lacks some
        of the ensemble's models is derived from the others; with fewer than two, its
        uncertainty is unknown, so it is flagged (never dropped: the policy did not judge it).
        """
        given = {m: e for m, e in embeddings.items() if m in self.gallery_models}
        gallery = self.ensemble.transform(given)
        n = len(gallery.vectors)
        if len(gallery.models) >= 2:
            verdict = self.policy.apply(gallery.uncertainty)
            status = [
                "dropped" if not accepted else "flagged" if flagged else "ok"
                for accepted, flagged in zip(verdict.accepted.tolist(), verdict.flagged.tolist())
            ]
            uncertainty: list[float | None] = [float(u) for u in gallery.uncertainty]
            return Templates(self.model_id, gallery.vectors, sources, status, uncertainty, verdict.reasons)
        if len(self.gallery_models) >= 2:
            reason = (
                f"uncertainty unknown: only {gallery.models[0]} of the ensemble's gallery models "
                f"({', '.join(self.gallery_models)}) is stored for this picture; flagged"
            )
            return Templates(self.model_id, gallery.vectors, sources, ["flagged"] * n, [None] * n, [reason] * n)
        # A one-model ensemble has no disagreement to measure: nothing to judge.
        return Templates.ok(self.model_id, gallery.vectors, sources)

    def __repr__(self) -> str:
        return f"QueryModel({self.model_id!r}, gallery={list(self.gallery_models)}, {self.policy})"
