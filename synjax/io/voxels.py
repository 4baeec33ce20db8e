"""World positions (nm) to voxel indices: the package's one rounding rule.

Voxel i of an axis is centred on `offset + i * resolution`. A position is
given the voxel whose centre is nearest; a position exactly half-way between
two centres goes to the upper one:

    voxel = floor((position - offset) / resolution + 1/2)

Why half-up and not numpy's `np.round` (half to even) or Python 2's `round`
(half away from zero):

- each voxel owns the half-open cell [i - 1/2, i + 1/2) of positions, so every
  position belongs to exactly one voxel and neighbouring voxels never both
  claim (or both refuse) the shared face;
- it commutes with whole-voxel shifts: moving the offset by k voxels moves
  every index by exactly k, whatever the sign of the position. Half to even
  breaks this (2.5 -> 2 but 3.5 -> 4), half away from zero breaks it at 0
  (-0.5 -> -1 but 0.5 -> 1);
- for positive positions it agrees with Python 2's `round` (half away from
  zero), the rounding of the Python 2 era tools written for CREMI.

Every conversion from nm (or from fractional voxel positions) to a voxel index
goes through `nearest_voxel`, so no two parts of the package can disagree on
which voxel a synapse site lies in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS


def nearest_voxel(positions: np.ndarray) -> np.ndarray:
    """Voxel indices of fractional voxel positions, halves rounded up.

    Args:
      positions: [..., 3] positions in voxel units (voxel i is centred on i).

    Returns:
      [..., 3] int64 `floor(positions + 0.5)`.
    """
    return np.floor(np.asarray(positions, np.float64) + 0.5).astype(np.int64)


def world_to_voxel(
    locations_nm: np.ndarray,
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """The voxel each world location lies in (see the module docstring).

    Args:
      locations_nm: [..., 3] nm, z-y-x.
      resolution: voxel size in nm, z-y-x.
      offset: world location of voxel (0, 0, 0) in nm, z-y-x.

    Returns:
      [..., 3] int64 voxel indices; they may lie outside any volume.
    """
    locations = np.asarray(locations_nm, np.float64)
    res = np.asarray(resolution, np.float64).reshape(-1)
    off = np.asarray(offset, np.float64).reshape(-1)
    triple = (SPATIAL_DIMS,)
    if locations.shape[-1:] != triple or res.shape != triple or off.shape != triple:
        raise DataError(
            f"world_to_voxel: locations {locations.shape}, resolution {res.shape}, offset "
            f"{off.shape}: expected [..., 3], 3 and 3 values (z, y, x)"
        )
    if np.any(res <= 0):
        raise DataError(f"world_to_voxel: resolution {tuple(res)}; expected positive nm sizes")
    return nearest_voxel((locations - off) / res)


def inside_volume(voxels: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """[...] bool: whether each voxel index [..., 3] lies in a volume of `shape`."""
    voxels = np.asarray(voxels)
    return np.all((voxels >= 0) & (voxels < np.asarray(shape[:SPATIAL_DIMS])), axis=-1)


def segment_ids_at(
    segmentation: np.ndarray,
    locations_nm: np.ndarray,
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    outside: int = 0,
) -> np.ndarray:
    """Labels of a volume at world locations.

    Args:
      segmentation: [z, y, x] integer labels (neurons, cleft instances, ...).
      locations_nm: [n, 3] nm, z-y-x, in the frame of `offset`.
      resolution: voxel size in nm, z-y-x.
      offset: world location of voxel (0, 0, 0) in nm.
      outside: label given to locations whose voxel lies outside the volume.

    Returns:
      [n] labels in `segmentation`'s dtype.
    """
    segmentation = np.asarray(segmentation)
    voxels = world_to_voxel(np.reshape(locations_nm, (-1, SPATIAL_DIMS)), resolution, offset)
    inside = inside_volume(voxels, segmentation.shape)
    ids = np.full(len(voxels), outside, dtype=segmentation.dtype)
    ids[inside] = segmentation[tuple(voxels[inside].T)]
    return ids
