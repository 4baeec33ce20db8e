"""3D convolution through oneDNN on the CPU backend, as a JAX FFI call.

XLA:CPU keeps 3D convolutions on a generic path (about a quarter of the
matmul peak on a 2-core AMD EPYC, jax 0.10.2) and has no oneDNN convolution
rewrite in its current runtime; oneDNN's brgemm convolutions, which PyTorch
calls, reach the matmul peak (measured on a 3x3x3 VALID 72 -> 72 convolution
of [1, 10, 74, 74, 72]: XLA 101 GFLOP/s, this path 450, PyTorch channels-last
442). `conv3d_onednn` calls oneDNN's forward, backward-data and
backward-weights convolutions on JAX's own layouts ([batch, z, y, x, c] and
[kz, ky, kx, c, f], no transposes) with a custom VJP.

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
from typing import Any

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


def _call(target: str, out_shape: tuple[int, ...], dtype: Any, *operands, padding, kernel_size):
    low, high = padding_amounts(kernel_size, padding)
    # Under vmap (the instance U-Net's per-example heads) one call per example:
    # correct for any batching of x and kernel.
    call = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, dtype), vmap_method="sequential"
    )
    return call(*operands, pad_lo=np.asarray(low, np.int64), pad_hi=np.asarray(high, np.int64))


def _forward(x: jnp.ndarray, kernel: jnp.ndarray, padding: str) -> jnp.ndarray:
    low, high = padding_amounts(kernel.shape[:3], padding)
    spatial = tuple(x.shape[1 + i] + low[i] + high[i] - kernel.shape[i] + 1 for i in range(3))
    out_shape = (x.shape[0], *spatial, kernel.shape[4])
    return _call(
        "synjax_conv3d_onednn_forward",
        out_shape,
        x.dtype,
        x,
        kernel,
        padding=padding,
        kernel_size=kernel.shape[:3],
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv3d(x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any) -> jnp.ndarray:
    return _forward(x, kernel, padding)


def _conv3d_fwd(x, kernel, padding, precision):
    return _forward(x, kernel, padding), (x, kernel)


def _conv3d_bwd(padding, precision, residuals, grad_out):
    x, kernel = residuals
    grad_out = grad_out.astype(x.dtype)
    grad_x = _call(
        "synjax_conv3d_onednn_backward_data",
        x.shape,
        x.dtype,
        grad_out,
        kernel,
        padding=padding,
        kernel_size=kernel.shape[:3],
    )
    grad_kernel = _call(
        "synjax_conv3d_onednn_backward_weights",
        kernel.shape,
        kernel.dtype,
        x,
        grad_out,
        padding=padding,
        kernel_size=kernel.shape[:3],
    )
    return grad_x, grad_kernel


_conv3d.defvjp(_conv3d_fwd, _conv3d_bwd)


def conv3d_onednn(
    x: jnp.ndarray, kernel: jnp.ndarray, padding: str, precision: Any = None
) -> jnp.ndarray:
    """3D convolution (stride 1) by oneDNN, forward and gradient, on the CPU backend.

    Equal (up to float rounding) to `lax.conv_general_dilated` with layouts
    NDHWC / DHWIO and the same padding. oneDNN accumulates in float32; a
    bfloat16 input and kernel give a bfloat16 output (and bfloat16 gradients).

    Args:
      x: [batch, z, y, x, c], float32 or bfloat16.
      kernel: [kz, ky, kx, c, f], the same dtype as x.
      padding: "SAME" or "VALID".
      precision: ignored (oneDNN computes float32 at full precision).

    Returns:
      [batch, z', y', x', f] in x's dtype.

    Raises:
      ConfigError: oneDNN is not available here (the reason), or a dtype other
        than float32/bfloat16.
    """
    if not available():
        raise ConfigError(f"Conv3D implementation 'onednn': {unavailable_reason()}")
    if x.dtype != kernel.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ConfigError(
            f"Conv3D implementation 'onednn': input {x.dtype} and kernel {kernel.dtype}; "
            "expected both float32 or both bfloat16"
        )
    return _conv3d(x, kernel, padding, precision)
