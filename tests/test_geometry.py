"""The one box type and triple parser (`synjax.geometry`), with hand-computed boxes."""

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box, read_padded, reflect_indices, spatial_triple, voxel_size


def test_box_shape_slices_and_unpacking():
    box = Box((1, 2, 3), (4, 6, 3))
    assert box.shape == (3, 4, 0) and box.size == 0 and box.is_empty()
    assert box.slices() == (slice(1, 4), slice(2, 6), slice(3, 3))
    start, stop = Box.at((1, 2, 3), (2, 2, 2))
    assert (start, stop) == ((1, 2, 3), (3, 4, 5))
    assert Box.from_shape((5, 6, 7)) == Box((0, 0, 0), (5, 6, 7))
    assert Box.from_slices((slice(2, 9), slice(0, 1))) == Box((2, 0), (9, 1))
    # numpy integers become Python ints, so boxes compare and hash as tuples do.
    assert Box(np.array([1, 2]), np.array([3, 4])) == Box((1, 2), (3, 4))
    with pytest.raises(DataError, match="stop >= start"):
        Box((0, 5), (1, 4))


def test_intersect_pad_shift_relative():
    a = Box((0, 0, 0), (4, 6, 8))
    b = Box((-2, 3, 5), (2, 10, 6))
    assert a.intersect(b) == Box((0, 3, 5), (2, 6, 6))
    # Boxes that do not meet give an empty box at the nearer corner.
    far = Box((5, 0, 0), (7, 1, 1))
    assert a.intersect(far) == Box((5, 0, 0), (5, 1, 1)) and a.intersect(far).is_empty()
    assert a.pad((1, 0, 2)) == Box((-1, 0, -2), (5, 6, 10))
    assert a.pad(1) == Box((-1, -1, -1), (5, 7, 9))
    assert b.shift((2, -3, 0)) == Box((0, 0, 5), (4, 7, 6))
    assert a.intersect(b).relative_to(b) == Box((2, 0, 0), (4, 3, 1))


def test_nm_round_trip():
    box = Box.at((2, 10, 20), (3, 4, 5))
    start_nm, stop_nm = box.to_nm((40.0, 4.0, 4.0), offset=(100.0, 0.0, 8.0))
    np.testing.assert_array_equal(start_nm, [180.0, 40.0, 88.0])
    np.testing.assert_array_equal(stop_nm, [300.0, 56.0, 108.0])
    back = Box.from_nm(start_nm, box.shape, (40.0, 4.0, 4.0), offset=(100.0, 0.0, 8.0))
    assert back == box
    with pytest.raises(DataError, match="voxel grid"):
        Box.from_nm((190.0, 40.0, 88.0), (1, 1, 1), (40.0, 4.0, 4.0), offset=(100.0, 0.0, 8.0))


def test_spatial_triple():
    assert spatial_triple([1, 2, 3], "kernel") == (1, 2, 3)
    assert spatial_triple(np.array([0, 0, 1]), "context", minimum=0) == (0, 0, 1)
    assert spatial_triple(4, "block", broadcast=True) == (4, 4, 4)
    for bad in ((1, 2), (1, 0, 1), 4, "abc"):
        with pytest.raises(ConfigError, match="kernel=.*expected three integers >= 1"):
            spatial_triple(bad, "kernel")


def test_reflect_and_read_padded_by_hand():
    np.testing.assert_array_equal(
        reflect_indices(np.array([-2, -1, 0, 3, 4, 5, 7]), 4), [2, 1, 0, 3, 2, 1, 1]
    )
    vol = np.arange(12, dtype=np.int16).reshape(3, 2, 2)
    got = read_padded(vol, Box((-1, 0, 1), (2, 2, 3)), "zero")
    assert got.dtype == np.int16 and got.shape == (3, 2, 2)
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_array_equal(got[1:, :, 0], vol[:2, :, 1])
    np.testing.assert_array_equal(got[1:, :, 1], 0)
    np.testing.assert_array_equal(
        read_padded(vol, Box((-1, 0, 0), (4, 1, 1)), "edge")[:, 0, 0], [0, 0, 4, 8, 8]
    )
    with pytest.raises(ConfigError, match="pad_mode"):
        read_padded(vol, Box((0, 0, 0), (1, 1, 1)), "wrap")


def test_bounding_box_and_voxel_size():
    voxels = np.array([[2, 5, 1], [4, 3, 7]])
    assert Box.bounding(voxels) == Box((2, 3, 1), (5, 6, 8))
    np.testing.assert_array_equal(voxel_size((40, 4, 4)), [40.0, 4.0, 4.0])
    assert voxel_size([8.0, 8.0, 8.0]).dtype == np.float64
    for bad in ((4.0, 4.0), (40.0, 0.0, 4.0), (40.0, float("nan"), 4.0), "abc"):
        with pytest.raises(ConfigError, match="config.data.resolution=.*three positive sizes"):
            voxel_size(bad, "config.data.resolution")
