"""Timing helpers shared by the benchmarks.

Conventions: JAX functions are compiled ahead of time (`lower(...).compile()`)
so that compile time is reported apart from steady-state time; every timed
call ends with `jax.block_until_ready` (or a framework's own sync) because JAX
dispatches asynchronously; steady-state figures come from repeats after a
warm-up call and are reported as median, min and mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from synjax.models.conv import auto_implementation

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    elapsed = time.perf_counter() - start
    _COMPILED_FROM[id(compiled)] = (compiled, jitted, args)
    return compiled, elapsed


# What each executable of `compile_jax` was compiled from, for `flops`' recount.
_COMPILED_FROM: dict[int, tuple[Any, Any, tuple]] = {}
# XLA's cost analysis counts nothing inside an FFI call (the oneDNN convolutions).
_UNCOUNTED_CALLS = ("synjax_conv3d_onednn",)


def _cost_flops(analysis: Any) -> float | None:
    # A dict in recent jax, a list of one dict per program in older versions.
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    value = float(analysis["flops"])
    return value if value > 0 else None


def flops(compiled: Any) -> float | None:
    """Floating-point operations of one call of a compiled executable (XLA's cost analysis).

    XLA counts no work inside FFI calls, so a program with oneDNN convolutions
    (`synjax.models.conv_onednn`) is counted as the same program with every
    "auto" convolution on XLA's own 3D convolution (the same arithmetic),
    lowered but not compiled. None where the backend reports no count.
    """
    text = compiled.as_text() or ""
    if any(name in text for name in _UNCOUNTED_CALLS) and id(compiled) in _COMPILED_FROM:
        _, jitted, args = _COMPILED_FROM[id(compiled)]
        # Tracing caches do not key on the override: clear them on both sides.
        jax.clear_caches()
        try:
            with auto_implementation("native"):
                return _cost_flops(jitted.lower(*args).cost_analysis())
        finally:
            jax.clear_caches()
    return _cost_flops(compiled.cost_analysis())


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


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (the machine may be shared: say so beside timings)."""
    return [round(v, 2) for v in os.getloadavg()]


def git_commit() -> str | None:
    """Commit of the repository the benchmarks run from (+ "-dirty" with local changes)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


MATMUL_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def matmul_peak(dtype: str, size: int, repeats: int) -> dict[str, Any]:
    """Achieved FLOP/s of one square `size` x `size` matmul, the device's practical peak.

    Inputs are `dtype` ("float32" or "bfloat16"); the product accumulates and
    is returned in float32 (`preferred_element_type`), as mixed-precision
    training computes. FLOPs come from XLA's cost analysis (2 * size^3).

    Returns:
      {"dtype", "size", "flops", "compile_s", "timing", "flop_per_s"}.
    """
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.random((size, size), np.float32), MATMUL_DTYPES[dtype]) for _ in "ab")
    matmul = jax.jit(functools.partial(jnp.matmul, preferred_element_type=jnp.float32))
    compiled, compile_s = compile_jax(matmul, a, b)
    timing = time_calls(lambda: compiled(a, b), repeats)
    count = flops(compiled)
    return {
        "dtype": dtype,
        "size": size,
        "flops": count,
        "compile_s": compile_s,
        "timing": timing,
        "flop_per_s": count / timing.min if count else None,
    }


def time_jax_network(
    infer: Callable[[Any, jax.Array], Any],
    loss: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    x: jax.Array,
    repeats: int,
    learning_rate: float = 1e-4,
) -> dict[str, Any]:
    """Compiles and times a network's inference and one Adam training step.

    Args:
      infer: `(params, x) -> output`, traceable.
      loss: `(params, x) -> scalar`, traceable (targets in its closure).
      params: parameter pytree (copied: the train step donates its own copy).
      x: `[batch, ...]` input.
      repeats: timed calls of each after one warm-up call.
      learning_rate: Adam's step size (the value does not change the time).

    Returns:
      {"infer_compile_s", "infer" (Timing), "infer_flops", "train_compile_s",
      "train" (Timing), "train_flops", "output"} with FLOPs of one call from
      XLA's cost analysis (None where the backend has no count).
    """
    import optax  # the benchmarks' own dependency, like the training loop's

    infer_compiled, infer_compile_s = compile_jax(jax.jit(infer), params, x)
    infer_timing = time_calls(lambda: infer_compiled(params, x), repeats)
    tx = optax.adam(learning_rate)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, v):
        value, grads = jax.value_and_grad(loss)(p, v)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, value

    state = [jax.tree.map(jnp.copy, params), tx.init(params)]
    step, train_compile_s = compile_jax(train_step, *state, x)

    def run_step():
        state[0], state[1], value = step(*state, x)
        return value

    train_timing = time_calls(run_step, repeats)
    return {
        "infer_compile_s": infer_compile_s,
        "infer": infer_timing,
        "infer_flops": flops(infer_compiled),
        "train_compile_s": train_compile_s,
        "train": train_timing,
        "train_flops": flops(step),
        "output": infer_compiled(params, x),
    }


def variant_main(
    argv: Sequence[str] | None,
    description: str,
    variants: Sequence[str],
    bench: Callable[[str, int], list[dict[str, Any]]],
    title: str,
    columns: Sequence[str],
    default_out: str,
) -> None:
    """The command line of a benchmark of one config variant: run, print a table, write JSON.

    `--variant` (one of `variants`, the first by default), `--repeats`, `--out`;
    `bench(variant, repeats)` returns the rows; `title` is formatted with the
    variant. The JSON holds the environment and the load averages before and after.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--variant", default=variants[0], choices=tuple(variants))
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per case")
    parser.add_argument("--out", default=default_out)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    rows = bench(args.variant, args.repeats)
    print(title.format(variant=args.variant))
    print(format_table(rows, columns))
    path = write_json(
        args.out,
        {
            "environment": environment(),
            "note": (
                "shared machine: absolute times are noisy; compile time is the ahead-of-time "
                "lower().compile() of the same jit function that is then timed"
            ),
            "load_average_before_after": [load_before, os.getloadavg()],
            "variant": args.variant,
            "rows": rows,
        },
    )
    print(f"\nwritten to {path}")
