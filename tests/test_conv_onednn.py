"""Tests of the oneDNN convolution (`synjax.models.conv_onednn`) beyond the
implementation-wide comparisons with `lax.conv_general_dilated` in
tests/test_conv_impl.py: hand-computed values, its place in `Conv3D`'s rules,
fallbacks and one-line errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import ConfigError
from synjax.models import UNet3D, UNet3DSettings, conv_onednn
from synjax.models.conv import Conv3D, resolve_implementation
from synjax.models.conv_onednn import conv3d_onednn, padding_amounts

pytestmark = pytest.mark.skipif(
    not conv_onednn.available(), reason=f"oneDNN: {conv_onednn.unavailable_reason()}"
)


def test_hand_computed_sum_of_neighbours_and_gradients():
    # A 3x3x3 all-ones kernel with SAME padding sums each voxel's neighbourhood:
    # on a 3x3x3 block of ones the centre sees 27, a corner 8, an edge 12, a face 18.
    x = jnp.ones((1, 3, 3, 3, 1))
    kernel = jnp.ones((3, 3, 3, 1, 1))
    y = np.asarray(conv3d_onednn(x, kernel, "SAME"))[0, ..., 0]
    assert y[1, 1, 1] == 27 and y[0, 0, 0] == 8 and y[0, 0, 1] == 12 and y[0, 1, 1] == 18
    # d(sum y)/dx counts the outputs each input reaches (the same numbers, by
    # symmetry); d(sum y)/dkernel[tap] counts the in-volume voxels that tap reads.
    grad_x, grad_k = jax.grad(lambda v, k: conv3d_onednn(v, k, "SAME").sum(), (0, 1))(x, kernel)
    np.testing.assert_array_equal(np.asarray(grad_x)[0, ..., 0], y)
    assert float(grad_k[1, 1, 1, 0, 0]) == 27 and float(grad_k[0, 0, 0, 0, 0]) == 8


def test_hand_computed_shift_and_channels():
    # A kernel with one tap at (0, 0, 0) copies input[z, y, x] to the VALID
    # output at [z, y, x] (offset = low corner), channels mixed by the tap's matrix.
    x = jnp.arange(2 * 4 * 4 * 4 * 2, dtype=jnp.float32).reshape(2, 4, 4, 4, 2)
    kernel = jnp.zeros((2, 3, 2, 2, 3)).at[0, 0, 0].set(jnp.array([[1.0, 0, 2], [0, 1, -1]]))
    y = conv3d_onednn(x, kernel, "VALID")
    assert y.shape == (2, 3, 2, 3, 3)
    crop = x[:, :3, :2, :3]
    want = jnp.stack([crop[..., 0], crop[..., 1], 2 * crop[..., 0] - crop[..., 1]], -1)
    np.testing.assert_array_equal(y, want)


def test_padding_amounts_as_lax_places_them():
    assert padding_amounts((3, 3, 3), "SAME") == ((1, 1, 1), (1, 1, 1))
    assert padding_amounts((2, 4, 1), "SAME") == ((0, 1, 0), (1, 2, 0))
    assert padding_amounts((3, 5, 2), "VALID") == ((0, 0, 0), (0, 0, 0))


def test_auto_and_fastest_take_onednn_on_cpu_and_conv3d_calls_it():
    assert jax.default_backend() == "cpu"
    assert resolve_implementation("auto") == "onednn"
    assert resolve_implementation("fastest", 8) == "onednn"
    assert resolve_implementation("folded") == "folded"
    module = Conv3D(3, (3, 3, 3))
    x = jnp.zeros((1, 4, 6, 6, 2))
    params = jax.eval_shape(module.init, jax.random.key(0), x)
    assert "synjax_conv3d_onednn_forward" in str(jax.make_jaxpr(module.apply)(params, x))


def test_float16_falls_back_to_xla_and_explicit_onednn_rejects_it():
    x = jnp.ones((1, 3, 5, 5, 2))
    module = Conv3D(2, (3, 3, 3), dtype=jnp.float16)
    params = module.init(jax.random.key(0), x)
    jaxpr = str(jax.make_jaxpr(module.apply)(params, x))
    assert "onednn" not in jaxpr
    assert module.apply(params, x).dtype == jnp.float16
    with pytest.raises(ConfigError, match="float32 or both bfloat16"):
        module.clone(implementation="onednn").apply(params, x)
    with pytest.raises(ConfigError, match="input float32 and kernel bfloat16"):
        conv3d_onednn(x.astype(jnp.float32), jnp.ones((1, 1, 1, 2, 2), jnp.bfloat16), "SAME")


def test_unavailable_onednn_is_one_line_when_asked_for_and_a_fallback_otherwise(monkeypatch):
    monkeypatch.setattr(conv_onednn, "available", lambda: False)
    monkeypatch.setattr(conv_onednn, "unavailable_reason", lambda: "no compiler here")
    assert resolve_implementation("auto") == "folded"
    x = jnp.ones((1, 3, 5, 5, 2))
    with pytest.raises(ConfigError, match="'onednn': no compiler here"):
        conv3d_onednn(x, jnp.ones((3, 3, 3, 2, 2)), "SAME")


def test_a_failed_build_names_the_step(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNJAX_EXTENSION_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "definitely-not-a-compiler")
    monkeypatch.setenv("PATH", str(tmp_path))  # neither $CXX nor c++ on PATH
    with pytest.raises(RuntimeError, match=r"no C\+\+ compiler"):
        conv_onednn._build(conv_onednn._onednn_prefix())
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.undo()
    monkeypatch.setenv("SYNJAX_EXTENSION_CACHE", str(tmp_path))
    monkeypatch.setattr(conv_onednn, "SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"building broken.cc failed: .*error"):
        conv_onednn._build(conv_onednn._onednn_prefix())


def test_the_library_is_built_once_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SYNJAX_EXTENSION_CACHE", str(tmp_path))
    first = conv_onednn._build(conv_onednn._onednn_prefix())
    stamp = first.stat().st_mtime_ns
    assert conv_onednn._build(conv_onednn._onednn_prefix()) == first
    assert first.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path


def test_unet_default_equals_native_forward_and_gradient():
    # The whole partner U-Net (VALID convolutions, pooling, up-convolutions,
    # crops) on the default path against XLA's own convolutions.
    cfg = UNet3DSettings(depth=2, base_features=4, pool_factors=((1, 2, 2), (1, 2, 2)))
    x = jax.random.normal(jax.random.key(1), (1, *cfg.valid_input_shape((2, 4, 4)), 1))
    model = UNet3D(cfg)
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    native = UNet3D(dataclasses.replace(cfg, conv_implementation="native"))

    def run(m):
        def loss(p):
            return jnp.sum(m.apply({"params": p}, x) ** 2)

        return jax.jit(lambda p: (m.apply({"params": p}, x), jax.grad(loss)(p)))(params)

    got_y, got_g = run(model)
    want_y, want_g = run(native)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g), strict=True):
        scale = max(float(jnp.abs(want).max()), 1e-3)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * scale)


def test_independent_convolutions_in_one_program_run_concurrently_and_correctly():
    # XLA may run independent custom calls on several threads at once. The Mask
    # R-CNN training step (the fluorescence smoke runs of the test suite)
    # segfaulted while the calls shared oneDNN's library scratchpad; this is a
    # smaller program of the same pattern (it did not crash with the shared
    # scratchpad here): independent convolutions and their gradients, vs lax.
    shapes = [((2, 4, 9, 8, c), (3, 3, 3, c, f)) for c, f in ((1, 4), (3, 5), (8, 8), (16, 4))]
    xs = [jax.random.normal(jax.random.key(i), s) for i, (s, _) in enumerate(shapes)]
    ks = [jax.random.normal(jax.random.key(10 + i), k) for i, (_, k) in enumerate(shapes)]

    def total(fn, xs, ks):
        return sum(jnp.sum(fn(x, k) ** 2) for x, k in zip(xs, ks, strict=True))

    def lax_conv(x, k):
        return jax.lax.conv_general_dilated(
            x,
            k,
            (1, 1, 1),
            "SAME",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
            precision=jax.lax.Precision.HIGHEST,
        )

    ours = jax.jit(
        jax.value_and_grad(
            lambda a, b: total(lambda x, k: conv3d_onednn(x, k, "SAME"), a, b), (0, 1)
        )
    )
    want_value, want_grads = jax.value_and_grad(lambda a, b: total(lax_conv, a, b), (0, 1))(xs, ks)
    for _ in range(5):
        value, grads = ours(xs, ks)
        np.testing.assert_allclose(value, want_value, rtol=1e-4)
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * float(jnp.abs(want).max()))


def test_vmap_over_examples_equals_one_call_per_example():
    # The instance U-Net's heads vmap convolutions over examples; kernels
    # batched too (per-example weights), forward and gradient.
    xs = jax.random.normal(jax.random.key(0), (3, 1, 4, 6, 5, 2))
    ks = jax.random.normal(jax.random.key(1), (3, 3, 3, 3, 2, 4))

    def loss(x, k):
        return jnp.sum(conv3d_onednn(x, k, "SAME") ** 2)

    got = jax.vmap(jax.value_and_grad(loss, (0, 1)))(xs, ks)
    for i in range(3):
        value, (grad_x, grad_k) = jax.value_and_grad(loss, (0, 1))(xs[i], ks[i])
        np.testing.assert_allclose(got[0][i], value, rtol=1e-5)
        np.testing.assert_allclose(got[1][0][i], grad_x, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1][1][i], grad_k, rtol=1e-5, atol=1e-4)
