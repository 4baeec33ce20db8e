"""The training loop's outputs (JSONL, TensorBoard) and the optimizer settings."""

import json
import struct

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tensorboardX.proto import event_pb2

from synjax.errors import ConfigError
from synjax.train.loop import TrainSettings, train
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
