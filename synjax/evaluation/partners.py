"""Synaptic partner metrics: CREMI's, Parag et al.'s, and precision-recall sweeps.

Three ways to score predicted (pre segment, post segment) pairs against ground
truth, all one-to-one (`scipy.optimize.linear_sum_assignment`): each
prediction matches at most one truth and each truth is found at most once.

- `cremi_partner_scores` is the CREMI challenge's synaptic partner metric
  (cremi_python, `cremi/evaluation/synaptic_partners.py`): a predicted and a
  true pair may match only when they link the same two segments in the same
  order and both their presynaptic and their postsynaptic locations lie
  within `matching_threshold` (400 nm); the cost of a match is the mean of
  the two distances. In the challenge the segment ids of both sides are read
  from the ground-truth segmentation at the pairs' locations:
  `cremi_synaptic_partners` does that step first.
- `paper_partner_scores` is the criterion of Parag et al. (MICCAI 2018): a
  detection is correct only if it overlaps a ground-truth synaptic cleft and
  connects the right two cells in the right direction, with no distance
  tolerance. A detection is the pair of sites it joins (its presynaptic and
  its postsynaptic site: a thresholded proximity component cut by one
  segment); it overlaps cleft c when a voxel of either site lies in c or
  shares a face with a voxel of c (`clefts_under_sites`: the proximity is 0
  on the cleft itself, so sites border their cleft). It may then match a
  ground-truth pair whose cleft is c and whose pre and post cells are its
  own, in that order. The matching finds as many correct detections as
  possible; distance only breaks ties.
- `ids_within_distance_scores` is a looser rule, kept for comparison and not
  the paper's: same pre and post ids in order, and midpoints within
  `max_distance_nm` (400 nm) of each other.

Counts follow the challenge: fp = predictions left unmatched, fn = truths left
unmatched, tp = matches. Where a ratio has no denominator (no predictions, no
truth) precision or recall is taken as 1.0, so that an empty prediction on an
empty truth is perfect and a PR curve starts at precision 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from synjax.errors import DataError
from synjax.io.voxels import inside_volume, segment_ids_at

CREMI_MATCHING_THRESHOLD_NM = 400.0
DEFAULT_SAME_IDS_DISTANCE_NM = 400.0
# Cleft id that means "in no cleft": the background of `cleft_instances`.
NO_CLEFT = 0


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
            segment_ids_at(gt_segmentation, loc, resolution, offset).astype(np.uint64)
            for loc in (pairs.pre_locations, pairs.post_locations)
        ]
        return PartnerPairs(*ids, pairs.pre_locations, pairs.post_locations, pairs.scores)

    return cremi_partner_scores(relabel(predicted), relabel(truth), matching_threshold)


def ids_within_distance_scores(
    predicted: PartnerPairs,
    truth: PartnerPairs,
    max_distance_nm: float = DEFAULT_SAME_IDS_DISTANCE_NM,
) -> PartnerScores:
    """Same ids in order, midpoints within `max_distance_nm`: not the paper's criterion.

    A prediction may match a truth when it links the truth's pre segment to
    its post segment (in that order) and its location (midpoint of its pre
    and post sites) lies within `max_distance_nm` of the truth's. Matching is
    one-to-one, cheapest distance first. Unlike `paper_partner_scores` it
    needs no clefts, and a detection beside a synapse (or between two
    synapses of the same cells) counts.

    Args:
      predicted: n predicted pairs, ids mapped to ground-truth neurons.
      truth: m ground-truth pairs.
      max_distance_nm: largest midpoint distance of a match, nm.
    """
    dist = _distances(predicted.locations, truth.locations)
    near = dist <= max_distance_nm
    matches = _match(dist, _same_ids(predicted, truth) & near)
    return _scores(predicted, truth, matches, near)


def clefts_under_sites(
    components: np.ndarray,
    segmentation: np.ndarray,
    clefts: np.ndarray,
    component_ids: np.ndarray,
    segment_ids: np.ndarray,
) -> np.ndarray:
    """Ground-truth clefts that each site touches: overlaps, or borders by a face.

    Site i is the voxels with `components == component_ids[i]` and
    `segmentation == segment_ids[i]` (a candidate's pre or post sub-mask). It
    touches cleft c when one of its voxels lies in c or shares a face with a
    voxel of c. The face counts because the signed-proximity target is 0 on
    the cleft itself (the contact) and largest right beside it: a perfect
    prediction's sites border their cleft without covering it.

    Args:
      components: [z, y, x] integer component labels, 0 = none.
      segmentation: [z, y, x] the segmentation the sites were cut with.
      clefts: [z, y, x] ground-truth cleft instances, `NO_CLEFT` outside.
      component_ids: [n] component of each site.
      segment_ids: [n] segment of each site.

    Returns:
      [n, k] int64 cleft ids (k >= 1), each row the clefts its site touches
      in ascending order, padded with `NO_CLEFT`.
    """
    components, segmentation, clefts = (np.asarray(a) for a in (components, segmentation, clefts))
    if not components.ndim == 3 or not components.shape == segmentation.shape == clefts.shape:
        raise DataError(
            f"clefts_under_sites: components {components.shape}, segmentation "
            f"{segmentation.shape}, clefts {clefts.shape}: expected one 3D shape"
        )
    component_ids = np.asarray(component_ids).reshape(-1)
    segment_ids = np.asarray(segment_ids).reshape(-1)
    if len(component_ids) != len(segment_ids):
        raise DataError(
            f"clefts_under_sites: {len(component_ids)} component ids, {len(segment_ids)} "
            "segment ids: expected one per site"
        )
    # Clefts are sparse: visit each cleft voxel and its six face neighbours.
    cleft_voxels = np.argwhere(clefts != NO_CLEFT)
    cleft_ids = clefts[tuple(cleft_voxels.T)].astype(np.uint64)
    triples = [np.zeros((0, 3), np.uint64)]
    for step in np.concatenate(
        [np.zeros((1, 3), np.int64), np.eye(3, dtype=np.int64), -np.eye(3, dtype=np.int64)]
    ):
        at = cleft_voxels + step
        inside = inside_volume(at, clefts.shape)
        at = tuple(at[inside].T)
        component = components[at]
        site = component != 0
        triples.append(
            np.stack(
                [
                    component[site].astype(np.uint64),
                    segmentation[at][site].astype(np.uint64),
                    cleft_ids[inside][site],
                ],
                axis=1,
            )
        )
    triples = np.unique(np.concatenate(triples), axis=0)
    found: dict[tuple[int, int], list[int]] = {}
    for component, segment, cleft in triples.tolist():
        found.setdefault((component, segment), []).append(cleft)
    per_site = [
        found.get((c, s), [])
        for c, s in zip(component_ids.tolist(), segment_ids.tolist(), strict=True)
    ]
    out = np.full((len(per_site), max(map(len, per_site), default=0) or 1), NO_CLEFT, np.int64)
    for i, ids in enumerate(per_site):
        out[i, : len(ids)] = ids
    return out


def _most_matches(allowed: np.ndarray, pred_points: np.ndarray, truth_points: np.ndarray):
    """One-to-one matching with the most allowed pairs; distance breaks ties.

    Allowed entries cost less than 1 / (r + 1) (r = rows or columns, the
    fewer), disallowed ones 1: an assignment with one more allowed pair always
    costs less, so the assignment holds as many allowed pairs as possible and,
    among those, the smallest total distance.

    Returns:
      [k, 2] int64 (prediction index, truth index).
    """
    rows = np.flatnonzero(allowed.any(axis=1))
    cols = np.flatnonzero(allowed.any(axis=0))
    if len(rows) == 0:
        return np.zeros((0, 2), np.int64)
    sub = allowed[np.ix_(rows, cols)]
    dist = _distances(pred_points[rows], truth_points[cols])
    scale = (float(dist[sub].max()) + 1.0) * (min(sub.shape) + 1)
    r, c = linear_sum_assignment(np.where(sub, dist / scale, 1.0))
    keep = sub[r, c]
    return np.stack([rows[r[keep]], cols[c[keep]]], axis=1).astype(np.int64)


def paper_partner_scores(
    predicted: PartnerPairs,
    truth: PartnerPairs,
    predicted_clefts: np.ndarray,
    truth_clefts: np.ndarray,
) -> PartnerScores:
    """Parag et al.'s criterion: in a true cleft, right cells, right direction.

    Prediction i may match truth j when truth j's cleft is one of the clefts
    prediction i overlaps (and not `NO_CLEFT`), and prediction i links truth
    j's pre cell to its post cell in that order. No distance tolerance.
    Matching is one-to-one with as many matches as possible (distance between
    midpoints only breaks ties), so a cleft's pair is found at most once and
    a second detection of it is a false positive.

    Args:
      predicted: n predicted pairs, ids mapped to ground-truth neurons.
      truth: m ground-truth pairs.
      predicted_clefts: [n] or [n, k] ground-truth cleft ids each prediction
        overlaps, padded with `NO_CLEFT` (e.g. `clefts_under_sites` of its pre
        and its post site, side by side).
      truth_clefts: [m] the cleft of each truth pair (`NO_CLEFT` for a pair
        with no known cleft, which no prediction can then find).

    Returns:
      The scores; `reversed` counts unmatched predictions in a truth's cleft
      that link its cells the wrong way round.
    """
    pred_c = np.asarray(predicted_clefts, np.int64)
    pred_c = pred_c[:, None] if pred_c.ndim == 1 else pred_c
    truth_c = np.asarray(truth_clefts, np.int64).reshape(-1)
    if pred_c.ndim != 2 or len(pred_c) != len(predicted) or len(truth_c) != len(truth):
        raise DataError(
            f"paper_partner_scores: cleft ids for {len(pred_c)} predictions and "
            f"{len(truth_c)} truths; expected {len(predicted)} and {len(truth)}"
        )
    overlaps = np.zeros((len(predicted), len(truth)), bool)
    for column in pred_c.T:
        overlaps |= column[:, None] == truth_c[None]
    overlaps &= truth_c[None] != NO_CLEFT
    allowed = _same_ids(predicted, truth) & overlaps
    matches = _most_matches(allowed, predicted.locations, truth.locations)
    return _scores(predicted, truth, matches, overlaps)


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
