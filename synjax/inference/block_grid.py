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
are filled by ``pad_mode`` (``synjax.geometry.read_padded``: "reflect",
"edge" or "zero").

Block ids are the C-order (z slowest, x fastest) linear indices of the block
positions, so they are stable for a given volume and block shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import ConfigError
from synjax.geometry import PAD_MODES, Box, spatial_triple


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
        for name, minimum in (("volume_shape", 1), ("block_shape", 1), ("context", 0)):
            value = getattr(self, name)
            triple = spatial_triple(value, f"BlockGrid {name}", minimum, broadcast=True)
            object.__setattr__(self, name, triple)
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
        diff = np.subtract(spatial_triple(input_shape, "BlockGrid input_shape", 1), output_shape)
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

    def block_box(self, block_id: int) -> Box:
        """Output box of a block before cropping: ``block_shape`` at its grid position."""
        return Box.at(np.multiply(self.block_index(block_id), self.block_shape), self.block_shape)

    def output_box(self, block_id: int) -> tuple[slice, slice, slice]:
        """Slices of the volume that this block writes (cropped to the volume)."""
        return self.block_box(block_id).intersect(Box.from_shape(self.volume_shape)).slices()

    def output_crop(self, block_id: int) -> tuple[slice, slice, slice]:
        """Slices of the block's ``block_shape`` output that lie inside the volume."""
        return tuple(slice(0, s.stop - s.start) for s in self.output_box(block_id))

    def input_box(self, block_id: int) -> Box:
        """Unclipped input box: the output box grown by ``context``; may leave the volume."""
        return self.block_box(block_id).pad(self.context)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, used to check a manifest belongs to this grid."""
        return {
            "volume_shape": list(self.volume_shape),
            "block_shape": list(self.block_shape),
            "context": list(self.context),
            "pad_mode": self.pad_mode,
        }
