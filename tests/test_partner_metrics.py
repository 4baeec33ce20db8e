"""CREMI partner metric, Parag et al.'s criterion and the PR sweep, by hand."""

import numpy as np
import pytest

from synjax.errors import DataError
from synjax.evaluation import partners as pm
from synjax.postprocess.candidates import Candidates

# A truth at the origin: pre site 0 nm, post site 20 nm further in x.
PRE_LOC = np.array([1000.0, 1000.0, 1000.0])
POST_LOC = PRE_LOC + [0.0, 0.0, 20.0]


def _pairs(ids, shifts_nm, scores=None):
    """Pairs (pre, post) with both sites shifted in y by `shifts_nm`."""
    ids = np.asarray(ids).reshape(-1, 2)
    shift = np.stack([np.zeros(len(ids)), np.asarray(shifts_nm, float), np.zeros(len(ids))], 1)
    return pm.PartnerPairs(ids[:, 0], ids[:, 1], PRE_LOC + shift, POST_LOC + shift, scores)


TRUTH = _pairs([[1, 2]], [0.0])


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.paper_partner_scores])
def test_correct_pair_matched(metric):
    got = metric(_pairs([[1, 2]], [10.0]), TRUTH)
    assert (got.tp, got.fp, got.fn) == (1, 0, 0)
    assert got.precision == got.recall == got.fscore == 1.0
    np.testing.assert_array_equal(got.matches, [[0, 0]])


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.paper_partner_scores])
def test_reversed_pair_is_wrong(metric):
    got = metric(_pairs([[2, 1]], [0.0]), TRUTH)
    assert (got.tp, got.fp, got.fn) == (0, 1, 1)
    assert got.reversed == 1
    assert (got.precision, got.recall, got.fscore) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.paper_partner_scores])
def test_distance_threshold(metric):
    far = metric(_pairs([[1, 2]], [500.0]), TRUTH)
    assert (far.tp, far.fp, far.fn) == (0, 1, 1)
    near = metric(_pairs([[1, 2]], [300.0]), TRUTH)
    assert (near.tp, near.fp, near.fn) == (1, 0, 0)


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.paper_partner_scores])
def test_one_to_one(metric):
    got = metric(_pairs([[1, 2], [1, 2]], [50.0, 10.0]), TRUTH)
    assert (got.tp, got.fp, got.fn) == (1, 1, 0)
    np.testing.assert_array_equal(got.matches, [[1, 0]])  # the closer prediction wins
    np.testing.assert_allclose([got.precision, got.recall, got.fscore], [0.5, 1.0, 2 / 3])


def test_hungarian_prefers_more_matches_over_greedy():
    # Prediction 0 is closest to truth 0 but also the only one near truth 1:
    # greedy matching would give 1 tp, the assignment gives 2.
    truth = _pairs([[1, 2], [1, 2]], [0.0, 350.0])
    pred = _pairs([[1, 2], [1, 2]], [100.0, -200.0])
    got = pm.cremi_partner_scores(pred, truth)
    assert got.tp == 2
    np.testing.assert_array_equal(got.matches, [[0, 1], [1, 0]])


def test_cremi_needs_pre_and_post_sites_near():
    # Midpoint 300 nm away but the post site alone 600 nm away: no CREMI match.
    pred = pm.PartnerPairs([1], [2], [PRE_LOC], [POST_LOC + [0.0, 600.0, 0.0]])
    assert pm.cremi_partner_scores(pred, TRUTH).tp == 0
    assert pm.paper_partner_scores(pred, TRUTH).tp == 1


def test_cremi_reads_ids_from_gt_segmentation():
    resolution = (40.0, 4.0, 4.0)
    gt = np.zeros((4, 8, 8), np.uint64)
    gt[..., :4] = 7
    gt[..., 4:] = 9
    # Pre site in x voxel 2 (segment 7), post site in x voxel 5 (segment 9).
    truth = pm.PartnerPairs([0], [0], [[40.0, 8.0, 8.0]], [[40.0, 8.0, 20.0]])
    pred = pm.PartnerPairs([123], [456], [[40.0, 12.0, 8.0]], [[40.0, 12.0, 20.0]])
    got = pm.cremi_synaptic_partners(pred, truth, gt, resolution)
    assert (got.tp, got.fp, got.fn) == (1, 0, 0)
    np.testing.assert_array_equal(
        pm.segment_ids_at([[40.0, 8.0, 8.0], [0.0, 0.0, 1e4]], gt, resolution), [7, 0]
    )
    flipped = pm.PartnerPairs([0], [0], pred.post_locations, pred.pre_locations)
    assert pm.cremi_synaptic_partners(flipped, truth, gt, resolution).tp == 0


def test_paper_cleft_overlap():
    far = _pairs([[1, 2], [1, 2]], [900.0, 900.0])
    got = pm.paper_partner_scores(
        far, TRUTH, predicted_cleft_ids=[5, pm.NO_CLEFT], truth_cleft_ids=[5]
    )
    assert (got.tp, got.fp, got.fn) == (1, 1, 0)
    np.testing.assert_array_equal(got.matches, [[0, 0]])
    with pytest.raises(DataError, match="both cleft id arrays"):
        pm.paper_partner_scores(far, TRUTH, predicted_cleft_ids=[5, 5])


def test_empty_prediction():
    got = pm.cremi_partner_scores(_pairs(np.zeros((0, 2)), []), TRUTH)
    assert (got.tp, got.fp, got.fn, got.precision, got.recall) == (0, 0, 1, 1.0, 0.0)


def test_from_candidates_uses_closest_points():
    one = np.ones(1, np.int64)
    cands = Candidates(
        pre_component=one,
        pre_segment=np.array([3], np.uint64),
        post_component=one,
        post_segment=np.array([4], np.uint64),
        pre_overlap=one,
        post_overlap=one,
        location=np.array([[40.0, 8.0, 10.0]]),
        pre_point=np.array([[1, 2, 2]]),
        post_point=np.array([[1, 2, 3]]),
        gap_nm=np.array([4.0]),
        score=np.array([0.7]),
    )
    pairs = pm.PartnerPairs.from_candidates(cands, (40.0, 4.0, 4.0), offset=(100.0, 0.0, 0.0))
    np.testing.assert_allclose(pairs.pre_locations, [[140.0, 8.0, 8.0]])
    np.testing.assert_allclose(pairs.post_locations, [[140.0, 8.0, 12.0]])
    np.testing.assert_allclose(pairs.scores, [0.7])
    np.testing.assert_array_equal(pairs.pre_ids, [3])


def _sweep_example():
    # Three truths; predictions 0 and 2 are right, 1 and 3 wrong (other cells).
    truth = _pairs([[1, 2], [3, 4], [5, 6]], [0.0, 2000.0, 4000.0])
    pred = _pairs([[1, 2], [8, 9], [3, 4], [8, 9]], [0.0, 0.0, 2000.0, 0.0], [0.9, 0.8, 0.6, 0.3])

    def evaluate(t):
        return pm.cremi_partner_scores(pred.select(pred.scores >= t), truth)

    return pm.precision_recall_curve(pred.scores, evaluate)


def test_precision_recall_sweep_hand_computed():
    curve = _sweep_example()
    np.testing.assert_allclose(curve.thresholds, [0.3, 0.6, 0.8, 0.9])
    # t=0.3: 2 tp, 2 fp, 1 fn; t=0.6: 2, 1, 1; t=0.8: 1, 1, 2; t=0.9: 1, 0, 2.
    np.testing.assert_allclose(curve.precision, [0.5, 2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(curve.recall, [2 / 3, 2 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(curve.fscore, [4 / 7, 2 / 3, 0.4, 0.5])
    assert curve.best_threshold == 0.6
    np.testing.assert_allclose(curve.best_fscore, 2 / 3)


def test_plot_precision_recall_writes_png(tmp_path):
    path = pm.plot_precision_recall(_sweep_example(), tmp_path / "plots" / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["pr.png"]  # no temporary left
