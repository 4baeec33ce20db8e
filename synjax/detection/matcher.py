"""Matching anchors (or proposals) to ground-truth boxes, and fixed-count sampling.

detectron2's `Matcher` and `subsample_labels` with fixed shapes: the ground
truth is padded to a fixed count with a validity mask, and the sample is a
fixed number of index slots with a validity mask.

Labels: 1 foreground, 0 background, -1 ignored. With thresholds
`low <= high`: IoU < low is background, low <= IoU < high is ignored,
IoU >= high is foreground (the RPN uses 0.3 / 0.7, the box head 0.5 / 0.5).

`match` takes a dense IoU matrix; `match_boxes` gives the same result from
the boxes themselves without forming it: most anchor / ground-truth pairs do
not overlap (a 32 x 96 x 96 patch has 55k anchors and ~150 puncta), and the
dense matrix dominated the CPU training step (0.9 of 1.9 s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from synjax.detection._validate import check_boxes, check_length, positive_int
from synjax.detection.iou import pairwise_iou
from synjax.errors import ConfigError, DataError

# `match_boxes`: anchors per tile (consecutive anchors: neighbours on a level's
# grid) and ground-truth boxes examined per tile and round. Speed only; on the
# fluorescence default (55k anchors, ~150 boxes) 24 / 16 was the fastest of
# (12..72) x (16, 32), ~40x faster than the dense matrix.
DEFAULT_TILE_SIZE = 24
DEFAULT_CANDIDATES = 16


def match(
    iou: jnp.ndarray,
    gt_valid: jnp.ndarray,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    allow_low_quality_matches: bool = True,
    anchor_valid: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Assigns each anchor its best ground-truth box and a label.

    Low-quality matches (detectron2's rule, as in Faster R-CNN): for each valid
    ground-truth box, every anchor whose IoU with it equals that box's best IoU
    becomes foreground even below `high_threshold`, so each object gets at
    least one anchor. Unlike detectron2, a box that overlaps no anchor at all
    (best IoU 0) makes no anchor foreground. The matched index stays the anchor's
    best box (argmax over ground truth, lower index on ties), as in detectron2.

    Args:
      iou: [n_anchors, n_gt] IoU matrix (`pairwise_iou(anchors, gt_boxes)`).
      gt_valid: [n_gt] bool, False for padding rows of the ground truth.
      high_threshold: IoU at or above which an anchor is foreground.
      low_threshold: IoU below which an anchor is background.
      allow_low_quality_matches: apply the low-quality rule above.
      anchor_valid: optional [n_anchors] bool; invalid anchors get label -1.

    Returns:
      (matched_gt [n_anchors] int32, labels [n_anchors] int32 in {1, 0, -1}).
      With no valid ground truth every valid anchor is background, matched to 0.
    """
    if jnp.ndim(iou) != 2:
        raise DataError(f"match: iou has shape {jnp.shape(iou)}; expected [n_anchors, n_gt]")
    iou, gt_valid = jnp.asarray(iou), jnp.asarray(gt_valid)
    n_anchors, n_gt = iou.shape
    check_length("match", "gt_valid", jnp.shape(gt_valid), n_gt)
    if anchor_valid is not None:
        check_length("match", "anchor_valid", jnp.shape(anchor_valid), n_anchors)
    _check_thresholds("match", low_threshold, high_threshold)
    if n_gt == 0:
        labels = jnp.zeros(n_anchors, jnp.int32)
        if anchor_valid is not None:
            labels = jnp.where(anchor_valid, labels, -1)
        return jnp.zeros(n_anchors, jnp.int32), labels

    gt_valid = gt_valid.astype(bool)
    # Padding columns score -1, below any real IoU, so they never win the argmax.
    quality = jnp.where(gt_valid[None, :], iou, -1.0)
    matched = jnp.argmax(quality, axis=1).astype(jnp.int32)
    best = jnp.max(quality, axis=1)
    labels = jnp.where(best >= high_threshold, 1, jnp.where(best < low_threshold, 0, -1))
    if allow_low_quality_matches:
        if anchor_valid is not None:
            quality = jnp.where(anchor_valid[:, None], quality, -1.0)
        best_per_gt = jnp.max(quality, axis=0)
        is_best = (quality == best_per_gt[None, :]) & (best_per_gt > 0)[None, :]
        labels = jnp.where(jnp.any(is_best, axis=1), 1, labels)
    has_gt = jnp.any(gt_valid)
    labels = jnp.where(has_gt, labels, 0)
    matched = jnp.where(has_gt, matched, 0)
    if anchor_valid is not None:
        labels = jnp.where(anchor_valid, labels, -1)
    return matched, labels.astype(jnp.int32)


def _check_thresholds(op: str, low_threshold: float, high_threshold: float) -> None:
    if not 0.0 <= low_threshold <= high_threshold:
        raise ConfigError(
            f"{op}: low_threshold={low_threshold}, high_threshold={high_threshold}; "
            "expected 0 <= low <= high"
        )


def match_boxes(
    boxes: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    allow_low_quality_matches: bool = True,
    tile_size: int = DEFAULT_TILE_SIZE,
    candidates: int = DEFAULT_CANDIDATES,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`match(pairwise_iou(boxes, gt_boxes), gt_valid, ...)` without the dense IoU matrix.

    The boxes are cut into tiles of `tile_size` consecutive boxes; a tile
    looks only at the ground-truth boxes that overlap its bounding box (an
    IoU above 0 needs an overlap), `candidates` of them per round in
    ascending index order, rounds repeated until every tile has seen all of
    its own (a `while` loop: usually one round). Each pair's IoU comes from
    `pairwise_iou` itself, and ties resolve as in `match` (the lower index),
    so the result equals `match`'s. Fast when consecutive boxes lie close
    together, as the anchors of a level do (`level_anchors` orders them
    cell by cell); correct for any order.

    Args:
      boxes: [n, 6] boxes to label (anchors).
      gt_boxes: [g, 6] ground-truth boxes; gt_valid: [g] bool.
      high_threshold, low_threshold, allow_low_quality_matches: as `match`.
      tile_size: static boxes per tile (speed only).
      candidates: static ground-truth boxes per tile and round (speed only).

    Returns:
      (matched_gt [n] int32, labels [n] int32 in {1, 0, -1}), as `match`.
    """
    check_boxes("match_boxes", "boxes", jnp.shape(boxes))
    check_boxes("match_boxes", "gt_boxes", jnp.shape(gt_boxes))
    gt_boxes = jnp.asarray(gt_boxes)
    n, g = jnp.shape(boxes)[0], gt_boxes.shape[0]
    check_length("match_boxes", "gt_valid", jnp.shape(gt_valid), g)
    _check_thresholds("match_boxes", low_threshold, high_threshold)
    tile = positive_int("match_boxes", "tile_size", tile_size)
    k = min(positive_int("match_boxes", "candidates", candidates), max(g, 1))
    if n == 0 or g == 0:
        return match(jnp.zeros((n, g), jnp.float32), gt_valid, high_threshold, low_threshold)
    gt_valid = jnp.asarray(gt_valid).astype(bool)

    tiles = -(-n // tile)
    # Padding boxes are all zeros: a degenerate box has IoU 0 with everything.
    # Anchors are constants under `jit`: their tiles' bounds are then taken in
    # NumPy, which XLA would otherwise fold slowly at compile time.
    xp = jnp if isinstance(boxes, jax.core.Tracer) else np
    blocks = xp.pad(xp.asarray(boxes), ((0, tiles * tile - n), (0, 0))).reshape(tiles, tile, 6)
    low = xp.min(blocks[..., :3], axis=1)
    high = xp.max(blocks[..., 3:], axis=1)
    # A box of the tile overlaps a ground-truth box only if the tile's bounds do
    # (min / max are exact, so this test never misses a pair).
    sides = jnp.minimum(high[:, None], gt_boxes[None, :, 3:]) - jnp.maximum(
        low[:, None], gt_boxes[None, :, :3]
    )
    overlaps = jnp.all(sides > 0, axis=-1) & gt_valid[None, :]  # [tiles, g]
    # Each tile's overlapping ground truth, in ascending index order, then `g`
    # (a zero box) in the unused slots: slot r * k + j is round r's j-th candidate.
    slots = -(-g // k) * k
    rank = jnp.where(overlaps, jnp.cumsum(overlaps, axis=1) - 1, slots)
    lists = jnp.full((tiles, slots + 1), g, jnp.int32)
    lists = lists.at[jnp.arange(tiles)[:, None], rank].set(
        jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), (tiles, g))
    )[:, :slots]
    rounds = -(-jnp.max(jnp.sum(overlaps, axis=1)) // k)
    padded_gt = jnp.concatenate([gt_boxes, jnp.zeros((1, 6), gt_boxes.dtype)])

    def round_iou(r):
        index = jax.lax.dynamic_slice_in_dim(lists, r * k, k, axis=1)  # [tiles, k]
        iou = jax.vmap(pairwise_iou)(blocks, padded_gt[index])  # [tiles, tile, k]
        return index, jnp.where((index < g)[:, None, :], iou, 0.0)

    def best_so_far(r, carry):
        best, matched, best_per_gt = carry
        index, iou = round_iou(r)
        round_best = jnp.max(iou, axis=2)
        # First slot holding the round's best: the lower ground-truth index.
        slot = jnp.min(jnp.where(iou == round_best[..., None], jnp.arange(k), k), axis=2)
        # Strictly better only: an earlier round (lower indices) wins ties.
        better = round_best > best
        best = jnp.where(better, round_best, best)
        matched = jnp.where(better, jnp.take_along_axis(index, slot, axis=1), matched)
        best_per_gt = best_per_gt.at[index.reshape(-1)].max(
            jnp.max(iou, axis=1).reshape(-1), mode="drop"
        )
        return best, matched, best_per_gt

    # With no overlap a box's best IoU is 0 and `match`'s argmax is the first
    # valid ground-truth box.
    first_valid = jnp.argmax(gt_valid).astype(jnp.int32)
    start = (
        jnp.zeros((tiles, tile), jnp.float32),
        jnp.full((tiles, tile), first_valid, jnp.int32),
        jnp.zeros(g + 1, jnp.float32),
    )
    best, matched, best_per_gt = jax.lax.fori_loop(0, rounds, best_so_far, start)
    labels = jnp.where(best >= high_threshold, 1, jnp.where(best < low_threshold, 0, -1))
    if allow_low_quality_matches:
        best_per_gt = best_per_gt.at[g].set(0.0)

        def any_best(r, is_best):
            index, iou = round_iou(r)
            target = best_per_gt[index][:, None, :]
            return is_best | jnp.any((iou == target) & (target > 0), axis=2)

        is_best = jax.lax.fori_loop(0, rounds, any_best, jnp.zeros((tiles, tile), bool))
        labels = jnp.where(is_best, 1, labels)
    has_gt = jnp.any(gt_valid)
    labels = jnp.where(has_gt, labels, 0).reshape(-1)[:n]
    matched = jnp.where(has_gt, matched, 0).reshape(-1)[:n]
    return matched, labels.astype(jnp.int32)


def sample_labels(
    key: jax.Array, labels: jnp.ndarray, num_samples: int, positive_fraction: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Samples a fixed number of foreground and background anchors at random.

    As detectron2's `subsample_labels`: `num_pos = min(#foreground,
    int(num_samples * positive_fraction))` foreground anchors, then
    `num_neg = min(#background, num_samples - num_pos)` background ones, each
    drawn uniformly without replacement; everything else becomes -1.

    Args:
      key: PRNG key.
      labels: [n] int labels in {1, 0, -1} (from `match`).
      num_samples: static number of anchors sampled per image.
      positive_fraction: static target fraction of foreground in the sample.

    Returns:
      (sampled_labels [n] int32: labels with unsampled anchors set to -1,
       indices [num_samples] int32: the sampled anchors, foreground first, then
       background, then padding slots holding 0,
       index_valid [num_samples] bool: False for padding slots).
    """
    if jnp.ndim(labels) != 1:
        raise DataError(f"sample_labels: labels have shape {jnp.shape(labels)}; expected [n]")
    num_samples = positive_int("sample_labels", "num_samples", num_samples)
    if not 0.0 <= positive_fraction <= 1.0:
        raise ConfigError(
            f"sample_labels: positive_fraction={positive_fraction}; expected 0 <= f <= 1"
        )
    labels = jnp.asarray(labels)
    n = labels.shape[0]
    positive, negative = labels == 1, labels == 0
    num_pos = jnp.minimum(jnp.sum(positive), int(num_samples * positive_fraction))
    num_neg = jnp.minimum(jnp.sum(negative), num_samples - num_pos)
    priority = jax.random.uniform(key, (n,))

    def first_ranked(candidates, count, bound):
        # Rank the candidates by random priority (the others after them) and
        # keep the first `count`: a uniform draw without replacement. `count`
        # is at most the static `bound`, so a top-k of `bound` (ties: lower
        # index first, as a stable sort) replaces a full sort of all n.
        k = min(bound, n)
        _, first = jax.lax.top_k(-jnp.where(candidates, priority, 2.0), k)
        return candidates & jnp.zeros(n, bool).at[first].set(jnp.arange(k) < count)

    take_pos = first_ranked(positive, num_pos, max(int(num_samples * positive_fraction), 1))
    take_neg = first_ranked(negative, num_neg, num_samples)
    sampled = jnp.where(take_pos, 1, jnp.where(take_neg, 0, -1)).astype(jnp.int32)
    # Foreground in [2, 3), background in [1, 2), the rest -1: one top_k lists
    # the foreground first, then the background, then padding.
    slot_key = jnp.where(take_pos, 2.0 + priority, jnp.where(take_neg, 1.0 + priority, -1.0))
    k = min(num_samples, n)
    values, indices = jax.lax.top_k(slot_key, k)
    index_valid = values >= 1.0
    indices = jnp.where(index_valid, indices, 0).astype(jnp.int32)
    if k < num_samples:
        indices = jnp.pad(indices, (0, num_samples - k))
        index_valid = jnp.pad(index_valid, (0, num_samples - k))
    return sampled, indices, index_valid
