"""Shape and setting checks shared by the detection ops.

The checks read static shapes and Python numbers only, so they run at trace
time inside `jax.jit` and cost nothing on the device.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from synjax.errors import ConfigError, DataError


def check_boxes(op: str, name: str, shape: Sequence[int], ndim: int | None = 2) -> None:
    """Raises DataError unless `shape` is `[..., 6]` (with `ndim` dims when given)."""
    if (ndim is not None and len(shape) != ndim) or not shape or shape[-1] != 6:
        dims = "[n, 6]" if ndim == 2 else "[..., 6]"
        raise DataError(
            f"{op}: {name} have shape {tuple(shape)}; expected {dims} boxes "
            "(z0, y0, x0, z1, y1, x1)"
        )


def check_length(op: str, name: str, shape: Sequence[int], n: int) -> None:
    """Raises DataError unless `shape` is `[n]`."""
    if tuple(shape) != (n,):
        raise DataError(f"{op}: {name} has shape {tuple(shape)}; expected ({n},), one per box")


def positive_int(op: str, name: str, value: int) -> int:
    """`value` if it is an int >= 1, else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ConfigError(f"{op}: {name}={value!r}; expected an integer >= 1")
    return int(value)
