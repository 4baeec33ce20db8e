"""Data-parallel train step: an 8-device mesh matches one device."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import ConfigError
from synjax.train.batches import host_batch_size, process_batch_fn, to_global_batch
from synjax.train.loop import make_train_step
from synjax.train.parallel import batch_sharding, make_mesh, replicated_sharding
from synjax.train.settings import TrainSettings
from synjax.train.state import create_train_state

BATCH = 8
PATCH = (4, 6, 6)


class TinyNet(nn.Module):
    """Two valid 3D convolutions: [b, 4, 6, 6, 1] -> [b, 2, 4, 4, 1]."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3, 3), padding="SAME")(x))
        return nn.Conv(1, (3, 3, 3), padding="VALID")(x)


def mse_loss(outputs, batch):
    loss = jnp.mean((outputs - batch["target"]) ** 2)
    return loss, {"mean_output": jnp.mean(outputs)}


def _batch():
    rng = np.random.default_rng(0)
    return {
        "input": rng.random((BATCH, *PATCH, 1), dtype=np.float32),
        "target": rng.random((BATCH, 2, 4, 4, 1), dtype=np.float32),
    }


def _run_steps(num_devices, steps=2):
    mesh = make_mesh(num_devices)
    settings = TrainSettings(steps=10, batch_size=BATCH, learning_rate=1e-2)
    host = _batch()
    state = jax.device_put(
        create_train_state(TinyNet(), host["input"], settings, jax.random.key(0)),
        replicated_sharding(mesh),
    )
    step = make_train_step(mse_loss, mesh)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, to_global_batch(host, mesh))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_mesh_shapes():
    assert jax.device_count() == 8
    assert make_mesh().devices.shape == (8,)
    mesh = make_mesh(2)
    assert mesh.axis_names == ("data",)
    assert list(mesh.devices.flat) == jax.local_devices()[:2]
    assert batch_sharding(mesh).spec == jax.sharding.PartitionSpec("data")
    assert replicated_sharding(mesh).spec == jax.sharding.PartitionSpec()


def test_make_mesh_rejects_too_many_devices():
    with pytest.raises(ConfigError, match="config.train.num_devices=9"):
        make_mesh(9)
    with pytest.raises(ConfigError, match="num_devices=0"):
        make_mesh(0)


def test_sharded_step_matches_single_device():
    state8, losses8 = _run_steps(8)
    state1, losses1 = _run_steps(1)
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    # Training moved the loss, so equal parameters mean equal updates.
    assert losses8[0] != losses8[1]
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6),
        state8.params,
        state1.params,
    )
    assert int(state8.step) == 2
    leaf = jax.tree.leaves(state8.params)[0]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8


def test_to_global_batch_shards_leading_axis():
    mesh = make_mesh(4)
    host = _batch()
    batch = to_global_batch(host, mesh)
    assert batch["input"].shape == host["input"].shape
    shard_shapes = {s.data.shape for s in batch["input"].addressable_shards}
    assert shard_shapes == {(BATCH // 4, *PATCH, 1)}
    np.testing.assert_array_equal(np.asarray(batch["target"]), host["target"])


def test_to_global_batch_indivisible_batch():
    mesh = make_mesh(8)
    host = {"input": np.zeros((6, *PATCH, 1), np.float32)}
    with pytest.raises(ConfigError, match="config.train.batch_size=6"):
        to_global_batch(host, mesh)


def test_to_global_batch_mismatched_keys():
    host = {"input": np.zeros((8, 2)), "target": np.zeros((4, 2))}
    with pytest.raises(ConfigError, match="same leading batch size"):
        to_global_batch(host, make_mesh(1))


def test_host_batch_size_single_process():
    assert host_batch_size(12) == 12
    with pytest.raises(ConfigError, match="batch_size=0"):
        host_batch_size(0)


def test_process_batch_fn_single_process_matches_sampler():
    calls = []

    def sampler_batch(step, batch_size, shard=0, num_shards=1):
        calls.append((step, batch_size, shard, num_shards))
        return {"input": np.full((batch_size // num_shards, 1), step, np.float32)}

    batch_fn = process_batch_fn(sampler_batch, BATCH)
    assert batch_fn(3)["input"].shape == (BATCH, 1)
    assert calls == [(3, BATCH, 0, 1)]


def test_train_step_stays_on_the_device_and_reuses_the_state_buffers():
    """No host round trip inside the step (transfer guard), and the old state is donated."""
    mesh = make_mesh(2)
    settings = TrainSettings(steps=10, batch_size=BATCH, learning_rate=1e-2)
    host = _batch()
    state = jax.device_put(
        create_train_state(TinyNet(), host["input"], settings, jax.random.key(0)),
        replicated_sharding(mesh),
    )
    batch = to_global_batch(host, mesh)
    step = make_train_step(mse_loss, mesh)
    state, _ = step(state, batch)  # compiles outside the guard
    old_params = jax.tree.leaves(state.params)
    with jax.transfer_guard("disallow"):
        state, metrics = step(state, batch)
    # The step's inputs were donated: their buffers now belong to the new state.
    assert all(leaf.is_deleted() for leaf in old_params)
    assert np.isfinite(float(metrics["loss"]))
