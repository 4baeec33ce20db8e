"""The block loop of the instance pipelines on a user's volume: pending blocks, retried, shown.

Both instance pipelines (`instance_volume.py`, the EM instance network, and
`fluorescence_volume.py`, the 3D Mask R-CNN) detect a volume block by block
into stores of their own (painted labels; sparse masks) and keep a done-state
beside them (`synjax.inference.done_blocks`). This loop is what they share:
the blocks the done-state does not mark are computed in batches, each batch
tried again when it raises, stored, then recorded (so a kill, even SIGKILL,
loses at most the batch in flight and never records a block not stored), with
a progress bar of blocks done, rate and ETA. A batch that fails every try
stops the run with one line naming its blocks; a block left unrecorded at the
end is an error too, never a silent gap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from synjax.errors import DataError
from synjax.report.progress import progress_bar


def predict_pending(
    done,
    num_blocks: int,
    batch_size: int,
    retries: int,
    predict: Callable[[list[int]], Any],
    store: Callable[[list[int], Any], None],
    describe: Callable[[Sequence[int]], str],
    desc: str,
    output: str,
) -> int:
    """Computes and stores every block that `done` does not mark; returns how many it computed.

    Args:
      done: the output's done-state (`todo()`, `record(ids)`, `missing()`).
      num_blocks: blocks of the whole grid (for the progress bar).
      batch_size: blocks per `predict` call.
      retries: further tries of a batch that raised.
      predict: the batch's block ids -> its result (reads and computes; no writes,
        so that a retry starts clean).
      store: (block ids, result) -> writes the result; the blocks are recorded after it.
      describe: block ids -> words naming them in an error ("blocks [3, 4] (first: ...)").
      desc: the progress bar's label.
      output: the stored output, for errors.

    Raises:
      DataError: a batch failed every try (naming it and the last error), or
        a block is not recorded as done at the end.
    """
    todo = [int(b) for b in done.todo()]
    with progress_bar(
        total=num_blocks, initial=num_blocks - len(todo), unit="block", desc=desc
    ) as bar:
        for first in range(0, len(todo), batch_size):
            chunk = todo[first : first + batch_size]
            for attempt in range(retries + 1):
                try:
                    result = predict(chunk)
                    break
                except Exception as error:  # noqa: BLE001 - named and re-raised below
                    if attempt == retries:
                        raise DataError(
                            f"{describe(chunk)} failed after {attempt + 1} tries: "
                            f"{type(error).__name__}: {error}"
                        ) from error
                    logging.warning("blocks %s failed (%s); trying again", chunk, error)
            store(chunk, result)
            done.record(chunk)
            bar.update(len(chunk))
    missing = done.missing()
    if len(missing):
        raise DataError(f"{output}: blocks {list(missing)[:10]} were not computed")
    return len(todo)
