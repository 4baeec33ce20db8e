"""Volumes, intersections and IoU of axis-aligned 3D boxes.

Box convention (all of `synjax.detection`): a box is `(z0, y0, x0, z1, y1, x1)`
in continuous voxel coordinates with `z1 > z0` etc.; voxel `i` covers `[i, i+1)`,
so the box `[z0, z1)` with integer ends covers voxels `z0 .. z1-1`. A volume is
`(z1-z0) * (y1-y0) * (x1-x0)`, with no "+1" (detectron2's convention, not the
old Pascal VOC one).
"""

from __future__ import annotations

import jax.numpy as jnp

from synjax.detection._validate import check_boxes


def box_volume(boxes: jnp.ndarray) -> jnp.ndarray:
    """Volume of each box; a box with any side <= 0 has volume 0.

    Args:
      boxes: [..., 6] boxes (z0, y0, x0, z1, y1, x1).

    Returns:
      [...] volumes in voxels.
    """
    check_boxes("box_volume", "boxes", jnp.shape(boxes), ndim=None)
    boxes = jnp.asarray(boxes)
    sides = jnp.maximum(boxes[..., 3:] - boxes[..., :3], 0.0)
    return sides[..., 0] * sides[..., 1] * sides[..., 2]


def pairwise_intersection(boxes_a: jnp.ndarray, boxes_b: jnp.ndarray) -> jnp.ndarray:
    """Volume of the intersection of every box of `boxes_a` with every box of `boxes_b`.

    Args:
      boxes_a: [n, 6] boxes.
      boxes_b: [m, 6] boxes.

    Returns:
      [n, m] intersection volumes (0 where the boxes do not overlap).
    """
    check_boxes("pairwise_intersection", "boxes_a", jnp.shape(boxes_a))
    check_boxes("pairwise_intersection", "boxes_b", jnp.shape(boxes_b))
    boxes_a, boxes_b = jnp.asarray(boxes_a), jnp.asarray(boxes_b)
    # One axis at a time on [n, 1] x [1, m] coordinate vectors: XLA fuses this into one
    # vectorised loop, several times faster on CPU than broadcasting [n, m, 3].
    a, b = boxes_a.T, boxes_b.T
    inter = None
    for axis in range(3):
        lo = jnp.maximum(a[axis, :, None], b[axis, None, :])
        hi = jnp.minimum(a[axis + 3, :, None], b[axis + 3, None, :])
        side = jnp.maximum(hi - lo, 0.0)
        inter = side if inter is None else inter * side
    return inter


def pairwise_iou(boxes_a: jnp.ndarray, boxes_b: jnp.ndarray) -> jnp.ndarray:
    """Intersection over union of every pair of boxes.

    `iou = inter / (vol_a + vol_b - inter)`; a pair whose union is empty (two
    degenerate boxes) has IoU 0, so degenerate boxes never suppress or match.

    Args:
      boxes_a: [n, 6] boxes (z0, y0, x0, z1, y1, x1).
      boxes_b: [m, 6] boxes.

    Returns:
      [n, m] IoU in [0, 1].
    """
    inter = pairwise_intersection(boxes_a, boxes_b)
    union = box_volume(boxes_a)[:, None] + box_volume(boxes_b)[None, :] - inter
    positive = union > 0
    return jnp.where(positive, inter / jnp.where(positive, union, 1.0), 0.0)
