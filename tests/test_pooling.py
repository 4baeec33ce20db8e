"""Tests of `max_pool3d`: "blocks" equals `nn.max_pool` bit for bit, ties included;
of `relu_max_pool3d` against ReLU then `nn.max_pool`, bit for bit; and of
`max_pool_windows` (overlapping windows) against `nn.max_pool`.

XLA's max-pool gradient (select_and_scatter with a `>=` select) sends each
window's gradient to its first maximal element in (dz, dy, dx) order; the
"blocks" pool must do exactly the same, so integer-valued inputs with many
equal values per window are the cases that matter.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import ConfigError
from synjax.models import UNet3D, UNet3DSettings
from synjax.models.layers import (
    max_pool3d,
    max_pool_blocks,
    max_pool_windows,
    relu_max_pool3d,
    relu_max_pool_blocks,
    resolve_pool_implementation,
)

CASES = [
    # (input [b, z, y, x, c], factors, dtype)
    ((2, 4, 8, 8, 3), (1, 2, 2), jnp.float32),
    ((1, 6, 6, 6, 2), (2, 2, 2), jnp.float32),
    ((3, 6, 6, 6, 1), (2, 3, 1), jnp.float32),
    ((1, 5, 7, 9, 2), (2, 2, 2), jnp.float32),  # remainders dropped, as "VALID"
    ((1, 4, 4, 4, 5), (1, 1, 1), jnp.float32),
    ((1, 3, 4, 6, 1), (3, 4, 6), jnp.float32),  # one window
    ((2, 4, 8, 8, 3), (1, 2, 2), jnp.bfloat16),
    ((1, 5, 7, 9, 2), (2, 2, 2), jnp.bfloat16),
    ((1, 6, 6, 6, 2), (2, 2, 2), jnp.float16),
]


def _pool_and_grad(pool, x, cotangent):
    out, vjp = jax.vjp(pool, x)
    return out, vjp(cotangent)[0]


def _xla(factors):
    return lambda v: nn.max_pool(v, factors, strides=factors, padding="VALID")


def _bits(x):
    return np.asarray(x).view(np.uint8)


@pytest.mark.parametrize(("shape", "factors", "dtype"), CASES)
def test_blocks_equal_xla_bit_for_bit_on_tied_inputs(shape, factors, dtype):
    rng = np.random.default_rng(sum(shape) + sum(factors))
    # Values in {-1, 0, 1} in the first half of the batch and {0, 1} in the
    # second: most windows hold several equal maxima.
    values = rng.integers(-1, 2, (2 * shape[0], *shape[1:]))
    values[shape[0] :] = np.abs(values[shape[0] :])
    x = jnp.asarray(values, dtype)
    out_shape = (2 * shape[0], *(n // p for n, p in zip(shape[1:4], factors, strict=True)))
    cotangent = jnp.asarray(rng.integers(1, 100, (*out_shape, shape[4])), dtype)

    def both(v, c):
        want = _pool_and_grad(_xla(factors), v, c)
        got = _pool_and_grad(lambda u: max_pool_blocks(u, factors), v, c)
        return want, got

    (want_y, want_g), (got_y, got_g) = jax.jit(both)(x, cotangent)
    assert got_y.dtype == want_y.dtype == dtype and got_g.dtype == want_g.dtype == dtype
    assert got_y.shape == want_y.shape and got_g.shape == x.shape
    # Ties really occur: some window's gradient is not at every maximal voxel.
    assert int((x == jnp.max(x)).sum()) > got_y.size or factors == (1, 1, 1)
    np.testing.assert_array_equal(_bits(got_y), _bits(want_y))
    np.testing.assert_array_equal(_bits(got_g), _bits(want_g))


@pytest.mark.parametrize(("shape", "factors", "dtype"), CASES)
def test_relu_pool_equals_relu_then_xla_pool_bit_for_bit(shape, factors, dtype):
    rng = np.random.default_rng(sum(shape) + 2 * sum(factors))
    # Ties among positive maxima, windows whose maximum is 0, -0.0 or negative
    # (no gradient through the ReLU), and sign-of-zero outputs.
    values = rng.choice(np.array([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0]), (2 * shape[0], *shape[1:]))
    values[shape[0] :] = -np.abs(values[shape[0] :])  # every window <= 0
    x = jnp.asarray(values, dtype)
    out_shape = (2 * shape[0], *(n // p for n, p in zip(shape[1:4], factors, strict=True)))
    cotangent = jnp.asarray(rng.integers(1, 100, (*out_shape, shape[4])), dtype)

    def both(v, c):
        want = _pool_and_grad(lambda u: _xla(factors)(nn.relu(u)), v, c)
        got = _pool_and_grad(lambda u: relu_max_pool_blocks(u, factors), v, c)
        return want, got

    (want_y, want_g), (got_y, got_g) = jax.jit(both)(x, cotangent)
    assert got_y.dtype == want_y.dtype == dtype and got_g.dtype == want_g.dtype == dtype
    assert got_y.shape == want_y.shape and got_g.shape == x.shape
    assert float(jnp.abs(got_g).sum()) > 0  # some windows pass a gradient
    np.testing.assert_array_equal(_bits(got_y), _bits(want_y))
    np.testing.assert_array_equal(_bits(got_g), _bits(want_g))


def test_relu_pool_hand_computed_and_implementations():
    # Windows (1x2x2): [[5, 7], [7, 2]] -> 7, gradient to the first 7; [[-3, -1],
    # [-1, -2]] -> 0 and no gradient (the ReLU is flat there).
    x = jnp.array([[5.0, 7.0, -3.0, -1.0], [7.0, 2.0, -1.0, -2.0]]).reshape(1, 1, 2, 4, 1)
    out, grad = _pool_and_grad(
        lambda v: relu_max_pool3d(v, (1, 2, 2)), x, jnp.array([3.0, 4.0]).reshape(1, 1, 1, 2, 1)
    )
    np.testing.assert_array_equal(out.ravel(), [7.0, 0.0])
    np.testing.assert_array_equal(grad.reshape(2, 4), [[0, 3, 0, 0], [0, 0, 0, 0]])
    # "xla" and "blocks" agree; a window of 4x4x8 = 128 taps needs wider tap indices.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 4, 4, 16, 2)), jnp.float32)
    c = jnp.asarray(rng.normal(size=(1, 1, 1, 2, 2)), jnp.float32)
    want = _pool_and_grad(lambda v: relu_max_pool3d(v, (4, 4, 8), "xla"), x, c)
    got = _pool_and_grad(lambda v: relu_max_pool3d(v, (4, 4, 8), "blocks"), x, c)
    for w, g in zip(want, got, strict=True):
        np.testing.assert_array_equal(_bits(g), _bits(w))
    with pytest.raises(ConfigError, match="pool factors"):
        relu_max_pool3d(x, (1, 2))


def test_blocks_gradient_goes_to_first_maximum_hand_computed():
    # One 1x2x2 window [[5, 7], [7, 2]]: the max 7 is at window positions 1
    # and 2; the gradient goes to position 1 (row-major first), as XLA's.
    x = jnp.array([[5.0, 7.0], [7.0, 2.0]]).reshape(1, 1, 2, 2, 1)
    out, grad = _pool_and_grad(
        lambda v: max_pool3d(v, (1, 2, 2)), x, jnp.full((1, 1, 1, 1, 1), 3.0)
    )
    assert float(out.ravel()[0]) == 7.0
    np.testing.assert_array_equal(grad.reshape(2, 2), [[0.0, 3.0], [0.0, 0.0]])
    # A 2x1x1 window: z comes first in the order.
    x = jnp.array([4.0, 4.0]).reshape(1, 2, 1, 1, 1)
    _, grad = _pool_and_grad(lambda v: max_pool3d(v, (2, 1, 1)), x, jnp.ones((1, 1, 1, 1, 1)))
    np.testing.assert_array_equal(grad.ravel(), [1.0, 0.0])


def test_blocks_dropped_remainder_gets_zero_gradient():
    x = jnp.arange(5.0).reshape(1, 1, 1, 5, 1)
    out, grad = _pool_and_grad(lambda v: max_pool3d(v, (1, 1, 2)), x, jnp.ones((1, 1, 1, 2, 1)))
    np.testing.assert_array_equal(out.ravel(), [1.0, 3.0])
    np.testing.assert_array_equal(grad.ravel(), [0.0, 1.0, 0.0, 1.0, 0.0])


def test_max_pool3d_implementations_and_errors():
    assert jax.default_backend() == "cpu"
    assert resolve_pool_implementation("auto") == "blocks"
    assert resolve_pool_implementation("xla") == "xla"
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 2, 4, 4, 3)), jnp.float32)
    np.testing.assert_array_equal(
        max_pool3d(x, (1, 2, 2), "xla"), max_pool3d(x, (1, 2, 2), "blocks")
    )
    with pytest.raises(ConfigError, match="pool implementation"):
        max_pool3d(x, (1, 2, 2), "fast")
    with pytest.raises(ConfigError, match="pool factors"):
        max_pool3d(x, (1, 2))
    with pytest.raises(ConfigError, match="max_pool3d input shape"):
        max_pool3d(x[0], (1, 2, 2))


def test_unet_pools_with_blocks():
    # On CPU the U-Net's pooling is the "blocks" pool: its jaxpr has no reduce_window.
    cfg = UNet3DSettings(depth=1, base_features=2, pool_factors=((1, 2, 2),), padding="SAME")
    x = jnp.zeros((1, 2, 4, 4, 1))
    params = jax.eval_shape(UNet3D(cfg).init, jax.random.key(0), x)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: UNet3D(cfg).apply({"params": p}, x))(params))
    # (an elementwise maximum over the window's taps)
    assert "reduce_window" not in jaxpr and " max " in jaxpr


WINDOW_CASES = [
    # (input [b, *spatial, c], window, strides, padding, dtype): DeepEM3D-Net's
    # 3x3 stride-2 SAME pool on odd and even sizes, 3D, VALID, non-overlapping.
    ((2, 9, 11, 3), (3, 3), (2, 2), "SAME", jnp.float32),
    ((1, 16, 16, 4), (3, 3), (2, 2), "SAME", jnp.float32),
    ((1, 8, 7, 6, 2), (2, 3, 3), (1, 2, 2), "VALID", jnp.float32),
    ((1, 10, 10, 2), (2, 2), (2, 2), "SAME", jnp.float32),
    ((1, 9, 9, 2), (3, 3), (2, 2), "SAME", jnp.bfloat16),
    # Stride 1 (every tap in one residue class), stride past the window (classes
    # no tap reaches), window 5 stride 2 (three taps share a residue).
    ((1, 7, 8, 2), (3, 2), (1, 1), "SAME", jnp.float32),
    ((1, 11, 10, 2), (2, 2), (3, 4), "VALID", jnp.float32),
    ((1, 13, 12, 2), (5, 5), (2, 2), "SAME", jnp.float32),
]


@pytest.mark.parametrize(("shape", "window", "strides", "padding", "dtype"), WINDOW_CASES)
def test_windows_equal_xla_on_tied_inputs(shape, window, strides, padding, dtype):
    rng = np.random.default_rng(sum(shape))
    values = rng.integers(-1, 2, (2 * shape[0], *shape[1:]))
    values[shape[0] :] = np.abs(values[shape[0] :])  # ReLU-like: many tied zeros
    x = jnp.asarray(values, dtype)

    def xla(v):
        return nn.max_pool(v, window, strides=strides, padding=padding)

    out_shape = jax.eval_shape(xla, x).shape
    # Integer cotangents: overlapping windows add into shared voxels, and the
    # sums are then exact whatever their order.
    cotangent = jnp.asarray(rng.integers(1, 8, out_shape), dtype)
    want_y, want_g = _pool_and_grad(xla, x, cotangent)
    got_y, got_g = _pool_and_grad(
        lambda v: max_pool_windows(v, window, strides, padding), x, cotangent
    )
    assert got_y.dtype == want_y.dtype and got_g.dtype == want_g.dtype and got_g.shape == x.shape
    np.testing.assert_array_equal(_bits(got_y), _bits(want_y))
    np.testing.assert_array_equal(_bits(got_g), _bits(want_g))


def test_windows_gradient_hand_computed():
    # x = [1, 5, 5, 2, 5] pooled by 3 with stride 2, SAME (pad 1 on both sides):
    # windows [-inf, 1, 5], [5, 5, 2], [2, 5, -inf] -> max 5, 5, 5; the first
    # maximum of each is x[1], x[1], x[4].
    x = jnp.array([1.0, 5.0, 5.0, 2.0, 5.0]).reshape(1, 5, 1)
    out, grad = _pool_and_grad(
        lambda v: max_pool_windows(v, (3,), (2,), "SAME"),
        x,
        jnp.array([1.0, 10.0, 100.0])[None, :, None],
    )
    np.testing.assert_array_equal(out.ravel(), [5.0, 5.0, 5.0])
    np.testing.assert_array_equal(grad.ravel(), [0.0, 11.0, 0.0, 0.0, 100.0])
