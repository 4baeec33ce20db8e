"""The training loop: jit-compiled, data-parallel steps with checkpoints and logs.

`train` drives any Linen model with any loss: `batch_fn(step)` gives the
host batch (sampled ahead in a background thread, `prefetch.py`, while the
device runs the step), one `jax.jit` step (batch sharded on `'data'`, state
replicated and donated) updates the state, checkpoints make a re-run resume,
and metrics go to JSONL, TensorBoard and a progress bar. A NaN or infinite loss (or
gradient norm) stops the run with `NonFiniteLossError` before anything of
that step or later is logged or checkpointed, so the checkpoints left behind
all hold finite parameters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from jax.sharding import Mesh

from synjax.errors import ConfigError, SynjaxError
from synjax.io import layout
from synjax.report.progress import progress_bar
from synjax.train.batches import to_global_batch
from synjax.train.checkpoint import Checkpointer
from synjax.train.parallel import batch_sharding, make_mesh, replicated_sharding
from synjax.train.prefetch import BatchPrefetcher
from synjax.train.settings import TrainSettings
from synjax.train.state import TrainState, create_train_state

# Prefix of evaluation metrics in the JSONL lines and TensorBoard tags.
EVAL_PREFIX = "eval/"

LossFn = Callable[[Any, Mapping[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]
BatchFn = Callable[[int], dict[str, np.ndarray]]
EvalFn = Callable[[Any, int], dict[str, float]]
# Step recorded while every loss so far has been finite.
NO_STEP = -1


class NonFiniteLossError(SynjaxError):
    """Training stopped because the loss (or the gradient norm) became NaN or infinite.

    Attributes:
      name: the model's name.
      step: the first step (1-based, as in the logs) whose loss or gradient
        norm was not finite.
      loss: that step's loss (nan, inf, -inf, or finite when only the
        gradient was not).
      grad_norm: that step's global gradient norm.
      checkpoint_step: newest checkpoint left on disk (all hold finite
        parameters); None when none was saved.
    """

    def __init__(
        self,
        name: str,
        step: int,
        loss: float,
        grad_norm: float,
        checkpoint_step: int | None,
        where: Path,
    ):
        what = (
            f"loss is {loss}"
            if not np.isfinite(loss)
            else f"gradient norm is {grad_norm} (loss {loss:.5g})"
        )
        kept = (
            f"the last good checkpoint (step {checkpoint_step}) is kept in {where}"
            if checkpoint_step is not None
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"training {name}: {what} at step {step}; {kept} "
            "(lower the learning rate, or look for NaN/Inf in the inputs and targets)"
        )
        self.name, self.step, self.checkpoint_step = name, step, checkpoint_step
        self.loss, self.grad_norm = loss, grad_norm


def _in_float32(outputs: Any) -> Any:
    """Low-precision float outputs (bfloat16 compute) as float32; others unchanged.

    A loss summed over a patch in bfloat16 keeps 8 bits of mantissa: the
    float32 master weights would follow a coarsely rounded loss and gradient.
    """

    def widen(value):
        dtype = getattr(value, "dtype", None)
        if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
            return value.astype(jnp.float32)
        return value

    return jax.tree.map(widen, outputs)


def make_train_step(
    loss_fn: LossFn, mesh: Mesh
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """One jit-compiled optimizer step over (state, batch).

    Args:
      loss_fn: `(outputs, batch) -> (scalar loss, {name: scalar})`, where
        `outputs = state.apply_fn({"params": params}, batch["input"])` is any
        pytree; low-precision float outputs (a bfloat16 network) reach it
        as float32, so the loss is computed in float32. A state with
        `batch_stats` (BatchNorm models) is applied as `apply_fn({"params",
        "batch_stats"}, input, train=True, mutable=["batch_stats"])` and its
        statistics are updated too.
      mesh: mesh with axis 'data'.

    Returns:
      `step(state, batch) -> (new_state, metrics)`: batch sharded on 'data',
      state replicated and donated, metrics (with "loss" and "grad_norm")
      replicated scalars.
    """

    def step(state: TrainState, batch: dict[str, jax.Array]):
        has_stats = state.batch_stats is not None

        def loss_of(params):
            if not has_stats:
                outputs = state.apply_fn({"params": params}, batch["input"])
                loss, metrics = loss_fn(_in_float32(outputs), batch)
                return loss, (metrics, None)
            # BatchNorm normalises with this batch's statistics and updates
            # the running ones that inference (train=False) uses.
            outputs, updates = state.apply_fn(
                state.variables(params), batch["input"], train=True, mutable=["batch_stats"]
            )
            loss, metrics = loss_fn(_in_float32(outputs), batch)
            return loss, (metrics, updates["batch_stats"])

        (loss, (metrics, stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        new_state = state.apply_gradients(grads=grads)
        if has_stats:
            new_state = new_state.replace(batch_stats=stats)
        return new_state, metrics

    replicated = replicated_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, batch_sharding(mesh)),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def init_train_state(
    model: nn.Module, sample_input: np.ndarray, settings: TrainSettings, mesh: Mesh
) -> TrainState:
    """The state at step 0: parameters initialised in one compiled call, replicated on `mesh`.

    Args:
      model: as for `train`.
      sample_input: `[batch, z, y, x, channels]`; only its shape and dtype matter.
      settings: `seed` and `prng_impl` make the key
        (`jax.random.key(seed, impl=prng_impl)`); the optimizer fields the rest.
      mesh: mesh from `synjax.train.parallel.make_mesh`.

    Returns:
      A `TrainState` at step 0 whose parameters equal eager `model.init` with
      the same key (compiling the initialisation changes no bit of them).
    """
    return jax.jit(
        lambda rng: create_train_state(model, sample_input, settings, rng),
        out_shardings=replicated_sharding(mesh),
    )(jax.random.key(settings.seed, impl=settings.prng_impl))


class _MetricWriter:
    """JSONL + TensorBoard writer that only writes on process 0."""

    def __init__(self, workdir: Path, name: str):
        self.enabled = jax.process_index() == 0
        self.path = layout.training_log(workdir, name)
        self._tb = None
        if self.enabled:
            # Imported here: tensorboardX pulls in protobuf, which only the
            # writing process needs.
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(layout.tensorboard_dir(workdir, name)))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {key: float(np.asarray(value)) for key, value in jax.device_get(dict(metrics)).items()}


def _info_silenced() -> bool:
    """Whether a command line asked for warnings only (e.g. `--verbosity=-1`).

    The progress bar is INFO-level output: it goes with the INFO lines, so
    that warnings and errors stand alone. Without parsed absl flags (a
    notebook, a test) the bar shows as usual.
    """
    return flags.FLAGS.is_parsed() and not logging.level_info()


def _no_non_finite_yet() -> tuple[jax.Array, jax.Array, jax.Array]:
    """The record `_note_non_finite` keeps: (step, loss, grad_norm), step NO_STEP."""
    return jnp.int32(NO_STEP), jnp.float32(0.0), jnp.float32(0.0)


@jax.jit
def _note_non_finite(first, step, metrics: Mapping[str, jax.Array]):
    """Keeps (step, loss, grad_norm) of the first step where either was not finite.

    Runs on the device after every step: a tiny asynchronous dispatch, so
    the host waits for it only where it fetches metrics anyway. A finite
    loss and gradient norm make a finite update, so every state saved after
    a clean check has finite parameters.
    """
    first_step, first_loss, first_norm = first
    loss, norm = metrics["loss"], metrics["grad_norm"]
    fresh = (first_step == NO_STEP) & ~(jnp.isfinite(loss) & jnp.isfinite(norm))
    return (
        jnp.where(fresh, step, first_step),
        jnp.where(fresh, loss, first_loss).astype(jnp.float32),
        jnp.where(fresh, norm, first_norm).astype(jnp.float32),
    )


def _stop_if_non_finite(first, name: str, checkpointer: Checkpointer) -> None:
    """Raises `NonFiniteLossError` if a step since the start of the run was not finite."""
    step, loss, norm = (np.asarray(x).item() for x in jax.device_get(first))
    if step != NO_STEP:
        raise NonFiniteLossError(
            name, step, loss, norm, checkpointer.latest_step(), checkpointer.directory
        )


def train(
    model: nn.Module,
    loss_fn: LossFn,
    batch_fn: BatchFn,
    settings: TrainSettings,
    workdir: str | Path,
    name: str = "model",
    eval_fn: EvalFn | None = None,
) -> TrainState:
    """Trains `model` to `settings.steps`, resuming from `workdir` if possible.

    Args:
      model: Linen module; `model.apply({"params": p}, batch["input"])`, or,
        when its `init` creates "batch_stats" (BatchNorm), called with
        `train=True` while training; the stats are checkpointed with it.
      loss_fn: `(outputs, batch) -> (scalar loss, {name: scalar metric})`.
      batch_fn: `step -> host batch`, deterministic in `step` so that a resumed
        run sees the batches an uninterrupted one would; "input" is
        `[local_batch, z, y, x, channels]`, other keys are targets. On several
        processes it returns this process's share. With `settings.prefetch`
        it is called from a background thread, in step order, up to that
        many steps ahead (it must not share mutable state with `eval_fn`).
      settings: run length, optimizer, prefetch, logging and checkpoint cadence.
      workdir: run folder: `checkpoints/<name>`, `metrics/<name>.jsonl` and
        `tensorboard/<name>` are written under it.
      name: model name (several models can share a workdir).
      eval_fn: `(params, step) -> {name: value}`, called every `eval_every`
        steps; logged with the prefix "eval/".

    Returns:
      The final `TrainState` (replicated over the mesh).

    Raises:
      NonFiniteLossError: a loss or gradient norm was NaN or infinite. The
        record of the first such step is fetched where the host looks at the
        run anyway (each log, eval and checkpoint step); nothing from that
        step on is logged or saved.
    """
    settings.validate()
    workdir = Path(workdir)
    mesh = make_mesh(settings.num_devices)
    is_writer = jax.process_index() == 0

    with Checkpointer(workdir, name, keep=settings.keep_checkpoints) as checkpointer:
        start = checkpointer.latest_step() or 0
        first_batch = batch_fn(start)
        if "input" not in first_batch:
            raise ConfigError(
                f"batch_fn({start}) returned keys {sorted(first_batch)}; expected an 'input'"
            )
        state = init_train_state(model, first_batch["input"], settings, mesh)
        if start:
            state = checkpointer.restore(state, start)
            logging.info("%s: resumed from step %d in %s", name, start, checkpointer.directory)
        if start >= settings.steps:
            return state

        train_step = make_train_step(loss_fn, mesh)
        writer = _MetricWriter(workdir, name)
        bar = progress_bar(
            total=settings.steps,
            initial=start,
            desc=name,
            disable=not is_writer or _info_silenced(),
            leave=False,
        )
        first_non_finite = jax.jit(_no_non_finite_yet, out_shardings=replicated_sharding(mesh))()
        # The first batch is at hand: the others are sampled while steps run.
        batches = BatchPrefetcher(batch_fn, range(start + 1, settings.steps), settings.prefetch)
        last_time, last_step = time.perf_counter(), start
        try:
            for step in range(start, settings.steps):
                host_batch = first_batch if step == start else batches.get(step)
                state, metrics = train_step(state, to_global_batch(host_batch, mesh))
                done = step + 1
                first_non_finite = _note_non_finite(first_non_finite, done, metrics)
                bar.update(1)
                log_now = bool(settings.log_every) and done % settings.log_every == 0
                eval_now = (
                    eval_fn is not None
                    and bool(settings.eval_every)
                    and done % settings.eval_every == 0
                )
                save_now = done % settings.checkpoint_every == 0 or done == settings.steps
                if log_now or eval_now or save_now:
                    _stop_if_non_finite(first_non_finite, name, checkpointer)
                if log_now:
                    values = _to_floats(metrics)
                    now = time.perf_counter()
                    values["steps_per_sec"] = (done - last_step) / max(now - last_time, 1e-9)
                    last_time, last_step = now, done
                    writer.write(done, values)
                    bar.set_postfix(
                        loss=f"{values['loss']:.4g}", steps_per_sec=f"{values['steps_per_sec']:.3g}"
                    )
                    logging.info(
                        "%s step %d: loss %.5g, %.3g steps/s",
                        name,
                        done,
                        values["loss"],
                        values["steps_per_sec"],
                    )
                if eval_now:
                    results = eval_fn(state.params, done)
                    writer.write(done, {f"{EVAL_PREFIX}{k}": float(v) for k, v in results.items()})
                if save_now:
                    checkpointer.save(state)
        finally:
            batches.close()
            bar.close()
            writer.close()
    return state
