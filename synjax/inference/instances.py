"""Instance segmentation of a whole volume from a patch-wise detector (Chen et al.).

The 3D Mask R-CNN sees 96 x 96 x 32 (x-y-z) patches; a volume is covered by
patches that overlap (34 voxels in x and y, 17 in z in the paper), so that
every synapse lies whole inside at least one patch. Each patch's detections
scoring above a threshold (0.99 in the paper) have their masks pasted into
volume coordinates; all pasted masks become the columns of one sparse
voxels x masks matrix (CSC), `synjax.inference.merge.merge_masks` keeps one
mask per group of copies, and `paint_masks` paints the kept masks.

Pasting: a mask predicted inside box `(z0, y0, x0, z1, y1, x1)` (patch
voxels) on an `[mz, my, mx]` grid covers the voxels whose centres lie in the
box; each such voxel reads the mask at its centre by trilinear interpolation
between the mask's bin centres (detectron2's paste, in 3D), and is in the
instance where that reads above `mask_threshold`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.ndimage
import scipy.sparse

from synjax.errors import ConfigError, DataError
from synjax.inference.merge import DEFAULT_MIN_OVERLAP, merge_masks, paint_masks

# `predict_fn(patches [n, z, y, x]) -> dict` with "boxes" [n, D, 6], "scores"
# [n, D], "masks" [n, D, mz, my, mx] (probabilities) and "valid" [n, D].
PatchDetector = Callable[[np.ndarray], dict]


def patch_starts(size: int, patch: int, overlap: int) -> list[int]:
    """Start positions of patches along one axis: step `patch - overlap`, the last flush.

    A volume no larger than one patch has the single start 0 (the caller pads).

    Raises:
      ConfigError: if the overlap is negative or not smaller than the patch.
    """
    if patch < 1 or not 0 <= overlap < patch:
        raise ConfigError(f"patch={patch}, overlap={overlap}: expected 0 <= overlap < patch")
    if size <= patch:
        return [0]
    step = patch - overlap
    count = math.ceil((size - patch) / step) + 1
    starts = [min(i * step, size - patch) for i in range(count)]
    return sorted(set(starts))


def pasted_probabilities(
    mask: np.ndarray,
    box: Sequence[float],
    origin: Sequence[int],
    volume_shape: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """A box's mask probabilities resampled onto the volume voxels whose centres it holds.

    Args:
      mask: [mz, my, mx] mask probabilities over the box.
      box: (z0, y0, x0, z1, y1, x1) in patch voxels.
      origin: (z, y, x) volume position of the patch's voxel (0, 0, 0).
      volume_shape: (z, y, x) of the volume; voxels outside it are dropped.

    Returns:
      (flat [k] int64 C-order volume indices in increasing order, values [k]
      float32: the mask's trilinear read at each voxel centre).
    """
    mask = np.asarray(mask, np.float32)
    box = np.asarray(box, np.float64)
    if mask.ndim != 3 or box.shape != (6,):
        raise DataError(
            f"pasted_probabilities: mask {mask.shape}, box {box.shape}; expected 3D and (6,)"
        )
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    lo, hi = box[:3], box[3:]
    if np.any(hi <= lo):
        return empty
    # Voxels whose centres lie inside the box.
    first = np.ceil(lo - 0.5).astype(int)
    last = np.floor(hi - 0.5 - 1e-9).astype(int)
    if np.any(last < first):
        return empty
    axes = [np.arange(a, b + 1) for a, b in zip(first, last, strict=True)]
    # Continuous mask coordinate of each voxel centre (bin centres at integers).
    coords = [
        (ax + 0.5 - lo[i]) / (hi[i] - lo[i]) * mask.shape[i] - 0.5 for i, ax in enumerate(axes)
    ]
    grid = np.meshgrid(*coords, indexing="ij")
    values = scipy.ndimage.map_coordinates(mask, grid, order=1, mode="nearest")
    position = np.meshgrid(*[ax + o for ax, o in zip(axes, origin, strict=True)], indexing="ij")
    shape = np.asarray(volume_shape)
    keep = np.ones(values.shape, bool)
    for i in range(3):
        keep &= (position[i] >= 0) & (position[i] < shape[i])
    # C-order over (z, y, x) positions that increase along each axis: already sorted.
    flat = np.ravel_multi_index(tuple(p[keep] for p in position), tuple(int(s) for s in shape))
    return flat.astype(np.int64), values[keep].astype(np.float32)


def paste_mask(
    mask: np.ndarray,
    box: Sequence[float],
    origin: Sequence[int],
    volume_shape: Sequence[int],
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """Flat (C-order) volume indices of the voxels of one pasted mask.

    Args:
      mask: [mz, my, mx] mask probabilities over the box.
      box: (z0, y0, x0, z1, y1, x1) in patch voxels.
      origin: (z, y, x) volume position of the patch's voxel (0, 0, 0).
      volume_shape: (z, y, x) of the volume; voxels outside it are dropped.
      mask_threshold: a voxel is in the instance where the mask reads above this.

    Returns:
      [k] int64 sorted flat indices.
    """
    flat, values = pasted_probabilities(mask, box, origin, volume_shape)
    return flat[values > mask_threshold]


class PatchDetections(NamedTuple):
    """Every pasted detection of a volume, before the copies are merged.

    Attributes:
      voxels: per detection, [k] int64 sorted flat volume indices of its mask.
      scores: [n] float32 detector score of each detection.
      shape: (z, y, x) of the volume.
      num_patches: patches predicted.
    """

    voxels: list[np.ndarray]
    scores: np.ndarray
    shape: tuple[int, int, int]
    num_patches: int


class VolumeInstances(NamedTuple):
    """Instances of a volume from patch-wise detections.

    Attributes:
      labels: [z, y, x] uint32 instance ids 1..k, 0 background.
      scores: [k] float32 detector score of instance i + 1.
      num_detections: pasted masks above the score threshold before merging.
    """

    labels: np.ndarray
    scores: np.ndarray
    num_detections: int


def detect_patches(
    predict_fn: PatchDetector,
    image: np.ndarray,
    patch_shape: Sequence[int],
    overlap: Sequence[int],
    min_score: float = 0.0,
    batch_size: int = 1,
    mask_threshold: float = 0.5,
    pad_value: float = 0.0,
) -> PatchDetections:
    """Runs the detector on overlapping patches and pastes every mask into the volume.

    Args:
      predict_fn: `PatchDetector` on a batch of `[n, *patch_shape]` patches.
      image: [z, y, x] input volume, already as the network expects it.
      patch_shape: (z, y, x) patch size; a volume smaller than a patch along
        an axis is padded with `pad_value` at its end.
      overlap: (z, y, x) overlap between neighbouring patches, in voxels.
      min_score: detections scoring at or below this are not pasted.
      batch_size: patches per `predict_fn` call.
      mask_threshold: mask probability above which a voxel is in an instance.
      pad_value: value of the padding.

    Returns:
      `PatchDetections` (detections with an empty pasted mask left out).
    """
    image = np.asarray(image)
    if image.ndim != 3 or len(patch_shape) != 3 or len(overlap) != 3:
        raise DataError(
            f"detect_patches: image {image.shape}, patch {tuple(patch_shape)}, "
            f"overlap {tuple(overlap)}; expected a [z, y, x] image and (z, y, x) sizes"
        )
    if batch_size < 1:
        raise ConfigError(f"detect_patches: batch_size={batch_size}; expected >= 1")
    patch = tuple(int(p) for p in patch_shape)
    shape = image.shape
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    if padded_shape != shape:
        pad = [(0, p - s) for s, p in zip(shape, padded_shape, strict=True)]
        image = np.pad(image, pad, constant_values=pad_value)
    starts = [
        patch_starts(n, p, int(o)) for n, p, o in zip(padded_shape, patch, overlap, strict=True)
    ]
    origins = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    voxels, scores = [], []
    for first in range(0, len(origins), batch_size):
        chunk = origins[first : first + batch_size]
        patches = np.stack(
            [image[z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in chunk]
        )
        for _, _, pasted, score in paste_detections(
            predict_fn(patches), chunk, shape, min_score, mask_threshold
        ):
            voxels.append(pasted)
            scores.append(score)
    return PatchDetections(voxels, np.asarray(scores, np.float32), shape, len(origins))


def paste_detections(
    out: dict,
    origins: Sequence[Sequence[int]],
    volume_shape: Sequence[int],
    min_score: float = 0.0,
    mask_threshold: float = 0.5,
) -> list[tuple[int, int, np.ndarray, float]]:
    """The pasted masks of one `PatchDetector` call, in patch order then detection order.

    Args:
      out: the detector's output for `len(origins)` patches (more rows, e.g.
        padding of the batch, are ignored).
      origins: (z, y, x) volume position of each patch's voxel (0, 0, 0).
      volume_shape: (z, y, x) of the volume; voxels outside it are dropped.
      min_score: detections scoring at or below this are left out.
      mask_threshold: mask probability above which a voxel is in an instance.

    Returns:
      (patch position in `origins`, detection index in the patch, [k] int64
      sorted flat volume indices, score) of each valid detection above
      `min_score` whose pasted mask is not empty.
    """
    out = {k: np.asarray(v) for k, v in out.items()}
    shape = tuple(int(s) for s in volume_shape)
    found = []
    for i, origin in enumerate(origins):
        for d in np.flatnonzero(out["valid"][i] & (out["scores"][i] > min_score)):
            pasted = paste_mask(
                out["masks"][i, d], out["boxes"][i, d], origin, shape, mask_threshold
            )
            if pasted.size:
                found.append((i, int(d), pasted, float(out["scores"][i, d])))
    return found


def merge_detections(
    detections: PatchDetections,
    score_threshold: float,
    min_overlap: int = DEFAULT_MIN_OVERLAP,
) -> VolumeInstances:
    """Keeps the detections above `score_threshold`, merges the copies, paints them.

    The masks become the columns of a sparse voxels x masks CSC matrix;
    `merge_masks` keeps one per group of copies (sharing at least
    `min_overlap` voxels) and `paint_masks` paints them (ids 1..k, renumbered
    so that a mask painted over entirely by smaller ones leaves no gap).
    """
    shape = detections.shape
    chosen = np.flatnonzero(detections.scores > score_threshold)
    if chosen.size == 0:
        return VolumeInstances(np.zeros(shape, np.uint32), np.zeros(0, np.float32), 0)
    rows = [detections.voxels[i] for i in chosen]
    row = np.concatenate(rows)
    col = np.repeat(np.arange(chosen.size), [r.size for r in rows])
    masks = scipy.sparse.csc_matrix(
        (np.ones(row.size, bool), (row, col)), shape=(int(np.prod(shape)), chosen.size)
    )
    kept = merge_masks(masks, min_overlap)
    labels = paint_masks(masks, kept, shape).astype(np.uint32)
    kept_scores = detections.scores[chosen][kept]
    present = np.unique(labels)
    present = present[present > 0]
    lookup = np.zeros(len(kept) + 1, np.uint32)
    lookup[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    return VolumeInstances(lookup[labels], kept_scores[present - 1], int(chosen.size))


def predict_volume_instances(
    predict_fn: PatchDetector,
    image: np.ndarray,
    patch_shape: Sequence[int],
    overlap: Sequence[int],
    score_threshold: float,
    batch_size: int = 1,
    mask_threshold: float = 0.5,
    min_overlap: int = DEFAULT_MIN_OVERLAP,
) -> VolumeInstances:
    """`detect_patches` then `merge_detections`: the paper's volume inference."""
    detections = detect_patches(
        predict_fn, image, patch_shape, overlap, score_threshold, batch_size, mask_threshold
    )
    return merge_detections(detections, score_threshold, min_overlap)


def tied_score_share(scores: np.ndarray, decimals: int = 6) -> tuple[float, float]:
    """The most common score of a set of instances and the share of them that hold it.

    A healthy detector gives its instances scores that differ; when most of
    them share one value (say, a box head whose units are inactive for most
    ROIs, so that their logits are its bias), ranking or thresholding by score
    means little, which a user should be told.

    Args:
      scores: [n] instance scores.
      decimals: scores equal to this many decimals count as one.

    Returns:
      (share in [0, 1] of the instances holding the most common score, that
      score); (0.0, nan) for no instances.
    """
    scores = np.asarray(scores, np.float64).round(decimals)
    if scores.size == 0:
        return 0.0, math.nan
    values, counts = np.unique(scores, return_counts=True)
    top = int(np.argmax(counts))
    return float(counts[top] / scores.size), float(values[top])
