"""Evaluation: metrics on arrays: adapted Rand error and VOI, CREMI's and the paper's
partner scores, instance matching, volume distributions.

May import io and data only: no network, no training code, no post-processing.
"""

from synjax.evaluation.clefts import CleftScores, cremi_cleft_scores, detection_scores
from synjax.evaluation.distributions import compare_volume_distributions, instance_volumes
from synjax.evaluation.instances import instance_scores, match_instances, merge_split_errors
from synjax.evaluation.partners import (
    NO_CLEFT,
    PartnerPairs,
    PartnerScores,
    PrecisionRecallCurve,
    cremi_partner_scores,
    ids_within_distance_scores,
    paper_partner_scores,
    precision_recall_curve,
)
from synjax.evaluation.rand_voi import adapted_rand_error, rand_index, variation_of_information

__all__ = [
    "CleftScores",
    "NO_CLEFT",
    "PartnerPairs",
    "PartnerScores",
    "PrecisionRecallCurve",
    "adapted_rand_error",
    "compare_volume_distributions",
    "cremi_cleft_scores",
    "cremi_partner_scores",
    "detection_scores",
    "ids_within_distance_scores",
    "instance_scores",
    "instance_volumes",
    "match_instances",
    "merge_split_errors",
    "paper_partner_scores",
    "precision_recall_curve",
    "rand_index",
    "variation_of_information",
]
