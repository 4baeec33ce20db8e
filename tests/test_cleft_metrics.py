"""CREMI cleft distances and synapse detection F1: hand-computed cases and a brute-force check."""

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from synjax.errors import ConfigError, DataError
from synjax.evaluation import cremi_cleft_scores, detection_scores

RESOLUTION = (40.0, 4.0, 4.0)  # z, y, x nm


def _volume(voxels, shape=(3, 4, 4), label=1):
    volume = np.zeros(shape, np.uint64)
    for voxel in voxels:
        volume[voxel] = label
    return volume


def test_cremi_distances_hand_computed():
    truth = _volume([(1, 1, 1), (2, 0, 3)])
    pred = _volume([(1, 1, 1), (1, 1, 3), (0, 1, 1), (2, 3, 3)], label=7)
    # Predicted voxel -> nearest true voxel (nm):
    #   (1,1,1): itself, 0;  (1,1,3): (1,1,1) two x voxels, 8 (not (2,0,3): sqrt(40^2 + 4^2));
    #   (0,1,1): (1,1,1) one z voxel, 40;  (2,3,3): (2,0,3) three y voxels, 12.
    # True voxel -> nearest predicted voxel: (1,1,1): 0;  (2,0,3): (2,3,3), 12.
    scores = cremi_cleft_scores(pred, truth, RESOLUTION, cutoff_nm=10.0)
    assert scores.mean_distance_to_truth == pytest.approx((0 + 8 + 40 + 12) / 4)
    assert scores.mean_distance_to_prediction == pytest.approx((0 + 12) / 2)
    assert scores.cremi_score == pytest.approx((15 + 6) / 2)
    assert scores.false_positives == 2  # 40 and 12 nm are above 10 nm
    assert scores.false_negatives == 1  # 12 nm
    assert (scores.predicted_voxels, scores.true_voxels) == (4, 2)
    at_cremi_cutoff = cremi_cleft_scores(pred, truth, RESOLUTION)
    assert at_cremi_cutoff.cutoff_nm == 200.0
    assert (at_cremi_cutoff.false_positives, at_cremi_cutoff.false_negatives) == (0, 0)


def test_cremi_distances_match_brute_force():
    rng = np.random.default_rng(0)
    shape = (5, 9, 8)
    pred = rng.random(shape) < 0.05
    truth = (rng.random(shape) < 0.04).astype(np.int32) * 3
    resolution = (33.0, 5.0, 4.0)
    scores = cremi_cleft_scores(pred, truth, resolution, cutoff_nm=20.0)
    pred_nm = np.argwhere(pred) * resolution
    true_nm = np.argwhere(truth) * resolution
    pairwise = cdist(pred_nm, true_nm)
    to_truth, to_pred = pairwise.min(1), pairwise.min(0)
    assert scores.mean_distance_to_truth == pytest.approx(to_truth.mean())
    assert scores.mean_distance_to_prediction == pytest.approx(to_pred.mean())
    assert scores.false_positives == np.count_nonzero(to_truth > 20.0)
    assert scores.false_negatives == np.count_nonzero(to_pred > 20.0)


def test_cremi_empty_volumes():
    cleft = _volume([(1, 2, 2), (1, 2, 3)])
    empty = _volume([])
    nothing_found = cremi_cleft_scores(empty, cleft, RESOLUTION)
    assert nothing_found.mean_distance_to_truth == 0.0
    assert math.isinf(nothing_found.mean_distance_to_prediction)
    assert math.isinf(nothing_found.cremi_score)
    assert (nothing_found.false_positives, nothing_found.false_negatives) == (0, 2)
    false_alarm = cremi_cleft_scores(cleft, empty, RESOLUTION)
    assert math.isinf(false_alarm.mean_distance_to_truth)
    assert false_alarm.mean_distance_to_prediction == 0.0
    assert (false_alarm.false_positives, false_alarm.false_negatives) == (2, 0)
    both_empty = cremi_cleft_scores(empty, empty, RESOLUTION)
    assert both_empty.cremi_score == 0.0
    assert (both_empty.false_positives, both_empty.false_negatives) == (0, 0)


@pytest.mark.parametrize(
    "pred, truth, kwargs, error, word",
    [
        (np.zeros((3, 4, 4), np.int32), np.zeros((3, 4, 5), np.int32), {}, DataError, "shape"),
        (np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), np.int32), {}, DataError, "dtype"),
        (np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32), {}, DataError, "z, y, x"),
        (np.zeros((3, 4, 4), np.int32),) * 2 + ({"resolution": (40, 4)}, ConfigError, "resolution"),
        (np.zeros((3, 4, 4), np.int32),) * 2 + ({"cutoff_nm": -1.0}, ConfigError, "cutoff_nm"),
    ],
)
def test_cremi_bad_input(pred, truth, kwargs, error, word):
    kwargs = {"resolution": RESOLUTION, **kwargs}
    with pytest.raises(error, match=word) as raised:
        cremi_cleft_scores(pred, truth, **kwargs)
    assert "\n" not in str(raised.value)


def _row(pieces, length=200):
    """A (1, 1, length) label volume with `id` on each `(start, stop, id)` of x."""
    volume = np.zeros((1, 1, length), np.int32)
    for start, stop, label in pieces:
        volume[0, 0, start:stop] = label
    return volume


@pytest.mark.parametrize("start, found", [(91, False), (89, True)])
def test_detection_iou_threshold(start, found):
    truth = _row([(0, 100, 5)])
    # The prediction lies inside the synapse: IoU = its size / 100, 0.09 or 0.11.
    pred = _row([(start, 100, 2)])
    scores = detection_scores(pred, truth)
    assert (scores.tp, scores.fp, scores.fn) == ((1, 0, 0) if found else (0, 1, 1))
    assert scores.f1 == (1.0 if found else 0.0)
    if found:
        np.testing.assert_array_equal(scores.matches, [[2, 5]])
        assert scores.ious[0] == pytest.approx(0.11)


def test_one_prediction_on_two_synapses_finds_one():
    truth = _row([(0, 10, 1), (10, 20, 2)])
    pred = _row([(0, 20, 9)])  # IoU 0.5 with each
    scores = detection_scores(pred, truth)
    assert (scores.tp, scores.fp, scores.fn) == (1, 0, 1)
    assert (scores.precision, scores.recall) == (1.0, 0.5)
    assert scores.f1 == pytest.approx(2 / 3)


def test_two_predictions_on_one_synapse_count_one_false_positive():
    truth = _row([(0, 30, 4)])
    pred = _row([(0, 15, 1), (15, 30, 2), (100, 110, 3)])
    scores = detection_scores(pred, truth)
    assert (scores.tp, scores.fp, scores.fn) == (1, 2, 0)
    assert scores.precision == pytest.approx(1 / 3) and scores.recall == 1.0
    assert scores.f1 == pytest.approx(0.5)
