"""3D convolutions through oneDNN on the CPU backend, as JAX FFI calls.

XLA:CPU keeps 3D convolutions on a generic path (about a quarter of the
matmul peak on a 2-core AMD EPYC, jax 0.10.2) and has no oneDNN convolution
rewrite in its current runtime; oneDNN's brgemm convolutions, which PyTorch
calls, reach the matmul peak (measured on a 3x3x3 VALID 72 -> 72 convolution
of [1, 10, 74, 74, 72]: XLA 101 GFLOP/s, this path 450, PyTorch channels-last
442). `conv_onednn` calls oneDNN's forward, backward-data and backward-weights
convolutions (any stride, kernel dilation and zero padding) on JAX's own
layouts ([batch, z, y, x, c] and [kz, ky, kx, c, f], no transposes) with a
custom VJP; `conv3d_onednn` is its stride-1 "SAME"/"VALID" form (`Conv3D`), and
`conv_transpose_onednn` computes `lax.conv_transpose` as a strided
convolution's input gradient, without the zeros XLA multiplies (2D problems
run as 3D ones with one z slice: `conv_dropin`).

The C++ handlers (`conv_onednn.cc` beside this file) are compiled on first use
with the system's C++ compiler against the headers of the `onednn-devel-cpu-gomp`
wheel and of jaxlib, into a per-user cache folder keyed by the source, the
compiler flags and the jaxlib version (`SYNJAX_EXTENSION_CACHE` overrides the
folder), and reused after. Where it cannot be built or loaded (no compiler, no
oneDNN, another CPU architecture), `available()` is False and `unavailable_reason()`
says why in one line; `Conv3D` then falls back to XLA's paths
(`conv.resolve_implementation`).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from synjax.errors import ConfigError

SOURCE = pathlib.Path(__file__).with_name("conv_onednn.cc")
LIBRARY_NAME = "libsynjax_conv_onednn.so"
# The FFI targets registered with XLA, and the C symbols that implement them.
TARGETS = {
    "synjax_conv3d_onednn_forward": "SynjaxConv3dForward",
    "synjax_conv3d_onednn_backward_data": "SynjaxConv3dBackwardData",
    "synjax_conv3d_onednn_backward_weights": "SynjaxConv3dBackwardWeights",
}
COMPILE_FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _cache_root() -> pathlib.Path:
    override = os.environ.get("SYNJAX_EXTENSION_CACHE")
    if override:
        return pathlib.Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "synjax" / "extensions"


def _onednn_prefix() -> pathlib.Path | None:
    """The installation prefix whose include/ and lib/ hold oneDNN (the wheels' data dir)."""
    for prefix in (sysconfig.get_paths()["data"], sys.prefix, "/usr/local", "/usr"):
        root = pathlib.Path(prefix)
        if (root / "include" / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any(
            (root / "lib").glob("libdnnl.so*")
        ):
            return root
    return None


def _build(prefix: pathlib.Path) -> pathlib.Path:
    """Compiles the handlers into the cache (once per source/flags/jaxlib), returns the .so.

    Raises:
      RuntimeError: one line naming the step that failed.
    """
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH to build conv_onednn.cc")
    include = jax.ffi.include_dir()
    command = [
        compiler,
        *COMPILE_FLAGS,
        f"-I{include}",
        f"-I{prefix / 'include'}",
        str(SOURCE),
        f"-L{prefix / 'lib'}",
        "-ldnnl",
        f"-Wl,-rpath,{prefix / 'lib'}",
    ]
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(command).encode() + jax.__version__.encode()
    ).hexdigest()[:16]
    folder = _cache_root() / f"conv_onednn-{key}"
    library = folder / LIBRARY_NAME
    if library.exists():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    # Several processes (pytest-xdist workers, Dask workers) may build at once:
    # one builds under the lock, the others find the finished library.
    with open(folder / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.exists():
            return library
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = pathlib.Path(scratch) / LIBRARY_NAME
            result = subprocess.run(
                [*command, "-o", str(built)], capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                first_error = next(
                    (line for line in result.stderr.splitlines() if "error" in line),
                    result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "",
                )
                raise RuntimeError(f"building {SOURCE.name} failed: {first_error}")
            os.replace(built, library)
    return library


@functools.cache
def _load() -> tuple[bool, str]:
    """Builds, loads and registers the FFI targets once per process: (ok, reason if not).

    A failure is logged once, since 3D networks then run 2-4x slower on CPU.
    """
    ok, reason = _build_and_register()
    if not ok:
        logging.warning("oneDNN convolutions unavailable (XLA's are used instead): %s", reason)
    return ok, reason


def _build_and_register() -> tuple[bool, str]:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False, f"oneDNN convolutions are built for Linux x86-64, not {platform.machine()}"
    prefix = _onednn_prefix()
    if prefix is None:
        return False, "oneDNN is not installed (pip install onednn-cpu-gomp onednn-devel-cpu-gomp)"
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(prefix)))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
            )
    except (OSError, RuntimeError, AttributeError) as error:
        return False, str(error).splitlines()[0] if str(error) else type(error).__name__
    return True, ""


def available() -> bool:
    """Whether the oneDNN convolution is built and registered (builds it on first call)."""
    return _load()[0]


def unavailable_reason() -> str:
    """One line on why `available()` is False ("" when it is True)."""
    return _load()[1]


class Geometry(NamedTuple):
    """Strides, kernel dilation (lax's: 1 = none) and low/high zero padding per axis (z, y, x)."""

    strides: tuple[int, int, int]
    dilation: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]


def padding_amounts(
    kernel_size: tuple[int, ...], padding: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Low and high zero padding per axis, placed as `lax.conv_general_dilated` does (stride 1).

    "SAME" pads k - 1 in all, the extra voxel of an even kernel on the high side.
    """
    if padding == "VALID":
        return (0, 0, 0), (0, 0, 0)
    low = tuple((k - 1) // 2 for k in kernel_size)
    return low, tuple(k - 1 - lo for k, lo in zip(kernel_size, low, strict=True))


def output_spatial(
    input_spatial: tuple[int, ...], kernel_spatial: tuple[int, ...], geometry: Geometry
) -> tuple[int, ...]:
    """Output size per axis of a convolution: floor((in + pads - dilated k) / s) + 1."""
    return tuple(
        (size + lo + hi - ((k - 1) * d + 1)) // s + 1
        for size, k, s, d, lo, hi in zip(input_spatial, kernel_spatial, *geometry, strict=True)
    )


def _call(target: str, out_shape: tuple[int, ...], dtype: Any, *operands, geometry: Geometry):
    # Under vmap (the instance U-Net's per-example heads) one call per example:
    # correct for any batching of x and kernel.
    call = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, dtype), vmap_method="sequential"
    )
    attributes = {name: np.asarray(value, np.int64) for name, value in geometry._asdict().items()}
    return call(*operands, **attributes)


def _forward(x, kernel, geometry: Geometry, out_shape=None):
    if out_shape is None:
        spatial = output_spatial(x.shape[1:4], kernel.shape[:3], geometry)
        out_shape = (x.shape[0], *spatial, kernel.shape[4])
    return _call("synjax_conv3d_onednn_forward", out_shape, x.dtype, x, kernel, geometry=geometry)


def _backward_data(grad_y, kernel, geometry: Geometry, x_shape):
    return _call(
        "synjax_conv3d_onednn_backward_data",
        x_shape,
        grad_y.dtype,
        grad_y,
        kernel,
        geometry=geometry,
    )


def _backward_weights(x, grad_y, geometry: Geometry, kernel_shape):
    return _call(
        "synjax_conv3d_onednn_backward_weights",
        kernel_shape,
        x.dtype,
        x,
        grad_y,
        geometry=geometry,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x: jnp.ndarray, kernel: jnp.ndarray, geometry: Geometry) -> jnp.ndarray:
    return _forward(x, kernel, geometry)


def _conv_fwd(x, kernel, geometry):
    return _forward(x, kernel, geometry), (x, kernel)


def _conv_bwd(geometry, residuals, grad_y):
    x, kernel = residuals
    grad_y = grad_y.astype(x.dtype)
    return (
        _backward_data(grad_y, kernel, geometry, x.shape),
        _backward_weights(x, grad_y, geometry, kernel.shape),
    )


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_adjoint(
    y: jnp.ndarray, kernel: jnp.ndarray, geometry: Geometry, x_shape: tuple[int, ...]
) -> jnp.ndarray:
    """The adjoint of `_conv` in x (its input gradient) applied to y: a transposed convolution."""
    return _backward_data(y, kernel, geometry, x_shape)


def _conv_adjoint_fwd(y, kernel, geometry, x_shape):
    return _backward_data(y, kernel, geometry, x_shape), (y, kernel)


def _conv_adjoint_bwd(geometry, x_shape, residuals, grad_x):
    # <adjoint(y, k), g> = <conv(g, k), y>: linear in y with adjoint conv(., k),
    # and in k the weight gradient of conv at input g and output gradient y.
    y, kernel = residuals
    grad_x = grad_x.astype(y.dtype)
    return (
        _forward(grad_x, kernel, geometry, out_shape=y.shape),
        _backward_weights(grad_x, y, geometry, kernel.shape),
    )


_conv_adjoint.defvjp(_conv_adjoint_fwd, _conv_adjoint_bwd)


def _check(x: jnp.ndarray, kernel: jnp.ndarray, what: str) -> None:
    if not available():
        raise ConfigError(f"{what} implementation 'onednn': {unavailable_reason()}")
    if x.dtype != kernel.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ConfigError(
            f"{what} implementation 'onednn': input {x.dtype} and kernel {kernel.dtype}; "
            "expected both float32 or both bfloat16"
        )


def conv_onednn(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] = (1, 1, 1),
) -> jnp.ndarray:
    """3D convolution by oneDNN, forward and gradient, on the CPU backend.

    Equal (up to float rounding) to `lax.conv_general_dilated(x, kernel,
    strides, padding, rhs_dilation=dilation)` with layouts NDHWC / DHWIO.
    oneDNN accumulates in float32; a bfloat16 input and kernel give a bfloat16
    output (and bfloat16 gradients).

    Args:
      x: [batch, z, y, x, c], float32 or bfloat16.
      kernel: [kz, ky, kx, c, f], the same dtype as x.
      strides: 3 window strides.
      padding: 3 (low, high) zero paddings.
      dilation: 3 kernel dilations (1 = none).

    Returns:
      [batch, z', y', x', f] in x's dtype.

    Raises:
      ConfigError: oneDNN is not available here (the reason), or a dtype other
        than float32/bfloat16.
    """
    _check(x, kernel, "convolution")
    lo, hi = zip(*padding, strict=True)
    return _conv(x, kernel, Geometry(tuple(strides), tuple(dilation), lo, hi))


def conv3d_onednn(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any = None
) -> jnp.ndarray:
    """`conv_onednn` with stride 1 and "SAME" or "VALID" padding (`Conv3D`'s signature).

    Args:
      x: [batch, z, y, x, c], float32 or bfloat16.
      kernel: [kz, ky, kx, c, f], the same dtype as x.
      padding: "SAME" or "VALID".
      precision: ignored (oneDNN computes float32 at full precision).

    Returns:
      [batch, z', y', x', f] in x's dtype.
    """
    _check(x, kernel, "Conv3D")
    lo, hi = padding_amounts(kernel.shape[:3], padding)
    return _conv(x, kernel, Geometry((1, 1, 1), (1, 1, 1), lo, hi))


def transpose_padding(kernel: int, stride: int, dilation: int, padding: str) -> tuple[int, int]:
    """`lax.conv_transpose`'s zero padding of the stride-dilated input for "SAME"/"VALID".

    The rule of jax's `_conv_transpose_padding` on the dilated kernel extent
    (tests compare the outputs with `lax.conv_transpose`).
    """
    k = (kernel - 1) * dilation + 1
    if padding == "SAME":
        total = k + stride - 2
        low = k - 1 if stride > k - 1 else -(-total // 2)
    elif padding == "VALID":
        total = k + stride - 2 + max(k - stride, 0)
        low = k - 1
    else:
        raise ConfigError(f"padding={padding!r}; expected 'SAME' or 'VALID'")
    return low, total - low


def conv_transpose_onednn(
    x: jnp.ndarray,
    kernel: jnp.ndarray,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] = (1, 1, 1),
) -> jnp.ndarray:
    """`lax.conv_transpose` (transpose_kernel=False) by oneDNN, forward and gradient.

    lax computes it as a convolution of x dilated by the strides (zeros
    between voxels) with `kernel`, zero-padded by `padding` (`transpose_padding`
    for "SAME"/"VALID"); most of that work multiplies zeros. The same result is
    the input gradient (backward data) of a strided convolution with the kernel
    flipped in space and its channel axes swapped, at low padding k' - 1 - low
    (k' the dilated kernel extent), which oneDNN computes without the zeros.

    Args:
      x: [batch, z, y, x, c], float32 or bfloat16.
      kernel: [kz, ky, kx, c, f], the same dtype as x.
      strides: 3 strides (up-sampling factors).
      padding: 3 (low, high) paddings, as `lax.conv_transpose` takes them.
      dilation: 3 kernel dilations (1 = none).

    Returns:
      [batch, (z-1)*sz + 1 + lo + hi - k'z + 1, ..., f] in x's dtype.

    Raises:
      ConfigError: oneDNN unavailable, a dtype other than float32/bfloat16, or
        padding that leaves the strided convolution's high padding negative.
    """
    _check(x, kernel, "transposed convolution")
    spatial, pad_lo, pad_hi = [], [], []
    for size, k, s, d, (lo, hi) in zip(
        x.shape[1:4], kernel.shape[:3], strides, dilation, padding, strict=True
    ):
        extent = (k - 1) * d + 1
        out = (size - 1) * s + 1 + lo + hi - extent + 1
        low = extent - 1 - lo
        # The strided convolution maps `out` voxels to exactly `size`.
        high = (size - 1) * s + extent - out - low
        if low < 0 or high < 0:
            raise ConfigError(
                f"transposed convolution padding {tuple(padding)}: as oneDNN's strided "
                f"convolution it needs padding ({low}, {high}) on an axis; expected >= 0"
            )
        spatial.append(out)
        pad_lo.append(low)
        pad_hi.append(high)
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)  # [kz, ky, kx, f, c]
    geometry = Geometry(tuple(strides), tuple(dilation), tuple(pad_lo), tuple(pad_hi))
    return _conv_adjoint(x, flipped, geometry, (x.shape[0], *spatial, kernel.shape[4]))
