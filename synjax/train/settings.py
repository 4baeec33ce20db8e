"""How long and how to train: `TrainSettings`, the fields of a config's `train` block.

Kept apart from the loop (`loop.py`), the state (`state.py`) and the
checkpoints (`checkpoint.py`), which all read it, and free of JAX, so that the
config checks can read its fields quickly.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from synjax.errors import ConfigError
from synjax.settings import config_fields, from_config

# PRNG implementations of the parameter initialisation (`jax.random.key(seed, impl=...)`):
# threefry (JAX's default: the parameters of every run so far) or the faster,
# hardware-generator-based "rbg" / "unsafe_rbg" (other parameters for the same seed).
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """How long and how to train (the `config.train` fields).

    Attributes:
      steps: total optimizer steps of the run (a resumed run stops here too).
      batch_size: global batch size over all devices and processes.
      learning_rate: peak learning rate.
      optimizer: "adam", "adamw" or "sgd".
      schedule: "constant", "cosine" or "warmup_cosine".
      warmup_steps: linear warm-up steps (schedules "constant", "warmup_cosine").
      weight_decay: decoupled for "adamw", L2 added to gradients otherwise.
      grad_clip_norm: clip gradients to this global norm; None: no clipping.
      log_every: steps between metric lines; 0: never.
      eval_every: steps between `eval_fn` calls; 0: never.
      checkpoint_every: steps between checkpoints (one is saved at the end too).
      keep_checkpoints: most recent checkpoints kept.
      seed: seed of the parameter initialisation (given by the caller: a
        config's `seed` or a model's, never a train block's).
      num_devices: local devices to use; None: all.
      prefetch: host batches sampled ahead in a background thread while the
        device runs the step (the same batches in the same order); 0: each
        batch is sampled after the step that precedes it was dispatched.
      prng_impl: PRNG of the parameter initialisation, one of `PRNG_IMPLS`;
        "threefry2x32" keeps the parameters of earlier runs bit for bit.
    """

    GIVEN: ClassVar[tuple[str, ...]] = ("seed",)

    steps: int
    batch_size: int
    learning_rate: float
    optimizer: str = "adam"
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip_norm: float | None = None
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    num_devices: int | None = None
    prefetch: int = 2
    prng_impl: str = "threefry2x32"

    @classmethod
    def from_config(cls, block, seed: int, steps: int | None = None) -> TrainSettings:
        """The training fields of a block that also holds other settings' fields.

        The fields of this class are read (absent ones keep their defaults);
        any other key is left to the settings class that owns it (for a whole
        block of one class, use `synjax.settings.from_config`, which refuses
        unknown keys).

        Args:
          block: ConfigDict or mapping with `batch_size`, `learning_rate`, and
            `steps` unless given, plus any other field of this class.
          seed: parameter-initialisation seed.
          steps: overrides `block.steps` (e.g. a per-model step count).
        """
        own = {key: block[key] for key in block.keys() if key in config_fields(cls)}
        if steps is not None:
            own["steps"] = steps
        return from_config(cls, own, "config.train", seed=seed)

    def validate(self) -> None:
        """Raises ConfigError naming the first field with an unusable value."""
        positive = {"steps": self.steps, "batch_size": self.batch_size}
        non_negative = {
            "log_every": self.log_every,
            "eval_every": self.eval_every,
            "warmup_steps": self.warmup_steps,
            "prefetch": self.prefetch,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"config.train.{key}={value}: expected a positive integer")
        for key, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"config.train.{key}={value}: expected >= 0")
        if self.checkpoint_every < 1:
            raise ConfigError(
                f"config.train.checkpoint_every={self.checkpoint_every}: expected >= 1"
            )
        if self.prng_impl not in PRNG_IMPLS:
            raise ConfigError(
                f"config.train.prng_impl={self.prng_impl!r}: expected one of {PRNG_IMPLS}"
            )
