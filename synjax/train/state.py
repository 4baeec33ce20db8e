"""Train state and optimizer built from `TrainSettings`.

The state is flax's `TrainState` (step, params, opt_state; `apply_fn` and `tx`
are static) plus `batch_stats`: the running statistics of BatchNorm layers
(None for models without them), so a train step is one pure function of
(state, batch).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from synjax.errors import ConfigError
from synjax.train.settings import TrainSettings

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "warmup_cosine")
# Momentum of the "sgd" optimizer (the common default for conv nets).
SGD_MOMENTUM = 0.9

__all__ = ["TrainState", "create_train_state", "make_optimizer", "make_schedule"]


class TrainState(train_state.TrainState):
    """flax's `TrainState` with the model's non-trained "batch_stats" collection.

    Attributes:
      batch_stats: BatchNorm running statistics, updated by each train step
        (`apply(..., train=True, mutable=["batch_stats"])`) and used at
        inference (`train=False`); None for models without BatchNorm.
    """

    batch_stats: Any = None

    def variables(self, params: Any = None) -> dict[str, Any]:
        """The variables dict for `apply`: params (default `self.params`) and batch stats."""
        variables = {"params": self.params if params is None else params}
        if self.batch_stats is not None:
            variables["batch_stats"] = self.batch_stats
        return variables


def make_schedule(settings: TrainSettings) -> optax.Schedule:
    """Learning rate as a function of the optimizer step.

    "constant": `learning_rate` after an optional linear warm-up of
    `warmup_steps` from 0. "cosine": cosine decay from `learning_rate` to 0
    over `steps`. "warmup_cosine": linear warm-up from 0 over `warmup_steps`,
    then cosine decay to 0 at `steps`. The cosine schedules depend on
    `steps`: resuming a run with a larger `steps` changes the remaining rates.

    Raises:
      ConfigError: unknown schedule or warm-up not shorter than `steps`.
    """
    lr, steps, warmup = settings.learning_rate, settings.steps, settings.warmup_steps
    if settings.schedule not in SCHEDULES:
        raise ConfigError(
            f"config.train.schedule={settings.schedule!r}: expected one of {SCHEDULES}"
        )
    if warmup < 0 or (warmup and warmup >= steps):
        raise ConfigError(
            f"config.train.warmup_steps={warmup}: expected 0 <= warmup_steps < steps ({steps})"
        )
    if settings.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=max(steps, 1))
    if settings.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(steps, 1)
        )
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup]
        )
    return optax.constant_schedule(lr)


def make_optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    """Optimizer named by `settings.optimizer` with its schedule and clipping.

    Gradients are clipped to global norm `grad_clip_norm` (when set) before
    the optimizer sees them. `weight_decay` is decoupled for "adamw" and added
    to the gradient (L2) for "adam" and "sgd".

    Raises:
      ConfigError: unknown optimizer or negative learning rate/decay/clip.
    """
    if settings.optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"config.train.optimizer={settings.optimizer!r}: expected one of {OPTIMIZERS}"
        )
    if settings.learning_rate <= 0:
        raise ConfigError(
            f"config.train.learning_rate={settings.learning_rate}: expected a positive number"
        )
    if settings.weight_decay < 0:
        raise ConfigError(f"config.train.weight_decay={settings.weight_decay}: expected >= 0")
    if settings.grad_clip_norm is not None and settings.grad_clip_norm <= 0:
        raise ConfigError(
            f"config.train.grad_clip_norm={settings.grad_clip_norm}: expected > 0 or None"
        )
    schedule = make_schedule(settings)
    parts = []
    if settings.grad_clip_norm is not None:
        parts.append(optax.clip_by_global_norm(settings.grad_clip_norm))
    if settings.optimizer == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=settings.weight_decay))
    else:
        if settings.weight_decay:
            parts.append(optax.add_decayed_weights(settings.weight_decay))
        if settings.optimizer == "adam":
            parts.append(optax.adam(schedule))
        else:
            parts.append(optax.sgd(schedule, momentum=SGD_MOMENTUM))
    return optax.chain(*parts)


def create_train_state(
    model: nn.Module, sample_input: np.ndarray, settings: TrainSettings, rng: jax.Array
) -> TrainState:
    """Initialises the model's parameters and the optimizer.

    Args:
      model: a Linen module called as `model.apply({"params": p}, x)`; when
        its `init` creates a "batch_stats" collection (BatchNorm), the state
        carries it and the model must accept a `train` keyword.
      sample_input: `[batch, z, y, x, channels]` example input; only its
        shape and dtype matter (one example is enough).
      settings: optimizer, schedule and clipping settings.
      rng: PRNG key for parameter initialisation.

    Returns:
      A `TrainState` at step 0.
    """
    # Parameter shapes do not depend on the batch size: initialise on one example.
    dtype = jax.dtypes.canonicalize_dtype(np.asarray(sample_input).dtype)
    x = jnp.zeros((1, *np.shape(sample_input)[1:]), dtype)
    variables = jax.jit(model.init)(rng, x)
    return TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=make_optimizer(settings),
        batch_stats=variables.get("batch_stats"),
    )
