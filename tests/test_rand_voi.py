"""Tests of synjax.evaluation.rand_voi: hand-computed cases and scikit-image parity."""

import fastremap
import h5py
import numpy as np
import pytest
from skimage import metrics as skm

from synjax.errors import DataError
from synjax.evaluation import rand_voi
from synjax.evaluation.rand_voi import (
    adapted_rand_error,
    contingency_table,
    variation_of_information,
)

TOLERANCE = 1e-6


def _compact(labels):
    """Dense ids (0 kept) so that scikit-image's id-indexed table stays small."""
    return fastremap.renumber(labels, start=1, preserve_zero=True)[0].astype(np.int64)


def _random_pair(seed, big_ids):
    rng = np.random.default_rng(seed)
    shape = (9, 11, 13)
    gt = rng.integers(0, 6, shape).astype(np.uint64)
    # Correlate seg with gt so that the scores are not all near-random.
    seg = (gt * 3 + rng.integers(0, 3, shape) * (rng.random(shape) < 0.3)).astype(np.uint64)
    if big_ids:
        # Ids above 2**32 (CREMI's uint64); gt 0 stays 0 so it is still ignored.
        gt = np.where(gt > 0, gt + np.uint64(2**40 + 12345), gt)
        seg = seg * np.uint64(2**35) + np.uint64(2**62)
    return seg, gt


def _assert_matches_skimage(seg, gt):
    seg_c, gt_c = _compact(seg), _compact(gt)
    ours = adapted_rand_error(seg, gt)
    theirs = skm.adapted_rand_error(gt_c, seg_c)
    assert ours.error == pytest.approx(theirs[0], abs=TOLERANCE)
    # scikit-image returns precision and recall swapped (scikit-image #6485).
    assert ours.precision == pytest.approx(theirs[2], abs=TOLERANCE)
    assert ours.recall == pytest.approx(theirs[1], abs=TOLERANCE)
    voi = variation_of_information(seg, gt)
    np.testing.assert_allclose(
        voi, skm.variation_of_information(gt_c, seg_c, ignore_labels=[0]), atol=TOLERANCE
    )
    voi_all = variation_of_information(seg, gt, ignore_gt=())
    np.testing.assert_allclose(voi_all, skm.variation_of_information(gt_c, seg_c), atol=TOLERANCE)
    ours_all = adapted_rand_error(seg, gt, ignore_gt=())
    assert ours_all.error == pytest.approx(
        skm.adapted_rand_error(gt_c, seg_c, ignore_labels=())[0], abs=TOLERANCE
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("big_ids", [False, True])
def test_matches_skimage_on_random_labels(seed, big_ids):
    seg, gt = _random_pair(seed, big_ids)
    _assert_matches_skimage(seg, gt)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_weights_precision_as_in_snemi(alpha):
    seg, gt = _random_pair(5, big_ids=False)
    ours = adapted_rand_error(seg, gt, alpha=alpha)
    # scikit-image's alpha weights the ground-truth pairs, SNEMI3D's the segment pairs.
    theirs = skm.adapted_rand_error(_compact(gt), _compact(seg), alpha=1.0 - alpha)
    assert ours.error == pytest.approx(theirs[0], abs=TOLERANCE)
    if alpha == 0.0:
        assert ours.error == pytest.approx(1.0 - ours.recall)
    if alpha == 1.0:
        assert ours.error == pytest.approx(1.0 - ours.precision)


def test_perfect_segmentation_under_relabelling():
    gt = np.array([[1, 1, 2], [2, 3, 3]], dtype=np.uint64)
    seg = np.array([[9, 9, 4], [4, 2**50, 2**50]], dtype=np.uint64)
    assert adapted_rand_error(seg, gt) == (0.0, 1.0, 1.0)
    assert variation_of_information(seg, gt) == (0.0, 0.0)


def test_all_merged_hand_computed():
    gt = np.array([1, 1, 2, 2])
    seg = np.array([5, 5, 5, 5])
    # Pairs (ordered, distinct voxels): both 2*2+2*2-4 = 4, seg 16-4 = 12, gt 8-4 = 4.
    error, precision, recall = adapted_rand_error(seg, gt)
    assert precision == pytest.approx(4 / 12)
    assert recall == pytest.approx(1.0)
    assert error == pytest.approx(1.0 - 4 / 8)
    # One bit lost: the merged segment does not tell which of 2 equal bodies.
    assert variation_of_information(seg, gt) == pytest.approx((0.0, 1.0))


def test_all_split_hand_computed():
    gt = np.array([1, 1, 2, 2])
    seg = np.array([1, 2, 3, 4])
    error, precision, recall = adapted_rand_error(seg, gt)
    assert recall == 0.0
    assert precision == 1.0  # no segment pairs, so no false merge
    assert error == pytest.approx(1.0)
    assert variation_of_information(seg, gt) == pytest.approx((1.0, 0.0))


def test_gt_zero_is_ignored():
    gt = np.array([1, 1, 2, 2, 0, 0, 0])
    seg = np.array([1, 1, 2, 2, 1, 2, 3])
    assert adapted_rand_error(seg, gt).error == 0.0
    assert variation_of_information(seg, gt) == (0.0, 0.0)
    assert adapted_rand_error(seg, gt, ignore_gt=()).error > 0.0


def test_contingency_table_counts():
    seg = np.array([1, 1, 2, 2, 2], dtype=np.uint64)
    gt = np.array([5, 6, 6, 6, 0], dtype=np.uint64)
    # Rows and columns follow first appearance: seg 1, 2; gt 5, 6 (0 ignored).
    np.testing.assert_array_equal(contingency_table(seg, gt).toarray(), [[1, 1], [0, 2]])
    full = contingency_table(seg, gt, ignore_gt=())
    assert full.shape == (2, 3)
    assert full.sum() == 5
    np.testing.assert_array_equal(contingency_table(seg, gt, ignore_seg=(2,)).toarray(), [[1, 1]])
    table = contingency_table(seg, gt)
    assert adapted_rand_error(table=table) == adapted_rand_error(seg, gt)


def test_sparse_pair_path_equals_dense(monkeypatch):
    seg, gt = _random_pair(7, big_ids=True)
    dense = contingency_table(seg, gt)
    calls = []
    renumber = rand_voi.fastremap.renumber

    def spy(*args, **kwargs):
        calls.append(args[0].size)
        return renumber(*args, **kwargs)

    monkeypatch.setattr(rand_voi, "_MAX_DENSE_PAIR_GRID", 0)
    monkeypatch.setattr(rand_voi.fastremap, "renumber", spy)
    sparse = contingency_table(seg, gt)
    assert len(calls) == 3  # seg ids, gt ids, then the occurring pairs
    assert (dense != sparse).nnz == 0
    assert sparse.sum() == np.count_nonzero(gt)


def test_errors():
    with pytest.raises(DataError, match="shape"):
        adapted_rand_error(np.zeros(3, np.int32), np.zeros(4, np.int32))
    with pytest.raises(DataError, match="integers"):
        variation_of_information(np.zeros(3), np.ones(3, np.int32))
    with pytest.raises(DataError, match="fewer than two"):
        adapted_rand_error(np.ones(3, np.int32), np.zeros(3, np.int32))


def test_real_volume_matches_skimage(shared_data):
    with h5py.File(shared_data / "fib-medulla-250.h5", "r") as f:
        crop = np.s_[150:250, 50:150, 50:150]
        gt = f["volumes/labels/neuron_ids"][crop]
        seg = f["volumes/labels/oversegmentation"][crop]
    assert gt.dtype == np.uint64
    _assert_matches_skimage(seg, gt)
    # An over-segmentation: few false merges, many false splits.
    scores = adapted_rand_error(seg, gt)
    assert scores.precision > scores.recall
    split, merge = variation_of_information(seg, gt)
    assert split > merge
