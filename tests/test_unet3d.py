"""Tests of the 3D U-Net, its shape arithmetic, layers and losses.

The networks here are tiny, so XLA's optimisations cost far more compile time
than they save in run time; they are switched off for this module only.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box
from synjax.models import (
    PReLU,
    UNet3D,
    UNet3DSettings,
    weighted_mse,
    weighted_softmax_cross_entropy,
)
from synjax.models.layers import Upsample, center_crop


@pytest.fixture(autouse=True, scope="module")
def _fast_compile():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


PAPER_INPUT = (32, 316, 316)
PAPER_OUTPUT = (4, 228, 228)

# Depth 2 with a z-flat first level and z pooling at the second one.
SMALL = UNet3DSettings(
    depth=2,
    base_features=2,
    pool_factors=((1, 2, 2), (2, 2, 2)),
    conv_kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
)


def abstract_output(config, spatial, channels=1, batch=1, dtype=jnp.float32):
    model = UNet3D(config)
    x = jax.ShapeDtypeStruct((batch, *spatial, channels), dtype)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.eval_shape(model.apply, variables, x)


def test_paper_config_shape():
    cfg = UNet3DSettings()
    assert cfg.output_shape(PAPER_INPUT) == PAPER_OUTPUT
    out = abstract_output(cfg, PAPER_INPUT)
    assert out.shape == (1, *PAPER_OUTPUT, 1)
    assert cfg.valid_input_shape(PAPER_OUTPUT) == PAPER_INPUT


def test_small_config_shape_by_hand():
    # z: 20 -(1x3x3: 0)-> 20 /1 -4-> 16 /2 8 -4-> 4 x2 8 -4-> 4 x1 4 -0-> 4.
    # y: 44 -4-> 40 /2 20 -4-> 16 /2 8 -4-> 4 x2 8 -4-> 4 x2 8 -4-> 4.
    assert SMALL.output_shape((20, 44, 44)) == (4, 4, 4)
    assert SMALL.output_shape((3, 20, 44, 44, 5)) == (3, 4, 4, 4, 1)
    assert abstract_output(SMALL, (20, 44, 44), channels=5, batch=3).shape == (3, 4, 4, 4, 1)
    # Every extra coarsest-level voxel adds 4 in y (pool 2 * 2) and 2 in z.
    assert SMALL.output_shape((22, 48, 52)) == (6, 8, 12)
    assert SMALL.required_context() == (8, 20, 20)
    for bad in [(20, 45, 44), (21, 44, 44), (16, 44, 44)]:
        with pytest.raises(ConfigError, match="valid_input_shape"):
            SMALL.output_shape(bad)


def test_valid_input_shape_is_smallest():
    inp = SMALL.valid_input_shape((5, 5, 1))
    out = SMALL.output_shape(inp)
    assert inp == (22, 48, 44) and out == (6, 8, 4)
    # The next smaller valid inputs give outputs below the request.
    assert SMALL.output_shape((20, 44, 44))[:2] == (4, 4)


def test_box_mapping_matches_output_shape():
    cfg = UNet3DSettings()
    context = cfg.required_context()
    assert context == (14, 44, 44)
    out_box = ((10, 100, 200), (14, 328, 428))
    in_start, in_stop = cfg.input_box_for(out_box)
    assert in_start == (-4, 56, 156) and in_stop == (28, 372, 472)
    in_shape = tuple(b - a for a, b in zip(in_start, in_stop, strict=True))
    assert in_shape == PAPER_INPUT
    assert cfg.output_shape(in_shape) == PAPER_OUTPUT
    # The output box sits centred in the input box.
    assert tuple(o - i for o, i in zip(out_box[0], in_start, strict=True)) == context
    with pytest.raises(ConfigError, match="output box"):
        cfg.input_box_for(((0, 0, 0), (4, 229, 228)))


def test_same_padding_keeps_shape_and_box():
    cfg = UNet3DSettings(depth=2, base_features=2, padding="SAME", upsample="resize_conv")
    assert cfg.output_shape((4, 16, 12)) == (4, 16, 12)
    assert cfg.required_context() == (0, 0, 0)
    assert cfg.input_box_for(((0, 0, 0), (4, 16, 12))) == Box((0, 0, 0), (4, 16, 12))
    with pytest.raises(ConfigError):
        cfg.output_shape((4, 16, 14))  # 14 does not pool twice by 2
    model = UNet3D(cfg)
    x = jnp.ones((1, 4, 16, 12, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert jax.jit(model.apply)(variables, x).shape == (1, 4, 16, 12, 1)


def test_config_validation():
    with pytest.raises(ConfigError, match="pool_factors"):
        UNet3DSettings(depth=2, pool_factors=((1, 2, 2),))
    with pytest.raises(ConfigError, match="odd"):
        UNet3DSettings(depth=1, pool_factors=((1, 2, 2),), conv_kernels=((2, 3, 3), (3, 3, 3)))
    with pytest.raises(ConfigError, match="padding"):
        UNet3DSettings(padding="valid")


def test_prelu_per_channel_by_hand():
    layer = PReLU()
    x = jnp.array([[-2.0, 3.0], [4.0, -8.0]])
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["slope"].shape == (2,)
    np.testing.assert_allclose(layer.apply(variables, x), [[-0.5, 3.0], [4.0, -2.0]])
    variables = {"params": {"slope": jnp.array([0.1, 0.5])}}
    np.testing.assert_allclose(layer.apply(variables, x), [[-0.2, 3.0], [4.0, -4.0]])


def test_center_crop_and_upsample():
    x = jnp.arange(2 * 6 * 5 * 4 * 1).reshape(2, 6, 5, 4, 1)
    cropped = center_crop(x, (2, 3, 4))
    np.testing.assert_array_equal(cropped, x[:, 2:4, 1:4, :, :])
    with pytest.raises(ConfigError):
        center_crop(x, (3, 3, 4))
    up = Upsample(3, (1, 2, 2))
    y = jnp.ones((1, 2, 3, 3, 4))
    assert up.apply(up.init(jax.random.key(0), y), y).shape == (1, 2, 6, 6, 3)


def test_weighted_mse_by_hand():
    pred = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1, 1)
    target = jnp.array([0.0, 2.0, 5.0]).reshape(1, 3, 1, 1)
    weights = jnp.array([1.0, 0.0, 3.0]).reshape(1, 3, 1, 1)
    # (1 * 1 + 0 * 0 + 3 * 4) / (1 + 0 + 3) = 13 / 4.
    assert float(weighted_mse(pred, target, weights)) == pytest.approx(3.25)
    assert float(weighted_mse(pred, target)) == pytest.approx(5.0 / 3.0)
    assert float(weighted_mse(pred, target, jnp.zeros_like(target))) == 0.0
    assert weighted_mse(pred.astype(jnp.bfloat16), target).dtype == jnp.float32
    with pytest.raises(DataError, match="target"):
        weighted_mse(pred, target[:, :2])


def test_weighted_softmax_cross_entropy_by_hand():
    logits = jnp.zeros((1, 1, 1, 2, 3)).at[0, 0, 0, 1, 2].set(jnp.log(2.0))
    labels = jnp.array([0, 2]).reshape(1, 1, 1, 2)
    # Voxel 0: uniform -> log 3; voxel 1: p(2) = 2 / 4 -> log 2.
    loss = weighted_softmax_cross_entropy(logits, labels, jnp.array([1.0, 3.0]).reshape(1, 1, 1, 2))
    assert float(loss) == pytest.approx((np.log(3) + 3 * np.log(2)) / 4, rel=1e-6)


def test_bfloat16_compute():
    cfg = UNet3DSettings(depth=1, base_features=2, pool_factors=((1, 2, 2),), dtype=jnp.bfloat16)
    out = abstract_output(cfg, cfg.valid_input_shape((1, 4, 4)))
    assert out.dtype == jnp.bfloat16


def test_train_step_lowers_loss():
    cfg = UNet3DSettings(
        depth=1,
        base_features=4,
        pool_factors=((1, 2, 2),),
        conv_kernels=((1, 3, 3), (1, 3, 3)),
    )
    in_shape = (2, 20, 20)
    out_shape = cfg.output_shape(in_shape)
    assert out_shape == (2, 4, 4)
    model = UNet3D(cfg)
    key_x, key_t, key_init = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(key_x, (2, *in_shape, 1))
    target = jnp.tanh(jax.random.normal(key_t, (2, *out_shape)))
    weights = jnp.where(jnp.abs(target) > 0.5, 2.0, 1.0)
    params = jax.jit(model.init)(key_init, x)["params"]
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(p):
        return weighted_mse(model.apply({"params": p}, x), target, weights)

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    losses = []
    for _ in range(5):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    final = float(loss_fn(params))
    assert np.isfinite(losses).all()
    assert final < losses[0]
