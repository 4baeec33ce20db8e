"""Host batches (numpy, one per process) -> global `jax.Array`s on the mesh.

Each process samples its own share of the global batch; the global array is
assembled with `jax.make_array_from_process_local_data`, sharded on `'data'`.
It lives beside the train step that consumes it (`loop.py`), as flax's
imagenet example keeps its input iterator beside its train step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from synjax.errors import ConfigError
from synjax.train.parallel import batch_sharding, local_mesh_size


def host_batch_size(batch_size: int) -> int:
    """This process's share of a global batch of `batch_size` examples.

    Raises:
      ConfigError: `batch_size` is not a positive multiple of the process count.
    """
    count = jax.process_count()
    if batch_size < 1 or batch_size % count:
        raise ConfigError(
            f"config.train.batch_size={batch_size}: expected a positive multiple of "
            f"the process count {count}"
        )
    return batch_size // count


def to_global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns this process's batch into global arrays sharded on `'data'`.

    Args:
      host_batch: arrays whose leading axis is this process's share of the
        batch, e.g. "input" `[local_batch, z, y, x, channels]`.
      mesh: mesh from `synjax.train.parallel.make_mesh`.

    Returns:
      The same keys as global `jax.Array`s of leading size
      `local_batch * jax.process_count()`, split over the mesh's devices.

    Raises:
      ConfigError: the local batch does not split evenly over the local
        devices, or the arrays disagree on the batch size.
    """
    if not host_batch:
        raise ConfigError("to_global_batch: host batch is empty; expected at least an 'input'")
    sizes = {
        key: np.shape(value)[0] if np.ndim(value) else None for key, value in host_batch.items()
    }
    if None in sizes.values() or len(set(sizes.values())) != 1:
        raise ConfigError(
            f"to_global_batch: every array needs the same leading batch size, got {sizes}"
        )
    local_batch = next(iter(sizes.values()))
    devices = local_mesh_size(mesh)
    if local_batch % devices:
        raise ConfigError(
            f"config.train.batch_size={local_batch * jax.process_count()}: the per-process "
            f"batch {local_batch} must be divisible by the {devices} local devices of the mesh"
        )
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in host_batch.items()
    }


def process_batch_fn(
    sampler_batch: Callable[..., dict[str, np.ndarray]], batch_size: int
) -> Callable[[int], dict[str, np.ndarray]]:
    """Binds a sampler's `batch` to this process's share of a global batch.

    Args:
      sampler_batch: `PatchSampler.batch` (or any function with its signature
        `(step, batch_size, shard=, num_shards=)`).
      batch_size: global batch size (`config.train.batch_size`).

    Returns:
      `batch_fn(step)` for `synjax.train.loop.train`.
    """
    host_batch_size(batch_size)
    shard, num_shards = jax.process_index(), jax.process_count()

    def batch_fn(step: int) -> dict[str, np.ndarray]:
        return sampler_batch(step, batch_size, shard=shard, num_shards=num_shards)

    return batch_fn
