"""DeepEM3D-Net: shapes per variant, loss and weights by hand, a training step."""

import json

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synjax.errors import ConfigError, DataError
from synjax.inference.slicewise import pad_end
from synjax.models import deepem3d
from synjax.models.deepem3d import DeepEM3DNet, DeepEM3DSettings, make_apply_fn
from synjax.models.losses import class_weighted_softmax_cross_entropy as weighted_softmax_ce
from synjax.targets.boundaries import class_weights

TINY_WIDTH = 1 / 16


def _shapes(settings, input_shape):
    model = DeepEM3DNet(settings)
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
    return jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)


@pytest.mark.parametrize("slices", [1, 3, 5])
def test_output_shape_per_variant(slices):
    jax.config.update("jax_disable_most_optimizations", True)
    for width in (1.0, TINY_WIDTH):
        out = _shapes(DeepEM3DSettings(slices=slices, width=width), (2, slices, 64, 96, 1))
        assert out.shape == (2, 64, 96, 2)
        assert out.dtype == jnp.float32


@pytest.mark.parametrize("slices", [1, 3, 5])
def test_early_fusion_reduces_slices_to_one(slices):
    kz1, kz2 = DeepEM3DSettings(slices=slices).z_kernels
    # Two valid convs in z: s - (kz1 - 1) - (kz2 - 1) == 1.
    assert slices - (kz1 - 1) - (kz2 - 1) == 1
    # Only the first two convs are 3D: every later kernel is 2D (4 dims, HWIO).
    variables = jax.eval_shape(
        lambda: DeepEM3DNet(DeepEM3DSettings(slices=slices, width=TINY_WIDTH)).init(
            jax.random.PRNGKey(0), jnp.zeros((1, slices, 32, 32, 1))
        )
    )
    ndims = [
        leaf.ndim
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
        if path[-1].key == "kernel"
    ]
    assert sorted(ndims, reverse=True)[:3] == [5, 5, 4]


def test_bad_inputs_and_settings_raise():
    model = DeepEM3DNet(DeepEM3DSettings(slices=3, width=TINY_WIDTH))
    with pytest.raises(DataError, match="multiples of 16"):
        _shapes(model.settings, (1, 3, 40, 48, 1))
    with pytest.raises(DataError, match=r"\[batch, 3, y, x, 1\]"):
        _shapes(model.settings, (1, 5, 32, 32, 1))
    with pytest.raises(ConfigError, match="slices"):
        DeepEM3DSettings(slices=4)
    with pytest.raises(ConfigError, match="odd"):
        DeepEM3DSettings(dilations=(1, 2))


def _deconv_output(factor, rate, size=16):
    module = deepem3d._PyramidDilatedDeconv(factor, 1, 1, (rate,))
    x = jnp.ones((1, size, size, 1))
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    variables = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), variables)
    # Zero bias: only kernel taps can make an output pixel non-zero.
    variables["params"]["ConvTranspose_0"]["bias"] = jnp.zeros((1,))
    return jax.jit(module.apply)(variables, x)


@pytest.mark.parametrize("factor,rate", [(2, 3), (4, 5), (8, 3), (16, 5), (16, 1)])
def test_pyramid_deconv_reaches_every_pixel(factor, rate):
    # Odd rates with power-of-two strides: every output pixel gets a kernel tap
    # (input large enough that the dilated kernel fits inside it).
    out = _deconv_output(factor, rate)
    assert out.shape == (1, 16 * factor, 16 * factor, 1)
    assert bool(jnp.all(out > 0))


def test_even_dilation_leaves_holes():
    # Why the settings refuse even rates: stride 2, rate 2 reaches only every other pixel.
    holes = _deconv_output(2, 2)[0, :, :, 0] == 0
    assert 0.5 <= float(holes.mean()) < 1.0


def test_class_weights_by_hand():
    labels = np.array([[0, 0, 0, 1]])
    # freq = (3/4, 1/4); w = 1 / (2 * freq).
    np.testing.assert_allclose(class_weights(labels, 2), [2 / 3, 2.0], rtol=1e-6)
    # One class present: weight 1, so the mean weight over the voxels stays 1.
    np.testing.assert_allclose(class_weights(np.zeros(5, int), 2), [1.0, 0.0])


def test_weighted_softmax_ce_by_hand():
    labels = jnp.array([0, 1, 1])
    weights = jnp.array([1.0, 3.0])
    zero = weighted_softmax_ce(jnp.zeros((3, 2)), labels, weights)
    np.testing.assert_allclose(zero, (1 + 3 + 3) / 3 * np.log(2), rtol=1e-6)
    logits = jnp.array([[2.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    # -log softmax: row 0 label 0: log(1 + e^-2); row 1 label 1: log(e^2 + 1);
    # row 2 label 1: log(1 + e^-1).
    expected = (np.log1p(np.exp(-2)) + 3 * np.log1p(np.exp(2)) + 3 * np.log1p(np.exp(-1))) / 3
    np.testing.assert_allclose(weighted_softmax_ce(logits, labels, weights), expected, rtol=1e-6)
    with pytest.raises(DataError, match="class_weights"):
        weighted_softmax_ce(logits, labels, jnp.ones(3))


def test_pad_to_multiple_and_crop():
    x = np.arange(3, dtype=np.float32).reshape(1, 1, 3, 1, 1) + 1
    padded = pad_end(x, (4, 4), axes=(2, 3))
    assert padded.shape == (1, 1, 4, 4, 1)
    np.testing.assert_array_equal(padded[0, 0, :, 0, 0], [1, 2, 3, 2])  # reflect
    np.testing.assert_array_equal(padded[0, 0, 0, :, 0], [1, 1, 1, 1])  # size 1: repeated
    np.testing.assert_array_equal(padded[:, :, :3, :1], x)
    same = pad_end(np.zeros((1, 1, 32, 16, 1)), (32, 16), axes=(2, 3))
    assert same.shape == (1, 1, 32, 16, 1)


def _train_on_batch(model, x, labels, weights, steps):
    """Adam steps on one fixed batch, in train mode; traceable (wrap in jit).

    Returns:
      ({"params", "batch_stats"} after training, [steps] losses).
    """
    tx = optax.adam(3e-3)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return weighted_softmax_ce(logits, labels, weights), updates["batch_stats"]

    def step(carry, _):
        params, batch_stats, opt_state = carry
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    variables = model.init(jax.random.PRNGKey(0), x)
    carry = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    (params, batch_stats, _), losses = jax.lax.scan(step, carry, length=steps)
    return {"params": params, "batch_stats": batch_stats}, losses


def _train_step_lowers_loss(x, labels, slices, steps=4):
    # Shapes and gradients matter here, not XLA's speed: compile fast.
    jax.config.update("jax_disable_most_optimizations", True)
    model = DeepEM3DNet(DeepEM3DSettings(slices=slices, width=TINY_WIDTH, side_features=4))
    weights = jnp.asarray(class_weights(labels, 2))

    @jax.jit
    def train():
        # One compiled program (init + all steps) keeps the test's compile time down.
        trained, losses = _train_on_batch(model, x, labels, weights, steps)
        return losses, make_apply_fn(model, trained)(x)

    losses, prob = train()
    losses = np.asarray(losses)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0], losses
    # Inference path: probabilities in [0, 1], one per pixel.
    assert prob.shape == (*x.shape[:1], *x.shape[2:4], 1)
    assert bool(jnp.all((prob >= 0) & (prob <= 1)))


def test_training_step_lowers_weighted_loss_on_real_em(shared_data):
    slices, size = 3, 32
    with h5py.File(shared_data / "isbi2012-train.h5", "r") as f:
        raw = f["volumes/raw"][10 : 10 + slices, 100 : 100 + size, 100 : 100 + size]
        membranes = f["volumes/labels/membranes"][
            10 + slices // 2, 100 : 100 + size, 100 : 100 + size
        ]
    x = jnp.asarray(raw, jnp.float32)[None, ..., None] / 255.0
    labels = jnp.asarray(membranes == 1, jnp.int32)[None]
    assert 0 < int(labels.sum()) < labels.size  # both classes present
    _train_step_lowers_loss(x, labels, slices)


def _eval_vs_batch_statistics_gap(steps: int = 150) -> float:
    """Mean |p_eval - p_batch| after training on one fixed batch.

    p_eval uses the running statistics (inference), p_batch the batch's own
    (training mode); both with the same trained parameters.
    """
    jax.config.update("jax_disable_most_optimizations", True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 32, 32, 1)).astype(np.float32)
    labels = (x[:, 1, :, :, 0] > 0.5).astype(np.int32)
    model = DeepEM3DNet(DeepEM3DSettings(slices=3, width=TINY_WIDTH, side_features=4))

    @jax.jit
    def run():
        trained, _ = _train_on_batch(model, x, labels, jnp.ones(2), steps)
        p_eval = jax.nn.softmax(model.apply(trained, x, train=False))[..., 1]
        logits, _ = model.apply(trained, x, train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.abs(p_eval - jax.nn.softmax(logits)[..., 1]))

    return float(run())


def test_running_statistics_match_the_trained_batch_statistics():
    # A short run must give inference (running statistics) the outputs that
    # training saw; flax's default momentum of 0.99 does not (gap 0.31 vs 0.001).
    assert _eval_vs_batch_statistics_gap() < 0.05


def _ensemble_config(method: str):
    import ml_collections

    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {"intensity": {"method": method, "low_percent": 5.0, "high_percent": 95.0}},
            "models": (
                {
                    "name": "tiny",
                    "slices": 3,
                    "kernel": "c3",
                    "width": TINY_WIDTH,
                    "side_features": 4,
                    "steps": 1,
                    "seed": 0,
                },
            ),
            "train": {
                "patch_yx": 16,
                "batch_size": 1,
                "learning_rate": 1e-3,
                "augment": False,
                "log_every": 0,
                "checkpoint_every": 1,
                "keep_checkpoints": 1,
                "num_devices": 1,
            },
            "predict": {
                "tta": False,
                "tta_transforms": 1,
                "batch_size": 4,
                "progress": False,
                "orientations": ("z",),
            },
        }
    )


def _centre_slice(x):
    """A stand-in network `[n, 3, y, x, 1] -> [n, y, x, 1]` that shows its input."""
    return x[:, 1]


def test_trained_ensemble_saves_and_reapplies_its_normalization(tmp_path, monkeypatch):
    from synjax.data.intensity import INTENSITY_FILE, IntensityNormalization
    from synjax.stages import boundary_models

    batches = []

    def fake_train(model, loss, batch_fn, settings, workdir, name):
        # The optimisation itself is tested above; here only what it is fed.
        batches.append(batch_fn(0))

    monkeypatch.setattr(boundary_models, "train", fake_train)
    rng = np.random.default_rng(2)
    raw = rng.integers(30, 220, (4, 16, 16), dtype=np.uint8)
    neuron_ids = np.ones(raw.shape, np.uint64)
    neuron_ids[:, :, 8:] = 2
    config = _ensemble_config("percentiles")
    boundary_models.BoundaryEnsembleStage.from_config(config).train(raw, neuron_ids, tmp_path)
    saved = tmp_path / "checkpoints" / "tiny" / INTENSITY_FILE
    low, high = np.percentile(raw, [5.0, 95.0], method="nearest")
    fitted = IntensityNormalization("percentiles", 5.0, 95.0, float(low), float(high))
    assert IntensityNormalization.from_dict(json.loads(saved.read_text())) == fitted
    # Training patches: the percentile-normalised raw (no augmentation here).
    normalised = np.clip((raw.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    patch = batches[0]["input"]
    assert patch.shape == (1, 3, 16, 16, 1)
    assert any(np.allclose(patch[0, ..., 0], normalised[z : z + 3], atol=1e-6) for z in range(2))
    # Prediction feeds the network the saved percentiles' values.
    got = boundary_models.BoundaryEnsembleStage.from_config(config).predict(
        tmp_path, raw, [_centre_slice]
    )
    np.testing.assert_allclose(got, normalised, atol=1e-6)
    # A workdir from before the file existed falls back to the dtype range.
    saved.unlink()
    u16 = raw.astype(np.uint16) * 257
    fallback = boundary_models.BoundaryEnsembleStage.from_config(config).predict(
        tmp_path, u16, [_centre_slice]
    )
    np.testing.assert_array_equal(fallback, raw / np.float32(255))
    # Checkpoints trained on the dtype range refuse to be resumed under percentiles.
    (tmp_path / "checkpoints" / "tiny" / "1").mkdir()
    with pytest.raises(ConfigError, match="trained with intensity"):
        boundary_models.BoundaryEnsembleStage.from_config(config).train(raw, neuron_ids, tmp_path)
