"""CREMI partner metric, Parag et al.'s criterion, the same-ids rule and the PR sweep, by hand."""

import numpy as np
import pytest
import scipy.ndimage

from synjax.errors import DataError
from synjax.evaluation import partners as pm
from synjax.io import segment_ids_at
from synjax.pipelines.partners import candidate_pairs
from synjax.postprocess.candidates import Candidates
from synjax.report.precision_recall import plot_precision_recall

# A truth at the origin: pre site 0 nm, post site 20 nm further in x.
PRE_LOC = np.array([1000.0, 1000.0, 1000.0])
POST_LOC = PRE_LOC + [0.0, 0.0, 20.0]


def _pairs(ids, shifts_nm, scores=None):
    """Pairs (pre, post) with both sites shifted in y by `shifts_nm`."""
    ids = np.asarray(ids).reshape(-1, 2)
    shift = np.stack([np.zeros(len(ids)), np.asarray(shifts_nm, float), np.zeros(len(ids))], 1)
    return pm.PartnerPairs(ids[:, 0], ids[:, 1], PRE_LOC + shift, POST_LOC + shift, scores)


TRUTH = _pairs([[1, 2]], [0.0])


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.ids_within_distance_scores])
def test_correct_pair_matched(metric):
    got = metric(_pairs([[1, 2]], [10.0]), TRUTH)
    assert (got.tp, got.fp, got.fn) == (1, 0, 0)
    assert got.precision == got.recall == got.fscore == 1.0
    np.testing.assert_array_equal(got.matches, [[0, 0]])


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.ids_within_distance_scores])
def test_reversed_pair_is_wrong(metric):
    got = metric(_pairs([[2, 1]], [0.0]), TRUTH)
    assert (got.tp, got.fp, got.fn) == (0, 1, 1)
    assert got.reversed == 1
    assert (got.precision, got.recall, got.fscore) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.ids_within_distance_scores])
def test_distance_threshold(metric):
    far = metric(_pairs([[1, 2]], [500.0]), TRUTH)
    assert (far.tp, far.fp, far.fn) == (0, 1, 1)
    near = metric(_pairs([[1, 2]], [300.0]), TRUTH)
    assert (near.tp, near.fp, near.fn) == (1, 0, 0)


@pytest.mark.parametrize("metric", [pm.cremi_partner_scores, pm.ids_within_distance_scores])
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
    assert pm.ids_within_distance_scores(pred, TRUTH).tp == 1


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
        segment_ids_at(gt, [[40.0, 8.0, 8.0], [0.0, 0.0, 1e4]], resolution), [7, 0]
    )
    flipped = pm.PartnerPairs([0], [0], pred.post_locations, pred.pre_locations)
    assert pm.cremi_synaptic_partners(flipped, truth, gt, resolution).tp == 0


# --- Parag et al.'s criterion: in a true cleft, right cells, right direction ---


def test_paper_criterion_needs_the_truths_cleft_not_distance():
    # Both detections link 1 -> 2 and lie 900 nm from the truth: only the one
    # whose sites overlap the truth's cleft (5) is correct.
    far = _pairs([[1, 2], [1, 2]], [900.0, 900.0])
    got = pm.paper_partner_scores(far, TRUTH, [5, pm.NO_CLEFT], [5])
    assert (got.tp, got.fp, got.fn) == (1, 1, 0)
    np.testing.assert_array_equal(got.matches, [[0, 0]])
    # Right cells, right direction, right place, but in another cleft: wrong.
    near_other = pm.paper_partner_scores(_pairs([[1, 2]], [0.0]), TRUTH, [6], [5])
    assert (near_other.tp, near_other.fp, near_other.fn) == (0, 1, 1)


def test_paper_criterion_wrong_direction_and_wrong_cell():
    truth = _pairs([[1, 2], [1, 3]], [0.0, 0.0])  # one polyadic synapse, cleft 5
    pred = _pairs([[2, 1], [1, 4], [1, 3]], [0.0, 0.0, 0.0])
    got = pm.paper_partner_scores(pred, truth, [5, 5, 5], [5, 5])
    # Only 1 -> 3 is right; 2 -> 1 is 1 -> 2 reversed; 1 -> 4 is the wrong cell.
    assert (got.tp, got.fp, got.fn) == (1, 2, 1)
    np.testing.assert_array_equal(got.matches, [[2, 1]])
    assert got.reversed == 1


def test_paper_criterion_counts_a_pair_once():
    # Three detections of the one truth pair in its cleft: one tp, two fp;
    # the one nearest the truth's midpoint takes it.
    pred = _pairs([[1, 2], [1, 2], [1, 2]], [300.0, 20.0, 2000.0])
    got = pm.paper_partner_scores(pred, TRUTH, [[5, 0], [0, 5], [5, 5]], [5])
    assert (got.tp, got.fp, got.fn) == (1, 2, 0)
    np.testing.assert_array_equal(got.matches, [[1, 0]])
    np.testing.assert_allclose([got.precision, got.recall, got.fscore], [1 / 3, 1.0, 0.5])


def test_paper_criterion_finds_most_pairs_before_nearest():
    # Three truths of the same cells in clefts 5, 6, 7 (y = 0, 1000, 2000 nm).
    # Detection 0 (y 0) overlaps clefts 5 and 6, detection 1 (y 1000) clefts 6
    # and 7, detection 2 (y -1000) cleft 5. Pairing each with the truth on top
    # of it finds two pairs at distance 0; all three can be found at 1000 nm
    # each, and are. (CREMI's costing, with a disallowed pair at twice the
    # largest distance, would take the two: 0 + 0 + 2000 < 3000.)
    truth = _pairs([[1, 2]] * 3, [0.0, 1000.0, 2000.0])
    pred = _pairs([[1, 2]] * 3, [0.0, 1000.0, -1000.0])
    got = pm.paper_partner_scores(pred, truth, [[5, 6], [6, 7], [5, 0]], [5, 6, 7])
    assert (got.tp, got.fp, got.fn) == (3, 0, 0)
    np.testing.assert_array_equal(got.matches, [[0, 1], [1, 2], [2, 0]])


def test_paper_criterion_truth_without_cleft_is_never_found():
    got = pm.paper_partner_scores(_pairs([[1, 2]], [0.0]), TRUTH, [pm.NO_CLEFT], [pm.NO_CLEFT])
    assert (got.tp, got.fp, got.fn) == (0, 1, 1)


def test_paper_criterion_checks_cleft_id_counts():
    with pytest.raises(DataError, match="cleft ids for 1 predictions and 2 truths"):
        pm.paper_partner_scores(_pairs([[1, 2]], [0.0]), TRUTH, [5], [5, 5])
    empty = pm.paper_partner_scores(_pairs(np.zeros((0, 2)), []), TRUTH, np.zeros((0, 2)), [5])
    assert (empty.tp, empty.fp, empty.fn) == (0, 0, 1)


def test_clefts_under_sites_by_hand():
    # One z-section, 5 x 6. Component 1 fills rows 0..1, x 0..3; component 2
    # row 4, x 0..2. Segments: 7 for x < 2, 8 for x >= 2.
    components = np.zeros((1, 5, 6), np.int64)
    components[0, :2, :4] = 1
    components[0, 4, :3] = 2
    segmentation = np.full((1, 5, 6), 8, np.uint64)
    segmentation[..., :2] = 7
    clefts = np.zeros((1, 5, 6), np.uint64)
    clefts[0, 0, 1] = 3  # inside site (1, 7); its x + 1 face is in site (1, 8)
    clefts[0, 2, 3] = 4  # in no site; its y - 1 face is in site (1, 8)
    clefts[0, 3, 0] = 6  # its y + 1 face is in site (2, 7)
    clefts[0, 3, 3] = 5  # only diagonal to site (2, 8) at (4, 2): no face shared
    clefts[0, 3, 5] = 9  # nothing near
    got = pm.clefts_under_sites(
        components,
        segmentation,
        clefts,
        np.array([1, 1, 2, 1, 2]),
        np.array([7, 8, 7, 9, 8]),
    )
    np.testing.assert_array_equal(got, [[3, 0], [3, 4], [6, 0], [0, 0], [0, 0]])
    # Reference: each site grown by its face neighbours, read off the clefts.
    for row, (c, s) in zip(got, [(1, 7), (1, 8), (2, 7), (1, 9), (2, 8)], strict=True):
        grown = scipy.ndimage.binary_dilation((components == c) & (segmentation == s))
        expected = sorted(set(clefts[grown].tolist()) - {pm.NO_CLEFT})
        assert [v for v in row.tolist() if v != pm.NO_CLEFT] == expected
    none = pm.clefts_under_sites(components, segmentation, np.zeros_like(clefts), [1], [7])
    np.testing.assert_array_equal(none, [[pm.NO_CLEFT]])
    with pytest.raises(DataError, match="expected one 3D shape"):
        pm.clefts_under_sites(components, segmentation[..., :3], clefts, [1], [7])


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
    pairs = candidate_pairs(cands, (40.0, 4.0, 4.0), offset=(100.0, 0.0, 0.0))
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
    path = plot_precision_recall(_sweep_example(), tmp_path / "plots" / "pr.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["pr.png"]  # no temporary left
