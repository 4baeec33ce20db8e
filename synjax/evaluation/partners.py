"""Synaptic partner metrics: CREMI's, Parag et al.'s, and precision-recall sweeps.

Two ways to score predicted (pre segment, post segment, location) pairs
against ground truth, both one-to-one (Hungarian matching,
`scipy.optimize.linear_sum_assignment`):

- `cremi_partner_scores` is the CREMI challenge's synaptic partner metric
  (cremi_python, `cremi/evaluation/synaptic_partners.py`): a predicted and a
  true pair may match only when they link the same two segments in the same
  order and both their presynaptic and their postsynaptic locations lie
  within `matching_threshold` (400 nm); the cost of a match is the mean of
  the two distances. In the challenge the segment ids of both sides are read
  from the ground-truth segmentation at the pairs' locations:
  `cremi_synaptic_partners` does that step first.
- `paper_partner_scores` is the criterion of Parag et al. (MICCAI 2018): a
  detection is correct only if it overlaps a ground-truth synapse (same cleft,
  or within `max_distance_nm` of its location) and connects the right two
  cells in the right direction; a reversed pair is wrong.

Counts follow the challenge: fp = predictions left unmatched, fn = truths left
unmatched, tp = matches. Where a ratio has no denominator (no predictions, no
truth) precision or recall is taken as 1.0, so that an empty prediction on an
empty truth is perfect and a PR curve starts at precision 1.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from synjax.errors import DataError
from synjax.io.atomic import atomic_open
from synjax.postprocess.candidates import Candidates

CREMI_MATCHING_THRESHOLD_NM = 400.0
DEFAULT_PAPER_DISTANCE_NM = 400.0
# Cleft id that means "in no cleft" for the cleft-overlap test.
NO_CLEFT = -1


@dataclasses.dataclass
class PartnerPairs:
    """Directed synaptic partner pairs, one row per (pre, post) pair.

    Attributes:
      pre_ids: [n] uint64 presynaptic segment (neuron) ids.
      post_ids: [n] uint64 postsynaptic segment ids.
      pre_locations: [n, 3] float64 presynaptic site locations, nm, z-y-x.
      post_locations: [n, 3] float64 postsynaptic site locations, nm, z-y-x.
      scores: [n] float64 detection confidence (ones for ground truth).
    """

    pre_ids: np.ndarray
    post_ids: np.ndarray
    pre_locations: np.ndarray
    post_locations: np.ndarray
    scores: np.ndarray | None = None

    def __post_init__(self):
        self.pre_ids = np.asarray(self.pre_ids, np.uint64).reshape(-1)
        self.post_ids = np.asarray(self.post_ids, np.uint64).reshape(-1)
        self.pre_locations = np.asarray(self.pre_locations, np.float64).reshape(-1, 3)
        self.post_locations = np.asarray(self.post_locations, np.float64).reshape(-1, 3)
        n = len(self.pre_ids)
        self.scores = (
            np.ones(n) if self.scores is None else np.asarray(self.scores, np.float64).reshape(-1)
        )
        lengths = {n, len(self.post_ids), len(self.pre_locations), len(self.post_locations)}
        if len(lengths | {len(self.scores)}) != 1:
            raise DataError(f"PartnerPairs: field lengths {sorted(lengths)} differ")

    def __len__(self) -> int:
        return len(self.pre_ids)

    @property
    def locations(self) -> np.ndarray:
        """[n, 3] midpoint of the pre and post locations, nm."""
        return 0.5 * (self.pre_locations + self.post_locations)

    def select(self, index: np.ndarray) -> PartnerPairs:
        """Rows picked by a boolean mask or an integer index array."""
        return PartnerPairs(
            self.pre_ids[index],
            self.post_ids[index],
            self.pre_locations[index],
            self.post_locations[index],
            self.scores[index],
        )

    @classmethod
    def from_candidates(
        cls,
        candidates: Candidates,
        resolution: Sequence[float],
        offset: Sequence[float] = (0.0, 0.0, 0.0),
        scores: np.ndarray | None = None,
    ) -> PartnerPairs:
        """Pairs from candidates: their closest points in nm, shifted by `offset`.

        `scores` (e.g. pruning probabilities) default to the candidates' own.
        """
        res, off = np.asarray(resolution, np.float64), np.asarray(offset, np.float64)
        return cls(
            candidates.pre_segment,
            candidates.post_segment,
            candidates.pre_point * res + off,
            candidates.post_point * res + off,
            candidates.score if scores is None else scores,
        )


@dataclasses.dataclass(frozen=True)
class PartnerScores:
    """Outcome of one-to-one matching.

    Attributes:
      tp, fp, fn: matched pairs, unmatched predictions, unmatched truths.
      precision, recall, fscore: the usual ratios of those counts.
      matches: [tp, 2] int64 (prediction index, truth index).
      reversed: unmatched predictions that would match an unmatched truth with
        pre and post swapped (a diagnostic; they are already counted in fp).
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    fscore: float
    matches: np.ndarray
    reversed: int = 0


def _ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    fscore = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, fscore


def _same_ids(pred: PartnerPairs, truth: PartnerPairs, swap: bool = False) -> np.ndarray:
    """[n, m] whether prediction i links the segments of truth j, in order."""
    pre, post = (pred.post_ids, pred.pre_ids) if swap else (pred.pre_ids, pred.post_ids)
    return (pre[:, None] == truth.pre_ids[None]) & (post[:, None] == truth.post_ids[None])


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n, m] Euclidean distances between rows of a [n, 3] and b [m, 3]."""
    return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)


def _match(cost: np.ndarray, allowed: np.ndarray, big: float | None = None) -> np.ndarray:
    """One-to-one minimum-cost matching restricted to `allowed` entries.

    Disallowed entries cost more than any allowed one (as in CREMI, twice the
    threshold), so the assignment first keeps matches and then minimises cost;
    pairs assigned through a disallowed entry are dropped.
    """
    if cost.size == 0:
        return np.zeros((0, 2), np.int64)
    if big is None:
        big = 2.0 * max(float(cost[allowed].max(initial=0.0)), 1.0)
    rows, cols = linear_sum_assignment(np.where(allowed, cost, big))
    keep = allowed[rows, cols]
    return np.stack([rows[keep], cols[keep]], axis=1).astype(np.int64)


def _scores(pred: PartnerPairs, truth: PartnerPairs, matches: np.ndarray, near: np.ndarray):
    tp = len(matches)
    fp, fn = len(pred) - tp, len(truth) - tp
    free_pred = np.ones(len(pred), bool)
    free_truth = np.ones(len(truth), bool)
    free_pred[matches[:, 0]] = False
    free_truth[matches[:, 1]] = False
    flipped = _same_ids(pred, truth, swap=True) & near & free_truth[None]
    n_reversed = int(np.count_nonzero(flipped.any(axis=1) & free_pred))
    return PartnerScores(tp, fp, fn, *_ratios(tp, fp, fn), matches=matches, reversed=n_reversed)


def cremi_partner_scores(
    predicted: PartnerPairs,
    truth: PartnerPairs,
    matching_threshold: float = CREMI_MATCHING_THRESHOLD_NM,
) -> PartnerScores:
    """The CREMI synaptic partner metric on pairs whose ids are already comparable.

    Args:
      predicted: n predicted pairs.
      truth: m ground-truth pairs, ids in the same id space as `predicted`.
      matching_threshold: largest pre-pre and post-post distance of a match, nm.

    Returns:
      The scores; a match costs the mean of its pre and post distances.
    """
    pre_d = _distances(predicted.pre_locations, truth.pre_locations)
    post_d = _distances(predicted.post_locations, truth.post_locations)
    near = (pre_d <= matching_threshold) & (post_d <= matching_threshold)
    allowed = _same_ids(predicted, truth) & near
    matches = _match(0.5 * (pre_d + post_d), allowed, big=2.0 * matching_threshold)
    return _scores(predicted, truth, matches, near)


def segment_ids_at(
    locations: np.ndarray,
    segmentation: np.ndarray,
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    outside: int = 0,
) -> np.ndarray:
    """Labels of `segmentation` [z, y, x] at world locations [n, 3] nm.

    Locations are rounded to the nearest voxel; those outside the volume get
    `outside`.
    """
    vox = np.floor(
        (np.asarray(locations, np.float64).reshape(-1, 3) - np.asarray(offset))
        / np.asarray(resolution, np.float64)
        + 0.5
    ).astype(np.int64)
    inside = np.all((vox >= 0) & (vox < np.asarray(segmentation.shape)), axis=1)
    out = np.full(len(vox), outside, dtype=np.result_type(segmentation.dtype, type(outside)))
    out[inside] = segmentation[tuple(vox[inside].T)]
    return out


def cremi_synaptic_partners(
    predicted: PartnerPairs,
    truth: PartnerPairs,
    gt_segmentation: np.ndarray,
    resolution: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    matching_threshold: float = CREMI_MATCHING_THRESHOLD_NM,
) -> PartnerScores:
    """The CREMI challenge's evaluation: ids read from the GT segmentation.

    Both sides' pre and post ids are replaced by the ground-truth segment at
    their pre and post locations (so a prediction is judged by where it
    points, not by the ids of its own segmentation), then scored with
    `cremi_partner_scores`.

    Args:
      predicted: predicted pairs (their ids are ignored).
      truth: ground-truth pairs (their ids are ignored).
      gt_segmentation: [z, y, x] ground-truth neurons.
      resolution: voxel size in nm, z-y-x.
      offset: world location of voxel (0, 0, 0) in nm.
      matching_threshold: largest pre-pre and post-post distance, nm.
    """

    def relabel(pairs: PartnerPairs) -> PartnerPairs:
        ids = [
            segment_ids_at(loc, gt_segmentation, resolution, offset).astype(np.uint64)
            for loc in (pairs.pre_locations, pairs.post_locations)
        ]
        return PartnerPairs(*ids, pairs.pre_locations, pairs.post_locations, pairs.scores)

    return cremi_partner_scores(relabel(predicted), relabel(truth), matching_threshold)


def paper_partner_scores(
    predicted: PartnerPairs,
    truth: PartnerPairs,
    max_distance_nm: float = DEFAULT_PAPER_DISTANCE_NM,
    predicted_cleft_ids: np.ndarray | None = None,
    truth_cleft_ids: np.ndarray | None = None,
) -> PartnerScores:
    """Parag et al.'s criterion: right synapse, right cells, right direction.

    A prediction may match a truth when it links the truth's pre segment to
    its post segment (in that order) and overlaps the truth's synapse: it lies
    in the same ground-truth cleft (when cleft ids are given) or its location
    (midpoint) lies within `max_distance_nm` of the truth's. Matching is
    one-to-one, cheapest distance first.

    Args:
      predicted: n predicted pairs, ids mapped to ground-truth neurons.
      truth: m ground-truth pairs.
      max_distance_nm: distance that counts as overlapping a synapse, nm.
      predicted_cleft_ids: [n] ground-truth cleft under each prediction
        (`NO_CLEFT` for none), e.g. from `segment_ids_at` on the cleft volume.
      truth_cleft_ids: [m] each truth's cleft id.
    """
    dist = _distances(predicted.locations, truth.locations)
    near = dist <= max_distance_nm
    if (predicted_cleft_ids is None) != (truth_cleft_ids is None):
        raise DataError("paper_partner_scores: give both cleft id arrays or neither")
    if predicted_cleft_ids is not None:
        pred_c = np.asarray(predicted_cleft_ids).reshape(-1)
        truth_c = np.asarray(truth_cleft_ids).reshape(-1)
        if len(pred_c) != len(predicted) or len(truth_c) != len(truth):
            raise DataError(
                f"cleft ids {len(pred_c)}/{len(truth_c)}: expected {len(predicted)}/{len(truth)}"
            )
        same_cleft = (pred_c[:, None] == truth_c[None]) & (truth_c[None] != NO_CLEFT)
        near = near | same_cleft
    matches = _match(dist, _same_ids(predicted, truth) & near)
    return _scores(predicted, truth, matches, near)


@dataclasses.dataclass(frozen=True)
class PrecisionRecallCurve:
    """Precision, recall and F per score threshold (ascending thresholds).

    Attributes:
      thresholds: [k] detections with score >= threshold are kept.
      precision, recall, fscore: [k] at each threshold.
      best_threshold, best_fscore: the threshold of highest F (the lowest such
        threshold on ties) and that F.
    """

    thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    fscore: np.ndarray
    best_threshold: float
    best_fscore: float


def precision_recall_curve(
    scores: np.ndarray,
    evaluate_at_threshold: Callable[[float], PartnerScores],
    thresholds: np.ndarray | None = None,
) -> PrecisionRecallCurve:
    """Sweeps a score threshold and evaluates at each value.

    Args:
      scores: [n] detection scores.
      evaluate_at_threshold: called with a threshold, scores the detections
        with score >= threshold (e.g. `cremi_partner_scores` on
        `pairs.select(pairs.scores >= t)`); returns anything with tp, fp, fn.
      thresholds: values to try; default every distinct score, so that each
        detection set that a threshold can produce is evaluated once.

    Returns:
      The curve.
    """
    values = np.unique(np.asarray(scores, np.float64)) if thresholds is None else thresholds
    values = np.sort(np.asarray(values, np.float64).reshape(-1))
    if values.size == 0:
        raise DataError("precision_recall_curve: no scores and no thresholds to sweep")
    stats = np.array(
        [_ratios(r.tp, r.fp, r.fn) for r in map(evaluate_at_threshold, values)], np.float64
    )
    best = int(np.argmax(stats[:, 2]))
    return PrecisionRecallCurve(
        thresholds=values,
        precision=stats[:, 0],
        recall=stats[:, 1],
        fscore=stats[:, 2],
        best_threshold=float(values[best]),
        best_fscore=float(stats[best, 2]),
    )


def plot_precision_recall(
    curve: PrecisionRecallCurve, path: str | os.PathLike, title: str = "synaptic partners"
) -> pathlib.Path:
    """Writes the curve as a PNG, atomically (`synjax.io.atomic`: temporary file, fsync, rename).

    Returns:
      The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(curve.recall, curve.precision, marker=".", label="precision / recall")
    best = int(np.argmax(curve.thresholds == curve.best_threshold))
    ax.plot(
        curve.recall[best],
        curve.precision[best],
        "o",
        label=f"best F {curve.best_fscore:.3f} at {curve.best_threshold:.3g}",
    )
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left")
    with atomic_open(path, "wb") as stream:
        fig.savefig(stream, format="png", dpi=100)
    return path
