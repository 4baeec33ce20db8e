"""A grid of blocks that tiles a volume for block-wise prediction.

The output volume is tiled by blocks of ``block_shape`` starting at the origin,
so block ``(iz, iy, ix)`` owns the output box ``[i * block, (i + 1) * block)``
on each axis. Where the volume shape is not a multiple of the block shape the
last blocks are **cropped** (not shifted back): the network still receives a
full-size input, padded past the volume end, and only the part of its output
that lies inside the volume is written. So every output voxel is written by
exactly one block, every block has the same input shape (one ``jit``
compilation), and block boxes stay aligned to a destination chunking whenever
``block_shape`` is a multiple of the chunk shape (parallel writers never touch
the same chunk).

Each block's input box is its output box grown by ``context`` voxels on each
side, which is what a valid-padding network needs:
``context = (input_shape - output_shape) // 2``. Input voxels outside the volume
are filled by ``pad_mode``:

* ``"reflect"``: mirror about the edge voxel without repeating it
  (numpy's ``reflect``, scipy.ndimage's ``mirror``): ``[a b c | b a]``.
* ``"edge"``: repeat the edge voxel (scipy.ndimage's ``nearest``).
* ``"zero"``: zeros (scipy.ndimage's ``constant`` with ``cval=0``).

Block ids are the C-order (z slowest, x fastest) linear indices of the block
positions, so they are stable for a given volume and block shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import ConfigError

PAD_MODES = ("reflect", "edge", "zero")
SPATIAL_DIMS = 3


def _triple(value: Sequence[int] | int, name: str, minimum: int) -> tuple[int, int, int]:
    """Returns ``value`` as three ints >= ``minimum``; an int is used on all axes."""
    if isinstance(value, int | np.integer):
        value = (int(value),) * SPATIAL_DIMS
    value = tuple(int(v) for v in value)
    if len(value) != SPATIAL_DIMS or min(value) < minimum:
        raise ConfigError(f"BlockGrid {name}={value}: expected 3 ints (z, y, x) >= {minimum}")
    return value  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class BlockGrid:
    """Tiling of a ``[z, y, x]`` volume by output blocks with input context.

    Attributes:
      volume_shape: Spatial shape ``(z, y, x)`` of the source and destination.
      block_shape: Output box of one block ``(oz, oy, ox)`` (the network's output).
      context: Voxels added on each side of the output box to form the input box.
      pad_mode: How input voxels outside the volume are filled (see module doc).
    """

    volume_shape: tuple[int, int, int]
    block_shape: tuple[int, int, int]
    context: tuple[int, int, int] = (0, 0, 0)
    pad_mode: str = "reflect"

    def __post_init__(self):
        object.__setattr__(self, "volume_shape", _triple(self.volume_shape, "volume_shape", 1))
        object.__setattr__(self, "block_shape", _triple(self.block_shape, "block_shape", 1))
        object.__setattr__(self, "context", _triple(self.context, "context", 0))
        if self.pad_mode not in PAD_MODES:
            raise ConfigError(f"BlockGrid pad_mode={self.pad_mode!r}: expected one of {PAD_MODES}")

    @classmethod
    def from_io_shapes(
        cls,
        volume_shape: Sequence[int],
        input_shape: Sequence[int],
        output_shape: Sequence[int],
        pad_mode: str = "reflect",
    ) -> BlockGrid:
        """Builds the grid of a valid-padding network from its input/output shapes.

        Args:
          volume_shape: Spatial shape ``(z, y, x)`` of the volume.
          input_shape: Network input ``(iz, iy, ix)``.
          output_shape: Network output ``(oz, oy, ox)``; ``input - output`` must be
            even and non-negative on every axis (the output is centred).
          pad_mode: See the module docstring.
        """
        diff = np.subtract(_triple(input_shape, "input_shape", 1), output_shape)
        if np.any(diff < 0) or np.any(diff % 2):
            raise ConfigError(
                f"BlockGrid input_shape={tuple(input_shape)} output_shape={tuple(output_shape)}: "
                "expected input - output even and >= 0 on every axis"
            )
        return cls(volume_shape, output_shape, tuple(int(d) for d in diff // 2), pad_mode)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Number of blocks along z, y, x (ceiling division)."""
        return tuple(-(-v // b) for v, b in zip(self.volume_shape, self.block_shape, strict=True))

    @property
    def num_blocks(self) -> int:
        return int(np.prod(self.grid_shape))

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Spatial shape of every block's input: ``block_shape + 2 * context``."""
        return tuple(b + 2 * c for b, c in zip(self.block_shape, self.context, strict=True))

    def block_ids(self) -> range:
        return range(self.num_blocks)

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ConfigError(f"block id {block_id}: expected 0 <= id < {self.num_blocks}")

    def block_index(self, block_id: int) -> tuple[int, int, int]:
        """Grid position ``(iz, iy, ix)`` of a block id."""
        self._check_id(block_id)
        return tuple(int(i) for i in np.unravel_index(block_id, self.grid_shape))

    def block_start(self, block_id: int) -> np.ndarray:
        """Output-box start ``[3]`` (voxels) of a block, before cropping."""
        return np.multiply(self.block_index(block_id), self.block_shape)

    def output_box(self, block_id: int) -> tuple[slice, slice, slice]:
        """Slices of the volume that this block writes (cropped to the volume)."""
        start = self.block_start(block_id)
        stop = np.minimum(start + self.block_shape, self.volume_shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))

    def output_crop(self, block_id: int) -> tuple[slice, slice, slice]:
        """Slices of the block's ``block_shape`` output that lie inside the volume."""
        return tuple(slice(0, s.stop - s.start) for s in self.output_box(block_id))

    def input_box(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Unclipped input box ``(start [3], stop [3])``; may leave the volume."""
        start = self.block_start(block_id) - self.context
        return start, start + self.input_shape

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, used to check a manifest belongs to this grid."""
        return {
            "volume_shape": list(self.volume_shape),
            "block_shape": list(self.block_shape),
            "context": list(self.context),
            "pad_mode": self.pad_mode,
        }


def _source_indices(start: int, stop: int, size: int, pad_mode: str) -> np.ndarray:
    """Maps positions ``[start, stop)`` on one axis to in-volume indices.

    Args:
      start: First position, may be negative.
      stop: One past the last position, may exceed ``size``.
      size: Length of the volume along this axis.
      pad_mode: ``"reflect"`` or ``"edge"``.

    Returns:
      ``[stop - start]`` int indices in ``[0, size)``.
    """
    idx = np.arange(start, stop)
    if pad_mode == "edge" or size == 1:
        return np.clip(idx, 0, size - 1)
    # Mirror without repeating the edge is periodic with period 2 * (size - 1),
    # so any pad width (even one larger than the volume) maps correctly.
    period = 2 * (size - 1)
    idx = np.abs(idx) % period
    return np.where(idx >= size, period - idx, idx)


def read_padded(
    source: Any,
    start: Sequence[int],
    stop: Sequence[int],
    pad_mode: str = "reflect",
) -> np.ndarray:
    """Reads the box ``[start, stop)`` of ``source``, padding outside the volume.

    Only the part of ``source`` that the box (and, for reflection, its mirror
    image) touches is read, so ``source`` may be a lazy on-disk volume.

    Args:
      source: ``[z, y, x]`` or ``[z, y, x, channels]`` array-like with ``.shape``
        and numpy slicing.
      start: Box start ``[3]``; may be negative.
      stop: Box stop ``[3]``; may exceed the volume.
      pad_mode: One of ``PAD_MODES``.

    Returns:
      ``[stop - start]`` spatial array (plus the channel axis of ``source``), in
      the dtype of ``source``.
    """
    if pad_mode not in PAD_MODES:
        raise ConfigError(f"read_padded pad_mode={pad_mode!r}: expected one of {PAD_MODES}")
    size = np.asarray(source.shape[:SPATIAL_DIMS])
    start = np.asarray(start, dtype=np.int64)
    stop = np.asarray(stop, dtype=np.int64)
    lo = np.clip(start, 0, size)
    hi = np.clip(stop, 0, size)
    if np.all(lo == start) and np.all(hi == stop):
        return np.asarray(source[tuple(slice(a, b) for a, b in zip(start, stop, strict=True))])

    if pad_mode == "zero":
        out_shape = tuple(stop - start) + tuple(source.shape[SPATIAL_DIMS:])
        out = np.zeros(out_shape, dtype=source.dtype)
        if np.all(hi > lo):
            read = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
            into = tuple(slice(a, b) for a, b in zip(lo - start, hi - start, strict=True))
            out[into] = np.asarray(source[read])
        return out

    indices = [
        _source_indices(int(a), int(b), int(n), pad_mode)
        for a, b, n in zip(start, stop, size, strict=True)
    ]
    read = tuple(slice(int(i.min()), int(i.max()) + 1) for i in indices)
    local = np.asarray(source[read])
    return local[np.ix_(*(i - s.start for i, s in zip(indices, read, strict=True)))]
