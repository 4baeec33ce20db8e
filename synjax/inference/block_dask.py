"""The Dask executor: batches of blocks as ``dask.distributed`` tasks, recorded as they finish.

Each task runs :meth:`BlockJob.run` on ``blocks_per_task`` block ids (read,
compute, write, each step retried as the job says) and returns them; the driver
records them as done when the task's result arrives. With worker processes the
job must pickle: on-disk volumes, and the model wrapped in a
:class:`~synjax.inference.lazy_model.LazyPredictor` so that each worker builds
(loads) it once and reuses it for all its tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from synjax.errors import ConfigError
from synjax.inference.block_job import BlockJob, run_job


def chunked(items: Sequence[int], size: int) -> Iterator[list[int]]:
    """``items`` in consecutive lists of ``size`` (the last may be shorter), made lazily."""
    for first in range(0, len(items), size):
        yield [int(i) for i in items[first : first + size]]


def run_dask(
    job: BlockJob,
    todo: Sequence[int],
    blocks_per_task: int,
    on_written: Callable[[list[int]], None],
    client: Any = None,
) -> None:
    """Runs the blocks ``todo`` on dask.distributed.

    Args:
      job: the job each task runs on its blocks.
      todo: block ids to compute.
      blocks_per_task: block ids per task.
      on_written: called in this thread with each task's ids once written.
      client: a ``distributed.Client``, a ``LocalCluster`` (a client is opened
        on it), a scheduler address (``"tcp://host:8786"``), or None for a
        default ``LocalCluster`` created and closed here.

    Raises:
      ConfigError: dask.distributed is not installed.
      BlockError: a task's blocks kept failing; tasks not yet finished are
        cancelled and their blocks stay unrecorded.
    """
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
    if isinstance(client, LocalCluster | str):
        client = Client(client)
    futures = []
    try:
        futures = [
            client.submit(run_job, job, ids, pure=False) for ids in chunked(todo, blocks_per_task)
        ]
        for future in as_completed(futures):
            on_written(future.result())
    except BaseException:
        # Blocks of unfinished tasks stay unrecorded and run again later.
        client.cancel(futures)
        raise
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
