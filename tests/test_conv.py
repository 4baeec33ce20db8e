"""Tests of `synjax.models.conv`: Conv3D against flax's nn.Conv."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import ConfigError
from synjax.models.conv import (
    Conv3D,
    ConvTranspose3D,
    auto_implementation,
    conv3d_folded,
    conv3d_folded_sum,
    conv3d_native,
    resolve_implementation,
)
from synjax.models.layers import ConvBlock

# float32 sums of a few hundred products: relative rounding well below this.
RTOL = 1e-4
ATOL = 1e-4
FOLDED = ("folded", "folded_sum")

CASES = [
    # (input shape [b, z, y, x, c], features, kernel, padding)
    ((2, 5, 9, 8, 3), 4, (1, 3, 3), "SAME"),
    ((2, 5, 9, 8, 3), 4, (1, 3, 3), "VALID"),
    ((1, 6, 7, 7, 2), 3, (3, 3, 3), "SAME"),
    ((1, 6, 7, 7, 2), 3, (3, 3, 3), "VALID"),
    ((2, 4, 6, 5, 3), 2, (3, 1, 1), "SAME"),
    ((2, 4, 6, 5, 3), 2, (3, 1, 1), "VALID"),
    ((1, 7, 8, 6, 1), 5, (5, 3, 1), "SAME"),
    ((1, 7, 8, 6, 1), 5, (5, 3, 1), "VALID"),
]


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _params_and_input(shape, features, kernel, seed=0):
    x = _random(shape, seed)
    ref = nn.Conv(features, kernel, padding="SAME")
    params = ref.init(jax.random.key(seed), x)
    # Non-zero bias so that a dropped bias would fail the comparison.
    params = jax.tree.map(lambda p: p + 0.1, params)
    return x, params


@pytest.mark.parametrize("impl", ("native", *FOLDED))
@pytest.mark.parametrize(("shape", "features", "kernel", "padding"), CASES)
def test_forward_matches_nn_conv(shape, features, kernel, padding, impl):
    x, params = _params_and_input(shape, features, kernel)
    want = nn.Conv(features, kernel, padding=padding).apply(params, x)
    got = Conv3D(features, kernel, padding=padding, implementation=impl).apply(params, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("impl", FOLDED)
@pytest.mark.parametrize(("shape", "features", "kernel", "padding"), CASES[::3])
def test_gradients_match_nn_conv(shape, features, kernel, padding, impl):
    x, params = _params_and_input(shape, features, kernel, seed=1)
    weights = _random(nn.Conv(features, kernel, padding=padding).apply(params, x).shape, 2)

    def loss(module):
        # A weighted sum, so that every output element has its own gradient.
        return lambda p, v: jnp.sum(weights * module.apply(p, v))

    ref = nn.Conv(features, kernel, padding=padding)
    ours = Conv3D(features, kernel, padding=padding, implementation=impl)
    want_p, want_x = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    got_p, got_x = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    np.testing.assert_allclose(got_x, want_x, rtol=RTOL, atol=ATOL)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(
            got_p["params"][name], want_p["params"][name], rtol=RTOL, atol=ATOL
        )


def test_params_have_nn_conv_names_and_shapes():
    x = jnp.zeros((1, 4, 6, 6, 3))
    ours = Conv3D(7, (3, 1, 3)).init(jax.random.key(0), x)
    ref = nn.Conv(7, (3, 1, 3)).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, ref)
    assert ours["params"]["kernel"].shape == (3, 1, 3, 3, 7)
    # Same initialiser and key: the very same initial kernel.
    np.testing.assert_array_equal(ours["params"]["kernel"], ref["params"]["kernel"])


def test_no_bias():
    x = jnp.ones((1, 3, 4, 4, 2))
    variables = Conv3D(2, (1, 3, 3), use_bias=False).init(jax.random.key(0), x)
    assert set(variables["params"]) == {"kernel"}


def test_hand_computed_sum_of_neighbours():
    # All-ones 3x3x3 kernel, SAME: each output counts the in-volume
    # neighbours of a voxel in an all-ones input (corner 8, face centre ...).
    x = jnp.ones((1, 3, 3, 3, 1))
    kernel = jnp.ones((3, 3, 3, 1, 1))
    want = np.array([[[8, 12, 8], [12, 18, 12], [8, 12, 8]]] * 2, np.float32)
    want = np.insert(want, 1, [[12, 18, 12], [18, 27, 18], [12, 18, 12]], axis=0)
    for fn in (conv3d_folded, conv3d_folded_sum, conv3d_native):
        np.testing.assert_array_equal(fn(x, kernel, "SAME")[0, ..., 0], want)


def test_hand_computed_z_shift():
    # A kernel that picks the voxel one z-slice up: VALID output z is x[z + 1].
    x = jnp.arange(4.0).reshape(1, 4, 1, 1, 1)
    kernel = jnp.zeros((3, 1, 1, 1, 1)).at[1].set(1.0)
    for fn in (conv3d_folded, conv3d_folded_sum):
        np.testing.assert_array_equal(fn(x, kernel, "VALID").ravel(), [1.0, 2.0])
        np.testing.assert_array_equal(fn(x, kernel, "SAME").ravel(), [0.0, 1.0, 2.0, 3.0])


def test_even_kernel_same_padding_matches_nn_conv():
    # Upsample's resize_conv uses an even (1, 2, 2) kernel with SAME padding.
    x, params = _params_and_input((1, 4, 6, 6, 2), 3, (2, 2, 2))
    want = nn.Conv(3, (2, 2, 2), padding="SAME").apply(params, x)
    got = Conv3D(3, (2, 2, 2), padding="SAME", implementation="folded").apply(params, x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_native_and_folded_agree():
    x = _random((2, 6, 10, 9, 4), 3)
    module = Conv3D(6, (3, 3, 3), padding="SAME", implementation="native")
    params = module.init(jax.random.key(3), x)
    native = module.apply(params, x)
    folded = module.clone(implementation="folded").apply(params, x)
    np.testing.assert_allclose(folded, native, rtol=RTOL, atol=ATOL)


def test_dtype_bfloat16_computes_in_bfloat16():
    x = jnp.ones((1, 3, 4, 4, 2))
    module = Conv3D(2, (3, 3, 3), dtype=jnp.bfloat16)
    params = module.init(jax.random.key(0), x)
    assert params["params"]["kernel"].dtype == jnp.float32
    assert module.apply(params, x).dtype == jnp.bfloat16


def test_without_onednn_auto_picks_folded_on_cpu_and_fastest_the_measured_paths(
    without_onednn,
):
    # Without oneDNN, "auto" keeps "folded"; "fastest" is the choice measured in
    # benchmarks/bench_conv.py: taps for one input channel.
    assert jax.default_backend() == "cpu"
    assert resolve_implementation("auto") == "folded"
    assert resolve_implementation("native") == "native"
    assert resolve_implementation("fastest", in_features=1) == "taps"
    assert resolve_implementation("fastest", in_features=8) == "folded_taps"
    assert resolve_implementation("fastest") == "folded_taps"
    with auto_implementation("fastest"):
        assert resolve_implementation("auto", in_features=1) == "taps"


def test_auto_implementation_overrides_auto_only(without_onednn):
    with auto_implementation("native"):
        assert resolve_implementation("auto") == "native"
        assert resolve_implementation("folded_sum") == "folded_sum"
        with auto_implementation("folded_sum"):
            assert resolve_implementation("auto") == "folded_sum"
        assert resolve_implementation("auto") == "native"
    assert resolve_implementation("auto") == "folded"
    with pytest.raises(ConfigError, match="implementation"), auto_implementation("auto"):
        pass


def test_rejects_bad_settings():
    x = jnp.ones((1, 2, 4, 4, 1))
    with pytest.raises(ConfigError, match="implementation"):
        Conv3D(1, (1, 3, 3), implementation="fast").init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match="padding"):
        Conv3D(1, (1, 3, 3), padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(ConfigError, match="kernel depth"):
        Conv3D(1, (3, 3, 3), padding="VALID").init(jax.random.key(0), x)


def test_conv_block_keeps_nn_conv_param_tree():
    x = _random((1, 5, 8, 8, 2), 4)
    block = ConvBlock(3, (3, 3, 3), padding="VALID")
    params = block.init(jax.random.key(0), x)["params"]
    assert set(params) == {"Conv_0", "PReLU_0", "Conv_1", "PReLU_1"}
    assert params["Conv_0"]["kernel"].shape == (3, 3, 3, 2, 3)
    assert params["Conv_1"]["kernel"].shape == (3, 3, 3, 3, 3)
    folded = block.apply({"params": params}, x)
    native = block.clone(conv_implementation="native").apply({"params": params}, x)
    assert folded.shape == (1, 1, 4, 4, 3)
    np.testing.assert_allclose(folded, native, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("impl", ("native", "folded"))
@pytest.mark.parametrize("factors", ((1, 2, 2), (2, 2, 2), (2, 1, 3)))
def test_conv_transpose_matches_nn_conv_transpose(factors, impl):
    x = _random((2, 3, 4, 5, 3), 5)
    ref = nn.ConvTranspose(4, factors, strides=factors, padding="VALID")
    params = jax.tree.map(lambda p: p + 0.1, ref.init(jax.random.key(5), x))
    ours = ConvTranspose3D(4, factors, implementation=impl)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(5), x)) == jax.tree.map(
        jnp.shape, params
    )
    np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=RTOL, atol=ATOL)
    weights = _random(ref.apply(params, x).shape, 6)

    def loss(module):
        return lambda p, v: jnp.sum(weights * module.apply(p, v))

    want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL)


def test_conv_transpose_hand_computed_block():
    # One voxel of value 2 and a (1, 2, 2) kernel [[1, 2], [3, 4]]: flax
    # applies the kernel flipped, so the 2x2 output block is 2 * [[4, 3], [2, 1]].
    x = jnp.full((1, 1, 1, 1, 1), 2.0)
    kernel = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1, 1)
    got = ConvTranspose3D(1, (1, 2, 2), use_bias=False).apply({"params": {"kernel": kernel}}, x)
    np.testing.assert_array_equal(got[0, 0, ..., 0], [[8.0, 6.0], [4.0, 2.0]])


@pytest.mark.parametrize("dtype", (jnp.bfloat16, jnp.float16))
def test_low_precision_bias_and_prelu_gradients_by_product_equal_autodiff(dtype):
    # Below float32 the per-channel gradients (bias, PReLU slope) are ones-vector
    # products accumulated in float32 (fast on CPU); autodiff of the plain
    # expressions on the same low-precision values is the reference. By hand
    # first: a channel sum of a [2, 2, 2] array.
    from synjax.models.conv import add_bias, channel_sum
    from synjax.models.layers import PReLU

    values = jnp.array([[[1.0, -2.0], [3.0, 4.0]], [[-1.0, 0.5], [2.0, -3.0]]], dtype)
    np.testing.assert_array_equal(channel_sum(values), [5.0, -0.5])
    assert channel_sum(values).dtype == jnp.float32

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 6, 4)), dtype)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    bias = jnp.asarray([0.5, -0.25, 1.0, 0.0], dtype)

    def bias_grads(fn):
        return jax.grad(lambda y, b: jnp.sum(weights * fn(y, b).astype(jnp.float32)), (0, 1))(
            x, bias
        )

    # Exact sums (float64) of the low-precision cotangent that reaches the bias.
    cotangent = np.asarray(weights.astype(dtype), np.float64)
    xs = np.asarray(x, np.float64)
    got_y, got_b = bias_grads(add_bias)
    want_y, _ = bias_grads(lambda y, b: y + b)
    assert got_b.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got_y), np.asarray(want_y))
    exact_bias = cotangent.reshape(-1, 4).sum(0)
    scale = np.abs(cotangent).reshape(-1, 4).sum(0)
    assert np.all(np.abs(np.asarray(got_b, np.float64) - exact_bias) <= 1e-2 * scale), (
        got_b,
        exact_bias,
    )

    params = {"params": {"slope": jnp.array([0.25, 0.1, -0.5, 1.5])}}

    def plain(p, v):
        return jnp.where(v >= 0, v, p["params"]["slope"].astype(v.dtype) * v)

    def prelu_grads(fn):
        return jax.grad(lambda p, v: jnp.sum(weights * fn(p, v).astype(jnp.float32)), (0, 1))(
            params, x
        )

    got_p, got_x = prelu_grads(PReLU().apply)
    _, want_x = prelu_grads(plain)
    np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want_x))
    terms = np.where(xs < 0, xs * cotangent, 0).reshape(-1, 4)
    slope_error = np.abs(np.asarray(got_p["params"]["slope"]) - terms.sum(0))
    assert np.all(slope_error <= 1e-2 * np.abs(terms).sum(0)), (got_p, terms.sum(0))
    assert PReLU().apply(params, x).dtype == dtype
