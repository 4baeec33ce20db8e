"""3D ROIAlign: fixed-size feature crops of boxes by trilinear sampling.

Conventions (torchvision's `roi_align` with `aligned=True`, in 3D): voxel `i`
of a feature map covers `[i, i+1)` in its own coordinates and holds the value
at its centre `i + 0.5`. A box in input voxels is scaled by `spatial_scale`
(feature voxels per input voxel, e.g. 1/4 at stride 4) and split into
`output_size` bins; each bin averages `sampling_ratio` samples per axis, placed
at the centres of a regular sub-grid of the bin, each read by trilinear
interpolation between voxel centres. A sample more than one voxel outside the
map reads 0; a sample within one voxel of the border reads the border value
(torchvision's rule). So a map that is linear in its coordinates is
reproduced exactly inside the map.

Trilinear weights and the average over a bin's sub-grid both factor by axis,
so each box gathers, per axis, `2 * sampling_ratio` voxel indices and weights
per bin; one gather of `prod(2 * sampling_ratio * output_size)` feature vectors
and one weighted sum per bin give the bins: no Python loop over boxes, samples or corners, and
a cost that does not grow with the feature map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from synjax.detection._validate import check_boxes, positive_int
from synjax.detection.iou import box_volume
from synjax.errors import ConfigError, DataError
from synjax.geometry import number_triple


def _axis_taps(
    start: jnp.ndarray, end: jnp.ndarray, bins: int, samples: int, size: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Voxel indices and weights along one axis.

    Args:
      start, end: the box's extent along the axis in feature coordinates,
        already shifted by -0.5 so that voxel centres sit at integers.
      bins: output bins along the axis.
      samples: samples per bin along the axis.
      size: the feature map's length along the axis.

    Returns:
      ([bins, 2 * samples] int32 indices, [bins, 2 * samples] float weights);
      the weights of a bin sum to the mean over its samples.
    """
    bin_size = (end - start) / bins
    offsets = (jnp.arange(samples, dtype=jnp.float32) + 0.5) / samples
    position = start + (jnp.arange(bins, dtype=jnp.float32)[:, None] + offsets[None, :]) * bin_size
    inside = (position >= -1.0) & (position <= size)
    position = jnp.maximum(position, 0.0)
    low = jnp.floor(position).astype(jnp.int32)
    at_end = low >= size - 1
    low = jnp.where(at_end, size - 1, low)
    high = jnp.where(at_end, size - 1, low + 1)
    frac = jnp.where(at_end, 0.0, position - low)
    scale = jnp.where(inside, 1.0 / samples, 0.0)
    index = jnp.stack([low, high], axis=-1).reshape(bins, 2 * samples)
    weight = jnp.stack([(1.0 - frac) * scale, frac * scale], axis=-1).reshape(bins, 2 * samples)
    return index, weight


def roi_align(
    features: jnp.ndarray,
    boxes: jnp.ndarray,
    output_size: int | Sequence[int],
    spatial_scale: float | Sequence[float] = 1.0,
    sampling_ratio: int | Sequence[int] = 2,
    boxes_per_step: int | None = 64,
) -> jnp.ndarray:
    """Crops a fixed-size feature block out of `features` for every box.

    Args:
      features: [z, y, x, c] feature map (channels last).
      boxes: [n, 6] boxes (z0, y0, x0, z1, y1, x1) in input voxels.
      output_size: static (oz, oy, ox) bins (or one int for all axes).
      spatial_scale: feature voxels per input voxel, one number or (z, y, x).
      sampling_ratio: static samples per bin along each axis (or (z, y, x)),
        at least 1.
      boxes_per_step: static number of boxes gathered at once (`lax.map`'s
        batch size), bounding memory to about
        `boxes_per_step * prod(2 * sampling_ratio * output_size) * c` floats;
        None processes all boxes in one step.

    Returns:
      [n, oz, oy, ox, c] pooled features, in `features`' dtype.
    """
    if jnp.ndim(features) != 4:
        raise DataError(
            f"roi_align: features have shape {jnp.shape(features)}; expected [z, y, x, c]"
        )
    check_boxes("roi_align", "boxes", jnp.shape(boxes))
    features, boxes = jnp.asarray(features), jnp.asarray(boxes)
    out = tuple(
        positive_int("roi_align", "output_size", int(o))
        for o in number_triple(output_size, "roi_align output_size", broadcast=True)
    )
    ratio = tuple(
        positive_int("roi_align", "sampling_ratio", int(r))
        for r in number_triple(sampling_ratio, "roi_align sampling_ratio", broadcast=True)
    )
    scale = jnp.asarray(
        number_triple(spatial_scale, "roi_align spatial_scale", broadcast=True), jnp.float32
    )
    shape = features.shape[:3]
    _, size_y, size_x, channels = features.shape
    flat = features.reshape(-1, channels)
    num_bins = math.prod(out)
    n = boxes.shape[0]
    if n == 0:
        return jnp.zeros((0, *out, features.shape[3]), features.dtype)

    def one_box(box):
        # aligned=True: continuous coordinate p reads voxel index p - 0.5.
        start = box[:3] * scale - 0.5
        end = box[3:] * scale - 0.5
        taps = [_axis_taps(start[a], end[a], out[a], ratio[a], shape[a]) for a in range(3)]
        (iz, wz), (iy, wy), (ix, wx) = taps
        # Gather laid out [bins..., taps...] so that each bin is one dot
        # product of its taps' weights with their feature rows; a row gather
        # from the flattened map is several times faster on CPU than XLA's
        # gather with three index arrays, and this layout needs no transpose.
        rows = (
            iz[:, None, None, :, None, None] * size_y + iy[None, :, None, None, :, None]
        ) * size_x + ix[None, None, :, None, None, :]
        weights = (
            wz[:, None, None, :, None, None]
            * wy[None, :, None, None, :, None]
            * wx[None, None, :, None, None, :]
        )
        block = jnp.take(flat, rows.reshape(-1), axis=0, mode="clip")
        block = block.reshape(num_bins, -1, channels).astype(jnp.float32)
        pooled = jnp.einsum("nt,ntk->nk", weights.reshape(num_bins, -1), block)
        pooled = pooled.reshape(*out, channels)
        return pooled.astype(features.dtype)

    boxes = boxes.astype(jnp.float32)
    if boxes_per_step is None:
        return jax.vmap(one_box)(boxes)
    step = positive_int("roi_align", "boxes_per_step", boxes_per_step)
    return jax.lax.map(one_box, boxes, batch_size=min(step, n))


def assign_levels(
    boxes: jnp.ndarray,
    num_levels: int,
    canonical_size: float,
    canonical_level: int = 0,
) -> jnp.ndarray:
    """FPN level of each box by its size (detectron2's `assign_boxes_to_levels` in 3D).

    The size of a box is the cube root of its volume in input voxels; a box of
    `canonical_size` goes to `canonical_level`, and each doubling of the size
    moves it one level coarser:
    `level = floor(canonical_level + log2(size / canonical_size + 1e-8))`,
    clipped to `[0, num_levels - 1]`.

    Args:
      boxes: [n, 6] boxes in input voxels.
      num_levels: number of pyramid levels (level 0 is the finest).
      canonical_size: box size (voxels) that maps to `canonical_level`.
      canonical_level: index of that level.

    Returns:
      [n] int32 level indices into the list of feature maps.
    """
    check_boxes("assign_levels", "boxes", jnp.shape(boxes))
    boxes = jnp.asarray(boxes)
    num_levels = positive_int("assign_levels", "num_levels", num_levels)
    if not canonical_size > 0:
        raise ConfigError(f"assign_levels: canonical_size={canonical_size}; expected > 0")
    size = jnp.cbrt(box_volume(boxes.astype(jnp.float32)))
    level = jnp.floor(canonical_level + jnp.log2(size / canonical_size + 1e-8))
    return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def multilevel_roi_align(
    features_per_level: Sequence[jnp.ndarray],
    boxes: jnp.ndarray,
    levels: jnp.ndarray,
    output_size: int | Sequence[int],
    spatial_scales: Sequence[float | Sequence[float]],
    sampling_ratio: int | Sequence[int] = 2,
    boxes_per_step: int | None = 64,
) -> jnp.ndarray:
    """ROIAlign of each box on its own FPN level.

    Every box is pooled on every level and the assigned level's crop kept:
    fixed shapes at the price of `num_levels` times the gathers.

    Args:
      features_per_level: per level, a [z_l, y_l, x_l, c] map (same c).
      boxes: [n, 6] boxes in input voxels.
      levels: [n] int level index per box (from `assign_levels`).
      output_size, sampling_ratio, boxes_per_step: as in `roi_align`.
      spatial_scales: per level, feature voxels per input voxel.

    Returns:
      [n, oz, oy, ox, c] pooled features.
    """
    if len(features_per_level) != len(spatial_scales) or not features_per_level:
        raise ConfigError(
            f"multilevel_roi_align: {len(features_per_level)} feature maps and "
            f"{len(spatial_scales)} spatial scales; expected one scale per map, at least one"
        )
    pooled = None
    for level, (features, scale) in enumerate(zip(features_per_level, spatial_scales, strict=True)):
        crop = roi_align(features, boxes, output_size, scale, sampling_ratio, boxes_per_step)
        chosen = (levels == level)[:, None, None, None, None]
        pooled = jnp.where(chosen, crop, 0 if pooled is None else pooled)
    return pooled
