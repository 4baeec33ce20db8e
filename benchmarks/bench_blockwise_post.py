"""Benchmark of the block-wise host stages: time and peak memory at 1x and 8x a base volume.

Stages, each reading and writing zarr volumes block by block
(`synjax.io.create_volume`, chunks of the block shape):

- `components`: `label_components_blockwise` of p > 0.3 (26-connected);
- `watershed`: `segment_blockwise` (sigma 1, h 0.05, halo 8) then
  agglomeration at 0.5, on a boundary map that fills the volume (neurons
  span blocks, as in EM; the result is the stitched, agglomerated one);
- `contingency`: `contingency_table_blockwise` of the components against the
  segmentation, then the adapted Rand error and VOI.

The same stages on whole numpy arrays (`cc3d`, `segment` + `agglomerate`,
`rand_voi`) are timed for comparison at the sizes given by `--whole-up-to`.

The inputs are synthetic and written block by block before timing: a boundary
map of overlapping sinusoidal cells (period about 12 voxels) plus noise, and
a signed proximity map from the same pattern. Peak memory is the largest
amount `tracemalloc` saw allocated while the stage ran (numpy arrays are
traced; the C buffers of cc3d and scikit-image that never reach Python are
not), so the block-wise figure should stay flat from 1x to 8x while the
whole-volume one grows eightfold. One run per row on a 2-core CPU shared with
other jobs: wall times are upper bounds.

Run from the repository root (about a minute at the defaults):

    .venv/bin/python benchmarks/bench_blockwise_post.py [--base 32 96 96] [--block 32 48 48]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import cc3d
import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.evaluation.contingency import contingency_table_blockwise
from synjax.evaluation.rand_voi import adapted_rand_error, variation_of_information
from synjax.geometry import Box
from synjax.inference.block_grid import BlockGrid
from synjax.io import create_volume, open_volume
from synjax.postprocess.agglomeration import agglomerate
from synjax.postprocess.blockwise_components import label_components_blockwise
from synjax.postprocess.blockwise_watershed import segment_blockwise
from synjax.postprocess.watershed import segment

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "bench_blockwise_post.json"
TAU = 0.3
SIGMA, H, HALO, THRESHOLD = 1.0, 0.05, 8, 0.5


def _pattern(box: Box, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boundary map in [0, 1] and proximity in [-1, 1] on `box`, the same for any tiling."""
    z, y, x = np.meshgrid(
        *[np.arange(a, b) for a, b in zip(box.start, box.stop, strict=True)], indexing="ij"
    )
    cells = np.sin(x / 2.1) * np.sin(y / 1.9 + 0.3 * z) + np.sin(z / 2.3 + x / 5.0)
    # Noise from a hash of the position, so that it does not depend on the block.
    noise = np.sin(x * 12.9898 + y * 78.233 + z * 37.719 + seed) * 43758.5453 % 1.0
    boundary = np.clip(0.5 + 0.2 * cells + 0.15 * noise, 0.0, 1.0)
    proximity = np.clip(np.sin(x / 3.1 + z / 4.0) * np.cos(y / 2.7) * 1.2, -1.0, 1.0)
    return boundary.astype(np.float32), proximity.astype(np.float32)


def _write_inputs(folder: pathlib.Path, shape, block) -> dict[str, Any]:
    boundary = create_volume(folder / "boundary.zarr", shape, "float32", chunks=block)
    proximity = create_volume(folder / "proximity.zarr", shape, "float32", chunks=block)
    grid = BlockGrid(shape, block)
    for block_id in grid.block_ids():
        box = Box.from_slices(grid.output_box(block_id))
        boundary[box.slices()], proximity[box.slices()] = _pattern(box, seed=0)
    return {"boundary": boundary, "proximity": proximity}


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, peak MiB traced while `fn` ran)."""
    tracemalloc.start()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak / 2**20


def _blockwise_rows(folder, shape, block, scale) -> list[dict[str, Any]]:
    inputs = _write_inputs(folder, shape, block)
    components = create_volume(folder / "components.zarr", shape, "uint64", chunks=block)
    labels = create_volume(folder / "labels.zarr", shape, "uint64", chunks=block)
    rows = []

    def row(stage, seconds, peak, **extra):
        voxels = int(np.prod(shape))
        rows.append(
            dict(
                stage=stage,
                mode="blockwise",
                scale=scale,
                shape="x".join(map(str, shape)),
                voxels=voxels,
                seconds=seconds,
                mvox_per_s=voxels / seconds / 1e6,
                peak_mib=peak,
                **extra,
            )
        )

    count, seconds, peak = _measure(
        lambda: label_components_blockwise(
            inputs["proximity"], components, block, lambda p: p > TAU, 26
        )
    )
    row("components", seconds, peak, labels=count)
    result, seconds, peak = _measure(
        lambda: segment_blockwise(
            inputs["boundary"], labels, block, SIGMA, H, halo=HALO, threshold=THRESHOLD
        )
    )
    row(
        "watershed",
        seconds,
        peak,
        labels=result.num_labels,
        fragments=result.num_fragments,
        inexact_blocks=len(result.inexact_blocks),
    )

    def score():
        table = contingency_table_blockwise(labels, components, block)
        return adapted_rand_error(table=table).error, sum(variation_of_information(table=table))

    (are, voi), seconds, peak = _measure(score)
    row("contingency", seconds, peak, are=are, voi=voi)
    return rows


def _whole_rows(folder, shape, scale) -> list[dict[str, Any]]:
    boundary = np.asarray(open_volume(folder / "boundary.zarr")[:, :, :])
    proximity = np.asarray(open_volume(folder / "proximity.zarr")[:, :, :])
    rows = []
    voxels = int(np.prod(shape))
    base = dict(mode="whole", scale=scale, shape="x".join(map(str, shape)), voxels=voxels)
    components, seconds, peak = _measure(
        lambda: cc3d.connected_components(proximity > TAU, connectivity=26)
    )
    rows.append(
        dict(base, stage="components", seconds=seconds, peak_mib=peak, labels=int(components.max()))
    )
    labels, seconds, peak = _measure(
        lambda: agglomerate(segment(boundary, SIGMA, H), boundary, THRESHOLD)
    )
    rows.append(
        dict(base, stage="watershed", seconds=seconds, peak_mib=peak, labels=int(labels.max()))
    )
    _, seconds, peak = _measure(
        lambda: (
            adapted_rand_error(labels, components),
            variation_of_information(labels, components),
        )
    )
    rows.append(dict(base, stage="contingency", seconds=seconds, peak_mib=peak))
    for r in rows:
        r["mvox_per_s"] = voxels / r["seconds"] / 1e6
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, nargs=3, default=(32, 96, 96))
    parser.add_argument("--block", type=int, nargs=3, default=(32, 48, 48))
    parser.add_argument("--scales", type=int, nargs="+", default=(1, 8))
    parser.add_argument("--whole-up-to", type=int, default=8, help="largest scale run whole")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    rows = []
    for scale in args.scales:
        # 8x = twice the base along each axis.
        factor = round(scale ** (1 / 3))
        shape = tuple(n * factor for n in args.base)
        with tempfile.TemporaryDirectory() as tmp:
            folder = pathlib.Path(tmp)
            rows += _blockwise_rows(folder, shape, tuple(args.block), scale)
            if scale <= args.whole_up_to:
                rows += _whole_rows(folder, shape, scale)
    columns = ["stage", "mode", "scale", "shape", "seconds", "mvox_per_s", "peak_mib", "labels"]
    print(common.format_table(rows, columns))
    common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "note": "one run per row; 2-core CPU shared with other jobs: times are upper bounds; "
            "peak_mib is tracemalloc's peak (numpy and Python allocations) during the stage",
            "block": list(args.block),
            "halo": HALO,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
