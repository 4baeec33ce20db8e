"""3D convolution that runs as 2D convolutions or matrix products on CPU.

XLA's CPU backend has fast 2D convolutions but slow 3D ones (measured with
jax 0.10: the gradient of a 1x3x3 `nn.Conv` on [2, 8, 64, 64, 8] takes 5x as
long as the same work as a 2D conv with z folded into the batch). A
kz x ky x kx convolution is a ky x kx 2D convolution of the kz z-shifted copies
of the input, either stacked along channels (one 2D conv, kernel
[kz, ky, kx, C, F] -> [ky, kx, kz*C, F]) or convolved separately and summed.
`Conv3D` keeps `nn.Conv`'s parameters (`kernel` [kz, ky, kx, C, F], `bias`
[F]), so the two are interchangeable in checkpoints; on GPU it calls the
native 3D convolution (cuDNN's are fast). A third way, "taps"
(`conv_taps.conv3d_taps`), runs the convolution and its gradient as matrix
products over the kernel's taps, with a hand-written backward pass;
"folded_taps" keeps the folded forward pass and input gradient and takes the
kernel gradient (XLA's slowest part on CPU) from the tap products. "fastest"
picks per backend and per convolution from its static shape, as measured by
benchmarks/bench_conv.py on every network's layers. "onednn"
(`conv_onednn.conv3d_onednn`) calls oneDNN's convolutions through an XLA FFI
call: at the matmul peak on CPU, 2-4x the XLA paths; "auto" and "fastest" take
it on the CPU backend wherever it could be built (`conv_onednn.available()`),
else "folded" ("auto") or the per-shape rule ("fastest"). Every implementation
gives the same result up to float rounding (tests/test_conv_impl.py,
tests/test_conv_onednn.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from synjax.errors import ConfigError
from synjax.geometry import SPATIAL_DIMS, spatial_triple
from synjax.models import conv_onednn
from synjax.models.conv_taps import (
    conv3d_taps,
    input_gradient_problem,
    kernel_gradient,
    same_pad,
)

IMPLEMENTATIONS = (
    "auto",
    "fastest",
    "folded",
    "folded_sum",
    "folded_taps",
    "native",
    "onednn",
    "taps",
)
# "auto" and "fastest" on CPU: "onednn" wherever it is available. On a 2-core AMD
# EPYC (jax 0.10.2, oneDNN 3.2, float32 forward / forward+gradient GFLOP/s of a
# 3x3x3 VALID 72 -> 72 convolution of [1, 10, 74, 74, 72]): onednn 450 / 418,
# "folded_taps" 108 / 134, "native" 101 / 127, "taps" 89 / 124; bfloat16
# onednn 867 / 1038 (XLA converts bfloat16 convolutions to float32 on CPU).
# Without oneDNN, "fastest" on CPU, per convolution from its static shape
# (`resolve_implementation`), measured on the Conv3D layers of every synjax 3D
# network (Mask R-CNN, instance U-Net, pruning CNN, partner U-Net demo and
# paper), forward and gradient:
#   .venv/bin/python benchmarks/bench_conv.py --network-layers --repeats 2
# (results/bench_conv_layers.json; 2-core AMD EPYC, jax 0.10.2, float32, load 5-9
# from other jobs; gradient figures below include the forward pass):
# - a 1x1x1 kernel: "taps" (one matrix product; gradient 2.4 ms against "folded"'s
#   3.4 ms on [2, 32, 24, 24, 8] -> 32);
# - "SAME": "folded". XLA:CPU runs a SAME 2D convolution and its own gradient on
#   its fast path, and that kernel gradient beat the tap products at nearly
#   every SAME layer of Mask R-CNN, the instance U-Net, the pruning CNN and the
#   demo U-Net (e.g. 0.08 s against "folded_taps"' 0.18 s on [2, 8, 128, 128, 8]
#   -> 8); except a first layer of up to `TAPS_MAX_FIRST_LAYER_TAPS` taps on
#   `AUTO_TAPS_MAX_CHANNELS` channel ("taps": all taps stacked, one product;
#   6.7 ms against 8.1 ms on [4, 8, 64, 64, 1] -> 8, 1x3x3);
# - "VALID" (the paper U-Net): "taps" up to `AUTO_TAPS_MAX_CHANNELS` input
#   channels, "folded_taps" above (XLA's VALID 2D convolution is ~5x slower than
#   its SAME one, so both run the SAME one cropped; "folded_taps" takes the
#   kernel gradient from tap products: 0.67 s against "folded"'s 2.1 s and
#   "native"'s 1.5 s on [1, 10, 154, 154, 24] -> 24). Unless the output keeps
#   less than `TAPS_MIN_VALID_OUTPUT_FRACTION` of the input's y-x area (a 3x7x7
#   box head on 3x7x7 ROIs): both then compute mostly voxels cropped away
#   (~20x the needed products), so "folded" (0.05 s against 0.58-0.74 s and
#   "native"'s 0.65 s on [256, 3, 7, 7, 32] -> 64).
# Summed over each network's layers (weighted by use), "fastest" is as fast as
# "folded" (within 0.2%) or faster, and faster than "native", forward and in
# gradient, on every network.
# Thresholds were measured at float32 only (bfloat16 takes the same rule).
# Without oneDNN "auto" maps to "folded" on CPU (what the README's figures were
# made with before "onednn").
AUTO_TAPS_MAX_CHANNELS = 1
TAPS_MAX_FIRST_LAYER_TAPS = 9
TAPS_MIN_VALID_OUTPUT_FRACTION = 0.5
PADDINGS = ("SAME", "VALID")
# Layouts of lax.conv_general_dilated: channels last, kernel spatial-in-out,
# as nn.Conv uses.
_DIMENSION_NUMBERS_2D = ("NHWC", "HWIO", "NHWC")
_DIMENSION_NUMBERS_3D = ("NDHWC", "DHWIO", "NDHWC")


# What "auto" means when set by `auto_implementation`; None picks by backend.
_auto_override: str | None = None


def resolve_implementation(
    implementation: str,
    in_features: int | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    kernel_size: tuple[int, int, int] | None = None,
    padding: str = "SAME",
) -> str:
    """Maps "auto" and "fastest" to an implementation for the backend and shape.

    The one home of the rule. "fastest", the measured fastest on the CPU
    backend (the measurements: see the constants above): "taps" for a 1x1x1
    kernel; for "SAME" padding "folded" (or "taps" for a first layer of at
    most `TAPS_MAX_FIRST_LAYER_TAPS` taps on `AUTO_TAPS_MAX_CHANNELS`
    channel); for "VALID" "taps" up to `AUTO_TAPS_MAX_CHANNELS` input channels
    and "folded_taps" above, unless the output keeps less than
    `TAPS_MIN_VALID_OUTPUT_FRACTION` of the input's y-x area ("folded"). Without `input_shape` and
    `kernel_size` only the channel rule measured on the paper U-Net's large
    VALID layers applies ("taps" up to `AUTO_TAPS_MAX_CHANNELS`, else
    "folded_taps"). "auto": "folded" on the CPU backend. Both are "onednn"
    on the CPU backend wherever it is available (`conv_onednn.available()`,
    faster than all of the above on every layer measured), and "native"
    elsewhere (cuDNN's 3D convolutions are fast). Inside
    `auto_implementation(name)`, "auto" maps to `name` instead.

    Args:
      implementation: one of `IMPLEMENTATIONS`.
      in_features: input channels of the convolution, None if not known.
      input_shape: [batch, z, y, x, c] of the input, None if not known.
      kernel_size: (kz, ky, kx), None if not known.
      padding: "SAME" or "VALID".
    """
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    if implementation == "auto" and _auto_override is not None:
        implementation = _auto_override
    if implementation not in ("auto", "fastest"):
        return implementation
    if jax.default_backend() != "cpu":
        return "native"
    if conv_onednn.available():
        return "onednn"
    if implementation == "auto":
        return "folded"
    if input_shape is not None and kernel_size is not None:
        return _fastest_on_cpu(tuple(input_shape), tuple(kernel_size), padding)
    if in_features is not None and in_features <= AUTO_TAPS_MAX_CHANNELS:
        return "taps"
    return "folded_taps"


def _fastest_on_cpu(
    input_shape: tuple[int, ...], kernel_size: tuple[int, int, int], padding: str
) -> str:
    """The rule of "fastest" on CPU for a known shape (measurements: see the constants)."""
    channels = input_shape[-1]
    if kernel_size == (1, 1, 1):
        return "taps"
    if padding == "SAME":
        taps = kernel_size[0] * kernel_size[1] * kernel_size[2]
        few_taps = taps <= TAPS_MAX_FIRST_LAYER_TAPS
        return "taps" if channels <= AUTO_TAPS_MAX_CHANNELS and few_taps else "folded"
    out_y, out_x = input_shape[2] - kernel_size[1] + 1, input_shape[3] - kernel_size[2] + 1
    if out_y * out_x < TAPS_MIN_VALID_OUTPUT_FRACTION * input_shape[2] * input_shape[3]:
        return "folded"
    return "taps" if channels <= AUTO_TAPS_MAX_CHANNELS else "folded_taps"


@contextlib.contextmanager
def auto_implementation(implementation: str) -> Iterator[None]:
    """Makes every "auto" `Conv3D` traced inside the block use `implementation`.

    For comparing implementations in whole models (benchmarks, tests) whose
    modules do not expose the setting. It acts at trace time: a function that
    `jax.jit` already traced keeps the implementation it was traced with.
    """
    global _auto_override
    if implementation not in IMPLEMENTATIONS or implementation == "auto":
        raise ConfigError(
            f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS[1:]}"
        )
    previous, _auto_override = _auto_override, implementation
    try:
        yield
    finally:
        _auto_override = previous


def _z_slices(x: jnp.ndarray, kz: int, padding: str) -> list[jnp.ndarray]:
    """The kz z-shifted windows of x that a kz-deep kernel sees.

    Args:
      x: [batch, z, y, x, c].
      kz: kernel depth.
      padding: "SAME" pads z with zeros (as nn.Conv) before shifting.

    Returns:
      kz arrays [batch, z', y, x, c]; entry dz is the input at z + dz.
    """
    if padding == "SAME":
        x = jnp.pad(x, ((0, 0), same_pad(kz), (0, 0), (0, 0), (0, 0)))
    out_z = x.shape[1] - kz + 1
    if out_z < 1:
        raise ConfigError(f"input depth {x.shape[1]} is smaller than kernel depth {kz} (VALID)")
    return [lax.slice_in_dim(x, dz, dz + out_z, axis=1) for dz in range(kz)]


def _conv2d(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any, crop_same: bool = False
) -> jnp.ndarray:
    """2D conv of [batch, z, y, x, c] with z folded into batch; kernel [ky, kx, c, f].

    With `crop_same`, a "VALID" conv is computed as the "SAME" one, cropped
    (the faster paths; plain "folded" keeps XLA's "VALID" conv, whose results
    the README's figures hold): XLA:CPU runs a
    "SAME" 2D convolution (and its gradient) on its fast path but a "VALID" one
    about 5x slower (measured with jax 0.10.2 on [16, 64, 64, 72] -> 24
    features, 3x3), and the centre of the "SAME" output is exactly the "VALID"
    output, for the cost of the (k - 1) border voxels.
    """
    batch, depth = x.shape[:2]
    ky, kx = kernel.shape[:2]
    y = lax.conv_general_dilated(
        x.reshape(batch * depth, *x.shape[2:]),
        kernel,
        window_strides=(1, 1),
        padding="SAME" if crop_same else padding,
        dimension_numbers=_DIMENSION_NUMBERS_2D,
        precision=precision,
    )
    if padding == "VALID" and crop_same:
        (low_y, _), (low_x, _) = same_pad(ky), same_pad(kx)
        out_y, out_x = x.shape[2] - ky + 1, x.shape[3] - kx + 1
        if out_y < 1 or out_x < 1:
            raise ConfigError(
                f"input (y, x) {x.shape[2:4]} is smaller than kernel (ky, kx) {(ky, kx)} (VALID)"
            )
        y = y[:, low_y : low_y + out_y, low_x : low_x + out_x]
    return y.reshape(batch, depth, *y.shape[1:])


def conv3d_folded(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    padding: str,
    precision: Any = None,
    crop_same: bool = False,
) -> jnp.ndarray:
    """3D convolution (stride 1) as one 2D conv over z-shifted copies stacked on channels.

    Args:
      x: [batch, z, y, x, c].
      kernel: [kz, ky, kx, c, f].
      padding: "SAME" or "VALID".
      precision: passed to `lax.conv_general_dilated`.
      crop_same: a "VALID" 2D conv as the cropped "SAME" one (`_conv2d`).

    Returns:
      [batch, z', y', x', f], equal to the 3D cross-correlation of nn.Conv.
    """
    kz, ky, kx, c, f = kernel.shape
    slices = _z_slices(x, kz, padding)
    stacked = slices[0] if kz == 1 else jnp.concatenate(slices, axis=-1)
    # Channel index of `stacked` is dz * c + channel, so kz goes before c.
    kernel_2d = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(ky, kx, kz * c, f)
    return _conv2d(stacked, kernel_2d, padding, precision, crop_same)


def conv3d_folded_sum(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any = None
) -> jnp.ndarray:
    """3D convolution (stride 1) as the sum of kz 2D convs of z-shifted copies.

    Same arguments and result as `conv3d_folded`; uses kz-fold less memory for
    the stacked input, at the cost of kz smaller convolutions.
    """
    slices = _z_slices(x, kernel.shape[0], padding)
    terms = [_conv2d(s, kernel[dz], padding, precision) for dz, s in enumerate(slices)]
    return sum(terms[1:], terms[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3d_folded_taps(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any = None
) -> jnp.ndarray:
    """`conv3d_folded` whose kernel gradient is computed as tap matrix products.

    Forward pass and input gradient are folded 2D convolutions (XLA:CPU's fast
    path); the kernel gradient, where XLA's generic gradient of the 2D
    convolution is slowest, is `conv_taps.kernel_gradient`. Same arguments and
    result as `conv3d_folded`.
    """
    return conv3d_folded(x, kernel, padding, precision, crop_same=True)


def _folded_taps_fwd(x, kernel, padding, precision):
    return conv3d_folded(x, kernel, padding, precision, crop_same=True), (x, kernel)


def _folded_taps_bwd(padding, precision, residuals, grad_out):
    x, kernel = residuals
    grad_out = grad_out.astype(x.dtype)
    padded, flipped = input_gradient_problem(grad_out, kernel, padding)
    grad_x = conv3d_folded(padded, flipped, "VALID", precision, crop_same=True)
    grad_kernel = kernel_gradient(x, grad_out, kernel.shape[:3], padding, precision)
    return grad_x, grad_kernel.astype(kernel.dtype)


conv3d_folded_taps.defvjp(_folded_taps_fwd, _folded_taps_bwd)


def conv3d_native(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any = None
) -> jnp.ndarray:
    """3D convolution (stride 1) with XLA's own 3D convolution, as nn.Conv."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * SPATIAL_DIMS,
        padding=padding,
        dimension_numbers=_DIMENSION_NUMBERS_3D,
        precision=precision,
    )


_CONV_FNS = {
    "folded": conv3d_folded,
    "folded_sum": conv3d_folded_sum,
    "folded_taps": conv3d_folded_taps,
    "native": conv3d_native,
    "onednn": conv_onednn.conv3d_onednn,
    "taps": conv3d_taps,
}


def kernel_and_bias(module: nn.Module, kernel_shape: tuple[int, ...]) -> tuple[Any, Any]:
    """A convolution module's `kernel` and, if `module.use_bias`, `bias` [features]
    parameters, declared as flax's nn.Conv declares them (names, initialisers,
    `param_dtype`), so checkpoints carry over. Call inside `nn.compact`.

    Args:
      module: the module, with `kernel_init`, `bias_init`, `param_dtype`,
        `use_bias` and `features`.
      kernel_shape: the kernel's shape, features last.

    Returns:
      (kernel, bias or None).
    """
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    if not module.use_bias:
        return kernel, None
    return kernel, module.param("bias", module.bias_init, (module.features,), module.param_dtype)


class Conv3D(nn.Module):
    """Drop-in `nn.Conv` for 3D volumes (stride 1) that is fast on CPU.

    Parameters are those of `nn.Conv(features, kernel_size)`: `kernel`
    [kz, ky, kx, in_features, features] and `bias` [features]; the same
    parameters give the same output (up to float rounding).

    Attributes:
      features: output channels.
      kernel_size: (kz, ky, kx).
      padding: "SAME" (output shape = input shape, zero padding placed as
        nn.Conv does) or "VALID" (each axis shrinks by k - 1).
      use_bias: whether to add a learned bias.
      dtype: computation dtype, None to promote input and parameters.
      param_dtype: dtype of the parameters.
      precision: passed to `lax.conv_general_dilated` (or the tap products).
      kernel_init: kernel initialiser (nn.Conv's default, LeCun normal).
      bias_init: bias initialiser (zeros, as nn.Conv).
      implementation: "auto" ("onednn" on the CPU backend where it is
        available, else "folded"; "native" elsewhere), "fastest" ("onednn"
        on the CPU backend where available, else the measured fastest XLA path
        for this convolution's shape, `resolve_implementation`; "native"
        elsewhere), "onednn" (oneDNN's convolutions through an FFI call,
        CPU only, float32/bfloat16), "folded" (one 2D conv on z-shifted copies stacked
        along channels), "folded_sum" (sum of kz 2D convs), "folded_taps"
        ("folded" with the kernel gradient as tap matrix products), "native"
        (XLA 3D conv) or "taps" (matrix products over the kernel taps, forward and
        backward; bfloat16 inputs accumulate in float32).
    """

    features: int
    kernel_size: tuple[int, int, int]
    padding: str = "SAME"
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x [batch, z, y, x, c]. Returns [batch, z', y', x', features]."""
        kernel_size = spatial_triple(self.kernel_size, "kernel_size")
        padding = self.padding.upper() if isinstance(self.padding, str) else self.padding
        if padding not in PADDINGS:
            raise ConfigError(f"padding={self.padding!r}; expected one of {PADDINGS}")
        if x.ndim != SPATIAL_DIMS + 2:
            raise ConfigError(f"input shape {x.shape}; expected [batch, z, y, x, channels]")
        if padding == "VALID":
            axes = zip(("depth", "height", "width"), x.shape[1:4], kernel_size, strict=True)
            for name, size, k in axes:
                if size < k:
                    raise ConfigError(
                        f"input {name} {size} is smaller than kernel {name} {k} (VALID)"
                    )
        implementation = resolve_implementation(
            self.implementation,
            x.shape[-1],
            input_shape=x.shape,
            kernel_size=kernel_size,
            padding=padding,
        )

        kernel, bias = kernel_and_bias(self, (*kernel_size, x.shape[-1], self.features))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if (
            implementation == "onednn"
            and self.implementation != "onednn"
            and x.dtype not in conv_onednn.SUPPORTED_DTYPES
        ):
            # oneDNN takes float32 and bfloat16; other dtypes (float16) get XLA's path.
            implementation = _fastest_on_cpu(x.shape, kernel_size, padding)
        y = _CONV_FNS[implementation](x, kernel, padding, self.precision)
        if bias is not None:
            y = add_bias(y, bias)
        return y


def channel_sum(values: jnp.ndarray) -> jnp.ndarray:
    """Sum over every axis but the last, as a ones-vector product accumulated in float32.

    For gradients of per-channel parameters (bias, PReLU slope) below float32:
    XLA:CPU reduces a bfloat16 [1, 30, 154, 154, 24] over its first four axes
    as windowed reductions that took ~0.1 s each (a third of the paper U-Net's
    bfloat16 train step); a product reads the data once.

    Args:
      values: [..., channels].

    Returns:
      [channels] float32.
    """
    rows = values.reshape(-1, values.shape[-1])
    return jnp.dot(jnp.ones((rows.shape[0],), rows.dtype), rows, preferred_element_type=jnp.float32)


def add_bias(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """`y + bias` over the last axis; below float32 the bias gradient is `channel_sum`.

    float32 keeps autodiff's sum (what every trained figure was made with).

    Args:
      y: [..., features].
      bias: [features].
    """
    if y.dtype == jnp.float32:
        return y + bias
    return _add_bias_by_product(y, bias)


@jax.custom_vjp
def _add_bias_by_product(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, grad):
    return grad, channel_sum(grad).astype(grad.dtype)


_add_bias_by_product.defvjp(_add_bias_fwd, _add_bias_bwd)


def conv_transpose3d_blocks(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """`nn.ConvTranspose` with kernel = strides, "VALID", as one einsum.

    Each input voxel maps to its own fz x fy x fx output block, so the
    transposed convolution is a matrix product and a reshape; XLA's CPU 3D
    transposed convolution is over 10x slower. Flax's ConvTranspose
    (transpose_kernel=False) applies the kernel flipped in space.

    Args:
      x: [batch, z, y, x, c].
      kernel: [fz, fy, fx, c, f].

    Returns:
      [batch, z*fz, y*fy, x*fx, f].
    """
    flipped = kernel[::-1, ::-1, ::-1]
    y = jnp.einsum("nzyxc,abdcf->nzaybxdf", x, flipped)
    batch, depth, fz, height, fy, width, fx, features = y.shape
    return y.reshape(batch, depth * fz, height * fy, width * fx, features)


class ConvTranspose3D(nn.Module):
    """Drop-in `nn.ConvTranspose(features, factors, strides=factors, padding="VALID")`.

    Same parameters (`kernel` [fz, fy, fx, in_features, features], `bias`
    [features]) and output; "auto"/"folded" run one einsum (fast on CPU),
    "native" XLA's transposed convolution.

    Attributes:
      features: output channels.
      factors: (fz, fy, fx) up-sampling factors (kernel size = strides).
      use_bias: whether to add a learned bias.
      dtype: computation dtype, None to promote input and parameters.
      param_dtype: dtype of the parameters.
      kernel_init: kernel initialiser (nn.ConvTranspose's default).
      bias_init: bias initialiser (zeros).
      implementation: as `Conv3D.implementation` ("folded_sum" = "folded").
    """

    features: int
    factors: tuple[int, int, int]
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    implementation: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Args: x [batch, z, y, x, c]. Returns [batch, z*fz, y*fy, x*fx, features]."""
        factors = spatial_triple(self.factors, "factors")
        kernel, bias = kernel_and_bias(self, (*factors, x.shape[-1], self.features))
        x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
        if resolve_implementation(self.implementation) == "native":
            y = lax.conv_transpose(
                x, kernel, factors, "VALID", dimension_numbers=_DIMENSION_NUMBERS_3D
            )
        else:
            y = conv_transpose3d_blocks(x, kernel)
        if bias is not None:
            y = y + bias
        return y
