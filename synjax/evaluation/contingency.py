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
from typing import Any

import numpy as np
import scipy.sparse

from synjax.errors import DataError
from synjax.evaluation.rand_voi import DEFAULT_IGNORE_GT
from synjax.geometry import SPATIAL_DIMS, Box, spatial_triple

# Fold the per-block counts together once this many rows wait.
_COMPACT_ROWS = 1 << 20


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


def _integer_labels(name: str, block: np.ndarray) -> np.ndarray:
    if block.dtype == bool:
        return block.astype(np.uint8)
    if not np.issubdtype(block.dtype, np.integer):
        raise DataError(f"{name} labels must be integers, got dtype {block.dtype}")
    return block


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
        # Labels are compared as uint64 (as fastremap keys them in the whole-volume table).
        s, g = s.astype(np.uint64), g.astype(np.uint64)
        keep = ~np.isin(g, ignore_gt) & ~np.isin(s, ignore_seg)
        if not keep.any():
            continue
        parts.append(_fold(s[keep], g[keep], np.ones(int(keep.sum()), np.int64)))
        waiting += len(parts[-1][0])
        if waiting > _COMPACT_ROWS and len(parts) > 1:
            parts = [_fold(*(np.concatenate(column) for column in zip(*parts, strict=True)))]
            waiting = len(parts[0][0])
    if not parts:
        return scipy.sparse.csr_array((0, 0), dtype=np.int64)
    s, g, counts = _fold(*(np.concatenate(column) for column in zip(*parts, strict=True)))
    seg_ids, rows = np.unique(s, return_inverse=True)
    gt_ids, cols = np.unique(g, return_inverse=True)
    return scipy.sparse.csr_array((counts, (rows, cols)), shape=(seg_ids.size, gt_ids.size))
