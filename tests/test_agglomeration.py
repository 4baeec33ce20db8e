"""Tests of synjax.postprocess.agglomeration with hand-computed contact means."""

import networkx as nx
import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.evaluation.rand_voi import adapted_rand_error
from synjax.postprocess.agglomeration import (
    _mean_of_contacts,
    agglomerate,
    region_graph,
)
from synjax.postprocess.watershed import grid_search

# A row of three regions along x: labels 1 1 2 2 3 3.
ROW_LABELS = np.array([1, 1, 2, 2, 3, 3])
# Boundary values: contact 1|2 sees x = 1, 2 -> mean(0.1, 0.3) = 0.2;
# contact 2|3 sees x = 3, 4 -> mean(0.7, 0.9) = 0.8.
ROW_BOUNDARY = np.array([0.0, 0.1, 0.3, 0.7, 0.9, 0.0])
WEAK, STRONG = 0.2, 0.8


def _row(depth=1, height=1):
    """The row repeated over [depth, height, 6] so every voxel pair is a face contact."""
    shape = (depth, height, ROW_LABELS.size)
    return (
        np.broadcast_to(ROW_LABELS, shape).copy(),
        np.broadcast_to(ROW_BOUNDARY, shape).copy(),
    )


def test_region_graph_means_and_counts():
    labels, boundary = _row(depth=2, height=3)
    rag = region_graph(labels, boundary)
    assert sorted(rag.nodes) == [1, 2, 3]
    assert sorted(tuple(sorted(e)) for e in rag.edges) == [(1, 2), (2, 3)]
    assert rag[1][2]["weight"] == pytest.approx(WEAK)
    assert rag[2][3]["weight"] == pytest.approx(STRONG)
    # Two voxels each side per (z, y) line: 2 x 2 x 3.
    assert rag[1][2]["count"] == 12


@pytest.mark.parametrize(
    "threshold, expected",
    [
        (0.1, [1, 1, 2, 2, 3, 3]),  # below both contacts: nothing merges
        (0.5, [1, 1, 1, 1, 2, 2]),  # only the weak contact merges
        (0.9, [1, 1, 1, 1, 1, 1]),  # both merge
    ],
)
def test_threshold_decides_merges(threshold, expected):
    labels, boundary = _row()
    merged = agglomerate(labels, boundary, threshold)
    assert merged.dtype == np.uint64
    np.testing.assert_array_equal(merged[0, 0], expected)


def test_background_never_merges_and_stays_zero():
    labels, boundary = _row()
    labels[..., 2:4] = 0  # region 2 becomes background between 1 and 3
    merged = agglomerate(labels, boundary, threshold=1.0)
    np.testing.assert_array_equal(merged[0, 0], [1, 1, 0, 0, 2, 2])


@pytest.mark.parametrize("label", [0, 4])
def test_single_region_is_returned_as_it_is(label):
    labels = np.full((2, 3, 4), label)
    merged = agglomerate(labels, np.zeros(labels.shape), threshold=0.5)
    np.testing.assert_array_equal(merged, np.where(labels > 0, 1, 0))


def test_merged_contact_is_count_weighted_mean():
    # Region 3 touches 1 with 2 voxels at 0.9 and 2 with 6 voxels at 0.1:
    # after 1 and 2 merge, its contact is (2 * 0.9 + 6 * 0.1) / 8 = 0.3.
    graph = nx.Graph()
    graph.add_edge(1, 3, weight=0.9, count=2)
    graph.add_edge(2, 3, weight=0.1, count=6)
    merged = _mean_of_contacts(graph, 1, 2, 3)
    assert merged["count"] == 8
    assert merged["weight"] == pytest.approx(0.3)
    # A neighbour of only one of the two keeps its own contact.
    graph.add_edge(1, 4, weight=0.6, count=5)
    assert _mean_of_contacts(graph, 1, 2, 4) == {"weight": pytest.approx(0.6), "count": 5}


def test_weak_false_wall_merges_where_a_strong_membrane_does_not():
    # Two neurons (x < 10, x >= 10) split by a membrane at 0.9; the left one is
    # cut in two by a faint false wall at 0.3 (an organelle rim).
    shape = (4, 6, 20)
    gt = np.ones(shape, np.uint64)
    gt[..., 10:] = 2
    over = gt.copy()
    over[..., 5:10] = 3
    boundary = np.full(shape, 0.05)
    boundary[..., 4:6] = 0.3
    boundary[..., 9:11] = 0.9
    assert adapted_rand_error(over, gt).error > 0.1
    merged = agglomerate(over, boundary, threshold=0.5)
    assert adapted_rand_error(merged, gt).error == 0.0


def test_grid_search_tunes_threshold():
    # Three basins at 0 along x: A (x 0-1), B (x 3-4), C (x 6-7), split by a
    # faint wall at x = 2 (0.3) and a membrane at x = 5 (0.9). A and B are one
    # neuron; the membrane voxel belongs to neither (gt 0).
    profile = np.array([0.0, 0.0, 0.3, 0.0, 0.0, 0.9, 0.0, 0.0])
    boundary = np.broadcast_to(profile, (2, 2, profile.size)).copy()
    gt = np.broadcast_to(np.array([1, 1, 1, 1, 1, 0, 2, 2], np.uint64), boundary.shape).copy()
    # h 0.05 seeds all three basins; each contact's mean takes its wall voxel
    # and the basin voxel beside it: about 0.15 for A|B, 0.45 for B|C.
    _, _, table = grid_search(
        boundary,
        gt,
        (0.0,),
        (0.05,),
        metric=adapted_rand_error,
        thresholds=(0.1, 0.3, 0.9),
        rescale=False,
    )
    assert [row.threshold for row in table] == [0.1, 0.3, 0.9]
    best = min(table, key=lambda row: row.score)
    assert best.threshold == 0.3 and best.score == 0.0
    assert table[0].score > 0.0 and table[2].score > 0.0


def test_bad_arguments():
    labels, boundary = _row()
    with pytest.raises(ConfigError, match="threshold"):
        agglomerate(labels, boundary, threshold=1.5)
    with pytest.raises(DataError, match="same shape|one shape"):
        agglomerate(labels, boundary[..., :3], threshold=0.5)
