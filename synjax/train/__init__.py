"""Training: device mesh, host batches to sharded arrays, settings, state, loop, checkpoints.

`train(model, loss_fn, batch_fn, settings, workdir, name)` trains any Linen
model as `TrainSettings` (JAX-free, `settings.py`) says; `checkpoint.py` is the
only orbax user. May import io, data, targets, models and detection.
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "Checkpointer": "checkpoint",
        "checkpoint_provenance": "checkpoint",
        "latest_step": "checkpoint",
        "restore_params": "checkpoint",
        "restore_variables": "checkpoint",
        "NonFiniteLossError": "loop",
        "init_train_state": "loop",
        "make_train_step": "loop",
        "train": "loop",
        "batch_sharding": "parallel",
        "make_mesh": "parallel",
        "replicated_sharding": "parallel",
        "BatchPrefetcher": "prefetch",
        "TrainSettings": "settings",
        "TrainState": "state",
        "create_train_state": "state",
        "make_optimizer": "state",
        "host_batch_size": "batches",
        "process_batch_fn": "batches",
        "to_global_batch": "batches",
    },
)
