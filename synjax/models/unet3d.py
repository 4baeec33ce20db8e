"""3D U-Net regressor of Parag et al. (MICCAI 2018), with its shape arithmetic.

The authors' network (released Keras code, `unet_3d_valid_unnorm_leaky_f24`):
three max-poolings of (1, 2, 2) (depth 3, four resolution levels), two valid
3x3x3 convolutions with PReLU per level, features doubling per level,
up-sampling by (1, 2, 2) with a PReLU'd convolution, crop-and-concat skips and
a linear 1x1x1 output. With valid padding an input of 32x316x316 (z-y-x) gives
an output of 4x228x228, which `UNet3DSettings()` reproduces:

    z: 32 -4-> 28 | 24 | 20 | 16 -> up 16 -4-> 12 -4-> 8 -4-> 4
    y: 316 -4-> 312 /2 156 -4-> 152 /2 76 -4-> 72 /2 36 -4-> 32
         -> x2 64 -4-> 60 -> x2 120 -4-> 116 -> x2 232 -4-> 228

A valid U-Net needs a fixed context around every output voxel; `UNet3DSettings`
gives the output shape of an input, the input box an output box needs (for
block-wise prediction) and the smallest valid input for a wanted output.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from synjax.errors import ConfigError
from synjax.geometry import SPATIAL_DIMS, Box, spatial_triple
from synjax.models.conv import IMPLEMENTATIONS as CONV_IMPLEMENTATIONS
from synjax.models.layers import UPSAMPLE_MODES, ConvBlock, Upsample, center_crop, max_pool3d

PADDINGS = ("VALID", "SAME")
# Upper bound of the search in `valid_input_shape`: far beyond any volume.
_MAX_BOTTOM_SIZE = 1 << 16


@dataclasses.dataclass(frozen=True)
class UNet3DSettings:
    """Settings of `UNet3D`; defaults are the paper's proximity regressor.

    Attributes:
      depth: number of poolings (resolution levels - 1).
      base_features: channels at the finest level.
      feature_growth: channel factor from one level to the next coarser one.
        The authors' code doubles (their net is named "f24"; the released
        script sets 22 base kernels); 3 is common in CREMI U-Nets.
      pool_factors: `depth` (fz, fy, fx) max-pool factors, finest first; None
        means (1, 2, 2) everywhere (no z pooling, as in the paper).
      conv_kernels: `depth + 1` odd (kz, ky, kx) kernels, finest first (the up
        path reuses its level's kernel); None means 3x3x3 everywhere. Use e.g.
        (1, 3, 3) on levels where z is too thin for 3x3x3 valid convolutions.
      padding: "VALID" (output smaller than input, as in the paper) or "SAME".
      upsample: "transpose" or "resize_conv" (see `layers.Upsample`).
      out_channels: output channels (1 for the signed-proximity regressor, 3
        for the pre / post / rest classifier).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters stay float32.
        None follows the input.
      conv_implementation: `conv.Conv3D.implementation` of every convolution
        ("auto": the measured fastest for the backend).
      remat: recompute each conv block's activations in the backward pass
        (`nn.remat`) instead of keeping them: less memory for large training
        patches, for about one more forward pass of compute. The parameters
        and every result are the same either way.
    """

    depth: int = 3
    base_features: int = 24
    feature_growth: int = 2
    pool_factors: tuple[tuple[int, int, int], ...] | None = None
    conv_kernels: tuple[tuple[int, int, int], ...] | None = None
    padding: str = "VALID"
    upsample: str = "transpose"
    out_channels: int = 1
    dtype: Any = None
    conv_implementation: str = "auto"
    remat: bool = False

    def __post_init__(self):
        if self.depth < 0 or self.base_features < 1 or self.feature_growth < 1:
            raise ConfigError(
                f"depth={self.depth}, base_features={self.base_features}, "
                f"feature_growth={self.feature_growth}; expected >= 0, >= 1, >= 1"
            )
        pools = self.pool_factors
        pools = ((1, 2, 2),) * self.depth if pools is None else pools
        pools = tuple(spatial_triple(p, "pool_factors entry") for p in pools)
        if len(pools) != self.depth:
            raise ConfigError(f"pool_factors has {len(pools)} entries; expected depth={self.depth}")
        kernels = self.conv_kernels or ((3, 3, 3),) * (self.depth + 1)
        kernels = tuple(spatial_triple(k, "conv_kernels entry") for k in kernels)
        if len(kernels) != self.depth + 1:
            raise ConfigError(
                f"conv_kernels has {len(kernels)} entries; expected depth + 1 = {self.depth + 1}"
            )
        if any(k % 2 == 0 for kernel in kernels for k in kernel):
            raise ConfigError(f"conv_kernels={kernels}; expected odd sizes (centred crops)")
        if self.padding not in PADDINGS:
            raise ConfigError(f"padding={self.padding!r}; expected one of {PADDINGS}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample={self.upsample!r}; expected one of {UPSAMPLE_MODES}")
        if self.out_channels < 1:
            raise ConfigError(f"out_channels={self.out_channels}; expected >= 1")
        if self.conv_implementation not in CONV_IMPLEMENTATIONS:
            raise ConfigError(
                f"conv_implementation={self.conv_implementation!r}; expected one of "
                f"{CONV_IMPLEMENTATIONS}"
            )
        object.__setattr__(self, "pool_factors", pools)
        object.__setattr__(self, "conv_kernels", kernels)

    def features(self, level: int) -> int:
        """Channels of resolution level `level` (0 = finest)."""
        return self.base_features * self.feature_growth**level

    def _shrink(self, level: int, axis: int) -> int:
        """Voxels that the two convolutions of `level` remove along `axis`."""
        if self.padding == "SAME":
            return 0
        return 2 * (self.conv_kernels[level][axis] - 1)

    def _axis_output(self, size: int, axis: int) -> int | None:
        """Output size along `axis` for input `size`, or None if not valid."""
        skips = []
        for level in range(self.depth):
            size -= self._shrink(level, axis)
            factor = self.pool_factors[level][axis]
            if size < 1 or size % factor:
                return None
            skips.append(size)
            size //= factor
        size -= self._shrink(self.depth, axis)
        if size < 1:
            return None
        for level in reversed(range(self.depth)):
            size *= self.pool_factors[level][axis]
            surplus = skips[level] - size
            if surplus < 0 or surplus % 2:
                return None
            size -= self._shrink(level, axis)
            if size < 1:
                return None
        return size

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Output shape of an input shape.

        Args:
          input_shape: (z, y, x) or (batch, z, y, x, channels).

        Returns:
          (z', y', x') or (batch, z', y', x', out_channels) to match.

        Raises:
          ConfigError: if the input is too small or does not pool evenly; the
            message names `valid_input_shape`.
        """
        shape = tuple(int(s) for s in input_shape)
        spatial = shape[1:4] if len(shape) == SPATIAL_DIMS + 2 else shape
        if len(spatial) != SPATIAL_DIMS or len(shape) not in (SPATIAL_DIMS, SPATIAL_DIMS + 2):
            raise ConfigError(f"input shape {shape}; expected (z, y, x) or (batch, z, y, x, c)")
        out = tuple(self._axis_output(n, axis) for axis, n in enumerate(spatial))
        if None in out:
            raise ConfigError(
                f"input spatial shape {spatial} is not valid for this U-Net (padding "
                f"{self.padding}, pools {self.pool_factors}); use valid_input_shape() to pick one"
            )
        if len(shape) == SPATIAL_DIMS:
            return out
        return (shape[0], *out, self.out_channels)

    def valid_input_shape(self, min_output_shape: Sequence[int]) -> tuple[int, int, int]:
        """Smallest valid input (z, y, x) whose output is at least `min_output_shape`."""
        wanted = spatial_triple(min_output_shape, "min_output_shape")
        result = []
        for axis, want in enumerate(wanted):
            # Every valid input is fixed by its size at the coarsest level: walk
            # those sizes upwards (the output grows with them) until one fits.
            for bottom in range(1, _MAX_BOTTOM_SIZE):
                size = bottom
                for level in reversed(range(self.depth)):
                    size = size * self.pool_factors[level][axis] + self._shrink(level, axis)
                out = self._axis_output(size, axis)
                if out is not None and out >= want:
                    result.append(size)
                    break
            else:
                raise ConfigError(f"no valid input gives output {want} along axis {axis}")
        return tuple(result)

    def required_context(self) -> tuple[int, int, int]:
        """Input voxels needed on each side of an output box, per axis (z, y, x).

        A valid U-Net crops the same amount from every valid input, split
        equally between both sides (odd kernels, centred crops); "SAME"
        padding needs none for the shapes to match.
        """
        smallest = self.valid_input_shape((1, 1, 1))
        out = self.output_shape(smallest)
        return tuple((i - o) // 2 for i, o in zip(smallest, out, strict=True))

    def input_box_for(self, output_box: Box) -> Box:
        """Input box that yields exactly `output_box` as output.

        Args:
          output_box: voxel box in volume coordinates (a `Box`, or its
            `(start, stop)`); its shape must be a valid output shape.

        Returns:
          The input box: `output_box` grown by `required_context()` on each
          side; it may reach outside the volume (pad there).
        """
        start, stop = output_box
        shape = Box(start, stop).shape
        in_box = Box(start, stop).pad(self.required_context())
        try:
            valid = self.output_shape(in_box.shape) == shape
        except ConfigError:
            valid = False
        if not valid:
            raise ConfigError(
                f"output box shape {shape} is not an output shape of this U-Net; "
                f"use output_shape(valid_input_shape({shape})) to pick one"
            )
        return in_box


class UNet3D(nn.Module):
    """3D U-Net with PReLU, crop-and-concat skips and a linear output.

    Attributes:
      settings: the network's settings.
    """

    settings: UNet3DSettings = UNet3DSettings()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Runs the network.

        Args:
          x: [batch, z, y, x, channels] any float dtype; the spatial shape must
            be valid (see `UNet3DSettings.valid_input_shape`).

        Returns:
          [batch, z', y', x', out_channels] linear outputs, z'-y'-x' given by
          `settings.output_shape`; dtype `settings.dtype`, or x's when None.
        """
        cfg = self.settings
        expected = cfg.output_shape(x.shape)
        if cfg.dtype is not None:
            x = x.astype(cfg.dtype)
        skips = []
        impl = cfg.conv_implementation
        # nn.remat renames the class ("CheckpointConvBlock"): the blocks are named
        # as Linen names plain ones, so parameters and checkpoints match either way.
        block_class = nn.remat(ConvBlock) if cfg.remat else ConvBlock
        block_index = itertools.count()

        def conv_block(*args) -> ConvBlock:
            return block_class(*args, name=f"ConvBlock_{next(block_index)}")

        for level in range(cfg.depth):
            x = conv_block(
                cfg.features(level), cfg.conv_kernels[level], cfg.padding, cfg.dtype, impl
            )(x)
            skips.append(x)
            pool = cfg.pool_factors[level]
            x = max_pool3d(x, pool)
        x = conv_block(
            cfg.features(cfg.depth), cfg.conv_kernels[cfg.depth], cfg.padding, cfg.dtype, impl
        )(x)
        for level in reversed(range(cfg.depth)):
            x = Upsample(
                cfg.features(level),
                cfg.pool_factors[level],
                cfg.upsample,
                dtype=cfg.dtype,
                conv_implementation=impl,
            )(x)
            skip = center_crop(skips[level], x.shape[1:4])
            x = jnp.concatenate([x, skip], axis=-1)
            x = conv_block(
                cfg.features(level), cfg.conv_kernels[level], cfg.padding, cfg.dtype, impl
            )(x)
        x = nn.Conv(cfg.out_channels, (1, 1, 1), dtype=cfg.dtype, name="output")(x)
        assert x.shape == expected, (x.shape, expected)
        return x
