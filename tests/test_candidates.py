"""Candidate generation on a hand-built volume with hand-placed +/- blobs."""

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.postprocess import candidates as cand

RESOLUTION = (40.0, 8.0, 8.0)
SHAPE = (4, 100, 40)
PRE, POST = 0.9, -0.9
STRADDLE = 0.8


def _volume():
    """Segments along x: 1 | 2 | 3 | membrane (0) | 4; blobs as in the comments."""
    seg = np.zeros(SHAPE, np.uint64)
    seg[:, :, 0:10] = 1
    seg[:, :, 10:20] = 2
    seg[:, :, 20:30] = 3
    seg[:, :, 31:40] = 4  # x = 30 stays 0, so segments 3 and 4 never touch.
    p = np.zeros(SHAPE, np.float32)
    p[:, 4:9, 6:10] = PRE  # A: pre on segment 1, 80 voxels.
    p[:, 4:9, 10:14] = POST  # B: post on segment 2 -> candidate (1, 2).
    p[0, 4:9, 20:24] = PRE  # U: pre on segment 3, only 20 voxels (< omega).
    p[:, 40:45, 16:24] = STRADDLE  # S: pre on segments 2 and 3, 80 voxels each.
    p[:, 46:51, 16:20] = -STRADDLE  # T: post on segment 2 -> (3, 2); (2, 2) is one cell.
    p[:, 80:85, 26:30] = PRE  # C: pre on segment 3.
    p[:, 80:85, 31:35] = POST  # D: post on segment 4, which does not touch 3.
    return p, seg


def test_expected_pairs_only():
    p, seg = _volume()
    got = cand.generate_candidates(p, seg, RESOLUTION, tau=0.3, omega=30)
    assert [tuple(r) for r in got.pairs().tolist()] == [(1, 2), (3, 2)]
    np.testing.assert_array_equal(got.pre_overlap, [80, 80])
    np.testing.assert_array_equal(got.post_overlap, [80, 80])
    # A-B: first closest pair in raster order is (0, 4, 9) -> (0, 4, 10).
    np.testing.assert_array_equal(got.pre_point[0], [0, 4, 9])
    np.testing.assert_array_equal(got.post_point[0], [0, 4, 10])
    np.testing.assert_allclose(got.location[0], [0.0, 4 * 8.0, 9.5 * 8.0])
    np.testing.assert_allclose(got.gap_nm[0], 8.0)
    np.testing.assert_allclose(got.score[0], PRE, rtol=1e-6)
    # S (segment 3 part) - T: (0, 44, 20) -> (0, 46, 19), sqrt(16^2 + 8^2) nm.
    np.testing.assert_array_equal(got.pre_point[1], [0, 44, 20])
    np.testing.assert_array_equal(got.post_point[1], [0, 46, 19])
    np.testing.assert_allclose(got.location[1], [0.0, 45 * 8.0, 19.5 * 8.0])
    np.testing.assert_allclose(got.gap_nm[1], np.hypot(16.0, 8.0))
    np.testing.assert_allclose(got.score[1], STRADDLE, rtol=1e-6)
    # Both rows' components are the blobs they were built from.
    assert got.pre_component[0] != got.pre_component[1]
    assert got.post_component[0] != got.post_component[1]


def test_small_omega_admits_small_site():
    p, seg = _volume()
    got = cand.generate_candidates(p, seg, RESOLUTION, tau=0.3, omega=10)
    pairs = [tuple(r) for r in got.pairs().tolist()]
    # U (segment 3, 20 voxels) now pairs with B on segment 2, 7 voxels away in x.
    assert pairs == [(1, 2), (3, 2), (3, 2)]
    u_row = int(np.argmax(got.pre_overlap == 20))
    assert got.pre_overlap[u_row] == 20
    np.testing.assert_allclose(got.gap_nm[u_row], 7 * 8.0)


def test_max_gap_excludes_far_sites():
    p, seg = _volume()
    got = cand.generate_candidates(p, seg, RESOLUTION, tau=0.3, omega=30, max_gap_nm=7.0)
    assert len(got) == 0
    assert got.location.shape == (0, 3)


def test_tau_above_blobs_gives_nothing():
    p, seg = _volume()
    assert len(cand.generate_candidates(p, seg, RESOLUTION, tau=0.95, omega=1)) == 0


def test_segment_adjacency_by_faces():
    seg = np.zeros((1, 3, 3), np.uint64)
    seg[0, 0, 0] = 1
    seg[0, 0, 1] = 2
    seg[0, 1, 1] = 3  # touches 2 by a face, 1 only by an edge (diagonal).
    seg[0, 2, 2] = 4  # touches nothing: 0 all round.
    got = cand.segment_adjacency(seg).tolist()
    assert got == [[1, 2], [2, 1], [2, 3], [3, 2]]


def test_component_segment_overlaps_counts():
    comps = np.array([[[1, 1, 1, 2, 0]]])
    seg = np.array([[[5, 5, 6, 6, 6]]])
    got = cand.component_segment_overlaps(comps, seg, omega=1).tolist()
    assert got == [[1, 5, 2], [1, 6, 1], [2, 6, 1]]
    assert cand.component_segment_overlaps(comps, seg, omega=2).tolist() == [[1, 5, 2]]


def test_select_rows():
    p, seg = _volume()
    got = cand.generate_candidates(p, seg, RESOLUTION, omega=30)
    sub = got.select(np.array([False, True]))
    assert len(sub) == 1 and sub.pre_segment[0] == 3


def test_bad_input_raises():
    p, seg = _volume()
    with pytest.raises(DataError, match="expected two 3D volumes"):
        cand.generate_candidates(p[0], seg, RESOLUTION)
    with pytest.raises(ConfigError, match="connectivity"):
        cand.generate_candidates(p, seg, RESOLUTION, connectivity=8)
    with pytest.raises(ConfigError, match="resolution"):
        cand.generate_candidates(p, seg, (1.0, 1.0))


def test_large_segment_ids_survive():
    p, seg = _volume()
    big = np.uint64(2**40)
    got = cand.generate_candidates(p, np.where(seg > 0, seg + big, 0), RESOLUTION, omega=30)
    assert [tuple(r) for r in got.pairs().tolist()] == [
        (1 + 2**40, 2 + 2**40),
        (3 + 2**40, 2 + 2**40),
    ]
    adj = cand.segment_adjacency(np.array([[[big, 7, 0, 9]]], np.uint64)).tolist()
    assert adj == [[7, 2**40], [2**40, 7]]
