"""IoU and the greedy IoU tracker."""

from __future__ import annotations

import numpy as np
import pytest

from facelink.edge.tracking import IouTracker, iou


def test_iou_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10]])
    b = np.array(
        [
            [0, 0, 10, 10],    # identical: 1
            [5, 0, 10, 10],    # half overlap: 50 / 150
            [5, 5, 10, 10],    # quarter: 25 / 175
            [10, 0, 10, 10],   # touching edges: 0
            [20, 20, 5, 5],    # disjoint: 0
            [2, 2, 5, 5],      # inside: 25 / 100
            [0, 0, 0, 0],      # empty: 0, not NaN
        ]
    )
    got = iou(a, b)
    assert got.shape == (1, 7)
    np.testing.assert_allclose(got[0], [1.0, 50 / 150, 25 / 175, 0.0, 0.0, 0.25, 0.0])


def test_iou_pairwise_shape_and_symmetry() -> None:
    rng = np.random.default_rng(1)
    a = np.c_[rng.uniform(0, 50, (4, 2)), rng.uniform(1, 30, (4, 2))]
    b = np.c_[rng.uniform(0, 50, (3, 2)), rng.uniform(1, 30, (3, 2))]
    m = iou(a, b)
    assert m.shape == (4, 3)
    np.testing.assert_allclose(m, iou(b, a).T)
    assert ((m >= 0) & (m <= 1)).all()
    assert iou(a, np.zeros((0, 4))).shape == (4, 0)
    assert iou(np.array([0, 0, 4, 4]), np.array([2, 0, 4, 4]))[0, 0] == pytest.approx(8 / 24)


def test_slowly_moving_box_keeps_its_id() -> None:
    tracker = IouTracker()
    ids = [tracker.update(np.array([[100 + 3 * t, 50 + 2 * t, 60, 60]]))[0] for t in range(30)]
    assert ids == [1] * 30


def test_two_boxes_get_distinct_stable_ids() -> None:
    tracker = IouTracker()
    first = tracker.update(np.array([[0, 0, 50, 50], [200, 0, 50, 50]]))
    assert first == [1, 2]
    # Same faces, listed in the other order and moved a little: ids follow the boxes.
    assert tracker.update(np.array([[205, 2, 50, 50], [3, 1, 50, 50]])) == [2, 1]
    assert set(tracker.tracks) == {1, 2}


def test_greedy_takes_the_best_overlap_first() -> None:
    tracker = IouTracker(iou_threshold=0.1)
    assert tracker.update(np.array([[0, 0, 10, 10]])) == [1]
    # Both boxes overlap track 1; the better one (IoU 0.67) keeps it, the other starts track 2.
    assert tracker.update(np.array([[5, 0, 10, 10], [2, 0, 10, 10]])) == [2, 1]


def test_disappearing_box_gets_new_id_after_max_missed() -> None:
    box = np.array([[10, 10, 40, 40]])
    none = np.zeros((0, 4))

    tracker = IouTracker(max_missed=3)
    assert tracker.update(box) == [1]
    for _ in range(3):  # gone for exactly max_missed updates: still remembered
        assert tracker.update(none) == []
    assert tracker.update(box) == [1]

    for _ in range(4):  # gone for more than max_missed: dropped
        tracker.update(none)
    assert tracker.tracks == {}
    assert tracker.update(box) == [2]


def test_reset_forgets_tracks_but_never_reuses_ids() -> None:
    tracker = IouTracker()
    assert tracker.update(np.array([[0, 0, 10, 10], [50, 50, 10, 10]])) == [1, 2]
    tracker.reset()
    assert tracker.update(np.array([[0, 0, 10, 10]])) == [3]


def test_input_validation() -> None:
    tracker = IouTracker()
    assert tracker.update(np.zeros((0, 4))) == []
    assert tracker.update(np.array([1, 2, 3, 4])) == [1]  # a single (4,) box
    with pytest.raises(ValueError):
        tracker.update(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        IouTracker(iou_threshold=0.0)
    with pytest.raises(ValueError):
        IouTracker(max_missed=-1)
