"""The EM instance pipeline's data: the volume, its read grid and its y slabs.

One labelled EM volume (a CREMI-layout HDF5 file such as the VNC stack, or a
synthetic EM volume) is cut along y into three slabs: train, validation
(inside the training part, never trained on: every threshold is chosen
there) and test (scored once). The networks read the volume down-sampled by
`config.data.downsample` (mean of the raw, maximum of the cleft ids per
block); their instances are repeated back to the native grid, where every
metric is computed against the native labels.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import skimage.measure

from synjax.data.synthetic import make_em_volume
from synjax.errors import ConfigError, DataError
from synjax.io import open_volume
from synjax.io.cremi import cleft_instances

SPLITS = ("train", "validation", "test")


class EMVolume(NamedTuple):
    """The labelled volume on its native and read grids.

    Attributes:
      raw: [z, y, x] native raw image.
      labels: [z, y, x] native cleft instance ids (uint64, 0 background).
      resolution: native voxel size (z, y, x) in nm.
      factors: (z, y, x) down-sampling of the read grid.
      image: raw on the read grid (float32).
      read_labels: labels on the read grid.
    """

    raw: np.ndarray
    labels: np.ndarray
    resolution: tuple[float, float, float]
    factors: tuple[int, int, int]
    image: np.ndarray
    read_labels: np.ndarray


def downsample_image(raw: np.ndarray, factors) -> np.ndarray:
    """float32 mean of raw over `factors` blocks (the shape must divide evenly)."""
    factors = tuple(int(f) for f in factors)
    if factors == (1, 1, 1):
        return raw.astype(np.float32)
    image = skimage.measure.block_reduce(raw.astype(np.float32), factors, np.mean)
    return image.astype(np.float32)


def downsample(raw: np.ndarray, labels: np.ndarray, factors) -> tuple[np.ndarray, np.ndarray]:
    """(mean of raw, maximum of labels) over `factors` blocks; shapes must divide evenly."""
    factors = tuple(int(f) for f in factors)
    if any(s % f for s, f in zip(raw.shape, factors, strict=True)):
        raise ConfigError(
            f"config.data.downsample={factors}: does not divide the volume shape {raw.shape}"
        )
    image = downsample_image(raw, factors)
    if factors == (1, 1, 1):
        return image, labels
    read = skimage.measure.block_reduce(labels, factors, np.max)
    return image, read.astype(labels.dtype)


def upsample(labels: np.ndarray, factors) -> np.ndarray:
    """Read-grid labels repeated `factors` times along each axis (the native grid)."""
    for axis, factor in enumerate(factors):
        if factor > 1:
            labels = np.repeat(labels, int(factor), axis=axis)
    return labels


def load_volume(config) -> EMVolume:
    """The volume of `config.data` (file or synthetic), on both grids."""
    d = config.data
    if d.source == "file":
        raw_volume = open_volume(f"{d.path}:/{d.raw_key}")
        resolution = tuple(float(r) for r in raw_volume.resolution)
        raw = raw_volume.read()
        clefts = open_volume(f"{d.path}:/{d.clefts_key}").read()
        if clefts.shape != raw.shape:
            raise DataError(
                f"{d.path}: {d.clefts_key} {clefts.shape} and {d.raw_key} {raw.shape} differ"
            )
    elif d.source == "synthetic":
        s = d.synthetic
        volume = make_em_volume(
            shape=tuple(s.shape),
            resolution=tuple(s.resolution),
            seed=int(s.seed),
            n_synapses=int(s.n_synapses),
        )
        raw, clefts, resolution = volume.raw, volume.clefts, tuple(float(r) for r in s.resolution)
    else:
        raise ConfigError(f"config.data.source={d.source!r}; expected 'file' or 'synthetic'")
    labels = cleft_instances(clefts)
    factors = tuple(int(f) for f in d.downsample)
    image, read_labels = downsample(raw, labels, factors)
    return EMVolume(raw, labels, resolution, factors, image, read_labels)


def split_rows(config, volume: EMVolume, split: str) -> tuple[int, int]:
    """Native (y0, y1) of a split, checked against the volume and the read grid."""
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}; expected one of {SPLITS}")
    y0, y1 = (int(v) for v in config.data.splits[split])
    factor = volume.factors[1]
    if not 0 <= y0 < y1 <= volume.raw.shape[1] or y0 % factor or y1 % factor:
        raise ConfigError(
            f"config.data.splits.{split}=({y0}, {y1}): expected 0 <= y0 < y1 <= "
            f"{volume.raw.shape[1]}, multiples of config.data.downsample's y factor {factor}"
        )
    return y0, y1
