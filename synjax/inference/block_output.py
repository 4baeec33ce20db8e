"""A block-wise output and its done-state: reopened to resume, or created afresh when stale."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import Any

from synjax.errors import ConfigError, DataError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_manifest import RESUME_MODES
from synjax.inference.done_blocks import done_state_differences, remove_done_state
from synjax.io import create_volume, layout, open_volume
from synjax.io.volume_base import Volume

log = logging.getLogger(__name__)


def open_block_output(
    path: pathlib.Path,
    shape: Sequence[int],
    dtype: Any,
    grid: BlockGrid,
    provenance: dict,
    resume: str = "auto",
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    chunks: Sequence[int] | None = None,
) -> tuple[Volume, pathlib.Path]:
    """The zarr output at `path` to write block by block, and its done-state path.

    An output whose done-state records this grid and provenance is reopened
    (its blocks are kept); otherwise (absent, or made by another model, input
    or grid) it is created afresh, its done-state removed first so that none
    vouches for blocks of an empty output. With `resume="strict"` a stale
    output is an error instead.

    Raises:
      ConfigError: `resume` is not "auto" or "strict".
      DataError: (`"strict"`) the existing output was made differently.
    """
    if resume not in RESUME_MODES:
        raise ConfigError(f"config.predict.resume={resume!r}: expected one of {RESUME_MODES}")
    done = layout.blocks_manifest(path)
    stale = done_state_differences(done, grid, provenance) if path.exists() else None
    if stale == []:
        return open_volume(str(path), mode="r+"), done
    if stale:
        what = "; ".join(stale)
        if resume == "strict":
            raise DataError(
                f"{path} was made by another model, input or block grid ({what}); "
                "config.predict.resume=strict does not reuse it: delete it or set "
                "config.predict.resume=auto to predict it afresh"
            )
        log.warning("%s was made differently (%s); predicting it afresh", path, what)
    remove_done_state(done)
    remove_done_state(layout.blocks_manifest_v1(path))  # what earlier versions kept
    dest = create_volume(
        str(path), shape, dtype, resolution=resolution, offset=offset, chunks=chunks, overwrite=True
    )
    return dest, done
