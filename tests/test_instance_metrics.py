"""Instance matching, merges and splits, volume distributions: hand-built volumes."""

import itertools

import numpy as np
import pytest
from scipy import integrate, special, stats

from synjax.errors import ConfigError, DataError
from synjax.evaluation import distributions as dist
from synjax.evaluation import instances as inst

BIG_ID = 2**40  # ids need not be small or dense


def _line(length, pieces):
    """`[1, 1, length]` label volume; pieces are (start, stop, id) along x."""
    labels = np.zeros((1, 1, length), np.uint64)
    for start, stop, label in pieces:
        labels[0, 0, start:stop] = label
    return labels


# Truth: 10, 12 and 5 voxels. Prediction: an exact copy of the first (IoU 1),
# 11 of the second's 12 voxels (IoU 11/12), and one instance on background.
TRUTH = _line(40, [(0, 10, 5), (20, 32, BIG_ID), (35, 40, 9)])
PRED = _line(40, [(0, 10, 70), (21, 32, 80), (12, 16, 90)])


def test_overlap_table_by_hand():
    table = inst.overlap_table(PRED, TRUTH)
    np.testing.assert_array_equal(table.pred_ids, [70, 80, 90])
    np.testing.assert_array_equal(table.true_ids, [5, 9, BIG_ID])
    np.testing.assert_array_equal(table.pred_sizes, [10, 11, 4])
    np.testing.assert_array_equal(table.true_sizes, [10, 5, 12])
    np.testing.assert_array_equal(table.intersection.toarray(), [[10, 0, 0], [0, 0, 11], [0, 0, 0]])
    np.testing.assert_allclose(table.iou().toarray(), [[1, 0, 0], [0, 0, 11 / 12], [0, 0, 0]])


def test_matching_at_half():
    got = inst.match_instances(PRED, TRUTH, 0.5)
    assert (got.tp, got.fp, got.fn) == (2, 1, 1)
    np.testing.assert_array_equal(got.matches, [[70, 5], [80, BIG_ID]])
    np.testing.assert_allclose(got.ious, [1.0, 11 / 12])
    np.testing.assert_allclose([got.precision, got.recall, got.f1], [2 / 3, 2 / 3, 2 / 3])
    # Above 11/12 only the exact copy matches.
    strict = inst.match_instances(PRED, TRUTH, 0.95)
    assert (strict.tp, strict.fp, strict.fn) == (1, 2, 2)


def test_scores_averaged_over_thresholds():
    got = inst.instance_scores(PRED, TRUTH)
    assert [s.threshold for s in got.per_threshold] == [
        0.5,
        0.55,
        0.6,
        0.65,
        0.7,
        0.75,
        0.8,
        0.85,
        0.9,
        0.95,
    ]
    # IoU 11/12 = 0.917 matches at 0.5 ... 0.9 (9 thresholds): F1 2/3; at 0.95: 1/3.
    assert [s.tp for s in got.per_threshold] == [2] * 9 + [1]
    assert got.f1_50 == pytest.approx(2 / 3)
    assert got.mean_f1 == pytest.approx((9 * 2 / 3 + 1 / 3) / 10)
    assert got.mean_precision == pytest.approx((9 * 2 / 3 + 1 / 3) / 10)


def test_one_to_one_prefers_more_matches_to_the_best_pair():
    truth = _line(20, [(0, 10, 1), (10, 14, 2)])
    pred = _line(20, [(4, 14, 3), (0, 4, 4)])
    # IoU(3, 1) = 6/14, IoU(3, 2) = 4/10, IoU(4, 1) = 4/10. Greedy on IoU
    # takes (3, 1) and stops at one match; the assignment finds two.
    got = inst.match_instances(pred, truth, 0.35)
    assert got.tp == 2
    np.testing.assert_array_equal(got.matches, [[3, 2], [4, 1]])
    np.testing.assert_allclose(got.ious, [0.4, 0.4])
    assert inst.match_instances(pred, truth, 0.5).tp == 0


def _brute_force(iou: np.ndarray, threshold: float) -> tuple[int, float]:
    """Most matches, then largest IoU sum, over every one-to-one assignment."""
    rows, cols = iou.shape
    best = (0, 0.0)
    for k in range(min(rows, cols), 0, -1):
        for r in itertools.combinations(range(rows), k):
            for c in itertools.permutations(range(cols), k):
                values = iou[list(r), list(c)]
                if (values >= threshold).all():
                    best = max(best, (k, float(values.sum())))
        if best[0]:
            return best
    return best


@pytest.mark.parametrize("seed", range(15))
def test_matching_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    # Random label volumes with few, blocky instances so that IoUs vary.
    truth = rng.integers(0, 4, (1, 6, 6)).repeat(2, 1).repeat(2, 2)
    pred = rng.integers(0, 5, (1, 6, 6)).repeat(2, 1).repeat(2, 2)
    pred[:, :6] = truth[:, :6] * 3  # some instances close to the truth
    table = inst.overlap_table(pred, truth)
    iou = table.iou().toarray()
    for threshold in (0.1, 0.3, 0.5):
        got = inst.match_instances(iou_threshold=threshold, table=table)
        count, total = _brute_force(iou, threshold)
        assert got.tp == count
        assert got.ious.sum() == pytest.approx(total)


def test_empty_volumes():
    empty = np.zeros((2, 3, 4), np.int32)
    got = inst.match_instances(empty, empty)
    assert (got.tp, got.fp, got.fn, got.f1) == (0, 0, 0, 1.0)
    assert got.matches.shape == (0, 2)
    one = empty.copy()
    one[0, 0, :2] = 1
    missed = inst.match_instances(empty, one)
    assert (missed.tp, missed.fn, missed.precision, missed.recall, missed.f1) == (
        0,
        1,
        1.0,
        0.0,
        0.0,
    )


# Truth: 5 and 9 side by side, 11 alone, 13 alone. Prediction: 100 covers 5 and
# 9 (a merge); 101 and 102 cut 11 in two (a split); 103 is 13 exactly; 104 is
# on background.
MS_TRUTH = _line(70, [(0, 10, 5), (12, 20, 9), (30, 40, 11), (50, 60, 13)])
MS_PRED = _line(70, [(0, 20, 100), (30, 35, 101), (35, 40, 102), (50, 60, 103), (62, 64, 104)])


def test_merges_and_splits_by_hand():
    got = inst.merge_split_errors(MS_PRED, MS_TRUTH)
    assert (got.merges, got.splits) == (1, 1)
    np.testing.assert_array_equal(got.merged_pred_ids, [100])
    np.testing.assert_array_equal(got.merged_true_ids, [5, 9])
    np.testing.assert_array_equal(got.split_true_ids, [11])
    np.testing.assert_array_equal(got.split_pred_ids, [101, 102])
    # Mirror image: the splits of (pred, truth) are the merges of (truth, pred).
    mirror = inst.merge_split_errors(MS_TRUTH, MS_PRED)
    assert (mirror.merges, mirror.splits) == (1, 1)
    np.testing.assert_array_equal(mirror.merged_pred_ids, [11])
    np.testing.assert_array_equal(mirror.split_true_ids, [100])


def test_merge_needs_the_fraction():
    truth = _line(20, [(0, 10, 1), (10, 20, 2)])
    pred = _line(20, [(0, 14, 7)])  # all of 1, 4/10 of 2
    assert inst.merge_split_errors(pred, truth).merges == 0
    assert inst.merge_split_errors(pred, truth, 0.4).merges == 1
    # A split needs two pieces lying in one truth: only piece 8 lies in truth 2.
    pieces = _line(20, [(0, 14, 7), (14, 20, 8)])
    assert inst.merge_split_errors(pieces, truth).splits == 0
    assert inst.merge_split_errors(pieces, _line(20, [(0, 20, 1)])).splits == 1


def test_bad_metric_input():
    with pytest.raises(DataError, match="shape"):
        inst.match_instances(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int))
    with pytest.raises(DataError, match="integers"):
        inst.overlap_table(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int))
    with pytest.raises(ConfigError, match="iou_threshold"):
        inst.match_instances(PRED, TRUTH, 0.0)
    with pytest.raises(ConfigError, match="min_overlap_fraction"):
        inst.merge_split_errors(PRED, TRUTH, 1.5)


def test_instance_volumes():
    labels = np.zeros((2, 3, 3), np.uint16)
    labels[0, 0, :3] = 7
    labels[1, :, :] = 3
    np.testing.assert_array_equal(dist.instance_volumes(labels), [9.0, 3.0])  # ids 3, 7
    np.testing.assert_allclose(dist.instance_volumes(labels, voxel_volume=0.5), [4.5, 1.5])


def test_gamma_fit_solves_the_likelihood_equations():
    rng = np.random.default_rng(0)
    volumes = stats.gamma.rvs(3.0, scale=50.0, size=4000, random_state=rng)
    fit = dist.fit_gamma(volumes)
    # The maximum-likelihood gamma with location 0 satisfies
    # ln k - digamma(k) = ln mean - mean(ln x) and k * scale = mean.
    assert np.log(fit.shape) - special.digamma(fit.shape) == pytest.approx(
        np.log(volumes.mean()) - np.log(volumes).mean(), rel=1e-3
    )
    assert fit.mean == pytest.approx(volumes.mean(), rel=1e-3)
    assert fit.shape == pytest.approx(3.0, rel=0.1)
    with pytest.raises(DataError, match="distinct"):
        dist.fit_gamma([5.0, 5.0])
    with pytest.raises(DataError, match="positive"):
        dist.fit_gamma([5.0, 0.0, 3.0])


def test_histogram_kl_by_hand():
    tiny = 1e-12
    want = 0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)
    assert dist.histogram_kl([1, 1], [1, 3], tiny) == pytest.approx(want, rel=1e-9)
    assert dist.histogram_kl([2, 6], [1, 3]) == pytest.approx(0.0, abs=1e-12)
    # An empty bin of Q under mass of P: smoothed to epsilon, then renormalised.
    eps = 1e-6
    p = np.array([0.5 + eps, 0.5 + eps]) / (1 + 2 * eps)
    q = np.array([1 + eps, eps]) / (1 + 2 * eps)
    assert dist.histogram_kl([1, 1], [1, 0], eps) == pytest.approx(np.sum(p * np.log(p / q)))
    with pytest.raises(DataError, match="bins"):
        dist.histogram_kl([1, 1], [1, 1, 1])


def test_gamma_kl_closed_form():
    p, q = dist.GammaFit(2.5, 40.0), dist.GammaFit(4.0, 20.0)

    def integrand(x):
        log_p = stats.gamma.logpdf(x, p.shape, scale=p.scale)
        return np.exp(log_p) * (log_p - stats.gamma.logpdf(x, q.shape, scale=q.scale))

    numeric, _ = integrate.quad(integrand, 0, np.inf, limit=200)
    assert dist.gamma_kl(p, q) == pytest.approx(numeric, rel=1e-6)
    assert dist.gamma_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    # Exponentials (shape 1): KL = ln(theta_q / theta_p) + theta_p / theta_q - 1.
    e1, e2 = dist.GammaFit(1.0, 2.0), dist.GammaFit(1.0, 5.0)
    assert dist.gamma_kl(e1, e2) == pytest.approx(np.log(5 / 2) + 2 / 5 - 1)


def test_compare_volume_distributions():
    rng = np.random.default_rng(1)
    a = stats.gamma.rvs(3.0, scale=50.0, size=2000, random_state=rng)
    b = stats.gamma.rvs(3.0, scale=50.0, size=2000, random_state=rng)
    c = stats.gamma.rvs(6.0, scale=50.0, size=2000, random_state=rng)
    same = dist.compare_volume_distributions(a, b, num_bins=20)
    other = dist.compare_volume_distributions(a, c, num_bins=20)
    assert same.edges.shape == (21,) and same.counts_p.sum() == 2000 == same.counts_q.sum()
    assert same.edges[0] == min(a.min(), b.min()) and same.edges[-1] == max(a.max(), b.max())
    assert same.histogram_kl < 0.05 < other.histogram_kl
    assert same.gamma_kl < 0.01 < other.gamma_kl
    assert other.gamma_kl == pytest.approx(dist.gamma_kl(other.fit_p, other.fit_q))
    log_edges = dist.shared_bins(a, c, num_bins=4, log=True)
    np.testing.assert_allclose(np.diff(np.log(log_edges)), np.log(log_edges[-1] / log_edges[0]) / 4)


def test_tied_score_share_by_hand():
    from synjax.inference.instances import tied_score_share

    # 0.9318521 and 0.9318519 round to one value at 6 decimals: 3 of 5.
    share, score = tied_score_share(np.asarray([0.9318521, 0.5, 0.9318519, 0.9318520, 0.7]))
    assert share == pytest.approx(0.6) and score == pytest.approx(0.931852)
    share, _ = tied_score_share(np.asarray([0.1, 0.2, 0.3, 0.4]))
    assert share == pytest.approx(0.25)
    share, score = tied_score_share(np.zeros(0))
    assert share == 0.0 and np.isnan(score)
