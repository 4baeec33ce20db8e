"""Building blocks of the 3D U-Nets: PReLU, conv blocks, up-sampling, crops.

All modules take channels-last volumes `[batch, z, y, x, channels]`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from synjax.errors import ConfigError
from synjax.models.conv import Conv3D, ConvTranspose3D

# Initial negative slope of PReLU, as in He et al. (2015) and PyTorch.
PRELU_INIT_SLOPE = 0.25

UPSAMPLE_MODES = ("transpose", "resize_conv")


class PReLU(nn.Module):
    """Parametric ReLU with one learnable negative slope per channel.

    Flax's own `nn.PReLU` learns a single scalar; the paper's Keras PReLU (and
    PyTorch's `PReLU(num_parameters=c)`) learn one per channel.

    Attributes:
      init_slope: initial value of every slope.
      param_dtype: dtype of the slope parameter.
    """

    init_slope: float = PRELU_INIT_SLOPE
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Applies max(x, 0) + slope * min(x, 0).

        Args:
          x: [..., channels] any float dtype.

        Returns:
          Same shape and dtype as x.
        """
        slope = self.param(
            "slope", nn.initializers.constant(self.init_slope), (x.shape[-1],), self.param_dtype
        )
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class ConvBlock(nn.Module):
    """Two 3D convolutions, each followed by PReLU (one U-Net level).

    Attributes:
      features: output channels of both convolutions.
      kernel_size: (kz, ky, kx) of both convolutions.
      padding: "VALID" (each conv shrinks every axis by k - 1) or "SAME".
      dtype: computation dtype, None to follow the input.
      conv_implementation: `conv.Conv3D.implementation` ("auto": "folded" on
        CPU, native elsewhere; "fastest": the measured fastest for the backend).
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    padding: str = "VALID"
    dtype: Any = None
    conv_implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x [batch, z, y, x, c]. Returns [batch, z', y', x', features]."""
        for i in range(2):
            # Named as nn.Conv would be, so checkpoints of either stay valid.
            x = Conv3D(
                self.features,
                self.kernel_size,
                padding=self.padding,
                dtype=self.dtype,
                implementation=self.conv_implementation,
                name=f"Conv_{i}",
            )(x)
            x = PReLU()(x)
        return x


class Upsample(nn.Module):
    """Up-sampling by integer factors per axis, followed by PReLU.

    Modes:
      "transpose": transposed convolution with kernel = stride = factors; each
        input voxel maps to exactly one output block, so alignment is exact.
      "resize_conv": nearest-neighbour repeat, then a "SAME" convolution with
        kernel `resize_kernel` (the authors' Keras net: repeat (1, 2, 2), then a
        1x2x2 convolution; an even kernel shifts by half a fine voxel).

    Attributes:
      features: output channels.
      factors: (fz, fy, fx) integer up-sampling factors.
      mode: one of `UPSAMPLE_MODES`.
      resize_kernel: kernel of the convolution in "resize_conv" mode; None
        uses `factors`.
      dtype: computation dtype, None to follow the input.
      conv_implementation: `conv.Conv3D.implementation` of the convolution
        ("auto" runs the transposed one as an einsum on CPU).
    """

    features: int
    factors: tuple[int, int, int]
    mode: str = "transpose"
    resize_kernel: tuple[int, int, int] | None = None
    dtype: Any = None
    conv_implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x [batch, z, y, x, c]. Returns [batch, z*fz, y*fy, x*fx, features]."""
        if self.mode == "transpose":
            # Named as nn.ConvTranspose would be, so checkpoints stay valid.
            x = ConvTranspose3D(
                self.features,
                self.factors,
                dtype=self.dtype,
                implementation=self.conv_implementation,
                name="ConvTranspose_0",
            )(x)
        elif self.mode == "resize_conv":
            for axis, factor in zip((1, 2, 3), self.factors, strict=True):
                x = jnp.repeat(x, factor, axis=axis)
            kernel = self.resize_kernel or self.factors
            x = Conv3D(
                self.features,
                kernel,
                padding="SAME",
                dtype=self.dtype,
                implementation=self.conv_implementation,
                name="Conv_0",
            )(x)
        else:
            raise ConfigError(f"upsample mode {self.mode!r}; expected one of {UPSAMPLE_MODES}")
        return PReLU()(x)


def center_crop(x: jnp.ndarray, spatial_shape: Sequence[int]) -> jnp.ndarray:
    """Crops the spatial axes of x to `spatial_shape`, equally on both sides.

    Args:
      x: [batch, z, y, x, c].
      spatial_shape: target (z, y, x), each no larger than x's and differing
        from it by an even number.

    Returns:
      [batch, *spatial_shape, c].
    """
    starts = []
    for have, want in zip(x.shape[1:4], spatial_shape, strict=True):
        if want > have or (have - want) % 2:
            raise ConfigError(
                f"cannot centre-crop spatial shape {x.shape[1:4]} to {tuple(spatial_shape)}"
            )
        starts.append((have - want) // 2)
    index = tuple(slice(s, s + w) for s, w in zip(starts, spatial_shape, strict=True))
    return x[(slice(None), *index, slice(None))]
