"""Matching anchors (or proposals) to ground-truth boxes, and fixed-count sampling.

detectron2's `Matcher` and `subsample_labels` with fixed shapes: the ground
truth is padded to a fixed count with a validity mask, and the sample is a
fixed number of index slots with a validity mask.

Labels: 1 foreground, 0 background, -1 ignored. With thresholds
`low <= high`: IoU < low is background, low <= IoU < high is ignored,
IoU >= high is foreground (the RPN uses 0.3 / 0.7, the box head 0.5 / 0.5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from synjax.detection._validate import check_length, positive_int
from synjax.errors import ConfigError, DataError


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
    if not 0.0 <= low_threshold <= high_threshold:
        raise ConfigError(
            f"match: low_threshold={low_threshold}, high_threshold={high_threshold}; "
            "expected 0 <= low <= high"
        )
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

    def first_ranked(candidates, count):
        # Rank the candidates by random priority (the others after them) and
        # keep the first `count`: a uniform draw without replacement.
        order = jnp.argsort(jnp.where(candidates, priority, 2.0))
        rank = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
        return candidates & (rank < count)

    take_pos = first_ranked(positive, num_pos)
    take_neg = first_ranked(negative, num_neg)
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
