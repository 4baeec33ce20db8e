"""Losses of the 3D Mask R-CNN (Chen et al.: smooth L1 boxes, BCE masks, CE classes).

Each loss takes fixed-shape predictions and targets with a mask of the
entries that count, so that sampled anchors and ROIs (padded to fixed sizes)
are scored inside one jit-compiled step. Normalisation follows detectron2:
the RPN's two losses are divided by the number of sampled anchors, the box
head's by the number of sampled ROIs, the class loss is a mean over sampled
ROIs and the mask loss a mean over the voxels of the foreground ROIs' masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def smooth_l1(difference: jnp.ndarray, beta: float) -> jnp.ndarray:
    """Elementwise smooth L1 (Huber / beta): 0.5 d^2 / beta below beta, |d| - beta / 2 above.

    `beta = 0` is the plain L1 loss.
    """
    absolute = jnp.abs(difference)
    if beta <= 0:
        return absolute
    return jnp.where(absolute < beta, 0.5 * difference**2 / beta, absolute - 0.5 * beta)


def _safe_divide(total: jnp.ndarray, count: jnp.ndarray) -> jnp.ndarray:
    return total / jnp.maximum(count, 1.0)


def objectness_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """RPN objectness: BCE with logits over the sampled anchors (labels 0 or 1).

    Args:
      logits: [..., A] objectness logits.
      labels: [..., A] int, 1 foreground, 0 background, -1 not sampled.

    Returns:
      Scalar: summed BCE over sampled anchors / number sampled.
    """
    sampled = labels >= 0
    bce = optax.sigmoid_binary_cross_entropy(logits, (labels == 1).astype(logits.dtype))
    return _safe_divide(jnp.sum(jnp.where(sampled, bce, 0.0)), jnp.sum(sampled))


def box_regression_loss(
    deltas: jnp.ndarray,
    targets: jnp.ndarray,
    foreground: jnp.ndarray,
    normaliser: jnp.ndarray,
    beta: float = 0.0,
) -> jnp.ndarray:
    """Smooth L1 of box deltas over the foreground entries.

    Args:
      deltas, targets: [..., 6] predicted and target deltas.
      foreground: [...] bool, the entries that count.
      normaliser: the count the sum is divided by (sampled anchors or ROIs).
      beta: smooth L1's beta (0: L1, detectron2's default).

    Returns:
      Scalar loss.
    """
    per_entry = jnp.sum(smooth_l1(deltas - targets, beta), axis=-1)
    return _safe_divide(jnp.sum(jnp.where(foreground, per_entry, 0.0)), normaliser)


def classification_loss(
    logits: jnp.ndarray, classes: jnp.ndarray, valid: jnp.ndarray
) -> jnp.ndarray:
    """Softmax cross-entropy of ROI classes (0 = background), mean over valid ROIs.

    Args:
      logits: [..., num_classes + 1] class logits.
      classes: [...] int target classes.
      valid: [...] bool, the sampled ROIs.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, classes)
    return _safe_divide(jnp.sum(jnp.where(valid, ce, 0.0)), jnp.sum(valid))


def mask_loss(logits: jnp.ndarray, targets: jnp.ndarray, foreground: jnp.ndarray) -> jnp.ndarray:
    """Per-voxel BCE of mask logits, mean over the voxels of the foreground ROIs.

    Args:
      logits: [n, mz, my, mx] mask logits of each ROI's target class.
      targets: [n, mz, my, mx] targets in [0, 1].
      foreground: [n] bool, the ROIs whose masks count.
    """
    bce = optax.sigmoid_binary_cross_entropy(logits, targets)
    per_roi = jnp.mean(bce.reshape(bce.shape[0], -1), axis=1)
    return _safe_divide(jnp.sum(jnp.where(foreground, per_roi, 0.0)), jnp.sum(foreground))


def total_loss(losses: dict[str, jax.Array], weights: dict[str, float] | None = None) -> jax.Array:
    """Weighted sum of named losses (missing weights: 1)."""
    weights = weights or {}
    return sum(weights.get(name, 1.0) * value for name, value in sorted(losses.items()))
