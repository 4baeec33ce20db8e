"""Volumes of the neuron pipeline: training, tuning and test parts of EM stacks.

A part is a z range (and optional yx crop) of a CREMI-layout HDF5 file:
`volumes/raw` plus, where present, `volumes/labels/neuron_ids` (dense ground
truth) and `volumes/labels/oversegmentation` (a machine over-segmentation,
used as a baseline). fib25 trains and tests on two z ranges of one file;
SNEMI3D has a training and a test stack (`config.data.train_path`,
`config.data.test_path`).
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np

from synjax import configlib
from synjax.errors import ConfigError
from synjax.io import open_volume
from synjax.io.checks import require_finite

PARTS = ("train", "tune", "test")


@dataclasses.dataclass(frozen=True)
class NeuronVolume:
    """One part of an EM stack, in memory.

    Attributes:
      name: "train", "tune" or "test".
      raw: `[z, y, x]` uint8 EM intensities.
      neuron_ids: `[z, y, x]` uint64 ground truth, or None when the file has none.
      oversegmentation: `[z, y, x]` uint64 machine over-segmentation, or None.
      resolution: voxel size in nm, z-y-x.
    """

    name: str
    raw: np.ndarray
    neuron_ids: np.ndarray | None
    oversegmentation: np.ndarray | None
    resolution: tuple[float, float, float]


def _window(data, part: str) -> tuple[slice, slice, slice]:
    """z range of `part` and the yx crop, as slices."""
    key = "tune_z" if part == "tune" else f"{part}_z"
    z = data.get(key)
    if z is not None and (len(z) != 2 or z[0] >= z[1]):
        raise ConfigError(f"config.data.{key}={z}: expected (start, stop) with start < stop")
    crop = data.get("crop_yx")
    if crop is not None and len(crop) != 4:
        raise ConfigError(f"config.data.crop_yx={crop}: expected (y0, y1, x0, x1) or None")
    zs = slice(*z) if z is not None else slice(None)
    ys = slice(crop[0], crop[1]) if crop is not None else slice(None)
    xs = slice(crop[2], crop[3]) if crop is not None else slice(None)
    return zs, ys, xs


def _read(path: str, dataset: str, window) -> np.ndarray | None:
    """`dataset[window]` of the HDF5 file, or None when the file lacks it."""
    with h5py.File(path, "r") as f:
        if dataset not in f:
            return None
    return np.asarray(open_volume(f"{path}:/{dataset}")[window])


def load_part(config, part: str) -> NeuronVolume:
    """Reads part `part` ("train", "tune" or "test") named by `config.data`.

    "tune" is a z range of the training file: the watershed's sigma and h and
    the agglomeration threshold are chosen there, never on the test part.
    """
    if part not in PARTS:
        raise ConfigError(f"neuron data part {part!r}: expected one of {PARTS}")
    data = config.data
    key = "test_path" if part == "test" else "train_path"
    path = configlib.require_file(
        data[key],
        f"config.data.{key}",
        data.get("dataset", "neuron EM volume"),
        data.get("published_at", "its publisher"),
    )
    window = _window(data, part)
    raw_volume = open_volume(f"{path}:/{data.raw_key}")
    return NeuronVolume(
        name=part,
        raw=require_finite(np.asarray(raw_volume[window]), f"{path}:/{data.raw_key}"),
        neuron_ids=_read(path, data.labels_key, window),
        oversegmentation=_read(path, data.oversegmentation_key, window),
        resolution=tuple(float(r) for r in raw_volume.resolution),
    )


def inverted_intensity(raw: np.ndarray) -> np.ndarray:
    """Classical boundary map: EM intensity inverted (membranes dark -> high), in [0, 1].

    Args:
      raw: `[z, y, x]` integer or float intensities.

    Returns:
      float32 `[z, y, x]`, min-max scaled so that the darkest voxel is 1.
    """
    raw = raw.astype(np.float32)
    low, high = float(raw.min()), float(raw.max())
    scaled = (raw - low) / (high - low) if high > low else np.zeros_like(raw)
    return 1.0 - scaled
