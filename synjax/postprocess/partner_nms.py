"""Non-maximum suppression of duplicate partner detections.

One synapse often yields several candidates: its pre or post site breaks into
several components, each paired with the same two segments. Matching is
one-to-one, so every duplicate would count as a false positive. Among
detections that link the same (pre segment, post segment) within a radius,
only the best-scoring one is kept, as detection NMS keeps the best box.
"""

from __future__ import annotations

import numpy as np

from synjax.errors import ConfigError, DataError

# Default radius: duplicates of one synapse lie within its size (< 1 um).
DEFAULT_RADIUS_NM = 400.0


def suppress_duplicates(
    pre_segments: np.ndarray,
    post_segments: np.ndarray,
    locations: np.ndarray,
    scores: np.ndarray,
    radius_nm: float = DEFAULT_RADIUS_NM,
) -> np.ndarray:
    """Greedy NMS within each (pre segment, post segment) group.

    Detections are visited from the highest score down (ties: lower index
    first); one is kept unless a kept detection of the same ordered segment
    pair lies within `radius_nm`. A reversed pair (post, pre) is a different
    group: direction matters.

    Args:
      pre_segments: [n] presynaptic segment ids.
      post_segments: [n] postsynaptic segment ids.
      locations: [n, 3] detection locations in nm.
      scores: [n] detection scores.
      radius_nm: suppression radius in nm.

    Returns:
      [n] bool, True for the detections kept.
    """
    pre = np.asarray(pre_segments).reshape(-1)
    post = np.asarray(post_segments).reshape(-1)
    loc = np.asarray(locations, np.float64).reshape(-1, 3)
    score = np.asarray(scores, np.float64).reshape(-1)
    n = len(pre)
    if not (len(post) == len(loc) == len(score) == n):
        raise DataError(
            f"suppress_duplicates: {n} pre, {len(post)} post, {len(loc)} locations, "
            f"{len(score)} scores; expected one length"
        )
    if radius_nm < 0:
        raise ConfigError(f"radius_nm={radius_nm}: expected >= 0")
    keep = np.zeros(n, bool)
    if n == 0:
        return keep
    _, group = np.unique(np.stack([pre, post], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    # Stable sort on -score keeps the lower index first among ties.
    order = np.argsort(-score, kind="stable")
    for members in np.split(order[np.argsort(group[order], kind="stable")], _boundaries(group)):
        # `members` is one group, in descending score order.
        near = np.linalg.norm(loc[members, None] - loc[None, members], axis=-1) <= radius_nm
        alive = np.ones(len(members), bool)
        for i in range(len(members)):
            if alive[i]:
                keep[members[i]] = True
                alive[near[i]] = False
    return keep


def _boundaries(group: np.ndarray) -> np.ndarray:
    """Split points of the group-sorted index list."""
    counts = np.bincount(group)
    return np.cumsum(counts)[:-1]
