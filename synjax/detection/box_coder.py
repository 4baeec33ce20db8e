"""Box coder: 3D boxes as 6 deltas from reference boxes (anchors or proposals).

detectron2's `Box2BoxTransform` in 3D. For a reference box with centre
`(cz, cy, cx)` and size `(d, h, w)` and a target with centre `(tz, ty, tx)`
and size `(td, th, tw)` the deltas are

    dz = wz * (tz - cz) / d     dd = wd * log(td / d)
    dy = wy * (ty - cy) / h     dh = wh * log(th / h)
    dx = wx * (tx - cx) / w     dw = ww * log(tw / w)

with weights `(wz, wy, wx, wd, wh, ww)`. Decoding clamps the log-size deltas at
`scale_clamp` (default `log(1000 / 16)`) so an untrained head cannot produce
`exp` overflow; below the clamp, decode(encode(t)) == t. Boxes follow
`synjax.detection.iou`'s convention: `(z0, y0, x0, z1, y1, x1)` in continuous
voxel coordinates, size `z1 - z0` (no +1), centre `(z0 + z1) / 2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from synjax.detection._validate import check_boxes
from synjax.errors import ConfigError

DEFAULT_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
# detectron2's clamp: sizes grow at most 1000/16 = 62.5x from the reference.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _weights(op: str, weights: Sequence[float]) -> jnp.ndarray:
    values = tuple(weights)
    if len(values) != 6 or any(not w > 0 for w in values):
        raise ConfigError(
            f"{op}: weights={weights!r}; expected 6 positive numbers (wz, wy, wx, wd, wh, ww)"
        )
    return jnp.asarray(values, jnp.float32)


def centres_and_sizes(boxes: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Centres `(cz, cy, cx)` and sizes `(d, h, w)` of boxes.

    Args:
      boxes: [..., 6] boxes (z0, y0, x0, z1, y1, x1).

    Returns:
      ([..., 3] centres, [..., 3] sizes).
    """
    check_boxes("centres_and_sizes", "boxes", jnp.shape(boxes), ndim=None)
    boxes = jnp.asarray(boxes)
    lo, hi = boxes[..., :3], boxes[..., 3:]
    return (lo + hi) * 0.5, hi - lo


def encode_boxes(
    reference: jnp.ndarray, target: jnp.ndarray, weights: Sequence[float] = DEFAULT_WEIGHTS
) -> jnp.ndarray:
    """Deltas that turn `reference` boxes into `target` boxes.

    Args:
      reference: [..., 6] boxes with positive sizes (anchors or proposals).
      target: [..., 6] boxes with positive sizes, broadcastable with `reference`.
      weights: (wz, wy, wx, wd, wh, ww) multipliers of the deltas.

    Returns:
      [..., 6] deltas (dz, dy, dx, dd, dh, dw).
    """
    check_boxes("encode_boxes", "reference", jnp.shape(reference), ndim=None)
    check_boxes("encode_boxes", "target", jnp.shape(target), ndim=None)
    w = _weights("encode_boxes", weights)
    ref_centre, ref_size = centres_and_sizes(reference)
    tgt_centre, tgt_size = centres_and_sizes(target)
    shift = (tgt_centre - ref_centre) / ref_size
    scale = jnp.log(tgt_size / ref_size)
    return jnp.concatenate([shift, scale], axis=-1) * w


def decode_boxes(
    reference: jnp.ndarray,
    deltas: jnp.ndarray,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
) -> jnp.ndarray:
    """Applies deltas to reference boxes (the inverse of `encode_boxes`).

    Args:
      reference: [..., 6] boxes.
      deltas: [..., 6] deltas (dz, dy, dx, dd, dh, dw), broadcastable with `reference`.
      weights: the weights the deltas were encoded with.
      scale_clamp: upper bound of the unweighted log-size deltas `dd / wd` etc.

    Returns:
      [..., 6] boxes (z0, y0, x0, z1, y1, x1).
    """
    check_boxes("decode_boxes", "reference", jnp.shape(reference), ndim=None)
    check_boxes("decode_boxes", "deltas", jnp.shape(deltas), ndim=None)
    w = _weights("decode_boxes", weights)
    deltas = jnp.asarray(deltas) / w
    ref_centre, ref_size = centres_and_sizes(reference)
    centre = ref_centre + deltas[..., :3] * ref_size
    size = jnp.exp(jnp.minimum(deltas[..., 3:], scale_clamp)) * ref_size
    return jnp.concatenate([centre - 0.5 * size, centre + 0.5 * size], axis=-1)


def clip_boxes(boxes: jnp.ndarray, volume_shape: Sequence[int]) -> jnp.ndarray:
    """Clips boxes to the volume `[0, z) x [0, y) x [0, x)`.

    Args:
      boxes: [..., 6] boxes.
      volume_shape: (z, y, x) size of the volume in voxels.

    Returns:
      [..., 6] boxes inside the volume (a box entirely outside becomes degenerate).
    """
    check_boxes("clip_boxes", "boxes", jnp.shape(boxes), ndim=None)
    if len(tuple(volume_shape)) != 3:
        raise ConfigError(f"clip_boxes: volume_shape={volume_shape!r}; expected (z, y, x)")
    boxes = jnp.asarray(boxes)
    upper = jnp.asarray(tuple(volume_shape) * 2, boxes.dtype)
    return jnp.clip(boxes, 0.0, upper)
