"""The training loop's outputs (JSONL, TensorBoard) and the optimizer settings."""

import dataclasses
import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from synjax.errors import ConfigError, SynjaxError
from synjax.train.checkpoint import checkpoint_dir, restore_params
from synjax.train.loop import NonFiniteLossError, train
from synjax.train.settings import TrainSettings
from synjax.train.state import make_optimizer, make_schedule

BATCH = 4
PATCH = (2, 4, 4)
NUM_CLASSES = 2
# TFRecord framing: 8-byte length, 4-byte length CRC, data, 4-byte data CRC.
RECORD_HEADER, RECORD_FOOTER = 12, 4


class TinyClassifier(nn.Module):
    """Dense classifier with a dict output: [b, z, y, x, 1] -> {"logits": [b, 2]}."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(2, (1, 3, 3))(x))
        return {"logits": nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))}


def classification_loss(outputs, batch):
    logits = outputs["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, {"accuracy": accuracy}


def batch_fn(step):
    """Bright patches are class 1, dark ones class 0."""
    rng = np.random.default_rng([3, step])
    label = np.arange(BATCH) % NUM_CLASSES
    noise = rng.random((BATCH, *PATCH, 1), dtype=np.float32) * 0.2
    bright = np.float32(0.8) * label[:, None, None, None, None].astype(np.float32)
    return {"input": noise + bright, "label": label}


def _read_scalars(folder):
    scalars = {}
    for path in folder.iterdir():
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(
                data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
            )
            pos += RECORD_HEADER + length + RECORD_FOOTER
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_train_writes_metrics_and_tensorboard(tmp_path):
    settings = TrainSettings(
        steps=12,
        batch_size=BATCH,
        learning_rate=0.05,
        log_every=4,
        eval_every=6,
        checkpoint_every=100,
        num_devices=4,
    )
    eval_calls = []

    def eval_fn(params, step):
        eval_calls.append(step)
        return {"kernel_sum": float(jnp.sum(params["Dense_0"]["kernel"]))}

    state = train(
        TinyClassifier(), classification_loss, batch_fn, settings, tmp_path, "cls", eval_fn
    )
    assert int(state.step) == 12
    assert eval_calls == [6, 12]

    lines = [json.loads(s) for s in (tmp_path / "metrics" / "cls.jsonl").read_text().splitlines()]
    train_lines = [ln for ln in lines if "loss" in ln]
    eval_lines = [ln for ln in lines if "eval/kernel_sum" in ln]
    assert [ln["step"] for ln in train_lines] == [4, 8, 12]
    assert [ln["step"] for ln in eval_lines] == [6, 12]
    for line in train_lines:
        assert {"loss", "accuracy", "grad_norm", "steps_per_sec"} <= set(line)
        assert line["steps_per_sec"] > 0
    # The task is separable: the loss falls and the last batches are right.
    assert train_lines[-1]["loss"] < train_lines[0]["loss"]
    assert train_lines[-1]["accuracy"] == 1.0
    final_sum = float(jnp.sum(state.params["Dense_0"]["kernel"]))
    assert eval_lines[-1]["eval/kernel_sum"] == pytest.approx(final_sum, rel=1e-6)

    scalars = _read_scalars(tmp_path / "tensorboard" / "cls")
    assert [s for s, _ in scalars["loss"]] == [4, 8, 12]
    assert scalars["loss"][-1][1] == pytest.approx(train_lines[-1]["loss"], rel=1e-6)
    assert [s for s, _ in scalars["eval/kernel_sum"]] == [6, 12]
    assert (tmp_path / "checkpoints" / "cls" / "12").is_dir()


def _settings(**kwargs):
    return TrainSettings(**{"steps": 6, "batch_size": 1, "learning_rate": 1.0, **kwargs})


def test_schedules_hand_computed():
    warm_cos = make_schedule(_settings(schedule="warmup_cosine", warmup_steps=2))
    # Linear 0 -> 1 over 2 steps, then cosine over the remaining 4 steps.
    assert [float(warm_cos(s)) for s in (0, 1, 2)] == pytest.approx([0.0, 0.5, 1.0])
    assert float(warm_cos(4)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 2 / 4)))
    assert float(warm_cos(6)) == pytest.approx(0.0, abs=1e-7)
    cosine = make_schedule(_settings(steps=4, learning_rate=2.0, schedule="cosine"))
    assert float(cosine(2)) == pytest.approx(1.0)
    constant = make_schedule(_settings(warmup_steps=4))
    assert float(constant(1)) == pytest.approx(0.25)
    assert float(constant(5)) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # Clipped to norm 1: [3, 4] -> [0.6, 0.8]; first SGD step is -lr * g.
        ({"optimizer": "sgd", "grad_clip_norm": 1.0}, [-0.06, -0.08]),
        # L2 decay adds 0.5 * w = [0.5, 1.0] to the gradient.
        ({"optimizer": "sgd", "weight_decay": 0.5}, [-0.35, -0.5]),
        # Adam's first step is -lr * sign(g).
        ({"optimizer": "adam"}, [-0.1, -0.1]),
        # AdamW subtracts lr * decay * w on top.
        ({"optimizer": "adamw", "weight_decay": 0.5}, [-0.15, -0.2]),
    ],
)
def test_optimizer_first_update(kwargs, expected):
    tx = make_optimizer(_settings(learning_rate=0.1, **kwargs))
    params = jnp.array([1.0, 2.0])
    updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(params), params)
    np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "lamb"}, "config.train.optimizer='lamb'"),
        ({"schedule": "step"}, "config.train.schedule='step'"),
        ({"warmup_steps": 6}, "config.train.warmup_steps=6"),
        ({"learning_rate": 0.0}, "config.train.learning_rate=0.0"),
        ({"grad_clip_norm": -1.0}, "config.train.grad_clip_norm=-1.0"),
    ],
)
def test_bad_optimizer_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_optimizer(_settings(**kwargs))


def test_bad_train_settings(tmp_path):
    with pytest.raises(ConfigError, match="config.train.steps=0"):
        train(TinyClassifier(), classification_loss, batch_fn, _settings(steps=0), tmp_path)


def test_train_settings_from_config_block():
    block = ml_collections.ConfigDict(
        {
            "steps": 30,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "schedule": "warmup_cosine",
            "warmup_steps": 5,
            # Fields of other stages are ignored.
            "patch_yx": 128,
            "augment": True,
        }
    )
    settings = TrainSettings.from_config(block, seed=7)
    assert (settings.steps, settings.batch_size, settings.seed) == (30, 4, 7)
    assert (settings.schedule, settings.warmup_steps) == ("warmup_cosine", 5)
    # Absent fields keep the dataclass defaults.
    assert settings.optimizer == TrainSettings.optimizer == "adam"
    assert settings.checkpoint_every == TrainSettings.checkpoint_every
    # A per-model step count overrides the block's.
    assert TrainSettings.from_config(block, seed=0, steps=12).steps == 12


def _batches_turning(value: float, from_step: int):
    """`batch_fn`, with every input value set to `value` from 0-based step `from_step` on."""

    def batches(step):
        batch = batch_fn(step)
        if step >= from_step:
            batch["input"] = np.full_like(batch["input"], value)
        return batch

    return batches


def _scaled_loss(outputs, batch):
    """`classification_loss` times `batch["scale"]` (an infinite scale: an infinite loss)."""
    loss, metrics = classification_loss(outputs, batch)
    return loss * batch["scale"][0], metrics


@pytest.mark.parametrize(
    ("log_every", "checkpoint_every", "bad_step", "kept_steps"),
    [
        # Checked at every log step: stops at step 6, names step 5.
        (2, 2, 5, [2, 4]),
        # Not logging: checked at checkpoint steps only, stops at 8, still names 5.
        (0, 4, 5, [4]),
        # The very first step is bad: no checkpoint.
        (2, 2, 1, []),
    ],
)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, log_every, checkpoint_every, bad_step, kept_steps
):
    settings = TrainSettings(
        steps=12,
        batch_size=BATCH,
        learning_rate=0.05,
        log_every=log_every,
        checkpoint_every=checkpoint_every,
        keep_checkpoints=10,
        num_devices=2,
    )
    # 0-based step bad_step - 1 is logged as step bad_step.
    batches = _batches_turning(np.nan, from_step=bad_step - 1)
    with pytest.raises(NonFiniteLossError) as caught:
        train(TinyClassifier(), classification_loss, batches, settings, tmp_path, "cls")
    error = caught.value
    assert isinstance(error, SynjaxError)  # the CLI prints it as one line
    assert (error.step, error.name) == (bad_step, "cls")
    assert np.isnan(error.loss)
    message = str(error)
    assert "\n" not in message
    assert f"training cls: loss is nan at step {bad_step};" in message
    if kept_steps:
        assert error.checkpoint_step == kept_steps[-1]
        assert f"the last good checkpoint (step {kept_steps[-1]}) is kept" in message
    else:
        assert error.checkpoint_step is None
        assert "no checkpoint was saved" in message

    saved = sorted(int(p.name) for p in checkpoint_dir(tmp_path, "cls").glob("[0-9]*"))
    assert saved == kept_steps
    # The metrics log holds only finite steps before the bad one, in strict JSON.
    metrics_file = tmp_path / "metrics" / "cls.jsonl"
    lines = metrics_file.read_text().splitlines() if metrics_file.exists() else []
    logged = [json.loads(line, parse_constant=pytest.fail) for line in lines]
    expected_logged = [s for s in range(1, bad_step) if log_every and s % log_every == 0]
    assert [line["step"] for line in logged] == expected_logged
    if kept_steps:
        # The kept checkpoint is readable and is what a clean run has at that step.
        kept = kept_steps[-1]
        restored = restore_params(tmp_path, "cls", TinyClassifier(), batch_fn(0)["input"])
        clean = train(
            TinyClassifier(),
            classification_loss,
            batch_fn,
            dataclasses.replace(settings, steps=kept, log_every=0),
            tmp_path / "clean",
            "cls",
        )
        for got, want in zip(
            jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(clean.params)), strict=True
        ):
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_infinite_loss_is_named_as_inf(tmp_path):
    settings = TrainSettings(
        steps=6,
        batch_size=BATCH,
        learning_rate=0.05,
        log_every=1,
        checkpoint_every=1,
        num_devices=2,
    )

    def batches(step):
        scale = np.inf if step >= 2 else 1.0
        return {**batch_fn(step), "scale": np.full(BATCH, scale, np.float32)}

    with pytest.raises(NonFiniteLossError, match="loss is inf at step 3;") as caught:
        train(TinyClassifier(), _scaled_loss, batches, settings, tmp_path, "cls")
    assert caught.value.checkpoint_step == 2


@jax.custom_vjp
def _poison_gradient(x, poison):
    """Identity in the forward pass; an infinite gradient where `poison` is true."""
    return x


def _poison_forward(x, poison):
    return x, poison


def _poison_backward(poison, g):
    return jnp.where(poison, jnp.inf, 1.0) * g, jnp.zeros_like(poison)


_poison_gradient.defvjp(_poison_forward, _poison_backward)


def test_finite_loss_with_infinite_gradient_is_stopped_too(tmp_path):
    # The loss stays finite, but an update from the gradient would put
    # infinities into the parameters (and so into the next checkpoint).
    settings = TrainSettings(
        steps=4,
        batch_size=BATCH,
        learning_rate=0.05,
        log_every=1,
        checkpoint_every=1,
        num_devices=2,
        optimizer="sgd",
    )

    def loss_fn(outputs, batch):
        logits = _poison_gradient(outputs["logits"], batch["poison"][0])
        return classification_loss({"logits": logits}, batch)

    def batches(step):
        return {**batch_fn(step), "poison": np.full(BATCH, step >= 1)}

    with pytest.raises(NonFiniteLossError, match="gradient norm is (inf|nan)") as caught:
        train(TinyClassifier(), loss_fn, batches, settings, tmp_path, "cls")
    assert caught.value.step == 2 and np.isfinite(caught.value.loss)
    assert caught.value.checkpoint_step == 1
