"""The one world-to-voxel rule (`synjax.io.voxels`), with hand-computed voxels."""

import numpy as np
import pytest

from synjax.errors import DataError
from synjax.io import voxels
from synjax.io.volumes import create_volume

RES = (40.0, 4.0, 4.0)


def test_halves_round_up():
    # (20, 2, 6) nm = (0.5, 0.5, 1.5) voxels -> (1, 1, 2); np.round would give
    # (0, 0, 2) (half to even).
    np.testing.assert_array_equal(voxels.world_to_voxel([20.0, 2.0, 6.0], RES), [1, 1, 2])
    # (-0.5, -0.5, -1.5) voxels -> (0, 0, -1): up, not away from zero.
    np.testing.assert_array_equal(voxels.world_to_voxel([-20.0, -2.0, -6.0], RES), [0, 0, -1])
    # Just below a half stays down; just above goes up.
    np.testing.assert_array_equal(
        voxels.world_to_voxel([[19.9, 1.99, 5.99], [20.1, 2.01, 6.01]], RES),
        [[0, 0, 1], [1, 1, 2]],
    )


def test_negative_offset():
    # Offset (-100, -10, -2) nm: the origin is (2.5, 2.5, 0.5) voxels -> (3, 3, 1).
    offset = (-100.0, -10.0, -2.0)
    np.testing.assert_array_equal(voxels.world_to_voxel([0.0, 0.0, 0.0], RES, offset), [3, 3, 1])
    # (-120, -12, -4) nm is (-0.5, -0.5, -0.5) voxels -> voxel 0 on every axis.
    np.testing.assert_array_equal(
        voxels.world_to_voxel([-120.0, -12.0, -4.0], RES, offset), [0, 0, 0]
    )


def test_whole_voxel_shifts_shift_indices():
    # Half-way positions on both sides of 0: moving the offset by k voxels
    # moves every index by exactly k (half to even would not: 2.5 -> 2, 3.5 -> 4).
    locations = np.array([[-60.0, -6.0, -2.0], [20.0, 2.0, 10.0], [100.0, 10.0, 14.0]])
    base = voxels.world_to_voxel(locations, RES)
    for k in (-3, -1, 1, 2):
        shifted = voxels.world_to_voxel(locations, RES, offset=np.multiply(RES, -k))
        np.testing.assert_array_equal(shifted, base + k)


def test_nearest_voxel_of_fractional_positions():
    np.testing.assert_array_equal(
        voxels.nearest_voxel([[0.5, 1.5, 2.5], [-0.5, -1.5, -2.4999]]), [[1, 2, 3], [0, -1, -2]]
    )


def test_segment_ids_at_and_outside():
    seg = np.arange(2 * 3 * 4, dtype=np.uint64).reshape(2, 3, 4)
    locations = [
        [20.0, 2.0, 6.0],  # voxel (1, 1, 2): 1*12 + 1*4 + 2 = 18
        [0.0, 0.0, 0.0],  # voxel (0, 0, 0): 0
        [60.0, 0.0, 0.0],  # z 1.5 -> 2: outside
        [0.0, -2.0, 0.0],  # y -0.5 -> 0: inside, 0
        [0.0, -2.1, 0.0],  # y -0.525 -> -1: outside
    ]
    got = voxels.segment_ids_at(seg, locations, RES, outside=99)
    assert got.dtype == np.uint64
    np.testing.assert_array_equal(got, [18, 0, 99, 0, 99])
    np.testing.assert_array_equal(
        voxels.inside_volume(voxels.world_to_voxel(locations, RES), seg.shape),
        [True, True, False, True, False],
    )
    # With an offset of one voxel in x, (20, 2, 10) nm is voxel (1, 1, 2) again.
    np.testing.assert_array_equal(
        voxels.segment_ids_at(seg, [[20.0, 2.0, 10.0]], RES, offset=(0.0, 0.0, 4.0)), [18]
    )


def test_volume_uses_the_same_rule(tmp_path):
    volume = create_volume(str(tmp_path / "v.zarr"), (2, 3, 4), np.uint8, RES, offset=(0, 0, -2))
    # x: (6 - -2) / 4 = 2.0; y: 2 / 4 = 0.5 -> 1; z: 20 / 40 = 0.5 -> 1.
    np.testing.assert_array_equal(volume.world_to_voxel([20.0, 2.0, 6.0]), [1, 1, 2])
    np.testing.assert_array_equal(
        volume.world_to_voxel([20.0, 2.0, 6.0]),
        voxels.world_to_voxel([20.0, 2.0, 6.0], RES, (0.0, 0.0, -2.0)),
    )


def test_bad_geometry_is_one_line():
    with pytest.raises(DataError, match="expected"):
        voxels.world_to_voxel([[1.0, 2.0]], RES)
    with pytest.raises(DataError, match="positive"):
        voxels.world_to_voxel([1.0, 2.0, 3.0], (40.0, 0.0, 4.0))
