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
from synjax.postprocess.blockwise_pass_state import PassState, each_block_result
from synjax.postprocess.pair_table import PairTable, reduce_pairs
from synjax.report.progress import progress_bar

VALID_CONNECTIVITY = (6, 18, 26)


def _grid(volume_shape: Sequence[int], block_shape: Sequence[int] | int) -> BlockGrid:
    return BlockGrid(tuple(int(v) for v in volume_shape[:SPATIAL_DIMS]), block_shape)


def _blocks(grid: BlockGrid, what: str, progress: bool, ids: Sequence[int] | None = None):
    """Block ids (the grid's by default), behind a progress bar named `what` when `progress`."""
    ids = grid.block_ids() if ids is None else ids
    return progress_bar(ids, total=len(ids), desc=what, disable=not progress)


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


def _label_block(
    source: Any,
    dest: Any,
    grid: BlockGrid,
    block_id: int,
    foreground: Callable[[np.ndarray], np.ndarray],
    connectivity: int,
    before: int,
) -> dict[str, np.ndarray]:
    """Pass 1 on one block: its components labelled from `before + 1` on, written to `dest`.

    Returns:
      `{"count": the block's components, "first_voxel": [count] raster index in
      the volume of each one's first voxel}`.
    """
    core = _core(grid, block_id)
    mask = np.asarray(foreground(_read(source, core)))
    if mask.shape != core.shape:
        raise DataError(f"foreground returned {mask.shape} for a block of shape {core.shape}")
    labels, count = cc3d.connected_components(
        mask.astype(bool, copy=False), connectivity=connectivity, return_N=True
    )
    labels = labels.astype(np.uint64)
    first_voxel = _first_voxels(labels, core.start, grid.volume_shape)
    labels[labels != 0] += np.uint64(before)
    dest[core.slices()] = labels
    return {"count": np.int64(count), "first_voxel": first_voxel}


def _join_block(dest: Any, grid: BlockGrid, block_id: int, offsets) -> dict[str, np.ndarray]:
    """Pass 2 on one block: the distinct label pairs (smaller, larger) joined across its voxels."""
    a, b = neighbour_pairs(_read(dest, _block_upper_box(grid, block_id)), offsets)
    first, second, _ = reduce_pairs(np.minimum(a, b), np.maximum(a, b), [], [])
    return {"first": first, "second": second}


def _relabel_block(dest: Any, table: np.ndarray, box: Box) -> None:
    """Pass 3 on one block: each label `l` replaced by `table[l]`, in place."""
    dest[box.slices()] = table[_read(dest, box)].astype(dest.dtype, copy=False)


def _labels_of_blocks(
    source, dest, grid, foreground, connectivity, progress, state, name
) -> tuple[int, np.ndarray]:
    """Pass 1 over the grid: `(total components, [total + 1] first voxel of each, 0 first)`.

    Labels count on from the blocks before, so with `state` a rerun reads the
    blocks done (a prefix of the grid: blocks run in order) and labels from
    the first block not done; rewriting a block is harmless (it is written
    whole from `source`).
    """
    found: list[dict[str, np.ndarray]] = []
    first = 0
    done = None
    if state is not None:
        done = state.blocks(name)
        todo = done.todo()
        first = int(todo[0]) if todo.size else grid.num_blocks
        found = [state.load_block(name, b) for b in range(first)]
    total = sum(int(block["count"]) for block in found)
    for block_id in _blocks(grid, "components", progress, range(first, grid.num_blocks)):
        block = _label_block(source, dest, grid, block_id, foreground, connectivity, total)
        if state is not None:
            state.save_block(name, block_id, **block)
            done.record([block_id])
        found.append(block)
        total += int(block["count"])
    first_voxel = [np.zeros((1,), np.int64)] + [block["first_voxel"] for block in found]
    return total, np.concatenate(first_voxel)


def label_components_blockwise(
    source: Any,
    dest: Any,
    block_shape: Sequence[int] | int,
    foreground: Callable[[np.ndarray], np.ndarray],
    connectivity: int = 26,
    progress: bool = False,
    state: PassState | None = None,
    name: str = "components",
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
      state: a pass state over this block grid, so that a killed run resumes:
        each pass's blocks are recorded as done, the final id table is saved
        before `dest` is relabelled, and the relabelling (in place) records
        `dest`'s storage chunks (or, without `chunks`, the blocks) as it
        rewrites them, so that none is relabelled twice. None: no state.
      name: the passes' name in `state` (one per labelling kept there).

    Returns:
      The number of components n.

    Raises:
      DataError: shapes differ, or `foreground` returns another shape.
      ConfigError: an unknown connectivity or a bad block shape.
    """
    shape = _check_same_shape("label_components_blockwise source and dest", source, dest)
    offsets = forward_offsets(connectivity)
    grid = _grid(shape, block_shape)
    ids = None if state is None else state.load(f"{name}_ids")
    if ids is None:
        # Pass 1: each block on its own, labels made unique by an offset.
        total, first_voxel = _labels_of_blocks(
            source, dest, grid, foreground, connectivity, progress, state, f"{name}_labels"
        )
        # Pass 2: joins with the neighbours after each block.
        joins = PairTable(())
        for found in each_block_result(
            state,
            f"{name}_joins",
            grid.block_ids(),
            lambda block_id: _join_block(dest, grid, block_id, offsets),
            lambda ids: _blocks(grid, "component joins", progress, ids),
        ):
            joins.add(found["first"], found["second"], [])
        first, second, _ = joins.result()
        num_groups, group = join_ids(total, first, second)
        # Number components by their first voxel in the volume, as cc3d does.
        first_of_group = np.full(num_groups + 1, np.iinfo(np.int64).max)
        np.minimum.at(first_of_group, group, first_voxel)
        rank = np.zeros(num_groups + 1, np.uint64)
        rank[np.argsort(first_of_group[1:], kind="stable") + 1] = np.arange(1, num_groups + 1)
        ids = {"table": rank[group], "count": np.int64(num_groups)}
        if state is not None:
            # Saved before the relabelling starts: from here on `dest` is rewritten in place.
            state.save(f"{name}_ids", **ids)
    relabel_resumable(dest, ids["table"], grid, progress, state, f"{name}_relabel")
    return int(ids["count"])


def relabel_resumable(
    dest: Any,
    table: np.ndarray,
    grid: BlockGrid,
    progress: bool = False,
    state: PassState | None = None,
    name: str = "relabel",
) -> None:
    """`dest` relabelled through `table` in place; with `state`, never a unit twice.

    In place, so with `state` the units are `dest`'s storage chunks (each
    rewritten whole by tensorstore) or, for a volume without a `chunks`
    attribute, the blocks of `grid`; each is recorded as done once written,
    and a rerun relabels only the others.
    """
    if state is None:
        relabel_blockwise(dest, table, grid.block_shape, progress)
        return
    chunks = getattr(dest, "chunks", None)
    units = grid if chunks is None else BlockGrid(grid.volume_shape, tuple(chunks)[:SPATIAL_DIMS])
    done = state.blocks(name, units)
    table = np.asarray(table)
    for unit in _blocks(units, "relabelling", progress, done.todo().tolist()):
        _relabel_block(dest, table, _core(units, unit))
        done.record([unit])


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
        _relabel_block(dest, table, _core(grid, block_id))


def site_components_blockwise(
    proximity: Any,
    pre_dest: Any,
    post_dest: Any,
    block_shape: Sequence[int] | int,
    tau: float,
    connectivity: int = 26,
    progress: bool = False,
    state: PassState | None = None,
) -> tuple[int, int]:
    """`candidates.site_components` block by block: components of p > tau and p < -tau.

    Args:
      proximity: `[z, y, x]` signed proximity in [-1, 1].
      pre_dest, post_dest: `[z, y, x]` integer volumes for the pre and post labels.
      block_shape: blocks to read and write.
      tau: site threshold.
      connectivity: 6, 18 or 26.
      progress: show a progress bar over the blocks of each pass.
      state: a pass state over this block grid, so that a killed run resumes
        (`label_components_blockwise`); None: no state.

    Returns:
      The number of pre and post components.
    """
    pre = label_components_blockwise(
        proximity, pre_dest, block_shape, lambda p: p > tau, connectivity, progress, state, "pre"
    )
    post = label_components_blockwise(
        proximity, post_dest, block_shape, lambda p: p < -tau, connectivity, progress, state, "post"
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


_OVERLAP_REDUCTIONS = ("sum", "sum", "min", "max")


def _overlap_block(
    components: Any, segmentation: Any, weights: Any, grid: BlockGrid, block_id: int
) -> dict[str, np.ndarray]:
    """One block's (component, segment) rows: voxels, weight sum and box, one row per pair."""
    core = _core(grid, block_id)
    comp, seg = _read(components, core), _read(segmentation, core)
    inside = (comp != 0) & (seg != 0)
    where = np.argwhere(inside) + np.asarray(core.start)
    weight = (np.zeros(where.shape[0]) if weights is None else _read(weights, core)[inside]).astype(
        np.float64
    )
    first, second, (count, weight_sum, lo, hi) = reduce_pairs(
        comp[inside],
        seg[inside],
        [np.ones(len(where), np.int64), weight, where, where],
        _OVERLAP_REDUCTIONS,
    )
    return {
        "component": first,
        "segment": second,
        "count": count,
        "weight_sum": weight_sum,
        "lo": lo.reshape(-1, SPATIAL_DIMS),
        "hi": hi.reshape(-1, SPATIAL_DIMS),
    }


def site_overlaps_blockwise(
    components: Any,
    segmentation: Any,
    block_shape: Sequence[int] | int,
    weights: Any = None,
    progress: bool = False,
    state: PassState | None = None,
    name: str = "overlaps",
) -> SiteTable:
    """Voxels, weight sums and bounding boxes of every (component, segment) overlap.

    Voxels with component 0 or segment 0 (unlabelled) are left out, as in
    `candidates.component_segment_overlaps`; keep the rows with `count >=
    omega` for its result. Each block's rows are folded first, then the
    blocks' in block order (so the weight sums are the same with or without
    a state).

    Args:
      components: `[z, y, x]` component labels, 0 = background.
      segmentation: `[z, y, x]` segment labels, 0 = unlabelled.
      block_shape: blocks to read.
      weights: optional `[z, y, x]` weights to sum (e.g. |proximity|); None: zeros.
      progress: show a progress bar over the blocks.
      state: a pass state over this block grid: each block's rows are kept
        and the table saved when the pass is over, so a killed run resumes;
        None: no state.
      name: the pass's name in `state`.

    Returns:
      The rows, sorted by component, then segment.
    """
    volumes = (components, segmentation) + ((weights,) if weights is not None else ())
    shape = _check_same_shape("site_overlaps_blockwise volumes", *volumes)
    grid = _grid(shape, block_shape)
    saved = None if state is None else state.load(name)
    if saved is not None:
        return SiteTable(**saved)
    table = PairTable(_OVERLAP_REDUCTIONS)
    for found in each_block_result(
        state,
        name,
        grid.block_ids(),
        lambda block_id: _overlap_block(components, segmentation, weights, grid, block_id),
        lambda ids: _blocks(grid, "site overlaps", progress, ids),
    ):
        if len(found["component"]):
            table.add(
                found["component"],
                found["segment"],
                [found["count"], found["weight_sum"], found["lo"], found["hi"]],
            )
    comp, seg, (count, weight_sum, lo, hi) = table.result()
    if len(comp) == 0:
        lo = hi = np.zeros((0, SPATIAL_DIMS), np.int64)
        count, weight_sum = np.zeros((0,), np.int64), np.zeros((0,), np.float64)
    sites = SiteTable(comp, seg, count.astype(np.int64), weight_sum, lo, hi + 1)
    if state is not None:
        state.save(name, **dataclasses.asdict(sites))
    return sites


def _adjacency_block(segmentation: Any, grid: BlockGrid, block_id: int) -> dict[str, np.ndarray]:
    """One block's distinct ordered pairs of face-adjacent segments (both orders)."""
    a, b = neighbour_pairs(
        _read(segmentation, _block_upper_box(grid, block_id)), forward_offsets(6)
    )
    first, second, _ = reduce_pairs(np.concatenate([a, b]), np.concatenate([b, a]), [], [])
    return {"first": first, "second": second}


def segment_adjacency_blockwise(
    segmentation: Any,
    block_shape: Sequence[int] | int,
    progress: bool = False,
    state: PassState | None = None,
    name: str = "adjacency",
) -> np.ndarray:
    """Ordered pairs of distinct labelled segments that share a voxel face.

    Equals `candidates.segment_adjacency` of the whole volume.

    Args:
      segmentation: `[z, y, x]` segment labels, 0 = unlabelled.
      block_shape: blocks to read.
      progress: show a progress bar over the blocks.
      state: a pass state over this block grid: each block's pairs are kept
        and the result saved when the pass is over; None: no state.
      name: the pass's name in `state`.

    Returns:
      `[k, 2]` uint64 unique rows (a, b), a != b, both (a, b) and (b, a),
      sorted by a, then b.
    """
    shape = _check_same_shape("segment_adjacency_blockwise segmentation", segmentation)
    grid = _grid(shape, block_shape)
    saved = None if state is None else state.load(name)
    if saved is not None:
        return saved["pairs"]
    table = PairTable(())
    for found in each_block_result(
        state,
        name,
        grid.block_ids(),
        lambda block_id: _adjacency_block(segmentation, grid, block_id),
        lambda ids: _blocks(grid, "segment adjacency", progress, ids),
    ):
        table.add(found["first"], found["second"], [])
    first, second, _ = table.result()
    pairs = np.stack([first, second], axis=1)
    if state is not None:
        state.save(name, pairs=pairs)
    return pairs
