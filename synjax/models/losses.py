"""Voxel-wise losses of synjax's networks, computed in float32 whatever their dtype.

`weighted_mse` and `weighted_softmax_cross_entropy` take a weight per voxel
and are weighted means, sum(w * loss) / sum(w), so that `balanced_weights`
sets each class's share of the loss without changing its scale.
`class_weighted_softmax_cross_entropy` takes a weight per class (DeepEM3D's
boundary nets, with `synjax.targets.boundaries.class_weights`) and is the
plain mean of w[label] * loss. Both cross-entropies share one per-voxel
negative log-likelihood (`softmax_nll`). `positive_weighted_sigmoid_cross_entropy`
is the binary cleft loss of the EM instance stages (the baseline segmenter and
the instance network's semantic head).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from synjax.errors import DataError


def _match_channels(value: jnp.ndarray, like: jnp.ndarray, name: str) -> jnp.ndarray:
    """Adds a trailing singleton channel to `value` when `like` has one more axis."""
    if value.ndim == like.ndim - 1 and like.shape[-1] == 1:
        value = value[..., None]
    if value.shape != like.shape:
        raise DataError(f"{name} has shape {value.shape}; expected {like.shape}")
    return value


def _weighted_mean(per_voxel: jnp.ndarray, weights: jnp.ndarray | None) -> jnp.ndarray:
    if weights is None:
        return jnp.mean(per_voxel)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    # An all-zero weight patch contributes no loss rather than NaN.
    return jnp.where(total > 0, jnp.sum(weights * per_voxel) / jnp.maximum(total, 1e-12), 0.0)


def weighted_mse(
    pred: jnp.ndarray, target: jnp.ndarray, weights: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Weighted mean squared error of the signed-proximity regressor.

    Args:
      pred: [batch, z, y, x, 1] (or any shape) network output, any float dtype.
      target: same shape as pred, or pred's without the trailing singleton
        channel.
      weights: like target, or None for a plain mean.

    Returns:
      Scalar float32 sum(w (pred - target)^2) / sum(w); 0 when all w are 0.
    """
    target = _match_channels(jnp.asarray(target), pred, "target")
    sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    if weights is not None:
        weights = _match_channels(jnp.asarray(weights), pred, "weights")
    return _weighted_mean(sq, weights)


def softmax_nll(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Per-voxel `-log softmax(logits)[label]`, in float32.

    Args:
      logits: `[..., classes]` any float dtype.
      labels: `[...]` integer classes.

    Returns:
      float32 `[...]`.
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_softmax_cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray | None = None
) -> jnp.ndarray:
    """Weighted cross-entropy of the pre / post / rest classifier.

    Args:
      logits: [batch, z, y, x, classes] any float dtype.
      labels: [batch, z, y, x] integer classes (`three_class_target`).
      weights: [batch, z, y, x] or None for a plain mean.

    Returns:
      Scalar float32 weighted mean of -log softmax(logits)[label].
    """
    if labels.shape != logits.shape[:-1]:
        raise DataError(f"labels has shape {labels.shape}; expected {logits.shape[:-1]}")
    if weights is not None and weights.shape != labels.shape:
        raise DataError(f"weights has shape {weights.shape}; expected {labels.shape}")
    return _weighted_mean(softmax_nll(logits, labels), weights)


def class_weighted_softmax_cross_entropy(
    logits: jnp.ndarray, labels: jnp.ndarray, class_weights: jnp.ndarray | Sequence[float]
) -> jnp.ndarray:
    """Class-weighted softmax cross-entropy, averaged over voxels (DeepEM3D's loss).

    Args:
      logits: `[..., C]` any float dtype.
      labels: `[...]` integer classes.
      class_weights: `[C]` weight per class
        (`synjax.targets.boundaries.class_weights`).

    Returns:
      Scalar float32 `mean(w[label] * -log softmax(logits)[label])`.
    """
    weights = jnp.asarray(class_weights, jnp.float32)
    if weights.shape != (logits.shape[-1],):
        raise DataError(
            f"class_weights shape {weights.shape}: expected ({logits.shape[-1]},) for the logits"
        )
    nll = softmax_nll(logits, labels)
    return jnp.mean(weights[labels] * nll)


def positive_weighted_sigmoid_cross_entropy(
    logits: jnp.ndarray, targets: jnp.ndarray, positive_weight: float
) -> jnp.ndarray:
    """Mean binary cross-entropy with positive voxels (target 1) weighted `positive_weight`.

    Args:
      logits: [...] logits, any dtype (computed in float32).
      targets: [...] 0/1 targets of the same shape.
      positive_weight: weight of a positive voxel; negatives weigh 1.

    Returns:
      sum(w * bce) / sum(w), a scalar.
    """
    logits = logits.astype(jnp.float32)
    targets = _match_channels(targets.astype(jnp.float32), logits, "targets")
    per_voxel = optax.sigmoid_binary_cross_entropy(logits, targets)
    weights = jnp.where(targets > 0.5, positive_weight, 1.0)
    return jnp.sum(weights * per_voxel) / jnp.sum(weights)
