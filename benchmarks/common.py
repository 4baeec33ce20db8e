"""Timing helpers shared by the benchmarks.

Conventions: JAX functions are compiled ahead of time (`lower(...).compile()`)
so that compile time is reported apart from steady-state time; every timed
call ends with `jax.block_until_ready` (or a framework's own sync) because JAX
dispatches asynchronously; steady-state figures come from repeats after a
warm-up call and are reported as median, min and mean.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of repeated calls.

    Attributes:
      times: seconds of each timed call (warm-up excluded).
      first_call: seconds of the warm-up call(s), None if not measured.
    """

    times: list[float]
    first_call: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def stdev(self) -> float:
        return statistics.stdev(self.times) if len(self.times) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "mean_s": self.mean,
            "stdev_s": self.stdev,
            "repeats": len(self.times),
            "first_call_s": self.first_call,
        }


def compile_jax(jitted: Any, *args: Any) -> tuple[Any, float]:
    """Compiles a `jax.jit`-wrapped function for `args` ahead of time.

    Returns:
      (compiled executable, seconds spent lowering and compiling).
    """
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(
    call: Callable[[], Any],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[Any], Any] = jax.block_until_ready,
) -> Timing:
    """Times `call()` `repeats` times after `warmup` untimed calls.

    Args:
      call: no-argument callable; a step that carries state (a train step)
        keeps it in a closure.
      repeats: timed calls, at least 1.
      warmup: untimed calls first (their total time is kept as `first_call`).
      sync: waits for `call`'s result (default `jax.block_until_ready`; pass
        e.g. `lambda _: torch.cuda.synchronize()` or `lambda r: r` for
        synchronous frameworks).

    Returns:
      Timing of the repeats.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats}; expected >= 1")
    first = None
    if warmup:
        start = time.perf_counter()
        for _ in range(warmup):
            sync(call())
        first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return Timing(times, first)


def environment() -> dict[str, Any]:
    """Where the numbers were taken: devices, versions, CPU count."""
    devices = jax.devices()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Plain-text table of `rows` restricted to `columns` (floats to 4 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Writes `payload` as indented JSON, creating parent folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
