"""Flax's 2D/3D convolutions (any stride and dilation) on oneDNN on the CPU backend.

DeepEM3D-Net is made of flax `nn.Conv` 2D convolutions (strided in its
reductions, 1x7 / 7x1 in its inception branches), two strided 3D stem
convolutions and dilated stride-16 `nn.ConvTranspose` side outputs. XLA:CPU
runs the transposed ones as convolutions of a zero-dilated input (a stride-8
one multiplies 63 zeros for every input value: 40 ms of the 0.25 s forward
pass at 256 x 256, measured with jax.profiler) and the rest at about a quarter
of the matmul peak. `conv_general_dilated` is a drop-in for
`lax.conv_general_dilated` that `nn.Conv(..., conv_general_dilated=...)`
takes, and `ConvTranspose` one for `nn.ConvTranspose`; both call
`conv_onednn` where `conv.resolve_implementation("auto")` gives "onednn" (the
CPU backend with oneDNN built) and the call is one oneDNN takes (channels-last
layouts, no input dilation or groups, float32/bfloat16), and XLA's
convolution otherwise. Parameters and outputs are those of flax's modules (up
to float rounding), so checkpoints carry over.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from synjax.errors import ConfigError
from synjax.models import conv_onednn
from synjax.models.conv import add_bias, kernel_and_bias, resolve_implementation

# Channels-last layouts by spatial rank, as flax's convolutions use them.
_CHANNELS_LAST = {
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def _takes_onednn(lhs, rhs, dimension_numbers) -> bool:
    """Whether "auto" means oneDNN here and the operands are ones it takes."""
    spatial = lhs.ndim - 2
    if spatial not in _CHANNELS_LAST or lhs.dtype != rhs.dtype:
        return False
    if lhs.dtype not in conv_onednn.SUPPORTED_DTYPES:
        return False
    given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if given != lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST[spatial]):
        return False
    return resolve_implementation("auto") == "onednn"


def _as_3d(lhs, rhs, strides, padding, dilation):
    """A 2D problem as a 3D one with a z axis of 1 (oneDNN's handlers are 3D)."""
    return (
        lhs[:, None],
        rhs[None],
        (1, *strides),
        ((0, 0), *padding),
        (1, *dilation),
    )


def conv_general_dilated(
    lhs: jnp.ndarray,
    rhs: jnp.ndarray,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> jnp.ndarray:
    """`lax.conv_general_dilated`, by oneDNN where it is "auto"'s choice and applies.

    Same arguments and result as `lax.conv_general_dilated` (pass it as
    `nn.Conv(..., conv_general_dilated=conv_general_dilated)`). oneDNN takes
    2D and 3D channels-last convolutions ([batch, (z,) y, x, c] with kernel
    [(kz,) ky, kx, c, f]) of float32 or bfloat16 operands without input
    dilation, groups or a preferred element type; anything else, and every
    call off the CPU backend or inside `conv.auto_implementation(name)` with
    another name, goes to `lax.conv_general_dilated`.
    """
    spatial = lhs.ndim - 2
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation) if rhs_dilation is not None else (1,) * spatial
    plain = (
        (lhs_dilation is None or all(d == 1 for d in lhs_dilation))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    )
    if not (plain and _takes_onednn(lhs, rhs, dimension_numbers)):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if isinstance(padding, str):
        extents = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:spatial], dilation, strict=True)]
        padding = lax.padtype_to_pads(lhs.shape[1:-1], extents, strides, padding)
    padding = tuple(tuple(p) for p in padding)
    if spatial == 2:
        x, kernel, strides, padding, dilation = _as_3d(lhs, rhs, strides, padding, dilation)
        return conv_onednn.conv_onednn(x, kernel, strides, padding, dilation)[:, 0]
    return conv_onednn.conv_onednn(lhs, rhs, strides, padding, dilation)


def conv_transpose(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    dilation: Sequence[int],
    precision: Any = None,
) -> jnp.ndarray:
    """`lax.conv_transpose` (channels-last, transpose_kernel=False), by oneDNN where it applies.

    Args:
      x: [batch, (z,) y, x, c].
      kernel: [(kz,) ky, kx, c, f].
      strides: per spatial axis.
      padding: "SAME", "VALID" or (low, high) pairs, as `lax.conv_transpose`.
      dilation: kernel dilation per spatial axis.
      precision: passed to `lax.conv_transpose` (oneDNN computes float32 fully).

    Returns:
      [batch, (z',) y', x', f], as `lax.conv_transpose`.
    """
    spatial = x.ndim - 2
    strides, dilation = tuple(strides), tuple(dilation)
    dimension_numbers = _CHANNELS_LAST.get(spatial)
    if dimension_numbers is None or not _takes_onednn(x, kernel, dimension_numbers):
        return lax.conv_transpose(
            x,
            kernel,
            strides,
            padding,
            rhs_dilation=dilation,
            dimension_numbers=dimension_numbers,
            precision=precision,
        )
    if isinstance(padding, str):
        padding = [
            conv_onednn.transpose_padding(k, s, d, padding)
            for k, s, d in zip(kernel.shape[:spatial], strides, dilation, strict=True)
        ]
    padding = tuple(tuple(p) for p in padding)
    if spatial == 2:
        x3, kernel3, strides3, padding3, dilation3 = _as_3d(x, kernel, strides, padding, dilation)
        return conv_onednn.conv_transpose_onednn(x3, kernel3, strides3, padding3, dilation3)[:, 0]
    return conv_onednn.conv_transpose_onednn(x, kernel, strides, padding, dilation)


# Drop-in `nn.Conv`: the same module (parameter names `Conv_0`, ...; same
# parameters) with its convolution through `conv_general_dilated`.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class ConvTranspose(nn.Module):
    """Drop-in `nn.ConvTranspose` (transpose_kernel=False) whose CPU path is oneDNN.

    Same attributes (but circular padding and `transpose_kernel`), parameters
    (`kernel` [*kernel_size, in_features, features], `bias` [features]) and
    output as `nn.ConvTranspose`, so checkpoints carry over; `conv_transpose`
    says when oneDNN runs it.

    Attributes:
      features: output channels.
      kernel_size: per spatial axis.
      strides: per spatial axis (None = 1).
      padding: "SAME", "VALID" or (low, high) pairs.
      kernel_dilation: per spatial axis (None = 1).
      use_bias: whether to add a learned bias.
      dtype: computation dtype, None to promote input and parameters.
      param_dtype: dtype of the parameters.
      precision: passed to `lax.conv_transpose`.
      kernel_init: kernel initialiser (nn.ConvTranspose's default).
      bias_init: bias initialiser (zeros).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: str | Sequence[tuple[int, int]] = "SAME"
    kernel_dilation: Sequence[int] | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x [batch, (z,) y, x, c]. Returns [batch, (z',) y', x', features]."""
        kernel_size = tuple(self.kernel_size)
        spatial = len(kernel_size)
        if x.ndim != spatial + 2:
            raise ConfigError(
                f"ConvTranspose input shape {x.shape}: expected [batch, {spatial} spatial axes, "
                "channels]"
            )
        if isinstance(self.padding, str) and self.padding.upper() not in ("SAME", "VALID"):
            raise ConfigError(f"ConvTranspose padding={self.padding!r}; expected SAME or VALID")
        padding = self.padding.upper() if isinstance(self.padding, str) else self.padding
        kernel, bias = kernel_and_bias(self, (*kernel_size, x.shape[-1], self.features))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv_transpose(
            x,
            kernel,
            self.strides or (1,) * spatial,
            padding,
            self.kernel_dilation or (1,) * spatial,
            self.precision,
        )
        if bias is not None:
            y = add_bias(y, bias)
        return y
