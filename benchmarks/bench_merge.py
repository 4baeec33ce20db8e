"""Benchmark of the sparse mask merge (`synjax.inference.merge.merge_masks`).

Chen et al.'s 3D Mask R-CNN predicts synapse masks on overlapping patches, so
most synapses come back two to four times; their merge of about 330k masks
took 12 hours before and 100 minutes after they switched to sparse overlaps.
Acceptance here: 330k masks in at most 20 s on 2 CPU cores.

Synthetic masks, about 200 voxels each, in a `[z, y, x]` volume at about 3%
occupancy: each synapse is an axis-aligned ellipsoid (radii drawn around
2.7 x 4.7 x 4.7 voxels, as in anisotropic two-photon stacks); it is predicted
1-4 times (probabilities 0.1, 0.3, 0.35, 0.25: two to four copies of most),
each copy shifted by up to one voxel per axis, with 10% of its voxels dropped
and, for 30% of copies, cut by a patch border through the synapse (a plane
along y or x). Neighbouring synapses land where they fall, so some touch.

Timed in one run, on the same masks:

- `merge_masks` (sorted-run overlap counting, vectorised rounds) and its
  overlap part alone (`mask_overlaps`), against the overlaps computed as
  SciPy's ``A^T A`` on the occupied voxels (same pairs, checked);
- a straightforward implementation of the same rule: overlaps from
  `mask_overlaps`, then Python loops over groups and masks (breadth-first
  search for the groups, a per-mask scan for the winner). Its result must be
  identical. Where it would take too long it is skipped and extrapolated
  linearly from the largest size that ran (marked so in the table);
- `paint_masks` of the kept masks (mostly the cost of writing a uint32
  volume of 1G voxels at 330k masks).

Wall times (`_s`) and this process's CPU times (`_cpu_s`) are reported: the
machine's two cores are shared with other jobs, so wall times are upper bounds.

Run from the repository root (a few minutes, about 10 GB of memory at 330k):

    .venv/bin/python benchmarks/bench_merge.py [--sizes 10000 50000 330000]
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import statistics
import time

import numpy as np
import scipy.sparse

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.inference.merge import mask_overlaps, mask_sizes, merge_masks, paint_masks

SEED = 0
MIN_OVERLAP = 10
OCCUPANCY = 0.03  # fraction of the volume's voxels inside a synapse
DEPTH = 200  # z planes of the synthetic volume; y and x grow with the mask count
COPY_PROBABILITIES = (0.1, 0.3, 0.35, 0.25)  # 1, 2, 3, 4 copies
DROP_FRACTION = 0.1
CUT_FRACTION = 0.3
NUM_TEMPLATES = 32
MEAN_RADII = (2.7, 4.7, 4.7)  # z, y, x voxels: an ellipsoid of about 200 voxels
# Skip the loop implementation where its extrapolated time is above this.
MAX_LOOP_SECONDS = 120.0


def _templates(rng: np.random.Generator) -> list[np.ndarray]:
    """Ellipsoids: each an `[n, 3]` array of (dz, dy, dx) offsets from its centre."""
    templates = []
    for _ in range(NUM_TEMPLATES):
        radii = np.asarray(MEAN_RADII) * rng.uniform(0.8, 1.2, 3)
        reach = np.ceil(radii).astype(int)
        grid = np.stack(
            np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1
        ).reshape(-1, 3)
        inside = ((grid / radii) ** 2).sum(1) <= 1.0
        templates.append(grid[inside])
    return templates


def synthetic_masks(num_masks: int, seed: int = SEED) -> tuple[scipy.sparse.csc_matrix, tuple]:
    """About `num_masks` overlapping copies of synthetic synapses (see the module doc).

    Returns:
        (`[voxels, masks]` boolean CSC matrix, volume shape `(z, y, x)`).
    """
    rng = np.random.default_rng(seed)
    templates = _templates(rng)
    copies_per_synapse = np.arange(1, 5) @ np.asarray(COPY_PROBABILITIES)
    num_synapses = int(round(num_masks / copies_per_synapse))
    mean_size = np.mean([len(t) for t in templates])
    side = int(np.ceil(np.sqrt(num_synapses * mean_size / OCCUPANCY / DEPTH)))
    shape = (DEPTH, side, side)
    margin = int(np.ceil(max(MEAN_RADII) * 1.2)) + 2
    centres = np.stack([rng.integers(margin, s - margin, num_synapses) for s in shape], 1)
    template_of = rng.integers(0, NUM_TEMPLATES, num_synapses)
    copies = rng.choice(np.arange(1, 5), num_synapses, p=COPY_PROBABILITIES)
    synapse = np.repeat(np.arange(num_synapses), copies)[:num_masks]
    n = synapse.size
    shift = rng.integers(-1, 2, (n, 3))
    # Concatenate all templates; each mask gathers its template's rows.
    flat = np.concatenate(templates)
    lengths = np.array([len(t) for t in templates])
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    mask_template = template_of[synapse]
    mask_lengths = lengths[mask_template]
    mask_of_entry = np.repeat(np.arange(n), mask_lengths)
    within = np.arange(mask_of_entry.size) - np.repeat(
        np.cumsum(mask_lengths) - mask_lengths, mask_lengths
    )
    offsets = flat[starts[mask_template][mask_of_entry] + within]
    keep = rng.random(mask_of_entry.size) >= DROP_FRACTION
    # A patch border through the synapse: keep one side of a plane along y or x.
    cut = rng.random(n) < CUT_FRACTION
    cut_axis = rng.integers(1, 3, n)
    cut_at = rng.integers(-2, 3, n)
    cut_side = rng.choice([-1, 1], n)
    entry_cut = cut[mask_of_entry]
    position = offsets[np.arange(offsets.shape[0]), cut_axis[mask_of_entry]]
    keep &= ~entry_cut | ((position - cut_at[mask_of_entry]) * cut_side[mask_of_entry] >= 0)
    coords = offsets[keep] + (centres[synapse] + shift)[mask_of_entry[keep]]
    voxels = np.ravel_multi_index(coords.T, shape)
    columns = mask_of_entry[keep]
    indptr = np.r_[0, np.cumsum(np.bincount(columns, minlength=n))]
    masks = scipy.sparse.csc_matrix(
        (np.ones(voxels.size, bool), voxels, indptr), shape=(int(np.prod(shape)), n)
    )
    return masks, shape


def merge_masks_loop(masks, min_overlap: int = MIN_OVERLAP) -> np.ndarray:
    """The same rule as `merge_masks`, written as Python loops over groups and masks."""
    first, second, _ = mask_overlaps(masks, min_overlap)
    sizes = mask_sizes(masks)
    neighbours = collections.defaultdict(set)
    for a, b in zip(first.tolist(), second.tolist(), strict=True):
        neighbours[a].add(b)
        neighbours[b].add(a)
    undecided = set(range(masks.shape[1]))
    kept = []
    while undecided:
        seen = set()
        decided = set()
        for start in sorted(undecided):
            if start in seen:
                continue
            group, queue = [start], collections.deque([start])
            seen.add(start)
            while queue:
                for other in neighbours[queue.popleft()]:
                    if other in undecided and other not in seen:
                        seen.add(other)
                        group.append(other)
                        queue.append(other)
            winner = min(group, key=lambda m: (-sizes[m], m))
            kept.append(winner)
            decided.add(winner)
            decided.update(m for m in group if m in neighbours[winner])
        undecided -= decided
    return np.array(sorted(kept), np.int64)


def overlaps_scipy(masks, min_overlap: int = MIN_OVERLAP) -> tuple[np.ndarray, np.ndarray]:
    """Linked pairs the textbook way: ``A^T A`` with SciPy's sparse product.

    The rows are first renumbered to the occupied voxels (`np.unique`): the
    product converts A to row-major form, whose index array would otherwise
    be as long as the volume.
    """
    _, rows = np.unique(masks.indices, return_inverse=True)
    compact = scipy.sparse.csc_matrix(
        (np.ones(masks.nnz, np.int32), rows, masks.indptr), shape=(rows.max() + 1, masks.shape[1])
    )
    overlaps = (compact.T @ compact).tocoo()
    keep = (overlaps.row < overlaps.col) & (overlaps.data >= min_overlap)
    return overlaps.row[keep], overlaps.col[keep]


def _timed(fn):
    """Returns (result, wall seconds, CPU seconds of this process)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_size(num_masks: int, repeats: int, loop_seconds_per_mask: float | None) -> dict:
    (masks, shape), generate_s, _ = _timed(lambda: synthetic_masks(num_masks))
    row = {
        "masks": masks.shape[1],
        "nonzeros": masks.nnz,
        "volume": "x".join(map(str, shape)),
        "mean_mask_voxels": masks.nnz / masks.shape[1],
        "generate_s": generate_s,
    }
    pairs, row["overlaps_s"], row["overlaps_cpu_s"] = _timed(lambda: mask_overlaps(masks, 1))
    row["touching_pairs"] = int(pairs[0].size)
    row["linked_pairs"] = int((pairs[2] >= MIN_OVERLAP).sum())
    scipy_pairs, row["overlaps_scipy_s"], row["overlaps_scipy_cpu_s"] = _timed(
        lambda: overlaps_scipy(masks)
    )
    linked = pairs[2] >= MIN_OVERLAP
    order = np.lexsort((scipy_pairs[1], scipy_pairs[0]))
    row["overlaps_scipy_equal"] = bool(
        np.array_equal(
            np.stack(scipy_pairs, 1)[order], np.stack([pairs[0][linked], pairs[1][linked]], 1)
        )
    )
    del pairs, scipy_pairs
    runs = [_timed(lambda: merge_masks(masks, MIN_OVERLAP)) for _ in range(repeats)]
    kept = runs[0][0]
    assert all(np.array_equal(kept, run[0]) for run in runs)
    row["merge_s"] = statistics.median(run[1] for run in runs)
    row["merge_min_s"] = min(run[1] for run in runs)
    row["merge_cpu_s"] = statistics.median(run[2] for run in runs)
    row["kept"] = int(kept.size)
    expected_loop = None if loop_seconds_per_mask is None else loop_seconds_per_mask * num_masks
    if expected_loop is None or expected_loop <= MAX_LOOP_SECONDS:
        loop_kept, row["loop_s"], row["loop_cpu_s"] = _timed(
            lambda: merge_masks_loop(masks, MIN_OVERLAP)
        )
        row["loop_equal"] = bool(np.array_equal(loop_kept, kept))
        row["loop_measured"] = True
    else:
        row["loop_s"] = expected_loop
        row["loop_equal"] = None
        row["loop_measured"] = False
    row["speedup"] = row["loop_s"] / row["merge_s"]
    labels, row["paint_s"], row["paint_cpu_s"] = _timed(lambda: paint_masks(masks, kept, shape))
    row["painted_ids"] = int(labels.max())
    return row


COLUMNS = (
    "masks",
    "nonzeros",
    "volume",
    "linked_pairs",
    "kept",
    "overlaps_s",
    "overlaps_scipy_s",
    "merge_s",
    "merge_cpu_s",
    "loop_s",
    "loop_measured",
    "loop_equal",
    "speedup",
    "paint_s",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 330_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "bench_merge.json"),
    )
    args = parser.parse_args()

    rows = []
    loop_seconds_per_mask = None
    for size in sorted(args.sizes):
        row = bench_size(size, args.repeats, loop_seconds_per_mask)
        if row["loop_measured"]:
            loop_seconds_per_mask = row["loop_s"] / size
        rows.append(row)
        gc.collect()
        print(common.format_table([row], COLUMNS), flush=True)
    print()
    print(common.format_table(rows, COLUMNS))
    path = common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "note": (
                "2-core CPU shared with other jobs: wall times (_s) are upper bounds; "
                "_cpu_s is this process's CPU time, less affected by the sharing"
            ),
            "min_overlap": MIN_OVERLAP,
            "repeats": args.repeats,
            "acceptance": "330k masks in at most 20 s on 2 CPU cores",
            "rows": rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
