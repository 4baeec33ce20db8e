"""Rules shared by several pipelines' checks: training, intensity, top-level keys.

The value sets mirror library constants so that the checks stay fast (no JAX
import: a bad config is reported in a second); tests/test_bad_input.py keeps
them equal to the library's.
"""

from __future__ import annotations

import re

from synjax.errors import ConfigError
from synjax.pipelines.config_checks.rules import (
    Block,
    Value,
    boolean,
    choice,
    integer,
    non_negative,
    number,
    optional,
    positive,
    text,
)
from synjax.train.settings import PRNG_IMPLS

OPTIMIZERS = ("adam", "adamw", "sgd")  # synjax.train.state.OPTIMIZERS
SCHEDULES = ("constant", "cosine", "warmup_cosine")  # synjax.train.state.SCHEDULES
INTENSITY_METHODS = ("dtype", "percentiles")  # synjax.data.intensity methods
EXECUTORS = ("local", "dask")  # synjax.inference.blockwise.EXECUTORS
RESUME_MODES = ("auto", "strict")  # synjax.inference.blockwise.RESUME_MODES

# Ranges of the `synjax.train.settings.TrainSettings` fields.
TRAIN_RULES = {
    "steps": integer(1),
    "batch_size": integer(1),
    "learning_rate": positive(),
    "optimizer": choice(OPTIMIZERS),
    "schedule": choice(SCHEDULES),
    "warmup_steps": integer(0),
    "weight_decay": non_negative(),
    "grad_clip_norm": optional(positive()),
    "log_every": integer(0),
    "eval_every": integer(0),
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "num_devices": optional(integer(1)),
    # Newer fields: a config without them gets `TrainSettings`' defaults.
    "prefetch": integer(0, required=False),
    "prng_impl": choice(PRNG_IMPLS, required=False),
}


# "z0:z1,y0:y1,x0:x1" (bounds may be empty) or "": see synjax.pipelines.volume_input.
_ROI = re.compile(r"^\s*\d*\s*:\s*\d*\s*(,\s*\d*\s*:\s*\d*\s*){2}$")

# Predicting a user's volume (`config.predict.input`, synjax.pipelines.volume_input):
# rules of the keys that the partner and neuron prediction blocks share.
PREDICT_VOLUME_RULES = {
    "resume": choice(RESUME_MODES),
    "retries": integer(0),
    "input": text(),
    "output": text(),
    "roi": Value(
        lambda v: isinstance(v, str) and (v == "" or _ROI.match(v) is not None),
        'three ranges "z0:z1,y0:y1,x0:x1" of voxels, or "" for the whole volume',
    ),
}


def check_predict_volume(predict, where: str) -> None:
    """A prediction block whose `input` is set names its `output` too.

    Raises:
      ConfigError: `input` without `output`.
    """
    if predict.get("input") and not predict.get("output"):
        raise ConfigError(
            f"{where}.output is empty: expected a folder for the predictions of "
            f"{where}.input={predict.get('input')!r}"
        )


INTENSITY = Block(
    {
        "method": choice(INTENSITY_METHODS),
        "low_percent": number(0, 100, required=False),
        "high_percent": number(0, 100, required=False),
    },
    required=False,
)

TOP = {
    "pipeline": text(),
    "mode": text(),
    "seed": integer(0),
    "distributed": boolean(required=False),
    # Absent: "auto" (see synjax.runtime.enable_compilation_cache).
    "compilation_cache": optional(text(required=False)),
    "retain_freed_memory": boolean(required=False),
}


def check_warmup(warmup: int, steps: int, warmup_key: str, steps_key: str) -> None:
    if warmup and warmup >= steps:
        raise ConfigError(
            f"{warmup_key}={warmup}: expected fewer warm-up steps than {steps_key}={steps}"
        )


def needed_splits(mode: str) -> list[str]:
    """Which of the "train" and "test" files a run in `mode` reads."""
    return [
        split
        for split, modes in (("train", ("train", "all")), ("test", ("predict", "evaluate", "all")))
        if mode in modes
    ]
