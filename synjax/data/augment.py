"""Training augmentation of EM patches: flips, 90-degree xy rotations, intensity jitter.

Every array of an example gets the same geometric transform, so labels stay
on the raw voxels they describe. The transforms are exact voxel permutations
(no interpolation), which keeps integer labels valid and makes each one
invertible (`GeometricTransform.invert`, used for test-time augmentation too).
Anisotropic EM has a different z resolution, so rotations are in the xy
plane only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from synjax.errors import DataError

# Spatial axes of a [z, y, x] or [z, y, x, c] array.
Z_AXIS, Y_AXIS, X_AXIS = 0, 1, 2
# Number of distinct 90-degree rotations.
NUM_ROTATIONS = 4


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
    """Which augmentations to draw.

    Attributes:
      flip_xy: flip y and x, each with probability 1/2.
      rotate_xy: rotate by a random multiple of 90 degrees in the yx plane
        (skipped for arrays whose y and x sizes differ).
      flip_z: flip z with probability 1/2.
      intensity_scale: multiply intensities by `1 + U(-s, s)`.
      intensity_shift: add `U(-s, s)` to intensities (intensities in [0, 1]).
    """

    flip_xy: bool = True
    rotate_xy: bool = True
    flip_z: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1


@dataclasses.dataclass(frozen=True)
class GeometricTransform:
    """Flips then a yx rotation, applied to the leading z, y, x axes.

    Attributes:
      flip_z: reverse z.
      flip_y: reverse y.
      flip_x: reverse x.
      rot90: number of 90-degree rotations from y towards x (`np.rot90` on
        axes (y, x)), 0..3.
    """

    flip_z: bool = False
    flip_y: bool = False
    flip_x: bool = False
    rot90: int = 0

    def _flip_axes(self) -> tuple[int, ...]:
        flags = (self.flip_z, self.flip_y, self.flip_x)
        return tuple(
            axis for axis, flag in zip((Z_AXIS, Y_AXIS, X_AXIS), flags, strict=True) if flag
        )

    def _check(self, array: np.ndarray) -> None:
        if array.ndim < 3:
            raise DataError(
                f"augment: expected a [z, y, x] or [z, y, x, c] array, got shape {array.shape}"
            )
        if self.rot90 % 2 and array.shape[Y_AXIS] != array.shape[X_AXIS]:
            raise DataError(f"augment: a 90-degree rotation needs y == x, got shape {array.shape}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Transforms `array` `[z, y, x, ...]`; returns a view where possible."""
        self._check(array)
        out = np.flip(array, self._flip_axes()) if self._flip_axes() else array
        return np.rot90(out, self.rot90, axes=(Y_AXIS, X_AXIS))

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Undoes `apply`: `invert(apply(a)) == a`."""
        self._check(array)
        out = np.rot90(array, -self.rot90, axes=(Y_AXIS, X_AXIS))
        return np.flip(out, self._flip_axes()) if self._flip_axes() else out


def sample_transform(
    rng: np.random.Generator, settings: AugmentSettings, square_xy: bool = True
) -> GeometricTransform:
    """Draws a geometric transform.

    Args:
      rng: random generator.
      settings: which transforms are enabled.
      square_xy: whether y == x for the arrays; rotations are drawn only then.
    """
    # Always draw the same numbers so that turning one option off does not
    # change the others' draws.
    flips = rng.random(3) < 0.5
    rotation = int(rng.integers(NUM_ROTATIONS))
    return GeometricTransform(
        flip_z=bool(settings.flip_z and flips[0]),
        flip_y=bool(settings.flip_xy and flips[1]),
        flip_x=bool(settings.flip_xy and flips[2]),
        rot90=rotation if settings.rotate_xy and square_xy else 0,
    )


def jitter_intensity(
    array: np.ndarray, rng: np.random.Generator, settings: AugmentSettings
) -> np.ndarray:
    """Returns `array * (1 + U(-scale, scale)) + U(-shift, shift)` as float32.

    Raises:
      DataError: `array` is not floating point (scale uint8 raw to [0, 1] first).
    """
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(
            f"augment: intensity jitter needs a float array (raw scaled to [0, 1]), "
            f"got {array.dtype}"
        )
    scale = 1.0 + rng.uniform(-settings.intensity_scale, settings.intensity_scale)
    shift = rng.uniform(-settings.intensity_shift, settings.intensity_shift)
    return (array * np.float32(scale) + np.float32(shift)).astype(np.float32)


def augment(
    arrays: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    settings: AugmentSettings,
    intensity_keys: Sequence[str] = ("raw",),
) -> dict[str, np.ndarray]:
    """Applies one random geometric transform to all arrays, jitter to some.

    Args:
      arrays: one example's arrays, each `[z, y, x]` or `[z, y, x, c]`, all
        with the same z, y, x sizes.
      rng: random generator.
      settings: which augmentations to draw.
      intensity_keys: keys of float intensity arrays that also get intensity
        jitter; other arrays (labels, masks) are only moved.

    Returns:
      The transformed arrays (contiguous), same keys, shapes (y and x swap
      only if they were equal) and dtypes (jittered arrays become float32).

    Raises:
      DataError: arrays disagree on their z, y, x sizes, or a jittered array
        is not floating point.
    """
    spatial = {key: np.shape(a)[:3] for key, a in arrays.items()}
    if len(set(spatial.values())) > 1:
        raise DataError(f"augment: arrays need the same z, y, x sizes, got {spatial}")
    shape = next(iter(spatial.values()), (0, 0, 0))
    transform = sample_transform(rng, settings, square_xy=shape[Y_AXIS] == shape[X_AXIS])
    out = {key: np.ascontiguousarray(transform.apply(np.asarray(a))) for key, a in arrays.items()}
    for key in intensity_keys:
        if key in out:
            out[key] = jitter_intensity(out[key], rng, settings)
    return out
