"""What the passes of a block-wise segmentation have finished, kept on disk so a killed run resumes.

`blockwise_watershed.segment_blockwise` makes a segmentation in passes over
the volume (range, fragments, stitching, contacts, relabelling), and
`blockwise_candidates.generate_candidates_blockwise` finds partner candidates
in passes (components, overlaps, adjacency, site pairs). With a
state folder, each pass leaves what a restarted run needs in order not to
compute again what is finished:

* ``header.json``: the format, the block grid and the provenance (what the
  segmentation is made from and with which parameters). A state with another
  header is wiped: nothing of it is reused.
* ``<pass>.npz``: the result of a pass over the whole volume (the range, the
  stitched pairs, the region graph's contacts, the final id table), written
  atomically once the pass is over.
* ``<pass>.blocks/``: the done-array of a pass made block by block
  (`synjax.inference.done_blocks.DoneBlocks`), and ``<pass>/<block>.npz``,
  each block's small results (fragment count, seed keys, face bits), written
  atomically before the block is recorded as done.

A kill, SIGKILL included, leaves every file either absent or whole
(`synjax.io.atomic`): a block recorded as done has its results on disk, and
one written but not recorded is computed again, with the same values.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synjax.inference.block_grid import BlockGrid
from synjax.inference.done_blocks import DoneBlocks
from synjax.io.atomic import write_bytes_atomic, write_text_atomic
from synjax.io.provenance import differences, plain

log = logging.getLogger(__name__)

STATE_FORMAT = "synjax-segmentation-passes-v1"
HEADER_FILE = "header.json"


def _npz_bytes(arrays: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(value) for name, value in arrays.items()})
    return buffer.getvalue()


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        return None
    with np.load(path) as stored:
        return {name: stored[name] for name in stored.files}


class PassState:
    """The state folder of one segmentation (see the module docstring).

    Attributes:
      path: the folder.
      grid: the block grid of the segmentation's passes.
    """

    def __init__(self, path: str | os.PathLike, grid: BlockGrid, provenance: dict):
        """Opens the state at `path`; one of another grid or provenance is wiped first.

        Args:
          path: the state folder (created if absent).
          grid: the blocks of the passes.
          provenance: what the segmentation is made from and with (JSON-serialisable).
        """
        self.path = Path(path)
        self.grid = grid
        header = plain({"format": STATE_FORMAT, "grid": grid.to_dict(), "provenance": provenance})
        found = self._read_header()
        if found != header:
            if found is not None:
                what = "; ".join(differences(found, header)) or "unreadable header"
                log.warning("%s was made differently (%s); starting afresh", self.path, what)
            self.remove()
            self.path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path / HEADER_FILE, json.dumps(header) + "\n")

    def _read_header(self) -> dict | None:
        try:
            return json.loads((self.path / HEADER_FILE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def load(self, name: str) -> dict[str, np.ndarray] | None:
        """The arrays a finished pass `name` saved, None when it has not finished."""
        return _read_npz(self.path / f"{name}.npz")

    def save(self, name: str, **arrays: Any) -> None:
        """Saves the result of pass `name` (atomically: whole or absent after a kill)."""
        write_bytes_atomic(self.path / f"{name}.npz", _npz_bytes(arrays))

    def blocks(self, name: str, grid: BlockGrid | None = None) -> DoneBlocks:
        """The done-array of pass `name` over `grid` (default: the state's), none done when new."""
        return DoneBlocks(self.path / f"{name}.blocks", grid or self.grid, {"pass": name})

    def save_block(self, name: str, block_id: int, **arrays: Any) -> None:
        """Saves one block's results of pass `name`; record the block as done after this."""
        write_bytes_atomic(self.path / name / f"{int(block_id)}.npz", _npz_bytes(arrays))

    def load_block(self, name: str, block_id: int) -> dict[str, np.ndarray]:
        """One done block's results of pass `name`.

        Raises:
          FileNotFoundError: the block has none (it was not recorded as done).
        """
        found = _read_npz(self.path / name / f"{int(block_id)}.npz")
        if found is None:
            raise FileNotFoundError(self.path / name / f"{int(block_id)}.npz")
        return found

    def forget(self, name: str) -> None:
        """Drops pass `name`'s block results and done-array (a pass started afresh)."""
        (self.path / f"{name}.npz").unlink(missing_ok=True)
        shutil.rmtree(self.path / f"{name}.blocks", ignore_errors=True)
        shutil.rmtree(self.path / name, ignore_errors=True)

    def remove(self) -> None:
        """Deletes the whole state, its header first (a state without one counts as nothing)."""
        (self.path / HEADER_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)


def each_block_result(
    state: PassState | None,
    name: str,
    block_ids: Sequence[int],
    compute: Callable[[int], dict[str, Any]],
    each: Callable[[Sequence[int]], Iterable[int]] = iter,
    grid: BlockGrid | None = None,
) -> Iterator[dict[str, Any]]:
    """`compute(block_id)` of each of `block_ids`, in their order; with `state`, resumable.

    With a state, each block's result (a dict of arrays) is saved and the
    block recorded as done in pass `name`'s done-array before it is yielded;
    blocks recorded by an earlier run are read back instead of computed. The
    results come in the same order either way, so what they are folded into
    is the same.

    Args:
      state: the pass state, or None (every block computed).
      name: the pass (its files in the state).
      block_ids: the blocks of `grid`, in the order to yield them.
      compute: one block's result.
      each: wraps the ids (e.g. in a progress bar).
      grid: the pass's grid (default: the state's).
    """
    if state is None:
        for block_id in each(block_ids):
            yield compute(block_id)
        return
    done = state.blocks(name, grid)
    todo = set(done.todo().tolist())
    if len(todo) < len(block_ids):
        log.info(
            "%s, %s: %d of %d blocks done before",
            state.path,
            name,
            len(block_ids) - len(todo),
            len(block_ids),
        )
    for block_id in each(block_ids):
        if block_id not in todo:
            yield state.load_block(name, block_id)
            continue
        result = compute(block_id)
        state.save_block(name, block_id, **result)
        done.record([block_id])
        yield result


def remove_pass_state(path: str | os.PathLike) -> None:
    """Deletes the pass state at `path`, if any, its header first (as `PassState.remove`)."""
    (Path(path) / HEADER_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)
