"""Axis-wise fusion of instance labels predicted on overlapping blocks.

The end-to-end 3D synapse instance network (Expert Systems with Applications,
2024) predicts instances block by block on a large volume and fuses the blocks
back in three steps, one per axis, z first, then x, then y: each step merges the
instances that meet across the seams of that axis. Here:

1. `block_boxes` tiles the volume with overlapping blocks (the last block on an
   axis is shifted back to end at the volume edge, so every block has the same
   shape unless the volume is smaller than a block).
2. `fuse_blocks` reads each block's labels once and gives every instance a
   provisional global id. For every *seam* (two blocks that are neighbours
   along one axis) it counts, inside their shared *margin* (the intersection of
   the two boxes), the voxels each instance of the lower block shares with each
   instance of the upper block, and each instance's voxels in the margin.
3. One step per axis, in `axis_order`: the seam tables of that axis are read
   through the ids fused so far and summed per pair of fused ids over all the
   seams of the axis (an instance that earlier steps fused across two blocks is
   one instance here, with its margin voxels of both seams). Lower and upper
   instances are matched one-to-one by IoU within the margins, keeping pairs
   with IoU above `iou_threshold`, and matched pairs are joined
   (`scipy.sparse.csgraph.connected_components`).
4. Each output voxel takes its label from exactly one block: the one whose
   *core* holds it. Between two neighbouring blocks the cut lies in the middle
   of their margin, so the cores tile the volume. Labels go through the fused
   ids and are numbered 1..n (0 background) over the instances that own at
   least one output voxel.

Matching: the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`,
largest total IoU) on each connected group of candidate pairs. Above IoU 0.5 a
block's instance has at most one candidate (two disjoint instances cannot both
cover more than half of it), so any matching agrees there; below 0.5 an instance
may have several candidates, and a greedy match by IoU can take a pair that
blocks two others, which the Hungarian matching does not.

Memory: at most one block's labels at a time, the id tables (a few integers
per instance and per seam pair), and the margins of blocks whose neighbour
across a seam has not been read yet. In C order those pending margins are at
most one z-margin slab (`overlap_z x Y x X` voxels) plus a row of y-margins;
give `scratch_dir` to keep them on disk instead. `block_labels` is called twice
per block: once to read ids and margins, once to write the block's core.
"""

from __future__ import annotations

import itertools
import numbers
import os
import pathlib
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import fastremap
import numpy as np
import scipy.sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csgraph

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Box, spatial_triple

AXES = ("z", "y", "x")
# The paper's order: z, then x, then y.
DEFAULT_AXIS_ORDER = ("z", "x", "y")
DEFAULT_IOU_THRESHOLD = 0.5


def block_boxes(
    volume_shape: Sequence[int], block_shape: Sequence[int] | int, overlap: Sequence[int] | int
) -> list[Box]:
    """Overlapping blocks tiling a `[z, y, x]` volume.

    On each axis the blocks start every `block - overlap` voxels; the last block
    is shifted back to end at the volume edge (so it may overlap its neighbour
    by more than `overlap`), and a block larger than the volume is cropped to it.

    Args:
      volume_shape: `(z, y, x)` voxels of the volume.
      block_shape: `(z, y, x)` voxels of a block (or one integer for all axes).
      overlap: `(z, y, x)` voxels shared by neighbouring blocks (or one integer),
        `0 <= overlap < block_shape` on each axis.

    Returns:
      The boxes in C order (z slowest, x fastest).

    Raises:
      ConfigError: naming the argument, for shapes that are not three positive
        integers or an overlap outside `[0, block_shape)`.
    """
    volume = spatial_triple(volume_shape, "block_boxes volume_shape", 1)
    block = spatial_triple(block_shape, "block_boxes block_shape", 1, broadcast=True)
    margin = spatial_triple(overlap, "block_boxes overlap", 0, broadcast=True)
    if any(m >= b for m, b in zip(margin, block, strict=True)):
        raise ConfigError(
            f"block_boxes overlap={margin}: expected 0 <= overlap < block_shape={block} on "
            "every axis"
        )
    starts_per_axis = []
    for size, length, shared in zip(volume, block, margin, strict=True):
        if length >= size:
            starts_per_axis.append([(0, size)])
            continue
        stride = length - shared
        starts = list(range(0, size - length, stride)) + [size - length]
        starts_per_axis.append([(s, s + length) for s in starts])
    return [
        Box(tuple(a for a, _ in extents), tuple(b for _, b in extents))
        for extents in itertools.product(*starts_per_axis)
    ]


class _Grid:
    """The boxes of `block_boxes` as a grid: positions, seams and cores.

    Attributes:
      starts, stops: per axis, `[n_axis]` start and stop of the blocks at each
        grid position.
      index: `[nz, ny, nx]` int, the box index at each grid position.
      cuts: per axis, `[n_axis + 1]` core boundaries: block k's core spans
        `[cuts[k], cuts[k + 1])`, the middle of each margin between two blocks.
    """

    def __init__(self, boxes: Sequence[Box], volume_shape: tuple[int, ...]):
        if len(boxes) == 0:
            raise ConfigError("fuse_blocks boxes: expected at least one block box")
        for i, box in enumerate(boxes):
            if not isinstance(box, Box) or box.ndim != SPATIAL_DIMS or box.is_empty():
                raise ConfigError(
                    f"fuse_blocks boxes[{i}]={box!r}: expected a non-empty 3D synjax.geometry.Box"
                )
        starts = np.array([b.start for b in boxes])
        stops = np.array([b.stop for b in boxes])
        self.starts, self.stops, positions = [], [], []
        for axis in range(SPATIAL_DIMS):
            axis_starts, position = np.unique(starts[:, axis], return_inverse=True)
            axis_stops = np.zeros_like(axis_starts)
            axis_stops[position] = stops[:, axis]
            self.starts.append(axis_starts)
            self.stops.append(axis_stops)
            positions.append(position.reshape(-1))
        positions = np.stack(positions, 1)
        shape = tuple(len(s) for s in self.starts)
        consistent = all(
            np.array_equal(self.stops[a][positions[:, a]], stops[:, a]) for a in range(SPATIAL_DIMS)
        )
        flat = np.ravel_multi_index(positions.T, shape)
        if not consistent or len(boxes) != int(np.prod(shape)) or np.unique(flat).size != flat.size:
            raise ConfigError(
                f"fuse_blocks boxes: the {len(boxes)} boxes do not form a grid of blocks "
                "(expected the output of block_boxes)"
            )
        for axis in range(SPATIAL_DIMS):
            a_starts, a_stops = self.starts[axis], self.stops[axis]
            if a_starts[0] != 0 or a_stops[-1] != volume_shape[axis]:
                raise ConfigError(
                    f"fuse_blocks boxes: blocks span [{a_starts[0]}, {a_stops[-1]}) on axis "
                    f"{AXES[axis]}, expected [0, {volume_shape[axis]}) (the shape of out)"
                )
            if np.any(a_starts[1:] >= a_stops[:-1]) or np.any(np.diff(a_stops) <= 0):
                raise ConfigError(
                    f"fuse_blocks boxes: neighbouring blocks must overlap on axis {AXES[axis]} "
                    f"(starts {a_starts.tolist()}, stops {a_stops.tolist()})"
                )
        self.index = np.empty(shape, np.int64)
        self.index[tuple(positions.T)] = np.arange(len(boxes))
        self.positions = positions
        self.cuts = [
            np.concatenate([[0], (s[1:] + e[:-1]) // 2, [e[-1]]])
            for s, e in zip(self.starts, self.stops, strict=True)
        ]

    def core(self, block: int) -> Box:
        """The voxels that block `block` writes: its box cut in the middle of each margin."""
        position = self.positions[block]
        return Box(
            tuple(int(self.cuts[a][p]) for a, p in enumerate(position)),
            tuple(int(self.cuts[a][p + 1]) for a, p in enumerate(position)),
        )

    def seams(self, axis: int) -> list[tuple[int, int]]:
        """(lower block, upper block) of every pair of neighbours along `axis`."""
        lower = np.moveaxis(self.index, axis, 0)[:-1].reshape(-1)
        upper = np.moveaxis(self.index, axis, 0)[1:].reshape(-1)
        return list(zip(lower.tolist(), upper.tolist(), strict=True))


class _PendingMargins:
    """Margins read from one block that wait for the block across the seam.

    Kept in a dict, or as `.npy` files under `scratch_dir` when one is given.
    """

    def __init__(self, scratch_dir: str | os.PathLike | None):
        self._memory: dict[tuple[int, int], np.ndarray] = {}
        self._dir = None
        if scratch_dir is not None:
            pathlib.Path(scratch_dir).mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(prefix="fusion-margins-", dir=scratch_dir)

    def _path(self, key: tuple[int, int]) -> pathlib.Path:
        return pathlib.Path(self._dir.name) / f"{key[0]}-{key[1]}.npy"

    def put(self, key: tuple[int, int], margin: np.ndarray) -> None:
        if self._dir is None:
            self._memory[key] = margin
        else:
            np.save(self._path(key), margin)

    def pop(self, key: tuple[int, int]) -> np.ndarray:
        if self._dir is None:
            return self._memory.pop(key)
        path = self._path(key)
        margin = np.load(path)
        path.unlink()
        return margin

    def close(self) -> None:
        self._memory.clear()
        if self._dir is not None:
            self._dir.cleanup()


def _read_block(block_labels: Callable[[int], Any], block: int, box: Box) -> np.ndarray:
    """`block_labels(block)` checked: `[box.shape]` non-negative integers."""
    labels = np.asarray(block_labels(block))
    if labels.shape != box.shape:
        raise DataError(
            f"fuse_blocks block_labels({block}): shape {labels.shape}, expected {box.shape} "
            f"(the block's box {box.start}-{box.stop})"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"fuse_blocks block_labels({block}): dtype {labels.dtype}, expected integer labels"
        )
    if np.issubdtype(labels.dtype, np.signedinteger) and labels.size and labels.min() < 0:
        raise DataError(
            f"fuse_blocks block_labels({block}): negative label {labels.min()}, expected "
            "0 (background) or positive instance ids"
        )
    return labels


def _remap(labels: np.ndarray, local_ids: np.ndarray, new_ids: np.ndarray, block: int):
    """`labels` with `local_ids[k]` replaced by `new_ids[k]` and 0 kept."""
    mapping = dict(zip(local_ids.tolist(), new_ids.tolist(), strict=True))
    mapping[0] = 0
    try:
        return fastremap.remap(labels, mapping, preserve_missing_labels=False)
    except KeyError as missing:
        raise DataError(
            f"fuse_blocks block_labels({block}): {missing.args[0]} (a label not there on the "
            "first call); block_labels must return the same labels every time"
        ) from None


def _counts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(keys, return_counts=True)


def _seam_table(lower: np.ndarray, upper: np.ndarray) -> dict[str, np.ndarray]:
    """Overlaps of the lower and upper blocks' instances in one margin (global ids)."""
    lower, upper = lower.reshape(-1), upper.reshape(-1)
    both = (lower > 0) & (upper > 0)
    pairs = np.stack([lower[both], upper[both]], 1).astype(np.int64)
    pairs, shared = np.unique(pairs, axis=0, return_counts=True)
    lower_ids, lower_sizes = _counts(lower[lower > 0].astype(np.int64))
    upper_ids, upper_sizes = _counts(upper[upper > 0].astype(np.int64))
    return {
        "pairs": pairs.reshape(-1, 2),
        "shared": shared,
        "lower_ids": lower_ids,
        "lower_sizes": lower_sizes,
        "upper_ids": upper_ids,
        "upper_sizes": upper_sizes,
    }


def _match(rows: np.ndarray, cols: np.ndarray, iou: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of candidate pairs with the largest total IoU.

    Each connected group of candidates is matched on its own: a lone pair
    outright, a larger group by `linear_sum_assignment`.
    """
    if rows.size == 0:
        return rows, cols
    row_ids, r = np.unique(rows, return_inverse=True)
    col_ids, c = np.unique(cols, return_inverse=True)
    graph = scipy.sparse.coo_array(
        (np.ones(r.size), (r, row_ids.size + c)), shape=(row_ids.size + col_ids.size,) * 2
    )
    _, group = csgraph.connected_components(graph, directed=False)
    edge_group = group[r]
    single = np.bincount(edge_group)[edge_group] == 1
    matched_r, matched_c = [r[single]], [c[single]]
    for g in np.unique(edge_group[~single]):
        in_group = edge_group == g
        gr, gc, gv = r[in_group], c[in_group], iou[in_group]
        local_r, gr = np.unique(gr, return_inverse=True)
        local_c, gc = np.unique(gc, return_inverse=True)
        gain = np.zeros((local_r.size, local_c.size))
        gain[gr, gc] = gv
        best_r, best_c = linear_sum_assignment(gain, maximize=True)
        real = gain[best_r, best_c] > 0
        matched_r.append(local_r[best_r[real]])
        matched_c.append(local_c[best_c[real]])
    return row_ids[np.concatenate(matched_r)], col_ids[np.concatenate(matched_c)]


def _fuse_axis(tables: list[dict], fused: np.ndarray, iou_threshold: float) -> np.ndarray:
    """One axis step: matched pairs of fused ids over all the seams of an axis.

    Args:
      tables: the `_seam_table`s of the axis's seams (provisional global ids).
      fused: `[num_ids + 1]` fused id of each provisional id (0 background).
      iou_threshold: pairs need IoU above this to match.

    Returns:
      `[m, 2]` (lower, upper) fused ids to join.
    """
    num_fused = int(fused.max()) + 1
    lower_sizes = np.zeros(num_fused, np.int64)
    upper_sizes = np.zeros(num_fused, np.int64)
    pair_parts, shared_parts = [], []
    for table in tables:
        np.add.at(lower_sizes, fused[table["lower_ids"]], table["lower_sizes"])
        np.add.at(upper_sizes, fused[table["upper_ids"]], table["upper_sizes"])
        pair_parts.append(fused[table["pairs"]])
        shared_parts.append(table["shared"])
    if not pair_parts:
        return np.zeros((0, 2), np.int64)
    pairs = np.concatenate(pair_parts).reshape(-1, 2)
    shared = np.concatenate(shared_parts)
    # Earlier steps joined blocks along other axes only: a fused id lies at one grid
    # position along this axis, so it never meets itself across a seam.
    keys = pairs[:, 0] * num_fused + pairs[:, 1]
    keys, inverse = np.unique(keys, return_inverse=True)
    shared = np.bincount(inverse.reshape(-1), weights=shared, minlength=keys.size)
    lower, upper = np.divmod(keys, num_fused)
    iou = shared / (lower_sizes[lower] + upper_sizes[upper] - shared)
    keep = iou > iou_threshold
    rows, cols = _match(lower[keep], upper[keep], iou[keep])
    return np.stack([rows, cols], 1)


def _check_options(iou_threshold: float, axis_order: Sequence[str]) -> list[int]:
    if not isinstance(iou_threshold, numbers.Real) or not 0.0 <= float(iou_threshold) < 1.0:
        raise ConfigError(f"fuse_blocks iou_threshold={iou_threshold!r}: expected 0 <= value < 1")
    order = list(axis_order) if not isinstance(axis_order, str) else [axis_order]
    if sorted(order) != sorted(AXES):
        raise ConfigError(
            f"fuse_blocks axis_order={tuple(order)}: expected each of 'z', 'y', 'x' once"
        )
    return [AXES.index(a) for a in order]


def fuse_blocks(
    boxes: Sequence[Box],
    block_labels: Callable[[int], Any],
    out: Any,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    axis_order: Sequence[str] = DEFAULT_AXIS_ORDER,
    *,
    scratch_dir: str | os.PathLike | None = None,
    on_block_ids: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
) -> int:
    """Fuses per-block instance labels into one label volume, axis by axis.

    See the module docstring for the method.

    Args:
      boxes: the blocks, from `block_boxes` (a grid of overlapping boxes
        covering `out`).
      block_labels: `block_labels(i)` -> `[boxes[i].shape]` integer instance
        labels of block i (0 background, ids local to the block). Called twice
        per block; it must return the same labels each time.
      out: writable `[z, y, x]` integer array (numpy, zarr, tensorstore) of the
        volume's shape, written with `out[slices] = array`, every voxel once.
      iou_threshold: instances across a seam are joined when their IoU within
        the margins is above this, in `[0, 1)`.
      axis_order: the axes in the order they are fused (the paper's z, x, y).
      scratch_dir: where margins that wait for their neighbour block are kept
        (in memory when None).
      on_block_ids: called as the blocks are written with `(block, local_ids,
        fused_ids)`: the block's instance ids (sorted) and the output id each
        became (0 where the instance owns no output voxel), so that callers
        can carry per-instance values (scores) to the fused instances
        without reading `out` again.

    Returns:
      The number of fused instances n: `out` holds ids 1..n, 0 background.

    Raises:
      ConfigError: bad boxes, threshold or axis order, or an `out` of the wrong
        shape or too small a dtype.
      DataError: `block_labels` returned labels of the wrong shape or dtype,
        negative labels, or different labels on the second call.
    """
    axes = _check_options(iou_threshold, axis_order)
    out_shape = tuple(int(s) for s in out.shape)
    if len(out_shape) != SPATIAL_DIMS:
        raise ConfigError(f"fuse_blocks out: shape {out_shape}, expected [z, y, x]")
    out_dtype = np.dtype(getattr(out.dtype, "numpy_dtype", out.dtype))
    if not np.issubdtype(out_dtype, np.integer):
        raise ConfigError(f"fuse_blocks out: dtype {out_dtype}, expected an integer dtype")
    grid = _Grid(boxes, out_shape)

    # Provisional ids: block i's k-th instance (by local id) is offsets[i] + k + 1.
    local_ids: list[np.ndarray] = []
    offsets = np.zeros(len(boxes) + 1, np.int64)
    seams_of = {}
    for axis in range(SPATIAL_DIMS):
        for lower, upper in grid.seams(axis):
            seams_of.setdefault(lower, []).append((axis, lower, upper))
            seams_of.setdefault(upper, []).append((axis, lower, upper))
    tables: list[list[dict]] = [[] for _ in range(SPATIAL_DIMS)]
    in_core_parts = []
    pending = _PendingMargins(scratch_dir)
    try:
        for block, box in enumerate(boxes):
            labels = _read_block(block_labels, block, box)
            ids = fastremap.unique(labels)
            ids = ids[ids != 0]
            local_ids.append(ids)
            offsets[block + 1] = offsets[block] + ids.size
            gids = _remap(labels, ids, np.arange(offsets[block] + 1, offsets[block + 1] + 1), block)
            del labels
            core = gids[grid.core(block).relative_to(box).slices()]
            present = fastremap.unique(core)
            in_core_parts.append(present[present != 0].astype(np.int64))
            for axis, lower, upper in seams_of.get(block, []):
                margin = boxes[lower].intersect(boxes[upper])
                mine = np.ascontiguousarray(gids[margin.relative_to(box).slices()])
                partner = upper if block == lower else lower
                if partner > block:
                    pending.put((block, partner), mine)
                    continue
                theirs = pending.pop((partner, block))
                pair = (theirs, mine) if partner == lower else (mine, theirs)
                tables[axis].append(_seam_table(*pair))
            del gids
    finally:
        pending.close()

    # Axis steps: fused[g] is the fused id of provisional id g (0 background).
    num_ids = int(offsets[-1])
    fused = np.arange(num_ids + 1, dtype=np.int64)
    for axis in axes:
        joins = _fuse_axis(tables[axis], fused, iou_threshold)
        graph = scipy.sparse.coo_array(
            (np.ones(len(joins)), (joins[:, 0], joins[:, 1])), shape=(int(fused.max()) + 1,) * 2
        )
        _, component = csgraph.connected_components(graph, directed=False)
        # Component 0 holds the background (id 0, joined to nothing).
        fused = component[fused].astype(np.int64)

    # Final ids 1..n over the fused instances that own at least one output voxel.
    in_core = np.unique(fused[np.concatenate([np.zeros(1, np.int64), *in_core_parts])])
    in_core = in_core[in_core != 0]
    final_of_fused = np.zeros(int(fused.max()) + 1, np.int64)
    final_of_fused[in_core] = np.arange(1, in_core.size + 1)
    final = final_of_fused[fused]
    if in_core.size > np.iinfo(out_dtype).max:
        raise ConfigError(
            f"fuse_blocks out: dtype {out_dtype} cannot hold {in_core.size} instance ids"
        )

    for block, box in enumerate(boxes):
        core = grid.core(block)
        labels = _read_block(block_labels, block, box)[core.relative_to(box).slices()]
        provisional = np.arange(offsets[block] + 1, offsets[block + 1] + 1)
        written = _remap(labels, local_ids[block], final[provisional], block)
        out[core.slices()] = written.astype(out_dtype, copy=False)
        if on_block_ids is not None:
            on_block_ids(block, local_ids[block], final[provisional])
    return int(in_core.size)
