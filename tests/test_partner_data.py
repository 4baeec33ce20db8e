"""The partner pipeline's ground truth: a CREMI cleft 0 keeps its pairs and target."""

import numpy as np
from ml_collections import config_dict

from synjax.evaluation.partners import NO_CLEFT
from synjax.io.cremi_volume import (
    CREMI_BACKGROUND,
    POSTSYNAPTIC_SITE,
    PRESYNAPTIC_SITE,
    Annotations,
    CremiVolume,
)
from synjax.pipelines import partner_data

RES = (40.0, 4.0, 4.0)
SHAPE = (2, 12, 16)
CONFIG = config_dict.ConfigDict({"targets": {"alpha": 5.0, "sigma": 10.0, "radius_nm": 12.0}})


def _two_synapses(first_cleft: int) -> CremiVolume:
    """Neurons 1 | 2 (rows y < 6) and 3 | 4 (rows y >= 6), split at x = 8.

    Synapse 1 -> 2 has cleft `first_cleft` on its interface (y 1..3, x 7..8),
    synapse 3 -> 4 has cleft 4 (y 8..10, x 7..8). Each site lies 4 voxels
    from its interface, nearest its own cleft.
    """
    neurons = np.ones(SHAPE, np.uint64)
    neurons[:, :6, 8:] = 2
    neurons[:, 6:, :8] = 3
    neurons[:, 6:, 8:] = 4
    clefts = np.full(SHAPE, CREMI_BACKGROUND, np.uint64)
    clefts[:, 1:4, 7:9] = first_cleft
    clefts[:, 8:11, 7:9] = 4
    sites_voxels = np.array([[0, 2, 3], [0, 2, 12], [0, 9, 3], [0, 9, 12]], np.float64)
    annotations = Annotations(
        ids=np.array([10, 11, 20, 21], np.uint64),
        locations=sites_voxels * RES,
        types=np.array([PRESYNAPTIC_SITE, POSTSYNAPTIC_SITE] * 2, dtype=object),
        partners=np.array([[10, 11], [20, 21]], np.uint64),
    )
    raw = np.zeros(SHAPE, np.uint8)
    return CremiVolume(raw, RES, (0.0, 0.0, 0.0), neurons, clefts, annotations)


def test_cleft_zero_keeps_its_pairs_and_target():
    zero = partner_data._from_cremi("train", _two_synapses(first_cleft=0))
    # Cleft 0 is renumbered max + 1 = 5 in the cleft instances; its pair follows.
    assert set(np.unique(zero.clefts).tolist()) == {0, 4, 5}
    np.testing.assert_array_equal(zero.pairs, [[5, 1, 2], [4, 3, 4]])
    np.testing.assert_array_equal(zero.truth_clefts, [5, 4])

    targets = partner_data.proximity_targets(zero, CONFIG)
    # The first synapse has a target: pre voxels of neuron 1, post of neuron 2.
    near_first = np.zeros(SHAPE, bool)
    near_first[:, :6] = True
    assert (targets["synaptic"] & near_first & (zero.neuron_ids == 1)).any()
    assert (targets["synaptic"] & near_first & (zero.neuron_ids == 2)).any()
    assert (targets["target"][near_first & (zero.neuron_ids == 1)] > 0).any()
    assert (targets["target"][near_first & (zero.neuron_ids == 2)] < 0).any()

    # Reference: the same volume with that cleft stored as 5 from the start.
    five = partner_data._from_cremi("train", _two_synapses(first_cleft=5))
    np.testing.assert_array_equal(five.clefts, zero.clefts)
    np.testing.assert_array_equal(five.pairs, zero.pairs)
    reference = partner_data.proximity_targets(five, CONFIG)
    for key in ("target", "weight", "synaptic"):
        np.testing.assert_array_equal(targets[key], reference[key], err_msg=key)


def test_truth_clefts_follow_truth_rows():
    # Partners listed 3 -> 4 first: truth rows and their clefts stay together.
    volume = _two_synapses(first_cleft=7)
    volume.annotations.partners = np.array([[20, 21], [10, 11]], np.uint64)
    got = partner_data._from_cremi("test", volume)
    np.testing.assert_array_equal(got.truth.pre_ids, [3, 1])
    np.testing.assert_array_equal(got.truth_clefts, [4, 7])
    assert NO_CLEFT not in got.truth_clefts
