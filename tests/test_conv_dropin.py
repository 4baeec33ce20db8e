"""oneDNN's strided, dilated and transposed convolutions (`conv_onednn.conv_onednn`,
`conv_onednn.conv_transpose_onednn`) and the flax drop-ins built on them
(`synjax.models.conv_dropin`), against hand-computed values and lax's
convolutions, forward and both gradients; DeepEM3D-Net through them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from synjax.errors import ConfigError
from synjax.models import conv_onednn
from synjax.models.conv import auto_implementation
from synjax.models.conv_dropin import Conv, ConvTranspose, conv_general_dilated
from synjax.models.deepem3d import DeepEM3DNet, DeepEM3DSettings

pytestmark = pytest.mark.skipif(
    not conv_onednn.available(), reason=f"oneDNN: {conv_onednn.unavailable_reason()}"
)

LAYOUT_3D = ("NDHWC", "DHWIO", "NDHWC")
LAYOUT_2D = ("NHWC", "HWIO", "NHWC")
ONEDNN = "synjax_conv3d_onednn"


def _line(values, axis=3):
    """A [1, 1, 1, n, 1] volume with `values` along x (axis=3) as float32."""
    shape = [1, 1, 1, 1, 1]
    shape[axis] = len(values)
    return jnp.asarray(values, jnp.float32).reshape(shape)


def test_hand_computed_stride_dilation_and_transpose():
    x = _line([1, 2, 3, 4, 5, 6])
    kernel = jnp.asarray([1.0, 10.0]).reshape(1, 1, 2, 1, 1)
    # Stride 2: out[i] = x[2i] + 10 x[2i + 1].
    y = conv_onednn.conv_onednn(x, kernel, (1, 1, 2), ((0, 0), (0, 0), (0, 0)))
    np.testing.assert_array_equal(np.asarray(y).ravel(), [21, 43, 65])
    # Dilation 2: out[i] = x[i] + 10 x[i + 2].
    y = conv_onednn.conv_onednn(x[:, :, :, :5], kernel, (1, 1, 1), ((0, 0),) * 3, (1, 1, 2))
    np.testing.assert_array_equal(np.asarray(y).ravel(), [31, 42, 53])
    # Transposed, stride = kernel = 2, VALID: each input value becomes the block
    # value * (k1, k0) (lax applies the kernel flipped).
    kernel = jnp.asarray([5.0, 7.0]).reshape(1, 1, 2, 1, 1)
    pads = [conv_onednn.transpose_padding(k, s, 1, "VALID") for k, s in ((1, 1), (1, 1), (2, 2))]
    y = conv_onednn.conv_transpose_onednn(_line([2, 3]), kernel, (1, 1, 2), pads)
    np.testing.assert_array_equal(np.asarray(y).ravel(), [14, 10, 21, 15])


def _compare(got_fn, want_fn, x, kernel, rtol=2e-5):
    """Forward and both gradients of got_fn and want_fn at (x, kernel)."""
    want, want_vjp = jax.vjp(want_fn, x, kernel)
    got, got_vjp = jax.vjp(got_fn, x, kernel)
    assert got.shape == want.shape and got.dtype == want.dtype
    grad_out = jnp.asarray(np.random.default_rng(1).normal(size=want.shape), want.dtype)
    pairs = [(got, want), *zip(got_vjp(grad_out), want_vjp(grad_out), strict=True)]
    for name, (a, b) in zip(("output", "input gradient", "kernel gradient"), pairs, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        scale = max(float(np.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a / scale, b / scale, atol=rtol, err_msg=name)


# (input shape, kernel shape, strides, padding, dilation)
STRIDED = [
    # DeepEM3D-Net's stem: 3D, stride (1, 2, 2), valid in z and padded by 1 in y, x.
    ((1, 5, 20, 20, 1), (3, 3, 3, 1, 8), (1, 2, 2), ((0, 0), (1, 1), (1, 1)), (1, 1, 1)),
    ((2, 1, 16, 15, 6), (1, 3, 3, 6, 5), (1, 2, 2), "SAME", (1, 1, 1)),
    ((1, 1, 17, 15, 6), (1, 7, 1, 6, 5), (1, 1, 1), "SAME", (1, 1, 1)),
    ((1, 2, 16, 16, 4), (2, 3, 3, 4, 3), (1, 1, 1), "SAME", (1, 2, 3)),
    ((1, 4, 9, 11, 3), (2, 3, 3, 3, 4), (2, 2, 3), "VALID", (1, 1, 1)),
]


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, dilation", STRIDED)
def test_strided_dilated_equals_lax(x_shape, k_shape, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    extents = [(k - 1) * d + 1 for k, d in zip(k_shape[:3], dilation, strict=True)]
    pads = (
        lax.padtype_to_pads(x_shape[1:4], extents, strides, padding)
        if isinstance(padding, str)
        else padding
    )

    def want(v, k):
        return lax.conv_general_dilated(
            v, k, strides, pads, rhs_dilation=dilation, dimension_numbers=LAYOUT_3D
        )

    _compare(lambda v, k: conv_onednn.conv_onednn(v, k, strides, pads, dilation), want, x, kernel)


# (input shape, kernel shape, strides, padding, dilation): DeepEM3D-Net's
# side outputs (stride f, kernel 2f, odd dilations) and 3D cases.
TRANSPOSED = [
    ((1, 1, 8, 8, 5), (1, 4, 4, 5, 2), (1, 2, 2), "SAME", (1, 1, 1)),
    ((1, 1, 8, 8, 5), (1, 4, 4, 5, 2), (1, 2, 2), "SAME", (1, 3, 3)),
    ((1, 1, 4, 4, 5), (1, 16, 16, 5, 2), (1, 8, 8), "SAME", (1, 5, 5)),
    ((1, 1, 2, 2, 3), (1, 32, 32, 3, 2), (1, 16, 16), "SAME", (1, 3, 3)),
    ((2, 3, 4, 5, 3), (2, 2, 2, 3, 4), (2, 2, 2), "VALID", (1, 1, 1)),
    ((1, 2, 5, 5, 3), (3, 3, 3, 3, 4), (1, 2, 2), "SAME", (1, 1, 1)),
]


@pytest.mark.parametrize("x_shape, k_shape, strides, padding, dilation", TRANSPOSED)
def test_transposed_equals_lax_conv_transpose(x_shape, k_shape, strides, padding, dilation):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    pads = [
        conv_onednn.transpose_padding(k, s, d, padding)
        for k, s, d in zip(k_shape[:3], strides, dilation, strict=True)
    ]

    def want(v, k):
        return lax.conv_transpose(
            v, k, strides, padding, rhs_dilation=dilation, dimension_numbers=LAYOUT_3D
        )

    _compare(
        lambda v, k: conv_onednn.conv_transpose_onednn(v, k, strides, pads, dilation),
        want,
        x,
        kernel,
    )


def test_bfloat16_strided_and_transposed_equal_lax_at_bfloat16_precision():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 1, 16, 16, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(1, 3, 3, 8, 8)), jnp.bfloat16)
    pads = ((0, 0), (0, 1), (0, 1))

    def want(v, k):
        return lax.conv_general_dilated(v, k, (1, 2, 2), pads, dimension_numbers=LAYOUT_3D)

    strided = jax.jit(lambda v, k: conv_onednn.conv_onednn(v, k, (1, 2, 2), pads))
    _compare(strided, want, x, kernel, rtol=2e-2)
    pads = [conv_onednn.transpose_padding(k, s, 1, "SAME") for k, s in ((1, 1), (4, 2), (4, 2))]
    kernel = jnp.asarray(rng.normal(size=(1, 4, 4, 8, 8)), jnp.bfloat16)

    def want_t(v, k):
        return lax.conv_transpose(v, k, (1, 2, 2), "SAME", dimension_numbers=LAYOUT_3D)

    transposed = jax.jit(lambda v, k: conv_onednn.conv_transpose_onednn(v, k, (1, 2, 2), pads))
    _compare(transposed, want_t, x, kernel, rtol=2e-2)


def test_transposed_padding_oneDNN_cannot_take_is_one_line():
    x = jnp.ones((1, 1, 4, 4, 2))
    kernel = jnp.ones((1, 3, 3, 2, 2))
    with pytest.raises(ConfigError, match="expected >= 0"):
        conv_onednn.conv_transpose_onednn(x, kernel, (1, 2, 2), ((0, 0), (5, 5), (0, 0)))


@pytest.mark.parametrize("spatial", [2, 3])
def test_conv_general_dilated_is_lax_for_flax_conv(spatial):
    rng = np.random.default_rng(0)
    shape = (2, 3, 13, 12, 4) if spatial == 3 else (2, 13, 12, 4)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    for kernel_size, strides, padding, dilation in [
        ((3,) * spatial, (2,) * spatial, "SAME", (1,) * spatial),
        ((1,) * (spatial - 1) + (7,), (1,) * spatial, "SAME", (1,) * spatial),
        ((3,) * spatial, (1,) * spatial, "VALID", (1,) * (spatial - 1) + (2,)),
    ]:
        ours = Conv(5, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation)
        theirs = nn.Conv(5, kernel_size, strides=strides, padding=padding, kernel_dilation=dilation)
        params = theirs.init(jax.random.key(0), x)
        # Same parameter tree and initial values: checkpoints carry over.
        assert jax.tree.all(jax.tree.map(np.array_equal, ours.init(jax.random.key(0), x), params))
        assert ONEDNN in str(jax.make_jaxpr(ours.apply)(params, x))
        kernel = params["params"]["kernel"]
        bias = params["params"]["bias"]
        _compare(
            lambda v, k, ours=ours, b=bias: ours.apply({"params": {"kernel": k, "bias": b}}, v),
            lambda v, k, theirs=theirs, b=bias: theirs.apply(
                {"params": {"kernel": k, "bias": b}}, v
            ),
            x,
            kernel,
        )


def test_conv_general_dilated_falls_back_to_lax_where_onednn_does_not_apply():
    x = jnp.ones((1, 8, 8, 4))
    kernel = jnp.ones((3, 3, 4, 4))

    def jaxpr(fn, *args):
        return str(jax.make_jaxpr(fn)(*args))

    def call(lhs, rhs, **kwargs):
        dims = kwargs.pop("dimension_numbers", LAYOUT_2D)
        pads = ((1, 1), (1, 1))  # explicit: lax takes no "SAME" with input dilation
        return conv_general_dilated(lhs, rhs, (1, 1), pads, dimension_numbers=dims, **kwargs)

    assert ONEDNN in jaxpr(call, x, kernel)
    fallbacks = {
        "input dilation": lambda v, k: call(v, k, lhs_dilation=(2, 2)),
        "groups": lambda v, k: call(v, k[..., :2, :], feature_group_count=2),
        "float16": lambda v, k: call(v.astype(jnp.float16), k.astype(jnp.float16)),
        "channels first": lambda v, k: call(
            v.transpose(0, 3, 1, 2), k, dimension_numbers=("NCHW", "HWIO", "NCHW")
        ),
    }
    for name, fn in fallbacks.items():
        text = jaxpr(fn, x, kernel)
        assert ONEDNN not in text and "conv_general_dilated" in text, name
    with auto_implementation("native"):  # a new function: traces are cached per function
        assert ONEDNN not in jaxpr(lambda v, k: call(v, k), x, kernel)
    # The fallback computes what lax computes.
    np.testing.assert_array_equal(
        fallbacks["input dilation"](x, kernel),
        lax.conv_general_dilated(
            x, kernel, (1, 1), ((1, 1), (1, 1)), lhs_dilation=(2, 2), dimension_numbers=LAYOUT_2D
        ),
    )


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((3, 2), (1, 4))])
def test_conv_transpose_module_is_flax_conv_transpose(padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 5, 3)), jnp.float32)
    kwargs = {"strides": (2, 2), "padding": padding, "kernel_dilation": (3, 3)}
    ours = ConvTranspose(4, (4, 4), **kwargs)
    theirs = nn.ConvTranspose(4, (4, 4), **kwargs)
    params = theirs.init(jax.random.key(0), x)
    assert jax.tree.all(jax.tree.map(np.array_equal, ours.init(jax.random.key(0), x), params))
    assert ONEDNN in str(jax.make_jaxpr(ours.apply)(params, x))
    bias = params["params"]["bias"]
    _compare(
        lambda v, k: ours.apply({"params": {"kernel": k, "bias": bias}}, v),
        lambda v, k: theirs.apply({"params": {"kernel": k, "bias": bias}}, v),
        x,
        params["params"]["kernel"],
    )
    with auto_implementation("native"):
        assert ONEDNN not in str(jax.make_jaxpr(ours.apply)(params, x))
    with pytest.raises(ConfigError, match="expected SAME or VALID"):
        ConvTranspose(4, (4, 4), padding="CIRCULAR").init(jax.random.key(0), x)


def test_deepem3d_on_onednn_equals_xla_forward_and_gradient():
    model = DeepEM3DNet(DeepEM3DSettings(slices=5, width=1 / 8, blocks=(1, 1, 1)))
    x = jnp.asarray(np.random.default_rng(0).random((2, 5, 32, 32, 1)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    with auto_implementation("native"):
        assert jax.tree.all(
            jax.tree.map(np.array_equal, jax.jit(model.init)(jax.random.key(0), x), variables)
        )

    def loss(params, v):
        # Inference-mode batch norm: in training mode its batch statistics
        # subtract near-equal numbers, which magnifies rounding differences.
        logits = model.apply({**variables, "params": params}, v, train=False)
        return jnp.mean(jnp.sin(logits)), logits

    text = str(jax.make_jaxpr(jax.grad(loss, has_aux=True))(variables["params"], x))
    for target in conv_onednn.TARGETS:
        assert target in text
    (_, got), got_grad = jax.value_and_grad(loss, has_aux=True)(variables["params"], x)
    with auto_implementation("native"):
        (_, want), want_grad = jax.value_and_grad(loss, has_aux=True)(variables["params"], x)
        assert ONEDNN not in str(jax.make_jaxpr(loss)(variables["params"], x))
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        scale = max(float(jnp.abs(b).max()), 1e-8)
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-4)
