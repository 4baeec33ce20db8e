"""Input windows and training labels for the candidate-pruning CNN.

Each candidate (see `synjax.postprocess.candidates`) becomes a window centred
on the midpoint of its two closest points, with four channels: EM intensity in
[0, 1] (`synjax.data.intensity`, converted window by window), the signed
proximity map, the presynaptic segment's mask and the postsynaptic segment's
mask (Parag et al., MICCAI 2018). Windows that reach past the volume are
zero-padded, so every window has the same shape and candidates at the border
are still scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from synjax.data.intensity import DTYPE_RANGE, IntensityNormalization, NormalizedVolume
from synjax.errors import DataError
from synjax.geometry import Box, read_padded, spatial_triple
from synjax.io.voxels import nearest_voxel
from synjax.postprocess.candidates import UNLABELLED, Candidates

DEFAULT_WINDOW_SHAPE = (16, 160, 160)
DEFAULT_MAX_SHIFT = (1, 8, 8)
DEFAULT_LABEL_DISTANCE_NM = 400.0
NUM_CHANNELS = 4
CHANNEL_EM, CHANNEL_PROXIMITY, CHANNEL_PRE, CHANNEL_POST = range(NUM_CHANNELS)
# Axes of a [z, y, x, channels] window that the xy rotation turns.
YX_AXES = (1, 2)


class PairTable(Protocol):
    """Ground-truth pairs: anything with these [m] / [m, 3] arrays."""

    pre_ids: np.ndarray
    post_ids: np.ndarray
    locations: np.ndarray


def window_centres(candidates: Candidates) -> np.ndarray:
    """[n, 3] int64 voxel centre of each window: midpoint of the closest points.

    A midpoint half-way between two voxels goes to the upper one (the
    package's one rule, `synjax.io.voxels.nearest_voxel`).
    """
    return nearest_voxel((candidates.pre_point + candidates.post_point) / 2.0)


def _augment(window: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips of z, y, x and a random multiple of 90 degrees in xy."""
    flips = np.flatnonzero(rng.random(3) < 0.5)
    if flips.size:
        window = np.flip(window, axis=tuple(flips))
    # A quarter turn swaps y and x, so it is only allowed on square windows.
    turns = rng.integers(4) if window.shape[1] == window.shape[2] else 2 * rng.integers(2)
    return np.ascontiguousarray(np.rot90(window, k=int(turns), axes=YX_AXES))


def extract_windows(
    raw: np.ndarray,
    proximity: np.ndarray,
    segmentation: np.ndarray,
    candidates: Candidates,
    window_shape: Sequence[int] = DEFAULT_WINDOW_SHAPE,
    rng: np.random.Generator | None = None,
    max_shift: Sequence[int] = DEFAULT_MAX_SHIFT,
    intensity: IntensityNormalization = DTYPE_RANGE,
    name: str = "raw",
) -> np.ndarray:
    """Four-channel windows around the candidates.

    Only the windows are read and converted, never the whole volume, so the
    volumes may be lazy (`.shape` and numpy slicing).

    Args:
      raw: [z, y, x] EM intensities, normalised by `intensity`.
      proximity: [z, y, x] signed proximity in [-1, 1].
      segmentation: [z, y, x] the segmentation the candidates were built on.
      candidates: n candidates.
      window_shape: (z, y, x) window size in voxels. The centre voxel sits at
        index `window_shape // 2`.
      rng: for training, a numpy Generator that turns on augmentation: a
        random centre shift of up to `max_shift` voxels per axis, random flips
        and random 90-degree turns in xy. None (prediction) for no
        augmentation.
      max_shift: (z, y, x) largest centre shift in voxels when `rng` is given.
      intensity: the pruner's intensity normalisation (saved with its
        checkpoint); default: the dtype's range.
      name: the raw volume's name for errors.

    Returns:
      [n, z, y, x, 4] float32 windows: EM in [0, 1], proximity, pre-segment
      mask, post-segment mask (masks 1.0 inside, 0.0 outside).

    Raises:
      DataError: the volumes' shapes differ; a window's raw values do not fit
        `intensity` (NaN, Inf, out of range).
      ConfigError: the window shape or shift is malformed.
    """
    shape = spatial_triple(window_shape, "window_shape")
    shift = np.asarray(spatial_triple(max_shift, "max_shift", minimum=0), np.int64)
    if not (np.shape(raw) == np.shape(proximity) == np.shape(segmentation)):
        raise DataError(
            f"raw {np.shape(raw)}, proximity {np.shape(proximity)}, segmentation "
            f"{np.shape(segmentation)}: expected one 3D shape"
        )
    em = NormalizedVolume(raw, intensity, name)

    n = len(candidates)
    out = np.zeros((n, *shape, NUM_CHANNELS), np.float32)
    starts = window_centres(candidates) - np.asarray(shape) // 2
    if rng is not None and n:
        starts = starts + rng.integers(-shift, shift + 1, size=(n, 3))
    for i in range(n):
        # Only the window is read; what lies outside the volume is zero.
        box = Box.at(starts[i], shape)
        seg_crop = read_padded(segmentation, box, "zero")
        window = out[i]
        window[..., CHANNEL_EM] = read_padded(em, box, "zero")
        window[..., CHANNEL_PROXIMITY] = read_padded(proximity, box, "zero")
        # Padding is 0 = UNLABELLED, so it never counts as either segment.
        pre, post = candidates.pre_segment[i], candidates.post_segment[i]
        window[..., CHANNEL_PRE] = (seg_crop == pre) & (pre != UNLABELLED)
        window[..., CHANNEL_POST] = (seg_crop == post) & (post != UNLABELLED)
        if rng is not None:
            out[i] = _augment(window, rng)
    return out


def map_to_ground_truth(
    segment_ids: np.ndarray, segmentation: np.ndarray, gt_segmentation: np.ndarray
) -> np.ndarray:
    """Ground-truth neuron that overlaps each segment most.

    Args:
      segment_ids: [n] segment ids of `segmentation`.
      segmentation: [z, y, x] predicted segmentation.
      gt_segmentation: [z, y, x] ground-truth neurons, 0 = unlabelled (never
        chosen).

    Returns:
      [n] uint64 ground-truth id per segment; 0 where the segment overlaps no
      labelled ground truth.
    """
    segment_ids = np.asarray(segment_ids, np.uint64)
    if np.shape(segmentation) != np.shape(gt_segmentation):
        raise DataError(
            f"segmentation {np.shape(segmentation)} and gt_segmentation "
            f"{np.shape(gt_segmentation)}: expected one shape"
        )
    seg = np.asarray(segmentation).astype(np.uint64, copy=False)
    gt = np.asarray(gt_segmentation).astype(np.uint64, copy=False)
    inside = np.isin(seg, segment_ids) & (gt != UNLABELLED)
    result = np.zeros(len(segment_ids), np.uint64)
    if not inside.any():
        return result
    pairs, counts = np.unique(
        np.stack([seg[inside], gt[inside]], axis=1), axis=0, return_counts=True
    )
    # Sort by segment, then by count descending: the first row per segment wins.
    order = np.lexsort((-counts, pairs[:, 0]))
    pairs = pairs[order]
    first = np.concatenate([[True], pairs[1:, 0] != pairs[:-1, 0]])
    best_seg, best_gt = pairs[first, 0], pairs[first, 1]
    pos = np.searchsorted(best_seg, segment_ids)
    pos = np.minimum(pos, len(best_seg) - 1)
    found = best_seg[pos] == segment_ids
    result[found] = best_gt[pos[found]]
    return result


def _point_segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[m, n] distance from points [m, 3] to the line segments a[n] -> b[n]."""
    ab = b - a
    length2 = np.maximum(np.sum(ab * ab, axis=1), np.finfo(np.float64).tiny)
    ap = points[:, None, :] - a[None]
    t = np.clip(np.sum(ap * ab[None], axis=2) / length2, 0.0, 1.0)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None, :] - closest, axis=2)


def label_candidates(
    candidates: Candidates,
    segmentation: np.ndarray,
    gt_segmentation: np.ndarray,
    gt_pairs: PairTable,
    resolution: Sequence[float],
    max_distance_nm: float = DEFAULT_LABEL_DISTANCE_NM,
) -> np.ndarray:
    """Training labels: does each candidate connect a true pre -> post pair?

    A candidate is positive when its pre segment maps (by largest overlap) to
    the ground-truth pre neuron and its post segment to the ground-truth post
    neuron of one ground-truth pair whose location lies within
    `max_distance_nm` of the candidate. The distance is taken to the line
    between the candidate's two closest points rather than to their midpoint,
    because an annotation may sit anywhere across the cleft.

    Args:
      candidates: n candidates on `segmentation`.
      segmentation: [z, y, x] predicted segmentation.
      gt_segmentation: [z, y, x] ground-truth neurons, 0 = unlabelled.
      gt_pairs: m ground-truth pairs: `pre_ids` [m], `post_ids` [m] (ids of
        `gt_segmentation`), `locations` [m, 3] nm, z-y-x, in the candidates'
        frame (voxel (0, 0, 0) at 0 nm).
      resolution: voxel size in nm, z-y-x.
      max_distance_nm: largest distance between a candidate and its pair.

    Returns:
      [n] bool labels.
    """
    n = len(candidates)
    gt_locations = np.asarray(gt_pairs.locations, np.float64).reshape(-1, 3)
    if n == 0 or len(gt_locations) == 0:
        return np.zeros((n,), bool)
    res = np.asarray(resolution, np.float64)
    ids = np.concatenate([candidates.pre_segment, candidates.post_segment])
    mapped = map_to_ground_truth(ids, segmentation, gt_segmentation)
    pre_gt, post_gt = mapped[:n], mapped[n:]
    same_cells = (pre_gt[None, :] == np.asarray(gt_pairs.pre_ids, np.uint64)[:, None]) & (
        post_gt[None, :] == np.asarray(gt_pairs.post_ids, np.uint64)[:, None]
    )
    distance = _point_segment_distance(
        gt_locations, candidates.pre_point * res, candidates.post_point * res
    )
    return np.any(same_cells & (distance <= max_distance_nm), axis=0) & (pre_gt != UNLABELLED)
