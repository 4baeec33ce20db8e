"""Checkpoints of the train state, through orbax-checkpoint's `CheckpointManager`.

This is the only module that imports orbax. A checkpoint of model `name`
lives under `workdir/checkpoints/<name>/<step>/` with two items: "params"
(the model parameters) and "opt_state" (the optimizer state, needed to resume
training), and a third, "batch_stats", for models with BatchNorm (their
running statistics, needed with the params for prediction). The step is the
checkpoint's step. `checkpoint_provenance` names a checkpoint by its step and
the hash of its parameters, which outputs made with it record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from synjax.errors import ConfigError, DataError
from synjax.io.layout import checkpoint_dir
from synjax.io.provenance import model_provenance
from synjax.train.state import TrainState

PARAMS_ITEM = "params"
OPT_STATE_ITEM = "opt_state"
BATCH_STATS_ITEM = "batch_stats"
_ITEMS = (PARAMS_ITEM, OPT_STATE_ITEM, BATCH_STATS_ITEM)


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree`, the target that orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores `TrainState`s of one model; keeps the latest `keep`.

    Saving is asynchronous: `save` returns once the arrays are copied off the
    devices, so the next (donating) train step may run while files are
    written. Call `close` (or use it as a context manager) to wait for them.

    Args:
      workdir: run folder; checkpoints go to `workdir/checkpoints/<name>`.
      name: model name.
      keep: number of most recent checkpoints to keep.
    """

    def __init__(self, workdir: str | Path, name: str, keep: int = 2):
        if keep < 1:
            raise ConfigError(f"config.train.keep_checkpoints={keep}: expected >= 1")
        self.directory = checkpoint_dir(workdir, name)
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=_ITEMS,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        """Step of the newest checkpoint, or None when there is none."""
        return self._manager.latest_step()

    def save(self, state: TrainState) -> bool:
        """Saves `state` at `state.step` (a no-op when that step is already saved)."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        items = {
            PARAMS_ITEM: ocp.args.StandardSave(state.params),
            OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
        }
        if getattr(state, "batch_stats", None) is not None:
            items[BATCH_STATS_ITEM] = ocp.args.StandardSave(state.batch_stats)
        return self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, state: TrainState, step: int | None = None) -> TrainState:
        """Restores the checkpoint at `step` (None: the latest) into `state`'s layout.

        Args:
          state: a freshly created state of the same model and optimizer; its
            arrays give the shapes, dtypes and shardings to restore into.
          step: checkpoint step, None for the latest.

        Raises:
          DataError: there is no such checkpoint, or it does not fit `state`.
        """
        step = self._resolve_step(step)
        items = {
            PARAMS_ITEM: ocp.args.StandardRestore(_abstract(state.params)),
            OPT_STATE_ITEM: ocp.args.StandardRestore(_abstract(state.opt_state)),
        }
        has_stats = getattr(state, "batch_stats", None) is not None
        if has_stats:
            items[BATCH_STATS_ITEM] = ocp.args.StandardRestore(_abstract(state.batch_stats))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise DataError(
                f"checkpoint {self.directory}/{step} does not match the model/optimizer: {e}"
            ) from e
        step_array = jax.device_put(jnp.asarray(step, jnp.int32), state.step.sharding)
        state = state.replace(
            step=step_array, params=restored[PARAMS_ITEM], opt_state=restored[OPT_STATE_ITEM]
        )
        if has_stats:
            state = state.replace(batch_stats=restored[BATCH_STATS_ITEM])
        return state

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Restores only the parameters, shaped like `abstract_params`."""
        return self.restore_items({PARAMS_ITEM: abstract_params}, step)[PARAMS_ITEM]

    def restore_items(self, abstract: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Restores the named items (e.g. "params", "batch_stats"), shaped like `abstract`."""
        step = self._resolve_step(step)
        args = {item: ocp.args.StandardRestore(tree) for item, tree in abstract.items()}
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise DataError(
                f"checkpoint {self.directory}/{step} does not match the model: {e}"
            ) from e
        return {item: restored[item] for item in abstract}

    def _resolve_step(self, step: int | None) -> int:
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
        if step is None or step not in steps:
            raise DataError(
                f"no checkpoint at step {step} in {self.directory}: have steps {sorted(steps)}"
            )
        return step

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def latest_step(workdir: str | Path, name: str) -> int | None:
    """Step of the newest checkpoint of `name` under `workdir`, or None."""
    if not checkpoint_dir(workdir, name).is_dir():
        return None
    with Checkpointer(workdir, name) as checkpointer:
        return checkpointer.latest_step()


def restore_params(
    workdir: str | Path,
    name: str,
    model: nn.Module,
    sample_input: np.ndarray,
    step: int | None = None,
) -> Any:
    """Parameters of model `name` from its newest (or given) checkpoint.

    For prediction-only runs: the optimizer state is not read. Models with
    BatchNorm also need their statistics: use `restore_variables`.

    Args:
      workdir: run folder that holds `checkpoints/<name>`.
      name: model name used when training.
      model: the same Linen module that was trained.
      sample_input: `[batch, z, y, x, channels]` example input (shape and
        dtype only).
      step: checkpoint step, None for the latest.

    Returns:
      The parameter pytree, on the default device.

    Raises:
      DataError: no checkpoint, or it does not fit the model.
    """
    return restore_variables(workdir, name, model, sample_input, step)[PARAMS_ITEM]


def restore_variables(
    workdir: str | Path,
    name: str,
    model: nn.Module,
    sample_input: np.ndarray,
    step: int | None = None,
) -> dict[str, Any]:
    """Variables of model `name` for `model.apply`: params, and batch stats if it has any.

    Args: as `restore_params`.

    Returns:
      `{"params": ...}` plus `"batch_stats"` for models whose `init` creates
      that collection (BatchNorm), on the default device.

    Raises:
      DataError: no checkpoint, or it does not fit the model.
    """
    if not checkpoint_dir(workdir, name).is_dir():
        raise DataError(
            f"no checkpoints for model {name!r}: {checkpoint_dir(workdir, name)} is absent"
        )
    x = jax.ShapeDtypeStruct((1, *np.shape(sample_input)[1:]), np.asarray(sample_input).dtype)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {
        item: jax.tree.map(
            lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes[item]
        )
        for item in (PARAMS_ITEM, BATCH_STATS_ITEM)
        if item in shapes
    }
    with Checkpointer(workdir, name) as checkpointer:
        return checkpointer.restore_items(abstract, step)


def checkpoint_provenance(
    workdir: str | Path, name: str, step: int | None = None
) -> dict[str, Any]:
    """Which parameters model `name`'s newest (or given) checkpoint holds.

    Reads the parameters as they were saved (no model needed) onto one local
    device and hashes them with `synjax.io.provenance.params_fingerprint`, so
    the result equals `model_provenance(name, step, params)` of the same
    parameters in memory.

    Args:
      workdir: run folder that holds `checkpoints/<name>`.
      name: model name used when training.
      step: checkpoint step, None for the latest.

    Returns:
      `{"name": name, "step": int, "params_hash": str}`.

    Raises:
      DataError: no checkpoint of `name` (at `step`).
    """
    directory = checkpoint_dir(workdir, name)
    if not directory.is_dir():
        raise DataError(f"no checkpoints for model {name!r}: {directory} is absent")
    # A handler per item lets the manager read the metadata (shapes and dtypes)
    # of "params", restored onto one device whatever the topology it was saved
    # from; the other items need handlers too, or orbax warns that it found
    # items it cannot restore (only "params" is read).
    manager = ocp.CheckpointManager(
        directory,
        item_names=_ITEMS,
        item_handlers={item: ocp.StandardCheckpointHandler() for item in _ITEMS},
    )
    try:
        steps = manager.all_steps()
        step = manager.latest_step() if step is None else step
        if step is None or step not in steps:
            raise DataError(
                f"no checkpoint at step {step} in {directory}: have steps {sorted(steps)}"
            )
        metadata = manager.item_metadata(step)[PARAMS_ITEM]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
            getattr(metadata, "tree", metadata),
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(**{PARAMS_ITEM: ocp.args.StandardRestore(abstract)})
        )
    finally:
        manager.close()
    return model_provenance(name, step, jax.device_get(restored[PARAMS_ITEM]))
