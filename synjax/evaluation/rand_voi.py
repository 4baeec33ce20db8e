"""Adapted Rand error and variation of information (SNEMI3D segmentation metrics).

Both metrics are read off one sparse contingency table: entry ``[i, j]`` counts
the voxels that carry the ``i``-th segment label and the ``j``-th ground-truth
label. The table is built in time linear in the number of voxels: labels are
first renumbered to dense ids with hash maps (``fastremap``), the pair of dense
ids is packed into one integer and counted with ``np.bincount``, so no sort of
the whole volume is needed and uint64 ids (CREMI's, ids above 2**32) never
overflow.

Conventions follow scikit-image's ``skimage.metrics`` (checked to 1e-6 in the
tests) with one deliberate difference: scikit-image returns the Rand precision
and recall swapped with respect to its own docstring and to the SNEMI3D paper
(scikit-image issue #6485). Here precision is the fraction of the voxel pairs
that share a segment which also share a ground-truth body (1 for a perfect
over-segmentation), recall the fraction of the pairs that share a body which
also share a segment (1 when everything is merged).

Reference: Arganda-Carreras et al. (2015), "Crowdsourcing the creation of image
segmentation algorithms for connectomics", Front. Neuroanat. 9:142.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import fastremap
import numpy as np
import scipy.sparse

from synjax.errors import DataError

# Above this many cells the (segment, gt) pair grid is not counted densely with
# a bincount; the occurring pairs are renumbered first, so memory stays linear.
_MAX_DENSE_PAIR_GRID = 1 << 26

# Labels that SNEMI3D and CREMI leave out of the score: ground-truth 0.
DEFAULT_IGNORE_GT: tuple[int, ...] = (0,)


class RandScores(NamedTuple):
    """Adapted Rand error with its precision (merge score) and recall (split score)."""

    error: float
    precision: float
    recall: float


class VoiScores(NamedTuple):
    """Variation of information split into its two conditional entropies (bits)."""

    split: float
    merge: float


def contingency_table(
    seg: np.ndarray,
    gt: np.ndarray,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
    ignore_seg: Sequence[int] = (),
) -> scipy.sparse.csr_array:
    """Counts the voxels of every (segment, ground-truth body) pair.

    Args:
        seg: Segmentation labels, any integer dtype (uint64 included), any shape,
            e.g. `[z, y, x]`.
        gt: Ground-truth labels, same shape as `seg`.
        ignore_gt: Ground-truth labels whose voxels are left out (SNEMI3D: 0).
        ignore_seg: Segment labels whose voxels are left out.

    Returns:
        `[num_segments, num_bodies]` sparse int64 counts over the voxels that are
        kept; rows and columns follow the distinct labels in order of first
        appearance (the metrics do not depend on the order). Empty when no voxel
        is kept.

    Raises:
        DataError: if the shapes differ or the labels are not integers.
    """
    seg = np.asarray(seg)
    gt = np.asarray(gt)
    if seg.shape != gt.shape:
        raise DataError(f"segmentation shape {seg.shape} != ground-truth shape {gt.shape}")
    for name, arr in (("segmentation", seg), ("ground truth", gt)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise DataError(f"{name} labels must be integers, got dtype {arr.dtype}")
    # fastremap has no bool kernels; bool masks are two-label segmentations.
    seg = seg.ravel().view(np.uint8) if seg.dtype == bool else seg.ravel()
    gt = gt.ravel().view(np.uint8) if gt.dtype == bool else gt.ravel()
    if seg.size == 0:
        return scipy.sparse.csr_array((0, 0), dtype=np.int64)

    # Ignored labels are dropped from the small table rather than from the
    # volume, which saves two masked copies of every voxel.
    seg_ids, seg_map = fastremap.renumber(seg, start=0, preserve_zero=False)
    gt_ids, gt_map = fastremap.renumber(gt, start=0, preserve_zero=False)
    num_seg, num_gt = len(seg_map), len(gt_map)
    pair = seg_ids.astype(np.int64) * num_gt + gt_ids.astype(np.int64)
    if num_seg * num_gt <= _MAX_DENSE_PAIR_GRID:
        counts = np.bincount(pair, minlength=num_seg * num_gt)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        # Too many cells for a dense grid: renumber the occurring pairs instead.
        pair_ids, mapping = fastremap.renumber(pair, start=0, preserve_zero=False)
        counts = np.bincount(pair_ids.ravel())
        keys = np.empty(len(mapping), dtype=np.int64)
        keys[np.fromiter(mapping.values(), np.int64, len(mapping))] = np.fromiter(
            mapping.keys(), np.int64, len(mapping)
        )
    rows, cols = np.divmod(keys, num_gt)
    keep = ~np.isin(cols, _ids_of(ignore_gt, gt_map)) & ~np.isin(rows, _ids_of(ignore_seg, seg_map))
    if not keep.any():
        return scipy.sparse.csr_array((0, 0), dtype=np.int64)
    # Compact ids again (keeping first-appearance order) once labels are dropped.
    kept_rows, rows = np.unique(rows[keep], return_inverse=True)
    kept_cols, cols = np.unique(cols[keep], return_inverse=True)
    return scipy.sparse.csr_array(
        (counts[keep].astype(np.int64), (rows, cols)), shape=(kept_rows.size, kept_cols.size)
    )


def _ids_of(labels: Sequence[int], mapping: dict) -> np.ndarray:
    """Dense ids of those `labels` that occur (keys of a fastremap mapping)."""
    return np.array([mapping[label] for label in labels if label in mapping], dtype=np.int64)


def _table(seg, gt, table, ignore_gt) -> scipy.sparse.csr_array:
    if table is not None:
        return scipy.sparse.csr_array(table)
    if seg is None or gt is None:
        raise DataError("give either both seg and gt, or a contingency table")
    return contingency_table(seg, gt, ignore_gt=ignore_gt)


def adapted_rand_error(
    seg: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    *,
    table: scipy.sparse.sparray | None = None,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
    alpha: float = 0.5,
) -> RandScores:
    """SNEMI3D adapted Rand error: 1 - F-score of Rand precision and recall.

    Counts unordered pairs of distinct voxels (as scikit-image does):
    ``P = sum_ij n_ij^2 - N``, ``S = sum_i s_i^2 - N`` (pairs together in the
    segmentation), ``T = sum_j t_j^2 - N`` (pairs together in the ground truth);
    precision = P / S, recall = P / T, error = 1 - P / (alpha S + (1 - alpha) T).
    Ground-truth voxels labelled with `ignore_gt` are left out; segment label 0
    is an ordinary segment.

    Args:
        seg: Segmentation labels `[z, y, x]` (any shape, integer dtype).
        gt: Ground-truth labels, same shape.
        table: A precomputed `contingency_table(seg, gt)`; then seg and gt are unused.
        ignore_gt: Ground-truth labels to leave out (SNEMI3D: 0).
        alpha: Weight of precision (merge errors) in the F-score, in [0, 1].

    Returns:
        `RandScores(error, precision, recall)`; error 0 is perfect. Precision is
        1 with no false merges, recall is 1 with no false splits.

    Raises:
        DataError: if the inputs are inconsistent or leave fewer than two voxels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"adapted_rand_error: alpha must be in [0, 1], got {alpha}")
    counts = _table(seg, gt, table, ignore_gt)
    n_ij = counts.data.astype(np.float64)
    num_voxels = n_ij.sum()
    if num_voxels < 2:
        raise DataError("adapted_rand_error: fewer than two voxels left after ignoring labels")
    seg_sizes = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    gt_sizes = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    pairs_both = n_ij @ n_ij - num_voxels
    pairs_seg = seg_sizes @ seg_sizes - num_voxels
    pairs_gt = gt_sizes @ gt_sizes - num_voxels
    # A segmentation (or ground truth) of singletons has no pairs; then the
    # score is vacuous, and 1 keeps it from dividing by zero.
    precision = pairs_both / pairs_seg if pairs_seg > 0 else 1.0
    recall = pairs_both / pairs_gt if pairs_gt > 0 else 1.0
    denominator = alpha * pairs_seg + (1.0 - alpha) * pairs_gt
    fscore = pairs_both / denominator if denominator > 0 else 1.0
    return RandScores(float(1.0 - fscore), float(precision), float(recall))


def rand_index(
    seg: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    *,
    table: scipy.sparse.sparray | None = None,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
) -> float:
    """Classical Rand index (Rand 1971): the fraction of voxel pairs both labelings agree on.

    A pair agrees when it is together in both or apart in both. Over the
    ``N (N - 1) / 2`` unordered pairs of distinct voxels, with `P`, `S`, `T` as
    in `adapted_rand_error` (twice the pairs together in both, in the
    segmentation, in the ground truth): ``1 - (S + T - 2 P) / (N (N - 1))``.
    Equals scikit-learn's ``rand_score`` on the voxels kept. Dominated by the
    pairs apart in both, it is near 1 for any fine segmentation of a large
    volume; the adapted Rand error is the score to compare segmentations by.

    Args:
        seg: Segmentation labels `[z, y, x]` (any shape, integer dtype).
        gt: Ground-truth labels, same shape.
        table: A precomputed `contingency_table(seg, gt)`; then seg and gt are unused.
        ignore_gt: Ground-truth labels to leave out (SNEMI3D: 0).

    Returns:
        The Rand index in [0, 1]; 1 is perfect.

    Raises:
        DataError: if the inputs are inconsistent or leave fewer than two voxels.
    """
    counts = _table(seg, gt, table, ignore_gt)
    n_ij = counts.data.astype(np.float64)
    num_voxels = n_ij.sum()
    if num_voxels < 2:
        raise DataError("rand_index: fewer than two voxels left after ignoring labels")
    seg_sizes = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
    gt_sizes = np.asarray(counts.sum(axis=0), dtype=np.float64).ravel()
    disagreeing = seg_sizes @ seg_sizes + gt_sizes @ gt_sizes - 2.0 * (n_ij @ n_ij)
    return float(1.0 - disagreeing / (num_voxels * (num_voxels - 1.0)))


def _entropy_terms(joint: np.ndarray, marginal_of_rows: np.ndarray) -> float:
    """Returns -sum p_ij log2(p_ij / p_i) over the nonzero joint entries."""
    return float(-(joint * np.log2(joint / marginal_of_rows)).sum())


def variation_of_information(
    seg: np.ndarray | None = None,
    gt: np.ndarray | None = None,
    *,
    table: scipy.sparse.sparray | None = None,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
) -> VoiScores:
    """Variation of information, split into false splits and false merges.

    ``split = H(seg | gt)`` (over-segmentation: 0 when no body is split) and
    ``merge = H(gt | seg)`` (under-segmentation: 0 when no segment spans two
    bodies), in bits; VOI = split + merge. This equals scikit-image's
    ``variation_of_information(gt, seg, ignore_labels=ignore_gt)``, which
    returns ``[H(seg|gt), H(gt|seg)]`` as "false splits, false merges".

    Args:
        seg: Segmentation labels `[z, y, x]` (any shape, integer dtype).
        gt: Ground-truth labels, same shape.
        table: A precomputed `contingency_table(seg, gt)`; then seg and gt are unused.
        ignore_gt: Ground-truth labels to leave out; SNEMI3D and CREMI leave out
            0, pass `()` to score every voxel.

    Returns:
        `VoiScores(split, merge)` in bits.

    Raises:
        DataError: if the inputs are inconsistent or leave no voxel.
    """
    counts = _table(seg, gt, table, ignore_gt).tocoo()
    num_voxels = float(counts.data.sum())
    if num_voxels == 0:
        raise DataError("variation_of_information: no voxel left after ignoring labels")
    joint = counts.data / num_voxels
    seg_marginal = np.bincount(counts.row, weights=joint, minlength=counts.shape[0])
    gt_marginal = np.bincount(counts.col, weights=joint, minlength=counts.shape[1])
    split = _entropy_terms(joint, gt_marginal[counts.col])
    merge = _entropy_terms(joint, seg_marginal[counts.row])
    # Rounding can leave -1e-17 where the entropy is exactly 0.
    return VoiScores(max(split, 0.0), max(merge, 0.0))
