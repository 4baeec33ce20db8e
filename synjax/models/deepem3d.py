"""DeepEM3D-Net: boundary detection in anisotropic EM (Zeng, Wu, Ji, Bioinformatics 2017).

The network predicts, for the centre slice of a short stack of `s` EM slices
(s in {1, 3, 5}: the paper's s1, s3, s5 variants), a neuron boundary map:

* **Early 3D fusion.** The first two convolutions are 3D with *valid* padding
  in z, so together they shrink the `s` slices to one; everything after is 2D.
  Anisotropic EM (z spacing 5-10x the xy spacing) gains from seeing the
  neighbouring slices, but only at the first layers, where the features are
  still local.
* **Inception-residual contracting path** (Inception-ResNet-v2 modules A, B, C
  between stride-2 reductions), four stride-2 steps in all: the total pooling
  factor is `TOTAL_STRIDE` = 16, so input y and x must be multiples of 16
  (`synjax.inference.slicewise` pads whole slices to them).
* **Pyramid dilated deconvolutions.** Four skip features (1/2, 1/4, 1/8, 1/16
  resolution) are each reduced by a 1x1 conv and brought back to full
  resolution by transposed convs with stride f, kernel 2f and several kernel
  dilation rates, whose outputs are summed; the four scales are summed into the
  logits. The rates must be odd: with a power-of-two stride an even rate leaves
  every other output pixel without a single kernel tap.

Output: `num_classes` = 2 logits per pixel (0 = not boundary, 1 = boundary),
read as a softmax; `boundary_probability` gives channel `BOUNDARY_CLASS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from synjax.errors import ConfigError, DataError
from synjax.models.conv_dropin import Conv, ConvTranspose
from synjax.models.layers import max_pool_windows

# Four stride-2 steps: stem conv, stem reduction, reduction A, reduction B.
TOTAL_STRIDE = 16
BOUNDARY_CLASS = 1
SUPPORTED_SLICES = (1, 3, 5)
# Inception-ResNet-v2 scales each residual branch down before the sum to keep
# the deep residual stack stable at initialisation.
RESIDUAL_SCALE = 0.1


# Running statistics follow roughly the last 10 steps. With flax's default of
# 0.99 the statistics of a short CPU run still carry the large activations of
# its first steps, and inference (which uses them) collapses: after 500 steps
# on the synthetic demo the boundary probability was 0.04 +- 0.03 with running
# statistics against 0.32 +- 0.38 with the batch's own.
BATCH_NORM_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class DeepEM3DSettings:
    """Typed settings of `DeepEM3DNet`.

    Attributes:
      slices: input slices s (1, 3 or 5); the output is for the centre one.
      num_classes: output logits per pixel (2: not boundary / boundary).
      width: multiplier on the paper's feature counts (1.0 = paper size,
        e.g. 1/16 for tests).
      blocks: number of inception-residual modules A, B, C.
      side_features: channels of the 1x1 conv before each pyramid deconv.
      dilations: kernel dilation rates of the pyramid deconvolutions (odd).
    """

    slices: int = 5
    num_classes: int = 2
    width: float = 1.0
    blocks: tuple[int, int, int] = (1, 1, 1)
    side_features: int = 16
    dilations: tuple[int, ...] = (1, 3, 5)

    def __post_init__(self):
        if self.slices not in SUPPORTED_SLICES:
            raise ConfigError(f"DeepEM3DSettings.slices={self.slices}: expected one of 1, 3, 5")
        if self.num_classes < 1:
            raise ConfigError(f"DeepEM3DSettings.num_classes={self.num_classes}: expected >= 1")
        if self.width <= 0:
            raise ConfigError(f"DeepEM3DSettings.width={self.width}: expected > 0")
        if len(self.blocks) != 3 or min(self.blocks) < 0:
            raise ConfigError(f"DeepEM3DSettings.blocks={self.blocks}: expected 3 counts >= 0")
        if not self.dilations or any(d < 1 or d % 2 == 0 for d in self.dilations):
            raise ConfigError(
                f"DeepEM3DSettings.dilations={self.dilations}: expected odd rates >= 1 "
                "(an even rate with a power-of-two stride leaves output pixels uncovered)"
            )

    @property
    def z_kernels(self) -> tuple[int, int]:
        """z sizes of the two 3D convs; with valid padding they map s slices to 1."""
        first = self.slices // 2 + 1
        return first, self.slices - first + 1


class _ConvReLU(nn.Module):
    """2D conv (same padding) + ReLU, as in the inception branches."""

    features: int
    kernel: tuple[int, int] = (3, 3)
    strides: int = 1

    @nn.compact
    def __call__(self, x):
        return nn.relu(Conv(self.features, self.kernel, strides=self.strides, padding="SAME")(x))


def _bn_relu(x, train: bool):
    return nn.relu(nn.BatchNorm(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM)(x))


class _InceptionResidual(nn.Module):
    """Inception-ResNet-v2 module: parallel branches, 1x1 projection, scaled residual.

    `branches` lists each branch as ((features, kernel), ...). Shape-preserving:
    `[batch, y, x, c] -> [batch, y, x, c]`.
    """

    branches: tuple[tuple[tuple[int, tuple[int, int]], ...], ...]

    @nn.compact
    def __call__(self, x, train: bool):
        outs = []
        for branch in self.branches:
            h = x
            for features, kernel in branch:
                h = _ConvReLU(features, kernel)(h)
            outs.append(h)
        mixed = Conv(x.shape[-1], (1, 1))(jnp.concatenate(outs, axis=-1))
        return _bn_relu(x + RESIDUAL_SCALE * mixed, train)


class _Reduction(nn.Module):
    """Stride-2 reduction: max pool alongside strided conv branches, concatenated."""

    branches: tuple[tuple[int, ...], ...]

    @nn.compact
    def __call__(self, x, train: bool):
        outs = [max_pool_windows(x, (3, 3), (2, 2), "SAME")]
        for branch in self.branches:
            h = x
            # Every branch but its last conv keeps the resolution; the last one halves it.
            for i, features in enumerate(branch):
                last = i == len(branch) - 1
                kernel = (1, 1) if (i == 0 and len(branch) > 1) else (3, 3)
                h = _ConvReLU(features, kernel, strides=2 if last else 1)(h)
            outs.append(h)
        return _bn_relu(jnp.concatenate(outs, axis=-1), train)


class _PyramidDilatedDeconv(nn.Module):
    """Side output: 1x1 conv, then stride-`factor` transposed convs at several
    dilation rates, summed. `[batch, y, x, c] -> [batch, y*f, x*f, num_classes]`."""

    factor: int
    side_features: int
    num_classes: int
    dilations: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        h = nn.relu(Conv(self.side_features, (1, 1))(x))
        kernel = (2 * self.factor, 2 * self.factor)
        return sum(
            ConvTranspose(
                self.num_classes,
                kernel,
                strides=(self.factor, self.factor),
                kernel_dilation=(d, d),
                padding="SAME",
            )(h)
            for d in self.dilations
        )


class DeepEM3DNet(nn.Module):
    """DeepEM3D-Net boundary detector.

    Call: `model.apply(variables, x, train=False)` with x `[batch, s, y, x, 1]`
    float (s = `settings.slices`; y and x multiples of `TOTAL_STRIDE`) ->
    logits `[batch, y, x, num_classes]` for the centre slice. Batch norm
    follows every residual sum and reduction (as in the authors' code), so
    with `train=True` pass `mutable=["batch_stats"]`.
    """

    settings: DeepEM3DSettings = DeepEM3DSettings()

    def _w(self, features: int) -> int:
        return max(1, round(features * self.settings.width))

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        s = self.settings
        if x.ndim != 5 or x.shape[1] != s.slices or x.shape[-1] != 1:
            raise DataError(
                f"DeepEM3DNet input shape {x.shape}: expected [batch, {s.slices}, y, x, 1]"
            )
        if x.shape[2] % TOTAL_STRIDE or x.shape[3] % TOTAL_STRIDE:
            raise DataError(
                f"DeepEM3DNet input yx {x.shape[2:4]}: expected multiples of {TOTAL_STRIDE} "
                "(pad them, e.g. with synjax.inference.slicewise.pad_end)"
            )
        w = self._w
        kz1, kz2 = s.z_kernels
        # Early 3D fusion: valid in z (s -> 1), same in yx (pad 1 for the 3x3).
        yx_same = [(1, 1), (1, 1)]
        h = Conv(w(32), (kz1, 3, 3), strides=(1, 2, 2), padding=[(0, 0), *yx_same])(x)
        h = nn.relu(h)
        h = nn.relu(Conv(w(64), (kz2, 3, 3), padding=[(0, 0), *yx_same])(h))
        h = h[:, 0]  # z is now 1

        # Stem (1/2 resolution): two inception branches, then a stride-2 reduction.
        h = _ConvReLU(w(64))(h)
        left = _ConvReLU(w(96))(_ConvReLU(w(64), (1, 1))(h))
        right = _ConvReLU(w(64), (1, 1))(h)
        for features, kernel in ((w(64), (7, 1)), (w(64), (1, 7)), (w(96), (3, 3))):
            right = _ConvReLU(features, kernel)(right)
        skip2 = jnp.concatenate([left, right], axis=-1)
        h = _Reduction(((w(192),),))(skip2, train)

        # 1/4: module A, reduction A; 1/8: module B, reduction B; 1/16: module C.
        a = ((w(32), (1, 1)),), ((w(32), (1, 1)), (w(32), (3, 3)))
        a = (*a, ((w(32), (1, 1)), (w(48), (3, 3)), (w(64), (3, 3))))
        for _ in range(s.blocks[0]):
            h = _InceptionResidual(a)(h, train)
        skip4 = h
        h = _Reduction(((w(384),), (w(256), w(256), w(384))))(h, train)
        b = ((w(192), (1, 1)),), ((w(128), (1, 1)), (w(160), (1, 7)), (w(192), (7, 1)))
        for _ in range(s.blocks[1]):
            h = _InceptionResidual(b)(h, train)
        skip8 = h
        reduction_b = ((w(256), w(384)), (w(256), w(288)), (w(256), w(288), w(320)))
        h = _Reduction(reduction_b)(h, train)
        c = ((w(192), (1, 1)),), ((w(192), (1, 1)), (w(224), (1, 3)), (w(256), (3, 1)))
        for _ in range(s.blocks[2]):
            h = _InceptionResidual(c)(h, train)

        # Resolution recovery: every skip scale straight to full resolution, summed.
        logits = 0
        for factor, feat in ((2, skip2), (4, skip4), (8, skip8), (16, h)):
            logits = logits + _PyramidDilatedDeconv(
                factor, w(s.side_features), s.num_classes, s.dilations
            )(feat)
        return logits


def boundary_probability(logits: jax.Array) -> jax.Array:
    """Boundary probability `[batch, y, x, 1]` from logits `[batch, y, x, C]`.

    C == 1 is read as a sigmoid logit, C >= 2 as softmax logits with the
    boundary class at `BOUNDARY_CLASS`.
    """
    if logits.shape[-1] == 1:
        return jax.nn.sigmoid(logits)
    return jax.nn.softmax(logits, axis=-1)[..., BOUNDARY_CLASS : BOUNDARY_CLASS + 1]


def make_apply_fn(model: DeepEM3DNet, variables) -> Callable[[jax.Array], jax.Array]:
    """Inference function `[batch, s, y, x, 1] -> boundary probability [batch, y, x, 1]`.

    The returned closure is what `synjax.inference.tta` and
    `synjax.inference.slicewise` take; keep one object per model so that its
    compiled form is reused.
    """

    def apply_fn(x):
        return boundary_probability(model.apply(variables, x, train=False))

    return apply_fn
