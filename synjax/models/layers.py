"""Building blocks of the 3D U-Nets: PReLU, conv blocks, max pooling, up-sampling, crops.

All modules take channels-last volumes `[batch, z, y, x, channels]`.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from synjax.errors import ConfigError
from synjax.models.conv import Conv3D, ConvTranspose3D, channel_sum

# Initial negative slope of PReLU, as in He et al. (2015) and PyTorch.
PRELU_INIT_SLOPE = 0.25

UPSAMPLE_MODES = ("transpose", "resize_conv")

# "xla": `nn.max_pool` (XLA's reduce_window; its gradient is select_and_scatter);
# "blocks": `max_pool_blocks` (a reshape and a max; gradient by `argmax`).
# Both give the same output and gradient bit for bit, ties included
# (tests/test_pooling.py), so "auto" takes "blocks" on the CPU backend, where
# its forward + gradient measured 2-10x faster on the networks' pooling inputs
# (`benchmarks/bench_conv.py --network-layers`, results/bench_conv_layers.json),
# and "xla" elsewhere (not measured there).
POOL_IMPLEMENTATIONS = ("auto", "blocks", "xla")


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
        if x.dtype == jnp.float32:
            return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)
        return _prelu_by_product(x, slope.astype(x.dtype))


@jax.custom_vjp
def _prelu_by_product(x: jnp.ndarray, slope: jnp.ndarray) -> jnp.ndarray:
    """PReLU below float32, whose slope gradient is `conv.channel_sum` (fast on CPU)."""
    return jnp.where(x >= 0, x, slope * x)


def _prelu_fwd(x, slope):
    return jnp.where(x >= 0, x, slope * x), (x, slope)


def _prelu_bwd(residuals, grad):
    x, slope = residuals
    negative = x < 0
    grad_x = jnp.where(negative, slope * grad, grad)
    grad_slope = channel_sum(jnp.where(negative, x * grad, jnp.zeros_like(grad)))
    return grad_x, grad_slope.astype(slope.dtype)


_prelu_by_product.defvjp(_prelu_fwd, _prelu_bwd)


class ConvBlock(nn.Module):
    """Two 3D convolutions, each followed by PReLU (one U-Net level).

    Attributes:
      features: output channels of both convolutions.
      kernel_size: (kz, ky, kx) of both convolutions.
      padding: "VALID" (each conv shrinks every axis by k - 1) or "SAME".
      dtype: computation dtype, None to follow the input.
      conv_implementation: `conv.Conv3D.implementation` ("auto": "onednn" on
        CPU where available, else "folded"; native elsewhere).
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


_WINDOW_AXES = (2, 4, 6)


def _window_blocks(x: jnp.ndarray, factors: tuple[int, int, int]) -> jnp.ndarray:
    """x cropped to whole windows, as [batch, z', pz, y', py, x', px, c] (a free reshape)."""
    batch, channels = x.shape[0], x.shape[4]
    out = [n // p for n, p in zip(x.shape[1:4], factors, strict=True)]
    x = x[:, : out[0] * factors[0], : out[1] * factors[1], : out[2] * factors[2]]
    return x.reshape(batch, out[0], factors[0], out[1], factors[1], out[2], factors[2], channels)


def _block_taps(blocks: jnp.ndarray) -> list[jnp.ndarray]:
    """The window's taps of `_window_blocks`' view, in row-major (dz, dy, dx) order."""
    pz, py, px = (blocks.shape[axis] for axis in _WINDOW_AXES)
    return [
        blocks[:, :, a, :, b, :, c, :]
        for a, b, c in itertools.product(range(pz), range(py), range(px))
    ]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def max_pool_blocks(x: jnp.ndarray, factors: tuple[int, int, int]) -> jnp.ndarray:
    """`nn.max_pool(x, factors, strides=factors, padding="VALID")` by reshaping.

    Non-overlapping windows are a reshape away: the pool is the elementwise
    maximum of the window's taps (strided views of the input), which XLA fuses
    into one pass; its reductions over the reshaped window axes ran at a
    fraction of memory speed (52 ms for the pruning CNN's first pool of
    [4, 16, 160, 160, 16], more than the convolution before it). The gradient
    goes, as XLA's select_and_scatter (select `>=`) sends it, to the first
    maximal element of each window in row-major (dz, dy, dx) order, tap by tap,
    all elementwise (XLA:CPU's select_and_scatter was ~15% of the paper
    U-Net's train step).

    Args:
      x: [batch, z, y, x, c]; voxels past the last whole window are dropped.
      factors: (pz, py, px) window = stride.

    Returns:
      [batch, z // pz, y // py, x // px, c], x's dtype.
    """
    return functools.reduce(jnp.maximum, _block_taps(_window_blocks(x, factors)))


def _max_pool_blocks_fwd(x, factors):
    out = max_pool_blocks(x, factors)
    return out, (x, out)


def _first_maximum_cotangents(
    taps: Sequence[jnp.ndarray], out: jnp.ndarray, grad_out: jnp.ndarray
) -> list[jnp.ndarray]:
    """Per tap (in window order), `grad_out` where the tap holds its window's
    first maximum and zero elsewhere: XLA's select_and_scatter rule (select `>=`).

    Args:
      taps: the window's taps, each shaped as `out`, row-major window order.
      out: the pool's output.
      grad_out: its cotangent.
    """
    zero = jnp.zeros((), grad_out.dtype)
    taken = jnp.zeros(out.shape, bool)
    cotangents = []
    for tap in taps:
        first = (tap == out) & ~taken
        taken = taken | first
        cotangents.append(jnp.where(first, grad_out, zero))
    return cotangents


def _max_pool_blocks_bwd(factors, residuals, grad_out):
    x, out = residuals
    grads = _first_maximum_cotangents(_block_taps(_window_blocks(x, factors)), out, grad_out)
    pz, py, px = factors
    batch, out_z, out_y, out_x, channels = grad_out.shape
    grad = jnp.stack(grads, axis=-2).reshape(batch, out_z, out_y, out_x, pz, py, px, channels)
    grad = grad.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    grad = grad.reshape(batch, out_z * pz, out_y * py, out_x * px, channels)
    return (_pad_dropped_voxels(grad, x.shape[1:4]).astype(x.dtype),)


def _pad_dropped_voxels(grad: jnp.ndarray, spatial: Sequence[int]) -> jnp.ndarray:
    """`grad` over the whole windows, zero-padded at the high end to the pool
    input's `spatial` shape: voxels past the last whole window (dropped by
    VALID) get no gradient."""
    pads = [(0, n - g) for n, g in zip(spatial, grad.shape[1:4], strict=True)]
    return jnp.pad(grad, [(0, 0), *pads, (0, 0)])


max_pool_blocks.defvjp(_max_pool_blocks_fwd, _max_pool_blocks_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def relu_max_pool_blocks(x: jnp.ndarray, factors: tuple[int, int, int]) -> jnp.ndarray:
    """`max_pool_blocks(nn.relu(x), factors)` without materialising `relu(x)`.

    The ReLU commutes with the maximum (both are monotone), so it is applied to
    the pool's output, and the gradient goes to the first maximal tap of `x`
    where that maximum is positive, nowhere else: the same values and gradient,
    bit for bit, as ReLU then pool (tests). Neither `relu(x)` nor a copy of `x`
    is kept for the backward pass, only which tap won each window (one byte per
    output), and the gradient is written in one pass in x's layout. For the
    pruning CNN's first layer ([4, 16, 160, 160, 16]) this saved a 105 MB write
    and two re-reads per training step: 0.39 -> 0.35 s per step on the 2-core
    CPU (`benchmarks/run_all.py --sections pruning`, glibc's default allocator).

    Args:
      x: [batch, z, y, x, c] pre-activations; voxels past the last whole window
        are dropped.
      factors: (pz, py, px) window = stride.

    Returns:
      [batch, z // pz, y // py, x // px, c], x's dtype.
    """
    return nn.relu(max_pool_blocks(x, factors))


def _tap_index_type(count: int):
    """The narrowest integer type that holds tap indices 0..count (count = none)."""
    return jnp.int8 if count <= jnp.iinfo(jnp.int8).max else jnp.int32


def _relu_max_pool_blocks_fwd(x, factors):
    taps = _block_taps(_window_blocks(x, factors))
    peak = functools.reduce(jnp.maximum, taps)
    # Which tap the gradient goes to: the first maximal one, or none (len(taps))
    # where the maximum is not positive (jax.nn.relu's derivative is 0 there).
    # One byte per output is all the backward pass reads besides its cotangent.
    index_type = _tap_index_type(len(taps))
    winner = jnp.full(peak.shape, len(taps), index_type)
    for index in reversed(range(len(taps))):
        winner = jnp.where(taps[index] == peak, index_type(index), winner)
    winner = jnp.where(peak > 0, winner, index_type(len(taps)))
    # x's spatial shape and dtype, carried by an empty array (residuals are arrays).
    like_x = jnp.zeros((*x.shape[1:4], 0), x.dtype)
    return nn.relu(peak), (winner, like_x)


def _relu_max_pool_blocks_bwd(factors, residuals, grad_out):
    winner, like_x = residuals
    pz, py, px = factors
    batch, out_z, out_y, out_x, channels = grad_out.shape
    # The cotangent in `_window_blocks`' 8-D view, [batch, z', pz, y', py, x', px,
    # c], which is x's row-major layout: one elementwise pass, no transpose.
    view = (batch, out_z, 1, out_y, 1, out_x, 1, channels)
    # Each voxel's tap index in `_block_taps`' row-major (dz, dy, dx) order.
    tap = jnp.arange(pz * py * px, dtype=winner.dtype).reshape(1, 1, pz, 1, py, 1, px, 1)
    grad = jnp.where(
        winner.reshape(view) == tap, grad_out.reshape(view), jnp.zeros((), grad_out.dtype)
    )
    grad = grad.reshape(batch, out_z * pz, out_y * py, out_x * px, channels)
    return (_pad_dropped_voxels(grad, like_x.shape[:3]).astype(like_x.dtype),)


relu_max_pool_blocks.defvjp(_relu_max_pool_blocks_fwd, _relu_max_pool_blocks_bwd)


def _window_taps(out_shape, window, strides):
    """Per window tap, in row-major order: the strided slice of the padded input
    it reads, as `lax.slice`'s (start, limit, strides) over [batch, *spatial, c]."""
    taps = []
    for offsets in itertools.product(*(range(w) for w in window)):
        start = (0, *offsets, 0)
        spatial = zip(offsets, out_shape[1:-1], strides, strict=True)
        limit = (out_shape[0], *(o + (n - 1) * s + 1 for o, n, s in spatial), out_shape[-1])
        taps.append((start, limit, (1, *strides, 1)))
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_windows(
    x: jnp.ndarray, window: tuple[int, ...], strides: tuple[int, ...], padding: str
) -> jnp.ndarray:
    """`nn.max_pool(x, window, strides, padding)` with a gradient of strided slices.

    For overlapping windows (DeepEM3D-Net's 3x3 stride-2 pools). The forward
    pass is `nn.max_pool`'s; the gradient goes, as XLA's select_and_scatter
    (select `>=`) sends it, to the first maximal element of each window in
    row-major tap order: each tap is a strided slice of the (-inf padded)
    input, compared with the output, and the taps' cotangents are summed back
    per stride residue at output resolution (`_scatter_window_taps`), all
    elementwise (XLA:CPU's select_and_scatter and the index-carrying
    reduce-window of its gradient were ~1/5 of DeepEM3D-Net's train step at
    256 x 256; one interior-padded full-size array per tap, ~15 ms of its
    3x3 stride-2 pool on [1, 128, 128, 192], became one 8 ms pass).

    Args:
      x: [batch, *spatial, c].
      window: window per spatial axis.
      strides: stride per spatial axis.
      padding: "SAME" or "VALID".

    Returns:
      [batch, *spatial', c], x's dtype, equal to `nn.max_pool`'s (output and
      gradient).
    """
    return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_windows_fwd(x, window, strides, padding):
    out = max_pool_windows(x, window, strides, padding)
    return out, (x, out)


def _max_pool_windows_bwd(window, strides, padding, residuals, grad_out):
    x, out = residuals
    pads = lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    full_pads = [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)]
    padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype), full_pads)
    slices = _window_taps(out.shape, window, strides)
    taps = [lax.slice(padded, start, limit, step) for start, limit, step in slices]
    cotangents = _first_maximum_cotangents(taps, out, grad_out)
    offsets = [start[1:-1] for start, _, _ in slices]
    grad = _scatter_window_taps(cotangents, offsets, strides, padded.shape)
    inner = tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1], strict=True))
    return (grad[(slice(None), *inner, slice(None))].astype(x.dtype),)


def _scatter_window_taps(cotangents, offsets, strides, padded_shape):
    """Sums each tap's cotangent back onto the padded input it was sliced from.

    Tap a (per axis) of output window i read padded voxel s * i + a. Grouped by
    that voxel's residue r = (s * i + a) mod s, the taps a = r + s * t land on
    block s * (i + t) + r: a shift by t at output resolution. So each residue
    class is a sum of shifted cotangents, and the classes interleave into the
    padded input by a reshape ([batch, m, s, ...] -> [batch, m * s, ...]): one
    pass at output resolution instead of one interior-padded full-size array
    per tap (9 for a 3x3 window), same sums in the same order (bit for bit).

    Args:
      cotangents: per tap, [batch, *spatial', c].
      offsets: per tap, its offset in the window per spatial axis, in the
        order of `cotangents` (`_window_taps`' row-major order).
      strides: per spatial axis.
      padded_shape: [batch, *padded spatial, c].

    Returns:
      [batch, *padded spatial, c].
    """
    batch, *out_spatial, channels = cotangents[0].shape
    # Blocks per axis: enough to hold every window's taps and the padded input.
    blocks = [
        max(-(-size // s), n + max(tap[axis] for tap in offsets) // s)
        for axis, (size, s, n) in enumerate(
            zip(padded_shape[1:-1], strides, out_spatial, strict=True)
        )
    ]
    zero = jnp.zeros((), cotangents[0].dtype)
    classes = []
    for residues in itertools.product(*(range(s) for s in strides)):
        total = jnp.zeros((batch, *blocks, channels), zero.dtype)
        for tap, cotangent in zip(offsets, cotangents, strict=True):
            if any(a % s != r for a, s, r in zip(tap, strides, residues, strict=True)):
                continue
            shifts = [a // s for a, s in zip(tap, strides, strict=True)]
            pad = [(t, m - n - t, 0) for t, m, n in zip(shifts, blocks, out_spatial, strict=True)]
            total = total + lax.pad(cotangent, zero, [(0, 0, 0), *pad, (0, 0, 0)])
        classes.append(total)
    # [batch, *blocks, *strides, c] -> interleave each axis' block and residue.
    ndim = len(strides)
    grad = jnp.stack(classes, axis=-2).reshape(batch, *blocks, *strides, channels)
    order = [0, *itertools.chain(*((1 + d, 1 + ndim + d) for d in range(ndim))), 1 + 2 * ndim]
    grad = grad.transpose(order).reshape(
        batch, *(m * s for m, s in zip(blocks, strides, strict=True)), channels
    )
    return grad[tuple(slice(0, n) for n in padded_shape)]


max_pool_windows.defvjp(_max_pool_windows_fwd, _max_pool_windows_bwd)


def resolve_pool_implementation(implementation: str) -> str:
    """Maps "auto" to "blocks" on CPU (same results as "xla", faster), else "xla"."""
    if implementation not in POOL_IMPLEMENTATIONS:
        raise ConfigError(
            f"pool implementation={implementation!r}; expected one of {POOL_IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        return "blocks" if jax.default_backend() == "cpu" else "xla"
    return implementation


def _checked_factors(x: jnp.ndarray, factors: Sequence[int]) -> tuple[int, int, int]:
    factors = tuple(int(f) for f in factors)
    if len(factors) != 3 or min(factors) < 1:
        raise ConfigError(f"pool factors {factors}; expected three positive integers")
    if x.ndim != 5:
        raise ConfigError(f"max_pool3d input shape {x.shape}; expected [batch, z, y, x, c]")
    return factors


def max_pool3d(x: jnp.ndarray, factors: Sequence[int], implementation: str = "auto") -> jnp.ndarray:
    """Max pooling with window = stride = `factors`, "VALID" (remainders dropped).

    Args:
      x: [batch, z, y, x, c].
      factors: (pz, py, px).
      implementation: one of `POOL_IMPLEMENTATIONS`.

    Returns:
      [batch, z // pz, y // py, x // px, c], equal bit for bit (output and
      gradient) whichever the implementation.
    """
    factors = _checked_factors(x, factors)
    if resolve_pool_implementation(implementation) == "xla":
        return nn.max_pool(x, factors, strides=factors, padding="VALID")
    return max_pool_blocks(x, factors)


def relu_max_pool3d(
    x: jnp.ndarray, factors: Sequence[int], implementation: str = "auto"
) -> jnp.ndarray:
    """`max_pool3d(nn.relu(x), factors, implementation)`, bit for bit (output and
    gradient); "blocks" never writes `relu(x)` (`relu_max_pool_blocks`).

    Args:
      x: [batch, z, y, x, c] pre-activations.
      factors: (pz, py, px).
      implementation: one of `POOL_IMPLEMENTATIONS`.

    Returns:
      [batch, z // pz, y // py, x // px, c].
    """
    factors = _checked_factors(x, factors)
    if resolve_pool_implementation(implementation) == "xla":
        return nn.max_pool(nn.relu(x), factors, strides=factors, padding="VALID")
    return relu_max_pool_blocks(x, factors)


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
