"""Synaptic cleft scores: CREMI's distance score and detection F1.

- `cremi_cleft_scores`, as the CREMI challenge's evaluation code computes it
  (cremi_python, `cremi.evaluation.Clefts`): every voxel of a predicted cleft
  has a *false-positive distance*, the distance in nm to the nearest true cleft
  voxel (0 inside a true cleft); every voxel of a true cleft has a
  *false-negative distance*, the distance to the nearest predicted cleft voxel.
  Distances are Euclidean on the anisotropic grid (voxel size z, y, x in nm),
  from `edt`. CREMI reports the mean of each, ADGT (average distance to
  ground truth, of the predicted voxels) and ADF (average distance to the
  found clefts, of the true voxels), their mean as the CREMI cleft score
  (lower is better), and the number of voxels whose distance exceeds a
  cutoff (200 nm in CREMI's code) as false positives and false negatives.
  Cleft labels are binarised: any nonzero voxel is cleft (CREMI's files mark
  the background 0xFFFFFFFFFFFFFFFF; `synjax.io.cremi.cleft_instances` maps it
  to 0).

  Empty volumes, where CREMI's code would take the mean of nothing (NaN) or
  a distance transform with no cleft at all: a mean over no voxels is 0.0 (no
  voxel is misplaced), and a distance to a cleft that does not exist is
  infinite. So with no predicted cleft, ADGT = 0 and ADF = inf, and every
  true voxel is a false negative; with no true cleft, ADGT = inf and ADF = 0,
  and every predicted voxel is a false positive; the score is then inf
  (nothing found, or only false alarms). With neither, everything is 0: a
  perfect answer.

- `detection_scores`: a true synapse is found when a predicted instance
  overlaps it with IoU >= 0.1, matched one-to-one
  (`synjax.evaluation.instances.match_instances`: the most pairs, then the
  largest total IoU), so one prediction covering two synapses finds one of
  them. Precision, recall and F1 of the matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import edt
import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.evaluation.instances import MatchScores, match_instances
from synjax.geometry import SPATIAL_DIMS, voxel_size

# CREMI's default cutoff for counting false positive and false negative voxels.
CREMI_DISTANCE_CUTOFF_NM = 200.0
# A true synapse is found by a prediction with at least this IoU.
DETECTION_IOU_THRESHOLD = 0.1


class CleftScores(NamedTuple):
    """CREMI cleft scores (distances in nm; lower is better).

    Attributes:
      mean_distance_to_truth: ADGT, mean false-positive distance: from each
        predicted cleft voxel to the nearest true cleft voxel.
      mean_distance_to_prediction: ADF, mean false-negative distance: from each
        true cleft voxel to the nearest predicted cleft voxel.
      cremi_score: the mean of the two.
      false_positives: predicted cleft voxels farther than `cutoff_nm` from
        every true cleft voxel.
      false_negatives: true cleft voxels farther than `cutoff_nm` from every
        predicted cleft voxel.
      predicted_voxels, true_voxels: cleft voxels of each volume.
      cutoff_nm: the cutoff of the two counts.
    """

    mean_distance_to_truth: float
    mean_distance_to_prediction: float
    cremi_score: float
    false_positives: int
    false_negatives: int
    predicted_voxels: int
    true_voxels: int
    cutoff_nm: float


def _cleft_mask(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != SPATIAL_DIMS:
        raise DataError(f"cremi_cleft_scores: {name} shape {labels.shape}, expected [z, y, x]")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"cremi_cleft_scores: {name} dtype {labels.dtype}, expected integer labels")
    return labels != 0


def _distances_to(mask: np.ndarray, at: np.ndarray, resolution: np.ndarray) -> np.ndarray:
    """`[k]` distance in nm from each voxel of `at` to the nearest voxel of `mask` (inf if none)."""
    if not at.any():
        return np.zeros(0)
    if not mask.any():
        return np.full(int(at.sum()), np.inf)
    # edt measures the distance from each nonzero voxel to the nearest zero one.
    distance = edt.edt(~mask, anisotropy=tuple(resolution.tolist()), black_border=False)
    return distance[at].astype(np.float64)


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def cremi_cleft_scores(
    pred: np.ndarray,
    truth: np.ndarray,
    resolution: Sequence[float],
    cutoff_nm: float = CREMI_DISTANCE_CUTOFF_NM,
) -> CleftScores:
    """CREMI's cleft distances between predicted and true clefts (see the module doc).

    Args:
      pred: `[z, y, x]` predicted clefts, integer labels or boolean (nonzero = cleft).
      truth: `[z, y, x]` true clefts, same shape.
      resolution: voxel size `(z, y, x)` in nm.
      cutoff_nm: distance above which a voxel counts as a false positive or
        false negative.

    Returns:
      `CleftScores`; see the module doc for empty volumes.

    Raises:
      DataError: the volumes are not `[z, y, x]` integer or boolean of one shape.
      ConfigError: `resolution` is not three positive sizes, or `cutoff_nm`
        is negative or not finite.
    """
    if not np.isfinite(cutoff_nm) or cutoff_nm < 0:
        raise ConfigError(f"cremi_cleft_scores cutoff_nm={cutoff_nm}: expected a distance >= 0 nm")
    pred_mask, true_mask = _cleft_mask(pred, "prediction"), _cleft_mask(truth, "truth")
    if pred_mask.shape != true_mask.shape:
        raise DataError(
            f"cremi_cleft_scores: prediction shape {pred_mask.shape} != truth {true_mask.shape}"
        )
    res = voxel_size(resolution, "cremi_cleft_scores resolution")
    to_truth = _distances_to(true_mask, pred_mask, res)
    to_prediction = _distances_to(pred_mask, true_mask, res)
    adgt, adf = _mean(to_truth), _mean(to_prediction)
    return CleftScores(
        mean_distance_to_truth=adgt,
        mean_distance_to_prediction=adf,
        cremi_score=(adgt + adf) / 2,
        false_positives=int(np.count_nonzero(to_truth > cutoff_nm)),
        false_negatives=int(np.count_nonzero(to_prediction > cutoff_nm)),
        predicted_voxels=int(to_truth.size),
        true_voxels=int(to_prediction.size),
        cutoff_nm=float(cutoff_nm),
    )


def detection_scores(
    pred: np.ndarray, truth: np.ndarray, iou_threshold: float = DETECTION_IOU_THRESHOLD
) -> MatchScores:
    """Synapse detection: true synapses found by a prediction with IoU >= 0.1, one-to-one.

    Args:
      pred: `[z, y, x]` predicted synapse instances, integer, 0 background.
      truth: `[z, y, x]` true synapse instances, same shape.
      iou_threshold: smallest IoU of a detection, in (0, 1].

    Returns:
      `MatchScores`: tp (synapses found), fp (predictions that found none),
      fn (synapses missed), precision, recall, f1 (1.0 where a denominator
      is 0), and the matched (predicted id, true id) pairs with their IoU.
    """
    return match_instances(pred, truth, iou_threshold)
