"""Host batches sampled in a background thread while the device runs the step.

`BatchPrefetcher(batch_fn, steps, depth)` calls `batch_fn(step)` for the
steps in order, at most `depth` batches ahead of the loop, so that sampling,
cropping and augmenting the next patches overlaps the current step instead of
following it. The loop receives exactly the batches it would have made itself
(same steps, same order, same function), so a prefetched run trains the same
parameters. An error raised while sampling is raised again in the loop's
thread, at the step it belongs to; `close` (or leaving the `with` block) stops
and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

# How often (s) a waiting put or get looks whether it should give up.
_POLL_S = 0.05

HostBatch = dict[str, np.ndarray]


class BatchPrefetcher:
    """Samples the host batches of `steps` ahead of the loop, in a background thread.

    Attributes:
      depth: most batches sampled ahead of the one the loop asks for; 0: none,
        each batch is made in the caller's thread when asked for.
    """

    def __init__(
        self, batch_fn: Callable[[int], HostBatch], steps: Iterable[int], depth: int
    ) -> None:
        """Starts sampling (when `depth` > 0).

        Args:
          batch_fn: `step -> host batch` (`synjax.train.loop.train`'s); it is
            called from one background thread, one step at a time.
          steps: the steps whose batches are asked for, in the order asked.
          depth: most batches made ahead; 0 samples nothing in the background.
        """
        if depth < 0:
            raise ValueError(f"BatchPrefetcher: depth={depth}; expected >= 0")
        self.depth = depth
        self._batch_fn = batch_fn
        self._steps = list(steps)
        self._queue: queue.Queue[tuple[int, HostBatch | None, BaseException | None]] = queue.Queue(
            maxsize=max(depth, 1)
        )
        self._stop = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(
                target=self._sample_all, name="synjax-batch-prefetch", daemon=True
            )
            self._thread.start()

    def _sample_all(self) -> None:
        for step in self._steps:
            if self._stop.is_set():
                return
            try:
                item = (step, self._batch_fn(step), None)
            except Exception as error:  # noqa: BLE001 - raised again in the loop's thread
                item = (step, None, error)
            if not self._put(item) or item[2] is not None:
                return

    def _put(self, item) -> bool:
        """Queues `item` unless asked to stop while the queue is full."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def get(self, step: int) -> HostBatch:
        """The host batch of `step` (the next step of `steps`).

        Raises:
          whatever `batch_fn(step)` raised, unchanged (so a `SynjaxError`
          still reads as one line).
          RuntimeError: `step` is not the next of `steps` or the prefetcher
            was closed (a programming error).
        """
        if self._thread is None:
            return self._batch_fn(step)
        while True:
            try:
                got, batch, error = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(
                        f"BatchPrefetcher: asked for step {step}, but the sampling thread "
                        "has stopped"
                    ) from None
        if got != step:
            raise RuntimeError(f"BatchPrefetcher: asked for step {step}, the next one is {got}")
        if error is not None:
            raise error
        return batch

    def close(self) -> None:
        """Stops sampling and waits for the thread (it finishes a batch it has begun)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> BatchPrefetcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
