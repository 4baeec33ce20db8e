"""Block-wise prediction and post-processing over volumes larger than memory.

A :class:`~synjax.inference.block_grid.BlockGrid` tiles the output volume; for
each block the input box (output box plus context, padded outside the volume)
is read from ``source``, passed through a function, and the part of the result
inside the volume is written to ``dest``. Every block has one input shape (the
last blocks are padded, not shrunk), so a ``jax.jit``-compiled function
compiles once; memory holds a few batches of blocks, whatever the volume size.

Resuming: with ``manifest_path`` set, the done-state of every block is kept
with the output (:mod:`synjax.inference.done_blocks`: a chunked uint8
done-array and a header with the grid and provenance; a path ending in
``.jsonl`` keeps the older line-per-batch manifest of
:mod:`synjax.inference.block_manifest`). A block is marked done only after its
data was written and ``dest.flush()`` (if any) returned, so a killed run, even
by SIGKILL, loses no block, and a rerun computes only the blocks not marked
(those written but not yet marked are written again with the same values).
``dest.flush()`` must make the data durable: synjax's HDF5 volumes flush
h5py's caches and fsync the file; tensorstore volumes are durable once each
write returns.

Provenance: the done-state records the grid and, when given, a ``provenance``
dict naming what made the blocks (the model's step and parameter hash, the
input's path, shape, dtype and content fingerprint; see
:mod:`synjax.io.provenance`). A rerun whose provenance differs does not reuse
the recorded blocks: with ``resume="auto"`` it logs what differs and starts
afresh; with ``resume="strict"`` it stops with an error naming what differs.

Failures: a step (read, compute, write) that raises is tried ``retries`` more
times; then :class:`~synjax.inference.block_job.BlockError` names the block
(id, grid index, voxel box) and the error. The run never returns with a block
missing: after the last batch the done-state is checked for every block.

Executors:

* ``"local"``: in-process (the block function runs where it was compiled), with
  the reading of the next batch and the writing of the previous one in threads
  (:mod:`synjax.inference.block_prefetch`). The last batch is padded by
  repeating its last block so a jitted ``predict_fn`` sees one shape only.
* ``"dask"``: ``dask.distributed`` (:mod:`synjax.inference.block_dask`): each
  task processes ``blocks_per_task`` blocks; the driver records them as tasks
  finish. Pass a ``Client``, a ``LocalCluster`` or a scheduler address as
  ``client`` (None: a default ``LocalCluster``). With worker processes,
  ``predict_fn``, ``source`` and ``dest`` must pickle: use on-disk volumes
  (not numpy arrays, whose writes would stay in a worker) and wrap model
  loading in :class:`~synjax.inference.lazy_model.LazyPredictor` (one load per
  worker). Even an in-process cluster pickles each task's arguments; numpy
  arrays survive this by reference (pickle-5 buffers), other objects are copied.

Parallel writers never write the same destination chunk when ``block_shape`` is
a multiple of the destination's chunk shape, because blocks start at multiples
of ``block_shape`` from the origin (last blocks are cropped, not shifted). The
dask executor refuses a destination whose ``chunks`` break this rule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS
from synjax.inference.block_dask import chunked, run_dask
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_job import BlockError, BlockJob, Channels, describe_blocks
from synjax.inference.block_manifest import (
    MANIFEST_FORMAT,
    RESUME_MODES,
    BlockManifest,
    check_resume,
    manifest_differences,
)
from synjax.inference.block_prefetch import run_prefetched
from synjax.inference.done_blocks import (
    DoneBlocks,
    done_state_differences,
    open_done_state,
    remove_done_state,
)
from synjax.inference.lazy_model import LazyPredictor
from synjax.report.progress import progress_bar

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")

__all__ = [
    "EXECUTORS",
    "MANIFEST_FORMAT",
    "RESUME_MODES",
    "BlockError",
    "BlockManifest",
    "BlockwiseSummary",
    "DoneBlocks",
    "LazyPredictor",
    "blockwise_map",
    "done_state_differences",
    "manifest_differences",
    "predict_blockwise",
    "remove_done_state",
]


@dataclasses.dataclass(frozen=True)
class BlockwiseSummary:
    """What one call of :func:`predict_blockwise` or :func:`blockwise_map` did.

    Attributes:
      total: Blocks in the grid.
      skipped: Blocks already recorded as done, not computed again.
      computed: Blocks computed and written by this call.
    """

    total: int
    skipped: int
    computed: int


class _DoneInMemory:
    """The done-state of a run without a path: what this call wrote."""

    def __init__(self, grid: BlockGrid):
        self._done = np.zeros(grid.num_blocks, bool)

    def record(self, block_ids: Sequence[int]) -> None:
        self._done[np.asarray(block_ids, np.int64)] = True

    def todo(self) -> np.ndarray:
        return np.flatnonzero(~self._done)

    missing = todo


def _check_volumes(job: BlockJob) -> None:
    grid = job.grid
    for name, volume in (("source", job.source), ("dest", job.dest)):
        if len(volume.shape) not in (SPATIAL_DIMS, SPATIAL_DIMS + 1):
            raise DataError(
                f"{name} shape {tuple(volume.shape)}: expected [z, y, x] or [z, y, x, c]"
            )
    dest_shape = tuple(job.dest.shape[:SPATIAL_DIMS])
    if dest_shape != grid.volume_shape:
        raise DataError(
            f"dest spatial shape {dest_shape} differs from the grid's volume_shape "
            f"{grid.volume_shape}"
        )
    source_shape = tuple(job.source.shape[:SPATIAL_DIMS])
    needed = tuple(o + v for o, v in zip(job.origin, grid.volume_shape, strict=True))
    if any(o < 0 for o in job.origin) or any(
        n > s for n, s in zip(needed, source_shape, strict=True)
    ):
        raise DataError(
            f"region of interest from {job.origin} of shape {grid.volume_shape} "
            f"leaves the source of shape {source_shape}"
        )


def _chunks_aligned(dest: Any, grid: BlockGrid) -> bool:
    """Whether every dest chunk lies in exactly one block (True if unchunked).

    Along an axis with a single block (one that covers the volume) no chunk
    is shared, whatever its size.
    """
    chunks = getattr(dest, "chunks", None)
    if not chunks:
        return True
    return all(
        b % c == 0 or n == 1
        for b, c, n in zip(grid.block_shape, chunks[:SPATIAL_DIMS], grid.grid_shape, strict=True)
    )


def _run_blocks(
    job: BlockJob,
    manifest_path: str | os.PathLike | None,
    executor: str,
    progress: bool,
    blocks_per_task: int,
    client: Any,
    provenance: dict | None,
    resume: str,
) -> BlockwiseSummary:
    """Shared driver of :func:`predict_blockwise` and :func:`blockwise_map`."""
    grid = job.grid
    check_resume(resume)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r}: expected one of {EXECUTORS}")
    if job.batch_size < 1 or blocks_per_task < 1 or job.retries < 0:
        raise ConfigError(
            f"batch_size={job.batch_size}, blocks_per_task={blocks_per_task}, "
            f"retries={job.retries}: expected >= 1, >= 1 and >= 0"
        )
    _check_volumes(job)
    if not _chunks_aligned(job.dest, grid):
        message = (
            f"block_shape {grid.block_shape} is not a multiple of the dest chunks "
            f"{tuple(job.dest.chunks)}: parallel writers would share chunks"
        )
        if executor == "dask":
            raise ConfigError(message)
        log.warning("%s (harmless for executor='local', but slower)", message)

    state = (
        open_done_state(manifest_path, grid, provenance, resume)
        if manifest_path is not None
        else _DoneInMemory(grid)
    )
    todo = state.todo()
    skipped = grid.num_blocks - len(todo)
    log.info("blockwise: %d blocks, %d already done, %d to do", grid.num_blocks, skipped, len(todo))
    with progress_bar(
        total=grid.num_blocks, initial=skipped, disable=not progress, unit="block"
    ) as bar:

        def on_written(ids: list[int]) -> None:
            state.record(ids)
            bar.update(len(ids))

        if executor == "local":
            run_prefetched(job, chunked(todo, job.batch_size), on_written)
        else:
            run_dask(job, todo, blocks_per_task, on_written, client)
    missing = state.missing()
    if len(missing):
        # Never report success with a block missing (e.g. a task that vanished).
        raise BlockError(
            f"{len(missing)} of {grid.num_blocks} blocks are not recorded as written after "
            f"the run: {describe_blocks(grid, missing, job.origin)}"
        )
    return BlockwiseSummary(grid.num_blocks, skipped, len(todo))


def predict_blockwise(
    predict_fn: Callable[[np.ndarray], Any],
    source: Any,
    dest: Any,
    grid: BlockGrid,
    batch_size: int = 1,
    manifest_path: str | os.PathLike | None = None,
    executor: str = "local",
    progress: bool = True,
    channels: Channels = None,
    client: Any = None,
    blocks_per_task: int | None = None,
    provenance: dict | None = None,
    resume: str = "auto",
    retries: int = 0,
    origin: Sequence[int] | None = None,
) -> BlockwiseSummary:
    """Runs a network over ``source`` block by block and writes ``dest``.

    Args:
      predict_fn: Maps a float32 batch ``[b, iz, iy, ix]`` (or ``[b, iz, iy, ix,
        c]`` for a multi-channel source), where ``(iz, iy, ix) =
        grid.input_shape``, to ``[b, oz, oy, ox]`` or ``[b, oz, oy, ox, c]`` with
        ``(oz, oy, ox) = grid.block_shape`` (numpy or jax array). Intensity
        normalisation is its job: the batch holds the raw source values.
      source: ``[z, y, x]`` or ``[z, y, x, c]`` volume with ``.shape`` and numpy
        slicing (a numpy array or a ``synjax.io`` volume); only block input boxes
        are read.
      dest: ``[z, y, x]`` or ``[z, y, x, c]`` volume with ``.shape`` and slice
        assignment, which casts the outputs to its dtype by its own rules.
      grid: Blocks to process; its ``volume_shape`` must match both volumes.
      batch_size: Blocks per ``predict_fn`` call.
      manifest_path: the done-state kept with the output, making the run
        resumable: a done-array folder (conventionally ``dest.zarr.blocks``,
        :func:`synjax.io.layout.blocks_manifest`) or, for a name ending in
        ``.jsonl``, a JSON-lines manifest. None: every block is computed.
      executor: ``"local"`` or ``"dask"`` (see the module docstring).
      progress: Show a tqdm progress bar.
      channels: Output channels written to ``dest``: None (all; dest's channel
        axis, if any, must match), an int (that channel, into a ``[z, y, x]``
        dest) or a sequence of ints (those, into ``[z, y, x, len]``).
      client: For ``executor="dask"``: a ``distributed.Client``, a
        ``LocalCluster`` or a scheduler address (``"tcp://host:8786"``, e.g.
        of a dask-jobqueue or dask-kubernetes cluster); None creates a
        default ``LocalCluster``.
      blocks_per_task: Blocks per dask task (default ``batch_size``).
      provenance: What makes the blocks, recorded in the manifest and compared
        with what it records (see the module docstring): conventionally
        ``{"model": synjax.io.provenance.model_provenance(...), "input":
        synjax.io.provenance.input_fingerprint(...)}``. None: not checked.
      resume: ``"auto"`` (blocks of another provenance are computed again)
        or ``"strict"`` (they are an error).
      retries: how many more times a failing read, compute or write is tried
        before the run stops with a ``BlockError`` naming the block.
      origin: voxel start ``(z, y, x)`` of a region of interest in ``source``;
        the grid (and ``dest``) cover the region, and context is read from
        ``source`` around it where the source has some. None: the whole source.

    Returns:
      How many blocks were skipped and computed.

    Raises:
      BlockError: a block kept failing, or blocks are missing after the run.
    """
    source_shape = tuple(source.shape[:SPATIAL_DIMS])
    # Without a region the grid covers the whole source; a region may start
    # at voxel 0 and be smaller (`config.predict.roi=0:16,0:256,0:256`).
    if origin is None and source_shape != grid.volume_shape:
        raise DataError(
            f"source spatial shape {source_shape} differs from the grid's volume_shape "
            f"{grid.volume_shape}"
        )
    job = BlockJob(
        block_fn=predict_fn,
        source=source,
        dest=dest,
        grid=grid,
        batch_size=batch_size,
        input_dtype=np.dtype(np.float32),
        channels=channels,
        pad_batches=True,
        origin=tuple(int(o) for o in origin) if origin is not None else (0, 0, 0),
        retries=retries,
    )
    return _run_blocks(
        job,
        manifest_path,
        executor,
        progress,
        blocks_per_task or batch_size,
        client,
        provenance,
        resume,
    )


@dataclasses.dataclass(frozen=True)
class _PerBlock:
    """Lifts a one-block function to the batch interface (picklable if ``fn`` is)."""

    fn: Callable[[np.ndarray], np.ndarray]

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(self.fn(block)) for block in batch])


def blockwise_map(
    fn: Callable[[np.ndarray], np.ndarray],
    source: Any,
    dest: Any,
    block_shape: Sequence[int] | int,
    context: Sequence[int] | int = 0,
    pad_mode: str = "reflect",
    manifest_path: str | os.PathLike | None = None,
    executor: str = "local",
    progress: bool = True,
    client: Any = None,
    blocks_per_task: int = 1,
    provenance: dict | None = None,
    resume: str = "auto",
    retries: int = 0,
) -> BlockwiseSummary:
    """Applies a host-side numpy function to a large volume block by block.

    For post-processing such as thresholding or filtering: ``fn`` gets one
    block's input box ``[bz + 2 cz, by + 2 cy, bx + 2 cx(, c)]`` in the source
    dtype (padded by ``pad_mode`` outside the volume; last blocks are padded
    to full size too) and returns its ``[bz, by, bx(, c)]`` output box.

    Args:
      fn: One-block function, see above.
      source: Volume read block by block (see :func:`predict_blockwise`).
      dest: Volume written block by block, same spatial shape as ``source``.
      block_shape: Output block ``(bz, by, bx)``; a multiple of dest's chunks.
      context: Voxels of input added on each side of the output block.
      pad_mode: ``"reflect"``, ``"edge"`` or ``"zero"``.
      manifest_path: Makes the run resumable, as in :func:`predict_blockwise`.
      executor: ``"local"`` or ``"dask"``.
      progress: Show a tqdm progress bar.
      client: Dask client, cluster or scheduler address for ``executor="dask"``.
      blocks_per_task: Blocks per dask task.
      provenance: What makes the blocks, as in :func:`predict_blockwise`.
      resume: ``"auto"`` or ``"strict"``, as in :func:`predict_blockwise`.
      retries: as in :func:`predict_blockwise`.

    Returns:
      How many blocks were skipped and computed.
    """
    grid = BlockGrid(tuple(source.shape[:SPATIAL_DIMS]), block_shape, context, pad_mode)
    job = BlockJob(
        block_fn=_PerBlock(fn),
        source=source,
        dest=dest,
        grid=grid,
        batch_size=1,
        input_dtype=None,
        channels=None,
        pad_batches=False,
        retries=retries,
    )
    return _run_blocks(
        job, manifest_path, executor, progress, blocks_per_task, client, provenance, resume
    )
