"""HDF5 (h5py) and TIFF stack (tifffile) volumes.

HDF5 datasets carry `resolution` and `offset` attributes in nm, z-y-x, as in
CREMI files. TIFF stacks are read page by page (one page per z section), so a
region reads only the sections it spans; their voxel size comes from ImageJ
metadata (`spacing`, `unit`) and the X/YResolution tags when present.

Both keep an open file handle; pickling reopens the file from its path, so a
volume can be sent to Dask workers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np
import tifffile

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS, Box
from synjax.io.atomic import fsync_path
from synjax.io.tensorstore_volume import NM_PER_UNIT
from synjax.io.volume_base import DEFAULT_OFFSET, DEFAULT_RESOLUTION, Volume

# ImageJ writes these spellings of micrometre into its metadata.
IMAGEJ_UNIT_ALIASES = {"micron": "um", "microns": "um", "\\u00B5m": "um"}
# TIFF page axes for a grey page and for a page with channels (samples) last.
GREY_PAGE_AXES, CHANNEL_PAGE_AXES = "YX", "YXS"


def list_hdf5_datasets(file: h5py.File) -> list[str]:
    """Paths (with a leading '/') of every dataset in an open HDF5 file."""
    names: list[str] = []
    file.visititems(
        lambda name, item: names.append("/" + name) if isinstance(item, h5py.Dataset) else None
    )
    return names


def hdf5_error_line(error: OSError) -> str:
    """The first line of an h5py error (HDF5 appends lines of low-level detail)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def open_hdf5_file(file_path: str, mode: str = "r") -> h5py.File:
    """Opens an HDF5 file, turning h5py's `OSError` into a one-line `DataError`.

    Args:
      file_path: an existing file.
      mode: h5py's mode ("r", "r+", "a").

    Raises:
      DataError: the file is not HDF5, or is truncated or corrupt.
    """
    try:
        return h5py.File(file_path, mode)
    except OSError as error:
        raise DataError(
            f"{file_path}: not a readable HDF5 file (truncated or corrupt?): "
            f"{hdf5_error_line(error)}"
        ) from None


def _dataset_in(file: h5py.File, dataset: str, name: str) -> h5py.Dataset:
    item = file.get(dataset)
    if not isinstance(item, h5py.Dataset):
        listing = ", ".join(list_hdf5_datasets(file)) or "none"
        raise DataError(f"{name}: no dataset '{dataset}' in {file.filename} (datasets: {listing})")
    return item


class Hdf5Volume(Volume):
    """A dataset of an HDF5 file, read and written by hyperslab."""

    def __init__(self, file_path: str, dataset: str, mode: str = "r", ndim: int = SPATIAL_DIMS):
        name = f"{file_path}:{dataset}"
        if not os.path.isfile(file_path):
            raise DataError(f"volume not found: {file_path}")
        self._file = open_hdf5_file(file_path, mode)
        try:
            self._dataset = _dataset_in(self._file, dataset, name)
        except OSError as error:
            # The superblock was readable but the file's object headers are not.
            self._file.close()
            raise DataError(
                f"{name}: cannot be read (truncated or corrupt file?): {hdf5_error_line(error)}"
            ) from None
        if self._dataset.ndim != ndim:
            shape = self._dataset.shape
            self._file.close()
            raise DataError(f"{name} has shape {shape} ({len(shape)}D); expected {ndim}D [z, y, x]")
        self._args = (file_path, dataset, mode, ndim)
        attrs = self._dataset.attrs
        super().__init__(
            path=name,
            shape=self._dataset.shape,
            dtype=self._dataset.dtype,
            resolution=attrs.get("resolution", DEFAULT_RESOLUTION),
            offset=attrs.get("offset", DEFAULT_OFFSET),
            writable=mode != "r",
            chunks=self._dataset.chunks,
        )

    def _read(self, box: Box) -> np.ndarray:
        try:
            return self._dataset[box.slices()]
        except OSError as error:
            # e.g. a damaged compressed chunk: "filter returned failure during read".
            raise DataError(
                f"{self.path}: cannot read region {[list(b) for b in zip(*box, strict=True)]} "
                f"(truncated or corrupt file?): {hdf5_error_line(error)}"
            ) from None

    def _write(self, box: Box, block: np.ndarray) -> None:
        self._dataset[box.slices()] = block

    def flush(self) -> None:
        """Makes every write so far durable: HDF5's caches to the file, the file to the disk.

        h5py keeps written chunks and metadata in memory until a flush or
        close; the block-wise runner calls this before it records blocks as
        finished, so a killed run never lists a block whose data was lost.
        """
        if self.writable:
            self._file.flush()
            fsync_path(self._file.filename)

    def close(self) -> None:
        self._file.close()

    def __getstate__(self) -> tuple:
        self.flush()
        return self._args

    def __setstate__(self, args: tuple) -> None:
        self.__init__(*args)


def create_hdf5_volume(
    file_path: str,
    dataset: str,
    shape: Sequence[int],
    dtype: np.dtype,
    resolution: tuple[float, ...],
    offset: tuple[float, ...],
    chunks: Sequence[int] | None,
    fill_value: Any,
    overwrite: bool,
) -> Hdf5Volume:
    """Adds a chunked, gzip-compressed dataset to an HDF5 file (created if absent)."""
    name = f"{file_path}:{dataset}"
    try:
        file = h5py.File(file_path, "a")
    except OSError as error:
        raise DataError(f"cannot open {file_path} as HDF5 to add {dataset}: {error}") from None
    with file:
        if dataset in file:
            if not overwrite:
                raise DataError(f"{name} already exists; pass overwrite=True to replace it")
            del file[dataset]
        created = file.create_dataset(
            dataset,
            shape=tuple(shape),
            dtype=dtype,
            chunks=True if chunks is None else tuple(chunks),
            compression="gzip",
            fillvalue=dtype.type(fill_value),
        )
        created.attrs["resolution"] = np.asarray(resolution, np.float64)
        created.attrs["offset"] = np.asarray(offset, np.float64)
    return Hdf5Volume(file_path, dataset, mode="r+", ndim=len(shape))


def _tiff_resolution(tif: tifffile.TiffFile) -> tuple[float, float, float]:
    """Voxel size in nm from ImageJ metadata, or the default when unknown."""
    metadata = tif.imagej_metadata or {}
    unit = str(metadata.get("unit", ""))
    unit = IMAGEJ_UNIT_ALIASES.get(unit, unit)
    if unit not in NM_PER_UNIT:
        return DEFAULT_RESOLUTION
    scale = NM_PER_UNIT[unit]
    tags = tif.pages.first.tags
    sizes = []
    for tag in ("YResolution", "XResolution"):
        # The tags hold pixels per unit as a (numerator, denominator) rational.
        numerator, denominator = tags[tag].value if tag in tags else (1, 1)
        sizes.append(scale * denominator / numerator)
    return (scale * float(metadata.get("spacing", 1.0)), sizes[0], sizes[1])


class TiffVolume(Volume):
    """A TIFF stack, one page per z section (read only)."""

    def __init__(self, file_path: str, ndim: int = SPATIAL_DIMS):
        if not os.path.isfile(file_path):
            raise DataError(f"volume not found: {file_path}")
        try:
            self._tif = tifffile.TiffFile(file_path)
        except (tifffile.TiffFileError, OSError) as error:
            raise DataError(f"cannot open {file_path} as TIFF: {error}") from None
        self._args = (file_path, ndim)
        first = self._tif.pages.first
        if first.axes not in (GREY_PAGE_AXES, CHANNEL_PAGE_AXES):
            self._tif.close()
            raise DataError(
                f"{file_path}: pages with axes {first.axes} are not supported (YX or YXS)"
            )
        shape = (len(self._tif.pages), *first.shape)
        if len(shape) != ndim:
            self._tif.close()
            raise DataError(f"{file_path} has shape {shape} ({len(shape)}D); expected {ndim}D")
        super().__init__(
            path=file_path, shape=shape, dtype=first.dtype, resolution=_tiff_resolution(self._tif)
        )

    def _read(self, box: Box) -> np.ndarray:
        zs, *plane = box.slices()
        # Loops over sections only: each page is decoded whole, then cropped.
        pages = range(zs.start, zs.stop)
        return np.stack([self._tif.pages[z].asarray()[tuple(plane)] for z in pages])

    def close(self) -> None:
        self._tif.close()

    def __getstate__(self) -> tuple:
        return self._args

    def __setstate__(self, args: tuple) -> None:
        self.__init__(*args)
