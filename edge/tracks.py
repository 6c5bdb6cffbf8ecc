"""Tracks are the unit: which shots of a track go to the cloud, and what the track's decision is.

A *track* is one person followed across frames by the tracker (edge/tracking.py); a *shot* is
that person's face in one frame, with its quality (edge/quality.py). Per track the edge:

1. picks shots to send by :class:`~facelink.config.TrackPolicy`:

   * ``every``: every shot at or above ``min_quality`` (one observation per face and frame);
   * ``first``: the first such shot, nothing more;
   * ``best``: the best shot of the track's first ``best_window_s`` seconds (a decision comes
     quickly, from the best of a short look rather than from whatever came first), then a shot
     ``better_by`` better than every shot sent so far - or, while every answer is back and the
     track is still not a MATCH, its best shot since (another look: a person whose shots all
     look alike is not decided by one) - no sooner than ``resend_after_s`` after the last one,
     up to ``max_shots``. A track that ends before its window is over sends its
     best shot at its end, so no recognisable appearance goes unsent.

2. pools the cloud's answers into one decision (:func:`pool`). A device principal sees MATCH
   with an identity and a score rounded to 0.05, UNKNOWN with no identity and score 0, so the
   pooling works from decisions and scores, never from embeddings:

   * no MATCH in any shot: UNKNOWN (or REJECTED when every shot was rejected);
   * MATCHes of one identity: that identity, whatever the UNKNOWN shots said (a blurred shot
     that fell under the threshold does not veto a sharp one that matched), with its best score;
   * MATCHes of several identities: the identity with the most MATCH shots, ties broken by the
     best score and then by the sum of scores.

3. publishes :class:`~facelink.edge.events.TrackEvent`s: ``decision`` at the track's first
   answer, ``update`` when the pooled decision changes (another identity, UNKNOWN to MATCH,
   or a score higher by at least ``SCORE_STEP``), ``track_ended`` once the tracker lost the
   track *and* every shot sent for it has its answer (or was dropped), carrying the final
   decision. A track that never sent a shot (never good enough) publishes nothing.

Results arrive on the stream client's thread, frames on the camera loop's: a :class:`TrackBook`
takes a lock around every change, and publishes under it so that a track's events keep their order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from facelink.config import TrackPolicy
from facelink.v1 import recognition_pb2

from .events import EventBox, TrackEvent, utc_from_us

log = logging.getLogger(__name__)

__all__ = ["Pooled", "Shot", "TrackBook", "TrackStats", "pool"]

#: A score change smaller than this is not worth an update (the cloud rounds device scores to 0.05).
SCORE_STEP = 0.05
_MATCH, _UNKNOWN, _REJECTED = recognition_pb2.DECISION_MATCH, recognition_pb2.DECISION_UNKNOWN, recognition_pb2.DECISION_REJECTED


@dataclass(frozen=True)
class Shot:
    """One face of one track in one frame, before it is encoded (encoding costs; only sent shots pay it)."""

    track_id: int
    quality: float
    capture_time_us: int
    box: tuple[float, float, float, float]  # x, y, w, h in the source frame
    data: Any = None  # what the caller needs to encode the shot later (frame, detection, crop)


@dataclass(frozen=True)
class Answer:
    """One cloud answer about one shot of a track."""

    decision: int            # recognition_pb2.Decision
    identity: str            # the cloud's best identity (meaningful only for MATCH)
    score: float
    error: str
    capture_time_us: int
    box: tuple[float, float, float, float]
    unknown_id: str = ""     # the cloud's persistent id of an unknown person ("" if none)


@dataclass(frozen=True)
class Pooled:
    """A track's decision from all its answers so far."""

    decision: int
    identity: str | None
    score: float | None
    error: str | None
    evidence: Answer  # the answer the decision rests on: its box and capture time go in the event
    unknown_id: str | None = None  # for UNKNOWN: the id most of the track's unknown answers carry


def pool(answers: Iterable[Answer]) -> Pooled | None:
    """One decision from the answers of a track's shots (see the module docstring); None without any."""
    answers = list(answers)
    if not answers:
        return None
    matches: dict[str, list[Answer]] = {}
    for answer in answers:
        if answer.decision == _MATCH and answer.identity:
            matches.setdefault(answer.identity, []).append(answer)
    if matches:
        def strength(item: tuple[str, list[Answer]]) -> tuple[int, float, float]:
            scores = [a.score for a in item[1]]
            return len(scores), max(scores), sum(scores)

        identity, shots = max(matches.items(), key=strength)
        best = max(shots, key=lambda a: a.score)
        return Pooled(_MATCH, identity, best.score, None, best)
    decided = [a for a in answers if a.decision == _UNKNOWN]
    if decided:
        best = max(decided, key=lambda a: a.score)  # a device principal sees 0: any will do
        ids = Counter(a.unknown_id for a in decided if a.unknown_id)
        return Pooled(_UNKNOWN, None, best.score, None, best, ids.most_common(1)[0][0] if ids else None)
    last = answers[-1]
    return Pooled(_REJECTED, None, None, last.error or "rejected", last)


def _differs(new: Pooled, old: Pooled) -> bool:
    if new.decision != old.decision or new.identity != old.identity:
        return True
    return (new.score or 0.0) >= (old.score or 0.0) + SCORE_STEP - 1e-9


@dataclass
class _Track:
    track_id: int
    first_gated: float | None = None     # capture time (s) of the first shot over min_quality
    best_unsent: Shot | None = None      # the best shot since the last send
    best_sent_quality: float = -1.0
    last_sent_at: float = -float("inf")
    shots_sent: int = 0
    outstanding: int = 0                 # sent, neither answered nor dropped yet
    answers: list[Answer] = field(default_factory=list)
    published: Pooled | None = None
    ended: bool = False
    last_box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    last_seen_us: int = 0


@dataclass
class TrackStats:
    tracks: int = 0
    shots_seen: int = 0
    shots_below_quality: int = 0
    shots_sent: int = 0
    answers: int = 0
    shots_dropped: int = 0    # dropped by the send queue before they were answered
    decisions: int = 0
    updates: int = 0
    ended: int = 0
    unsent_tracks: int = 0    # ended without a shot good enough to send


Publish = Callable[[TrackEvent], None]


class TrackBook:
    """The tracks of one camera: shot selection, answer pooling and events (module docstring)."""

    def __init__(self, camera: str, policy: TrackPolicy, publish: Publish | None = None) -> None:
        self.camera = camera
        self.policy = policy
        self.publish = publish or (lambda event: None)
        self.stats = TrackStats()
        self._tracks: dict[int, _Track] = {}
        self._lock = threading.RLock()

    # -- the camera loop ----------------------------------------------------------------------
    def select(self, shots: Iterable[Shot], now_s: float) -> list[Shot]:
        """Record this frame's shots; return the ones to send now (the caller then calls :meth:`sent`)."""
        send: list[Shot] = []
        with self._lock:
            for shot in shots:
                track = self._tracks.get(shot.track_id)
                if track is None:
                    track = self._tracks[shot.track_id] = _Track(shot.track_id)
                    self.stats.tracks += 1
                track.last_box, track.last_seen_us = shot.box, shot.capture_time_us
                self.stats.shots_seen += 1
                if shot.quality < self.policy.min_quality:
                    self.stats.shots_below_quality += 1
                    continue
                if track.best_unsent is None or shot.quality > track.best_unsent.quality:
                    track.best_unsent = shot
                if track.first_gated is None:
                    track.first_gated = now_s
                if self._due(track, now_s):
                    send.append(self._take(track, now_s))
        return send

    def _due(self, track: _Track, now_s: float) -> bool:
        policy = self.policy
        if policy.send == "every":
            return True
        if policy.send == "first":
            return track.shots_sent == 0
        if track.shots_sent == 0:
            assert track.first_gated is not None
            return now_s - track.first_gated >= policy.best_window_s
        if now_s - track.last_sent_at < policy.resend_after_s:
            return False
        # Every answer back and still no MATCH: another look (the best shot since), clearly better
        # or not - a person whose shots all look alike would otherwise be decided by one shot.
        undecided = (track.outstanding == 0 and track.published is not None
                     and track.published.decision != _MATCH and track.best_unsent is not None
                     and track.shots_sent < policy.max_shots)
        return self._better(track) or undecided

    def _better(self, track: _Track) -> bool:
        return (
            track.best_unsent is not None
            and track.shots_sent < self.policy.max_shots
            and track.best_unsent.quality >= track.best_sent_quality + self.policy.better_by
        )

    def _take(self, track: _Track, now_s: float) -> Shot:
        shot = track.best_unsent
        assert shot is not None
        track.best_unsent = None
        track.best_sent_quality = max(track.best_sent_quality, shot.quality)
        track.last_sent_at = now_s
        track.shots_sent += 1
        track.outstanding += 1
        self.stats.shots_sent += 1
        return shot

    def end(self, track_ids: Iterable[int]) -> list[Shot]:
        """The tracker lost these tracks. Returns the shots still worth sending (a track's best
        shot when none went out yet, or a clearly better last one); its track_ended event
        follows once every shot sent has its answer."""
        flush: list[Shot] = []
        with self._lock:
            for track_id in track_ids:
                track = self._tracks.get(track_id)
                if track is None or track.ended:
                    continue
                track.ended = True
                if self.policy.send == "best" and (
                    (track.shots_sent == 0 and track.best_unsent is not None) or self._better(track)
                ):
                    flush.append(self._take(track, track.last_sent_at))
                self._maybe_finish(track)
        return flush

    def close(self) -> None:
        """The camera is done (its source ended, or a stop): every track ends with what it has."""
        with self._lock:
            for track in list(self._tracks.values()):
                track.ended = True
                track.outstanding = 0  # the client was drained first: what is still missing never comes
                self._maybe_finish(track)

    @property
    def open_tracks(self) -> int:
        with self._lock:
            return len(self._tracks)

    # -- the stream thread --------------------------------------------------------------------
    def answer(self, result: recognition_pb2.FaceResult, observation: recognition_pb2.FaceObservation) -> None:
        """The cloud's answer (or the client's DEADLINE_EXCEEDED report) for one sent shot."""
        b = observation.box
        answer = Answer(
            decision=result.decision,
            identity=result.identity,
            score=float(result.score),
            error=result.error.message,
            capture_time_us=observation.capture_time_us,
            box=(b.x, b.y, b.width, b.height),
            unknown_id=result.unknown_id,
        )
        with self._lock:
            track = self._tracks.get(observation.track_id)
            if track is None:
                log.debug("answer for a track already closed: %s/%d", self.camera, observation.track_id)
                return
            self.stats.answers += 1
            track.outstanding = max(0, track.outstanding - 1)
            track.answers.append(answer)
            pooled = pool(track.answers)
            assert pooled is not None
            if track.published is None:
                self._emit("decision", track, pooled)
            elif _differs(pooled, track.published):
                self._emit("update", track, pooled)
            self._maybe_finish(track)

    def dropped(self, observation: recognition_pb2.FaceObservation) -> None:
        """The send queue dropped a shot: no answer will come for it."""
        with self._lock:
            self.stats.shots_dropped += 1
            track = self._tracks.get(observation.track_id)
            if track is not None:
                track.outstanding = max(0, track.outstanding - 1)
                self._maybe_finish(track)

    # -- events --------------------------------------------------------------------------------
    def _maybe_finish(self, track: _Track) -> None:
        if not track.ended or track.outstanding:
            return
        del self._tracks[track.track_id]
        self.stats.ended += 1
        pooled = pool(track.answers)
        if pooled is None:
            self.stats.unsent_tracks += track.shots_sent == 0
            return
        self._emit("track_ended", track, pooled)

    def _emit(self, kind: str, track: _Track, pooled: Pooled) -> None:
        if kind == "track_ended":
            box, capture_us = track.last_box, track.last_seen_us  # where and when the person was last seen
        else:
            box, capture_us = pooled.evidence.box, pooled.evidence.capture_time_us
        if kind != "track_ended":
            track.published = pooled
        self.stats.decisions += kind == "decision"
        self.stats.updates += kind == "update"
        names = {_MATCH: "match", _UNKNOWN: "unknown", _REJECTED: "rejected"}
        try:
            event = TrackEvent(
                type=kind,  # type: ignore[arg-type]
                camera=self.camera,
                track=track.track_id,
                event_time=datetime.now(timezone.utc),
                capture_time=utc_from_us(capture_us) if capture_us else datetime.fromtimestamp(time.time(), timezone.utc),
                box=EventBox(x=box[0], y=box[1], width=max(0.0, box[2]), height=max(0.0, box[3])),
                decision=names.get(pooled.decision, "rejected"),  # type: ignore[arg-type]
                identity=pooled.identity if pooled.decision == _MATCH else None,
                score=pooled.score,
                shots=track.shots_sent,
                error=pooled.error if pooled.decision == _REJECTED else None,
                unknown_id=pooled.unknown_id if pooled.decision == _UNKNOWN else None,
            )
            self.publish(event)
        except Exception:  # a sink's bug or a bad value must not kill the stream thread
            log.exception("cannot publish the %s event of %s track %d", kind, self.camera, track.track_id)
