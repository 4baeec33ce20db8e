"""3D convolution as matrix products over the kernel's taps, forward and backward.

XLA's CPU backend runs 3D convolutions, and above all their gradients, on a
slow generic path, while its matrix products reach a good fraction of the
machine's peak. A kz x ky x kx convolution (stride 1, VALID on the padded
input) is computed here as:

1. A = the kx x-shifted windows of the input stacked along channels,
   [voxels, kx*C] (a copy at memory speed);
2. P = A @ W, with the kernel as W [kx*C, kz*ky*F]: each voxel's contribution
   to the outputs it reaches through each (dz, dy) tap;
3. the output = the sum over (dz, dy) of P shifted by (dz, dy).

Only the x taps are stacked on the input side because XLA:CPU copies a
concatenation of a few operands at memory speed but one of 9 or 27 operands
about ten times slower (measured with jax 0.10.2). With very few input
channels (kz*ky*kx*C <= `MAX_FULL_TAP_CHANNELS`, a network's first layer)
all taps are stacked instead: that matrix is small, and the product then
writes F values per voxel rather than kz*ky*F. The backward pass is written
by hand (`jax.custom_vjp`), again as matrix products, so that nothing larger
than the input and kernel is kept from the forward pass:

- grad input: the same computation on the output gradient padded by k - 1,
  with the kernel flipped in space and its C and F axes swapped;
- grad kernel: for each dz, A^T @ G_dz, where G_dz stacks the output gradient
  shifted by each dy, [kx*C, voxels] x [voxels, ky*F], computed as a batch of
  per-z-slice products summed (one product over all voxels is ~5x slower).

To bound memory, large volumes are processed in output z-slabs (static
slices; each slab's intermediates stay under `max_slab_elements` elements).
Low-precision inputs (bfloat16, float16) are multiplied with float32
accumulation (`preferred_element_type`), the result rounded to the input's
dtype; the kernel gradient is summed in float32 before rounding.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from synjax.errors import ConfigError

PADDINGS = ("SAME", "VALID")
# Elements of one z-slab's largest intermediate (P: kz*ky*F values per voxel).
# The paper U-Net's 24-feature layers at 154x154 voxels per z-slice need
# 5 M elements per slice: 64 Mi elements (256 MB in float32) keeps slabs deep
# enough for efficient products and the peak memory of a layer bounded.
MAX_SLAB_ELEMENTS = 64 * 2**20
# Up to this many taps * input channels, all taps are stacked on the input side
# (`_full_taps_conv`): a 3x3x3 kernel on 1 input channel (a network's first
# layer) is 27 values per voxel against 9 * F on the output side.
MAX_FULL_TAP_CHANNELS = 32
# Fewest voxels in one product of the kernel gradient's batch (`_product_groups`).
MIN_PRODUCT_VOXELS = 1024


def same_pad(size: int) -> tuple[int, int]:
    """Low/high padding of lax "SAME" for stride 1 (the extra voxel goes high)."""
    low = (size - 1) // 2
    return low, size - 1 - low


def _accumulation_dtype(dtype: Any) -> Any:
    """float32 for inputs narrower than float32, else the input's own dtype."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.float32
    return dtype


def _z_slabs(out_z: int, elements_per_z: int, max_slab_elements: int) -> list[tuple[int, int]]:
    """Output z ranges [z0, z1) whose intermediate arrays stay within the budget."""
    depth = max(1, min(out_z, max_slab_elements // max(elements_per_z, 1)))
    return [(z0, min(z0 + depth, out_z)) for z0 in range(0, out_z, depth)]


def _x_taps(xp: jnp.ndarray, kx: int) -> jnp.ndarray:
    """The kx x-shifted windows of xp stacked along channels.

    Args:
      xp: [batch, z, y, x, c].
      kx: kernel width.

    Returns:
      [batch, z, y, x - kx + 1, kx*c]; channel dx*c + ci holds xp[..., x + dx, ci].
    """
    if kx == 1:
        return xp
    out_x = xp.shape[3] - kx + 1
    # Only the x taps are stacked: XLA:CPU copies a concatenation of a few
    # operands at memory speed but one of 9 or 27 ten times slower (measured,
    # jax 0.10), so the z and y taps are summed on the output side instead.
    return jnp.concatenate([lax.slice_in_dim(xp, dx, dx + out_x, axis=3) for dx in range(kx)], -1)


def _full_taps(xp: jnp.ndarray, kernel_size: tuple[int, int, int]) -> jnp.ndarray:
    """All kz*ky*kx shifted windows of xp stacked along channels.

    Args:
      xp: [batch, z, y, x, c].
      kernel_size: (kz, ky, kx).

    Returns:
      [batch, z', y', x', kz*ky*kx*c] (VALID output shape); channel
      ((dz*ky + dy)*kx + dx)*c + ci holds xp[:, z + dz, y + dy, x + dx, ci], the
      order of a row-major reshape of a [kz, ky, kx, c, f] kernel.
    """
    batch, channels = xp.shape[0], xp.shape[4]
    out_shape = tuple(n - k + 1 for n, k in zip(xp.shape[1:4], kernel_size, strict=True))
    pieces = [
        lax.slice(
            xp,
            (0, dz, dy, dx, 0),
            (batch, dz + out_shape[0], dy + out_shape[1], dx + out_shape[2], channels),
        )
        for dz, dy, dx in itertools.product(*(range(k) for k in kernel_size))
    ]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, -1)


def _full_taps_conv(xp: jnp.ndarray, kernel: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """VALID 3D cross-correlation as one [voxels, taps*C] x [taps*C, F] product.

    For inputs with few channels (the first layer of a network): all taps are
    stacked on the input side, so the product writes F values per voxel
    rather than the kz*ky*F of `_valid_conv_slab`'s output-side sum.

    Args and result as `_valid_conv_slab`.
    """
    kz, ky, kx, channels, features = kernel.shape
    out = lax.dot_general(
        _full_taps(xp, (kz, ky, kx)),
        kernel.reshape(kz * ky * kx * channels, features),
        (((4,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=_accumulation_dtype(xp.dtype),
    )
    return out.astype(xp.dtype)


def _valid_conv_slab(xp: jnp.ndarray, kernel: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """VALID 3D cross-correlation as one matrix product and a shifted sum.

    With A = the x taps of xp ([voxels, kx*C]), P = A @ W where W is the kernel
    as [kx*C, kz*ky*F] holds, for every voxel, its contribution to each output
    it reaches through a (dz, dy) tap; the output is the sum over (dz, dy) of P
    shifted by (dz, dy) (one elementwise pass).

    Args:
      xp: [batch, z, y, x, c].
      kernel: [kz, ky, kx, c, f], same dtype as xp.
      precision: of the matrix product.

    Returns:
      [batch, z - kz + 1, y - ky + 1, x - kx + 1, f] in xp's dtype.
    """
    kz, ky, kx, channels, features = kernel.shape
    depth, height = xp.shape[1:3]
    out_z, out_y = depth - kz + 1, height - ky + 1
    if kz * ky * kx * channels <= MAX_FULL_TAP_CHANNELS:
        return _full_taps_conv(xp, kernel, precision)
    taps = _x_taps(xp, kx)
    # [kz, ky, kx, c, f] -> [(kx, c), (kz, ky, f)].
    weights = jnp.transpose(kernel, (2, 3, 0, 1, 4)).reshape(kx * channels, kz * ky * features)
    partial = lax.dot_general(
        taps,
        weights,
        (((4,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=_accumulation_dtype(xp.dtype),
    )
    partial = partial.reshape(*partial.shape[:4], kz * ky, features)
    total = None
    for tap, (dz, dy) in enumerate(itertools.product(range(kz), range(ky))):
        term = partial[:, dz : dz + out_z, dy : dy + out_y, :, tap]
        total = term if total is None else total + term
    return total.astype(xp.dtype)


def _product_groups(slices: int, voxels_per_slice: int) -> int:
    """How many products `_sum_of_products` splits its voxels into.

    One per z-slice, unless slices are smaller than `MIN_PRODUCT_VOXELS`:
    then whole slices are merged (the number of groups divides `slices`) until
    each group has at least that many voxels, since every product writes a
    [K, N] result, as large as the work itself when a slice has only K or N
    voxels (a Mask R-CNN box head's 7x7 z-slices took 70x as long as "folded").
    """
    if voxels_per_slice >= MIN_PRODUCT_VOXELS:
        return slices
    most = max(1, slices * voxels_per_slice // MIN_PRODUCT_VOXELS)
    return max(g for g in range(1, most + 1) if slices % g == 0)


def _sum_of_products(a: jnp.ndarray, b: jnp.ndarray, precision: Any) -> jnp.ndarray:
    """a^T @ b over all voxels, as a batch of per-z-slice products summed.

    One product contracting over every voxel ([K, voxels] x [voxels, N], K and
    N small) runs about 5x slower on XLA:CPU than the same work as a batch of
    per-slice products (measured with jax 0.10.2 at [28*154*152, 72] x
    [.., 72]): the single one transposes `a` and cannot split its tiny output
    between threads. Small slices are merged (`_product_groups`).

    Args:
      a: [batch, z, y, x, k].
      b: [batch, z, y, x, n].
      precision: of the products.

    Returns:
      [k, n] in the accumulation dtype.
    """
    slices = a.shape[0] * a.shape[1]
    groups = _product_groups(slices, a.shape[2] * a.shape[3])
    products = lax.dot_general(
        a.reshape(groups, -1, a.shape[4]),
        b.reshape(groups, -1, b.shape[4]),
        (((1,), (1,)), ((0,), (0,))),
        precision=precision,
        preferred_element_type=_accumulation_dtype(a.dtype),
    )
    return products.sum(axis=0)


def _kernel_grad_slab(
    xp: jnp.ndarray, grad_out: jnp.ndarray, kernel_size: tuple[int, int, int], precision: Any
) -> jnp.ndarray:
    """Gradient w.r.t. the kernel of `_valid_conv_slab(xp, kernel)`.

    For each dz, A^T @ G_dz where A is the x taps of xp ([voxels, kx*C]) and
    G_dz stacks, along channels, the output gradient placed at each of the ky
    y offsets (and dz) on xp's grid ([voxels, ky*F]).

    Args:
      xp: [batch, z, y, x, c].
      grad_out: [batch, z - kz + 1, y - ky + 1, x - kx + 1, f].
      kernel_size: (kz, ky, kx).
      precision: of the matrix products.

    Returns:
      [kz, ky, kx, c, f] in the accumulation dtype (float32 for bfloat16 inputs).
    """
    kz, ky, kx = kernel_size
    channels, features = xp.shape[4], grad_out.shape[4]
    if kz * ky * kx * channels <= MAX_FULL_TAP_CHANNELS:
        grad = _sum_of_products(_full_taps(xp, kernel_size), grad_out, precision)
        return grad.reshape(kz, ky, kx, channels, features)
    taps = _x_taps(xp, kx)
    depth, height = xp.shape[1:3]
    padded = jnp.pad(grad_out, ((0, 0), (kz - 1, kz - 1), (ky - 1, ky - 1), (0, 0), (0, 0)))
    per_dz = []
    for dz in range(kz):
        # Entry (z, y) of the dy-th piece is grad_out[z - dz, y - dy] (zero outside).
        pieces = [
            padded[:, kz - 1 - dz : kz - 1 - dz + depth, ky - 1 - dy : ky - 1 - dy + height]
            for dy in range(ky)
        ]
        stacked = pieces[0] if ky == 1 else jnp.concatenate(pieces, -1)
        per_dz.append(_sum_of_products(taps, stacked, precision))
    # [kz, (kx, c), (ky, f)] -> [kz, ky, kx, c, f].
    grad = jnp.stack(per_dz).reshape(kz, kx, channels, ky, features)
    return jnp.transpose(grad, (0, 3, 1, 2, 4))


def _valid_conv(
    xp: jnp.ndarray, kernel: jnp.ndarray, precision: Any, max_slab_elements: int
) -> jnp.ndarray:
    """VALID 3D cross-correlation, in output z-slabs within the memory budget.

    Args:
      xp: [batch, z, y, x, c].
      kernel: [kz, ky, kx, c, f], same dtype as xp.
      precision: of the matrix products.
      max_slab_elements: budget of one slab's largest intermediate array.

    Returns:
      [batch, z - kz + 1, y - ky + 1, x - kx + 1, f] in xp's dtype.
    """
    kz, ky, kx, _, features = kernel.shape
    out_shape = tuple(n - k + 1 for n, k in zip(xp.shape[1:4], (kz, ky, kx), strict=True))
    if min(out_shape) < 1:
        raise ConfigError(
            f"input spatial shape {xp.shape[1:4]} is smaller than kernel {(kz, ky, kx)} (VALID)"
        )
    # The product's output, kz*ky*F values per input voxel, is the largest array.
    per_z = xp.shape[0] * xp.shape[2] * out_shape[2] * kz * ky * features
    slabs = [
        _valid_conv_slab(lax.slice_in_dim(xp, z0, z1 + kz - 1, axis=1), kernel, precision)
        for z0, z1 in _z_slabs(out_shape[0], per_z, max_slab_elements)
    ]
    return slabs[0] if len(slabs) == 1 else jnp.concatenate(slabs, axis=1)


def _kernel_gradient(
    xp: jnp.ndarray,
    grad_out: jnp.ndarray,
    kernel_size: tuple[int, int, int],
    precision: Any,
    max_slab_elements: int,
) -> jnp.ndarray:
    """Gradient of `_valid_conv` w.r.t. the kernel, summed over output z-slabs.

    Args:
      xp: [batch, z, y, x, c], the padded input.
      grad_out: [batch, z', y', x', f], gradient of the output.
      kernel_size: (kz, ky, kx).

    Returns:
      [kz, ky, kx, c, f] in the accumulation dtype.
    """
    kz, ky, kx = kernel_size
    per_z = (
        xp.shape[0]
        * xp.shape[2]
        * grad_out.shape[3]
        * max(kx * xp.shape[4], ky * grad_out.shape[4])
    )
    total = None
    for z0, z1 in _z_slabs(grad_out.shape[1], per_z, max_slab_elements):
        part = _kernel_grad_slab(
            lax.slice_in_dim(xp, z0, z1 + kz - 1, axis=1),
            grad_out[:, z0:z1],
            kernel_size,
            precision,
        )
        total = part if total is None else total + part
    return total


def _pad_spatial(x: jnp.ndarray, pads: list[tuple[int, int]]) -> jnp.ndarray:
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def _input_pads(kernel_size: tuple[int, int, int], padding: str) -> list[tuple[int, int]]:
    if padding == "SAME":
        return [same_pad(k) for k in kernel_size]
    return [(0, 0)] * 3


def input_gradient_problem(
    grad_out: jnp.ndarray, kernel: jnp.ndarray, padding: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The VALID convolution whose output is the input gradient of a stride-1 conv.

    Input voxel i reaches outputs i - k + 1 + low .. i + low (low, high: the
    input's padding), so its gradient is the correlation of the output
    gradient, padded by k - 1 - low below and k - 1 - high above, with the
    kernel flipped in space and its C and F axes swapped.

    Args:
      grad_out: [batch, z', y', x', f].
      kernel: [kz, ky, kx, c, f].
      padding: "SAME" or "VALID" of the forward convolution.

    Returns:
      (padded output gradient [batch, z'', y'', x'', f], kernel [kz, ky, kx, f, c]);
      their VALID correlation has the input's shape.
    """
    kernel_size = kernel.shape[:3]
    pads = _input_pads(kernel_size, padding)
    grad_pads = [
        (k - 1 - low, k - 1 - high) for k, (low, high) in zip(kernel_size, pads, strict=True)
    ]
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    return _pad_spatial(grad_out, grad_pads), flipped


def kernel_gradient(
    x: jnp.ndarray,
    grad_out: jnp.ndarray,
    kernel_size: tuple[int, int, int],
    padding: str,
    precision: Any = None,
    max_slab_elements: int = MAX_SLAB_ELEMENTS,
) -> jnp.ndarray:
    """Gradient w.r.t. the kernel of a stride-1 3D convolution, as tap products.

    Args:
      x: [batch, z, y, x, c], the convolution's input.
      grad_out: [batch, z', y', x', f], gradient of its output (same dtype as x).
      kernel_size: (kz, ky, kx).
      padding: "SAME" or "VALID".
      precision: of the matrix products.
      max_slab_elements: budget of one slab's largest intermediate array.

    Returns:
      [kz, ky, kx, c, f], accumulated in float32 for low-precision inputs (and
      returned in float32 then).
    """
    xp = _pad_spatial(x, _input_pads(kernel_size, padding))
    return _kernel_gradient(xp, grad_out, kernel_size, precision, max_slab_elements)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv3d_taps(x, kernel, padding, precision, max_slab_elements):
    xp = _pad_spatial(x, _input_pads(kernel.shape[:3], padding))
    return _valid_conv(xp, kernel, precision, max_slab_elements)


def _conv3d_taps_fwd(x, kernel, padding, precision, max_slab_elements):
    # Residuals are the input and kernel only: the backward pass rebuilds the
    # x taps (kx-fold the input) rather than holding them until then.
    return _conv3d_taps(x, kernel, padding, precision, max_slab_elements), (x, kernel)


def _conv3d_taps_bwd(padding, precision, max_slab_elements, residuals, grad_out):
    x, kernel = residuals
    grad_out = grad_out.astype(x.dtype)
    padded, flipped = input_gradient_problem(grad_out, kernel, padding)
    grad_x = _valid_conv(padded, flipped, precision, max_slab_elements)
    grad_kernel = kernel_gradient(
        x, grad_out, kernel.shape[:3], padding, precision, max_slab_elements
    )
    return grad_x, grad_kernel.astype(kernel.dtype)


_conv3d_taps.defvjp(_conv3d_taps_fwd, _conv3d_taps_bwd)


def conv3d_taps(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    padding: str,
    precision: Any = None,
    max_slab_elements: int = MAX_SLAB_ELEMENTS,
) -> jnp.ndarray:
    """3D convolution (stride 1) as matrix products over the kernel's taps.

    Equal (up to float rounding) to `lax.conv_general_dilated` with layouts
    NDHWC / DHWIO and the same padding, forward and gradient.

    Args:
      x: [batch, z, y, x, c].
      kernel: [kz, ky, kx, c, f], same dtype as x (bfloat16 inputs are
        multiplied with float32 accumulation).
      padding: "SAME" (zero padding placed as lax's: the extra voxel of an
        even kernel goes high) or "VALID".
      precision: of the matrix products (`lax.Precision` or None).
      max_slab_elements: largest intermediate array built at once, in
        elements; the output is computed in z-slabs to stay within it.

    Returns:
      [batch, z', y', x', f] in x's dtype.
    """
    if padding not in PADDINGS:
        raise ConfigError(f"padding={padding!r}; expected one of {PADDINGS}")
    if x.ndim != 5 or kernel.ndim != 5 or kernel.shape[3] != x.shape[4]:
        raise ConfigError(
            f"input {x.shape} and kernel {kernel.shape}; expected [batch, z, y, x, c] and "
            "[kz, ky, kx, c, f]"
        )
    if max_slab_elements < 1:
        raise ConfigError(f"max_slab_elements={max_slab_elements}; expected >= 1")
    kernel = kernel.astype(x.dtype)
    return _conv3d_taps(x, kernel, padding, precision, max_slab_elements)
