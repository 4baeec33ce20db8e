"""The (segment, ground truth) contingency table of two volumes, counted block by block.

`rand_voi.adapted_rand_error` and `rand_voi.variation_of_information` read
their scores off one sparse contingency table (voxels per pair of segment and
ground-truth labels). `contingency_table_blockwise` counts that table one
block at a time, so two label volumes of any size are scored holding one
block of each plus the table (one row per distinct pair, which grows with
the number of labels, not of voxels). Pass the result as `table=` to the
metrics; they then equal the whole-volume values (the table holds the same
counts; only the order of its rows and columns differs, which the metrics do
not depend on).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import fastremap
import numpy as np
import scipy.sparse

from synjax.errors import DataError
from synjax.evaluation.rand_voi import DEFAULT_IGNORE_GT
from synjax.geometry import SPATIAL_DIMS, Box, spatial_triple

# Fold the per-block counts together once this many rows wait.
_COMPACT_ROWS = 1 << 20
# Up to this many (segment, body) cells a block's pairs are counted with a dense bincount.
_MAX_DENSE_PAIR_GRID = 1 << 24


def _blocks(shape: Sequence[int], block_shape: Sequence[int]) -> Iterator[Box]:
    """Boxes of `block_shape` tiling `shape` from the origin, the last ones cut."""
    starts = [range(0, n, b) for n, b in zip(shape, block_shape, strict=True)]
    volume = Box.from_shape(shape)
    for start in itertools.product(*starts):
        yield Box.at(start, block_shape).intersect(volume)


def _fold(seg: np.ndarray, gt: np.ndarray, counts: np.ndarray):
    """Rows with equal (seg, gt) added together, sorted by seg then gt."""
    order = np.lexsort((gt, seg))
    seg, gt, counts = seg[order], gt[order], counts[order]
    starts = np.flatnonzero(np.concatenate([[True], (seg[1:] != seg[:-1]) | (gt[1:] != gt[:-1])]))
    return seg[starts], gt[starts], np.add.reduceat(counts, starts)


def _dense(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels renumbered 0..k-1 (fastremap's hash map), and the uint64 label of each id."""
    dense, mapping = fastremap.renumber(labels, start=0, preserve_zero=False)
    values = np.empty(len(mapping), np.uint64)
    values[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(
        mapping.keys(), np.uint64, len(mapping)
    )
    return dense, values


def _count_pairs(seg: np.ndarray, gt: np.ndarray):
    """Distinct (seg, gt) label pairs of one block and their voxel counts.

    As `rand_voi.contingency_table` counts them: labels renumbered densely,
    the pair packed into one integer and counted with a bincount (no sort of
    the voxels). Labels come back as uint64, the key the tables are joined on.
    """
    if seg.size == 0:
        empty = np.zeros(0, np.uint64)
        return empty, empty, np.zeros(0, np.int64)
    # Labels are compared as uint64 (as fastremap keys them in the whole-volume table).
    seg_dense, seg_values = _dense(seg.astype(np.uint64, copy=False))
    gt_dense, gt_values = _dense(gt.astype(np.uint64, copy=False))
    pair = seg_dense.astype(np.int64) * len(gt_values) + gt_dense.astype(np.int64)
    if len(seg_values) * len(gt_values) <= _MAX_DENSE_PAIR_GRID:
        counts = np.bincount(pair, minlength=len(seg_values) * len(gt_values))
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(pair, return_counts=True)
    rows, cols = np.divmod(keys, len(gt_values))
    return seg_values[rows], gt_values[cols], counts.astype(np.int64)


def _integer_labels(name: str, block: np.ndarray) -> np.ndarray:
    if block.dtype == bool:
        return block.astype(np.uint8)
    if not np.issubdtype(block.dtype, np.integer):
        raise DataError(f"{name} labels must be integers, got dtype {block.dtype}")
    return block


class LabelledTable(NamedTuple):
    """A contingency table with the labels of its rows and columns.

    Attributes:
      table: `[num_segments, num_bodies]` sparse int64 voxel counts.
      seg_ids: uint64 `[num_segments]` segment label of each row, increasing.
      gt_ids: uint64 `[num_bodies]` ground-truth label of each column, increasing.
    """

    table: scipy.sparse.csr_array
    seg_ids: np.ndarray
    gt_ids: np.ndarray


def labelled_contingency_blockwise(
    seg: Any,
    gt: Any,
    block_shape: Sequence[int] | int,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
    ignore_seg: Sequence[int] = (),
) -> LabelledTable:
    """`contingency_table_blockwise`, with the label of every row and column.

    Counting with `ignore_gt=()` and dropping columns afterwards gives both
    the scores and the number of distinct segment labels in one pass.

    Args:
        seg, gt, block_shape, ignore_gt, ignore_seg: as in `contingency_table_blockwise`.

    Returns:
        The table and its labels (all empty when no voxel is kept).

    Raises:
        DataError: if the shapes differ or the labels are not integers.
    """
    shape = tuple(seg.shape)
    if shape != tuple(gt.shape) or len(shape) != SPATIAL_DIMS:
        raise DataError(
            f"segmentation {shape} and ground truth {tuple(gt.shape)}: expected 3D volumes "
            "of one shape"
        )
    block_shape = spatial_triple(block_shape, "contingency block_shape", 1, broadcast=True)
    ignore_gt = np.asarray(list(ignore_gt), np.uint64)
    ignore_seg = np.asarray(list(ignore_seg), np.uint64)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    waiting = 0
    for box in _blocks(shape, block_shape):
        s = _integer_labels("segmentation", np.asarray(seg[box.slices()])).ravel()
        g = _integer_labels("ground truth", np.asarray(gt[box.slices()])).ravel()
        s, g, counts = _count_pairs(s, g)
        # Ignored labels are dropped from the block's few pairs, not from its voxels.
        keep = ~np.isin(g, ignore_gt) & ~np.isin(s, ignore_seg)
        if not keep.any():
            continue
        parts.append((s[keep], g[keep], counts[keep]))
        waiting += len(parts[-1][0])
        if waiting > _COMPACT_ROWS and len(parts) > 1:
            parts = [_fold(*(np.concatenate(column) for column in zip(*parts, strict=True)))]
            waiting = len(parts[0][0])
    if not parts:
        empty = np.zeros(0, np.uint64)
        return LabelledTable(scipy.sparse.csr_array((0, 0), dtype=np.int64), empty, empty)
    s, g, counts = _fold(*(np.concatenate(column) for column in zip(*parts, strict=True)))
    seg_ids, rows = np.unique(s, return_inverse=True)
    gt_ids, cols = np.unique(g, return_inverse=True)
    table = scipy.sparse.csr_array((counts, (rows, cols)), shape=(seg_ids.size, gt_ids.size))
    return LabelledTable(table, seg_ids, gt_ids)


def contingency_table_blockwise(
    seg: Any,
    gt: Any,
    block_shape: Sequence[int] | int,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
    ignore_seg: Sequence[int] = (),
) -> scipy.sparse.csr_array:
    """`rand_voi.contingency_table` counted block by block.

    Args:
        seg: `[z, y, x]` segmentation labels (numpy array or an on-disk volume
            with `.shape` and numpy slicing), any integer dtype.
        gt: `[z, y, x]` ground-truth labels, same shape.
        block_shape: `(bz, by, bx)` (or one int) of the blocks read at a time.
        ignore_gt: ground-truth labels whose voxels are left out (SNEMI3D: 0).
        ignore_seg: segment labels whose voxels are left out.

    Returns:
        `[num_segments, num_bodies]` sparse int64 counts; rows and columns
        follow the sorted label values. Empty when no voxel is kept.

    Raises:
        DataError: if the shapes differ or the labels are not integers.
    """
    return labelled_contingency_blockwise(seg, gt, block_shape, ignore_gt, ignore_seg).table
