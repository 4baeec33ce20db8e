"""16-fold test-time augmentation: inverses, distinctness, equivariant models."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import DataError
from synjax.inference.tta import (
    IDENTITY,
    TRANSFORMS,
    TRANSFORMS_NO_TRANSPOSE,
    Transform,
    apply_transform,
    invert_transform,
    make_tta_fn,
    predict_with_tta,
)

SLICES = 3


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def centre_sigmoid(x):
    """Pointwise function of the centre slice: commutes with every transform."""
    return jax.nn.sigmoid(x[:, x.shape[1] // 2])


# Symmetric under transposition and both mirrors, so under all 8 yx symmetries.
SYMMETRIC_KERNEL = jnp.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])


def symmetric_conv(x):
    """3x3 conv of (centre + mean of outer slices), symmetric kernel: equivariant."""
    centre = x.shape[1] // 2
    plane = x[:, centre, :, :, 0] + (x[:, 0, :, :, 0] + x[:, -1, :, :, 0]) / 2
    out = jax.lax.conv_general_dilated(
        plane[:, None], SYMMETRIC_KERNEL[None, None], (1, 1), "SAME"
    )[:, 0]
    return out[..., None]


def test_sixteen_distinct_transforms():
    assert len(TRANSFORMS) == 16
    assert len(set(TRANSFORMS)) == 16
    assert IDENTITY in TRANSFORMS
    x = _random((1, SLICES, 5, 5, 1))
    outs = [np.asarray(apply_transform(x, t)) for t in TRANSFORMS]
    for (i, a), (j, b) in itertools.combinations(enumerate(outs), 2):
        assert not np.array_equal(a, b), (TRANSFORMS[i], TRANSFORMS[j])
    assert len(TRANSFORMS_NO_TRANSPOSE) == 8
    assert all(t.quarter_turns in (0, 2) for t in TRANSFORMS_NO_TRANSPOSE)


@pytest.mark.parametrize("t", TRANSFORMS)
def test_inverse_is_identity(t):
    x5 = _random((2, SLICES, 6, 6, 2), seed=1)
    np.testing.assert_array_equal(invert_transform(apply_transform(x5, t), t), x5)
    x4 = _random((2, 6, 6, 2), seed=2)
    np.testing.assert_array_equal(invert_transform(apply_transform(x4, t), t), x4)
    np.testing.assert_array_equal(apply_transform(invert_transform(x4, t), t), x4)


def test_transform_by_hand():
    a = np.array([[1, 2], [3, 4]], np.float32)[None, None, :, :, None]
    # Mirror x -> [[2, 1], [4, 3]]; rot90 (counter-clockwise) -> [[1, 3], [2, 4]]:
    # the two together transpose the image.
    got = apply_transform(a, Transform(True, 1, False))[0, 0, :, :, 0]
    np.testing.assert_array_equal(got, [[1, 3], [2, 4]])
    stack = np.arange(3, dtype=np.float32)[None, :, None, None, None] * np.ones((1, 3, 2, 2, 1))
    flipped = apply_transform(stack, Transform(False, 0, True))
    np.testing.assert_array_equal(flipped[0, :, 0, 0, 0], [2, 1, 0])
    # 4D outputs have no z axis: the z flip leaves them alone.
    np.testing.assert_array_equal(apply_transform(a[:, 0], Transform(False, 0, True)), a[:, 0])


@pytest.mark.parametrize("t", TRANSFORMS)
def test_output_inversion_recovers_centre_slice(t):
    # Predicting on a transformed stack and inverting the 4D output gives the
    # prediction on the original: the centre slice survives the z flip.
    x = _random((2, SLICES, 6, 6, 1), seed=3)
    got = invert_transform(centre_sigmoid(apply_transform(x, t)), t)
    np.testing.assert_allclose(got, centre_sigmoid(x), rtol=1e-6)


@pytest.mark.parametrize("model", [centre_sigmoid, symmetric_conv])
def test_equivariant_model_unchanged_by_tta(model):
    x = jnp.asarray(_random((2, SLICES, 8, 8, 1), seed=4))
    np.testing.assert_allclose(predict_with_tta(model, x), model(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        predict_with_tta(model, x, TRANSFORMS_NO_TRANSPOSE), model(x), rtol=1e-5, atol=1e-6
    )


def x_ramp(x):
    """Ignores the input: the output is the x coordinate (not equivariant)."""
    n, _, ny, nx, _ = x.shape
    return jnp.broadcast_to(jnp.arange(nx, dtype=jnp.float32)[None, None, :, None], (n, ny, nx, 1))


def test_tta_averages_inverted_outputs():
    size = 6
    x = jnp.zeros((1, SLICES, size, size, 1))
    # The 8 yx symmetries map the x ramp to x, size-1-x, y, size-1-y (twice each):
    # their mean is (size - 1) / 2 everywhere.
    np.testing.assert_allclose(predict_with_tta(x_ramp, x), (size - 1) / 2, rtol=1e-6)
    # Without the quarter turns only x and its mirror remain: still the constant.
    np.testing.assert_allclose(
        predict_with_tta(x_ramp, x, [IDENTITY, Transform(False, 2, False)]), (size - 1) / 2
    )
    # The identity alone changes nothing.
    np.testing.assert_allclose(predict_with_tta(x_ramp, x, [IDENTITY]), x_ramp(x))


def test_non_square_needs_no_transpose_transforms():
    x = jnp.asarray(_random((1, SLICES, 4, 6, 1), seed=5))
    with pytest.raises(DataError, match="not square"):
        predict_with_tta(centre_sigmoid, x)
    np.testing.assert_allclose(
        predict_with_tta(centre_sigmoid, x, TRANSFORMS_NO_TRANSPOSE), centre_sigmoid(x), rtol=1e-6
    )
    with pytest.raises(DataError, match="at least one"):
        predict_with_tta(centre_sigmoid, x, [])


def test_one_batched_call_and_cached_compilation():
    calls = []

    def counting(x):
        calls.append(x.shape)  # runs at trace time only
        return centre_sigmoid(x)

    x = jnp.asarray(_random((3, SLICES, 4, 4, 1), seed=6))
    predict_with_tta(counting, x)
    predict_with_tta(counting, x + 1)
    # All 16 copies of the batch of 3 in one call, traced once for both calls.
    assert calls == [(48, SLICES, 4, 4, 1)]
    assert make_tta_fn(counting, TRANSFORMS) is make_tta_fn(counting, TRANSFORMS)
