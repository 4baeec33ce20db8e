"""Device mesh and shardings for data-parallel training and prediction.

One 1D mesh with axis `'data'`: batches are split over it on their leading
axis, parameters and optimizer state are replicated. `jax.jit` with these
`NamedSharding`s replaces `pmap` (see DESIGN.md).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from synjax.errors import ConfigError

# Name of the single mesh axis that batches are split over.
DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """Builds a 1D mesh with axis `'data'`.

    Args:
      num_devices: devices to use on each process, the first `num_devices` of
        `jax.local_devices()`; None uses all of them. On several processes the
        mesh holds this many devices of every process.

    Returns:
      A `Mesh` of shape `[num_devices * jax.process_count()]`.

    Raises:
      ConfigError: `num_devices` is not in [1, local device count].
    """
    local_count = jax.local_device_count()
    if num_devices is None:
        num_devices = local_count
    if not 1 <= num_devices <= local_count:
        raise ConfigError(
            f"config.train.num_devices={num_devices}: expected 1..{local_count} "
            f"(the local {jax.default_backend()} device count) or None"
        )
    # Take the first `num_devices` of each process, in process order, so that
    # every process holds a contiguous block of the 'data' axis.
    devices = [
        d
        for p in range(jax.process_count())
        for d in [dev for dev in jax.devices() if dev.process_index == p][:num_devices]
    ]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over `'data'`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every mesh device."""
    return NamedSharding(mesh, PartitionSpec())


def local_mesh_size(mesh: Mesh) -> int:
    """Number of this process's devices in `mesh`."""
    return int(sum(d.process_index == jax.process_index() for d in mesh.devices.flat))
