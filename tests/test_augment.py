"""Augmentation keeps raw and labels aligned, is invertible, jitters only intensities."""

import itertools

import numpy as np
import pytest

from synjax.data.augment import (
    AugmentSettings,
    GeometricTransform,
    augment,
    jitter_intensity,
    sample_transform,
)
from synjax.errors import DataError

SHAPE = (3, 4, 4)
ALL_TRANSFORMS = [
    GeometricTransform(fz, fy, fx, k)
    for fz, fy, fx, k in itertools.product([False, True], [False, True], [False, True], range(4))
]


def _raw_and_labels(shape=SHAPE):
    """Raw with distinct values and labels that encode each voxel's raw value."""
    size = int(np.prod(shape))
    raw = (np.arange(size, dtype=np.float32) / np.float32(size)).reshape(shape)
    labels = np.arange(np.prod(shape), dtype=np.uint64).reshape(shape)
    return raw, labels


def test_hand_computed_transforms():
    a = np.array([[[1, 2], [3, 4]]])  # [z=1, y=2, x=2]
    assert GeometricTransform(flip_x=True).apply(a).tolist() == [[[2, 1], [4, 3]]]
    assert GeometricTransform(flip_y=True).apply(a).tolist() == [[[3, 4], [1, 2]]]
    # np.rot90 on (y, x): the top row becomes the left column, read upwards.
    assert GeometricTransform(rot90=1).apply(a).tolist() == [[[2, 4], [1, 3]]]
    b = np.arange(2).reshape(2, 1, 1)
    assert GeometricTransform(flip_z=True).apply(b).ravel().tolist() == [1, 0]


@pytest.mark.parametrize("transform", ALL_TRANSFORMS)
def test_transform_invertible_and_channels_follow(transform):
    raw, _ = _raw_and_labels()
    assert np.array_equal(transform.invert(transform.apply(raw)), raw)
    two_channels = np.stack([raw, -raw], axis=-1)
    moved = transform.apply(two_channels)
    assert np.array_equal(moved[..., 0], transform.apply(raw))
    assert np.array_equal(moved[..., 1], -transform.apply(raw))


def test_all_transforms_distinct():
    raw, _ = _raw_and_labels()
    # 2 (z flip) x 8 (dihedral group of the square) distinct results.
    outputs = {transform.apply(raw).tobytes() for transform in ALL_TRANSFORMS}
    assert len(outputs) == 16


def test_augment_keeps_alignment_and_jitters_only_raw():
    raw, labels = _raw_and_labels()
    mask = (labels % 3 == 0).astype(np.uint8)
    settings = AugmentSettings(intensity_scale=0.2, intensity_shift=0.2)
    seen = set()
    for seed in range(20):
        out = augment(
            {"raw": raw, "labels": labels, "mask": mask}, np.random.default_rng(seed), settings
        )
        assert out["labels"].dtype == np.uint64 and out["mask"].dtype == np.uint8
        # The raw value the labels point at, jittered by one affine map.
        original = raw.ravel()[out["labels"].astype(np.int64)]
        scale, shift = np.polyfit(original.ravel(), out["raw"].ravel(), 1)
        np.testing.assert_allclose(out["raw"], original * scale + shift, atol=1e-5)
        assert 0.8 <= scale <= 1.2 and -0.2 <= shift <= 0.2
        assert np.array_equal(out["mask"], (out["labels"] % 3 == 0).astype(np.uint8))
        # Labels and masks are permuted, never changed.
        assert np.array_equal(np.sort(out["labels"], axis=None), labels.ravel())
        seen.add(out["labels"].tobytes())
    assert len(seen) > 4


def test_no_rotation_for_non_square_xy():
    raw, labels = _raw_and_labels((2, 3, 4))
    for seed in range(10):
        out = augment(
            {"raw": raw, "labels": labels}, np.random.default_rng(seed), AugmentSettings()
        )
        assert out["raw"].shape == (2, 3, 4)
        original = raw.ravel()[out["labels"].astype(np.int64)]
        scale, shift = np.polyfit(original.ravel(), out["raw"].ravel(), 1)
        np.testing.assert_allclose(out["raw"], original * scale + shift, atol=1e-5)
    with pytest.raises(DataError, match="needs y == x"):
        GeometricTransform(rot90=1).apply(raw)


def test_disabled_settings_change_nothing():
    raw, labels = _raw_and_labels()
    off = AugmentSettings(
        flip_xy=False, rotate_xy=False, flip_z=False, intensity_scale=0.0, intensity_shift=0.0
    )
    out = augment({"raw": raw, "labels": labels}, np.random.default_rng(0), off)
    assert np.array_equal(out["raw"], raw) and np.array_equal(out["labels"], labels)
    assert sample_transform(np.random.default_rng(0), off) == GeometricTransform()


def test_jitter_hand_computed_and_needs_float():
    values = np.array([0.0, 0.5, 1.0], np.float32)
    rng = np.random.default_rng(5)
    settings = AugmentSettings(intensity_scale=0.1, intensity_shift=0.05)
    # The same draws as jitter_intensity makes: scale first, then shift.
    expected_rng = np.random.default_rng(5)
    scale = 1 + expected_rng.uniform(-0.1, 0.1)
    shift = expected_rng.uniform(-0.05, 0.05)
    np.testing.assert_allclose(
        jitter_intensity(values, rng, settings), values * scale + shift, rtol=1e-6
    )
    with pytest.raises(DataError, match="needs a float array"):
        jitter_intensity(np.zeros(3, np.uint8), rng, settings)


def test_mismatched_shapes():
    with pytest.raises(DataError, match="same z, y, x sizes"):
        augment(
            {"raw": np.zeros(SHAPE, np.float32), "labels": np.zeros((3, 4, 5))},
            np.random.default_rng(0),
            AugmentSettings(),
        )
