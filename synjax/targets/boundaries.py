"""Boundary targets for DeepEM3D-style boundary networks, and their class weights.

DeepEM3D (Zeng, Wu, Ji, Bioinformatics 2017) trains its networks on binary
boundary maps derived from the dense neuron labels with one of three kernels:
a voxel is boundary when the kernel centred on it sees more than one label.

- ``"c5"``: the 5x5x5 cube around the voxel (thick boundaries),
- ``"c3"``: the 3x3x3 cube,
- ``"l3"``: the voxel and its 6 face neighbours (thinnest 3D boundary).

"Sees more than one label" is computed with a maximum and a minimum filter over
the kernel's footprint (boundary where they differ) on densely renumbered
labels, so it is vectorised and works for uint64 ids. At the volume border the
kernel is clipped: ``mode="nearest"`` repeats the border voxel, which adds no
label that the clipped kernel does not already see.

The loss is weighted per class, inversely to the class frequency
(`class_weights`), because boundary voxels are a small fraction of a volume.
"""

from __future__ import annotations

from typing import Literal

import fastremap
import numpy as np
from scipy import ndimage

from synjax.errors import ConfigError, DataError

Kernel = Literal["c5", "c3", "l3"]

# Footprints of DeepEM3D's boundary kernels, [z, y, x].
KERNELS: dict[str, np.ndarray] = {
    "c5": np.ones((5, 5, 5), dtype=bool),
    "c3": np.ones((3, 3, 3), dtype=bool),
    "l3": ndimage.generate_binary_structure(rank=3, connectivity=1),
}

BOUNDARY = 1
INTERIOR = 0


def boundary_labels(
    segmentation: np.ndarray,
    kernel: Kernel = "c3",
    ignore_background: bool = False,
    background: int = 0,
) -> np.ndarray:
    """Marks the voxels whose kernel neighbourhood holds more than one label.

    Args:
        segmentation: Dense instance labels `[z, y, x]`, any integer dtype
            (uint64 ids included).
        kernel: `"c5"` (5x5x5 cube), `"c3"` (3x3x3 cube) or `"l3"` (voxel and
            its 6 face neighbours). Clipped at the volume border.
        ignore_background: If False, `background` is an ordinary label, so the
            rim of every object that touches background is boundary. If True,
            background voxels do not count as a label: a voxel is boundary only
            when its kernel sees two different non-background labels, and
            background voxels are never boundary (mask them out of the loss
            with `segmentation != background` if they should not count as
            interior either).
        background: The background label value.

    Returns:
        `[z, y, x]` uint8 volume, `BOUNDARY` (1) or `INTERIOR` (0).

    Raises:
        ConfigError: if `kernel` is not one of "c5", "c3", "l3".
        DataError: if `segmentation` is not a 3D integer volume.
    """
    if kernel not in KERNELS:
        raise ConfigError(f"boundary kernel must be one of {sorted(KERNELS)}, got {kernel!r}")
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 3 or not np.issubdtype(segmentation.dtype, np.integer):
        raise DataError(
            "boundary_labels expects a 3D integer [z, y, x] volume, got "
            f"shape {segmentation.shape} dtype {segmentation.dtype}"
        )
    footprint = KERNELS[kernel]
    # Dense ids 1..n fit a narrow dtype that the filters handle fast, and leave
    # 0 and n + 1 free as sentinels for the background.
    dense, mapping = fastremap.renumber(segmentation, start=1, preserve_zero=False)
    dense = dense.astype(np.int32 if len(mapping) < np.iinfo(np.int32).max - 1 else np.int64)
    if not ignore_background:
        high = ndimage.maximum_filter(dense, footprint=footprint, mode="nearest")
        low = ndimage.minimum_filter(dense, footprint=footprint, mode="nearest")
        return (high != low).astype(np.uint8)

    is_background = segmentation == background
    # Background loses every max and every min, so it never makes two labels.
    high = ndimage.maximum_filter(
        np.where(is_background, 0, dense), footprint=footprint, mode="nearest"
    )
    low = ndimage.minimum_filter(
        np.where(is_background, len(mapping) + 1, dense), footprint=footprint, mode="nearest"
    )
    return ((high > low) & ~is_background).astype(np.uint8)


def class_weights(
    labels: np.ndarray,
    num_classes: int | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Loss weight of each class, inversely proportional to its frequency.

    Class ``c`` with frequency ``f_c`` among the counted voxels gets weight
    ``1 / (K * f_c)``, where ``K`` is the number of classes present; absent
    classes get 0. The mean weight over the counted voxels is then 1, so the
    weighted loss keeps the scale of the unweighted one, and every present
    class carries the same total weight (DeepEM3D's class-weighted loss,
    `synjax.models.losses.class_weighted_softmax_cross_entropy`). A voxel's
    weight is `class_weights(labels)[labels]`.

    Args:
        labels: Class ids (e.g. `boundary_labels` output) `[z, y, x]` or any
            shape, non-negative integers or bool.
        num_classes: Number of classes; default `labels.max() + 1`.
        mask: Optional bool array, same shape; only voxels inside are counted.

    Returns:
        float32 `[num_classes]`.

    Raises:
        DataError: if labels are negative, not below `num_classes`, or the mask
            shape differs.
    """
    labels = np.asarray(labels)
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise DataError(f"class_weights expects integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise DataError("class_weights: class ids must be non-negative")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 1
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"class_weights: class id {labels.max()} >= num_classes {num_classes}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != labels.shape:
            raise DataError(
                f"class_weights: mask shape {mask.shape} != labels shape {labels.shape}"
            )
        labels = labels[mask]
    counts = np.bincount(labels.ravel(), minlength=num_classes)
    freq = counts / max(counts.sum(), 1)
    present = int(np.count_nonzero(counts))
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, 1.0 / (present * freq), 0.0)
    return weights.astype(np.float32)
