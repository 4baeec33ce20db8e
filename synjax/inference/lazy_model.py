"""A picklable block function that builds (loads) the real one once per process.

Pickling a jitted function with its parameters is often impossible or
wasteful; instead a Dask task ships the recipe: ``LazyPredictor(make_fn,
checkpoint_dir)`` calls ``make_fn(checkpoint_dir)`` on its first use in each
worker process and reuses the result for every later block there, so each
worker loads the model once.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

_LAZY_CACHE: dict[str, Callable] = {}
# Re-entrant: a factory may build another LazyPredictor (a slab predictor, its model).
_LAZY_LOCK = threading.RLock()


class LazyPredictor:
    """``predict_fn`` built by ``factory(*args, **kwargs)`` on first use in each process."""

    def __init__(self, factory: Callable[..., Callable], *args: Any, **kwargs: Any):
        self.factory = factory
        self.args = args
        self.kwargs = kwargs
        # Copies (pickled to workers) share the token, hence one build per process.
        self.token = uuid.uuid4().hex

    def build(self) -> Callable:
        """The real function: built on the first call in this process, then reused.

        Call it before tracing a function that calls this one (`jax.jit`), so
        that the model is loaded eagerly rather than inside the trace.
        """
        fn = _LAZY_CACHE.get(self.token)
        if fn is None:
            with _LAZY_LOCK:
                fn = _LAZY_CACHE.get(self.token)
                if fn is None:
                    fn = _LAZY_CACHE[self.token] = self.factory(*self.args, **self.kwargs)
        return fn

    def __call__(self, batch: np.ndarray) -> Any:
        return self.build()(batch)
