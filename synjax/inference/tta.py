"""16-fold test-time augmentation (DeepEM3D, Zeng et al. 2017).

The transforms are {identity, x mirror} x {rotation by 0, 90, 180, 270 degrees
in yx} x {identity, z flip}. Forward order: x mirror, then rotation, then z
flip; `invert_transform` undoes them in reverse order.

Arrays are channels-last with y and x at axes -3 and -2:

* inputs `[batch, s, y, x, c]` (5D): the z flip reverses the slice order;
* outputs `[batch, y, x, c]` (4D, the centre slice's prediction): no z axis,
  so the z flip leaves them alone (the centre of a reversed stack is the same
  slice).

Rotations by 90 and 270 degrees swap y and x, so they need y == x: pad to a
square (as `synjax.inference.slicewise` does) or use `TRANSFORMS_NO_TRANSPOSE`
(the 8 transforms with rotations by 0 and 180 only).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from synjax.errors import DataError

Y_AXIS, X_AXIS = -3, -2
Z_AXIS_5D = 1
QUARTER_TURNS = 4


class Transform(NamedTuple):
    """One test-time transform.

    Attributes:
      mirror_x: reverse the x axis first.
      quarter_turns: then rotate by 90 degrees this many times in the yx plane
        (`jnp.rot90` with axes (y, x)).
      flip_z: then reverse the slice axis (5D arrays only).
    """

    mirror_x: bool
    quarter_turns: int
    flip_z: bool


TRANSFORMS: tuple[Transform, ...] = tuple(
    Transform(m, k, f) for m in (False, True) for k in range(QUARTER_TURNS) for f in (False, True)
)
TRANSFORMS_NO_TRANSPOSE: tuple[Transform, ...] = tuple(
    t for t in TRANSFORMS if t.quarter_turns % 2 == 0
)
IDENTITY = Transform(False, 0, False)


def _spatial_axes(x) -> tuple[int, int]:
    return x.ndim + Y_AXIS, x.ndim + X_AXIS


def apply_transform(x: jax.Array, t: Transform) -> jax.Array:
    """Applies `t` to `[batch, s, y, x, c]` (5D) or `[batch, y, x, c]` (4D)."""
    y_ax, x_ax = _spatial_axes(x)
    if t.mirror_x:
        x = jnp.flip(x, axis=x_ax)
    x = jnp.rot90(x, k=t.quarter_turns, axes=(y_ax, x_ax))
    if t.flip_z and x.ndim == 5:
        x = jnp.flip(x, axis=Z_AXIS_5D)
    return x


def invert_transform(y: jax.Array, t: Transform) -> jax.Array:
    """Undoes `apply_transform(., t)` on a 5D input-like or 4D output-like array."""
    y_ax, x_ax = _spatial_axes(y)
    if t.flip_z and y.ndim == 5:
        y = jnp.flip(y, axis=Z_AXIS_5D)
    y = jnp.rot90(y, k=-t.quarter_turns, axes=(y_ax, x_ax))
    if t.mirror_x:
        y = jnp.flip(y, axis=x_ax)
    return y


def check_transforms(shape: Sequence[int], transforms: Sequence[Transform]) -> None:
    """Raises `DataError` when a transform cannot apply to an array of `shape`."""
    if not transforms:
        raise DataError("test-time augmentation: expected at least one transform")
    ny, nx = shape[Y_AXIS], shape[X_AXIS]
    if ny != nx and any(t.quarter_turns % 2 for t in transforms):
        raise DataError(
            f"test-time augmentation: yx {ny}x{nx} is not square, so 90/270-degree "
            "rotations do not apply: pad to a square or use TRANSFORMS_NO_TRANSPOSE"
        )


def _tta(apply_fn, transforms, x):
    batch = x.shape[0]
    stacked = jnp.concatenate([apply_transform(x, t) for t in transforms], axis=0)
    out = apply_fn(stacked)
    parts = [
        invert_transform(out[i * batch : (i + 1) * batch], t) for i, t in enumerate(transforms)
    ]
    return jnp.mean(jnp.stack(parts, axis=0), axis=0)


@functools.lru_cache(maxsize=8)
def make_tta_fn(
    apply_fn: Callable[[jax.Array], jax.Array], transforms: tuple[Transform, ...] = TRANSFORMS
) -> Callable[[jax.Array], jax.Array]:
    """Compiled TTA of `apply_fn`: `[batch, s, y, x, c] -> [batch, y, x, c']`.

    All transformed copies go through `apply_fn` as one batch of
    `len(transforms) * batch` in one `jax.jit` call; each output is inverted
    and the copies are averaged. Cached per (apply_fn, transforms), so reuse the
    same `apply_fn` object to reuse the compilation.
    """
    return jax.jit(functools.partial(_tta, apply_fn, tuple(transforms)))


def predict_with_tta(
    apply_fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    transforms: Sequence[Transform] = TRANSFORMS,
) -> jax.Array:
    """Average of `apply_fn` over the test-time transforms.

    Args:
      apply_fn: `[n, s, y, x, c] -> [n, y, x, c']`, e.g. boundary
        probabilities (average probabilities, not logits). Must be traceable.
      x: `[batch, s, y, x, c]` input; y == x unless no transform rotates by
        90/270 degrees.
      transforms: subset of `TRANSFORMS`.

    Returns:
      `[batch, y, x, c']` mean of the inverted outputs.
    """
    transforms = tuple(transforms)
    check_transforms(x.shape, transforms)
    return make_tta_fn(apply_fn, transforms)(x)
