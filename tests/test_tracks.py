"""Tracks as the unit: shot quality, send policies, decision pooling, track_ended, tracker persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from facelink.config import EdgeConfig, TrackPolicy
from facelink.edge.events import TrackEvent
from facelink.edge.pipeline import EdgePipeline
from facelink.edge.quality import face_quality, pose_angles
from facelink.edge.sources import open_source
from facelink.edge.tracks import Answer, Shot, TrackBook, pool
from facelink.runtime.alignment import canonical_template, warp_face
from facelink.v1 import common_pb2, recognition_pb2

from .edge_scenes import FPS, face_picture, scene, write_video
from .support import needs_shared

MATCH, UNKNOWN, REJECTED = recognition_pb2.DECISION_MATCH, recognition_pb2.DECISION_UNKNOWN, recognition_pb2.DECISION_REJECTED


@pytest.fixture(scope="module")
def pipeline() -> EdgePipeline:
    return EdgePipeline(EdgeConfig(codec="jpeg"))


# -- quality ----------------------------------------------------------------------------------------
@needs_shared
@pytest.mark.parametrize("name", ["Colin_Powell", "Serena_Williams", "Tony_Blair"])
def test_quality_prefers_sharp_large_faces(pipeline: EdgePipeline, name: str) -> None:
    template = canonical_template()

    def quality(image: np.ndarray) -> float:
        detection = max(pipeline.detector.detect(image), key=lambda d: d.area)
        crop, _ = warp_face(image, detection.landmarks, template)
        return face_quality(detection.landmarks, detection.score, crop, template).score

    sharp = quality(face_picture(name))
    assert 0.5 < sharp <= 1.0
    # A blurred copy and a small copy of the same picture: clearly lower.
    assert quality(face_picture(name, blur=3.0)) < sharp - 0.1
    assert quality(face_picture(name, scale=0.35)) < sharp - 0.1


def test_pose_from_landmarks() -> None:
    frontal = np.array([[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]])
    yaw, roll, eyes = pose_angles(frontal)
    assert abs(yaw) < 0.05 and abs(roll) < 1 and eyes == pytest.approx(35.2, abs=0.1)
    turned = frontal.copy()
    turned[2, 0] += 15  # the nose swings sideways when the head turns
    assert pose_angles(turned)[0] > 0.3
    rotated = frontal @ np.array([[0.0, 1.0], [-1.0, 0.0]])  # 90 degrees of roll is not yaw
    yaw, roll, _ = pose_angles(rotated)
    assert abs(yaw) < 0.05 and abs(abs(roll) - 90) < 1


# -- policies on a synthetic scene ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene_shots(pipeline: EdgePipeline) -> list[tuple[float, list[Shot], list[int]]]:
    """A long appearance of one person (blurred for its first second, then sharp), a gap, a short
    one of another: each frame's shots and the tracks that ended there."""
    frames = scene([("Colin_Powell", 1, 200, {"blur": 3.0, "blur_frames": 25}), ("Serena_Williams", 2, 40, {})], gap=20)
    tracker = pipeline.new_tracker()
    out = []
    for frame in frames:
        shots = pipeline.shots(frame, tracker)
        out.append((frame.timestamp_us / 1e6,
                    [Shot(s.track_id, s.quality.score, frame.timestamp_us, s.box) for s in shots], list(tracker.ended)))
    out.append((out[-1][0] + 1, [], tracker.reset()))
    return out


def _play(scene_shots, policy: TrackPolicy) -> tuple[dict[int, list[Shot]], TrackBook]:
    book = TrackBook("cam", policy)
    sent: dict[int, list[Shot]] = {}
    for now, shots, ended in scene_shots:
        for shot in book.select(shots, now) + book.end(ended):
            sent.setdefault(shot.track_id, []).append(shot)
    return sent, book


@needs_shared
def test_policies_send_every_first_best(scene_shots) -> None:
    tracks = {s.track_id for _, shots, _ in scene_shots for s in shots}
    assert len(tracks) == 2, "the tracker followed each person as one track"
    long_track, short_track = sorted(tracks)
    seen = sum(1 for _, shots, _ in scene_shots for s in shots if s.track_id == long_track)
    assert seen >= 190

    every, _ = _play(scene_shots, TrackPolicy(send="every", min_quality=0.0))
    assert len(every[long_track]) == seen

    first, _ = _play(scene_shots, TrackPolicy(send="first"))
    assert {t: len(s) for t, s in first.items()} == {long_track: 1, short_track: 1}

    best, book = _play(scene_shots, TrackPolicy(send="best", max_shots=3))
    assert set(best) == {long_track, short_track}
    shots = best[long_track]
    assert 1 <= len(shots) <= 3 and len(every[long_track]) / len(shots) >= 50
    # The blurred start went out first (a quick decision), the sharp face later as a clearly better shot.
    assert len(shots) >= 2 and shots[-1].quality >= shots[0].quality + 0.1
    assert (shots[1].capture_time_us - shots[0].capture_time_us) / 1e6 >= 2.0  # --resend-after
    assert book.stats.shots_sent == sum(len(s) for s in best.values())


@needs_shared
def test_min_quality_gate(scene_shots) -> None:
    sent, book = _play(scene_shots, TrackPolicy(send="every", min_quality=0.99))
    assert not sent and book.stats.shots_below_quality == book.stats.shots_seen


def test_a_track_shorter_than_the_window_sends_its_best_shot_at_its_end() -> None:
    book = TrackBook("cam", TrackPolicy(send="best", best_window_s=10.0))
    assert book.select([Shot(7, 0.5, 0, (0, 0, 10, 10)), Shot(7, 0.8, 1, (0, 0, 10, 10))][:1], 0.0) == []
    assert book.select([Shot(7, 0.8, 1, (0, 0, 10, 10))], 0.1) == []
    flushed = book.end([7])
    assert [s.quality for s in flushed] == [0.8]


# -- pooling and events ------------------------------------------------------------------------------
def _answer(decision: int, identity: str = "", score: float = 0.0) -> Answer:
    return Answer(decision, identity, score, "bad payload" if decision == REJECTED else "", 1, (0, 0, 10, 10))


def test_pooling() -> None:
    assert pool([]) is None
    # One MATCH among UNKNOWNs wins: a blurred shot under the threshold does not veto a sharp one.
    pooled = pool([_answer(UNKNOWN), _answer(MATCH, "Ann", 0.55), _answer(UNKNOWN)])
    assert (pooled.decision, pooled.identity, pooled.score) == (MATCH, "Ann", 0.55)
    # Conflicting identities: the majority, then the best score.
    assert pool([_answer(MATCH, "Ann", 0.5), _answer(MATCH, "Bob", 0.9), _answer(MATCH, "Ann", 0.45)]).identity == "Ann"
    assert pool([_answer(MATCH, "Ann", 0.5), _answer(MATCH, "Bob", 0.6)]).identity == "Bob"
    # All UNKNOWN: unknown, and never a name.
    pooled = pool([_answer(UNKNOWN, "Ann"), _answer(UNKNOWN)])
    assert pooled.decision == UNKNOWN and pooled.identity is None
    # REJECTED only when nothing was decided.
    assert pool([_answer(REJECTED), _answer(UNKNOWN)]).decision == UNKNOWN
    assert pool([_answer(REJECTED)]).error == "bad payload"


def _observation(track: int, request: int) -> recognition_pb2.FaceObservation:
    return recognition_pb2.FaceObservation(
        camera_id="cam", track_id=track, request_id=request, capture_time_us=1_700_000_000_000_000,
        box=common_pb2.Box(x=1, y=2, width=30, height=40),
    )


def _result(track: int, decision: int, identity: str = "", score: float = 0.0) -> recognition_pb2.FaceResult:
    return recognition_pb2.FaceResult(camera_id="cam", track_id=track, decision=decision, identity=identity, score=score)


def test_decision_update_and_track_ended() -> None:
    events: list[TrackEvent] = []
    book = TrackBook("cam", TrackPolicy(send="every", min_quality=0.0), events.append)
    box = (1.0, 2.0, 30.0, 40.0)
    assert len(book.select([Shot(3, 0.4, 1, box)], 0.0)) == 1
    assert len(book.select([Shot(3, 0.9, 2, box)], 0.04)) == 1
    # The cloud's best guess below the threshold: an UNKNOWN, published without the name.
    book.answer(_result(3, UNKNOWN, "Colin_Powell", 0.0), _observation(3, 1))
    assert [(e.type, e.decision, e.identity) for e in events] == [("decision", "unknown", None)]
    assert book.end([3]) == []
    assert len(events) == 1, "track_ended waits for the shot still on the wire"
    book.answer(_result(3, MATCH, "Colin_Powell", 0.6), _observation(3, 2))
    assert [(e.type, e.decision, e.identity, e.shots) for e in events] == [
        ("decision", "unknown", None, 2), ("update", "match", "Colin_Powell", 2), ("track_ended", "match", "Colin_Powell", 2)]
    assert book.stats.ended == 1 and book.open_tracks == 0


def test_a_dropped_shot_does_not_hold_track_ended_back() -> None:
    events: list[TrackEvent] = []
    book = TrackBook("cam", TrackPolicy(send="every", min_quality=0.0), events.append)
    book.select([Shot(4, 0.5, 1, (0, 0, 10, 10))], 0.0)
    book.select([Shot(4, 0.5, 2, (0, 0, 10, 10))], 0.1)
    book.answer(_result(4, MATCH, "Ann", 0.5), _observation(4, 1))
    book.end([4])
    assert [e.type for e in events] == ["decision"]
    book.dropped(_observation(4, 2))
    assert [e.type for e in events] == ["decision", "track_ended"]


def test_a_track_never_sent_publishes_nothing() -> None:
    events: list[TrackEvent] = []
    book = TrackBook("cam", TrackPolicy(send="best", min_quality=0.5), events.append)
    book.select([Shot(5, 0.1, 1, (0, 0, 10, 10))], 0.0)
    assert book.end([5]) == [] and not events and book.stats.unsent_tracks == 1


# -- the tracker persists across the frames of a video file ---------------------------------------------
@needs_shared
def test_tracker_persists_across_video_frames(tmp_path: Path, pipeline: EdgePipeline) -> None:
    frames = scene([("Colin_Powell", 1, 30, {})], gap=15) + scene([("Serena_Williams", 2, 30, {})])
    path = tmp_path / "clip.avi"
    if not write_video(path, frames):
        pytest.skip("this OpenCV build cannot write MJPG/AVI")
    tracker = pipeline.new_tracker()
    ids, times = [], []
    with open_source(path) as source:
        for frame in source:
            shots = pipeline.shots(frame, tracker, faces="largest")  # LFW pictures may show someone behind
            ids += [s.track_id for s in shots]
            times.append(frame.timestamp_us)
    assert len(ids) >= 55
    assert len(set(ids)) == 2, f"one track per appearance, not one per frame: {sorted(set(ids))}"
    # Capture times come from the stream: 40 ms apart at 25 fps, however fast the decode went.
    steps = np.diff(times) / 1e3
    assert np.allclose(steps, 1e3 / FPS, atol=2)


def test_tracker_reports_ended_tracks_by_frames_and_by_time() -> None:
    from facelink.edge.tracking import IouTracker

    tracker = IouTracker(max_missed=2, max_age_s=1.0)
    box = np.array([[0, 0, 10, 10]])
    assert tracker.update(box, now=0.0) == [1]
    tracker.update(np.zeros((0, 4)), now=0.1)
    tracker.update(np.zeros((0, 4)), now=0.2)
    assert tracker.ended == []
    tracker.update(np.zeros((0, 4)), now=0.3)
    assert tracker.ended == [1]
    assert tracker.update(box, now=5.0) == [2]
    assert tracker.update(box, now=7.0) == [3] and tracker.ended == [2]  # the same place, but 2 s later: a new track
