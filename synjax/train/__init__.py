"""Training: device mesh, host batches to sharded arrays, settings, state, loop, checkpoints.

`train(model, loss_fn, batch_fn, settings, workdir, name)` runs any Linen
model; `TrainSettings` (JAX-free, `settings.py`) says how. May import io,
data, targets, models and detection. Names are re-exported lazily, so that
reading `TrainSettings` (the config checks do) needs no JAX.
"""

import importlib

_EXPORTS = {
    "Checkpointer": "checkpoint",
    "latest_step": "checkpoint",
    "restore_params": "checkpoint",
    "restore_variables": "checkpoint",
    "make_train_step": "loop",
    "train": "loop",
    "batch_sharding": "parallel",
    "make_mesh": "parallel",
    "replicated_sharding": "parallel",
    "TrainSettings": "settings",
    "TrainState": "state",
    "create_train_state": "state",
    "make_optimizer": "state",
    "to_global_batch": "batches",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
