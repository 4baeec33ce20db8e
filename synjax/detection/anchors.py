"""Anchor boxes on the grid of each FPN level.

A feature map of shape `(fz, fy, fx)` at stride `(sz, sy, sx)` has one grid
cell per feature voxel; cell `(i, j, k)` covers input voxels
`[i*sz, (i+1)*sz) x ...` and its anchors are centred at
`((i + offset) * sz, (j + offset) * sy, (k + offset) * sx)`; the default offset
0.5 puts them at the cell's centre (the voxel-centre convention of
`synjax.detection.roi_align`). Each cell carries one anchor per size
`(dz, dy, dx)` in input voxels. Anchors are ordered cell-major, size-minor
(`[fz, fy, fx, A]` flattened), as detectron2 orders them, so a head's output
`[fz, fy, fx, A * k]` reshapes to `[fz * fy * fx * A, k]` in the same order.

Chen et al.'s 3D Mask R-CNN uses scales 2, 4 and 8 voxels along each of x, y and
z: `cartesian_sizes((2, 4, 8), (2, 4, 8), (2, 4, 8))` for all 27 shapes, or
`[(2, 2, 2), (4, 4, 4), (8, 8, 8)]` for the three cubes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from synjax.detection._validate import positive_int
from synjax.errors import ConfigError
from synjax.geometry import number_triple


def cartesian_sizes(
    z_sizes: Sequence[float], y_sizes: Sequence[float], x_sizes: Sequence[float]
) -> np.ndarray:
    """Every combination of per-axis anchor sizes.

    Args:
      z_sizes, y_sizes, x_sizes: anchor sizes along each axis, in input voxels.

    Returns:
      [len(z) * len(y) * len(x), 3] sizes (dz, dy, dx), z slowest.
    """
    return np.asarray(list(itertools.product(z_sizes, y_sizes, x_sizes)), np.float32).reshape(-1, 3)


def _sizes(op: str, sizes: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    array = np.asarray(sizes, np.float32)
    if array.ndim != 2 or array.shape[1] != 3 or len(array) == 0 or not np.all(array > 0):
        raise ConfigError(
            f"{op}: sizes={np.asarray(sizes).tolist()!r}; expected a non-empty list of "
            "positive (dz, dy, dx) triples"
        )
    return array


def level_anchors(
    feature_shape: Sequence[int],
    stride: float | Sequence[float],
    sizes: Sequence[Sequence[float]] | np.ndarray,
    offset: float = 0.5,
) -> jnp.ndarray:
    """Anchors of one FPN level.

    Args:
      feature_shape: (fz, fy, fx) spatial shape of the level's feature map.
      stride: input voxels per feature voxel, one number or (sz, sy, sx).
      sizes: [A, 3] anchor sizes (dz, dy, dx) in input voxels.
      offset: anchor centre within its cell, in cells (0.5: the cell's centre).

    Returns:
      [fz * fy * fx * A, 6] float32 boxes (z0, y0, x0, z1, y1, x1) in input voxels.
    """
    shape = tuple(positive_int("level_anchors", "feature_shape", int(s)) for s in feature_shape)
    if len(shape) != 3:
        raise ConfigError(f"level_anchors: feature_shape={feature_shape!r}; expected (fz, fy, fx)")
    strides = np.asarray(number_triple(stride, "level_anchors stride", broadcast=True), np.float32)
    size = _sizes("level_anchors", sizes)
    # Computed in NumPy: anchors depend on static shapes only, so under jit they
    # are a constant folded into the program.
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    centres = (np.stack(grids, axis=-1).reshape(-1, 1, 3) + offset) * strides
    half = size[None, :, :] * 0.5
    boxes = np.concatenate([centres - half, centres + half], axis=-1)
    return jnp.asarray(boxes.reshape(-1, 6))


def pyramid_anchors(
    feature_shapes: Sequence[Sequence[int]],
    strides: Sequence[float | Sequence[float]],
    sizes_per_level: Sequence[Sequence[Sequence[float]] | np.ndarray],
    offset: float = 0.5,
) -> tuple[jnp.ndarray, ...]:
    """Anchors of every FPN level.

    Args:
      feature_shapes: per level, (fz, fy, fx).
      strides: per level, the stride (one number or (sz, sy, sx)).
      sizes_per_level: per level, [A_l, 3] anchor sizes in input voxels.
      offset: anchor centre within its cell, in cells.

    Returns:
      One [fz * fy * fx * A_l, 6] array per level.
    """
    if not len(feature_shapes) == len(strides) == len(sizes_per_level):
        raise ConfigError(
            f"pyramid_anchors: {len(feature_shapes)} feature shapes, {len(strides)} strides, "
            f"{len(sizes_per_level)} size lists; expected one of each per level"
        )
    return tuple(
        level_anchors(shape, stride, sizes, offset)
        for shape, stride, sizes in zip(feature_shapes, strides, sizes_per_level, strict=True)
    )
