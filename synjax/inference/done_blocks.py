"""Which blocks of a block-wise output are written: a chunked done-array kept with the output.

A done-state folder (conventionally ``<output>.blocks``, see
:func:`synjax.io.layout.blocks_manifest`) holds

* ``header.json``: the format, the grid and the provenance of the blocks
  (what made them: the model's step and parameter hash, the input's path,
  shape and fingerprint; see :mod:`synjax.io.provenance`), written atomically;
* ``done.zarr``: a uint8 array of the grid's shape ``[gz, gy, gx]``, one
  element per block, 1 once the block's data is written and flushed.

Unlike a line per block, the array costs one byte per block on disk and in
memory, and recording a block rewrites one small chunk, so grids of millions of
blocks stay cheap. A chunk is replaced atomically by tensorstore (written to a
temporary file, renamed), so a kill, even SIGKILL, leaves every element either
as it was or set: a block recorded as done is always written; a block written
but not yet recorded is computed again by the next run (with the same values).

A rerun whose grid or provenance differs does not reuse the recorded blocks
(``resume="auto"``: logged, the state starts afresh; ``"strict"``: an error).

:func:`open_done_state` opens this state, or the older JSON-lines manifest
(:mod:`synjax.inference.block_manifest`) when the path ends in ``.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synjax.errors import DataError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_manifest import (
    BlockManifest,
    blocks_reusable,
    check_resume,
    manifest_differences,
    provenance_differences,
)
from synjax.io import create_volume, open_volume
from synjax.io.atomic import write_text_atomic
from synjax.io.provenance import plain

log = logging.getLogger(__name__)

DONE_FORMAT = "synjax-done-blocks-v1"
HEADER_FILE = "header.json"
DONE_ARRAY = "done.zarr"
# Chunk edge of the done-array: 32^3 blocks per chunk, 32 KiB uncompressed.
DONE_CHUNK_EDGE = 32
MANIFEST_SUFFIX = ".jsonl"


def _read_header(path: Path) -> dict[str, Any] | None:
    """The header of a done-state folder, None when it has none.

    Raises:
      DataError: the folder's header is not a done-state header.
    """
    header = path / HEADER_FILE
    if not header.exists():
        return None
    try:
        found = json.loads(header.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{header}: not JSON, expected a block done-state header") from e
    if not isinstance(found, dict) or found.get("format") != DONE_FORMAT:
        format_ = found.get("format") if isinstance(found, dict) else None
        raise DataError(f"{header}: format {format_!r}, expected {DONE_FORMAT}")
    return found


class DoneBlocks:
    """The done-array of one output's grid (see the module docstring).

    Attributes:
      path: the done-state folder.
      grid: the grid of this run.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        grid: BlockGrid,
        provenance: dict | None = None,
        resume: str = "auto",
    ):
        """Opens the done-state at ``path``, creating it (no block done) if absent.

        Args:
          path: the done-state folder.
          grid: the grid of this run; a state of another grid is an error.
          provenance: what makes this run's blocks (JSON-serialisable); None:
            not checked.
          resume: ``"auto"`` starts afresh when the recorded provenance
            differs (and logs why); ``"strict"`` raises.

        Raises:
          ConfigError: the folder records another grid, or ``resume`` is not
            one of ``RESUME_MODES``.
          DataError: the folder is not a done-state, or (``"strict"``) its
            blocks were made by another model or input.
        """
        check_resume(resume)
        self.path = Path(path)
        self.grid = grid
        header = {
            "format": DONE_FORMAT,
            "grid": grid.to_dict(),
            "provenance": None if provenance is None else plain(provenance),
        }
        found = _read_header(self.path)
        if found is None or not (self.path / DONE_ARRAY).exists():
            self._start(header)
            return
        if not blocks_reusable(self.path, found, header, provenance, resume, "done-state"):
            self._start(header)
            return
        try:
            self._array = open_volume(str(self.path / DONE_ARRAY), mode="r+")
        except DataError:
            # A kill while the array was being created: nothing was recorded in it.
            log.warning("%s: unreadable done-array; starting afresh", self.path)
            self._start(header)
            return
        self._done = self._read_done()

    def _start(self, header: dict[str, Any]) -> None:
        """(Re)creates the state with no block done.

        The old header goes first, then the old array; the new header is
        written before the new array. A kill at any point leaves no header, or
        no readable array: either counts as nothing done.
        """
        (self.path / HEADER_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.path / DONE_ARRAY, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / HEADER_FILE, json.dumps(header) + "\n")
        chunks = tuple(min(g, DONE_CHUNK_EDGE) for g in self.grid.grid_shape)
        self._array = create_volume(
            str(self.path / DONE_ARRAY), self.grid.grid_shape, np.uint8, chunks=chunks
        )
        self._done = np.zeros(self.grid.num_blocks, bool)

    def _read_done(self) -> np.ndarray:
        return np.asarray(self._array.read()).reshape(-1) != 0

    def record(self, block_ids: Sequence[int]) -> None:
        """Marks blocks as done; call only after their data is written and flushed."""
        ids = np.unique(np.asarray(block_ids, np.int64))
        if ids.size == 0:
            return
        positions = np.stack(np.unravel_index(ids, self.grid.grid_shape), axis=1)
        # One write per run of consecutive x positions in one (z, y) row: a
        # batch of consecutive ids costs a few chunk writes, not one per block.
        breaks = np.flatnonzero(
            np.any(np.diff(positions[:, :2], axis=0) != 0, axis=1) | (np.diff(positions[:, 2]) != 1)
        )
        for run in np.split(positions, breaks + 1):
            (z, y, x0), x1 = run[0], run[-1][2] + 1
            self._array[z : z + 1, y : y + 1, x0:x1] = np.ones((1, 1, x1 - x0), np.uint8)
        self._done[ids] = True

    def todo(self) -> np.ndarray:
        """int64 ids of the blocks not done, in increasing order (as recorded in memory)."""
        return np.flatnonzero(~self._done)

    def missing(self) -> np.ndarray:
        """int64 ids of the blocks that the array on disk does not mark done."""
        return np.flatnonzero(~self._read_done())


DoneState = DoneBlocks | BlockManifest


def _is_manifest(path: Path) -> bool:
    return path.name.endswith(MANIFEST_SUFFIX)


def open_done_state(
    path: str | os.PathLike, grid: BlockGrid, provenance: dict | None = None, resume: str = "auto"
) -> DoneState:
    """The done-state at ``path``: a JSON-lines manifest for ``*.jsonl``, else a done-array."""
    path = Path(path)
    if _is_manifest(path):
        return BlockManifest(path, grid, provenance, resume)
    return DoneBlocks(path, grid, provenance, resume)


def done_state_differences(
    path: str | os.PathLike, grid: BlockGrid, provenance: dict | None = None
) -> list[str] | None:
    """Why the blocks recorded at ``path`` could not be reused for this grid and provenance.

    For callers that own the output and recreate it when it is stale.

    Returns:
      None when nothing is recorded there, else the differences (``"grid:
      ..."`` and those of :func:`synjax.io.provenance.differences`), empty
      when the recorded blocks can be reused.

    Raises:
      DataError: ``path`` is not a done-state.
    """
    path = Path(path)
    if _is_manifest(path):
        return manifest_differences(path, grid, provenance)
    found = _read_header(path) if path.is_dir() else None
    if found is None or not (path / DONE_ARRAY).exists():
        return None
    grid_now = plain(grid.to_dict())
    grid_diff = (
        [] if found.get("grid") == grid_now else [f"grid: {found.get('grid')} -> {grid_now}"]
    )
    return grid_diff + provenance_differences(found, provenance)


def remove_done_state(path: str | os.PathLike) -> None:
    """Deletes a done-state (folder or manifest file), if any: nothing counts as done."""
    path = Path(path)
    if path.is_dir():
        # The header first: a state without one counts as nothing done.
        (path / HEADER_FILE).unlink(missing_ok=True)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
