"""One block-wise job: read a batch of blocks, compute them, write them; retried and named.

A :class:`BlockJob` holds everything a worker needs (the block function, the
source and destination volumes, the grid), so it is picklable when its parts
are, and splits the work of a batch of blocks into three steps (``read``,
``compute``, ``write``) that the local executor runs in different threads
(:mod:`synjax.inference.block_prefetch`). Each step is retried ``retries``
times when it raises; then :class:`BlockError` names the blocks (id, grid index
and voxel box) and the error. Errors of synjax's own (a ``SynjaxError``, e.g. a
block function whose output has the wrong shape) are not retried: they would
fail the same way again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from synjax.errors import DataError, SynjaxError
from synjax.geometry import SPATIAL_DIMS, read_padded
from synjax.inference.block_grid import BlockGrid

log = logging.getLogger(__name__)

Channels = int | Sequence[int] | None
# Blocks named in full in a BlockError; the rest are counted.
NAMED_BLOCKS = 3


class BlockError(SynjaxError, RuntimeError):
    """A block kept failing: its id, grid index, voxel box and the last error."""


def describe_blocks(grid: BlockGrid, block_ids: Sequence[int], origin=(0, 0, 0)) -> str:
    """``block 5 (index (0, 1, 1), voxels [0:4, 4:8, 4:8])`` for up to ``NAMED_BLOCKS`` blocks.

    Args:
      grid: the grid of the blocks.
      block_ids: the blocks to name.
      origin: voxel position of the grid's origin in the source volume (a
        region of interest's start); boxes are given in source voxels.
    """
    parts = []
    for block_id in list(block_ids)[:NAMED_BLOCKS]:
        box = grid.output_box(int(block_id))
        voxels = ", ".join(f"{s.start + o}:{s.stop + o}" for s, o in zip(box, origin, strict=True))
        parts.append(
            f"{int(block_id)} (index {grid.block_index(int(block_id))}, voxels [{voxels}])"
        )
    more = len(block_ids) - NAMED_BLOCKS
    what = "block " if len(block_ids) == 1 else "blocks "
    return what + "; ".join(parts) + (f" and {more} more" if more > 0 else "")


def select_channels(out: np.ndarray, channels: Channels, dest_ndim: int) -> np.ndarray:
    """Picks the output channels written to ``dest``.

    Args:
      out: ``[b, z, y, x]`` or ``[b, z, y, x, c]`` block-function output.
      channels: None (all), an int (that channel, dropping the axis) or a
        sequence of ints.
      dest_ndim: 3 or 4, the rank of ``dest``.

    Returns:
      ``[b, z, y, x]`` or ``[b, z, y, x, c']`` matching ``dest``.
    """
    if channels is not None:
        if out.ndim != SPATIAL_DIMS + 2:
            raise DataError(
                f"channels={channels!r} given but the output {out.shape} has no channel axis"
            )
        index = int(channels) if isinstance(channels, int | np.integer) else list(channels)
        out = out[..., index]
    if out.ndim != dest_ndim + 1:
        raise DataError(
            f"output {out.shape[1:]} per block does not fit a {dest_ndim}-d dest; "
            "pick channels with channels= or give dest a channel axis"
        )
    return out


@dataclasses.dataclass(frozen=True)
class BlockJob:
    """Everything needed to process batches of blocks; picklable when its parts are.

    Attributes:
      block_fn: ``[b, iz, iy, ix(, c)] -> [b, oz, oy, ox(, c)]`` (see
        :func:`synjax.inference.blockwise.predict_blockwise`).
      source: ``[z, y, x(, c)]`` volume read block by block.
      dest: ``[z, y, x(, c)]`` volume of the grid's shape, written block by block.
      grid: the blocks.
      batch_size: blocks per ``block_fn`` call.
      input_dtype: dtype of the batches (None: the source's).
      channels: output channels written (see :func:`select_channels`).
      pad_batches: repeat the last block of a short batch so every call has
        one shape (one ``jit`` compilation).
      origin: voxel position of the grid's origin in ``source`` (the start of
        a region of interest); context is read from ``source`` beyond the
        region where there is some.
      retries: how many times a failing step is tried again.
    """

    block_fn: Callable[[np.ndarray], Any]
    source: Any
    dest: Any
    grid: BlockGrid
    batch_size: int
    input_dtype: np.dtype | None
    channels: Channels
    pad_batches: bool
    origin: tuple[int, int, int] = (0, 0, 0)
    retries: int = 0

    def _attempt(self, step: str, block_ids: Sequence[int], action: Callable[[], Any]) -> Any:
        """``action()``, tried ``1 + retries`` times; then a :class:`BlockError`."""
        for attempt in range(self.retries + 1):
            try:
                return action()
            except SynjaxError:
                raise
            except Exception as error:  # noqa: BLE001 (any failure of user code is retried)
                last = error
                what = describe_blocks(self.grid, block_ids, self.origin)
                log.warning("%s of %s failed (attempt %d): %r", step, what, attempt + 1, error)
        # One line (the CLI prints it as is): the error's first line.
        reason = (str(last).strip().splitlines() or [""])[0]
        raise BlockError(
            f"{step} of {describe_blocks(self.grid, block_ids, self.origin)} failed "
            f"{self.retries + 1} time(s): {type(last).__name__}: {reason}"
        ) from last

    def read(self, block_ids: Sequence[int]) -> np.ndarray:
        """The stacked input boxes of ``block_ids`` ``[b, iz, iy, ix(, c)]`` (padded batch)."""

        def action():
            inputs = [
                read_padded(
                    self.source, self.grid.input_box(i).shift(self.origin), self.grid.pad_mode
                )
                for i in block_ids
            ]
            if self.pad_batches:
                inputs += inputs[-1:] * (self.batch_size - len(inputs))
            batch = np.stack(inputs)
            if self.input_dtype is not None:
                batch = batch.astype(self.input_dtype, copy=False)
            return batch

        return self._attempt("reading", block_ids, action)

    def compute(self, block_ids: Sequence[int], batch: np.ndarray) -> np.ndarray:
        """``block_fn(batch)``, checked and cut to the channels written."""
        out = self._attempt("computing", block_ids, lambda: np.asarray(self.block_fn(batch)))
        if out.ndim < SPATIAL_DIMS + 1 or out.shape[0] != len(batch):
            raise DataError(
                f"block function returned {out.shape} for a batch of {batch.shape}; "
                "expected [batch, z, y, x] or [batch, z, y, x, channels]"
            )
        if out.shape[1 : SPATIAL_DIMS + 1] != self.grid.block_shape:
            raise DataError(
                f"block function returned spatial shape {out.shape[1:4]}, expected the "
                f"grid's block_shape {self.grid.block_shape} (input {self.grid.input_shape})"
            )
        return select_channels(out, self.channels, len(self.dest.shape))

    def write(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Writes the blocks' cores and flushes ``dest``: then they may be recorded."""

        def action():
            for k, block_id in enumerate(block_ids):
                # dest applies its own casting rules (synjax volumes refuse
                # floats into integer volumes rather than truncate them).
                self.dest[self.grid.output_box(block_id)] = out[k][self.grid.output_crop(block_id)]
            if hasattr(self.dest, "flush"):
                # A block may only be recorded as done once its data is durable.
                self.dest.flush()

        self._attempt("writing", block_ids, action)

    def run(self, block_ids: Sequence[int]) -> list[int]:
        """Reads, computes and writes ``block_ids`` batch by batch; returns them once written."""
        block_ids = [int(i) for i in block_ids]
        for first in range(0, len(block_ids), self.batch_size):
            ids = block_ids[first : first + self.batch_size]
            self.write(ids, self.compute(ids, self.read(ids)))
        return block_ids


def run_job(job: BlockJob, block_ids: Sequence[int]) -> list[int]:
    """``job.run(block_ids)``: a module-level function for Dask to ship."""
    return job.run(block_ids)
