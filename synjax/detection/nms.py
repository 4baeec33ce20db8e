"""Greedy non-maximum suppression of 3D boxes with fixed shapes, for `jax.jit`.

Greedy NMS visits boxes from the highest score down and keeps a box unless a
box kept before it overlaps it with IoU > `iou_threshold` (strictly greater,
torchvision's rule). Ties in score are visited in index order (a stable sort),
so the result is deterministic and equals a plain NumPy loop's.

Doing this one box at a time is a sequential loop with O(n) steps. Instead the
sorted boxes are processed in tiles of `tile_size` (the tiled scheme of
TensorFlow's padded NMS and scenic's JAX port), inside one `lax.while_loop`:

1. the tile is checked against the boxes kept so far, which sit compacted in a
   buffer of `max_outputs` slots: one `[tile, tile]` IoU block per filled
   buffer tile, so the work is `n * kept` IoUs rather than `n^2 / 2`;
2. the survivors suppress each other greedily inside the tile: with the tile's
   `[tile, tile]` IoU matrix fixed, `keep = alive & ~any(keep_i & iou_ij > t, i < j)`
   is iterated to its fixed point. Box j's update reads only boxes i < j, so
   after k rounds the first k boxes are final: the fixed point is the greedy
   answer, and it is reached after as many rounds as the longest chain of
   suppressions inside the tile (usually a handful, at most `tile`);
3. the kept boxes are appended to the buffer; the loop stops when the buffer
   holds `max_outputs` boxes or the remaining tiles hold only padding.

Boxes follow `synjax.detection.iou`'s convention (`(z0, y0, x0, z1, y1, x1)`,
continuous voxel coordinates, volume without +1).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from synjax.detection._validate import check_boxes, check_length, positive_int
from synjax.detection.iou import pairwise_iou

DEFAULT_TILE_SIZE = 256


def nms(
    boxes: jnp.ndarray,
    scores: jnp.ndarray,
    iou_threshold: float | jnp.ndarray,
    max_outputs: int,
    valid: jnp.ndarray | None = None,
    groups: jnp.ndarray | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Greedy NMS with padded, fixed-size outputs.

    Padding among the inputs is marked by `valid=False` or by a score of -inf
    (or NaN); such boxes are never kept and never suppress. Vectorise over a
    batch with `jax.vmap`.

    Args:
      boxes: [n, 6] boxes (z0, y0, x0, z1, y1, x1).
      scores: [n] scores; higher is better.
      iou_threshold: a box is suppressed by a kept box with IoU > this.
      max_outputs: static number of output slots; suppression stops once
        this many boxes are kept.
      valid: optional [n] bool, False for padding.
      groups: optional [n] int ids; boxes of different groups never suppress
        each other (detectron2's `batched_nms`, e.g. per class or FPN level).
      tile_size: static number of boxes processed together (a speed knob; the
        result does not depend on it).

    Returns:
      (indices [max_outputs] int32, valid [max_outputs] bool): indices into
      `boxes` of the kept boxes in order of decreasing score (ties: lower index
      first), then padding slots holding index 0 and valid False.
    """
    check_boxes("nms", "boxes", jnp.shape(boxes))
    boxes, scores = jnp.asarray(boxes), jnp.asarray(scores)
    n = boxes.shape[0]
    check_length("nms", "scores", jnp.shape(scores), n)
    if valid is not None:
        check_length("nms", "valid", jnp.shape(valid), n)
        valid = jnp.asarray(valid)
    if groups is not None:
        check_length("nms", "groups", jnp.shape(groups), n)
        groups = jnp.asarray(groups)
    max_outputs = positive_int("nms", "max_outputs", max_outputs)
    tile_size = positive_int("nms", "tile_size", tile_size)
    if n == 0:
        return jnp.zeros(max_outputs, jnp.int32), jnp.zeros(max_outputs, bool)

    tile = min(tile_size, n)
    num_tiles = math.ceil(n / tile)
    padded = num_tiles * tile
    # Buffer of kept boxes: whole tiles, never more than the boxes there are.
    capacity = math.ceil(min(max_outputs, n) / tile) * tile

    ok = scores > -jnp.inf  # False for -inf and NaN
    if valid is not None:
        ok = ok & valid.astype(bool)
    key = jnp.where(ok, scores, -jnp.inf)
    key = jnp.where(key == 0, 0.0, key)  # -0.0 and 0.0 are one score: index order decides
    order = jnp.argsort(-key, stable=True).astype(jnp.int32)
    group = jnp.zeros(n, jnp.int32) if groups is None else groups.astype(jnp.int32)

    def pad(x, value):
        widths = [(0, padded - n)] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, widths, constant_values=value)

    tiled_boxes = pad(boxes[order].astype(jnp.float32), 0.0).reshape(num_tiles, tile, 6)
    tiled_ok = pad(ok[order], False).reshape(num_tiles, tile)
    tiled_group = pad(group[order], 0).reshape(num_tiles, tile)
    tiled_index = pad(order, 0).reshape(num_tiles, tile)
    threshold = jnp.asarray(iou_threshold, jnp.float32)
    lower = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # row i before column j

    def overlaps(rows_boxes, rows_group, cols_boxes, cols_group):
        """[tile, tile] bool: row box would suppress column box."""
        same = rows_group[:, None] == cols_group[None, :]
        return (pairwise_iou(rows_boxes, cols_boxes) > threshold) & same

    def process_tile(carry):
        t, kept, buf_boxes, buf_group, buf_index = carry
        cand_boxes, cand_group = tiled_boxes[t], tiled_group[t]

        # 1. Suppression by the boxes kept in earlier tiles.
        def against_buffer(state):
            b, alive = state
            start = b * tile
            kept_boxes = lax.dynamic_slice_in_dim(buf_boxes, start, tile)
            kept_group = lax.dynamic_slice_in_dim(buf_group, start, tile)
            filled = start + jnp.arange(tile) < kept
            hit = overlaps(kept_boxes, kept_group, cand_boxes, cand_group) & filled[:, None]
            return b + 1, alive & ~jnp.any(hit, axis=0)

        filled_tiles = (kept + tile - 1) // tile
        _, alive = lax.while_loop(
            lambda s: (s[0] < filled_tiles) & jnp.any(s[1]),
            against_buffer,
            (jnp.int32(0), tiled_ok[t]),
        )

        # 2. Greedy suppression inside the tile, iterated to its fixed point.
        def within_tile(alive):
            self_hit = overlaps(cand_boxes, cand_group, cand_boxes, cand_group) & lower

            def step(state):
                keep, _ = state
                new = alive & ~jnp.any(self_hit & keep[:, None], axis=0)
                return new, jnp.any(new != keep)

            keep, _ = lax.while_loop(lambda s: s[1], step, (alive, jnp.bool_(True)))
            return keep

        keep = lax.cond(jnp.any(alive), within_tile, lambda a: a, alive)

        # 3. Append the kept boxes; slots past the buffer are dropped.
        slot = jnp.where(keep, kept + jnp.cumsum(keep) - 1, capacity)
        buf_boxes = buf_boxes.at[slot].set(cand_boxes, mode="drop")
        buf_group = buf_group.at[slot].set(cand_group, mode="drop")
        buf_index = buf_index.at[slot].set(tiled_index[t], mode="drop")
        return t + 1, kept + jnp.sum(keep, dtype=jnp.int32), buf_boxes, buf_group, buf_index

    def more_to_do(carry):
        t, kept = carry[0], carry[1]
        # Sorted valid-first: a tile that starts with padding holds only padding.
        first_ok = tiled_ok[jnp.minimum(t, num_tiles - 1), 0]
        return (t < num_tiles) & (kept < max_outputs) & first_ok

    init = (
        jnp.int32(0),
        jnp.int32(0),
        jnp.zeros((capacity, 6), jnp.float32),
        jnp.zeros(capacity, jnp.int32),
        jnp.zeros(capacity, jnp.int32),
    )
    _, kept, _, _, buf_index = lax.while_loop(more_to_do, process_tile, init)
    slots = jnp.arange(max_outputs)
    out_valid = slots < jnp.minimum(kept, max_outputs)
    index = (
        jnp.zeros(max_outputs, jnp.int32)
        .at[: min(capacity, max_outputs)]
        .set(buf_index[:max_outputs])
    )
    return jnp.where(out_valid, index, 0), out_valid
