"""3D ResNet backbone with GroupNorm (the 3D Mask R-CNN's feature extractor).

Chen et al.'s 3D Mask R-CNN uses a ResNet-101 with an FPN over its C2-C5
outputs and GroupNorm in place of BatchNorm: with two patches per batch,
batch statistics are too noisy. `ResNet3D` builds ResNet-18/34 (basic
blocks) and ResNet-50/101 (bottleneck blocks, the 3x3x3 conv carrying the
stride as in torchvision's "v1.5") and returns the last map of each stage.

Two-photon voxels are 0.096 x 0.096 x 1 um (x-y-z): z is about 10x coarser
than y and x. The default strides pool only y and x until the voxels are
roughly isotropic, then all three axes. For a 32x96x96 (z-y-x) patch:

    level  stride (z, y, x)   shape        voxel (um, z-y-x)
    C2     (1, 4, 4)          32 x 24 x 24  1.0 x 0.38 x 0.38
    C3     (1, 8, 8)          32 x 12 x 12  1.0 x 0.77 x 0.77
    C4     (2, 16, 16)        16 x  6 x  6  2.0 x 1.5 x 1.5
    C5     (4, 32, 32)         8 x  3 x  3  4.0 x 3.1 x 3.1

Convolutions of stride 1 are `conv.Conv3D` (fast on CPU, native on GPU);
strided ones are `nn.Conv` with symmetric padding (k - 1) / 2, so that a
stride-s layer samples the input at 0, s, 2s, ... in both the main path and
the 1x1x1 shortcut, as torchvision's ResNet does.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Triple, spatial_triple
from synjax.models.conv import Conv3D

# Names of the feature maps, finest first: stage i (0-based) gives C{i + 2}.
LEVELS = ("C2", "C3", "C4", "C5")
# depth -> (block kind, blocks per stage), as in He et al. (2016), Table 1.
ARCHITECTURES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
# A bottleneck block's output has this many times its inner width.
BOTTLENECK_EXPANSION = 4

# He initialisation (fan out), as torchvision's ResNet: keeps the activation
# scale through the ReLUs of a deep stack.
HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def group_norm(features: int, groups: int, dtype: Any, name: str) -> nn.GroupNorm:
    """GroupNorm with gcd(groups, features) groups.

    The gcd always divides the channels, so tiny test widths work; at paper
    widths (multiples of 32) it is `groups` itself.
    """
    return nn.GroupNorm(num_groups=math.gcd(groups, features), dtype=dtype, name=name)


def conv(
    features: int,
    kernel: Triple,
    strides: Triple = (1, 1, 1),
    *,
    use_bias: bool = False,
    dtype: Any = None,
    kernel_init: Any = HE_NORMAL,
    name: str | None = None,
) -> nn.Module:
    """A 3D conv of odd `kernel` that keeps size / stride (ceil) on every axis.

    Stride 1: `Conv3D` with "SAME" padding. Otherwise `nn.Conv` with
    symmetric padding (k - 1) / 2, which samples at 0, s, 2s, ...
    """
    if any(k % 2 == 0 for k in kernel):
        raise ConfigError(f"kernel={kernel}; expected odd sizes (centred padding)")
    if tuple(strides) == (1, 1, 1):
        return Conv3D(
            features, kernel, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name
        )
    return nn.Conv(
        features,
        kernel,
        strides=strides,
        padding=[((k - 1) // 2, (k - 1) // 2) for k in kernel],
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=kernel_init,
        name=name,
    )


def stem_max_pool(x: jax.Array, factors: Triple) -> jax.Array:
    """Max-pool by `factors`, window 2p - 1 and padding p - 1 on each axis.

    torchvision's 3-wide, pad-1 stem pool for p = 2; the output has
    ceil(n / p) voxels; p = 1 leaves the axis alone. Equal to
    `nn.max_pool(x, window, strides=factors, padding=pads)`, written as
    maxima of strided slices, one axis at a time: the gradient of XLA's
    windowed max tracks the argmax of every window with five index arrays,
    and took 5x as long on CPU (fwd + bwd, [2, 32, 48, 48, 8]). Gradients
    differ only where a window holds several equal maxima (`jnp.maximum`
    splits the gradient where `nn.max_pool` gives it to the first); after a
    ReLU those ties are zeros, whose gradient the ReLU stops anyway.

    Args:
      x: [batch, z, y, x, c].
      factors: (pz, py, px) pooling factors.

    Returns:
      [batch, ceil(z / pz), ceil(y / py), ceil(x / px), c].
    """
    for axis, p in enumerate(factors, start=1):
        if p == 1:
            continue
        pads = [(0, 0)] * x.ndim
        pads[axis] = (p - 1, p - 1)
        padded = jnp.pad(x, pads, constant_values=-jnp.inf)
        size = -(-x.shape[axis] // p)
        x = functools.reduce(
            jnp.maximum,
            (
                jax.lax.slice_in_dim(padded, d, d + (size - 1) * p + 1, stride=p, axis=axis)
                for d in range(2 * p - 1)
            ),
        )
    return x


@dataclasses.dataclass(frozen=True)
class ResNet3DSettings:
    """Typed settings of `ResNet3D`; defaults are the paper's ResNet-101.

    Attributes:
      depth: 18, 34 (basic blocks), 50 or 101 (bottleneck blocks).
      base_features: width of the stem and of the first stage (64 in the
        paper); stage i has base_features * 2**i (times 4 at the output of a
        bottleneck block). Small values (e.g. 4) make test-sized networks.
      norm_groups: GroupNorm groups (32 as Wu & He, 2018); a layer with a
        channel count that `norm_groups` does not divide uses their gcd.
      stem_kernel: (kz, ky, kx) of the stem convolution (odd sizes).
      stem_strides: strides of the stem convolution.
      stem_pool: factors of the max-pool after the stem (window 2p - 1, so
        3 for p = 2 as torchvision; 1 on an axis: no pooling there).
      stage_strides: strides of the first block of each of the 4 stages.
      block_kernels: (kz, ky, kx) of each stage's 3x3x3 convolutions (odd);
        e.g. (1, 3, 3) for 2D-like early stages.
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
        None follows the input.
    """

    depth: int = 101
    base_features: int = 64
    norm_groups: int = 32
    stem_kernel: Triple = (3, 7, 7)
    stem_strides: Triple = (1, 2, 2)
    stem_pool: Triple = (1, 2, 2)
    stage_strides: tuple[Triple, Triple, Triple, Triple] = (
        (1, 1, 1),
        (1, 2, 2),
        (2, 2, 2),
        (2, 2, 2),
    )
    block_kernels: tuple[Triple, Triple, Triple, Triple] = ((3, 3, 3),) * 4
    dtype: Any = None

    def __post_init__(self):
        if self.depth not in ARCHITECTURES:
            raise ConfigError(
                f"ResNet3DSettings.depth={self.depth}; expected one of {sorted(ARCHITECTURES)}"
            )
        if self.base_features < 1 or self.norm_groups < 1:
            raise ConfigError(
                f"ResNet3DSettings.base_features={self.base_features}, "
                f"norm_groups={self.norm_groups}; expected >= 1"
            )
        for field in ("stem_kernel", "stem_strides", "stem_pool"):
            value = spatial_triple(getattr(self, field), f"ResNet3DSettings.{field}")
            object.__setattr__(self, field, value)
        for field in ("stage_strides", "block_kernels"):
            entries = tuple(getattr(self, field))
            if len(entries) != len(LEVELS):
                raise ConfigError(
                    f"ResNet3DSettings.{field} has {len(entries)} entries; expected {len(LEVELS)}"
                )
            entries = tuple(spatial_triple(e, f"ResNet3DSettings.{field} entry") for e in entries)
            object.__setattr__(self, field, entries)
        kernels = (self.stem_kernel, *self.block_kernels)
        if any(k % 2 == 0 for kernel in kernels for k in kernel):
            raise ConfigError(f"ResNet3DSettings kernels {kernels}; expected odd sizes")

    @property
    def block_kind(self) -> str:
        """ "basic" (two 3x3x3 convs) or "bottleneck" (1x1x1, 3x3x3, 1x1x1)."""
        return ARCHITECTURES[self.depth][0]

    @property
    def blocks_per_stage(self) -> tuple[int, int, int, int]:
        """Residual blocks in each of the four stages (C2..C5)."""
        return ARCHITECTURES[self.depth][1]

    @property
    def out_features(self) -> dict[str, int]:
        """Channels of each returned map, e.g. {"C2": 256, ..., "C5": 2048} for ResNet-101."""
        expansion = BOTTLENECK_EXPANSION if self.block_kind == "bottleneck" else 1
        return {level: self.base_features * 2**i * expansion for i, level in enumerate(LEVELS)}

    @property
    def feature_strides(self) -> dict[str, Triple]:
        """Input voxels per voxel of each returned map, (z, y, x)."""
        stride = [s * p for s, p in zip(self.stem_strides, self.stem_pool, strict=True)]
        strides = {}
        for level, stage in zip(LEVELS, self.stage_strides, strict=True):
            stride = [s * t for s, t in zip(stride, stage, strict=True)]
            strides[level] = tuple(stride)
        return strides


class BasicBlock3D(nn.Module):
    """Two kxkxk convs with GroupNorm and a residual sum (ResNet-18/34).

    Attributes:
      features: output channels.
      strides: strides of the first conv (and of the projection shortcut).
      kernel: (kz, ky, kx) of both convs.
      norm_groups: GroupNorm groups.
      dtype: computation dtype.
    """

    features: int
    strides: Triple = (1, 1, 1)
    kernel: Triple = (3, 3, 3)
    norm_groups: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [batch, z, y, x, c]. Returns [batch, z/sz, y/sy, x/sx, features] (ceil)."""
        f, groups, dtype = self.features, self.norm_groups, self.dtype
        h = conv(f, self.kernel, self.strides, dtype=dtype, name="conv1")(x)
        h = nn.relu(group_norm(f, groups, dtype, "norm1")(h))
        h = conv(f, self.kernel, dtype=dtype, name="conv2")(h)
        h = group_norm(f, groups, dtype, "norm2")(h)
        return nn.relu(h + _shortcut(x, f, self.strides, groups, dtype))


class BottleneckBlock3D(nn.Module):
    """1x1x1 -> kxkxk (strided) -> 1x1x1 convs with GroupNorm (ResNet-50/101).

    Attributes:
      features: inner width; the output has `BOTTLENECK_EXPANSION` times more.
      strides: strides of the kxkxk conv (and of the projection shortcut).
      kernel: (kz, ky, kx) of the middle conv.
      norm_groups: GroupNorm groups.
      dtype: computation dtype.
    """

    features: int
    strides: Triple = (1, 1, 1)
    kernel: Triple = (3, 3, 3)
    norm_groups: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Args: x [batch, z, y, x, c]. Returns [batch, z/sz, y/sy, x/sx, 4 * features] (ceil)."""
        f, groups, dtype = self.features, self.norm_groups, self.dtype
        out = f * BOTTLENECK_EXPANSION
        h = conv(f, (1, 1, 1), dtype=dtype, name="conv1")(x)
        h = nn.relu(group_norm(f, groups, dtype, "norm1")(h))
        h = conv(f, self.kernel, self.strides, dtype=dtype, name="conv2")(h)
        h = nn.relu(group_norm(f, groups, dtype, "norm2")(h))
        h = conv(out, (1, 1, 1), dtype=dtype, name="conv3")(h)
        h = group_norm(out, groups, dtype, "norm3")(h)
        return nn.relu(h + _shortcut(x, out, self.strides, groups, dtype))


def _shortcut(x: jax.Array, features: int, strides: Triple, groups: int, dtype: Any) -> jax.Array:
    """Identity, or a strided 1x1x1 projection + GroupNorm where the shape changes.

    Called inside a block's compact `__call__`, so its layers belong to the block.
    """
    if tuple(strides) == (1, 1, 1) and x.shape[-1] == features:
        return x
    h = conv(features, (1, 1, 1), strides, dtype=dtype, name="shortcut")(x)
    return group_norm(features, groups, dtype, "shortcut_norm")(h)


class ResNet3D(nn.Module):
    """3D ResNet returning the last feature map of each stage.

    Call: `model.apply({"params": params}, x)` with x `[batch, z, y, x, c]`
    -> {"C2": ..., "C5": ...}, each `[batch, z_k, y_k, x_k, out_features[k]]`
    with z_k = ceil(z / feature_strides[k][0]) (likewise y, x). GroupNorm
    keeps no state: `init` creates only "params", and each sample's output
    does not depend on the rest of the batch.

    Parameters are named `stem_conv`, `stem_norm`, then `res{level}_{i}` for
    the i-th block of the stage that gives C{level} (e.g. `res4_22`).
    """

    settings: ResNet3DSettings = ResNet3DSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        if x.ndim != SPATIAL_DIMS + 2:
            raise DataError(f"ResNet3D input shape {x.shape}; expected [batch, z, y, x, channels]")
        h = conv(s.base_features, s.stem_kernel, s.stem_strides, dtype=s.dtype, name="stem_conv")(x)
        h = nn.relu(group_norm(s.base_features, s.norm_groups, s.dtype, "stem_norm")(h))
        h = stem_max_pool(h, s.stem_pool)

        block = BottleneckBlock3D if s.block_kind == "bottleneck" else BasicBlock3D
        outputs = {}
        stages = zip(LEVELS, s.blocks_per_stage, s.stage_strides, s.block_kernels, strict=True)
        for i, (level, blocks, strides, kernel) in enumerate(stages):
            for j in range(blocks):
                h = block(
                    s.base_features * 2**i,
                    strides=strides if j == 0 else (1, 1, 1),
                    kernel=kernel,
                    norm_groups=s.norm_groups,
                    dtype=s.dtype,
                    name=f"res{level[1:]}_{j}",
                )(h)
            outputs[level] = h
        return outputs
