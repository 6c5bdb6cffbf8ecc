"""Track ids for faces across consecutive frames, by box overlap.

The edge sends every face with a track id so the cloud can pool the embeddings of one person
over several frames (a better identity than any single frame) and so a display can keep a
label stable. Faces move little between consecutive frames of a camera, so matching boxes by
IoU is enough, costs microseconds, and needs no model on the board.

The tracker persists across frames for every source: a video file is a camera that was
recorded, and a folder of pictures shows different people in different pictures, whose boxes
rarely overlap enough to be taken for one track (and when they do, the edge's decision pooling
treats the two identities as a conflict, see edge/tracks.py). :meth:`IouTracker.reset` remains
for callers that know a cut happened. Ids are never reused, not even after a reset, so an id
always means one track and the cloud cannot merge two different people by accident.

A track ends when it is unmatched for more than ``max_missed`` updates, or, when the caller
passes capture times, unseen for more than ``max_age_s`` seconds (a live source that drops
frames makes "frames" a poor clock). :attr:`IouTracker.ended` lists the ids that ended in the
last update, so the owner can close its per-track state (edge/tracks.py).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["IouTracker", "iou"]


def _as_boxes(boxes: np.ndarray, what: str) -> np.ndarray:
    """(n, 4) float64 x, y, w, h; a single (4,) box becomes (1, 4), an empty input (0, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim == 1 and arr.shape[0] == 4:
        return arr.reshape(1, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what} must have shape (n, 4) as x, y, w, h; got {arr.shape}")
    return arr


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise intersection-over-union of boxes given as x, y, w, h.

    ``a`` is (n, 4), ``b`` is (m, 4) (a single (4,) box is accepted for either); returns an
    (n, m) float64 matrix. Negative widths/heights count as empty boxes, and two empty boxes
    have IoU 0 (not NaN), so degenerate detections never match anything.
    """
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    aw, ah = np.clip(a[:, 2], 0, None), np.clip(a[:, 3], 0, None)
    bw, bh = np.clip(b[:, 2], 0, None), np.clip(b[:, 3], 0, None)
    # Broadcast (n, 1) against (1, m) for every pair at once.
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum((a[:, 0] + aw)[:, None], (b[:, 0] + bw)[None, :])
    y2 = np.minimum((a[:, 1] + ah)[:, None], (b[:, 1] + bh)[None, :])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = (aw * ah)[:, None] + (bw * bh)[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


class IouTracker:
    """Greedy IoU tracker: each box takes the id of the best-overlapping live track.

    On each :meth:`update`, pairs (box, track) are taken in order of decreasing IoU, as long as
    IoU >= ``iou_threshold`` and neither side is taken yet (greedy, not Hungarian: with faces
    rarely overlapping each other the two agree, and greedy is simpler and deterministic).
    Boxes left over start new tracks with ids 1, 2, 3, ... that are never reused. A track not
    matched for more than ``max_missed`` consecutive updates is dropped, so a face that leaves
    for a moment (a blink of the detector) keeps its id, while one gone for longer gets a new id.
    Tracks match against their last seen box (no motion model): fine at camera frame rates.
    """

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 5, max_age_s: float | None = None) -> None:
        if not 0.0 < iou_threshold <= 1.0:
            # 0 would let boxes that do not overlap at all inherit an id.
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        if max_missed < 0:
            raise ValueError(f"max_missed must be >= 0, got {max_missed}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0 or None, got {max_age_s}")
        self.iou_threshold = float(iou_threshold)
        self.max_missed = int(max_missed)
        self.max_age_s = max_age_s
        #: Ids of the tracks that ended (were dropped) in the last update() or reset().
        self.ended: list[int] = []
        self._next_id = 1
        # Parallel arrays for the live tracks, kept in creation order for deterministic ties.
        self._ids: list[int] = []
        self._boxes = np.zeros((0, 4), dtype=np.float64)
        self._missed: list[int] = []
        self._seen: list[float] = []  # capture time (s) each track was last matched; -inf if never given

    def update(self, boxes: np.ndarray, now: float | None = None) -> list[int]:
        """Assign a track id to each of this frame's boxes ((n, 4) x, y, w, h), in box order.

        `now` is the frame's capture time in seconds (any origin, non-decreasing); with
        ``max_age_s`` set, a track unseen for longer than that ends even within ``max_missed``.
        """
        boxes = _as_boxes(boxes, "boxes")
        stamp = -math.inf if now is None else float(now)
        self.ended = []
        if self.max_age_s is not None and now is not None and self._ids:
            # Unseen for too long (a stalled camera, dropped frames): over before matching, so
            # whoever stands there now starts a new track.
            self._drop([stamp - seen > self.max_age_s for seen in self._seen])
        n = boxes.shape[0]
        assigned: list[int | None] = [None] * n
        matched_track = np.zeros(len(self._ids), dtype=bool)

        if n and self._ids:
            # (n boxes, t tracks); a NaN box (a broken detection) must never match anything.
            scores = np.nan_to_num(iou(boxes, self._boxes), nan=0.0)
            # Highest IoU first; a stable sort makes ties go to the earlier box / older track.
            order = np.argsort(-scores, axis=None, kind="stable")
            for flat in order:
                bi, ti = divmod(int(flat), scores.shape[1])
                if scores[bi, ti] < self.iou_threshold:
                    break  # sorted: nothing further can qualify
                if assigned[bi] is not None or matched_track[ti]:
                    continue
                assigned[bi] = self._ids[ti]
                matched_track[ti] = True
                self._boxes[ti] = boxes[bi]
                self._missed[ti] = 0
                self._seen[ti] = stamp

        # Age unmatched tracks and drop the ones unseen for more than max_missed updates.
        keep = []
        for ti in range(len(self._ids)):
            if not matched_track[ti]:
                self._missed[ti] += 1
            keep.append(self._missed[ti] <= self.max_missed)
        self._drop([not k for k in keep])

        # New tracks for boxes nothing matched.
        new_boxes = []
        for bi in range(n):
            if assigned[bi] is None:
                assigned[bi] = self._next_id
                self._ids.append(self._next_id)
                self._missed.append(0)
                self._seen.append(stamp)
                new_boxes.append(boxes[bi])
                self._next_id += 1
        if new_boxes:
            self._boxes = np.vstack([self._boxes, np.asarray(new_boxes)])

        return [int(t) for t in assigned]  # type: ignore[arg-type]  # all filled above

    def _drop(self, drop: list[bool]) -> None:
        """Forget the tracks flagged in `drop` (parallel to the live tracks); they join :attr:`ended`."""
        if not any(drop):
            return
        self.ended += [t for t, d in zip(self._ids, drop) if d]
        self._ids = [t for t, d in zip(self._ids, drop) if not d]
        self._missed = [m for m, d in zip(self._missed, drop) if not d]
        self._seen = [s for s, d in zip(self._seen, drop) if not d]
        self._boxes = self._boxes[~np.asarray(drop, dtype=bool)]

    def reset(self) -> list[int]:
        """Forget all tracks (after a cut). Ids keep counting up. Returns (and sets
        :attr:`ended` to) the ids that were live."""
        self.ended = list(self._ids)
        self._ids = []
        self._boxes = np.zeros((0, 4), dtype=np.float64)
        self._missed = []
        self._seen = []
        return self.ended

    @property
    def tracks(self) -> dict[int, np.ndarray]:
        """The live tracks: id -> last seen box (a copy), for display and debugging."""
        return {t: self._boxes[i].copy() for i, t in enumerate(self._ids)}
