"""Chen et al.'s label clean-up and the padded box targets, by hand and against a loop."""

import numpy as np
import pytest
from scipy import ndimage

from synjax.errors import ConfigError, DataError
from synjax.targets.instances import clean_instance_labels, instance_masks, instance_targets

FACES = ndimage.generate_binary_structure(3, 1)


def _blob_stack(labels, label, z_planes, y=slice(2, 5), x=slice(2, 5)):
    for z in z_planes:
        labels[z, y, x] = label


def test_line_and_small_slices_are_removed():
    labels = np.zeros((5, 10, 10), np.uint16)
    _blob_stack(labels, 4, range(5))  # 3 x 3 squares on z = 0..4
    labels[1, 7, 1:6] = 4  # a row: with the square, not a line; alone in 3D
    # Slices of segment 9: z=0 a diagonal line, z=1 an L of 3 pixels (kept),
    # z=2 two pixels, z=3,4 squares.
    labels[0, [6, 7, 8], [6, 7, 8]] = 9
    labels[1, [7, 7, 8], [7, 8, 7]] = 9
    labels[2, [7, 8], [7, 7]] = 9
    _blob_stack(labels, 9, (3, 4), slice(7, 10), slice(7, 10))
    cleaned = clean_instance_labels(labels)
    assert cleaned.dtype == np.uint32
    # Segment 4: its z=1 slice (square + row) is not a line, so it stays, but
    # the row is a 3D component of one plane: dropped. Segment 9 loses z=0
    # (line) and z=2 (2 pixels): its z=1 L is cut off from z=3,4 and each
    # piece spans < 3 planes: all dropped.
    expected = labels == 4
    expected[1, 7, 1:6] = False
    np.testing.assert_array_equal(cleaned > 0, expected)
    assert set(np.unique(cleaned)) == {0, 1}


def test_a_removed_slice_splits_a_segment_in_two():
    labels = np.zeros((7, 6, 6), np.int64)
    _blob_stack(labels, 2**40, range(7))
    labels[3] = 0
    labels[3, 3, 1:5] = 2**40  # the middle slice is a line
    cleaned = clean_instance_labels(labels)
    expected = np.zeros(labels.shape, np.uint32)
    _blob_stack(expected, 1, range(3))
    _blob_stack(expected, 2, range(4, 7))
    np.testing.assert_array_equal(cleaned, expected)
    # The threshold on planes is a parameter: at 4 both halves go.
    assert clean_instance_labels(labels, min_z_planes=4).max() == 0


def test_touching_segments_stay_apart_and_short_ones_go():
    labels = np.zeros((4, 6, 8), np.uint8)
    _blob_stack(labels, 1, range(4), x=slice(0, 3))
    _blob_stack(labels, 2, range(4), x=slice(3, 6))  # touches 1 along x
    _blob_stack(labels, 3, range(2), x=slice(6, 8))  # two planes only
    cleaned = clean_instance_labels(labels)
    expected = np.where(labels == 3, 0, labels).astype(np.uint32)
    np.testing.assert_array_equal(cleaned, expected)


def _reference_clean(labels, min_pixels=3, min_z_planes=3):
    """Per-segment, per-slice loop: rank test with numpy, components with scipy."""
    cleaned = labels.copy()
    for label in np.unique(labels[labels != 0]):
        for z in range(labels.shape[0]):
            ys, xs = np.nonzero(labels[z] == label)
            if ys.size == 0:
                continue
            centred = np.stack([ys, xs], 1) - np.mean(np.stack([ys, xs], 1), 0)
            if ys.size < min_pixels or np.linalg.matrix_rank(centred) < 2:
                cleaned[z][labels[z] == label] = 0
    pieces = []
    for label in np.unique(cleaned[cleaned != 0]):
        components, num = ndimage.label(cleaned == label, FACES)
        for i in range(1, num + 1):
            voxels = np.flatnonzero(components.ravel() == i)
            z_planes = np.unique(np.unravel_index(voxels, labels.shape)[0])
            if z_planes.size >= min_z_planes:
                pieces.append(voxels)
    out = np.zeros(labels.size, np.uint32)
    # Numbered in raster order of each piece's first voxel, as cc3d does.
    for new_id, voxels in enumerate(sorted(pieces, key=lambda v: v[0]), start=1):
        out[voxels] = new_id
    return out.reshape(labels.shape)


@pytest.mark.parametrize("seed", range(10))
def test_equals_a_slow_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, (6, 7, 7)) * (rng.random((6, 7, 7)) < 0.6)
    labels[rng.random(labels.shape) < 0.1] = 7  # scattered pixels of one label
    np.testing.assert_array_equal(clean_instance_labels(labels), _reference_clean(labels))
    np.testing.assert_array_equal(
        clean_instance_labels(labels, min_pixels=5, min_z_planes=2),
        _reference_clean(labels, 5, 2),
    )


def test_instance_targets_boxes_and_padding():
    labels = np.zeros((4, 8, 8), np.uint32)
    labels[1:3, 2:5, 0:4] = 7  # 24 voxels
    labels[0, 6, 6] = 3  # 1 voxel
    labels[3, 0, 0] = 5  # two pieces of one id: 2 voxels, one box
    labels[3, 7, 7] = 5
    got = instance_targets(labels, max_instances=5)
    np.testing.assert_array_equal(got.ids, [3, 5, 7, 0, 0])
    np.testing.assert_array_equal(got.sizes, [1, 2, 24, 0, 0])
    np.testing.assert_array_equal(got.valid, [True, True, True, False, False])
    assert got.boxes.dtype == np.float32 and got.num_instances == 3
    np.testing.assert_array_equal(
        got.boxes,
        [[0, 6, 6, 1, 7, 7], [3, 0, 0, 4, 8, 8], [1, 2, 0, 3, 5, 4], [0] * 6, [0] * 6],
    )
    masks = instance_masks(labels, got.ids)
    assert masks.shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(masks[2], labels == 7)
    assert masks[3].sum() == 0  # padding is no mask, not the background


def test_instance_targets_keeps_the_largest():
    labels = np.zeros((1, 4, 10), np.int64)
    labels[0, 0, :3] = 9  # 3 voxels
    labels[0, 1, :5] = 2  # 5
    labels[0, 2, :3] = 4  # 3, ties with 9: the lower id stays
    labels[0, 3, :1] = 1  # 1
    got = instance_targets(labels, max_instances=2)
    np.testing.assert_array_equal(got.ids, [2, 4])
    assert got.valid.all() and got.num_instances == 4
    got = instance_targets(labels, max_instances=3)
    np.testing.assert_array_equal(got.ids, [2, 4, 9])


def test_empty_and_bad_input():
    got = instance_targets(np.zeros((2, 2, 2), np.uint8), 3)
    assert not got.valid.any() and got.num_instances == 0 and not got.boxes.any()
    assert clean_instance_labels(np.zeros((2, 2, 2), np.uint8)).max() == 0
    with pytest.raises(DataError, match="z, y, x"):
        clean_instance_labels(np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="integers"):
        instance_targets(np.zeros((2, 2, 2)), 3)
    with pytest.raises(ConfigError, match="max_instances"):
        instance_targets(np.zeros((2, 2, 2), np.uint8), 0)
    with pytest.raises(ConfigError, match="min_pixels"):
        clean_instance_labels(np.zeros((2, 2, 2), np.uint8), min_pixels=0)
