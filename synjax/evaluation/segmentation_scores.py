"""The neuron pipeline's scores of a segmentation, from one contingency table counted per block.

`segmentation_scores` reads a segmentation and its ground truth block by
block (`contingency.labelled_contingency_blockwise`), so volumes of any size
are scored holding one block of each and the table (one row per distinct
(segment, body) pair). Every score is read off that table: the adapted Rand
error with its precision and recall, the classical Rand index, the variation
of information split into its split and merge parts, and the number of
distinct segment labels. On a volume in memory the figures equal those of
the whole-array functions of `rand_voi` (the table holds the same counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.evaluation.contingency import labelled_contingency_blockwise
from synjax.evaluation.rand_voi import (
    DEFAULT_IGNORE_GT,
    adapted_rand_error,
    rand_index,
    variation_of_information,
)

# Blocks read at a time by default: 4 Mi voxels, about 100 MB with both uint64 labels
# and the sort's copies.
DEFAULT_SCORE_BLOCK = (64, 256, 256)


def segmentation_scores(
    seg: Any,
    gt: Any,
    block_shape: Sequence[int] | int = DEFAULT_SCORE_BLOCK,
    ignore_gt: Sequence[int] = DEFAULT_IGNORE_GT,
) -> dict[str, float | int]:
    """Adapted Rand error (P, R), Rand index and VOI of `seg` against `gt`, block by block.

    Args:
        seg: `[z, y, x]` segmentation labels: a numpy array or a volume read
            by slicing (`synjax.io` volumes, zarr), any integer dtype.
        gt: `[z, y, x]` ground-truth labels, same shape.
        block_shape: `(bz, by, bx)` (or one int) voxels read at a time; best a
            multiple of the volumes' chunks.
        ignore_gt: ground-truth labels whose voxels are left out of the
            scores (SNEMI3D and CREMI: 0); they still count for `segments`.

    Returns:
        `{"adapted_rand_error", "rand_precision", "rand_recall",
        "rand_index", "voi_split", "voi_merge", "voi", "segments"}`: the
        scores of `rand_voi` (VOI in bits) and the number of distinct labels
        of `seg` over the whole volume (0 included, as `np.unique` counts).

    Raises:
        DataError: the shapes differ, the labels are not integers, or fewer
            than two voxels are left after ignoring labels.
    """
    counted = labelled_contingency_blockwise(seg, gt, block_shape, ignore_gt=())
    # Counted with every label, so that `segments` sees the voxels of ignored
    # bodies too; the scores see the table without those bodies' columns.
    kept = ~np.isin(counted.gt_ids, np.asarray(list(ignore_gt), np.uint64))
    table = counted.table[:, np.flatnonzero(kept)]
    rand = adapted_rand_error(table=table)
    voi = variation_of_information(table=table)
    return {
        "adapted_rand_error": rand.error,
        "rand_precision": rand.precision,
        "rand_recall": rand.recall,
        "rand_index": rand_index(table=table),
        "voi_split": voi.split,
        "voi_merge": voi.merge,
        "voi": voi.split + voi.merge,
        "segments": int(counted.seg_ids.size),
    }
