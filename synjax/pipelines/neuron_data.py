"""Volumes of the neuron pipeline: training, tuning and test parts of EM stacks.

A part is a z range (and optional yx crop) of a stack. Two layouts are read:

- one HDF5 file per stack in the CREMI layout (fib25): `volumes/raw` plus,
  where present, `volumes/labels/neuron_ids` (dense ground truth) and
  `volumes/labels/oversegmentation` (a machine over-segmentation, used as a
  baseline), the dataset names being `config.data.raw_key`, `labels_key` and
  `oversegmentation_key`;
- separate raw and label volumes of any format `synjax.io.open_volume` reads,
  e.g. SNEMI3D's TIFF stacks as distributed: `config.data.train_path` =
  `train-input.tif`, `config.data.train_labels_path` = `train-labels.tif`,
  `config.data.test_path` = `test-input.tif` and, if one has them,
  `config.data.test_labels_path`.

The training and tuning parts are z ranges of the training stack
(`train_path`); the test part is a z range of `test_path`. A
`*_labels_path` takes precedence over labels inside an HDF5 raw file.
`config.data.resolution` (nm, z-y-x), when set, replaces the voxel size the
raw file records (SNEMI3D's TIFF stacks record none).
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.geometry import voxel_size
from synjax.io import open_volume
from synjax.io.checks import require_file, require_finite
from synjax.io.volumes import parse_source

PARTS = ("train", "tune", "test")


@dataclasses.dataclass(frozen=True)
class NeuronVolume:
    """One part of an EM stack, in memory.

    Attributes:
      name: "train", "tune" or "test".
      raw: `[z, y, x]` EM intensities (uint8 for the published stacks).
      neuron_ids: `[z, y, x]` uint64 ground truth, or None when there is none
        (only possible for the test part).
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


def _stack(part: str) -> str:
    """The stack a part is cut from: "test" or "train" (the tuning part's too)."""
    return "test" if part == "test" else "train"


def _is_hdf5(path: str, key: str) -> bool:
    try:
        return parse_source(path)[0] == "hdf5"
    except DataError as error:
        raise DataError(f"config.data.{key}={path!r}: {error}") from None


def volume_source(path: str, dataset: str, key: str) -> str:
    """The `open_volume` source of config field `key`'s `path`.

    An HDF5 file named without a dataset is read at `dataset`; any other path
    (TIFF stack, zarr, N5, HDF5 `file:/dataset`) is opened as it is.
    """
    if _is_hdf5(path, key) and parse_source(path)[2] is None:
        return f"{path}:/{dataset}"
    return path


def _require(data, key: str) -> str:
    return require_file(
        data[key],
        f"config.data.{key}",
        data.get("dataset", "neuron EM volume"),
        data.get("published_at", "its publisher"),
    )


def _read_if_present(path: str, dataset: str, window, shape) -> np.ndarray | None:
    """`dataset[window]` of the HDF5 file, or None when the file lacks it."""
    with h5py.File(path, "r") as f:
        if dataset not in f:
            return None
    return _checked(open_volume(f"{path}:/{dataset}"), window, shape, f"{path}:/{dataset}")


def _checked(volume, window, shape, name: str) -> np.ndarray:
    """A label volume's `window` as uint64, after checking it matches the raw."""
    if tuple(volume.shape) != tuple(shape):
        raise DataError(f"{name}: shape {tuple(volume.shape)}, expected the raw's {tuple(shape)}")
    if not np.issubdtype(volume.dtype, np.integer):
        raise DataError(f"{name}: dtype {volume.dtype}, expected integer segment ids")
    return np.asarray(volume[window]).astype(np.uint64, copy=False)


def _labels(data, part: str, raw_path: str, window, shape) -> np.ndarray | None:
    """Dense labels of `part`: its stack's `*_labels_path`, else the HDF5 raw file's."""
    key = f"{_stack(part)}_labels_path"
    if data.get(key):
        path = _require(data, key)
        source = volume_source(path, data.get("labels_key", ""), key)
        return _checked(open_volume(source), window, shape, f"config.data.{key}={path!r}")
    if _is_hdf5(raw_path, f"{_stack(part)}_path") and data.get("labels_key"):
        return _read_if_present(raw_path.split(":/", 1)[0], data.labels_key, window, shape)
    return None


def missing_labels(config, part: str) -> str:
    """Why `part` has no labels (its `*_labels_path` is unset), for a one-line message."""
    data = config.data
    stack = _stack(part)
    path = data.get(f"{stack}_path")
    hdf5 = path and _is_hdf5(path, f"{stack}_path")
    inside = f" and {path} holds no {data.get('labels_key')}" if hdf5 else ""
    return f"config.data.{stack}_labels_path is not set{inside}"


def _resolution(data, raw_volume) -> tuple[float, float, float]:
    """`config.data.resolution` when set, else the raw file's voxel size (nm, z-y-x)."""
    resolution = data.get("resolution")
    if resolution is None:
        return tuple(float(r) for r in raw_volume.resolution)
    return tuple(float(r) for r in voxel_size(resolution, "config.data.resolution"))


def _check_misaligned(data, depth: int) -> None:
    """`config.data.misaligned_slices` must be z indices of the test part."""
    slices = data.get("misaligned_slices") or ()
    if any(not isinstance(z, int) or not 0 <= z < depth for z in slices):
        raise ConfigError(
            f"config.data.misaligned_slices={tuple(slices)}: expected z indices of the test "
            f"part, in [0, {depth})"
        )


def load_part(config, part: str) -> NeuronVolume:
    """Reads part `part` ("train", "tune" or "test") named by `config.data`.

    "tune" is a z range of the training stack: the watershed's sigma and h
    (and any agglomeration threshold) are chosen there, never on the test part.

    Raises:
      ConfigError: an unknown part, or a bad window, resolution or
        `misaligned_slices` field.
      DataError: a missing file, labels whose shape differs from the raw's,
        or a training or tuning part without labels.
    """
    if part not in PARTS:
        raise ConfigError(f"neuron data part {part!r}: expected one of {PARTS}")
    data = config.data
    key = f"{_stack(part)}_path"
    path = _require(data, key)
    window = _window(data, part)
    raw_source = volume_source(path, data.get("raw_key", ""), key)
    raw_volume = open_volume(raw_source)
    raw = require_finite(np.asarray(raw_volume[window]), raw_source)
    neuron_ids = _labels(data, part, path, window, raw_volume.shape)
    if neuron_ids is None and part != "test":
        raise DataError(
            f"no labels for the {part} part: {missing_labels(config, part)} "
            "(training and tuning need dense labels)"
        )
    overseg_key = data.get("oversegmentation_key")
    hdf5_file = path.split(":/", 1)[0] if _is_hdf5(path, key) else None
    if part == "test":
        _check_misaligned(data, raw.shape[0])
    return NeuronVolume(
        name=part,
        raw=raw,
        neuron_ids=neuron_ids,
        oversegmentation=(
            _read_if_present(hdf5_file, overseg_key, window, raw_volume.shape)
            if hdf5_file and overseg_key
            else None
        ),
        resolution=_resolution(data, raw_volume),
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
