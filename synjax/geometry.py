"""Boxes of voxels and the (z, y, x) triples they are made of.

One box type for the whole package: `Box(start, stop)` is the half-open
region `[start, stop)` of a `[z, y, x]` volume in voxels (stop exclusive, as
numpy slices). The block grid of block-wise prediction, the pruner's windows
around candidates, the regions a `Volume` reads and the CREMI files' sub-volumes
are all Boxes; `read_padded` reads one from any array-like, filling what lies
outside the volume.

World coordinates follow the package's convention (`synjax.io.voxels`): voxel
i of an axis is centred on `offset + i * resolution` nm, so a box's position
in nm is that of its start voxel, `offset + start * resolution`.

Importable from anywhere in synjax: it needs only numpy and `synjax.errors`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import ConfigError, DataError, SynjaxError

# Volumes are z-y-x: three spatial axes, then optionally channels.
SPATIAL_DIMS = 3
Triple = tuple[int, int, int]
# How `read_padded` fills voxels outside the volume (see its docstring).
PAD_MODES = ("reflect", "edge", "zero")


def spatial_triple(value: Any, what: str, minimum: int = 1, broadcast: bool = False) -> Triple:
    """`value` as a (z, y, x) tuple of ints >= `minimum`.

    Args:
      value: a sequence of three integers (or, with `broadcast`, one integer
        for all three axes).
      what: the setting's name for the error, e.g. "UNet3DSettings.pool_factors entry".
      minimum: the smallest value allowed on an axis.
      broadcast: accept a single integer for all axes.

    Raises:
      ConfigError: naming `what`, for anything else.
    """
    if broadcast and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value),) * SPATIAL_DIMS
    try:
        triple = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != SPATIAL_DIMS or min(triple) < minimum:
        raise ConfigError(f"{what}={value}: expected three integers >= {minimum} (z, y, x)")
    return triple  # type: ignore[return-value]


def number_triple(
    value: Any,
    what: str,
    error: type[SynjaxError] = ConfigError,
    broadcast: bool = False,
    positive: bool = False,
    unit: str | None = None,
) -> tuple[float, float, float]:
    """`value` as a (z, y, x) tuple of three finite floats.

    Args:
      value: a sequence of three numbers (or, with `broadcast`, one number for
        all three axes).
      what: the value's name for the error, e.g. "config.data.resolution" or
        "sample.h5:/volumes/raw offset".
      error: the exception raised: ConfigError for a setting, DataError for
        a value read from a file.
      broadcast: accept a single number for all axes.
      positive: require each number to be > 0.
      unit: the numbers' unit, named in the error ("nm": "three positive
        sizes in nm").

    Raises:
      `error`, naming `what`, for anything else.
    """
    if broadcast and isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = (value,) * SPATIAL_DIMS
    try:
        array = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if (
        array.shape != (SPATIAL_DIMS,)
        or not np.all(np.isfinite(array))
        or (positive and np.any(array <= 0))
    ):
        kind = "positive" if positive else "finite"
        noun = f"sizes in {unit}" if unit else "numbers"
        raise error(f"{what}={value}: expected three {kind} {noun} (z, y, x)")
    return tuple(float(v) for v in array)  # type: ignore[return-value]


def voxel_size(value: Any, what: str = "resolution") -> np.ndarray:
    """A voxel size `[3]` float64 in nm (z, y, x): three finite positive numbers.

    Raises:
      ConfigError: naming `what`, for anything else.
    """
    return np.asarray(number_triple(value, what, positive=True, unit="nm"), np.float64)


@dataclasses.dataclass(frozen=True)
class Box:
    """The voxels `[start, stop)` of each axis (usually z, y, x).

    Attributes:
      start: first voxel of each axis (may be negative: a box may leave a volume).
      stop: one past the last voxel of each axis; `stop >= start` (an empty
        axis has `stop == start`).
    """

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self):
        start = tuple(int(v) for v in np.asarray(self.start).reshape(-1))
        stop = tuple(int(v) for v in np.asarray(self.stop).reshape(-1))
        if len(start) != len(stop) or any(b < a for a, b in zip(start, stop, strict=True)):
            raise DataError(f"Box start {start}, stop {stop}: expected stop >= start, axis by axis")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)

    @classmethod
    def from_shape(cls, shape: Sequence[int]) -> Box:
        """The whole of a volume of `shape`: `[0, shape)`."""
        return cls((0,) * len(shape), tuple(shape))

    @classmethod
    def at(cls, start: Sequence[int], shape: Sequence[int]) -> Box:
        """The box of `shape` whose first voxel is `start`."""
        return cls(tuple(start), tuple(int(a) + int(n) for a, n in zip(start, shape, strict=True)))

    @classmethod
    def bounding(cls, voxels: Any) -> Box:
        """The smallest box holding every voxel index of `voxels` `[k, ndim]` (k >= 1)."""
        voxels = np.asarray(voxels)
        return cls(tuple(voxels.min(axis=0)), tuple(voxels.max(axis=0) + 1))

    @classmethod
    def from_slices(cls, slices: Sequence[slice]) -> Box:
        """A box from slices with explicit, non-negative bounds (`slice(2, 9)`)."""
        return cls(tuple(s.start for s in slices), tuple(s.stop for s in slices))

    @classmethod
    def from_nm(
        cls,
        start_nm: Sequence[float],
        shape: Sequence[int],
        resolution: Sequence[float],
        offset: Sequence[float] = (0.0, 0.0, 0.0),
        what: str = "box",
    ) -> Box:
        """The box of `shape` whose start voxel lies at `start_nm`.

        Args:
          start_nm: world position in nm of the box's first voxel.
          shape: the box's size in voxels.
          resolution: voxel size in nm.
          offset: world position in nm of voxel 0.
          what: the box's name for the error.

        Raises:
          DataError: `start_nm` is not on the voxel grid (not a whole number
            of voxels from `offset`).
        """
        start = (np.asarray(start_nm, np.float64) - np.asarray(offset, np.float64)) / np.asarray(
            resolution, np.float64
        )
        if not np.allclose(start, np.round(start)):
            raise DataError(
                f"{what} at {tuple(start_nm)} nm does not lie on the voxel grid of resolution "
                f"{tuple(resolution)} nm and offset {tuple(offset)} nm"
            )
        return cls.at(tuple(int(v) for v in np.round(start)), shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def is_empty(self) -> bool:
        """Whether the box holds no voxel."""
        return any(a == b for a, b in zip(self.start, self.stop, strict=True))

    def slices(self) -> tuple[slice, ...]:
        """Index of the box, for numpy-style slicing (start must be >= 0)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    def intersect(self, other: Box) -> Box:
        """The voxels in both boxes (empty, at the nearest corner, when they do not meet)."""
        start = np.maximum(self.start, other.start)
        stop = np.maximum(np.minimum(self.stop, other.stop), start)
        return Box(tuple(start), tuple(stop))

    def pad(self, width: Sequence[int] | int) -> Box:
        """The box grown by `width` voxels on both sides of each axis."""
        width = (width,) * self.ndim if isinstance(width, numbers.Integral) else tuple(width)
        return Box(
            tuple(a - w for a, w in zip(self.start, width, strict=True)),
            tuple(b + w for b, w in zip(self.stop, width, strict=True)),
        )

    def shift(self, delta: Sequence[int]) -> Box:
        """The box moved by `delta` voxels."""
        return Box(
            tuple(a + d for a, d in zip(self.start, delta, strict=True)),
            tuple(b + d for b, d in zip(self.stop, delta, strict=True)),
        )

    def relative_to(self, origin: Box) -> Box:
        """This box in the coordinates of `origin` (whose start becomes 0)."""
        return self.shift(tuple(-a for a in origin.start))

    def __iter__(self):
        """`start, stop = box`."""
        return iter((self.start, self.stop))

    def to_nm(
        self, resolution: Sequence[float], offset: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> tuple[np.ndarray, np.ndarray]:
        """World positions in nm of the start and stop voxels: `offset + voxel * resolution`."""
        res, off = np.asarray(resolution, np.float64), np.asarray(offset, np.float64)
        return np.asarray(self.start) * res + off, np.asarray(self.stop) * res + off


def reflect_indices(indices: Any, size: int) -> np.ndarray:
    """Maps any integer indices into [0, size) by mirror reflection (numpy's "reflect").

    The edge voxel is not repeated: -1 -> 1, size -> size - 2, with period
    2 * (size - 1), so any distance past the edge (even more than the volume)
    maps correctly. A volume of size 1 maps everything to 0.
    """
    indices = np.asarray(indices)
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * (size - 1)
    m = np.mod(indices, period)
    return np.where(m < size, m, period - m)


def read_padded(source: Any, box: Box, pad_mode: str = "reflect") -> np.ndarray:
    """Reads `box` of `source`, filling the voxels outside the volume.

    Only the part of `source` that the box (and, for reflection, its mirror
    image) touches is read, so `source` may be a lazy on-disk volume.

    Args:
      source: `[z, y, x]` or `[z, y, x, channels]` array-like with `.shape`,
        `.dtype` and numpy slicing.
      box: the spatial box to read; may leave the volume.
      pad_mode: how voxels outside the volume are filled:
        "reflect": mirror about the edge voxel without repeating it (numpy's
          `reflect`, scipy.ndimage's `mirror`): `[a b c | b a]`;
        "edge": repeat the edge voxel (scipy.ndimage's `nearest`);
        "zero": zeros (scipy.ndimage's `constant` with `cval=0`).

    Returns:
      `[box.shape]` array (plus the channel axis of `source`), in the dtype of
      `source`.
    """
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"read_padded pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    volume = Box.from_shape(tuple(source.shape[:SPATIAL_DIMS]))
    inside = box.intersect(volume)
    if inside == box:
        return np.asarray(source[box.slices()])

    if pad_mode == "zero":
        out = np.zeros(box.shape + tuple(source.shape[SPATIAL_DIMS:]), dtype=source.dtype)
        if not inside.is_empty():
            out[inside.relative_to(box).slices()] = np.asarray(source[inside.slices()])
        return out

    indices = []
    for a, b, n in zip(box.start, box.stop, volume.stop, strict=True):
        idx = np.arange(a, b)
        indices.append(np.clip(idx, 0, n - 1) if pad_mode == "edge" else reflect_indices(idx, n))
    read = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    local = np.asarray(source[read])
    return local[np.ix_(*(i - s.start for i, s in zip(indices, read, strict=True)))]
