"""Instance targets for 3D Mask R-CNN: label clean-up, boxes and masks.

Chen et al. (3D Mask R-CNN for fluorescently labelled synapses) clean the
annotated synapse labels before training:

1. remove each z-slice of a segment (its pixels in one z-plane) that has
   fewer than 3 pixels or is a straight line: hand annotations leave stray
   pixels and strokes at the ends of a synapse;
2. relabel in 3D with connectivity 1 (face neighbours, cc3d's
   ``connectivity=6``), so that a segment cut in two by step 1 becomes two;
3. drop the segments that span fewer than 3 z-planes.

`clean_instance_labels` does that; `instance_targets` then reads, from a
(cleaned) label volume or a patch of it, one box per instance padded to a
fixed count so that the batch has static shapes on the device. The masks are
the label volume itself: instance `i` is ``labels == ids[i]``. The Mask R-CNN
crops and resamples each mask inside its (predicted) box ROIAlign-style, so it
needs the label volume and the ids rather than full-size boolean masks;
`instance_masks` builds those for small patches and tests.

Coordinates are voxel indices in `[z, y, x]` order; a box
``(z0, y0, x0, z1, y1, x1)`` covers voxels ``z0 <= z < z1`` etc. (stops
exclusive, as in slices), so ``z1 - z0`` is the box's extent in voxels.
"""

from __future__ import annotations

from typing import NamedTuple

import cc3d
import fastremap
import numpy as np
from scipy import ndimage

from synjax.errors import ConfigError, DataError

# Chen et al.'s clean-up thresholds.
MIN_SLICE_PIXELS = 3
MIN_Z_PLANES = 3
BOX_FIELDS = ("z0", "y0", "x0", "z1", "y1", "x1")


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise DataError(f"{what}: labels must be a [z, y, x] volume, got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{what}: labels must be integers, got dtype {labels.dtype}")
    return labels


def _slices_to_remove(
    z: np.ndarray, y: np.ndarray, x: np.ndarray, ids: np.ndarray, min_pixels: int
) -> np.ndarray:
    """Whether each foreground voxel lies in a z-slice of its segment to remove.

    Args:
        z, y, x: `[n]` coordinates of the foreground voxels in C order
            (as `np.nonzero` returns them).
        ids: `[n]` dense segment ids 0..k-1 of those voxels.
        min_pixels: slices with fewer pixels are removed.

    A slice is a straight line when all its pixels are collinear (any
    direction), i.e. its centred coordinates have rank < 2. That is tested
    exactly, in integers: with p0 and p1 the (y, x)-lexicographically first
    and last pixels of the slice (distinct once it has two pixels), every
    pixel p must have a zero cross product (p - p0) x (p1 - p0).
    """
    num_ids = int(ids.max()) + 1
    key = z.astype(np.int64) * num_ids + ids
    # Stable, so within a slice voxels stay in (y, x) order: first and last
    # are the lexicographic extremes.
    order = np.argsort(key, kind="stable")
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    counts = np.diff(np.r_[starts, key.size])
    ends = starts + counts - 1
    ys, xs = y[order].astype(np.int64), x[order].astype(np.int64)
    y0, x0 = np.repeat(ys[starts], counts), np.repeat(xs[starts], counts)
    dy, dx = np.repeat(ys[ends], counts) - y0, np.repeat(xs[ends], counts) - x0
    off_line = (ys - y0) * dx - (xs - x0) * dy != 0
    straight = ~np.logical_or.reduceat(off_line, starts)
    remove_slice = (counts < min_pixels) | straight
    remove = np.empty(key.size, bool)
    remove[order] = np.repeat(remove_slice, counts)
    return remove


def clean_instance_labels(
    labels: np.ndarray, min_pixels: int = MIN_SLICE_PIXELS, min_z_planes: int = MIN_Z_PLANES
) -> np.ndarray:
    """Chen et al.'s clean-up of annotated instance labels (see the module doc).

    1. Every z-slice of a segment with fewer than `min_pixels` pixels, or
       whose pixels all lie on one straight line (any direction; the
       centred coordinates have rank < 2), is set to background.
    2. The rest is relabelled with 3D connected components of connectivity 1
       (6 face neighbours), each original label on its own: two touching
       segments stay apart, one segment in two pieces becomes two.
    3. Components spanning fewer than `min_z_planes` z-planes are dropped.

    Args:
        labels: `[z, y, x]` instance labels, any integer dtype; 0 is background.
        min_pixels: smallest number of pixels a kept z-slice has (paper: 3).
        min_z_planes: smallest number of z-planes a kept segment spans (paper: 3).

    Returns:
        `[z, y, x]` uint32 labels, ids 1..n in raster order of each segment's
        first voxel (cc3d's numbering), 0 for background.

    Raises:
        DataError: if `labels` is not a 3D integer volume.
        ConfigError: if a threshold is below 1.
    """
    labels = _check_labels(labels, "clean_instance_labels")
    for name, value in (("min_pixels", min_pixels), ("min_z_planes", min_z_planes)):
        if value < 1:
            raise ConfigError(f"clean_instance_labels: {name} must be >= 1, got {value}")
    cleaned = labels.copy()
    z, y, x = np.nonzero(labels)
    if z.size:
        dense, _ = fastremap.renumber(labels[z, y, x], start=0, preserve_zero=False)
        remove = _slices_to_remove(z, y, x, dense.astype(np.int64), min_pixels)
        cleaned[z[remove], y[remove], x[remove]] = 0
    components = cc3d.connected_components(cleaned, connectivity=6)
    num = int(components.max()) if components.size else 0
    spans = np.array(
        [0] + [box[0].stop - box[0].start for box in ndimage.find_objects(components, num)],
        dtype=np.int64,
    )
    keep = spans >= min_z_planes
    keep[0] = False
    lookup = np.zeros(num + 1, np.uint32)
    lookup[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return lookup[components]


class InstanceTargets(NamedTuple):
    """Fixed-size detection targets of one `[z, y, x]` label volume (or patch).

    Attributes:
      boxes: `[max_instances, 6]` float32 ``(z0, y0, x0, z1, y1, x1)`` in
        voxels, stops exclusive; zeros in padding slots.
      ids: `[max_instances]` int64 label id of each box (instance i's mask
        is ``labels == ids[i]``); 0 in padding slots.
      sizes: `[max_instances]` int64 voxel count of each instance; 0 in padding.
      valid: `[max_instances]` bool, True for real instances.
      num_instances: instances in the volume before truncation to
        `max_instances` (larger means some were left out).
    """

    boxes: np.ndarray
    ids: np.ndarray
    sizes: np.ndarray
    valid: np.ndarray
    num_instances: int


def instance_targets(labels: np.ndarray, max_instances: int) -> InstanceTargets:
    """Boxes, ids and sizes of the instances in `labels`, padded to `max_instances`.

    Run `clean_instance_labels` on the whole annotated volume first (once,
    before cutting patches: cleaning a patch would judge slices cut by the
    patch border). Each nonzero id is one instance, even where it is in
    several pieces (a patch can cut a curved synapse in two); its box covers
    all its voxels. When there are more than `max_instances` instances the
    largest are kept (ties: lower id); slots are filled in increasing id
    order, then padding.

    Args:
        labels: `[z, y, x]` instance labels, any integer dtype; 0 is background.
        max_instances: number of slots (static size for the device).

    Returns:
        `InstanceTargets`.

    Raises:
        DataError: if `labels` is not a 3D integer volume.
        ConfigError: if `max_instances` < 1.
    """
    labels = _check_labels(labels, "instance_targets")
    if max_instances < 1:
        raise ConfigError(f"instance_targets: max_instances must be >= 1, got {max_instances}")
    dense, mapping = fastremap.renumber(labels, start=1, preserve_zero=True, in_place=False)
    num = int(dense.max()) if dense.size else 0
    ids = np.zeros(num + 1, np.int64)  # ids[d] = original id of dense id d
    for original, new in mapping.items():
        ids[new] = original
    # Dense ids follow first appearance; sort instances by original id.
    by_id = 1 + np.argsort(ids[1 : num + 1], kind="stable")
    sizes = np.bincount(dense.ravel(), minlength=num + 1).astype(np.int64)
    chosen = by_id
    if num > max_instances:
        largest = np.lexsort((ids[by_id], -sizes[by_id]))[:max_instances]
        chosen = by_id[np.sort(largest)]
    objects = ndimage.find_objects(dense, num)
    boxes = np.zeros((max_instances, 6), np.float32)
    for slot, dense_id in enumerate(chosen):
        box = objects[dense_id - 1]
        boxes[slot] = [s.start for s in box] + [s.stop for s in box]
    out_ids = np.zeros(max_instances, np.int64)
    out_sizes = np.zeros(max_instances, np.int64)
    out_ids[: chosen.size] = ids[chosen]
    out_sizes[: chosen.size] = sizes[chosen]
    valid = np.arange(max_instances) < chosen.size
    return InstanceTargets(boxes, out_ids, out_sizes, valid, num)


def instance_masks(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Full-volume boolean masks `[n, z, y, x]` of the instances `ids` (0: empty mask).

    Memory grows as n times the volume: meant for small patches and tests;
    models should crop from the label volume instead.
    """
    labels = _check_labels(labels, "instance_masks")
    ids = np.asarray(ids).reshape(-1)
    masks = labels[None] == ids.astype(labels.dtype)[:, None, None, None]
    masks &= (ids != 0)[:, None, None, None]
    return masks
