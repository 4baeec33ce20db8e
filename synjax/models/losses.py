"""Voxel-wise losses of the synaptic-partner U-Nets.

Both losses are weighted means: sum(w * loss) / sum(w), computed in float32
whatever the network's dtype, so `balanced_weights` sets each class's share of
the loss without changing its scale.
"""

from __future__ import annotations

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
    per_voxel = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels.astype(jnp.int32)
    )
    return _weighted_mean(per_voxel, weights)
