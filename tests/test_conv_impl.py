"""Tests of every `Conv3D` implementation against `lax.conv_general_dilated`.

The reference is XLA's own 3D convolution at HIGHEST precision and its
automatic gradient; each implementation must match it forward and in the
gradients w.r.t. input and kernel, for SAME and VALID padding, odd shapes,
even kernels and several channel counts. "taps" has a hand-written backward
pass (`conv_taps`), so its gradient is the part most worth testing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from synjax.errors import ConfigError
from synjax.models import UNet3D, UNet3DSettings, conv_taps
from synjax.models.conv import (
    AUTO_TAPS_MAX_CHANNELS,
    TAPS_MAX_FIRST_LAYER_TAPS,
    TAPS_MIN_VALID_OUTPUT_FRACTION,
    Conv3D,
    auto_implementation,
    conv3d_folded,
    conv3d_folded_sum,
    conv3d_folded_taps,
    conv3d_native,
    resolve_implementation,
)
from synjax.models.conv_onednn import conv3d_onednn
from synjax.models.conv_taps import conv3d_taps
from synjax.models.layers import ConvBlock

IMPLS = {
    "native": conv3d_native,
    "folded": conv3d_folded,
    "folded_sum": conv3d_folded_sum,
    "folded_taps": conv3d_folded_taps,
    "taps": conv3d_taps,
    "onednn": conv3d_onednn,
}
# float32 sums of at most a few hundred products of unit-scale values.
RTOL = 1e-4
ATOL = 1e-4

CASES = [
    # (input [b, z, y, x, c], features, kernel, padding)
    ((2, 5, 9, 7, 3), 4, (3, 3, 3), "SAME"),
    ((1, 6, 9, 8, 1), 4, (3, 3, 3), "VALID"),
    ((1, 6, 7, 8, 8), 5, (3, 3, 3), "VALID"),
    ((1, 4, 6, 5, 1), 3, (1, 3, 3), "SAME"),
    ((2, 5, 6, 5, 2), 9, (3, 1, 1), "VALID"),
    ((1, 5, 6, 7, 3), 2, (2, 3, 2), "SAME"),
    ((1, 5, 6, 7, 3), 2, (2, 2, 4), "VALID"),
    ((1, 7, 8, 6, 2), 3, (5, 3, 1), "VALID"),
    ((2, 3, 4, 5, 17), 6, (1, 1, 1), "SAME"),
]


def _random(shape, seed, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(dtype))


def reference(x, kernel, padding):
    """XLA's 3D convolution, channels last, at full float32 precision."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1, 1),
        padding=padding,
        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        precision=lax.Precision.HIGHEST,
    )


def _weighted_grads(fn, x, kernel, weights):
    # A weighted sum, so that every output element has its own gradient.
    return jax.grad(lambda v, k: jnp.sum(weights * fn(v, k).astype(jnp.float32)), (0, 1))(x, kernel)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("shape", "features", "kernel_size", "padding"), CASES)
def test_forward_and_gradients_match_lax(shape, features, kernel_size, padding, impl):
    x = _random(shape, 0)
    kernel = _random((*kernel_size, shape[-1], features), 1)

    def ours(v, k):
        return IMPLS[impl](v, k, padding, precision=lax.Precision.HIGHEST)

    want = reference(x, kernel, padding)
    got = jax.jit(ours)(x, kernel)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    weights = _random(want.shape, 2)
    want_x, want_k = _weighted_grads(lambda v, k: reference(v, k, padding), x, kernel, weights)
    got_x, got_k = jax.jit(lambda v, k: _weighted_grads(ours, v, k, weights))(x, kernel)
    assert got_x.shape == x.shape and got_k.shape == kernel.shape
    np.testing.assert_allclose(got_x, want_x, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(got_k, want_k, rtol=RTOL, atol=ATOL * 10)


@pytest.mark.parametrize("padding", ("SAME", "VALID"))
def test_taps_in_z_slabs_equals_lax(padding):
    # A budget of one element forces one output z-slice per slab, in the
    # forward pass and in both gradients.
    x = _random((2, 6, 7, 6, 3), 3)
    kernel = _random((3, 3, 2, 3, 4), 4)
    want = reference(x, kernel, padding)

    def sliced(v, k):
        return conv3d_taps(v, k, padding, lax.Precision.HIGHEST, max_slab_elements=1)

    np.testing.assert_allclose(sliced(x, kernel), want, rtol=RTOL, atol=ATOL)
    weights = _random(want.shape, 5)
    want_grads = _weighted_grads(lambda v, k: reference(v, k, padding), x, kernel, weights)
    got_grads = _weighted_grads(sliced, x, kernel, weights)
    for got, expected in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * 10)


def test_taps_hand_computed_sum_of_neighbours_and_gradient():
    # All-ones 3x3x3 kernel, SAME, all-ones input: each output counts the
    # in-volume neighbours (corner 8, edge 12, face 18, centre 27).
    x = jnp.ones((1, 3, 3, 3, 1))
    kernel = jnp.ones((3, 3, 3, 1, 1))
    face = [[8, 12, 8], [12, 18, 12], [8, 12, 8]]
    middle = [[12, 18, 12], [18, 27, 18], [12, 18, 12]]
    want = np.array([face, middle, face], np.float32)
    np.testing.assert_array_equal(conv3d_taps(x, kernel, "SAME")[0, ..., 0], want)
    # d(sum of outputs)/d(kernel tap t) = sum of the input under that tap over
    # all outputs: the centre tap sees all 27 voxels, a face tap 18, an edge
    # tap 12, a corner tap 8 -- the same table.
    grad_k = jax.grad(lambda k: jnp.sum(conv3d_taps(x, k, "SAME")))(kernel)
    np.testing.assert_array_equal(grad_k[..., 0, 0], want)


def test_taps_hand_computed_shift():
    # A kernel that picks the voxel one z-slice up and one x-voxel right:
    # VALID output (z, x) is input (z + 1, x + 1).
    x = jnp.arange(12.0).reshape(1, 3, 1, 4, 1)
    kernel = jnp.zeros((3, 1, 3, 1, 1)).at[1, 0, 1].set(1.0)
    np.testing.assert_array_equal(conv3d_taps(x, kernel, "VALID").ravel(), [5.0, 6.0])


@pytest.mark.parametrize("impl", ("taps", "folded_taps", "onednn"))
def test_bfloat16_within_bfloat16_tolerance(impl):
    x = _random((1, 6, 9, 8, 8), 6)
    kernel = _random((3, 3, 3, 8, 5), 7) / 8
    want = reference(x, kernel, "SAME")
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    got = IMPLS[impl](xb, kb, "SAME")
    assert got.dtype == jnp.bfloat16
    # bfloat16 keeps 8 significant bits: inputs rounded by 2^-9 relative, the
    # result rounded once more; the sums themselves are float32.
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0, atol=0.02 * scale)
    weights = _random(want.shape, 8)
    want_x, want_k = _weighted_grads(lambda v, k: reference(v, k, "SAME"), x, kernel, weights)
    got_x, got_k = _weighted_grads(lambda v, k: IMPLS[impl](v, k, "SAME"), xb, kb, weights)
    assert got_x.dtype == jnp.bfloat16 and got_k.dtype == jnp.bfloat16
    for got_g, want_g in ((got_x, want_x), (got_k, want_k)):
        tol = 0.02 * float(jnp.abs(want_g).max())
        np.testing.assert_allclose(np.asarray(got_g, np.float32), want_g, rtol=0, atol=tol)


def test_taps_float32_kernel_gradient_accumulates_in_float32_for_bfloat16():
    # 4096 products of 1 each: a bfloat16 running sum would stall at 256
    # (its spacing there is 2); the float32 sum, rounded once, is exactly 4096.
    x = jnp.ones((1, 4, 32, 32, 1), jnp.bfloat16)
    kernel = jnp.ones((1, 1, 1, 1, 1), jnp.bfloat16)
    grad_k = jax.grad(lambda k: jnp.sum(conv3d_taps(x, k, "VALID").astype(jnp.float32)))(kernel)
    assert float(grad_k.ravel()[0]) == 4096.0


def test_conv3d_module_taps_matches_native():
    x = _random((1, 5, 8, 7, 8), 9)
    module = Conv3D(6, (3, 3, 3), padding="VALID", implementation="native")
    params = jax.tree.map(lambda p: p + 0.1, jax.jit(module.init)(jax.random.key(0), x))
    want = jax.jit(module.apply)(params, x)
    got = jax.jit(module.clone(implementation="taps").apply)(params, x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_fastest_on_cpu_picks_by_input_channels(without_onednn):
    assert jax.default_backend() == "cpu"
    assert resolve_implementation("fastest", AUTO_TAPS_MAX_CHANNELS) == "taps"
    assert resolve_implementation("fastest", AUTO_TAPS_MAX_CHANNELS + 1) == "folded_taps"
    assert resolve_implementation("fastest") == "folded_taps"
    assert resolve_implementation("auto", AUTO_TAPS_MAX_CHANNELS) == "folded"
    assert resolve_implementation("taps", 1) == "taps"
    with auto_implementation("native"):
        assert resolve_implementation("auto", 64) == "native"


def test_fastest_on_cpu_picks_by_shape(without_onednn):
    # The boundary cases below are built on these values.
    assert (AUTO_TAPS_MAX_CHANNELS, TAPS_MAX_FIRST_LAYER_TAPS) == (1, 9)
    assert TAPS_MIN_VALID_OUTPUT_FRACTION == 0.5

    def fastest(shape, kernel, padding="SAME"):
        return resolve_implementation(
            "fastest", shape[-1], input_shape=shape, kernel_size=kernel, padding=padding
        )

    # A 1x1x1 kernel is one matrix product, whatever the size or padding.
    assert fastest((2, 32, 24, 24, 8), (1, 1, 1)) == "taps"
    assert fastest((256, 1, 1, 1, 64), (1, 1, 1), "VALID") == "taps"
    # SAME: folded, large or small, except a first layer of <= 9 taps on 1 channel.
    assert fastest((2, 32, 24, 24, 8), (3, 3, 3)) == "folded"
    assert fastest((2, 8, 128, 128, 8), (3, 3, 3)) == "folded"
    assert fastest((2, 8, 128, 128, 1), (3, 3, 3)) == "folded"
    assert fastest((4, 8, 64, 64, 1), (1, 3, 3)) == "taps"
    assert fastest((4, 8, 64, 64, 2), (1, 3, 3)) == "folded"
    # VALID: taps on 1 channel, folded_taps above, large slices or small.
    assert fastest((1, 10, 156, 156, 1), (3, 3, 3), "VALID") == "taps"
    assert fastest((1, 10, 154, 154, 24), (3, 3, 3), "VALID") == "folded_taps"
    assert fastest((1, 10, 14, 14, 648), (3, 3, 3), "VALID") == "folded_taps"
    # ... unless the output keeps less than half the input's y-x area:
    # 3x7x7 on 3x7x7 ROIs keeps 1 of 49; 4 x 4 -> 2 x 2 keeps 1/4; 4 x 4 -> 4 x 2
    # (kernel 1x1x3) keeps exactly 1/2.
    assert fastest((256, 3, 7, 7, 32), (3, 7, 7), "VALID") == "folded"
    assert fastest((256, 3, 7, 7, 1), (3, 7, 7), "VALID") == "folded"
    assert fastest((1, 3, 4, 4, 8), (3, 3, 3), "VALID") == "folded"
    assert fastest((1, 3, 4, 4, 8), (1, 1, 3), "VALID") == "folded_taps"
    # "auto" ignores the shape: still folded on CPU.
    auto = resolve_implementation(
        "auto", 1, input_shape=(1, 4, 9, 9, 1), kernel_size=(1, 1, 1), padding="SAME"
    )
    assert auto == "folded"


def test_conv3d_module_resolves_fastest_from_its_input_shape(without_onednn):
    def primitives(shape, kernel):
        module = Conv3D(3, kernel, implementation="fastest")
        x = jnp.zeros(shape)
        params = jax.eval_shape(module.init, jax.random.key(0), x)
        return str(jax.make_jaxpr(module.apply)(params, x))

    small = primitives((1, 3, 8, 8, 2), (3, 3, 3))  # folded: one 2D conv, no tap products
    assert "conv_general_dilated" in small and "dot_general" not in small
    pointwise = primitives((1, 3, 8, 8, 2), (1, 1, 1))  # taps: a product, no conv
    assert "conv_general_dilated" not in pointwise and "dot_general" in pointwise


def test_product_groups_merge_small_slices_hand_computed():
    assert conv_taps.MIN_PRODUCT_VOXELS == 1024
    assert conv_taps._product_groups(12, 2000) == 12  # slices large enough: one each
    assert conv_taps._product_groups(12, 300) == 3  # 3600 voxels: at most 3 groups of >= 1024
    assert conv_taps._product_groups(7, 300) == 1  # 7 is prime: one product
    assert conv_taps._product_groups(5, 10) == 1


@pytest.mark.parametrize("min_voxels", (1, 30, 10**6))
@pytest.mark.parametrize("padding", ("SAME", "VALID"))
def test_taps_kernel_gradient_in_merged_slices_equals_lax(monkeypatch, min_voxels, padding):
    # 1: one product per z-slice; 30: slices merged in groups; 10**6: one product.
    monkeypatch.setattr(conv_taps, "MIN_PRODUCT_VOXELS", min_voxels)
    x = _random((2, 6, 5, 4, 3), 11)
    kernel = _random((3, 3, 2, 3, 4), 12)
    want = reference(x, kernel, padding)
    weights = _random(want.shape, 13)
    for impl in ("taps", "folded_taps"):

        def ours(v, k, impl=impl):
            return IMPLS[impl](v, k, padding, precision=lax.Precision.HIGHEST)

        want_grads = _weighted_grads(lambda v, k: reference(v, k, padding), x, kernel, weights)
        got_grads = _weighted_grads(ours, x, kernel, weights)
        for got, expected in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL * 10)


def test_conv_block_fastest_equals_native_forward_and_gradient(without_onednn):
    # "fastest" runs the block's first convolution (1 input channel, VALID,
    # 9x8 -> 7x6) as taps and its second (7x6 -> 5x4, under half the area) as
    # folded. Same output and parameter gradients as XLA's own convolutions.
    x = _random((1, 6, 9, 8, AUTO_TAPS_MAX_CHANNELS), 10)
    block = ConvBlock(4, (3, 3, 3), padding="VALID", conv_implementation="fastest")
    params = jax.tree.map(lambda p: p + 0.05, jax.jit(block.init)(jax.random.key(0), x)["params"])

    def run(module):
        def loss(p):
            return jnp.sum(module.apply({"params": p}, x) ** 2)

        return jax.jit(lambda p: (module.apply({"params": p}, x), jax.grad(loss)(p)))(params)

    got_y, got_grads = run(block)
    want_y, want_grads = run(block.clone(conv_implementation="native"))
    np.testing.assert_allclose(got_y, want_y, rtol=RTOL, atol=ATOL)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        scale = max(float(jnp.abs(want).max()), 1.0)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)


def test_taps_rejects_bad_input():
    x = jnp.ones((1, 2, 4, 4, 1))
    with pytest.raises(ConfigError, match="padding"):
        conv3d_taps(x, jnp.ones((1, 3, 3, 1, 1)), "CIRCULAR")
    with pytest.raises(ConfigError, match="smaller than kernel"):
        conv3d_taps(x, jnp.ones((3, 3, 3, 1, 1)), "VALID")
    with pytest.raises(ConfigError, match="kernel"):
        conv3d_taps(x, jnp.ones((1, 3, 3, 2, 1)), "SAME")
    with pytest.raises(ConfigError, match="max_slab_elements"):
        conv3d_taps(x, jnp.ones((1, 3, 3, 1, 1)), "SAME", max_slab_elements=0)


def test_unet_settings_conv_implementation_reaches_every_convolution():
    cfg = UNet3DSettings(depth=1, base_features=4, pool_factors=((1, 2, 2),))
    x = jnp.zeros((1, *cfg.valid_input_shape((1, 2, 2)), 1))
    params = jax.eval_shape(UNet3D(cfg).init, jax.random.key(0), x)["params"]

    def conv_ops(impl):
        model = UNet3D(dataclasses.replace(cfg, conv_implementation=impl))
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params)).count(
            "conv_general_dilated"
        )

    # native: 3 blocks x 2 convs, the transposed up-convolution, the 1x1x1
    # output nn.Conv; taps: only the output nn.Conv (the rest is matmuls).
    assert conv_ops("native") == 8
    assert conv_ops("taps") == 1
    with pytest.raises(ConfigError, match="conv_implementation"):
        UNet3DSettings(conv_implementation="fast")
