"""The partner pipeline's evaluate step on a hand-made workdir.

Two synapses, 1 -> 2 (cleft 5) and 3 -> 4 (cleft 4); three candidates: two
of 1 -> 2 on the same sites (duplicate suppression kept the better one) and
one of 3 -> 4 that the pruner scored below its threshold.
"""

import json

import numpy as np
import pytest
from ml_collections import config_dict

from synjax.errors import DataError
from synjax.evaluation.partners import PartnerPairs
from synjax.io import SynapseTable, create_volume
from synjax.pipelines import partners
from synjax.pipelines.partner_data import PartnerVolume
from synjax.report import files

RES = np.array([40.0, 4.0, 4.0])
SHAPE = (2, 12, 16)
CONFIG = config_dict.ConfigDict(
    {
        "evaluation": {"cremi_distance_nm": 400.0, "same_ids_distance_nm": 400.0},
        "candidates": {"tau": 0.3},
        "segmentation": {"source": "groundtruth"},
    }
)


def _volume() -> PartnerVolume:
    neurons = np.ones(SHAPE, np.uint64)
    neurons[:, :6, 8:] = 2
    neurons[:, 6:, :8] = 3
    neurons[:, 6:, 8:] = 4
    clefts = np.zeros(SHAPE, np.uint64)
    clefts[:, 1:4, 7:9] = 5
    clefts[:, 8:11, 7:9] = 4
    pre = np.array([[0, 2, 3], [0, 9, 3]]) * RES
    post = np.array([[0, 2, 12], [0, 9, 12]]) * RES
    return PartnerVolume(
        name="test",
        raw=np.zeros(SHAPE, np.uint8),
        neuron_ids=neurons,
        clefts=clefts,
        resolution=tuple(RES),
        pairs=np.array([[5, 1, 2], [4, 3, 4]]),
        truth=PartnerPairs([1, 3], [2, 4], pre, post),
        truth_clefts=np.array([5, 4]),
        n_polyadic=0,
    )


def _table(rows) -> SynapseTable:
    """rows: (pre segment, post segment, pre voxel, post voxel, score)."""
    pre = np.array([r[2] for r in rows], np.float64) * RES
    post = np.array([r[3] for r in rows], np.float64) * RES
    return SynapseTable.build(
        [r[0] for r in rows],
        [r[1] for r in rows],
        0.5 * (pre + post),
        pre_location=pre,
        post_location=post,
        score=[r[4] for r in rows],
    )


BEST = (1, 2, (0, 2, 6), (0, 2, 9), 0.9)
DUPLICATE = (1, 2, (1, 1, 5), (1, 1, 10), 0.5)
LOW = (3, 4, (0, 9, 6), (0, 9, 9), 0.2)


def _workdir(tmp_path, candidates=(BEST, DUPLICATE, LOW), detections=(BEST, LOW)):
    # Pre sites (p > 0.3) beside each cleft (x 7..8) in neurons 1 and 3, post
    # sites (p < -0.3) in neurons 2 and 4; 0 on the clefts, as in the target.
    prox = np.zeros(SHAPE, np.float32)
    for rows in (slice(1, 4), slice(8, 11)):
        prox[:, rows, 4:7] = 0.9
        prox[:, rows, 9:12] = -0.9
    out = create_volume(str(tmp_path / "predictions" / "proximity.zarr"), SHAPE, np.float32, RES)
    out[...] = prox
    _table(candidates).to_csv(tmp_path / partners.CANDIDATES_FILE)
    _table(detections).to_csv(tmp_path / partners.DETECTIONS_FILE)
    files.write_json(tmp_path / partners.THRESHOLD_FILE, {"pruner": True, "threshold": 0.4})
    return tmp_path


def test_evaluate_scores_every_candidate_without_pruning(tmp_path):
    metrics = partners.evaluate(CONFIG, _workdir(tmp_path), _volume())
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["candidates"], metrics["detections"], metrics["truth_pairs"]) == (3, 2, 2)

    def counts(key):
        return tuple(metrics[key][k] for k in ("tp", "fp", "fn"))

    # Kept (score >= 0.4): only BEST, which finds 1 -> 2 by every rule.
    assert counts("cremi_partners") == (1, 0, 1)
    assert counts("paper_criterion") == (1, 0, 1)
    assert counts("same_ids_within_400nm") == (1, 0, 1)
    # No pruning: all three candidates, the duplicate included (a false
    # positive), not the two that duplicate suppression left.
    assert counts("without_pruning") == (2, 1, 0)
    assert counts("without_pruning_paper_criterion") == (2, 1, 0)
    assert metrics["truth_pairs_without_cleft"] == 0


def test_paper_criterion_in_evaluate_needs_the_cleft(tmp_path):
    # The truth pair 1 -> 2 now belongs to a cleft 9 that BEST's sites do not
    # touch (they border cleft 5): the distance-based rules still accept
    # BEST, the paper's criterion does not.
    volume = _volume()
    volume.truth_clefts = np.array([9, 4])
    metrics = partners.evaluate(CONFIG, _workdir(tmp_path), volume)
    assert metrics["cremi_partners"]["tp"] == 1
    assert metrics["same_ids_within_400nm"]["tp"] == 1
    assert (metrics["paper_criterion"]["tp"], metrics["paper_criterion"]["fp"]) == (0, 1)


def test_site_outside_its_component_is_a_data_error(tmp_path):
    # A pre point in neuron 1 but outside every p > tau component: the
    # detections do not belong to this proximity map.
    stray = (1, 2, (0, 5, 0), (0, 2, 8), 0.9)
    workdir = _workdir(tmp_path, candidates=(stray,), detections=(stray,))
    with pytest.raises(DataError, match="detections.csv: a site point is not in its"):
        partners.evaluate(CONFIG, workdir, _volume())
