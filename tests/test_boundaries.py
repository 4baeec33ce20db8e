"""Tests of synjax.targets.boundaries against hand-built label volumes."""

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.targets.boundaries import boundary_labels, class_weights


def _line(values):
    """A [1, 1, n] volume holding `values` along x."""
    return np.asarray(values, dtype=np.uint64).reshape(1, 1, -1)


@pytest.mark.parametrize(
    "kernel, expected",
    [
        ("l3", [0, 0, 1, 1, 0, 0, 0]),
        ("c3", [0, 0, 1, 1, 0, 0, 0]),
        ("c5", [0, 1, 1, 1, 1, 0, 0]),
    ],
)
def test_line_of_two_labels(kernel, expected):
    out = boundary_labels(_line([1, 1, 1, 2, 2, 2, 2]), kernel=kernel)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, _line(expected))


def test_background_as_label_or_ignored():
    seg = _line([1, 1, 0, 2, 2, 2, 2])
    # Background is an ordinary label: every voxel within 2 of a label change.
    np.testing.assert_array_equal(boundary_labels(seg, kernel="c5"), _line([1, 1, 1, 1, 1, 0, 0]))
    # Ignored: only voxels seeing both 1 and 2 (1 and 3), background never.
    np.testing.assert_array_equal(
        boundary_labels(seg, kernel="c5", ignore_background=True), _line([0, 1, 0, 1, 0, 0, 0])
    )
    np.testing.assert_array_equal(
        boundary_labels(seg, kernel="l3", ignore_background=True), _line([0] * 7)
    )


def test_background_value_other_than_zero():
    cremi_background = np.iinfo(np.uint64).max
    seg = _line([1, 1, cremi_background, 2, 2, 2, 2])
    np.testing.assert_array_equal(
        boundary_labels(seg, kernel="c5", ignore_background=True, background=cremi_background),
        _line([0, 1, 0, 1, 0, 0, 0]),
    )


def test_centre_voxel_in_3x3x3():
    seg = np.ones((3, 3, 3), dtype=np.int32)
    seg[1, 1, 1] = 2
    face = np.zeros((3, 3, 3), dtype=np.uint8)
    face[1, 1, 1] = 1
    face[0, 1, 1] = face[2, 1, 1] = face[1, 0, 1] = face[1, 2, 1] = 1
    face[1, 1, 0] = face[1, 1, 2] = 1
    np.testing.assert_array_equal(boundary_labels(seg, kernel="l3"), face)
    np.testing.assert_array_equal(boundary_labels(seg, kernel="c3"), np.ones((3, 3, 3)))
    np.testing.assert_array_equal(boundary_labels(seg, kernel="c5"), np.ones((3, 3, 3)))


@pytest.mark.parametrize("big_ids", [False, True])
def test_single_voxel_in_5x5x5(big_ids):
    offset = np.uint64(2**40) if big_ids else np.uint64(0)
    seg = np.full((5, 5, 5), 1, dtype=np.uint64) + offset
    seg[2, 2, 2] = 2 + offset
    l3 = boundary_labels(seg, kernel="l3")
    assert l3.sum() == 7
    assert l3[2, 2, 2] == l3[1, 2, 2] == l3[2, 2, 3] == 1
    assert l3[1, 1, 2] == 0  # edge neighbour: outside the 6-neighbourhood
    c3 = boundary_labels(seg, kernel="c3")
    expected_c3 = np.zeros((5, 5, 5), dtype=np.uint8)
    expected_c3[1:4, 1:4, 1:4] = 1
    np.testing.assert_array_equal(c3, expected_c3)
    np.testing.assert_array_equal(boundary_labels(seg, kernel="c5"), np.ones((5, 5, 5)))


def test_kernel_clipped_at_border():
    seg = np.ones((5, 5, 5), dtype=np.uint16)
    seg[0, 0, 0] = 7
    expected = np.zeros((5, 5, 5), dtype=np.uint8)
    expected[:2, :2, :2] = 1
    np.testing.assert_array_equal(boundary_labels(seg, kernel="c3"), expected)


def test_bad_kernel_and_shape():
    with pytest.raises(ConfigError, match="c7"):
        boundary_labels(np.zeros((3, 3, 3), dtype=np.int32), kernel="c7")
    with pytest.raises(DataError, match="3D"):
        boundary_labels(np.zeros((3, 3), dtype=np.int32))


def test_class_weights_hand_computed():
    labels = np.array([0, 0, 0, 1], dtype=np.uint8)
    np.testing.assert_allclose(class_weights(labels)[labels], [2 / 3, 2 / 3, 2 / 3, 2.0], rtol=1e-6)
    # Mean weight 1 and equal total weight per class.
    w = class_weights(labels)[labels]
    assert w.dtype == np.float32
    assert w.mean() == pytest.approx(1.0)
    assert w[labels == 0].sum() == pytest.approx(w[labels == 1].sum())


def test_class_weights_mask_and_absent_class():
    labels = np.array([0, 0, 1, 1, 1], dtype=np.int64)
    mask = np.array([True, True, True, True, False])
    # Counted: two 0s and two 1s -> weight 1 each; masked voxel 0; class 2 absent.
    per_voxel = np.where(mask, class_weights(labels, num_classes=3, mask=mask)[labels], 0.0)
    np.testing.assert_allclose(per_voxel, [1, 1, 1, 1, 0])
    with pytest.raises(DataError, match="num_classes"):
        class_weights(np.array([0, 3]), num_classes=2)
