"""DeepEM3D's slice-wise (2.5D) prediction over whole volumes, and its max ensemble.

`predict_slices` slides along z one slice at a time: output slice z comes from
the `s`-slice stack centred on z (z - s//2 ... z + s//2), reflected at the
volume's ends (slice -1 reads slice 1). Slices are read from the volume a
batch at a time, so any object with `.shape` and numpy slicing along z (numpy
array, h5py dataset, tensorstore-backed `Volume`) works without being loaded
whole. In yx, each slice is reflect-padded (`pad_end`) to a multiple of the
network's total stride, which the caller passes (this module knows no
network), and, for the 16-fold augmentation, to a square; slices larger than
`max_tile` are cut into overlapping tiles whose centres are kept (each pixel
is written by exactly one tile, cut at the middle of each overlap).

`ensemble_max` combines several models' boundary maps by voxel-wise maximum,
with the paper's option of letting a model contribute only on chosen slices:
DeepEM3D's SNEMI3D ensemble takes, on every slice, the maximum of its three
2D nets (1 input slice), and on the misaligned slices also that of its
5-slice 3D-fusion net.

`predict_orientations` runs a slice-wise predictor along other axes too, for
isotropic volumes (FIB-SEM), and keeps the voxel-wise maximum: a membrane
nearly parallel to the z-slices is a smear in a yx slice but a sharp line in
a zx or zy slice, so the slices cut across it find it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import numpy as np

from synjax.data.intensity import DTYPE_RANGE, IntensityNormalization, normalize_intensity
from synjax.errors import ConfigError, DataError
from synjax.geometry import reflect_indices
from synjax.inference.tta import TRANSFORMS, Transform, make_tta_fn
from synjax.report.progress import progress_bar

DEFAULT_BATCH_SIZE = 4
DEFAULT_TILE_OVERLAP = 64
# Slicing axis -> axis permutation that brings it first; each swaps two axes,
# so it is its own inverse.
ORIENTATIONS = {"z": (0, 1, 2), "y": (1, 0, 2), "x": (2, 1, 0)}


def pad_end(x: np.ndarray, sizes: Sequence[int], axes: Sequence[int]) -> np.ndarray:
    """Pads `axes` of `x` at their end up to `sizes`, by reflection.

    The padding goes after the data, so `x[..., :n, ...]` on each padded axis
    gives it back. An axis of one sample cannot be reflected: it is repeated.

    Args:
      x: array, e.g. a stack of slices `[batch, s, y, x]`.
      sizes: the size of each of `axes` after padding (>= its size now).
      axes: the axes to pad.

    Returns:
      The padded array (`x` itself when nothing is padded).
    """
    for a, n in zip(axes, sizes, strict=True):
        if n == x.shape[a]:
            continue
        pad = [(0, 0)] * x.ndim
        pad[a] = (0, n - x.shape[a])
        # np.pad pads axis after axis too: one call per axis gives the same array.
        x = np.pad(x, pad, mode="reflect" if x.shape[a] > 1 else "edge")
    return x


def _tiles(size: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """Tiles of length `tile` covering [0, size): (start, keep_from, keep_to).

    Consecutive tiles overlap by at least `overlap`; the kept ranges
    partition [0, size), cut at the middle of each overlap.
    """
    if size <= tile:
        return [(0, 0, size)]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    cuts = [0] + [(starts[i] + starts[i - 1] + tile) // 2 for i in range(1, len(starts))]
    cuts.append(size)
    return [(s, cuts[i], cuts[i + 1]) for i, s in enumerate(starts)]


def predict_slices(
    apply_fn: Callable[[jax.Array], jax.Array],
    volume,
    slices: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = True,
    progress: bool = True,
    *,
    stride: int,
    transforms: Sequence[Transform] = TRANSFORMS,
    max_tile: int | None = None,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    channel: int = -1,
    out=None,
    intensity: IntensityNormalization = DTYPE_RANGE,
    name: str = "raw",
):
    """Boundary probability of every slice of `volume`.

    Args:
      apply_fn: `[n, s, y, x, 1] float32 -> [n, y, x, c]` probabilities for the
        centre slice (e.g. `synjax.models.deepem3d.make_apply_fn`); traceable.
      volume: `[z, y, x]` array-like with numpy slicing along z, raw
        intensities that `intensity` maps to the network's input.
      slices: s, the odd number of slices per stack.
      batch_size: output slices per call (the last batch is padded to it so
        one compilation serves all).
      tta: average over `transforms` (`synjax.inference.tta`).
      progress: show a tqdm bar, one step per batch of slices.
      transforms: the TTA transforms (default all 16; with rotations by 90/270
        degrees each tile is padded to a square).
      stride: the network's total stride (pooling factor, e.g.
        `synjax.models.deepem3d.TOTAL_STRIDE`): y and x are reflect-padded to
        a multiple of it.
      max_tile: tile size in y and x (a multiple of `stride`); slices
        larger than this are tiled. None: whole slices.
      tile_overlap: minimum overlap of neighbouring tiles, in pixels.
      channel: output channel that holds the boundary probability.
      out: optional `[z, y, x]` float32 destination supporting
        `out[z0:z1] = array` (e.g. a zarr/tensorstore array), for outputs too
        big for memory.
      intensity: the model's intensity normalisation (`synjax.data.intensity`,
        saved with its checkpoint), applied to each batch of slices as it is
        read; default: the dtype's range (uint8 / 255).
      name: the volume's name for errors.

    Returns:
      float32 `[z, y, x]` boundary probability (`out` itself when given).
    """
    shape = tuple(volume.shape)
    if len(shape) != 3:
        raise DataError(f"predict_slices volume shape {shape}: expected [z, y, x]")
    if slices < 1 or slices % 2 == 0:
        raise ConfigError(f"predict_slices slices={slices}: expected an odd number >= 1")
    if batch_size < 1:
        raise ConfigError(f"predict_slices batch_size={batch_size}: expected >= 1")
    if max_tile is not None and (max_tile <= tile_overlap or max_tile % stride):
        raise ConfigError(
            f"predict_slices max_tile={max_tile}: expected a multiple of {stride} "
            f"larger than tile_overlap={tile_overlap}"
        )
    nz = shape[0]
    predict_stacks = SlicePredictor(
        apply_fn,
        shape[1:],
        stride=stride,
        tta=tta,
        transforms=transforms,
        max_tile=max_tile,
        tile_overlap=tile_overlap,
        channel=channel,
    )
    result = np.zeros(shape, np.float32) if out is None else out
    offsets = np.arange(slices) - slices // 2
    starts = range(0, nz, batch_size)
    for z0 in progress_bar(starts, desc="predict slices", unit="batch", disable=not progress):
        z1 = min(z0 + batch_size, nz)
        # Repeat the last slice so that every batch has the compiled shape.
        zs = np.minimum(np.arange(z0, z0 + batch_size), z1 - 1)
        src = reflect_indices(zs[:, None] + offsets[None, :], nz)
        lo, hi = int(src.min()), int(src.max()) + 1
        chunk = normalize_intensity(np.asarray(volume[lo:hi]), intensity, name)
        result[z0:z1] = predict_stacks(chunk[src - lo])[: z1 - z0]
    return result


class SlicePredictor:
    """Boundary probability of the centre slices of `[n, s, y, x]` stacks: padding and tiles.

    Each stack is reflect-padded in y and x to a multiple of `stride` (and to a
    square for TTA rotations), cut into tiles when larger than `max_tile`, and
    passed through `apply_fn` (jitted, or averaged over `transforms`); the
    kept centre of each tile is pasted back. The computation of a slice
    depends on its own stack only, so any batching gives the same result.

    Args:
      apply_fn: `[n, s, y, x, 1] float32 -> [n, y, x, c]`; traceable.
      shape_yx: `(y, x)` of the slices.
      stride, tta, transforms, max_tile, tile_overlap, channel: as in
        `predict_slices`.
    """

    def __init__(
        self,
        apply_fn: Callable[[jax.Array], jax.Array],
        shape_yx: Sequence[int],
        *,
        stride: int,
        tta: bool = True,
        transforms: Sequence[Transform] = TRANSFORMS,
        max_tile: int | None = None,
        tile_overlap: int = DEFAULT_TILE_OVERLAP,
        channel: int = -1,
    ):
        self.ny, self.nx = (int(n) for n in shape_yx)
        self.padded = [math.ceil(n / stride) * stride for n in (self.ny, self.nx)]
        self.tile = [min(n, max_tile) if max_tile else n for n in self.padded]
        self.tiles_y, self.tiles_x = (
            _tiles(n, t, tile_overlap) for n, t in zip(self.padded, self.tile, strict=True)
        )
        transforms = tuple(transforms)
        needs_square = tta and any(t.quarter_turns % 2 for t in transforms)
        self.model_yx = [max(self.tile)] * 2 if needs_square else self.tile
        self.fn = make_tta_fn(apply_fn, transforms) if tta else jax.jit(apply_fn)
        self.channel = channel

    def __call__(self, stacks: np.ndarray) -> np.ndarray:
        """float32 `[n, y, x]` probability of the centre slices of `[n, s, y, x]` float stacks."""
        n, (ny, nx) = len(stacks), (self.ny, self.nx)
        stack = pad_end(stacks, self.padded, axes=(2, 3))  # [n, s, Y, X]
        prob = np.empty((n, ny, nx), np.float32)
        for y0, ky0, ky1 in self.tiles_y:
            for x0, kx0, kx1 in self.tiles_x:
                part = stack[:, :, y0 : y0 + self.tile[0], x0 : x0 + self.tile[1]]
                part = pad_end(part, self.model_yx, axes=(2, 3))[..., None]
                pred = np.asarray(self.fn(part))[..., self.channel]
                ky1c, kx1c = min(ky1, ny), min(kx1, nx)
                if ky0 >= ky1c or kx0 >= kx1c:
                    continue  # a tile that only holds padding
                prob[:, ky0:ky1c, kx0:kx1c] = pred[:, ky0 - y0 : ky1c - y0, kx0 - x0 : kx1c - x0]
        return prob


def ensemble_max(
    predictions: Sequence[np.ndarray], slice_masks: Sequence[np.ndarray | None] | None = None
) -> np.ndarray:
    """Voxel-wise maximum of several models' boundary maps.

    Args:
      predictions: float `[z, y, x]` volumes of one shape.
      slice_masks: per model, bool `[z]` marking the slices on which it
        contributes, or None for all slices (the default for every model).

    Returns:
      float32 `[z, y, x]`: on each slice, the maximum over the models that
      contribute there. Every slice needs at least one contributing model.
    """
    if not predictions:
        raise DataError("ensemble_max: expected at least one prediction")
    if slice_masks is None:
        slice_masks = [None] * len(predictions)
    if len(slice_masks) != len(predictions):
        raise DataError(
            f"ensemble_max: {len(slice_masks)} slice masks for {len(predictions)} predictions"
        )
    shape = np.shape(predictions[0])
    result = np.full(shape, -np.inf, np.float32)
    covered = np.zeros(shape[0], bool)
    for i, (pred, mask) in enumerate(zip(predictions, slice_masks, strict=True)):
        if np.shape(pred) != shape:
            raise DataError(
                f"ensemble_max: prediction {i} shape {np.shape(pred)}, expected {shape}"
            )
        mask = np.ones(shape[0], bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != (shape[0],):
            raise DataError(
                f"ensemble_max: slice mask {i} shape {mask.shape}, expected ({shape[0]},)"
            )
        result[mask] = np.maximum(result[mask], np.asarray(pred)[mask])
        covered |= mask
    if not covered.all():
        missing = np.flatnonzero(~covered)
        raise DataError(f"ensemble_max: no model contributes on slices {missing.tolist()}")
    return result


def predict_orientations(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    volume: np.ndarray,
    orientations: Sequence[str] = ("z",),
) -> np.ndarray:
    """Voxel-wise maximum of a slice-wise predictor run along several axes.

    Args:
      predict_fn: maps a `[d0, d1, d2]` volume to a map of the same shape,
        slicing along its first axis (e.g. `predict_slices` of a model).
      volume: `[z, y, x]` array.
      orientations: slicing axes among "z", "y", "x" ("z" alone: plain
        `predict_fn(volume)`).

    Returns:
      float32 `[z, y, x]`, the maximum over the orientations, each mapped back.

    Raises:
      ConfigError: for an unknown or repeated orientation, or none.
    """
    unknown = [name for name in orientations if name not in ORIENTATIONS]
    if not orientations or unknown or len(set(orientations)) != len(orientations):
        raise ConfigError(
            f"orientations={tuple(orientations)}: expected distinct axes among "
            f"{tuple(ORIENTATIONS)}, at least one"
        )
    volume = np.asarray(volume)
    result = None
    for name in orientations:
        perm = ORIENTATIONS[name]
        pred = np.transpose(predict_fn(np.ascontiguousarray(np.transpose(volume, perm))), perm)
        result = pred if result is None else np.maximum(result, pred)
    return np.asarray(result, np.float32)
