"""Benchmark of DeepEM3D-Net inference: seconds per slice, with and without 16-fold TTA.

For each variant (paper-sized features, width 1.0, and a small one) of the s5
network, times one output slice of `--size` x `--size` pixels (the paper's
SNEMI3D slices are 1024 x 1024) without augmentation and with the 16-fold
test-time augmentation (16 transformed copies in one batch, one compiled
call). Compile time (lower + compile) is reported apart from steady state;
every timed call ends with `block_until_ready`.

Run (CPU-sized, then the paper's slice size with few repeats):

  .venv/bin/python benchmarks/bench_deepem3d.py --size 256 --repeats 3
  .venv/bin/python benchmarks/bench_deepem3d.py --size 1024 --repeats 1 --warmup 0

(compilation is ahead of time, so with --warmup 0 the one timed call is a
steady-state call that may still include first-touch memory allocation.)
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.inference.tta import TRANSFORMS, make_tta_fn
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn

SLICES = 5
VARIANTS = {"paper": 1.0, "small": 0.25}
# Parameters do not depend on the image size: initialise on a small input.
INIT_SIZE = 32
SEED = 0
COLUMNS = (
    "variant",
    "params",
    "size",
    "tta",
    "batch",
    "compile_s",
    "first_call_s",
    "median_s",
    "s_per_slice",
)
DEFAULT_OUT = "benchmarks/results/bench_deepem3d.json"


def bench_variant(
    name: str, width: float, size: int, repeats: int, warmup: int, tta_modes
) -> list[dict]:
    model = DeepEM3DNet(DeepEM3DSettings(slices=SLICES, width=width))
    init_x = jnp.zeros((1, SLICES, INIT_SIZE, INIT_SIZE, 1))
    variables = jax.jit(model.init)(jax.random.PRNGKey(SEED), init_x)
    params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])))
    apply_fn = make_apply_fn(model, variables)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.random((1, SLICES, size, size, 1), dtype=np.float32))
    rows = []
    for tta in tta_modes:
        fn = make_tta_fn(apply_fn, TRANSFORMS) if tta else jax.jit(apply_fn)
        compiled, compile_s = common.compile_jax(fn, x)
        timing = common.time_calls(lambda compiled=compiled: compiled(x), repeats, warmup)
        row = {
            "variant": name,
            "width": width,
            "params": params,
            "size": size,
            "tta": tta,
            "batch": len(TRANSFORMS) if tta else 1,
            "compile_s": compile_s,
            "s_per_slice": timing.median,
            **timing.as_dict(),
        }
        rows.append(row)
        print(common.format_table([row], COLUMNS), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="slice size in y and x")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after a warm-up")
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls first (0: time the first call)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="widths"
    )
    parser.add_argument(
        "--tta", choices=("both", "off", "on"), default="both", help="which modes to time"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.size % TOTAL_STRIDE:
        parser.error(f"--size {args.size}: expected a multiple of {TOTAL_STRIDE}")
    tta_modes = {"both": (False, True), "off": (False,), "on": (True,)}[args.tta]

    rows = []
    for name in args.variants:
        rows += bench_variant(name, VARIANTS[name], args.size, args.repeats, args.warmup, tta_modes)
    print()
    print(common.format_table(rows, COLUMNS))
    path = common.write_json(
        args.out,
        {
            "benchmark": "deepem3d_inference",
            "slices": SLICES,
            "environment": common.environment(),
            "results": rows,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
