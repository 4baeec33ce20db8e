"""Instance segmentation metrics: IoU matching, F1 over thresholds, merges and splits.

Both label volumes are read into one sparse overlap table (voxels shared by
each predicted and each true instance, plus every instance's size); the
metrics follow from it:

- `match_instances`: one-to-one matching of predicted to true instances at an
  IoU threshold. Among the pairs with IoU >= threshold the matching has the
  most pairs and, among those, the largest total IoU (Hungarian,
  `scipy.optimize.linear_sum_assignment`, run on each connected group of
  candidate pairs). tp = matches, fp = unmatched predictions, fn = unmatched
  truths; precision, recall and F1 as usual, with precision or recall taken
  as 1.0 where its denominator is 0 (as in `synjax.evaluation.partners`).
- `instance_scores`: those at IoU 0.5 and their means over the thresholds
  0.5, 0.55, ..., 0.95 (COCO's way of averaging AP over IoU thresholds,
  applied here to precision, recall and F1 at a fixed operating point).
- `merge_split_errors`: the two failure modes that Chen et al. count when
  comparing their 3D Mask R-CNN (25% errors) with Ilastik pixel
  classification plus watershed (45%): a *merge* is one predicted instance
  covering two or more synapses, a *split* one synapse cut into two or more
  predicted instances. The paper counts them by eye; here, as best that
  reads: instance A *lies in* instance B when at least `min_overlap_fraction`
  (default 0.5) of A's voxels are in B. A merge is a predicted instance in
  which two or more true instances lie; a split is a true instance in which
  two or more predicted instances lie. The definitions are mirror images:
  the splits of (pred, truth) are the merges of (truth, pred).

Label 0 is background in both volumes; instance ids may be any integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import fastremap
import numpy as np
import scipy.sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csgraph

from synjax.errors import ConfigError, DataError

DEFAULT_IOU_THRESHOLD = 0.5
# COCO's IoU thresholds 0.5:0.05:0.95.
IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))
DEFAULT_MIN_OVERLAP_FRACTION = 0.5
# Above this many cells the (pred, true) id grid is not counted densely.
_MAX_DENSE_PAIR_GRID = 1 << 26


class OverlapTable(NamedTuple):
    """Voxels shared by every predicted and true instance.

    Attributes:
      pred_ids: `[p]` int64 predicted instance ids, increasing.
      true_ids: `[t]` int64 true instance ids, increasing.
      pred_sizes: `[p]` int64 voxels of each predicted instance.
      true_sizes: `[t]` int64 voxels of each true instance.
      intersection: `[p, t]` sparse int64 shared voxels (CSR).
    """

    pred_ids: np.ndarray
    true_ids: np.ndarray
    pred_sizes: np.ndarray
    true_sizes: np.ndarray
    intersection: scipy.sparse.csr_array

    def iou(self) -> scipy.sparse.csr_array:
        """`[p, t]` sparse float64 intersection over union of the pairs that overlap."""
        inter = self.intersection.tocoo()
        union = self.pred_sizes[inter.row] + self.true_sizes[inter.col] - inter.data
        return scipy.sparse.csr_array(
            (inter.data / union, (inter.row, inter.col)), shape=inter.shape
        )


def _dense_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(`[n]` ids 0..k in increasing-id order, 0 = background; `[k]` the ids)."""
    flat = labels.ravel()
    if flat.dtype == bool:
        flat = flat.view(np.uint8)
    ids = fastremap.unique(flat)
    ids = ids[ids != 0]
    lookup = {int(i): d for d, i in enumerate(ids.tolist(), start=1)}
    lookup[0] = 0
    dense = fastremap.remap(flat, lookup, preserve_missing_labels=False)
    return dense.astype(np.int64, copy=False), ids.astype(np.int64)


def overlap_table(pred: np.ndarray, truth: np.ndarray) -> OverlapTable:
    """Counts the voxels that each predicted and each true instance share.

    Args:
        pred: predicted instance labels, e.g. `[z, y, x]`, integer dtype, 0 background.
        truth: true instance labels, same shape.

    Returns:
        `OverlapTable`.

    Raises:
        DataError: if the shapes differ or the labels are not integers.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise DataError(f"instance metrics: prediction shape {pred.shape} != truth {truth.shape}")
    for name, arr in (("prediction", pred), ("truth", truth)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise DataError(f"instance metrics: {name} labels must be integers, got {arr.dtype}")
    pred_dense, pred_ids = _dense_ids(pred)
    true_dense, true_ids = _dense_ids(truth)
    num_pred, num_true = pred_ids.size, true_ids.size
    pred_sizes = np.bincount(pred_dense, minlength=num_pred + 1)[1:].astype(np.int64)
    true_sizes = np.bincount(true_dense, minlength=num_true + 1)[1:].astype(np.int64)
    both = (pred_dense > 0) & (true_dense > 0)
    pair = (pred_dense[both] - 1) * num_true + (true_dense[both] - 1)
    if num_pred * num_true <= _MAX_DENSE_PAIR_GRID:
        counts = np.bincount(pair, minlength=num_pred * num_true)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(pair, return_counts=True)
    rows, cols = np.divmod(keys, max(num_true, 1))
    intersection = scipy.sparse.csr_array(
        (counts.astype(np.int64), (rows, cols)), shape=(num_pred, num_true)
    )
    return OverlapTable(pred_ids, true_ids, pred_sizes, true_sizes, intersection)


class MatchScores(NamedTuple):
    """One-to-one matching at one IoU threshold.

    Attributes:
      threshold: the IoU threshold.
      tp, fp, fn: matches, unmatched predictions, unmatched truths.
      precision, recall, f1: tp / (tp + fp), tp / (tp + fn), their harmonic
        mean (precision or recall 1.0 where the denominator is 0).
      matches: `[tp, 2]` int64 (predicted id, true id) of each match.
      ious: `[tp]` float64 IoU of each match.
    """

    threshold: float
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    matches: np.ndarray
    ious: np.ndarray


def _ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"instance metrics: {name} must be in (0, 1], got {value}")


def _match_pairs(
    iou: scipy.sparse.csr_array, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row, column and IoU of the matched pairs (most pairs, then largest total IoU)."""
    candidates = iou.tocoo()
    keep = candidates.data >= threshold
    rows, cols, values = candidates.row[keep], candidates.col[keep], candidates.data[keep]
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    num_pred, num_true = iou.shape
    # Groups of candidates that share an instance are matched on their own:
    # most are one pair (matched outright), the rest get a small Hungarian.
    graph = scipy.sparse.coo_array(
        (np.ones(rows.size), (rows, num_pred + cols)), shape=(num_pred + num_true,) * 2
    )
    _, group = csgraph.connected_components(graph, directed=False)
    edge_group = group[rows]
    edges_per_group = np.bincount(edge_group)
    single = edges_per_group[edge_group] == 1
    matched = [(rows[single], cols[single], values[single])]
    for g in np.unique(edge_group[~single]):
        in_group = edge_group == g
        r, c, v = rows[in_group], cols[in_group], values[in_group]
        row_ids, r = np.unique(r, return_inverse=True)
        col_ids, c = np.unique(c, return_inverse=True)
        # One extra match outweighs any IoU gain: the IoU term sums to < 1/2.
        cost = np.zeros((row_ids.size, col_ids.size))
        cost[r, c] = -1.0 - v / (2 * min(row_ids.size, col_ids.size))
        best_r, best_c = linear_sum_assignment(cost)
        real = cost[best_r, best_c] < 0
        best_r, best_c = best_r[real], best_c[real]
        best_iou = np.zeros(cost.shape)
        best_iou[r, c] = v
        matched.append((row_ids[best_r], col_ids[best_c], best_iou[best_r, best_c]))
    return tuple(np.concatenate(parts) for parts in zip(*matched, strict=True))


def match_instances(
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    *,
    table: OverlapTable | None = None,
) -> MatchScores:
    """One-to-one matching of predicted and true instances at an IoU threshold.

    A predicted and a true instance may match when their IoU is at least
    `iou_threshold`; the matching has the most pairs and, among those, the
    largest total IoU.

    Args:
        pred: predicted labels `[z, y, x]` (any shape), integer, 0 background.
        truth: true labels, same shape.
        iou_threshold: smallest IoU of a match, in (0, 1].
        table: `overlap_table(pred, truth)` computed before (then pred and
            truth are not needed).

    Returns:
        `MatchScores`, matches sorted by predicted id.

    Raises:
        DataError: if the volumes are inconsistent.
        ConfigError: if the threshold is outside (0, 1].
    """
    _check_fraction("iou_threshold", iou_threshold)
    table = _table(pred, truth, table)
    iou = table.iou()
    rows, cols, ious = _match_pairs(iou, iou_threshold)
    order = np.argsort(rows)
    rows, cols, ious = rows[order], cols[order], ious[order]
    tp = int(rows.size)
    fp, fn = table.pred_ids.size - tp, table.true_ids.size - tp
    precision, recall, f1 = _ratios(tp, fp, fn)
    matches = np.stack([table.pred_ids[rows], table.true_ids[cols]], 1).reshape(-1, 2)
    return MatchScores(iou_threshold, tp, fp, fn, precision, recall, f1, matches, ious)


def _table(pred, truth, table) -> OverlapTable:
    if table is not None:
        return table
    if pred is None or truth is None:
        raise DataError("instance metrics: give either pred and truth, or an overlap table")
    return overlap_table(pred, truth)


class InstanceScores(NamedTuple):
    """Matching scores at IoU 0.5 and averaged over IoU thresholds.

    Attributes:
      precision_50, recall_50, f1_50: at IoU 0.5.
      mean_precision, mean_recall, mean_f1: means over `per_threshold`.
      per_threshold: one `MatchScores` per threshold (0.5, 0.55, ..., 0.95
        by default).
    """

    precision_50: float
    recall_50: float
    f1_50: float
    mean_precision: float
    mean_recall: float
    mean_f1: float
    per_threshold: tuple[MatchScores, ...]


def instance_scores(
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    thresholds: Sequence[float] = IOU_THRESHOLDS,
    *,
    table: OverlapTable | None = None,
) -> InstanceScores:
    """Precision, recall and F1 at IoU 0.5 and their means over `thresholds`.

    Args:
        pred, truth, table: as for `match_instances`.
        thresholds: IoU thresholds to average over (COCO's 0.5:0.05:0.95);
            the "_50" fields are always at 0.5.

    Returns:
        `InstanceScores`.
    """
    if len(thresholds) == 0:
        raise ConfigError("instance_scores: thresholds must not be empty")
    table = _table(pred, truth, table)
    per_threshold = tuple(match_instances(iou_threshold=t, table=table) for t in thresholds)
    at_50 = match_instances(iou_threshold=0.5, table=table)
    return InstanceScores(
        at_50.precision,
        at_50.recall,
        at_50.f1,
        float(np.mean([s.precision for s in per_threshold])),
        float(np.mean([s.recall for s in per_threshold])),
        float(np.mean([s.f1 for s in per_threshold])),
        per_threshold,
    )


class MergeSplitErrors(NamedTuple):
    """Merges and splits (see the module doc for the definitions).

    Attributes:
      merges: predicted instances in which two or more true instances lie.
      splits: true instances in which two or more predicted instances lie.
      merged_pred_ids: `[merges]` int64 ids of those predicted instances.
      merged_true_ids: `[m]` int64 ids of the true instances lying in them.
      split_true_ids: `[splits]` int64 ids of those true instances.
      split_pred_ids: `[s]` int64 ids of the predicted instances lying in them.
    """

    merges: int
    splits: int
    merged_pred_ids: np.ndarray
    merged_true_ids: np.ndarray
    split_true_ids: np.ndarray
    split_pred_ids: np.ndarray


def _lying_in(
    intersection: scipy.sparse.coo_array, sizes: np.ndarray, axis: int, fraction: float
) -> tuple[np.ndarray, np.ndarray]:
    """(host, guest) index pairs where guest lies in host; guests along `axis`."""
    guest = intersection.col if axis == 1 else intersection.row
    host = intersection.row if axis == 1 else intersection.col
    inside = intersection.data >= fraction * sizes[guest]
    return host[inside], guest[inside]


def merge_split_errors(
    pred: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    min_overlap_fraction: float = DEFAULT_MIN_OVERLAP_FRACTION,
    *,
    table: OverlapTable | None = None,
) -> MergeSplitErrors:
    """Counts merges and splits (Chen et al.'s failure modes; module doc).

    Args:
        pred, truth, table: as for `match_instances`.
        min_overlap_fraction: instance A lies in B when at least this
            fraction of A's voxels are in B, in (0, 1].

    Returns:
        `MergeSplitErrors`.
    """
    _check_fraction("min_overlap_fraction", min_overlap_fraction)
    table = _table(pred, truth, table)
    inter = table.intersection.tocoo()
    pred_host, true_guest = _lying_in(inter, table.true_sizes, 1, min_overlap_fraction)
    true_host, pred_guest = _lying_in(inter, table.pred_sizes, 0, min_overlap_fraction)
    merged = np.flatnonzero(np.bincount(pred_host, minlength=table.pred_ids.size) >= 2)
    split = np.flatnonzero(np.bincount(true_host, minlength=table.true_ids.size) >= 2)
    merged_true = np.unique(true_guest[np.isin(pred_host, merged)])
    split_pred = np.unique(pred_guest[np.isin(true_host, split)])
    return MergeSplitErrors(
        int(merged.size),
        int(split.size),
        table.pred_ids[merged],
        table.true_ids[merged_true],
        table.true_ids[split],
        table.pred_ids[split_pred],
    )
