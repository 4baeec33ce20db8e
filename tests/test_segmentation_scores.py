"""Tests of synjax.evaluation.segmentation_scores: the neuron scores from per-block tables.

The block-wise scores must equal the whole-array functions of `rand_voi`
(themselves checked against scikit-image in test_rand_voi.py) to 1e-12, on
random volumes with ignored ground truth, uint64 ids and blocks that divide
no axis, and on the real FIB-25 test part, where they must reproduce the
figures of results/fib25/metrics.json.
"""

import json

import h5py
import numpy as np
import pytest
from sklearn.metrics import rand_score

from synjax.errors import DataError
from synjax.evaluation.rand_voi import adapted_rand_error, rand_index, variation_of_information
from synjax.evaluation.segmentation_scores import segmentation_scores
from synjax.io import create_volume, open_volume
from tests.conftest import REPO_ROOT

EXACT = 1e-12
SCORE_KEYS = {
    "adapted_rand_error",
    "rand_precision",
    "rand_recall",
    "rand_index",
    "voi_split",
    "voi_merge",
    "voi",
    "segments",
}


def _whole_array_scores(seg: np.ndarray, gt: np.ndarray) -> dict:
    """The scores as neurons._scores computed them before: on whole arrays."""
    rand = adapted_rand_error(seg, gt)
    voi = variation_of_information(seg, gt)
    return {
        "adapted_rand_error": rand.error,
        "rand_precision": rand.precision,
        "rand_recall": rand.recall,
        "rand_index": rand_index(seg, gt),
        "voi_split": voi.split,
        "voi_merge": voi.merge,
        "voi": voi.split + voi.merge,
        "segments": len(np.unique(seg)),
    }


def _assert_equal_scores(got: dict, expected: dict) -> None:
    assert set(got) == SCORE_KEYS
    assert got["segments"] == expected["segments"]
    for key in SCORE_KEYS - {"segments"}:
        assert got[key] == pytest.approx(expected[key], abs=EXACT, rel=0), key


def _random_pair(seed: int, big_ids: bool):
    rng = np.random.default_rng(seed)
    shape = (7, 19, 23)
    gt = rng.integers(0, 8, shape).astype(np.uint64)  # 0: ignored, about 1/8 of the voxels
    merged = gt // 2  # merges pairs of bodies
    split = gt * 4 + rng.integers(0, 4, shape) * (rng.random(shape) < 0.2)  # splits some voxels off
    seg = np.where(rng.random(shape) < 0.5, merged, split).astype(np.uint64)
    if big_ids:
        gt = np.where(gt > 0, gt + np.uint64(2**40 + 7), gt)
        seg = seg * np.uint64(2**33) + np.uint64(2**62)
    return seg, gt


def test_hand_computed_scores():
    # Voxels 0..3: seg 1 1 2 2, gt 1 1 1 0 (the last ignored). Kept: seg (1, 1, 2), gt (1, 1, 1).
    # Pairs together: both {0,1} -> P = 2 * 1; seg {0,1} -> S = 2; gt {0,1},{0,2},{1,2} -> T = 6.
    seg = np.array([1, 1, 2, 2], np.uint32).reshape(2, 1, 2)
    gt = np.array([1, 1, 1, 0], np.uint32).reshape(2, 1, 2)
    got = segmentation_scores(seg, gt, block_shape=(1, 1, 1))
    assert got["rand_precision"] == pytest.approx(1.0, abs=EXACT)
    assert got["rand_recall"] == pytest.approx(2 / 6, abs=EXACT)
    assert got["adapted_rand_error"] == pytest.approx(1 - 2 / (0.5 * 2 + 0.5 * 6), abs=EXACT)
    # One pair of the three agrees ({0,1}); {0,2} and {1,2} are apart in seg only.
    assert got["rand_index"] == pytest.approx(1 / 3, abs=EXACT)
    # H(seg | gt): the one body splits 2 : 1; H(gt | seg) = 0 (no segment spans two bodies).
    split = -(2 / 3 * np.log2(2 / 3) + 1 / 3 * np.log2(1 / 3))
    assert got["voi_split"] == pytest.approx(split, abs=EXACT)
    assert got["voi_merge"] == pytest.approx(0.0, abs=EXACT)
    assert got["voi"] == pytest.approx(split, abs=EXACT)
    # Segment 2 counts although one of its voxels lies on ignored ground truth.
    assert got["segments"] == 2


@pytest.mark.parametrize("big_ids", [False, True])
@pytest.mark.parametrize("block", [(7, 19, 23), (3, 8, 5), (2, 19, 7)])
def test_blockwise_scores_equal_whole_array_scores(block, big_ids):
    seg, gt = _random_pair(3, big_ids)
    expected = _whole_array_scores(seg, gt)
    # The scores bite: neither perfect nor meaningless.
    assert 0.05 < expected["adapted_rand_error"] < 0.95
    assert expected["voi_split"] > 0.05 and expected["voi_merge"] > 0.05
    _assert_equal_scores(segmentation_scores(seg, gt, block_shape=block), expected)


def test_segment_zero_is_an_ordinary_segment_and_signed_labels_work():
    seg, gt = _random_pair(5, big_ids=False)
    seg = seg.astype(np.int64) - 3  # labels -3.., 0 among them
    assert (seg == 0).any() and (seg < 0).any()
    expected = _whole_array_scores(seg, gt.astype(np.int32))
    got = segmentation_scores(seg, gt.astype(np.int32), block_shape=(4, 10, 10))
    _assert_equal_scores(got, expected)


def test_rand_index_equals_scikit_learn_rand_score_on_the_kept_voxels():
    seg, gt = _random_pair(7, big_ids=False)
    kept = gt != 0
    expected = rand_score(gt[kept], seg[kept])
    assert 0.5 < expected < 1.0
    assert rand_index(seg, gt) == pytest.approx(expected, abs=EXACT)
    assert segmentation_scores(seg, gt, block_shape=5)["rand_index"] == pytest.approx(
        expected, abs=EXACT
    )


def test_volumes_on_disk_are_read_block_by_block(tmp_path):
    seg, gt = _random_pair(9, big_ids=True)
    volumes = {}
    for name, array in (("seg", seg), ("gt", gt)):
        volumes[name] = create_volume(
            str(tmp_path / f"{name}.zarr"), array.shape, np.uint64, chunks=(3, 8, 8)
        )
        volumes[name][...] = array
    got = segmentation_scores(
        open_volume(str(tmp_path / "seg.zarr")), open_volume(str(tmp_path / "gt.zarr")), (3, 8, 8)
    )
    _assert_equal_scores(got, _whole_array_scores(seg, gt))


def test_bad_inputs_are_one_line_errors():
    seg, gt = _random_pair(1, big_ids=False)
    with pytest.raises(DataError, match="expected 3D volumes of one shape"):
        segmentation_scores(seg[:, :, :-1], gt)
    with pytest.raises(DataError, match="ground truth labels must be integers"):
        segmentation_scores(seg, gt.astype(np.float32))
    with pytest.raises(DataError, match="fewer than two voxels"):
        segmentation_scores(seg, np.zeros_like(gt))


def test_fib25_test_part_reproduces_the_recorded_figures(shared_data):
    """The file's over-segmentation on the FIB-25 test part (z >= 150), as metrics.json has it."""
    recorded = json.loads((REPO_ROOT / "results" / "fib25" / "metrics.json").read_text())
    with h5py.File(shared_data / "fib-medulla-250.h5", "r") as f:
        gt = f["volumes/labels/neuron_ids"][150:250]
        over = f["volumes/labels/oversegmentation"][150:250]
    got = segmentation_scores(over, gt, block_shape=(32, 96, 128))
    _assert_equal_scores(got, _whole_array_scores(over, gt))
    for key, value in recorded["oversegmentation"].items():
        assert got[key] == pytest.approx(value, abs=EXACT, rel=0), key
