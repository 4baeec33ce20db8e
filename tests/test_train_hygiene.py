"""Training-step hygiene: remat, prefetched batches, bfloat16 training, initialisation."""

import dataclasses
import json
import pathlib
import runpy
import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.models.unet3d import UNet3D, UNet3DSettings
from synjax.pipelines.config_checks import check_config
from synjax.stages.proximity import ProximityStage
from synjax.train.batches import to_global_batch
from synjax.train.loop import init_train_state, make_train_step, train
from synjax.train.parallel import make_mesh
from synjax.train.prefetch import BatchPrefetcher
from synjax.train.settings import TrainSettings
from synjax.train.state import create_train_state

# A tiny same-padded U-Net: one pooling, in-plane kernels at the finest level.
TINY_UNET = UNet3DSettings(
    depth=1, base_features=4, padding="SAME", conv_kernels=((1, 3, 3), (3, 3, 3))
)
PATCH = (4, 16, 16)
BATCH = 2
PREFETCH_THREAD = "synjax-batch-prefetch"
# Where the parameters' bits do not matter: XLA compiles a U-Net's threefry
# initialisation in ~8 s of CPU, its "unsafe_rbg" one in ~1 s.
FAST_PRNG = "unsafe_rbg"


def smoothing_batch(step: int) -> dict[str, np.ndarray]:
    """Random input; target its 3x3 in-plane mean (learnable by a 3x3 convolution)."""
    rng = np.random.default_rng([7, step])
    x = rng.random((BATCH, *PATCH, 1), dtype=np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    target = sum(
        padded[:, :, i : i + PATCH[1], j : j + PATCH[2]] for i in range(3) for j in range(3)
    )
    return {"input": x, "target": (target / 9).astype(np.float32)}


def mse_loss(outputs, batch):
    loss = jnp.mean((outputs - batch["target"]) ** 2)
    return loss, {"mean_output": jnp.mean(outputs)}


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == PREFETCH_THREAD]


# --- rematerialisation ------------------------------------------------------


def test_remat_unet_has_the_same_parameters_loss_and_gradients():
    x = jnp.asarray(smoothing_batch(0)["input"])
    target = jnp.asarray(smoothing_batch(0)["target"])
    plain, remat = UNet3D(TINY_UNET), UNet3D(dataclasses.replace(TINY_UNET, remat=True))
    key = jax.random.key(0, impl=FAST_PRNG)
    params = jax.jit(plain.init)(key, x)["params"]
    remat_params = jax.jit(remat.init)(key, x)["params"]
    # Same names, shapes and values: checkpoints of either net load into the other.
    assert jax.tree.structure(params) == jax.tree.structure(remat_params)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(remat_params), strict=True)
    )

    def loss_of(model):
        return lambda p: jnp.mean((model.apply({"params": p}, x) - target) ** 2)

    plain_loss, plain_grads = jax.jit(jax.value_and_grad(loss_of(plain)))(params)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(loss_of(remat)))(params)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(plain_loss) > 0 and any(np.any(g != 0) for g in jax.tree.leaves(plain_grads))

    # The option does something: the gradient recomputes the conv blocks'
    # forward convolutions instead of reading stored activations.
    def convs(model):
        # XLA's convolutions, or oneDNN's forward calls (the CPU default).
        text = str(jax.make_jaxpr(jax.grad(loss_of(model)))(params))
        return text.count("conv_general_dilated") + text.count("synjax_conv3d_onednn_forward")

    assert convs(remat) > convs(plain)


# --- prefetched batches ------------------------------------------------------


def test_prefetcher_gives_the_batches_of_batch_fn_in_order_from_a_thread():
    threads = []

    def batch_fn(step):
        threads.append(threading.current_thread().name)
        return smoothing_batch(step)

    with BatchPrefetcher(batch_fn, range(3, 9), depth=2) as prefetcher:
        got = [prefetcher.get(step) for step in range(3, 9)]
    for step, batch in zip(range(3, 9), got, strict=True):
        want = smoothing_batch(step)
        assert batch.keys() == want.keys()
        assert all(np.array_equal(batch[k], want[k]) for k in want)
    assert threads == [PREFETCH_THREAD] * 6
    assert not _prefetch_threads()


def test_prefetcher_depth_zero_samples_in_the_callers_thread():
    threads = []

    def batch_fn(step):
        threads.append(threading.current_thread())
        return {"input": np.full((1, 1), step, np.float32)}

    prefetcher = BatchPrefetcher(batch_fn, range(4), depth=0)
    assert [float(prefetcher.get(s)["input"][0, 0]) for s in range(4)] == [0.0, 1.0, 2.0, 3.0]
    prefetcher.close()
    assert threads == [threading.current_thread()] * 4


def test_prefetcher_stays_within_its_depth_and_closes_early():
    calls = []

    def batch_fn(step):
        calls.append(step)
        return {"input": np.zeros((1, 1), np.float32)}

    prefetcher = BatchPrefetcher(batch_fn, range(100), depth=2)
    prefetcher.get(0)
    prefetcher.close()
    assert not _prefetch_threads()
    # One batch taken, two queued, at most one more begun before the stop was seen.
    assert calls == list(range(len(calls)))
    assert 3 <= len(calls) <= 4


def test_prefetcher_raises_the_samplers_error_at_its_step():
    def batch_fn(step):
        if step == 2:
            raise DataError("train.h5: dataset 'volumes/raw' is empty; expected voxels")
        return {"input": np.zeros((1, 1), np.float32)}

    with BatchPrefetcher(batch_fn, range(5), depth=3) as prefetcher:
        prefetcher.get(0)
        prefetcher.get(1)
        with pytest.raises(DataError, match=r"^train.h5: dataset 'volumes/raw' is empty"):
            prefetcher.get(2)
    assert not _prefetch_threads()


class TinyNet(nn.Module):
    """[b, 4, 16, 16, 1] -> [b, 4, 16, 16, 1]: one hidden same-padded convolution."""

    @nn.compact
    def __call__(self, x):
        return nn.Conv(1, (1, 3, 3))(nn.relu(nn.Conv(4, (1, 3, 3))(x)))


def _train_run(tmp_path, prefetch, batch_fn=smoothing_batch, steps=8):
    settings = TrainSettings(
        steps=steps,
        batch_size=BATCH,
        learning_rate=1e-2,
        log_every=1,
        checkpoint_every=100,
        num_devices=1,
        prefetch=prefetch,
    )
    state = train(TinyNet(), mse_loss, batch_fn, settings, tmp_path, "net")
    lines = (tmp_path / "metrics" / "net.jsonl").read_text().splitlines()
    return state, [json.loads(line)["loss"] for line in lines]


def test_prefetched_training_sees_the_same_batches_and_loss_curve(tmp_path):
    seen = {0: [], 3: []}

    def recording(depth):
        def batch_fn(step):
            seen[depth].append((step, threading.current_thread().name))
            return smoothing_batch(step)

        return batch_fn

    plain_state, plain_losses = _train_run(tmp_path / "plain", 0, recording(0))
    fetched_state, fetched_losses = _train_run(tmp_path / "prefetch", 3, recording(3))
    assert [s for s, _ in seen[0]] == list(range(8))
    assert [s for s, _ in seen[3]] == list(range(8))
    # The first batch (for the initialisation) is made in the loop's thread, the rest ahead.
    assert {t for _, t in seen[3][1:]} == {PREFETCH_THREAD}
    assert {t for _, t in seen[0]} == {threading.current_thread().name}
    assert len(plain_losses) == 8 and plain_losses[-1] < plain_losses[0]
    assert fetched_losses == plain_losses
    for a, b in zip(
        jax.tree.leaves(plain_state.params), jax.tree.leaves(fetched_state.params), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert not _prefetch_threads()


def test_prefetched_training_stops_with_the_samplers_error(tmp_path):
    def failing(step):
        if step == 4:
            raise DataError("sample.h5: dataset 'volumes/labels' has NaN; expected finite values")
        return smoothing_batch(step)

    with pytest.raises(DataError, match=r"^sample.h5: dataset 'volumes/labels' has NaN"):
        _train_run(tmp_path, 2, failing)
    assert not _prefetch_threads()
    # The steps before the failing one ran and were logged.
    lines = (tmp_path / "metrics" / "net.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


# --- mixed precision ---------------------------------------------------------

MIXED_STEPS = 20
# Largest relative difference of a bfloat16 step's loss from the float32 one:
# bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 = 0.2% per value);
# over 20 Adam steps the curves drift apart by up to ~6% on this net (measured).
BF16_LOSS_RTOL = 0.10


def _loss_curve(dtype) -> list[float]:
    settings = TrainSettings(
        steps=MIXED_STEPS, batch_size=BATCH, learning_rate=3e-3, prng_impl=FAST_PRNG
    )
    mesh = make_mesh(1)
    model = UNet3D(dataclasses.replace(TINY_UNET, dtype=dtype))
    state = init_train_state(model, smoothing_batch(0)["input"], settings, mesh)
    seen_dtypes = []

    def loss_fn(outputs, batch):
        seen_dtypes.append(outputs.dtype)
        return mse_loss(outputs, batch)

    step = make_train_step(loss_fn, mesh)
    losses = []
    for i in range(MIXED_STEPS):
        state, metrics = step(state, to_global_batch(smoothing_batch(i), mesh))
        losses.append(metrics["loss"])
    # Master weights stay float32; the loss sees float32 outputs.
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert set(seen_dtypes) == {jnp.dtype(jnp.float32)}
    assert {loss.dtype for loss in losses} == {jnp.dtype(jnp.float32)}
    return [float(loss) for loss in losses]


def test_bfloat16_training_follows_the_float32_loss_curve():
    x = smoothing_batch(0)["input"]
    bf16_net = UNet3D(dataclasses.replace(TINY_UNET, dtype=jnp.bfloat16))
    params = jax.eval_shape(bf16_net.init, jax.random.key(0, impl=FAST_PRNG), x)
    # The network really computes in bfloat16 (its raw output says so).
    assert jax.eval_shape(bf16_net.apply, params, x).dtype == jnp.bfloat16
    f32, bf16 = np.array(_loss_curve(None)), np.array(_loss_curve(jnp.bfloat16))
    np.testing.assert_allclose(bf16, f32, rtol=BF16_LOSS_RTOL)
    assert not np.array_equal(bf16, f32)
    # Both learn: the last losses are well below the first.
    assert f32[-3:].mean() < 0.5 * f32[0] and bf16[-3:].mean() < 0.5 * bf16[0]


# --- initialisation ----------------------------------------------------------


def _init_params(prng_impl: str):
    settings = TrainSettings(steps=1, batch_size=1, learning_rate=1e-3, seed=5, prng_impl=prng_impl)
    state = init_train_state(TinyNet(), smoothing_batch(0)["input"], settings, make_mesh(1))
    return state.params


def test_jitted_default_initialisation_equals_eager_init_bit_for_bit():
    x = jnp.zeros((1, *PATCH, 1), jnp.float32)
    eager = TinyNet().init(jax.random.key(5), x)["params"]
    legacy = TinyNet().init(jax.random.PRNGKey(5), x)["params"]
    jitted = _init_params("threefry2x32")
    direct = create_train_state(
        TinyNet(), x, TrainSettings(steps=1, batch_size=1, learning_rate=1e-3), jax.random.key(5)
    ).params
    for e, g, j, d in zip(
        *(jax.tree.leaves(p) for p in (eager, legacy, jitted, direct)), strict=True
    ):
        np.testing.assert_array_equal(j, e)
        np.testing.assert_array_equal(j, g)
        np.testing.assert_array_equal(d, e)


def test_rbg_initialisation_is_reproducible_and_differs_from_threefry():
    first, second = _init_params("unsafe_rbg"), _init_params("unsafe_rbg")
    default = _init_params("threefry2x32")
    kernel = ("Conv_0", "kernel")
    assert np.array_equal(first[kernel[0]][kernel[1]], second[kernel[0]][kernel[1]])
    assert not np.array_equal(first[kernel[0]][kernel[1]], default[kernel[0]][kernel[1]])
    # Still the Linen default (LeCun normal): same shapes, same scale.
    assert jax.tree.map(np.shape, first) == jax.tree.map(np.shape, default)
    assert float(np.std(first["Conv_0"]["kernel"])) == pytest.approx(
        float(np.std(default["Conv_0"]["kernel"])), rel=0.5
    )


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prng_impl", "philox", r"^config.train.prng_impl='philox': expected one of"),
        ("prefetch", -1, r"^config.train.prefetch=-1: expected >= 0"),
    ],
)
def test_bad_train_settings_name_their_key(field, value, message):
    settings = TrainSettings(steps=1, batch_size=1, learning_rate=1e-3, **{field: value})
    with pytest.raises(ConfigError, match=message):
        settings.validate()


def _demo_smoke():
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
    return runpy.run_path(str(path))["get_config"]("smoke")


def test_demo_config_reaches_the_unet_and_the_loop_with_behaviour_preserving_defaults():
    stage = ProximityStage.from_config(_demo_smoke())
    assert stage.unet_settings().remat is False
    assert stage.training.prng_impl == "threefry2x32"
    config = _demo_smoke()
    config.unet.remat = True
    config.train.prefetch = 0
    stage = ProximityStage.from_config(config)
    assert stage.unet_settings().remat is True
    assert stage.training.prefetch == 0


@pytest.mark.parametrize(
    ("block", "key", "value", "message"),
    [
        ("train", "prng_impl", "philox", r"^config.train.prng_impl='philox'"),
        ("train", "prefetch", -2, r"^config.train.prefetch=-2"),
    ],
)
def test_config_checks_name_the_new_keys(block, key, value, message):
    config = _demo_smoke()
    config[block][key] = value
    with pytest.raises(ConfigError, match=message):
        check_config(config)
