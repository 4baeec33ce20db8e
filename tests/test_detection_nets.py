"""Tests of the 3D Mask R-CNN's networks: ResNet3D, FPN3D, RPNHead, BoxHead, MaskHead."""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synjax.detection.fpn import FPN3D, FPNSettings, upsample_nearest_to
from synjax.detection.heads import BoxHead, BoxHeadSettings, MaskHead, MaskHeadSettings
from synjax.detection.rpn import BOX_DIM, RPNHead, RPNSettings
from synjax.errors import ConfigError, DataError
from synjax.models.resnet3d import ResNet3D, ResNet3DSettings, stem_max_pool

RTOL = 1e-4
ATOL = 1e-5
TINY = {"base_features": 4, "norm_groups": 2}


def _random(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, *args):
    """`model.apply`, compiled once per module and shapes (far cheaper on CPU than eager)."""
    return model.apply(variables, *args)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _init(model, *args, seed=0):
    """Random parameters of the shapes `model.init` would make, drawn with numpy.

    `init` itself costs seconds of compilation per parameter shape on CPU (the
    threefry generator); the shapes alone come from tracing. Kernels get
    LeCun-normal values, norm scales about 1, biases about 0.
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(noise / math.sqrt(math.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.1 * noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# --- ResNet3D -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_zyx", "expected"),
    [
        # Default strides (z, y, x): C2 (1, 4, 4), C3 (1, 8, 8), C4 (2, 16, 16), C5 (4, 32, 32).
        ((8, 32, 32), {"C2": (8, 8, 8), "C3": (8, 4, 4), "C4": (4, 2, 2), "C5": (2, 1, 1)}),
        # Sizes that strides do not divide round up: y 30 -> 15 -> 8 -> 8 -> 4 -> 2 -> 1.
        ((5, 30, 64), {"C2": (5, 8, 16), "C3": (5, 4, 8), "C4": (3, 2, 4), "C5": (2, 1, 2)}),
    ],
)
def test_resnet18_feature_shapes(input_zyx, expected):
    settings = ResNet3DSettings(depth=18, **TINY)
    x = _random((2, *input_zyx, 1), 0)
    model = ResNet3D(settings)
    out = _apply(model, {"params": _init(model, x)}, x)
    assert sorted(out) == ["C2", "C3", "C4", "C5"]
    for level, zyx in expected.items():
        # Basic blocks: 4, 8, 16, 32 channels for base width 4.
        assert out[level].shape == (2, *zyx, settings.out_features[level])
    assert settings.out_features == {"C2": 4, "C3": 8, "C4": 16, "C5": 32}
    assert settings.feature_strides == {
        "C2": (1, 4, 4),
        "C3": (1, 8, 8),
        "C4": (2, 16, 16),
        "C5": (4, 32, 32),
    }


def test_resnet101_paper_patch_shapes_without_running():
    # The paper's 32x96x96 (z-y-x) patch through ResNet-101 at full width, shapes only.
    x = jax.ShapeDtypeStruct((2, 32, 96, 96, 1), jnp.float32)
    model = ResNet3D(ResNet3DSettings(depth=101))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    out = jax.eval_shape(model.apply, variables, x)
    assert {k: v.shape for k, v in out.items()} == {
        "C2": (2, 32, 24, 24, 256),
        "C3": (2, 32, 12, 12, 512),
        "C4": (2, 16, 6, 6, 1024),
        "C5": (2, 8, 3, 3, 2048),
    }


# torchvision's published parameter counts of resnet18/34/50/101 minus their
# 1000-way fc layer (512 * 1000 + 1000 or 2048 * 1000 + 1000). BatchNorm and
# GroupNorm both learn a scale and a bias per channel, so a ResNet3D with 1xkxk
# kernels on 3 input channels has exactly the 2D network's count.
TORCHVISION_COUNTS = {
    18: 11_689_512 - 513_000,
    34: 21_797_672 - 513_000,
    50: 25_557_032 - 2_049_000,
    101: 44_549_160 - 2_049_000,
}


@pytest.mark.parametrize("depth", sorted(TORCHVISION_COUNTS))
def test_resnet_parameter_count_matches_torchvision_2d(depth):
    settings = ResNet3DSettings(depth=depth, stem_kernel=(1, 7, 7), block_kernels=((1, 3, 3),) * 4)
    x = jax.ShapeDtypeStruct((1, 4, 64, 64, 3), jnp.float32)
    params = jax.eval_shape(ResNet3D(settings).init, jax.random.key(0), x)["params"]
    assert _count(params) == TORCHVISION_COUNTS[depth]


@pytest.mark.parametrize(("depth", "blocks"), [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3))])
def test_resnet_bottleneck_block_counts_from_param_tree(depth, blocks):
    x = jax.ShapeDtypeStruct((1, 32, 96, 96, 1), jnp.float32)
    params = jax.eval_shape(ResNet3D(ResNet3DSettings(depth=depth)).init, jax.random.key(0), x)[
        "params"
    ]
    for level, count in zip((2, 3, 4, 5), blocks, strict=True):
        names = sorted(k for k in params if k.startswith(f"res{level}_"))
        assert names == sorted(f"res{level}_{i}" for i in range(count))
    # Bottleneck: 1x1x1 -> 3x3x3 -> 1x1x1 with 4x expansion; a projection only in block 0.
    last = params["res5_2"]
    assert last["conv1"]["kernel"].shape == (1, 1, 1, 2048, 512)
    assert last["conv2"]["kernel"].shape == (3, 3, 3, 512, 512)
    assert last["conv3"]["kernel"].shape == (1, 1, 1, 512, 2048)
    assert "shortcut" not in last
    assert params["res5_0"]["shortcut"]["kernel"].shape == (1, 1, 1, 1024, 2048)
    assert params["res2_0"]["shortcut"]["kernel"].shape == (1, 1, 1, 64, 256)


def test_resnet_group_norm_keeps_no_state_and_ignores_the_batch():
    model = ResNet3D(ResNet3DSettings(depth=18, **TINY))
    x = _random((2, 4, 16, 16, 1), 1)
    assert set(jax.eval_shape(model.init, jax.random.key(1), x)) == {"params"}  # no batch_stats
    variables = {"params": _init(model, x, seed=1)}
    assert set(variables["params"]["res3_0"]) == {
        "conv1",
        "norm1",
        "conv2",
        "norm2",
        "shortcut",
        "shortcut_norm",
    }
    both = _apply(model, variables, x)
    alone = _apply(model, variables, x[:1])
    for level in both:
        np.testing.assert_allclose(both[level][:1], alone[level], rtol=RTOL, atol=ATOL)


def test_resnet_is_invariant_to_input_scale():
    # Every conv is bias-free and followed by GroupNorm; ReLU and max-pool are
    # positively homogeneous; so scaling the input changes nothing. Without the
    # norms, C5 would scale by 7 ** (number of convs).
    model = ResNet3D(ResNet3DSettings(depth=18, **TINY))
    x = _random((1, 4, 16, 16, 1), 2)
    variables = {"params": _init(model, x, seed=2)}
    out, scaled = _apply(model, variables, x), _apply(model, variables, 7.0 * x)
    assert float(jnp.std(out["C5"])) > 0.1
    np.testing.assert_allclose(scaled["C5"], out["C5"], rtol=1e-3, atol=1e-3)


def test_resnet_rejects_bad_settings_and_input():
    with pytest.raises(ConfigError, match="depth=42"):
        ResNet3DSettings(depth=42)
    with pytest.raises(ConfigError, match="stage_strides has 3 entries"):
        ResNet3DSettings(stage_strides=((1, 1, 1),) * 3)
    with pytest.raises(ConfigError, match="odd"):
        ResNet3DSettings(stem_kernel=(2, 7, 7))
    with pytest.raises(ConfigError, match="stem_pool"):
        ResNet3DSettings(stem_pool=(1, 2))
    model = ResNet3D(ResNet3DSettings(depth=18, **TINY))
    with pytest.raises(DataError, match="expected \\[batch, z, y, x, channels\\]"):
        model.init(jax.random.key(0), jnp.ones((4, 16, 16, 1)))


# --- FPN3D --------------------------------------------------------------------------------


def test_upsample_nearest_hand_computed():
    coarse = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2, 1)
    even = upsample_nearest_to(coarse, (1, 4, 4))[0, 0, ..., 0]
    np.testing.assert_array_equal(even, [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    # An odd fine size: voxel i copies i // 2, the surplus is cropped at the end.
    odd = upsample_nearest_to(coarse, (2, 3, 2))[0, ..., 0]
    np.testing.assert_array_equal(odd[0], [[1, 2], [1, 2], [3, 4]])
    np.testing.assert_array_equal(odd[1], odd[0])


def _identity_fpn_params(params, features):
    """Lateral 1x1x1 convs and the centre tap of the output convs set to identity."""
    eye = jnp.eye(features)

    def identity(name, leaf):
        if name.endswith("bias"):
            return jnp.zeros_like(leaf)
        kernel = jnp.zeros_like(leaf)
        centre = tuple(k // 2 for k in leaf.shape[:3])
        return kernel.at[centre].set(eye)

    return {
        layer: {name: identity(name, leaf) for name, leaf in leaves.items()}
        for layer, leaves in params.items()
    }


def test_fpn_top_down_sums_hand_computed():
    # Identity laterals and output convs: P_k = C_k + upsample(P_{k+1}), so
    # constant maps 1000, 100, 10, 1 (C2..C5) give 1111, 111, 11, 1.
    f = 3
    shapes = {"C2": (4, 8, 8), "C3": (4, 4, 4), "C4": (2, 2, 2), "C5": (1, 1, 1)}
    values = {"C2": 1000.0, "C3": 100.0, "C4": 10.0, "C5": 1.0}
    features = {k: jnp.full((1, *shapes[k], f), values[k]) for k in shapes}
    model = FPN3D(FPNSettings(features=f, p6_strides=(2, 2, 2)))
    params = _init(model, features)
    assert sorted(params) == sorted(
        [f"lateral{k}" for k in range(2, 6)] + [f"output{k}" for k in range(2, 6)]
    )
    out = _apply(model, {"params": _identity_fpn_params(params, f)}, features)
    assert list(out) == ["P2", "P3", "P4", "P5", "P6"]
    expected = {"P2": 1111.0, "P3": 111.0, "P4": 11.0, "P5": 1.0, "P6": 1.0}
    for level, value in expected.items():
        zyx = shapes.get(f"C{level[1]}", (1, 1, 1))
        assert out[level].shape == (1, *zyx, f)
        np.testing.assert_allclose(out[level], value, rtol=1e-6)


def test_fpn_upsamples_the_coarse_level_by_nearest_neighbour():
    # C3 holds distinct values, C2 zeros: with identity convs P2 is C3 repeated
    # by (1, 2, 2) (the anisotropic ratio), read off the shapes.
    c3 = _random((1, 2, 2, 3, 2), 3)
    c2 = jnp.zeros((1, 2, 4, 6, 2))
    model = FPN3D(FPNSettings(features=2, output_kernel=(1, 1, 1)))
    features = {"C2": c2, "C3": c3}
    params = _identity_fpn_params(_init(model, features), 2)
    out = _apply(model, {"params": params}, features)
    expected = np.repeat(np.repeat(np.asarray(c3), 2, axis=2), 2, axis=3)
    np.testing.assert_allclose(out["P2"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["P3"], c3, rtol=1e-6)


def test_fpn_on_resnet_features_shapes():
    settings = ResNet3DSettings(depth=18, **TINY)
    x = _random((2, 8, 32, 32, 1), 4)
    backbone = ResNet3D(settings)
    c = _apply(backbone, {"params": _init(backbone, x)}, x)
    fpn = FPN3D(FPNSettings(features=8))
    p = _apply(fpn, {"params": _init(fpn, c, seed=1)}, c)
    assert {k: v.shape for k, v in p.items()} == {
        "P2": (2, 8, 8, 8, 8),
        "P3": (2, 8, 4, 4, 8),
        "P4": (2, 4, 2, 2, 8),
        "P5": (2, 2, 1, 1, 8),
    }


# --- RPNHead ------------------------------------------------------------------------------


def _pyramid(seed, channels=4):
    return {
        "P2": _random((2, 4, 8, 8, channels), seed),
        "P3": _random((2, 4, 4, 4, channels), seed + 1),
    }


def test_rpn_shapes_and_weights_shared_across_levels():
    model = RPNHead(RPNSettings(features=6, num_anchors=3))
    pyramid = _pyramid(5)
    variables = {"params": _init(model, pyramid)}
    assert jax.tree.map(jnp.shape, variables["params"]) == {
        "conv": {"kernel": (3, 3, 3, 4, 6), "bias": (6,)},
        "objectness": {"kernel": (1, 1, 1, 6, 3), "bias": (3,)},
        "deltas": {"kernel": (1, 1, 1, 6, 3 * BOX_DIM), "bias": (3 * BOX_DIM,)},
    }
    logits, deltas = _apply(model, variables, pyramid)
    assert logits["P2"].shape == (2, 4, 8, 8, 3)
    assert logits["P3"].shape == (2, 4, 4, 4, 3)
    assert deltas["P2"].shape == (2, 4, 8, 8, 3, BOX_DIM)
    assert deltas["P3"].shape == (2, 4, 4, 4, 3, BOX_DIM)
    # One level alone gives the same as within the pyramid: one set of weights.
    alone_logits, alone_deltas = _apply(model, variables, {"P3": pyramid["P3"]})
    np.testing.assert_allclose(alone_logits["P3"], logits["P3"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(alone_deltas["P3"], deltas["P3"], rtol=RTOL, atol=ATOL)


def test_rpn_deltas_are_grouped_by_anchor():
    # Identity shared conv: h = relu(x); then anchor a's deltas are the 1x1x1
    # conv's channels [6a, 6a + 6), computed here by hand.
    c, anchors = 4, 2
    model = RPNHead(RPNSettings(features=c, num_anchors=anchors))
    x = _random((1, 2, 3, 3, c), 6)
    params = _init(model, {"P2": x})
    params["conv"] = {
        "kernel": jnp.zeros((3, 3, 3, c, c)).at[1, 1, 1].set(jnp.eye(c)),
        "bias": jnp.zeros(c),
    }
    w = _random((c, anchors * BOX_DIM), 7)
    b = _random((anchors * BOX_DIM,), 8)
    params["deltas"] = {"kernel": w.reshape(1, 1, 1, c, -1), "bias": b}
    _, deltas = _apply(model, {"params": params}, {"P2": x})
    h = np.maximum(np.asarray(x), 0.0)
    for a in range(anchors):
        cols = slice(a * BOX_DIM, (a + 1) * BOX_DIM)
        want = h @ np.asarray(w)[:, cols] + np.asarray(b)[cols]
        np.testing.assert_allclose(deltas["P2"][..., a, :], want, rtol=RTOL, atol=ATOL)


def test_rpn_gradient_step_lowers_a_toy_loss():
    model = RPNHead(RPNSettings(features=8, num_anchors=3))
    pyramid = _pyramid(9)
    params = _init(model, pyramid, seed=1)
    rng = np.random.default_rng(10)
    labels = {k: jnp.asarray(rng.random((*v.shape[:4], 3)) < 0.3) for k, v in pyramid.items()}
    targets = {k: _random((*v.shape[:4], 3, BOX_DIM), 11) for k, v in pyramid.items()}

    def loss_fn(p):
        logits, deltas = _apply(model, {"params": p}, pyramid)
        total = 0.0
        for k in pyramid:
            total += optax.sigmoid_binary_cross_entropy(logits[k], labels[k]).mean()
            total += jnp.mean((deltas[k] - targets[k]) ** 2)
        return total

    before, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    after = jax.jit(loss_fn)(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    assert float(after) < float(before) - 1e-4


# --- BoxHead ------------------------------------------------------------------------------


def test_box_head_matches_dense_layers_by_hand():
    settings = BoxHeadSettings(num_classes=2, roi_size=(3, 5, 5), hidden_features=6)
    model = BoxHead(settings)
    rois = _random((4, 3, 5, 5, 3), 12)
    params = _init(model, rois, seed=2)
    logits, deltas = _apply(model, {"params": params}, rois)
    assert logits.shape == (4, 3)  # background + 2 classes
    assert deltas.shape == (4, 2, BOX_DIM)
    # The ROI-sized "VALID" conv is a dense layer over the flattened ROI.
    p = jax.tree.map(np.asarray, params)
    h = np.maximum(np.einsum("rzyxc,zyxcf->rf", rois, p["conv1"]["kernel"]) + p["conv1"]["bias"], 0)
    h = np.maximum(h @ p["conv2"]["kernel"][0, 0, 0] + p["conv2"]["bias"], 0)
    want_logits = h @ p["class_logits"]["kernel"] + p["class_logits"]["bias"]
    want_deltas = (h @ p["box_deltas"]["kernel"] + p["box_deltas"]["bias"]).reshape(4, 2, BOX_DIM)
    np.testing.assert_allclose(logits, want_logits, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(deltas, want_deltas, rtol=RTOL, atol=ATOL)


def test_box_head_rejects_rois_of_another_size():
    model = BoxHead(BoxHeadSettings(hidden_features=4))
    with pytest.raises(DataError, match="roi_size=\\(3, 7, 7\\)"):
        model.init(jax.random.key(0), jnp.ones((2, 3, 5, 5, 3)))


def test_box_head_with_group_norm():
    model = BoxHead(BoxHeadSettings(hidden_features=8, norm_groups=4))
    rois = _random((3, 3, 7, 7, 2), 13)
    assert set(jax.eval_shape(model.init, jax.random.key(0), rois)) == {"params"}
    variables = {"params": _init(model, rois)}
    assert "bias" not in variables["params"]["conv1"]
    assert variables["params"]["conv1_norm"]["scale"].shape == (8,)
    logits, deltas = _apply(model, variables, rois)
    assert logits.shape == (3, 2) and deltas.shape == (3, 1, BOX_DIM)


# --- MaskHead -----------------------------------------------------------------------------


class _ReferenceMaskHead(nn.Module):
    """The mask head written with flax's own nn.Conv and nn.ConvTranspose."""

    features: int
    num_classes: int

    @nn.compact
    def __call__(self, x):
        for i in range(4):
            x = nn.relu(nn.Conv(self.features, (3, 3, 3), padding="SAME", name=f"conv{i + 1}")(x))
        x = nn.ConvTranspose(
            self.features, (2, 2, 2), strides=(2, 2, 2), padding="VALID", name="upconv"
        )(x)
        return nn.Conv(self.num_classes, (3, 3, 3), padding="SAME", name="mask_logits")(nn.relu(x))


def test_mask_head_matches_nn_conv_transpose_forward_and_gradient():
    # The up-conv is a matrix product + reshape ("folded"); nn.ConvTranspose is
    # XLA's transposed convolution. Same parameters, same outputs and gradients.
    settings = MaskHeadSettings(num_classes=2, features=4)
    assert settings.upconv_implementation == "folded"
    ours, ref = MaskHead(settings), _ReferenceMaskHead(features=4, num_classes=2)
    rois = _random((2, 2, 3, 4, 3), 14)
    params = _init(ref, rois, seed=3)
    assert jax.tree.map(jnp.shape, _init(ours, rois)) == jax.tree.map(jnp.shape, params)
    want = _apply(ref, {"params": params}, rois)
    got = _apply(ours, {"params": params}, rois)
    assert got.shape == (2, 4, 6, 8, 2)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    weights = _random(want.shape, 15)

    def loss(module):
        return lambda p, x: jnp.sum(weights * module.apply({"params": p}, x))

    want_grads = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(params, rois)
    got_grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, rois)
    assert float(jnp.abs(want_grads[0]["upconv"]["kernel"]).max()) > 0
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=RTOL, atol=1e-4)


def test_mask_head_anisotropic_upsampling_and_settings():
    model = MaskHead(MaskHeadSettings(features=4, num_convs=2, upsample_factors=(1, 2, 2)))
    rois = _random((3, 2, 5, 5, 4), 16)
    variables = {"params": _init(model, rois)}
    assert sorted(variables["params"]) == ["conv1", "conv2", "mask_logits", "upconv"]
    assert variables["params"]["upconv"]["kernel"].shape == (1, 2, 2, 4, 4)
    assert _apply(model, variables, rois).shape == (3, 2, 10, 10, 1)
    with pytest.raises(ConfigError, match="upconv_implementation"):
        MaskHeadSettings(upconv_implementation="cudnn")
    with pytest.raises(ConfigError, match="upsample_factors"):
        MaskHeadSettings(upsample_factors=(2, 0, 2))


@pytest.mark.parametrize("factors", [(1, 2, 2), (2, 2, 2), (1, 3, 2)])
def test_stem_max_pool_equals_nn_max_pool_forward_and_gradient(factors):
    x = jax.random.normal(jax.random.key(0), (2, 5, 13, 11, 3))  # no ties: gradients equal
    window = tuple(2 * p - 1 for p in factors)
    pads = tuple((p - 1, p - 1) for p in factors)

    def reference(x):
        return nn.max_pool(x, window, strides=factors, padding=pads)

    expected, reference_vjp = jax.vjp(reference, x)
    got, pool_vjp = jax.vjp(lambda x: stem_max_pool(x, factors), x)
    assert got.shape == (2, -(-5 // factors[0]), -(-13 // factors[1]), -(-11 // factors[2]), 3)
    np.testing.assert_array_equal(got, expected)
    cotangent = jax.random.normal(jax.random.key(1), got.shape)
    np.testing.assert_allclose(pool_vjp(cotangent)[0], reference_vjp(cotangent)[0], atol=1e-6)
