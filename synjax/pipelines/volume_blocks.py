"""The block loop of the instance pipelines on a user's volume: pending blocks, retried, shown.

Both instance pipelines (`instance_volume.py`, the EM instance network, and
`fluorescence_volume.py`, the 3D Mask R-CNN) detect a volume block by block
into stores of their own (painted labels; sparse masks) and keep a done-state
beside them (`synjax.inference.done_blocks`). This loop is what they share:
the blocks the done-state does not mark are computed in batches, each batch
tried again when it raises, stored, then recorded (so a kill, even SIGKILL,
loses at most the batches in flight and never records a block not stored),
with a progress bar of blocks done, rate and ETA. A batch that fails every try
stops the run with one line naming its blocks; a block left unrecorded at the
end is an error too, never a silent gap.

Executors (`config.predict.executor`, as for the other pipelines):

* `"local"`: the batches run one after another in this process.
* `"dask"`: each batch is a `dask.distributed` task
  (`synjax.inference.block_dask.run_dask`, the block-wise runner's executor):
  the worker computes it, tries it again when it raises, and stores it
  itself (every block has store chunks or files of its own, so workers never
  share one); this process records each batch as its task returns, then
  does the stitching. The `BlockWork` must then pickle: module-level
  callables holding on-disk stores, and the model in a
  `synjax.inference.lazy_model.LazyPredictor` (one load per worker).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from synjax.errors import ConfigError, DataError
from synjax.inference.block_dask import chunked, run_dask
from synjax.inference.blockwise import EXECUTORS
from synjax.report.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class BlockWork:
    """How a batch of blocks is computed and stored; picklable when its callables are.

    Attributes:
      predict: the batch's block ids -> its result (reads and computes; no
        writes, so that a retry starts clean).
      store: (block ids, result) -> writes the result durably (flushed): the
        blocks are recorded as done once it returns.
      describe: block ids -> words naming them in an error ("blocks [3, 4] (first: ...)").
      batch_size: blocks per `predict` call.
      retries: further tries of a batch whose `predict` or `store` raised.
    """

    predict: Callable[[list[int]], Any]
    store: Callable[[list[int], Any], None]
    describe: Callable[[Sequence[int]], str]
    batch_size: int
    retries: int

    def _attempt(self, step: str, chunk: list[int], action: Callable[..., Any], *args) -> Any:
        """`action(chunk, *args)`, tried `1 + retries` times; then a one-line `DataError`."""
        for attempt in range(self.retries + 1):
            try:
                return action(chunk, *args)
            except Exception as error:  # noqa: BLE001 - named and re-raised below
                if attempt == self.retries:
                    # One line (the CLI prints it as is): the error's first line.
                    reason = (str(error).strip().splitlines() or [""])[0]
                    raise DataError(
                        f"{step} {self.describe(chunk)} failed after {attempt + 1} tries: "
                        f"{type(error).__name__}: {reason}"
                    ) from error
                logging.warning("blocks %s failed %s (%s); trying again", chunk, step, error)
        raise AssertionError("unreachable")

    def run(self, block_ids: Sequence[int]) -> list[int]:
        """Computes and stores `block_ids` batch by batch; returns them once stored."""
        block_ids = [int(b) for b in block_ids]
        for first in range(0, len(block_ids), self.batch_size):
            chunk = block_ids[first : first + self.batch_size]
            result = self._attempt("predicting", chunk, self.predict)
            self._attempt("storing", chunk, self.store, result)
        return block_ids


def check_executor(executor: str, where: str = "config.predict.executor") -> None:
    """Raises a `ConfigError` unless `executor` is one of `EXECUTORS`."""
    if executor not in EXECUTORS:
        raise ConfigError(f"{where}={executor!r}: expected one of {EXECUTORS}")


def predict_pending(
    done,
    num_blocks: int,
    work: BlockWork,
    desc: str,
    output: str,
    executor: str = "local",
    client: Any = None,
) -> int:
    """Computes and stores every block that `done` does not mark; returns how many it computed.

    Args:
      done: the output's done-state (`todo()`, `record(ids)`, `missing()`).
      num_blocks: blocks of the whole grid (for the progress bar).
      work: how a batch is computed and stored (see `BlockWork`).
      desc: the progress bar's label.
      output: the stored output, for errors.
      executor: "local" or "dask" (see the module docstring).
      client: for "dask": a `distributed.Client`, a `LocalCluster` or a
        scheduler address; None (or "") starts a `LocalCluster` for the run.

    Raises:
      ConfigError: an unknown executor, or "dask" without dask.distributed.
      DataError: a batch failed every try (naming it and the last error), or
        a block is not recorded as done at the end.
    """
    check_executor(executor)
    todo = [int(b) for b in done.todo()]
    with progress_bar(
        total=num_blocks, initial=num_blocks - len(todo), unit="block", desc=desc
    ) as bar:

        def on_written(chunk: list[int]) -> None:
            done.record(chunk)
            bar.update(len(chunk))

        if executor == "dask":
            if todo:
                run_dask(work, todo, work.batch_size, on_written, client or None)
        else:
            for chunk in chunked(todo, work.batch_size):
                on_written(work.run(chunk))
    missing = done.missing()
    if len(missing):
        raise DataError(f"{output}: blocks {list(missing)[:10]} were not computed")
    return len(todo)
