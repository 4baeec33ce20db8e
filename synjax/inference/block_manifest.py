"""The JSON-lines manifest of finished blocks (one line per recorded batch).

The first line names the format, the grid and the provenance of the blocks
(what made them, or null); each further line is ``{"blocks": [ids]}``. A block
id is appended (and fsync'ed) only after its data was written and flushed, so
a killed run loses no block; a last line cut short by a kill is ignored.

For grids of millions of blocks, :mod:`synjax.inference.done_blocks` keeps the
same state in a chunked array instead; :func:`open_done_state` picks one of the
two by the path's name.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.inference.block_grid import BlockGrid
from synjax.io.atomic import write_text_atomic
from synjax.io.provenance import differences, plain

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "synjax-block-manifest-v2"
# Earlier formats with the same layout; their headers record no provenance.
OLDER_MANIFEST_FORMATS = ("synjax-block-manifest-v1",)
# What a rerun does with blocks made by another model or input.
RESUME_MODES = ("auto", "strict")


def check_resume(resume: str) -> None:
    """Raises a ConfigError unless `resume` is one of RESUME_MODES."""
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


def provenance_differences(found: dict[str, Any], provenance: dict | None) -> list[str]:
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
    return grid_diff + provenance_differences(found, provenance)


def blocks_reusable(
    path: Path,
    found: dict[str, Any],
    header: dict[str, Any],
    provenance: dict | None,
    resume: str,
    kind: str,
    instead: str = "another output",
) -> bool:
    """Whether the finished blocks recorded under the header `found` may be reused.

    Args:
      path: the record (a manifest file or a done-state folder), for messages.
      found: the header read back from it.
      header: this run's header (its "grid").
      provenance: what makes this run's blocks; None: not checked.
      resume: "auto" (another provenance: log why, return False) or "strict".
      kind: what `path` is, for messages ("manifest", "done-state").
      instead: what to use instead of a record of another grid, for messages.

    Raises:
      ConfigError: `found` records another grid.
      DataError: `resume="strict"` and the blocks were made by another model
        or input.
    """
    if found.get("grid") != plain(header["grid"]):
        raise ConfigError(
            f"{path}: {kind} of grid {found.get('grid')}, not {header['grid']}; "
            f"use {instead} or delete it"
        )
    stale = provenance_differences(found, provenance)
    if not stale:
        return True
    what = "; ".join(stale)
    if resume == "strict":
        raise DataError(
            f"{path}: its blocks were made by another model or input ({what}); "
            f"resume='strict' does not reuse them: delete the output and this {kind}, "
            "or resume with 'auto' to start afresh"
        )
    log.warning("%s: blocks made by another model or input (%s); starting afresh", path, what)
    return False


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
        check_resume(resume)
        self.path = Path(path)
        self.grid = grid
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
        if not blocks_reusable(
            self.path, found, header, provenance, resume, "manifest", "another manifest_path"
        ):
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

    def todo(self) -> np.ndarray:
        """int64 ids of the blocks not recorded as done, in increasing order."""
        done = np.zeros(self.grid.num_blocks, bool)
        done[np.fromiter(self.done, np.int64, len(self.done))] = True
        return np.flatnonzero(~done)

    # Every record is appended and fsync'ed: what is in memory is on disk.
    missing = todo
