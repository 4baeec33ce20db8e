"""The candidate-pruning CNN of Parag et al. (MICCAI 2018).

A small 3D classifier that looks at a window around one synaptic partner
candidate (EM, signed proximity, pre-segment mask, post-segment mask; see
`synjax.postprocess.pruning_windows`) and says whether the candidate is a real
pre -> post connection: five 3x3x3 convolutions with max pooling between them
and two dense layers that end in one logit.

The default pooling suits a 16x160x160 window of anisotropic ssTEM (z voxels
about ten times thicker than xy): xy is halved four times, z only twice, so
the last convolution sees a 4x10x10 grid that is about isotropic in nm.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from synjax.errors import ConfigError
from synjax.models.conv import Conv3D
from synjax.models.layers import relu_max_pool3d

NUM_CONVS = 5
KERNEL = (3, 3, 3)
DEFAULT_FEATURES = (16, 32, 64, 64, 128)
# One pooling window per gap between consecutive convolutions.
DEFAULT_POOLS = ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
DEFAULT_DENSE = 256


class PruningCNN(nn.Module):
    """Scores a candidate window: one logit, positive = real synaptic pair.

    Attributes:
      features: output channels of the five convolutions.
      pools: (z, y, x) max-pooling windows (stride = window) after the first
        four convolutions.
      dense_features: width of the hidden dense layer.
    """

    features: Sequence[int] = DEFAULT_FEATURES
    pools: Sequence[Sequence[int]] = DEFAULT_POOLS
    dense_features: int = DEFAULT_DENSE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits for a batch of windows.

        Args:
          x: [batch, z, y, x, channels] windows (channels = 4 by default).

        Returns:
          [batch] float32 logits.
        """
        if len(self.features) != NUM_CONVS or len(self.pools) != NUM_CONVS - 1:
            raise ConfigError(
                f"PruningCNN features={tuple(self.features)}, pools={tuple(self.pools)}: "
                f"expected {NUM_CONVS} features and {NUM_CONVS - 1} pooling windows"
            )
        if x.ndim != 5:
            raise ConfigError(f"PruningCNN input {x.shape}: expected [batch, z, y, x, channels]")
        for i, width in enumerate(self.features):
            x = Conv3D(width, KERNEL, padding="SAME", name=f"conv{i}")(x)
            if i < len(self.pools):
                # ReLU then pool, without writing the full-resolution ReLU output.
                x = relu_max_pool3d(x, tuple(int(w) for w in self.pools[i]))
            else:
                x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense_features, name="dense0")(x))
        return nn.Dense(1, name="dense1")(x)[:, 0]


def sigmoid_bce(logits: jax.Array, labels: jax.Array, pos_weight: float = 1.0) -> jax.Array:
    """Mean binary cross-entropy on logits, positives weighted by `pos_weight`.

    loss = -mean(pos_weight * y * log(sigmoid(z)) + (1 - y) * log(1 - sigmoid(z))),
    computed with log-sigmoids so that large |z| does not overflow. Candidates
    are mostly negative, so `pos_weight` > 1 keeps the few positives heard.

    Args:
      logits: [batch] logits.
      labels: [batch] 0/1 labels (bool or float).
      pos_weight: weight of the positive term.

    Returns:
      Scalar loss.
    """
    labels = jnp.asarray(labels, logits.dtype)
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -jnp.mean(pos_weight * labels * log_p + (1.0 - labels) * log_not_p)
