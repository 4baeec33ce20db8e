"""Checkpoints: a run split in two equals an uninterrupted run."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import DataError
from synjax.train.checkpoint import checkpoint_dir, latest_step, restore_params
from synjax.train.loop import train
from synjax.train.settings import TrainSettings

BATCH = 4
PATCH = (3, 4, 4)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (3, 3, 3), padding="SAME")(x)


def loss_fn(outputs, batch):
    return jnp.mean((outputs - batch["target"]) ** 2), {}


def batch_fn(step):
    rng = np.random.default_rng([7, step])
    return {
        "input": rng.random((BATCH, *PATCH, 1), dtype=np.float32),
        "target": rng.random((BATCH, *PATCH, 2), dtype=np.float32),
    }


def _settings(steps):
    return TrainSettings(
        steps=steps,
        batch_size=BATCH,
        learning_rate=1e-2,
        # The warm-up does not depend on `steps`, so the 3-step and 6-step
        # runs follow the same learning rates (a cosine would not).
        schedule="constant",
        warmup_steps=2,
        log_every=0,
        checkpoint_every=2,
        keep_checkpoints=2,
        num_devices=2,
    )


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_resume_equals_uninterrupted_run(tmp_path):
    straight = train(TinyNet(), loss_fn, batch_fn, _settings(6), tmp_path / "a")
    train(TinyNet(), loss_fn, batch_fn, _settings(3), tmp_path / "b")
    assert latest_step(tmp_path / "b", "model") == 3
    resumed = train(TinyNet(), loss_fn, batch_fn, _settings(6), tmp_path / "b")

    assert int(straight.step) == int(resumed.step) == 6
    _assert_trees_equal(straight.params, resumed.params)
    _assert_trees_equal(straight.opt_state, resumed.opt_state)
    # keep_checkpoints=2 with saves at 2, 3, 4, 6 leaves the last two.
    steps = sorted(int(p.name) for p in checkpoint_dir(tmp_path / "b", "model").iterdir())
    assert steps == [4, 6]

    # A run already at `steps` returns the checkpoint without training.
    again = train(TinyNet(), loss_fn, batch_fn, _settings(6), tmp_path / "b")
    assert int(again.step) == 6
    _assert_trees_equal(again.params, straight.params)

    params = restore_params(tmp_path / "b", "model", TinyNet(), batch_fn(0)["input"])
    _assert_trees_equal(params, straight.params)
    # Step 4 differs from step 6: restore_params(step=) reads the asked one.
    early = restore_params(tmp_path / "b", "model", TinyNet(), batch_fn(0)["input"], step=4)
    kernel = early["Conv_0"]["kernel"]
    assert not np.array_equal(np.asarray(kernel), np.asarray(straight.params["Conv_0"]["kernel"]))


def test_latest_step_and_missing_checkpoint(tmp_path):
    assert latest_step(tmp_path, "nothing") is None
    with pytest.raises(DataError, match="no checkpoints for model 'nothing'"):
        restore_params(tmp_path, "nothing", TinyNet(), np.zeros((1, *PATCH, 1), np.float32))


def test_restore_into_wrong_model_fails(tmp_path):
    train(TinyNet(), loss_fn, batch_fn, _settings(3), tmp_path)

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(5, (3, 3, 3), padding="SAME")(x)

    with pytest.raises(DataError, match="does not match"):
        restore_params(tmp_path, "model", Wider(), np.zeros((1, *PATCH, 1), np.float32))
