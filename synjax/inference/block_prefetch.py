"""The local executor: host reads and writes overlap the block function's compute.

Batch ``k`` is computed in the calling thread while one thread reads batch
``k + 1`` and another writes batch ``k - 1`` (JAX, numpy, h5py and tensorstore
release the GIL while they work). At most three batches are in memory at any
time (one being read, one computed, one written), whatever the volume's size.

A batch is recorded as done by the writing thread as soon as its write (and the
destination's flush) returned, in order, while the next batch is still being
computed. When any step fails, the write already under way is finished (and
recorded) before the error propagates, so nothing written is lost.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable, Sequence

from synjax.inference.block_job import BlockJob


def run_prefetched(
    job: BlockJob,
    batches: Iterable[Sequence[int]],
    on_written: Callable[[list[int]], None],
) -> None:
    """Runs ``batches`` of block ids through ``job``, reading ahead and writing behind.

    Args:
      job: the read, compute and write steps.
      batches: lists of block ids, processed in this order; taken one at a
        time (a generator keeps the bookkeeping of millions of blocks small).
      on_written: called (in the writing thread) with each batch's ids once
        they are written and flushed, in order (records them, advances the
        progress bar).

    Raises:
      BlockError: a step kept failing (see ``BlockJob``); batches written
        before it were passed to ``on_written``.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    with (
        concurrent.futures.ThreadPoolExecutor(1, "synjax-read") as reader,
        concurrent.futures.ThreadPoolExecutor(1, "synjax-write") as writer,
    ):
        writing: concurrent.futures.Future | None = None

        def write_and_record(ids: list[int], out) -> None:
            job.write(ids, out)
            on_written(ids)

        def finish_write() -> None:
            nonlocal writing
            if writing is not None:
                future, writing = writing, None
                future.result()

        ids, reading = list(first), reader.submit(job.read, first)
        try:
            while ids is not None:
                batch = reading.result()
                following = next(batches, None)
                if following is not None:
                    reading = reader.submit(job.read, following)
                out = job.compute(ids, batch)
                del batch
                # The previous write must end before this one starts: a bounded
                # pipeline, and records in block order.
                finish_write()
                writing = writer.submit(write_and_record, ids, out)
                del out
                ids = None if following is None else list(following)
            finish_write()
        except BaseException:
            reading.cancel()
            if writing is not None:
                # Keep what is being written: it is recorded if it succeeds.
                concurrent.futures.wait([writing])
            raise
