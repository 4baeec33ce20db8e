"""Opening and creating volumes in any supported format behind one `Volume` type.

Sources:

- `x.zarr` (zarr v2 or v3, detected from the metadata; an array inside a
  group is `x.zarr/raw`), `x.n5`: tensorstore.
- `precomputed://path` (or `precomputed://gs://bucket/path`): neuroglancer
  precomputed through tensorstore.
- `x.h5:/volumes/raw` (also `.hdf`, `.hdf5`): h5py; the dataset is required.
- `x.tif` / `x.tiff`: a 3D stack through tifffile (read only).
- a tensorstore spec dict, e.g. `{"driver": "zarr", "kvstore": {"driver":
  "memory"}, ...}`.

Zarr and N5 paths may also be URLs (`gs://`, `s3://`, `http://`), which
tensorstore reads directly.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS, number_triple
from synjax.io.file_volumes import (
    Hdf5Volume,
    TiffVolume,
    create_hdf5_volume,
    list_hdf5_datasets,
    open_hdf5_file,
)
from synjax.io.tensorstore_volume import create_path_volume, open_path_volume, open_spec_volume
from synjax.io.volume_base import Volume

PRECOMPUTED_PREFIX = "precomputed://"
MODES = ("r", "r+")
# Dtypes that `create_volume` writes: what EM images, predictions and labels need.
CREATE_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int32", "int64", "float32", "float64")

_HDF5_SOURCE = re.compile(r"^(?P<file>.+\.(?:h5|hdf5|hdf))(?::(?P<dataset>.*))?$", re.IGNORECASE)
_CONTAINER_SUFFIXES = {".zarr": "zarr", ".n5": "n5"}
_TIFF_SUFFIXES = (".tif", ".tiff")
_SUPPORTED = (
    "x.zarr, x.n5, precomputed://path, x.h5:/dataset (.hdf, .hdf5), x.tif (.tiff) "
    "or a tensorstore spec dict"
)


def parse_source(source: str | os.PathLike) -> tuple[str, str, str | None]:
    """Splits a source string into (format, location, HDF5 dataset or None).

    Formats: 'zarr', 'n5', 'precomputed', 'hdf5', 'tiff'. Zarr and N5 are
    recognised by any path component ending in `.zarr` / `.n5`, so arrays
    inside a container (`x.zarr/volumes/raw`) are found too.
    """
    text = os.fspath(source)
    if text.startswith(PRECOMPUTED_PREFIX):
        return "precomputed", text[len(PRECOMPUTED_PREFIX) :].rstrip("/"), None
    match = _HDF5_SOURCE.match(text)
    if match:
        dataset = match.group("dataset")
        if dataset is not None and not dataset.startswith("/"):
            dataset = "/" + dataset
        return "hdf5", match.group("file"), dataset
    stripped = text.rstrip("/")
    if stripped.lower().endswith(_TIFF_SUFFIXES):
        return "tiff", stripped, None
    for component in stripped.split("/"):
        for suffix, fmt in _CONTAINER_SUFFIXES.items():
            if component.lower().endswith(suffix):
                return fmt, stripped, None
    raise DataError(f"unknown volume format: {text} (supported: {_SUPPORTED})")


def _hdf5_dataset_required(file_path: str) -> DataError:
    """The error for an HDF5 source without ':/dataset', listing what the file holds."""
    if not os.path.isfile(file_path):
        return DataError(f"volume not found: {file_path}")
    with open_hdf5_file(file_path) as file:
        listing = ", ".join(list_hdf5_datasets(file)) or "none"
    return DataError(
        f"{file_path}: name the dataset as {file_path}:/path/to/dataset (datasets: {listing})"
    )


def _check_ndim(ndim: int) -> None:
    if ndim not in (SPATIAL_DIMS, SPATIAL_DIMS + 1):
        raise DataError(f"ndim={ndim}: volumes are 3D [z, y, x] or 4D [z, y, x, channels]")


def open_volume(
    source: str | os.PathLike | dict, mode: str = "r", ndim: int = SPATIAL_DIMS
) -> Volume:
    """Opens an existing volume for region reads (and writes with mode='r+').

    Args:
      source: a path or URL in one of the forms in this module's docstring, or
        a tensorstore spec dict (writable when it has `"create": True`).
      mode: 'r' (read only) or 'r+' (read and write; not for TIFF).
      ndim: 3 for `[z, y, x]`; 4 for `[z, y, x, channels]`.

    Returns:
      The `Volume`; `vol[z0:z1, y0:y1, x0:x1]` reads only that region.

    Raises:
      DataError: missing file or dataset, unknown format, or a volume that
        does not have `ndim` dimensions.
    """
    if mode not in MODES:
        raise DataError(f"mode={mode!r} for {source}: use one of {MODES}")
    _check_ndim(ndim)
    if isinstance(source, dict):
        return open_spec_volume(source, mode, ndim)
    fmt, location, dataset = parse_source(source)
    if fmt == "hdf5":
        if dataset is None:
            raise _hdf5_dataset_required(location)
        return Hdf5Volume(location, dataset, mode, ndim)
    if fmt == "tiff":
        if mode != "r":
            raise DataError(f"{location}: TIFF stacks are read only; write zarr, N5 or precomputed")
        return TiffVolume(location, ndim)
    return open_path_volume(location, fmt, os.fspath(source), mode, ndim)


def create_volume(
    dest: str | os.PathLike,
    shape: Sequence[int],
    dtype: Any,
    resolution: Sequence[float] = (1.0, 1.0, 1.0),
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    chunks: Sequence[int] | None = None,
    fill_value: float = 0,
    overwrite: bool = False,
) -> Volume:
    """Creates an empty chunked volume to be written block by block.

    Nothing of the size of the volume is held in memory: chunks are written as
    regions are assigned, and unwritten chunks read as `fill_value`. Reopen a
    partly written output with `open_volume(dest, mode="r+")` to resume.

    Args:
      dest: `x.zarr` (zarr v2), `x.n5`, `precomputed://path`, or
        `x.h5:/dataset` (a gzip-chunked dataset, added to the file).
      shape: `[z, y, x]` or `[z, y, x, channels]`.
      dtype: one of `CREATE_DTYPES` (precomputed: not int64 / float64).
      resolution: voxel size in nm, z-y-x, stored with the volume.
      offset: world position in nm (z-y-x) of voxel (0, 0, 0), stored with the
        volume (precomputed: a whole number of voxels).
      chunks: chunk shape; default 64 per spatial axis (capped by the shape).
      fill_value: value of never-written voxels (must be 0 for N5 and
        precomputed, which have no fill value).
      overwrite: replace an existing volume at `dest`; otherwise that is an
        error.

    Returns:
      The writable `Volume`.
    """
    name = os.fspath(dest)
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (SPATIAL_DIMS, SPATIAL_DIMS + 1) or min(shape) < 1:
        raise DataError(f"{name}: shape {shape} must be [z, y, x] or [z, y, x, channels], all > 0")
    dtype = np.dtype(dtype)
    if dtype.name not in CREATE_DTYPES:
        raise DataError(f"{name}: unsupported dtype {dtype}; use one of {', '.join(CREATE_DTYPES)}")
    resolution = number_triple(resolution, f"{name} resolution", DataError)
    offset = number_triple(offset, f"{name} offset", DataError)
    if min(resolution) <= 0:
        raise DataError(f"{name}: resolution {resolution} must be positive")
    fmt, location, dataset = parse_source(name)
    if fmt == "tiff":
        raise DataError(f"{name}: cannot create TIFF volumes; write zarr, N5 or precomputed")
    if fmt == "hdf5":
        if not dataset or dataset == "/":
            raise DataError(f"{name}: name the dataset to create, as {location}:/path/to/dataset")
        return create_hdf5_volume(
            location, dataset, shape, dtype, resolution, offset, chunks, fill_value, overwrite
        )
    return create_path_volume(
        location, fmt, name, shape, dtype, resolution, offset, chunks, fill_value, overwrite
    )
