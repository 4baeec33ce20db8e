"""The two-step baseline's second step: threshold, connected components, small ones removed.

The approach the end-to-end instance network improves on (Expert Syst.
Appl., 2024): a binary cleft map, then 3D connected components (`cc3d`,
26-connected), components smaller than `min_size` voxels dropped, ids
renumbered 1..k. `tune_components` picks the threshold and size on labelled
data with a metric passed in (post-processing takes its metric as an
argument: it imports no evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import cc3d
import fastremap
import numpy as np

from synjax.errors import ConfigError, DataError

CONNECTIVITY = 26


def cleft_components(probability: np.ndarray, threshold: float, min_size: int = 0) -> np.ndarray:
    """Instances of a cleft probability map.

    Args:
      probability: [z, y, x] cleft probability (or any score).
      threshold: voxels scoring above this are clefts.
      min_size: components of fewer voxels are removed.

    Returns:
      [z, y, x] uint32 ids 1..k in raster order of first voxel, 0 background.
    """
    probability = np.asarray(probability)
    if probability.ndim != 3:
        raise DataError(f"cleft_components: probability shape {probability.shape}; expected 3D")
    if min_size < 0:
        raise ConfigError(f"cleft_components: min_size={min_size}; expected >= 0")
    labels = cc3d.connected_components(probability > threshold, connectivity=CONNECTIVITY)
    if min_size > 0:
        labels = cc3d.dust(labels, threshold=int(min_size), connectivity=CONNECTIVITY)
    labels, _ = fastremap.renumber(labels, preserve_zero=True, in_place=True)
    return labels.astype(np.uint32, copy=False)


class ComponentsChoice(NamedTuple):
    """The chosen (threshold, min_size), its score, and every (threshold, min_size, score)."""

    threshold: float
    min_size: int
    score: float
    table: list[tuple[float, int, float]]


def tune_components(
    probability: np.ndarray,
    score_fn: Callable[[np.ndarray], float],
    thresholds: Sequence[float],
    min_sizes: Sequence[int],
) -> ComponentsChoice:
    """The (threshold, min_size) of the grid whose components `score_fn` rates highest.

    Ties go to the higher threshold, then the larger size (the stricter choice).

    Args:
      probability: [z, y, x] cleft probability of labelled data.
      score_fn: labels [z, y, x] -> score (higher is better), e.g. detection
        F1 against the truth.
      thresholds, min_sizes: the grid.
    """
    if not thresholds or not min_sizes:
        raise ConfigError("tune_components: empty grid of thresholds or min_sizes")
    table = [
        (float(t), int(m), float(score_fn(cleft_components(probability, t, m))))
        for t in thresholds
        for m in min_sizes
    ]
    best = max(table, key=lambda row: (row[2], row[0], row[1]))
    return ComponentsChoice(best[0], best[1], best[2], table)


def keep_large_instances(voxels: np.ndarray, min_size: int) -> np.ndarray:
    """New ids of instances 1..k once those under `min_size` voxels are dropped.

    The size rule of the two-step baseline, for instance labels that come from
    elsewhere (the instance network's fused blocks, whose sizes may have been
    counted block by block).

    Args:
      voxels: [k] voxel count of instance i + 1.
      min_size: instances with fewer voxels are dropped.

    Returns:
      [k + 1] uint32 lookup: old id -> new id (0 for dropped ones and the
      background), kept ids renumbered 1..m in their old order.
    """
    if min_size < 0:
        raise ConfigError(f"keep_large_instances: min_size={min_size}; expected >= 0")
    keep = np.asarray(voxels) >= min_size
    lookup = np.zeros(keep.size + 1, np.uint32)
    lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lookup
