"""Benchmark of the axis-wise block fusion (`synjax.inference.fusion.fuse_blocks`).

The end-to-end synapse instance network predicts instances on overlapping
blocks and fuses them axis by axis (z, then x, then y). This times the fusion
alone, per block, for a few block sizes, on a synthetic label volume: blobs
from smoothed noise, labelled by `cc3d` (6-connected). Each block's labels
are its crop of that volume with the ids renamed at random per block, as a
network would number its instances block by block; the fused result is checked
against the global labels (equal up to renumbering: `matches_global`).

The crops come from memory, so `block_labels` costs little (it is timed apart,
`read_s`: two calls per block, as `fuse_blocks` makes). For comparison, two
whole-volume references on the same labels, which need the volume in memory:
`fastremap.renumber` (relabel to 1..n) and `cc3d.connected_components` (label
the instances from scratch).

Wall times (`_s`, median of the repeats) and this process's CPU times
(`_cpu_s`) are reported: the machine's two cores are shared with other jobs,
so wall times are upper bounds.

Run from the repository root (well under a minute at the default size):

    .venv/bin/python benchmarks/bench_fusion.py [--shape 64 256 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import cc3d
import fastremap
import numpy as np
import scipy.ndimage

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.inference.fusion import block_boxes, fuse_blocks

SEED = 0
# (block shape, overlap) in voxels (z, y, x).
BLOCKS = (
    ((16, 64, 64), (4, 16, 16)),
    ((32, 96, 96), (8, 16, 16)),
    ((32, 128, 128), (8, 32, 32)),
    ((48, 192, 192), (8, 32, 32)),
)


def synthetic_labels(shape, seed: int = SEED) -> np.ndarray:
    """Blobs: thresholded smoothed noise, 6-connected components, uint32."""
    rng = np.random.default_rng(seed)
    noise = scipy.ndimage.gaussian_filter(rng.standard_normal(shape, np.float32), (1.0, 3.0, 3.0))
    return cc3d.connected_components(noise > 0.12, connectivity=6).astype(np.uint32)


def cropped_blocks(labels: np.ndarray, boxes, seed: int = SEED):
    """`block_labels(i)`: block i's crop of `labels` with its ids renamed at random."""
    rng = np.random.default_rng(seed)
    num_ids = int(labels.max())
    renames = []
    for _ in boxes:
        rename = np.zeros(num_ids + 1, np.uint32)
        rename[1:] = rng.permutation(num_ids) + 1
        renames.append(rename)
    return lambda i: renames[i][labels[boxes[i].slices()]]


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(fastremap.unique(a)) == len(fastremap.unique(b))


def _timed(fn, repeats: int):
    """(last result, median wall seconds, median CPU seconds) of `repeats` calls."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)


def bench_blocks(labels, block_shape, overlap, repeats: int) -> dict:
    boxes = block_boxes(labels.shape, block_shape, overlap)
    block_labels = cropped_blocks(labels, boxes)
    out = np.zeros(labels.shape, np.uint32)
    n, fuse_s, fuse_cpu_s = _timed(lambda: fuse_blocks(boxes, block_labels, out), repeats)
    _, read_s, _ = _timed(lambda: [block_labels(i) for i in range(len(boxes)) for _ in "ab"], 1)
    return {
        "block": "x".join(map(str, block_shape)),
        "overlap": "x".join(map(str, overlap)),
        "blocks": len(boxes),
        "instances": n,
        "matches_global": same_up_to_renumbering(out, labels),
        "fuse_s": fuse_s,
        "fuse_cpu_s": fuse_cpu_s,
        "read_s": read_s,
        "per_block_ms": 1e3 * (fuse_s - read_s) / len(boxes),
        "voxels_per_s": labels.size / max(fuse_s - read_s, 1e-9),
    }


COLUMNS = (
    "block",
    "overlap",
    "blocks",
    "instances",
    "matches_global",
    "fuse_s",
    "fuse_cpu_s",
    "read_s",
    "per_block_ms",
    "voxels_per_s",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 256, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_fusion.json")
    )
    args = parser.parse_args()

    labels = synthetic_labels(tuple(args.shape))
    rows = [bench_blocks(labels, b, o, args.repeats) for b, o in BLOCKS]
    print(common.format_table(rows, COLUMNS))
    _, renumber_s, renumber_cpu_s = _timed(lambda: fastremap.renumber(labels), args.repeats)
    _, cc3d_s, cc3d_cpu_s = _timed(
        lambda: cc3d.connected_components(labels, connectivity=6), args.repeats
    )
    references = {
        "renumber_s": renumber_s,
        "renumber_cpu_s": renumber_cpu_s,
        "cc3d_s": cc3d_s,
        "cc3d_cpu_s": cc3d_cpu_s,
    }
    print(
        f"\nwhole volume {'x'.join(map(str, labels.shape))} ({int(labels.max())} instances): "
        f"fastremap.renumber {renumber_s:.3g} s, cc3d.connected_components {cc3d_s:.3g} s"
    )
    path = common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "note": (
                "2-core CPU shared with other jobs: wall times (_s) are upper bounds; "
                "_cpu_s is this process's CPU time. per_block_ms excludes read_s (the "
                "block_labels calls, crops from memory here)."
            ),
            "volume_shape": list(labels.shape),
            "instances": int(labels.max()),
            "repeats": args.repeats,
            "rows": rows,
            "whole_volume": references,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
