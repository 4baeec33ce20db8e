"""Block-wise prediction and post-processing over volumes larger than memory.

A :class:`~synjax.inference.block_grid.BlockGrid` tiles the output volume; for
each block the input box (output box plus context, padded outside the volume)
is read from ``source``, passed through a function, and the part of the result
inside the volume is written to ``dest``. Only one batch of blocks per worker is
ever in memory.

Resuming: with ``manifest_path`` set, a JSON-lines manifest records the ids of
finished blocks. A block's id is appended (and fsync'ed) only after its data was
written and ``dest.flush()`` (if any) returned, so a killed run loses no block;
a rerun skips the recorded blocks. Only blocks that were written but not yet
recorded when the run died are computed again (they are overwritten with the
same values). ``dest.flush()`` must make the data durable: synjax's HDF5
volumes flush h5py's caches and fsync the file; tensorstore volumes are
durable once each write returns (the file driver fsyncs).

Provenance: the manifest's first line records the grid and, when given, a
``provenance`` dict naming what made the blocks (the model's step and
parameter hash, the input's path, shape, dtype and content fingerprint; see
:mod:`synjax.io.provenance`). A rerun whose provenance differs does not reuse
the recorded blocks: with ``resume="auto"`` it logs what differs and starts
the manifest afresh, so every block is computed (and written) again; with
``resume="strict"`` it stops with an error naming what differs.

Executors:

* ``"local"``: an in-process loop. Blocks are stacked into batches of
  ``batch_size``; the last batch is padded by repeating its last block so a
  ``jax.jit``-compiled ``predict_fn`` sees one shape only.
* ``"dask"``: ``dask.distributed``. Each task processes ``blocks_per_task``
  block ids (read, predict, write) and returns them; the driver appends them to
  the manifest as tasks finish. Pass a ``Client`` or ``LocalCluster`` as
  ``client`` (e.g. ``LocalCluster(n_workers=1, threads_per_worker=1,
  processes=False)``), or a ``LocalCluster`` with default settings is created.
  With worker processes, ``predict_fn``, ``source`` and ``dest`` must pickle:
  use on-disk volumes (not numpy arrays, whose writes would stay in a worker)
  and wrap model loading in :class:`LazyPredictor`. Even an in-process
  cluster pickles each task's arguments; numpy arrays survive this by
  reference (pickle-5 buffers), other in-memory objects are copied.

Parallel writers never write the same destination chunk when ``block_shape`` is
a multiple of the destination's chunk shape, because blocks start at multiples
of ``block_shape`` from the origin (last blocks are cropped, not shifted). The
dask executor refuses a destination whose ``chunks`` break this rule.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, read_padded
from synjax.inference.block_grid import BlockGrid
from synjax.io.atomic import write_text_atomic
from synjax.io.provenance import differences, plain
from synjax.report.progress import progress_bar

log = logging.getLogger(__name__)

EXECUTORS = ("local", "dask")
MANIFEST_FORMAT = "synjax-block-manifest-v2"
# Earlier formats with the same layout; their headers record no provenance.
OLDER_MANIFEST_FORMATS = ("synjax-block-manifest-v1",)
# What a rerun does with blocks made by another model or input (see the module docstring).
RESUME_MODES = ("auto", "strict")

Channels = int | Sequence[int] | None


@dataclasses.dataclass(frozen=True)
class BlockwiseSummary:
    """What one call of :func:`predict_blockwise` or :func:`blockwise_map` did.

    Attributes:
      total: Blocks in the grid.
      skipped: Blocks already recorded in the manifest, not computed again.
      computed: Blocks computed and written by this call.
    """

    total: int
    skipped: int
    computed: int


def _check_resume(resume: str) -> None:
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume={resume!r}: expected one of {RESUME_MODES}")


def _read_header(path: Path) -> dict[str, Any]:
    """The first line of an existing manifest, checked to be one.

    Raises:
      DataError: the file is not a block manifest.
    """
    with open(path, "rb") as f:
        first = f.readline()
    try:
        found = json.loads(first)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: first line is not JSON, expected a block manifest") from e
    if not isinstance(found, dict) or found.get("format") not in (
        MANIFEST_FORMAT,
        *OLDER_MANIFEST_FORMATS,
    ):
        format_ = found.get("format") if isinstance(found, dict) else None
        raise DataError(f"{path}: format {format_!r}, expected {MANIFEST_FORMAT}")
    return found


def _provenance_differences(found: dict[str, Any], provenance: dict | None) -> list[str]:
    """What differs between a manifest header's provenance and `provenance` (None: unchecked)."""
    if provenance is None:
        return []
    recorded = found.get("provenance")
    if recorded is None:
        return [f"provenance: not recorded ({found.get('format')} header)"]
    return differences(recorded, provenance)


def manifest_differences(
    path: str | os.PathLike, grid: BlockGrid, provenance: dict | None = None
) -> list[str] | None:
    """Why the blocks recorded in a manifest could not be reused for this grid and provenance.

    For callers that own the output and recreate it when it is stale (e.g.
    with another shape), before opening it for :func:`predict_blockwise`.

    Args:
      path: the manifest file.
      grid: the grid of this run.
      provenance: this run's provenance; None checks the grid only.

    Returns:
      None when there is no manifest (or it is empty), else the differences
      (``"grid: ..."`` and those of :func:`synjax.io.provenance.differences`),
      empty when the recorded blocks can be reused.

    Raises:
      DataError: the file is not a block manifest.
    """
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return None
    found = _read_header(path)
    grid_now = plain(grid.to_dict())
    found_grid = found.get("grid")
    grid_diff = [] if found_grid == grid_now else [f"grid: {found_grid} -> {grid_now}"]
    return grid_diff + _provenance_differences(found, provenance)


class BlockManifest:
    """Append-only JSON-lines record of finished block ids.

    The first line names the format, the grid and the provenance of the
    blocks (what made them, or null); each further line is ``{"blocks":
    [ids]}``. A last line cut short by a kill is ignored.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: BlockGrid,
        provenance: dict | None = None,
        resume: str = "auto",
    ):
        """Opens ``path``, creating it if absent.

        Args:
          path: the manifest file.
          grid: the grid of this run; a manifest of another grid is an error.
          provenance: what makes this run's blocks (JSON-serialisable, e.g.
            ``{"model": {...}, "input": {...}}``); None: not checked.
          resume: what to do when the recorded provenance differs:
            ``"auto"`` logs the differences and starts the manifest afresh
            (no block counts as done); ``"strict"`` raises.

        Raises:
          ConfigError: The file records a different grid, or ``resume`` is
            not one of ``RESUME_MODES``.
          DataError: The file is not a block manifest, or (``resume="strict"``)
            it records another provenance.
        """
        _check_resume(resume)
        self.path = Path(path)
        self.done: set[int] = set()
        header = {
            "format": MANIFEST_FORMAT,
            "grid": grid.to_dict(),
            "provenance": None if provenance is None else plain(provenance),
        }
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._start(header)
            return
        found = _read_header(self.path)
        if found.get("grid") != plain(header["grid"]):
            raise ConfigError(
                f"{self.path}: manifest is for grid {found.get('grid')}, not {header['grid']}; "
                "use another manifest_path or delete it"
            )
        stale = _provenance_differences(found, provenance)
        if stale:
            what = "; ".join(stale)
            if resume == "strict":
                raise DataError(
                    f"{self.path}: its blocks were made by another model or input ({what}); "
                    "resume='strict' does not reuse them: delete the output and this manifest, "
                    "or resume with 'auto' to start afresh"
                )
            log.warning(
                "%s: blocks made by another model or input (%s); starting afresh", self.path, what
            )
            self._start(header)
            return
        lines = self.path.read_text().splitlines()
        for line in lines[1:]:
            try:
                self.done.update(int(i) for i in json.loads(line)["blocks"])
            except (json.JSONDecodeError, KeyError, TypeError):
                # A kill during an append leaves a partial last line; its
                # blocks were not recorded, so they are simply computed again.
                log.warning("%s: ignoring unreadable line %r", self.path, line[:80])

    def _start(self, header: dict[str, Any]) -> None:
        """(Re)writes the manifest as its header alone, atomically and durably."""
        write_text_atomic(self.path, json.dumps(header) + "\n")

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    # Close off a partial line left by a killed run.
                    f.write(b"\n")
            f.write(json.dumps(record).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def record(self, block_ids: Sequence[int]) -> None:
        """Appends finished block ids; call only after their data is written."""
        ids = [int(i) for i in block_ids]
        if ids:
            self._append({"blocks": ids})
            self.done.update(ids)


_LAZY_CACHE: dict[str, Callable] = {}
_LAZY_LOCK = threading.Lock()


class LazyPredictor:
    """A picklable ``predict_fn`` that builds the real one once per process.

    Pickling a jitted function with its parameters is often impossible or
    wasteful; instead ship the recipe: ``LazyPredictor(make_fn, checkpoint_dir)``
    calls ``make_fn(checkpoint_dir)`` on first use in each worker process and
    reuses the result for all later blocks there.
    """

    def __init__(self, factory: Callable[..., Callable], *args: Any, **kwargs: Any):
        self.factory = factory
        self.args = args
        self.kwargs = kwargs
        self.token = uuid.uuid4().hex

    def __call__(self, batch: np.ndarray) -> Any:
        fn = _LAZY_CACHE.get(self.token)
        if fn is None:
            with _LAZY_LOCK:
                fn = _LAZY_CACHE.get(self.token)
                if fn is None:
                    fn = _LAZY_CACHE[self.token] = self.factory(*self.args, **self.kwargs)
        return fn(batch)


def _select_channels(out: np.ndarray, channels: Channels, dest_ndim: int) -> np.ndarray:
    """Picks the output channels written to ``dest``.

    Args:
      out: ``[b, z, y, x]`` or ``[b, z, y, x, c]`` block-function output.
      channels: See :func:`predict_blockwise`.
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
class _BlockJob:
    """Everything needed to process a list of blocks; picklable when its parts are."""

    block_fn: Callable[[np.ndarray], Any]
    source: Any
    dest: Any
    grid: BlockGrid
    batch_size: int
    input_dtype: np.dtype | None
    channels: Channels
    pad_batches: bool

    def run(self, block_ids: Sequence[int]) -> list[int]:
        """Reads, computes and writes ``block_ids``; returns them once written."""
        grid, dest = self.grid, self.dest
        for first in range(0, len(block_ids), self.batch_size):
            ids = list(block_ids[first : first + self.batch_size])
            inputs = [read_padded(self.source, grid.input_box(i), grid.pad_mode) for i in ids]
            if self.pad_batches:
                inputs += inputs[-1:] * (self.batch_size - len(inputs))
            batch = np.stack(inputs)
            if self.input_dtype is not None:
                batch = batch.astype(self.input_dtype, copy=False)
            out = np.asarray(self.block_fn(batch))
            if out.ndim < SPATIAL_DIMS + 1 or out.shape[0] != len(inputs):
                raise DataError(
                    f"block function returned {out.shape} for a batch of {batch.shape}; "
                    "expected [batch, z, y, x] or [batch, z, y, x, channels]"
                )
            if out.shape[1 : SPATIAL_DIMS + 1] != grid.block_shape:
                raise DataError(
                    f"block function returned spatial shape {out.shape[1:4]}, expected the "
                    f"grid's block_shape {grid.block_shape} (input {grid.input_shape})"
                )
            out = _select_channels(out, self.channels, len(dest.shape))
            for k, block_id in enumerate(ids):
                # dest applies its own casting rules (synjax volumes refuse
                # floats into integer volumes rather than truncate them).
                dest[grid.output_box(block_id)] = out[k][grid.output_crop(block_id)]
        if hasattr(dest, "flush"):
            # The manifest must only name blocks whose data is durable.
            dest.flush()
        return [int(i) for i in block_ids]


def _run_job(job: _BlockJob, block_ids: Sequence[int]) -> list[int]:
    return job.run(block_ids)


def _chunked(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for first in range(0, len(items), size):
        yield list(items[first : first + size])


def _check_volumes(source: Any, dest: Any, grid: BlockGrid) -> None:
    for name, volume in (("source", source), ("dest", dest)):
        if len(volume.shape) not in (SPATIAL_DIMS, SPATIAL_DIMS + 1):
            raise DataError(
                f"{name} shape {tuple(volume.shape)}: expected [z, y, x] or [z, y, x, c]"
            )
        if tuple(volume.shape[:SPATIAL_DIMS]) != grid.volume_shape:
            raise DataError(
                f"{name} spatial shape {tuple(volume.shape[:SPATIAL_DIMS])} differs from the "
                f"grid's volume_shape {grid.volume_shape}"
            )


def _chunks_aligned(dest: Any, grid: BlockGrid) -> bool:
    """Whether every dest chunk lies in exactly one block (True if unchunked)."""
    chunks = getattr(dest, "chunks", None)
    if not chunks:
        return True
    return all(b % c == 0 for b, c in zip(grid.block_shape, chunks[:SPATIAL_DIMS], strict=True))


def _run_dask(
    job: _BlockJob,
    todo: list[int],
    blocks_per_task: int,
    manifest: BlockManifest | None,
    bar: Any,
    client: Any,
) -> None:
    """Runs ``todo`` on dask.distributed, recording blocks as tasks finish."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as e:
        raise ConfigError(
            "executor='dask' needs dask[distributed]: pip install synjax[distributed]"
        ) from e
    cluster = None
    own_client = not isinstance(client, Client)
    if client is None:
        cluster = client = LocalCluster(dashboard_address=None)
    if isinstance(client, LocalCluster):
        client = Client(client)
    futures = []
    try:
        futures = [
            client.submit(_run_job, job, ids, pure=False) for ids in _chunked(todo, blocks_per_task)
        ]
        for future in as_completed(futures):
            ids = future.result()
            if manifest is not None:
                manifest.record(ids)
            bar.update(len(ids))
    except BaseException:
        # Blocks of unfinished tasks stay out of the manifest and run again later.
        client.cancel(futures)
        raise
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


def _run_blocks(
    job: _BlockJob,
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
    _check_resume(resume)
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r}: expected one of {EXECUTORS}")
    if job.batch_size < 1 or blocks_per_task < 1:
        raise ConfigError(
            f"batch_size={job.batch_size}, blocks_per_task={blocks_per_task}: expected >= 1"
        )
    _check_volumes(job.source, job.dest, grid)
    if not _chunks_aligned(job.dest, grid):
        message = (
            f"block_shape {grid.block_shape} is not a multiple of the dest chunks "
            f"{tuple(job.dest.chunks)}: parallel writers would share chunks"
        )
        if executor == "dask":
            raise ConfigError(message)
        log.warning("%s (harmless for executor='local', but slower)", message)

    manifest = (
        BlockManifest(manifest_path, grid, provenance, resume)
        if manifest_path is not None
        else None
    )
    done = manifest.done if manifest is not None else set()
    todo = [i for i in grid.block_ids() if i not in done]
    log.info(
        "blockwise: %d blocks, %d already done, %d to do", grid.num_blocks, len(done), len(todo)
    )
    with progress_bar(
        total=grid.num_blocks,
        initial=grid.num_blocks - len(todo),
        disable=not progress,
        unit="block",
    ) as bar:
        if executor == "local":
            for ids in _chunked(todo, job.batch_size):
                job.run(ids)
                if manifest is not None:
                    manifest.record(ids)
                bar.update(len(ids))
        else:
            _run_dask(job, todo, blocks_per_task, manifest, bar, client)
    return BlockwiseSummary(grid.num_blocks, grid.num_blocks - len(todo), len(todo))


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
      manifest_path: JSON-lines file of finished block ids, making the run
        resumable (conventionally next to dest, e.g. ``dest.zarr.blocks.jsonl``);
        None: no manifest, every block is computed.
      executor: ``"local"`` or ``"dask"`` (see the module docstring).
      progress: Show a tqdm progress bar.
      channels: Output channels written to ``dest``: None (all; dest's channel
        axis, if any, must match), an int (that channel, into a ``[z, y, x]``
        dest) or a sequence of ints (those, into ``[z, y, x, len]``).
      client: For ``executor="dask"``: a ``distributed.Client`` or
        ``LocalCluster``; None creates a default ``LocalCluster``.
      blocks_per_task: Blocks per dask task (default ``batch_size``).
      provenance: What makes the blocks, recorded in the manifest and compared
        with what it records (see the module docstring): conventionally
        ``{"model": synjax.io.provenance.model_provenance(...), "input":
        synjax.io.provenance.input_fingerprint(...)}``. None: not checked.
      resume: ``"auto"`` (blocks of another provenance are computed again)
        or ``"strict"`` (they are an error).

    Returns:
      How many blocks were skipped and computed.
    """
    job = _BlockJob(
        block_fn=predict_fn,
        source=source,
        dest=dest,
        grid=grid,
        batch_size=batch_size,
        input_dtype=np.dtype(np.float32),
        channels=channels,
        pad_batches=True,
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
      client: Dask client or cluster for ``executor="dask"``.
      blocks_per_task: Blocks per dask task.
      provenance: What makes the blocks, as in :func:`predict_blockwise`.
      resume: ``"auto"`` or ``"strict"``, as in :func:`predict_blockwise`.

    Returns:
      How many blocks were skipped and computed.
    """
    grid = BlockGrid(tuple(source.shape[:SPATIAL_DIMS]), block_shape, context, pad_mode)
    job = _BlockJob(
        block_fn=_PerBlock(fn),
        source=source,
        dest=dest,
        grid=grid,
        batch_size=1,
        input_dtype=None,
        channels=None,
        pad_batches=False,
    )
    return _run_blocks(
        job, manifest_path, executor, progress, blocks_per_task, client, provenance, resume
    )
