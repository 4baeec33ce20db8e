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

`--executors` compares the runner's executors on the same volumes: `local`
(in-process, the default) and `daskN`, a Dask `LocalCluster` of N worker
processes with one thread each, reached through `config.predict.scheduler`
as a cluster elsewhere would be. Its workers load the U-Net from a checkpoint
(saved here at step 0) once each; `seconds` includes those loads and their
compilations (`cluster_start_seconds`, the cluster's start, does not), and
`worker_peak_rss_mib` is the largest worker's peak. On a machine with as many
cores as workers, XLA's own threads in each worker compete for the same cores.

Run from the repository root (a few minutes at the defaults on 2 CPU cores):

    .venv/bin/python benchmarks/bench_blockwise_predict.py [--base 16 192 192] \
        [--block 16 96 96] [--scales 1 8] [--executors local dask1 dask2]

The issue's acceptance size, 2048 x 2048 x 128, is `--base 128 2048 2048 --scales 1`.
The overhead leaves out the one compilation of the block function (`compile_seconds`).
"""

from __future__ import annotations

import argparse
import json
import os
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


def _dask_workers(executor: str) -> int:
    """N of `daskN` (0 for `local`)."""
    if executor == "local":
        return 0
    if not executor.startswith("dask") or not executor[4:].isdigit() or int(executor[4:]) < 1:
        raise SystemExit(f"--executors: {executor!r}; expected local or daskN (N >= 1)")
    return int(executor[4:])


def _save_checkpoint(workdir: pathlib.Path, stage, params) -> None:
    """Saves `params` as the U-Net's step-0 checkpoint in `workdir` (what Dask workers load)."""
    import jax
    import numpy as np

    from synjax.models.unet3d import UNet3D
    from synjax.stages.proximity import MODEL_NAME
    from synjax.train.checkpoint import Checkpointer
    from synjax.train.state import create_train_state

    cfg = stage.unet_settings()
    sample = np.zeros((1, *cfg.valid_input_shape(stage.network.train_output), 1), np.float32)
    state = create_train_state(UNet3D(cfg), sample, stage.training, jax.random.PRNGKey(0))
    with Checkpointer(workdir, MODEL_NAME) as checkpointer:
        checkpointer.save(state.replace(params=params))


def run_one(
    shape: tuple[int, int, int], block: tuple[int, int, int], executor: str = "local"
) -> dict[str, Any]:
    """Times one prediction of a `shape` volume in `block`s in this process; returns its row."""
    import contextlib
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
    workers = _dask_workers(executor)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = pathlib.Path(tmp)
        raw = _write_raw(folder / "raw.zarr", shape, block)
        cluster_start = 0.0
        if workers:
            from distributed import LocalCluster

            _save_checkpoint(folder, stage, params)
            start = time.perf_counter()
            cluster = stack.enter_context(
                LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                )
            )
            cluster_start = time.perf_counter() - start
            prediction = dataclasses.replace(
                stage.prediction, executor="dask", scheduler=cluster.scheduler_address
            )
            stage = dataclasses.replace(stage, prediction=prediction)
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
            trained,
            raw,
            folder / "proximity.zarr",
            raw.resolution,
            step=0,
            progress=False,
            workdir=folder,
        )
        seconds = time.perf_counter() - start
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        written = open_volume(str(folder / "proximity.zarr"))
        assert tuple(written.shape) == tuple(shape)
    # The workers have exited (the cluster closed): the largest one's peak.
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    voxels = int(np.prod(shape))
    return {
        "executor": executor,
        "shape": list(shape),
        "block": list(block),
        "blocks": blocks,
        "seconds": seconds,
        "mvox_per_s": voxels / seconds / 1e6,
        "compile_seconds": compile_seconds,
        "model_seconds": per_block * blocks,
        "overhead": (seconds - compile_seconds) / (per_block * blocks) - 1,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": children if workers else None,
        "cluster_start_seconds": cluster_start,
        "traced_peak_mib": traced_peak / 2**20,
        "volume_mib": voxels * 5 / 2**20,  # uint8 input + float32 output
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, nargs=3, default=(16, 192, 192))
    parser.add_argument("--block", type=int, nargs=3, default=(16, 96, 96))
    parser.add_argument("--scales", type=int, nargs="+", default=(1, 8))
    parser.add_argument(
        "--executors",
        nargs="+",
        default=("local",),
        help="local and/or daskN (a LocalCluster of N worker processes, one thread each)",
    )
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.one:
        sizes = [int(n) for n in args.one[:6]]
        print(json.dumps(run_one(tuple(sizes[:3]), tuple(sizes[3:]), args.one[6])))
        return
    for executor in args.executors:
        _dask_workers(executor)  # a bad name fails before the first run
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import common

    rows = []
    for scale in args.scales:
        # 8x = twice the base along each axis.
        factor = round(scale ** (1 / 3))
        shape = [n * factor for n in args.base]
        for executor in args.executors:
            result = subprocess.run(
                [sys.executable, __file__, "--one", *map(str, [*shape, *args.block]), executor],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append({"scale": scale, **json.loads(result.stdout.splitlines()[-1])})
    columns = [
        "scale",
        "executor",
        "shape",
        "blocks",
        "seconds",
        "mvox_per_s",
        "overhead",
        "peak_rss_mib",
        "worker_peak_rss_mib",
        "cluster_start_seconds",
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
            "x blocks) - 1; for daskN that model time is one process's, so N workers in perfect "
            "parallel would give 1/N - 1; peak_rss_mib is the driver's (it also compiles the "
            "model for the pure-model timing), worker_peak_rss_mib the largest worker's",
            "base": list(args.base),
            "block": list(args.block),
            "executors": list(args.executors),
            "load_average": list(os.getloadavg()),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
