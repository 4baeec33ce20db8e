"""Region proposals from RPN outputs: per-level top-k, decode, clip, NMS, top-k.

detectron2's `find_top_rpn_proposals` with fixed shapes: on each FPN level the
`pre_nms_topk` best-scoring anchors are decoded with their deltas and clipped
to the volume; boxes that are not finite or are no larger than `min_size` along
some axis are dropped (marked invalid); NMS runs per level (boxes of different
levels never suppress each other) and the `post_nms_topk` best survivors over
all levels are returned, padded, with a validity mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from synjax.detection._validate import check_boxes, check_length, positive_int
from synjax.detection.box_coder import (
    DEFAULT_SCALE_CLAMP,
    DEFAULT_WEIGHTS,
    clip_boxes,
    decode_boxes,
)
from synjax.detection.nms import DEFAULT_TILE_SIZE, nms
from synjax.errors import ConfigError


def select_proposals(
    anchors: Sequence[jnp.ndarray],
    scores: Sequence[jnp.ndarray],
    deltas: Sequence[jnp.ndarray],
    volume_shape: Sequence[int],
    pre_nms_topk: int,
    post_nms_topk: int,
    nms_threshold: float = 0.7,
    min_size: float = 0.0,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
    scale_clamp: float = DEFAULT_SCALE_CLAMP,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Top proposals of one image from per-level anchors, objectness and deltas.

    Vectorise over a batch of images with `jax.vmap` (anchors shared:
    `in_axes=(None, 0, 0, None, ...)`).

    Args:
      anchors: per level, [A_l, 6] anchors (from `pyramid_anchors`).
      scores: per level, [A_l] objectness logits (or probabilities).
      deltas: per level, [A_l, 6] box deltas for the anchors.
      volume_shape: (z, y, x) input size in voxels, for clipping.
      pre_nms_topk: static number of candidates kept per level before NMS
        (all of a level's anchors when it has fewer).
      post_nms_topk: static number of proposals returned.
      nms_threshold: IoU above which a lower-scoring box of the same level is
        suppressed.
      min_size: a proposal must be larger than this along every axis (voxels).
      weights, scale_clamp: the box coder's settings (`decode_boxes`).
      tile_size: NMS tile size (speed only).

    Returns:
      (boxes [post_nms_topk, 6], scores [post_nms_topk], levels
      [post_nms_topk] int32, valid [post_nms_topk] bool), by decreasing score
      (ties: level order, then anchor order); padding slots hold zeros and
      valid False.
    """
    if not len(anchors) == len(scores) == len(deltas) or not anchors:
        raise ConfigError(
            f"select_proposals: {len(anchors)} anchor, {len(scores)} score and {len(deltas)} "
            "delta arrays; expected one of each per level, at least one level"
        )
    pre_nms_topk = positive_int("select_proposals", "pre_nms_topk", pre_nms_topk)
    post_nms_topk = positive_int("select_proposals", "post_nms_topk", post_nms_topk)
    cand_boxes, cand_scores, cand_levels = [], [], []
    for level, (level_anchors, level_scores, level_deltas) in enumerate(
        zip(anchors, scores, deltas, strict=True)
    ):
        check_boxes("select_proposals", f"anchors[{level}]", jnp.shape(level_anchors))
        count = level_anchors.shape[0]
        check_length("select_proposals", f"scores[{level}]", jnp.shape(level_scores), count)
        check_boxes("select_proposals", f"deltas[{level}]", jnp.shape(level_deltas))
        check_length(
            "select_proposals", f"deltas[{level}] rows", jnp.shape(level_deltas)[:1], count
        )
        k = min(pre_nms_topk, count)
        top_scores, top = jax.lax.top_k(level_scores, k)
        boxes = decode_boxes(level_anchors[top], level_deltas[top], weights, scale_clamp)
        cand_boxes.append(clip_boxes(boxes, volume_shape))
        cand_scores.append(top_scores)
        cand_levels.append(jnp.full(k, level, jnp.int32))
    boxes = jnp.concatenate(cand_boxes)
    level_scores = jnp.concatenate(cand_scores).astype(jnp.float32)
    levels = jnp.concatenate(cand_levels)
    sizes = boxes[:, 3:] - boxes[:, :3]
    ok = (
        jnp.all(jnp.isfinite(boxes), axis=1)
        & jnp.isfinite(level_scores)
        & jnp.all(sizes > min_size, axis=1)
    )
    keep, keep_valid = nms(
        boxes,
        level_scores,
        nms_threshold,
        post_nms_topk,
        valid=ok,
        groups=levels,
        tile_size=tile_size,
    )
    out_boxes = jnp.where(keep_valid[:, None], boxes[keep], 0.0)
    out_scores = jnp.where(keep_valid, level_scores[keep], 0.0)
    out_levels = jnp.where(keep_valid, levels[keep], 0)
    return out_boxes, out_scores, out_levels, keep_valid
