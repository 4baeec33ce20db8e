"""The `Volume` type: a lazily read (and optionally written) z-y-x array.

Every format (zarr, N5, precomputed, HDF5, TIFF) is wrapped in a subclass that
implements `_read` and, where writable, `_write` over a validated box. Index
parsing, bounds checks and dtype checks live here so that all formats reject
the same bad requests with the same messages.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import DataError
from synjax.geometry import Box, number_triple
from synjax.io.voxels import world_to_voxel

# Physical size of a voxel (nm, z-y-x) when a source does not say.
DEFAULT_RESOLUTION = (1.0, 1.0, 1.0)
DEFAULT_OFFSET = (0.0, 0.0, 0.0)


def _format_index(key: Any) -> str:
    """Writes an index expression the way it was typed, e.g. `[0:300, 5, :]`."""
    parts = []
    for item in key if isinstance(key, tuple) else (key,):
        if isinstance(item, slice):
            start = "" if item.start is None else item.start
            text = f"{start}:{'' if item.stop is None else item.stop}"
            if item.step is not None:
                text += f":{item.step}"
            parts.append(text)
        elif item is Ellipsis:
            parts.append("...")
        else:
            parts.append(repr(item))
    return "[" + ", ".join(parts) + "]"


def normalize_index(key: Any, shape: Sequence[int], source: str) -> tuple[Box, tuple[int, ...]]:
    """Turns a numpy-style basic index into a box inside `shape`.

    Supports ints (negative from the end), slices with step 1 (negative bounds
    from the end) and one Ellipsis. Unlike numpy, bounds beyond the volume raise
    instead of being clipped: a region that silently shrinks would shift every
    downstream block.

    Args:
      key: the index, e.g. `(slice(0, 10), 5, Ellipsis)`.
      shape: the volume's shape.
      source: printable name of the volume, for error messages.

    Returns:
      `(box, squeezed)`: the `Box` over all axes (inside `shape`) and the
      axes that were indexed by an int (dropped from the result, as numpy does).
    """
    items = key if isinstance(key, tuple) else (key,)
    ndim = len(shape)
    n_ellipsis = sum(item is Ellipsis for item in items)
    if n_ellipsis > 1:
        raise DataError(f"{source}: index {_format_index(key)} has more than one '...'")
    if n_ellipsis:
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        fill = (slice(None),) * (ndim - len(items) + 1)
        items = items[:at] + fill + items[at + 1 :]
    if len(items) > ndim:
        raise DataError(
            f"{source}: index {_format_index(key)} has {len(items)} axes, volume has {ndim} "
            f"(shape {tuple(shape)})"
        )
    items = tuple(items) + (slice(None),) * (ndim - len(items))

    def outside() -> DataError:
        return DataError(
            f"{source}: region {_format_index(key)} is outside the volume of shape {tuple(shape)}"
        )

    starts, stops, squeezed = [], [], []
    for axis, (item, size) in enumerate(zip(items, shape, strict=True)):
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise DataError(
                    f"{source}: index {_format_index(key)} has step {item.step}; only step 1 "
                    "is supported (read the region, then subsample)"
                )
            start = _axis_bound(item.start, 0, size, outside, source)
            stop = _axis_bound(item.stop, size, size, outside, source)
            # An empty range (stop before start) reads as empty, as in numpy.
            starts.append(start)
            stops.append(max(start, stop))
        elif isinstance(item, int | np.integer) and not isinstance(item, bool | np.bool_):
            index = int(item) + size if item < 0 else int(item)
            if not 0 <= index < size:
                raise outside()
            starts.append(index)
            stops.append(index + 1)
            squeezed.append(axis)
        else:
            raise DataError(
                f"{source}: index {_format_index(key)} is not supported; use ints and "
                "slices with step 1"
            )
    return Box(tuple(starts), tuple(stops)), tuple(squeezed)


def _axis_bound(value: Any, default: int, size: int, outside, source: str) -> int:
    """One slice bound: None -> default, negative counts from the end, else checked."""
    if value is None:
        return default
    if not isinstance(value, int | np.integer) or isinstance(value, bool | np.bool_):
        raise DataError(f"{source}: slice bound {value!r} is not an int")
    bound = int(value) + size if value < 0 else int(value)
    if not 0 <= bound <= size:
        raise outside()
    return bound


def cast_for_write(block: Any, dtype: np.dtype, region_shape: tuple[int, ...], where: str):
    """Checks and converts a block before it is written into a volume.

    Integer blocks are accepted into any integer volume when every value fits
    (so int64 labels from scipy can go into uint64 volumes); floats never go
    into integer volumes, because truncating them would corrupt labels
    silently.

    Args:
      block: array-like, broadcastable to `region_shape`.
      dtype: the volume's dtype.
      region_shape: shape of the region being written.
      where: printable name of volume and region, for error messages.

    Returns:
      A C-contiguous array of `dtype` and shape `region_shape`.
    """
    array = np.asarray(block)
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: cannot write values of dtype {array.dtype}")
    if dtype.kind in "iu" and array.dtype.kind == "f":
        raise DataError(f"{where}: cannot write float values into a {dtype} volume")
    if dtype.kind in "iu" and array.dtype.kind in "iu" and not np.can_cast(array.dtype, dtype):
        info = np.iinfo(dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise DataError(
                f"{where}: values {array.min()}..{array.max()} do not fit in {dtype} "
                f"({info.min}..{info.max})"
            )
    try:
        array = np.broadcast_to(array, region_shape)
    except ValueError:
        raise DataError(
            f"{where}: block of shape {array.shape} does not fit region of shape {region_shape}"
        ) from None
    return np.ascontiguousarray(array, dtype=dtype)


class Volume(abc.ABC):
    """A chunked z-y-x (or z-y-x-channel) array read region by region.

    `vol[z0:z1, y0:y1, x0:x1]` reads only that region and returns a numpy
    array; assigning to the same expression writes it (writable volumes only).

    Attributes:
      shape: array shape, `[z, y, x]` or `[z, y, x, channels]`.
      dtype: numpy dtype of the stored values.
      resolution: voxel size in nm, z-y-x.
      offset: world position in nm (z-y-x) of voxel (0, 0, 0).
      path: printable name of the source.
      writable: whether assignment is allowed.
      chunks: the storage chunk shape, or None when the source is contiguous.
    """

    def __init__(
        self,
        *,
        path: str,
        shape: Sequence[int],
        dtype: Any,
        resolution: Sequence[float] = DEFAULT_RESOLUTION,
        offset: Sequence[float] = DEFAULT_OFFSET,
        writable: bool = False,
        chunks: Sequence[int] | None = None,
    ):
        self.path = path
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.resolution = number_triple(resolution, f"{path} resolution", DataError)
        self.offset = number_triple(offset, f"{path} offset", DataError)
        self.writable = writable
        self.chunks = None if chunks is None else tuple(int(c) for c in chunks)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype}, "
            f"resolution={self.resolution}, offset={self.offset})"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        box, squeezed = normalize_index(key, self.shape, self.path)
        if box.is_empty():
            data = np.zeros(box.shape, self.dtype)
        else:
            data = np.asarray(self._read(box), dtype=self.dtype)
        return data.squeeze(axis=squeezed) if squeezed else data

    def __setitem__(self, key: Any, block: Any) -> None:
        if not self.writable:
            raise DataError(f"{self.path} is open read-only; open it with mode='r+' to write")
        box, squeezed = normalize_index(key, self.shape, self.path)
        region_shape = box.shape
        kept_shape = tuple(n for axis, n in enumerate(region_shape) if axis not in squeezed)
        where = f"{self.path} region {_format_index(key)}"
        array = cast_for_write(block, self.dtype, kept_shape, where).reshape(region_shape)
        if array.size:
            self._write(box, array)

    def read(self) -> np.ndarray:
        """Reads the whole volume into memory: `[z, y, x]` (or `[..., channels]`)."""
        return self[...]

    def voxel_to_world(self, voxels: Any) -> np.ndarray:
        """Maps voxel indices `[..., 3]` (z-y-x) to world positions in nm."""
        return np.asarray(voxels, np.float64) * self.resolution + self.offset

    def world_to_voxel(self, positions: Any) -> np.ndarray:
        """Maps world positions `[..., 3]` (nm, z-y-x) to voxel indices (int64).

        The package's one rule, `synjax.io.voxels.world_to_voxel`: nearest
        voxel centre, halves rounded up.
        """
        return world_to_voxel(positions, self.resolution, self.offset)

    def close(self) -> None:  # noqa: B027 (formats without file handles keep the no-op)
        """Releases file handles (a no-op for formats that hold none)."""

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @abc.abstractmethod
    def _read(self, box: Box) -> np.ndarray:
        """Reads a non-empty box (all axes, squeezed axes kept) as an array."""

    def _write(self, box: Box, block: np.ndarray) -> None:
        """Writes `block` (exact dtype and shape of `box`) into a non-empty box."""
        raise DataError(f"{self.path}: this format cannot be written")
