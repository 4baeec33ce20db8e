"""Training-time target assignment of the 3D Mask R-CNN, as pure jit-able functions.

Everything a training step needs from the ground truth is computed here on
the device, from one `[z, y, x]` instance-label patch, with fixed shapes, so
that one `jax.jit` step runs the networks, the assignment and the losses:

* `boxes_from_labels`: the box of each instance id 1..K of the patch (ids
  renumbered densely on the host), padded to `max_instances` slots;
* `rpn_targets`: anchors matched to the boxes (IoU >= 0.7 foreground, < 0.3
  background, plus each box's best anchors), a fixed-size random sample of
  them and the box deltas of the foreground ones (detectron2's RPN);
* `roi_targets`: proposals (with the ground-truth boxes appended, as
  detectron2 does, so that early in training every object has a good ROI)
  matched at IoU 0.5, a fixed-size sample with at most `positive_fraction`
  foreground, their classes and box deltas;
* `mask_targets`: each foreground ROI's instance mask resampled into the ROI's
  `[mz, my, mx]` grid, the mean of `samples` nearest-voxel reads per bin and
  axis (ROIAlign of the binary mask, Mask R-CNN's mask target).

Boxes follow `synjax.detection.iou`'s convention: `(z0, y0, x0, z1, y1, x1)`
in voxels, voxel `i` covers `[i, i + 1)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from synjax.detection._validate import positive_int
from synjax.detection.box_coder import DEFAULT_WEIGHTS, encode_boxes
from synjax.detection.iou import pairwise_iou
from synjax.detection.matcher import match, match_boxes, sample_labels
from synjax.errors import DataError
from synjax.geometry import number_triple


def boxes_from_labels(labels: jnp.ndarray, max_instances: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Box of every instance id 1..max_instances of a label patch.

    Slot `k` holds the box of id `k + 1`: ids must be dense (1..K, renumbered
    on the host); ids above `max_instances` are ignored.

    Args:
      labels: [z, y, x] integer instance ids, 0 = background.
      max_instances: static number of slots.

    Returns:
      (boxes [max_instances, 6] float32 with stops exclusive, zeros where the
      id is absent; valid [max_instances] bool, True where the id occurs).
    """
    if jnp.ndim(labels) != 3:
        raise DataError(f"boxes_from_labels: labels shape {jnp.shape(labels)}; expected [z, y, x]")
    max_instances = positive_int("boxes_from_labels", "max_instances", max_instances)
    labels = jnp.asarray(labels).astype(jnp.int32)
    segments = jnp.where((labels > 0) & (labels <= max_instances), labels - 1, max_instances)
    segments = segments.reshape(-1)
    lows, highs = [], []
    for axis, size in enumerate(labels.shape):
        shape = [1, 1, 1]
        shape[axis] = size
        coord = jnp.broadcast_to(jnp.arange(size).reshape(shape), labels.shape).reshape(-1)
        num = max_instances + 1
        lows.append(jax.ops.segment_min(coord, segments, num_segments=num)[:max_instances])
        highs.append(jax.ops.segment_max(coord, segments, num_segments=num)[:max_instances] + 1)
    counts = jax.ops.segment_sum(jnp.ones_like(segments), segments, max_instances + 1)
    valid = counts[:max_instances] > 0
    boxes = jnp.stack(lows + highs, axis=-1).astype(jnp.float32)
    return jnp.where(valid[:, None], boxes, 0.0), valid


class RPNTargets(NamedTuple):
    """Sampled RPN targets of one image.

    Attributes:
      labels: [A] int32, 1 sampled foreground, 0 sampled background, -1 not sampled.
      deltas: [A, 6] box deltas of each anchor's matched box (meaningful where
        labels == 1).
    """

    labels: jnp.ndarray
    deltas: jnp.ndarray


def rpn_targets(
    key: jax.Array,
    anchors: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    num_samples: int = 256,
    positive_fraction: float = 0.5,
    high_threshold: float = 0.7,
    low_threshold: float = 0.3,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> RPNTargets:
    """Objectness labels and box deltas of a random sample of anchors.

    Args:
      key: PRNG key of the sample.
      anchors: [A, 6] anchors of all levels, concatenated in the RPN's order.
      gt_boxes: [G, 6] ground-truth boxes; gt_valid: [G] bool.
      num_samples: anchors sampled per image (256 in Faster R-CNN).
      positive_fraction: largest share of foreground in the sample.
      high_threshold, low_threshold: the matcher's IoU thresholds.
      weights: the box coder's weights.

    Returns:
      `RPNTargets`.
    """
    matched, labels = match_boxes(anchors, gt_boxes, gt_valid, high_threshold, low_threshold, True)
    sampled, _, _ = sample_labels(key, labels, num_samples, positive_fraction)
    # Padding boxes are zeros: encode against a unit box there, masked by the labels.
    target = jnp.where((sampled == 1)[:, None], gt_boxes[matched], anchors)
    return RPNTargets(sampled, encode_boxes(anchors, target, weights))


class ROITargets(NamedTuple):
    """A fixed-size sample of ROIs of one image with their targets.

    Attributes:
      boxes: [S, 6] ROI boxes (proposals or ground-truth boxes).
      classes: [S] int32, 1 foreground (class 1: the one class), 0 background.
      deltas: [S, 6] box deltas from the ROI to its matched box.
      matched: [S] int32 slot of the matched ground-truth box (its id is
        `matched + 1` in `boxes_from_labels`' numbering).
      valid: [S] bool, False for padding slots (fewer candidates than S).
    """

    boxes: jnp.ndarray
    classes: jnp.ndarray
    deltas: jnp.ndarray
    matched: jnp.ndarray
    valid: jnp.ndarray


def roi_targets(
    key: jax.Array,
    proposals: jnp.ndarray,
    proposal_valid: jnp.ndarray,
    gt_boxes: jnp.ndarray,
    gt_valid: jnp.ndarray,
    num_samples: int = 128,
    positive_fraction: float = 0.25,
    iou_threshold: float = 0.5,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> ROITargets:
    """Samples ROIs among the proposals and the ground-truth boxes; their targets.

    Args:
      key: PRNG key of the sample.
      proposals: [P, 6] proposals (no gradient flows through them).
      proposal_valid: [P] bool.
      gt_boxes: [G, 6] ground-truth boxes; gt_valid: [G] bool.
      num_samples: ROIs sampled per image.
      positive_fraction: largest share of foreground ROIs.
      iou_threshold: IoU from which a ROI is foreground (below: background).
      weights: the box coder's weights (detectron2 uses (10, 10, 10, 5, 5, 5)
        for the second stage).

    Returns:
      `ROITargets`.
    """
    candidates = jnp.concatenate([jax.lax.stop_gradient(proposals), gt_boxes], axis=0)
    candidate_valid = jnp.concatenate([proposal_valid, gt_valid]).astype(bool)
    iou = pairwise_iou(candidates, gt_boxes)
    matched, labels = match(
        iou,
        gt_valid,
        iou_threshold,
        iou_threshold,
        allow_low_quality_matches=False,
        anchor_valid=candidate_valid,
    )
    _, index, index_valid = sample_labels(key, labels, num_samples, positive_fraction)
    boxes = candidates[index]
    classes = jnp.where(index_valid & (labels[index] == 1), 1, 0).astype(jnp.int32)
    target = jnp.where((classes == 1)[:, None], gt_boxes[matched[index]], boxes)
    # A padding slot's box may be degenerate: give it a unit box so deltas stay finite.
    safe = jnp.where(index_valid[:, None], boxes, jnp.asarray([0, 0, 0, 1, 1, 1], boxes.dtype))
    target = jnp.where(index_valid[:, None], target, safe)
    deltas = encode_boxes(safe, target, weights)
    return ROITargets(safe, classes, deltas, matched[index], index_valid)


def mask_targets(
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    ids: jnp.ndarray,
    mask_size: int | Sequence[int],
    samples: int | Sequence[int] = 2,
) -> jnp.ndarray:
    """Each ROI's instance mask resampled onto the ROI's grid of bins.

    Bin `(i, j, k)` of a box with corner `lo` and size `s` along an axis of
    `m` bins spans `[lo + i s / m, lo + (i + 1) s / m)`; it reads the labels
    at `samples` evenly placed points inside the bin per axis (at the centres
    of a regular sub-grid), each at the voxel that contains it (reads outside
    the volume count as background), and holds the fraction of reads equal to
    the ROI's id. With `samples=1` that is the nearest voxel of the bin centre.

    Args:
      labels: [z, y, x] instance ids.
      boxes: [n, 6] ROI boxes in voxels.
      ids: [n] the instance id each ROI's mask is of (0: an all-background target).
      mask_size: static (mz, my, mx) bins of the mask head's output.
      samples: static reads per bin along each axis (or (z, y, x)).

    Returns:
      [n, mz, my, mx] float32 targets in [0, 1].
    """
    if jnp.ndim(labels) != 3:
        raise DataError(f"mask_targets: labels shape {jnp.shape(labels)}; expected [z, y, x]")
    size = tuple(
        positive_int("mask_targets", "mask_size", int(m))
        for m in number_triple(mask_size, "mask_targets mask_size", broadcast=True)
    )
    reads = tuple(
        positive_int("mask_targets", "samples", int(r))
        for r in number_triple(samples, "mask_targets samples", broadcast=True)
    )
    labels = jnp.asarray(labels)
    shape = labels.shape

    def axis_points(lo, hi, axis):
        bins, count = size[axis], reads[axis]
        step = (hi - lo) / bins
        offsets = (jnp.arange(count, dtype=jnp.float32) + 0.5) / count
        points = lo + (jnp.arange(bins, dtype=jnp.float32)[:, None] + offsets[None, :]) * step
        index = jnp.floor(points).astype(jnp.int32)
        inside = (index >= 0) & (index < shape[axis])
        return jnp.clip(index, 0, shape[axis] - 1), inside  # [bins, count]

    def one(box, instance):
        (iz, oz), (iy, oy), (ix, ox) = (axis_points(box[a], box[a + 3], a) for a in range(3))
        read = labels[
            iz[:, None, None, :, None, None],
            iy[None, :, None, None, :, None],
            ix[None, None, :, None, None, :],
        ]
        inside = (
            oz[:, None, None, :, None, None]
            & oy[None, :, None, None, :, None]
            & ox[None, None, :, None, None, :]
        )
        hit = ((read == instance) & inside & (instance > 0)).astype(jnp.float32)
        return jnp.mean(hit, axis=(3, 4, 5))

    return jax.vmap(one)(jnp.asarray(boxes, jnp.float32), jnp.asarray(ids).astype(labels.dtype))
