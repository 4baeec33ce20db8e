"""Benchmark of block-wise U-Net prediction: time, peak memory and runner overhead by volume size.

The partner pipeline's signed-proximity U-Net (the demo config's network,
randomly initialised: time and memory do not depend on the weights) predicts a
synthetic uint8 zarr volume block by block into zarr, through
`ProximityStage.predict_volume` exactly as `--config.predict.input` runs it
(done-array, read-ahead and write-behind threads, progress bar off). Each
scale runs in a fresh process so that its peak resident memory (`ru_maxrss`)
is its own; `tracemalloc`'s peak (numpy and Python allocations) is reported
too. The runner's overhead is the wall time against the pure model time: the
compiled block function timed on one block, times the number of blocks.

Run from the repository root (a few minutes at the defaults on 2 CPU cores):

    .venv/bin/python benchmarks/bench_blockwise_predict.py [--base 16 192 192] \
        [--block 16 96 96] [--scales 1 8]

The issue's acceptance size, 2048 x 2048 x 128, is `--base 128 2048 2048 --scales 1`.
The overhead leaves out the one compilation of the block function (`compile_seconds`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_blockwise_predict.json"


def _demo_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_config", REPO_ROOT / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _write_raw(path: pathlib.Path, shape, chunk) -> Any:
    """A uint8 zarr volume of smooth noise, written slab by slab (never whole in memory)."""
    import numpy as np

    from synjax.io import create_volume

    volume = create_volume(str(path), shape, np.uint8, resolution=(40.0, 4.0, 4.0), chunks=chunk)
    rng = np.random.default_rng(0)
    for z in range(0, shape[0], chunk[0]):
        depth = min(chunk[0], shape[0] - z)
        volume[z : z + depth] = rng.integers(0, 256, (depth, *shape[1:]), dtype=np.uint8)
    return volume


def run_one(shape: tuple[int, int, int], block: tuple[int, int, int]) -> dict[str, Any]:
    """Times one prediction of a `shape` volume in `block`s in this process; returns its row."""
    import dataclasses

    import jax
    import numpy as np

    from synjax.data.intensity import DTYPE_RANGE, TrainedParams
    from synjax.inference.block_grid import BlockGrid
    from synjax.io import open_volume
    from synjax.models.unet3d import UNet3D
    from synjax.stages.proximity import ProximityStage, block_fn_of

    config = _demo_config()
    stage = ProximityStage.from_config(config)
    stage = dataclasses.replace(
        stage, network=dataclasses.replace(stage.network, predict_output=tuple(block))
    )
    cfg = stage.unet_settings()
    block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
    margin = tuple(stage.network.predict_context)
    input_shape = tuple(b + 2 * m for b, m in zip(block, margin, strict=True))
    sample = np.zeros((1, *input_shape, 1), np.float32)
    params = UNet3D(cfg).init(jax.random.PRNGKey(0), sample)["params"]
    trained = TrainedParams(params, DTYPE_RANGE)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        raw = _write_raw(folder / "raw.zarr", shape, block)
        # The pure model: the same compiled function on one block, after compiling it.
        crop = (slice(None), *(slice(m, m + b) for m, b in zip(margin, block, strict=True)))
        fn = block_fn_of(cfg, params, crop)
        batch = np.random.default_rng(1).random((1, *input_shape), dtype=np.float32)
        start = time.perf_counter()
        fn(batch)
        first_call = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(3):
            fn(batch)
        per_block = (time.perf_counter() - start) / 3
        # predict_volume compiles its own function once: not the runner's overhead.
        compile_seconds = max(first_call - per_block, 0.0)
        blocks = BlockGrid(shape, block, margin).num_blocks
        tracemalloc.start()
        start = time.perf_counter()
        stage.predict_volume(
            trained, raw, folder / "proximity.zarr", raw.resolution, step=0, progress=False
        )
        seconds = time.perf_counter() - start
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        written = open_volume(str(folder / "proximity.zarr"))
        assert tuple(written.shape) == tuple(shape)
    voxels = int(np.prod(shape))
    return {
        "shape": list(shape),
        "block": list(block),
        "blocks": blocks,
        "seconds": seconds,
        "mvox_per_s": voxels / seconds / 1e6,
        "compile_seconds": compile_seconds,
        "model_seconds": per_block * blocks,
        "overhead": (seconds - compile_seconds) / (per_block * blocks) - 1,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "traced_peak_mib": traced_peak / 2**20,
        "volume_mib": voxels * 5 / 2**20,  # uint8 input + float32 output
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, nargs=3, default=(16, 192, 192))
    parser.add_argument("--block", type=int, nargs=3, default=(16, 96, 96))
    parser.add_argument("--scales", type=int, nargs="+", default=(1, 8))
    parser.add_argument("--one", type=int, nargs=6, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(tuple(args.one[:3]), tuple(args.one[3:]))))
        return
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import common

    rows = []
    for scale in args.scales:
        # 8x = twice the base along each axis.
        factor = round(scale ** (1 / 3))
        shape = [n * factor for n in args.base]
        result = subprocess.run(
            [sys.executable, __file__, "--one", *map(str, [*shape, *args.block])],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append({"scale": scale, **json.loads(result.stdout.splitlines()[-1])})
    columns = [
        "scale",
        "shape",
        "blocks",
        "seconds",
        "mvox_per_s",
        "overhead",
        "peak_rss_mib",
        "traced_peak_mib",
        "volume_mib",
    ]
    print(common.format_table(rows, columns))
    common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "note": "one run per row, each in a fresh process; 2-core CPU shared with other jobs: "
            "times are upper bounds; overhead = (wall time - compile) / (model time per block "
            "x blocks) - 1",
            "base": list(args.base),
            "block": list(args.block),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
