"""Tests of the block grid (tiling, input boxes) and padded reads outside a volume."""

import numpy as np
import pytest

from synjax.errors import ConfigError
from synjax.geometry import Box, read_padded
from synjax.inference.block_grid import BlockGrid

NUMPY_PAD = {"reflect": "reflect", "edge": "edge", "zero": "constant"}


def _volume(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_grid_covers_every_voxel_once_with_cropped_last_blocks():
    grid = BlockGrid((5, 7, 4), (2, 3, 4))
    assert grid.grid_shape == (3, 3, 1)
    assert grid.num_blocks == 9
    assert grid.output_box(1) == (slice(0, 2), slice(3, 6), slice(0, 4))
    # Last block: index (2, 2, 0), cropped to the volume end.
    assert grid.block_index(8) == (2, 2, 0)
    assert grid.output_box(8) == (slice(4, 5), slice(6, 7), slice(0, 4))
    assert grid.output_crop(8) == (slice(0, 1), slice(0, 1), slice(0, 4))
    count = np.zeros(grid.volume_shape, np.int32)
    for i in grid.block_ids():
        count[grid.output_box(i)] += 1
    np.testing.assert_array_equal(count, 1)


def test_input_boxes_by_hand():
    grid = BlockGrid((5, 7, 4), (2, 3, 4), context=(1, 2, 0))
    assert grid.input_shape == (4, 7, 4)
    start, stop = grid.input_box(4)  # index (1, 1, 0): output start (2, 3, 0)
    np.testing.assert_array_equal(start, (1, 1, 0))
    np.testing.assert_array_equal(stop, (5, 8, 4))
    start, stop = grid.input_box(0)
    np.testing.assert_array_equal(start, (-1, -2, 0))
    np.testing.assert_array_equal(stop, (3, 5, 4))


def test_from_io_shapes_and_bad_settings():
    grid = BlockGrid.from_io_shapes((20, 30, 30), (10, 12, 12), (8, 8, 8))
    assert grid.context == (1, 2, 2)
    assert grid.block_shape == (8, 8, 8)
    with pytest.raises(ConfigError, match="even"):
        BlockGrid.from_io_shapes((20, 30, 30), (10, 12, 11), (8, 8, 8))
    with pytest.raises(ConfigError, match="pad_mode"):
        BlockGrid((4, 4, 4), 2, pad_mode="wrap")
    with pytest.raises(ConfigError, match="block_shape"):
        BlockGrid((4, 4, 4), (2, 0, 2))
    with pytest.raises(ConfigError, match="block id"):
        BlockGrid((4, 4, 4), 2).output_box(8)


def test_read_padded_one_axis_by_hand():
    vol = np.arange(4, dtype=np.int16).reshape(4, 1, 1)
    expected = {
        "reflect": [2, 1, 0, 1, 2, 3, 2, 1],
        "edge": [0, 0, 0, 1, 2, 3, 3, 3],
        "zero": [0, 0, 0, 1, 2, 3, 0, 0],
    }
    for mode, values in expected.items():
        got = read_padded(vol, Box((-2, 0, 0), (6, 1, 1)), mode)
        assert got.dtype == np.int16
        np.testing.assert_array_equal(got[:, 0, 0], values, err_msg=mode)
    # A pad wider than the volume keeps mirroring: [0 1 2] -> ... 1 0 1 2 1 0 ...
    small = np.arange(3).reshape(3, 1, 1)
    got = read_padded(small, Box((-5, 0, 0), (5, 1, 1)), "reflect")[:, 0, 0]
    np.testing.assert_array_equal(got, [1, 0, 1, 2, 1, 0, 1, 2, 1, 0])


@pytest.mark.parametrize("mode", ["reflect", "edge", "zero"])
def test_read_padded_matches_numpy_pad(mode):
    vol = _volume((6, 7, 8))[..., None].repeat(2, axis=-1)  # with a channel axis
    pad = 3
    padded = np.pad(vol, [(pad, pad)] * 3 + [(0, 0)], mode=NUMPY_PAD[mode])
    for start, stop in [
        ((-3, -1, 2), (4, 5, 11)),
        ((2, 2, 2), (5, 6, 7)),
        ((-3, -3, -3), (9, 10, 11)),
    ]:
        window = tuple(slice(a + pad, b + pad) for a, b in zip(start, stop, strict=True))
        np.testing.assert_array_equal(read_padded(vol, Box(start, stop), mode), padded[window])
