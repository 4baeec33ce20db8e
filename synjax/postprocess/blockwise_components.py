"""Connected components, overlaps and adjacency of volumes read block by block.

The partner candidates (`synjax.postprocess.candidates`) start from the
connected components of the thresholded proximity map, their overlaps with a
neuron segmentation and the segments' face adjacency. Here each is computed
one block at a time, so that memory holds one block plus tables of ids:

1. `label_components_blockwise`: cc3d labels each block's foreground on its
   own; the labels are offset by the number of components before the block
   (globally unique) and written to `dest`. Then, for each block, the box of
   its voxels grown by one voxel on its upper side along each axis is read
   back and every pair of neighbouring foreground voxels (within the
   connectivity) with different labels is a join. Any two neighbouring voxels
   lie in the grown box of the block holding their lower corner, so every
   pair across a face, an edge or a corner between blocks is seen. The joins
   are resolved as the connected components of a graph on the block labels
   (`scipy.sparse.csgraph`, union-find in effect), numbered by the raster
   position of their first voxel, and `dest` is relabelled block by block.
   cc3d numbers the components of a whole volume the same way, so the result
   equals `cc3d.connected_components` of the whole volume, ids included.
2. `site_overlaps_blockwise`: (component, segment) voxel counts, sums of a
   weight and bounding boxes, accumulated per block.
3. `segment_adjacency_blockwise`: pairs of segments sharing a voxel face,
   from each block's voxels and its upper neighbours.

`dest` and the inputs may be numpy arrays or on-disk volumes (zarr or
tensorstore through `synjax.io`, h5py datasets): anything with `.shape` and
numpy slicing; `dest` must accept slice assignment and read back what was
written. With `block_shape` a multiple of `dest`'s chunks each block writes
whole chunks.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import cc3d
import numpy as np
import scipy.sparse
from scipy.sparse import csgraph

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Box
from synjax.inference.block_grid import BlockGrid
from synjax.postprocess.pair_table import PairTable
from synjax.report.progress import progress_bar

VALID_CONNECTIVITY = (6, 18, 26)


def _grid(volume_shape: Sequence[int], block_shape: Sequence[int] | int) -> BlockGrid:
    return BlockGrid(tuple(int(v) for v in volume_shape[:SPATIAL_DIMS]), block_shape)


def _blocks(grid: BlockGrid, what: str, progress: bool):
    """The grid's block ids, behind a progress bar named `what` when `progress`."""
    return progress_bar(grid.block_ids(), total=grid.num_blocks, desc=what, disable=not progress)


def _core(grid: BlockGrid, block_id: int) -> Box:
    """The voxels a block owns, cut to the volume."""
    return Box.from_slices(grid.output_box(block_id))


def _read(volume: Any, box: Box) -> np.ndarray:
    return np.asarray(volume[box.slices()])


def _check_same_shape(what: str, *volumes: Any) -> tuple[int, int, int]:
    shapes = {tuple(v.shape) for v in volumes}
    if len(shapes) != 1 or len(next(iter(shapes))) != SPATIAL_DIMS:
        raise DataError(f"{what}: expected 3D [z, y, x] volumes of one shape, got {sorted(shapes)}")
    return next(iter(shapes))


def forward_offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """Half of the neighbourhood: the offsets `d` in it with `d > 0` lexicographically.

    Each neighbouring pair of voxels `(p, p + d)` is counted once this way.

    Raises:
      ConfigError: for a connectivity other than 6, 18 or 26.
    """
    if connectivity not in VALID_CONNECTIVITY:
        raise ConfigError(f"connectivity={connectivity}: expected one of {VALID_CONNECTIVITY}")
    # 6: one non-zero coordinate; 18: at most two; 26: up to three.
    most_nonzero = {6: 1, 18: 2, 26: 3}[connectivity]
    return [
        d
        for d in itertools.product((-1, 0, 1), repeat=SPATIAL_DIMS)
        if d > (0, 0, 0) and sum(map(abs, d)) <= most_nonzero
    ]


def _shifted_pair(labels: np.ndarray, offset: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels at `p` and at `p + offset`, for every `p` with both inside the array."""
    here, there = [], []
    for d, n in zip(offset, labels.shape, strict=True):
        here.append(slice(max(0, -d), n - max(0, d)))
        there.append(slice(max(0, d), n - max(0, -d)))
    return labels[tuple(here)].ravel(), labels[tuple(there)].ravel()


def neighbour_pairs(
    labels: np.ndarray, offsets: Sequence[Sequence[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of different non-zero labels on neighbouring voxels (`[k]` each, uint64).

    Args:
      labels: `[z, y, x]` integer labels, 0 = background.
      offsets: neighbour offsets to compare along, e.g. `forward_offsets(26)`.

    Returns:
      `(a, b)`: the label at `p` and at `p + offset` for every such pair, repeats included.
    """
    firsts, seconds = [], []
    for offset in offsets:
        a, b = _shifted_pair(labels, offset)
        touching = (a != b) & (a != 0) & (b != 0)
        firsts.append(a[touching])
        seconds.append(b[touching])
    if not firsts:
        return np.zeros((0,), np.uint64), np.zeros((0,), np.uint64)
    return (
        np.concatenate(firsts).astype(np.uint64),
        np.concatenate(seconds).astype(np.uint64),
    )


def join_ids(num_ids: int, first: np.ndarray, second: np.ndarray) -> tuple[int, np.ndarray]:
    """Groups ids `1..num_ids` joined by the pairs `(first[i], second[i])`.

    Returns:
      `(num_groups, group)`: `group` `[num_ids + 1]` int64 gives each id its
      group 1..num_groups (connected components of the join graph, numbered in
      the order of their smallest id); id 0 stays group 0.
    """
    joins = scipy.sparse.coo_array(
        (np.ones(len(first), np.int8), (first.astype(np.int64), second.astype(np.int64))),
        shape=(num_ids + 1, num_ids + 1),
    )
    _, group = csgraph.connected_components(joins, directed=False)
    # csgraph numbers components by their smallest node, so 0 (alone) is 0.
    return int(group.max()), group.astype(np.int64)


def _block_upper_box(grid: BlockGrid, block_id: int) -> Box:
    """A block's voxels and the one-voxel layer after it on each axis, cut to the volume."""
    core = _core(grid, block_id)
    grown = Box(core.start, tuple(s + 1 for s in core.stop))
    return grown.intersect(Box.from_shape(grid.volume_shape))


def _first_voxels(labels: np.ndarray, origin: Sequence[int], volume_shape) -> np.ndarray:
    """`[n]` raster index in the volume of each label 1..n's first voxel in a block."""
    ids, first = np.unique(labels.ravel(), return_index=True)
    first = first[ids != 0]
    local = np.unravel_index(first, labels.shape)
    where = tuple(p + o for p, o in zip(local, origin, strict=True))
    return np.ravel_multi_index(where, volume_shape).astype(np.int64)


def label_components_blockwise(
    source: Any,
    dest: Any,
    block_shape: Sequence[int] | int,
    foreground: Callable[[np.ndarray], np.ndarray],
    connectivity: int = 26,
    progress: bool = False,
) -> int:
    """Connected components of `foreground(source)`, labelled block by block into `dest`.

    Equals `cc3d.connected_components(foreground(source), connectivity)` of the
    whole volume, ids included (see the module docstring).

    Args:
      source: `[z, y, x]` volume read block by block.
      dest: `[z, y, x]` integer volume (uint32 or uint64) of the same shape,
        written block by block; it ends up holding the labels 1..n, 0 =
        background.
      block_shape: `(bz, by, bx)` (or one int for all axes) of the blocks.
      foreground: maps a block of `source` to a bool block of the same shape.
      connectivity: 6, 18 or 26.
      progress: show a progress bar over the blocks of each pass.

    Returns:
      The number of components n.

    Raises:
      DataError: shapes differ, or `foreground` returns another shape.
      ConfigError: an unknown connectivity or a bad block shape.
    """
    shape = _check_same_shape("label_components_blockwise source and dest", source, dest)
    offsets = forward_offsets(connectivity)
    grid = _grid(shape, block_shape)
    # Pass 1: each block on its own, labels made unique by an offset.
    total = 0
    first_voxel = [np.zeros((1,), np.int64)]  # id 0: background
    for block_id in _blocks(grid, "components", progress):
        core = _core(grid, block_id)
        mask = np.asarray(foreground(_read(source, core)))
        if mask.shape != core.shape:
            raise DataError(f"foreground returned {mask.shape} for a block of shape {core.shape}")
        labels, count = cc3d.connected_components(
            mask.astype(bool, copy=False), connectivity=connectivity, return_N=True
        )
        labels = labels.astype(np.uint64)
        first_voxel.append(_first_voxels(labels, core.start, shape))
        labels[labels != 0] += np.uint64(total)
        dest[core.slices()] = labels
        total += int(count)
    # Pass 2: joins with the neighbours after each block.
    joins = PairTable(())
    for block_id in _blocks(grid, "component joins", progress):
        a, b = neighbour_pairs(_read(dest, _block_upper_box(grid, block_id)), offsets)
        joins.add(np.minimum(a, b), np.maximum(a, b), [])
    first, second, _ = joins.result()
    num_groups, group = join_ids(total, first, second)
    # Number components by their first voxel in the volume, as cc3d does.
    first_of_group = np.full(num_groups + 1, np.iinfo(np.int64).max)
    np.minimum.at(first_of_group, group, np.concatenate(first_voxel))
    rank = np.zeros(num_groups + 1, np.uint64)
    rank[np.argsort(first_of_group[1:], kind="stable") + 1] = np.arange(1, num_groups + 1)
    relabel_blockwise(dest, rank[group], block_shape, progress)
    return num_groups


def relabel_blockwise(
    dest: Any, table: np.ndarray, block_shape: Sequence[int] | int, progress: bool = False
) -> None:
    """Replaces each label `l` of `dest` by `table[l]`, block by block, in place.

    Args:
      dest: `[z, y, x]` integer volume.
      table: `[max label + 1]` new id of every label.
      block_shape: blocks to read and write.
      progress: show a progress bar over the blocks.
    """
    grid = _grid(dest.shape, block_shape)
    table = np.asarray(table)
    for block_id in _blocks(grid, "relabelling", progress):
        core = _core(grid, block_id)
        dest[core.slices()] = table[_read(dest, core)].astype(dest.dtype, copy=False)


def site_components_blockwise(
    proximity: Any,
    pre_dest: Any,
    post_dest: Any,
    block_shape: Sequence[int] | int,
    tau: float,
    connectivity: int = 26,
    progress: bool = False,
) -> tuple[int, int]:
    """`candidates.site_components` block by block: components of p > tau and p < -tau.

    Args:
      proximity: `[z, y, x]` signed proximity in [-1, 1].
      pre_dest, post_dest: `[z, y, x]` integer volumes for the pre and post labels.
      block_shape: blocks to read and write.
      tau: site threshold.
      connectivity: 6, 18 or 26.
      progress: show a progress bar over the blocks of each pass.

    Returns:
      The number of pre and post components.
    """
    pre = label_components_blockwise(
        proximity, pre_dest, block_shape, lambda p: p > tau, connectivity, progress
    )
    post = label_components_blockwise(
        proximity, post_dest, block_shape, lambda p: p < -tau, connectivity, progress
    )
    return pre, post


@dataclasses.dataclass
class SiteTable:
    """Overlaps of components with segments, one row per (component, segment).

    Attributes:
      component: `[k]` uint64 component id (non-zero).
      segment: `[k]` uint64 segment id (non-zero).
      count: `[k]` int64 voxels in both.
      weight_sum: `[k]` float64 sum of the weight over those voxels.
      start: `[k, 3]` int64 first voxel of their bounding box (z, y, x).
      stop: `[k, 3]` int64 one past the last voxel of their bounding box.
    """

    component: np.ndarray
    segment: np.ndarray
    count: np.ndarray
    weight_sum: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    def __len__(self) -> int:
        return len(self.component)

    def select(self, index: np.ndarray) -> SiteTable:
        """Rows picked by a boolean mask or an integer index array."""
        return SiteTable(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})


def site_overlaps_blockwise(
    components: Any,
    segmentation: Any,
    block_shape: Sequence[int] | int,
    weights: Any = None,
    progress: bool = False,
) -> SiteTable:
    """Voxels, weight sums and bounding boxes of every (component, segment) overlap.

    Voxels with component 0 or segment 0 (unlabelled) are left out, as in
    `candidates.component_segment_overlaps`; keep the rows with `count >=
    omega` for its result.

    Args:
      components: `[z, y, x]` component labels, 0 = background.
      segmentation: `[z, y, x]` segment labels, 0 = unlabelled.
      block_shape: blocks to read.
      weights: optional `[z, y, x]` weights to sum (e.g. |proximity|); None: zeros.
      progress: show a progress bar over the blocks.

    Returns:
      The rows, sorted by component, then segment.
    """
    volumes = (components, segmentation) + ((weights,) if weights is not None else ())
    shape = _check_same_shape("site_overlaps_blockwise volumes", *volumes)
    grid = _grid(shape, block_shape)
    table = PairTable(("sum", "sum", "min", "max"))
    for block_id in _blocks(grid, "site overlaps", progress):
        core = _core(grid, block_id)
        comp, seg = _read(components, core), _read(segmentation, core)
        inside = (comp != 0) & (seg != 0)
        if not inside.any():
            continue
        where = np.argwhere(inside) + np.asarray(core.start)
        weight = (
            np.zeros(where.shape[0]) if weights is None else _read(weights, core)[inside]
        ).astype(np.float64)
        table.add(
            comp[inside],
            seg[inside],
            [np.ones(len(where), np.int64), weight, where, where],
        )
    comp, seg, (count, weight_sum, lo, hi) = table.result()
    if len(comp) == 0:
        lo = hi = np.zeros((0, SPATIAL_DIMS), np.int64)
        count, weight_sum = np.zeros((0,), np.int64), np.zeros((0,), np.float64)
    return SiteTable(comp, seg, count.astype(np.int64), weight_sum, lo, hi + 1)


def segment_adjacency_blockwise(
    segmentation: Any, block_shape: Sequence[int] | int, progress: bool = False
) -> np.ndarray:
    """Ordered pairs of distinct labelled segments that share a voxel face.

    Equals `candidates.segment_adjacency` of the whole volume.

    Args:
      segmentation: `[z, y, x]` segment labels, 0 = unlabelled.
      block_shape: blocks to read.
      progress: show a progress bar over the blocks.

    Returns:
      `[k, 2]` uint64 unique rows (a, b), a != b, both (a, b) and (b, a),
      sorted by a, then b.
    """
    shape = _check_same_shape("segment_adjacency_blockwise segmentation", segmentation)
    grid = _grid(shape, block_shape)
    offsets = forward_offsets(6)
    table = PairTable(())
    for block_id in _blocks(grid, "segment adjacency", progress):
        a, b = neighbour_pairs(_read(segmentation, _block_upper_box(grid, block_id)), offsets)
        table.add(np.concatenate([a, b]), np.concatenate([b, a]), [])
    first, second, _ = table.result()
    return np.stack([first, second], axis=1)
