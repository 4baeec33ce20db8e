"""Zarr (v2, v3), N5 and neuroglancer precomputed volumes through tensorstore.

Each store is presented as a z-y-x (optionally z-y-x-channel) view starting at
index 0, whatever the format's own axis order:

- zarr: stored z-y-x; `resolution` and `offset` (nm, z-y-x) in the array's
  attributes (`.zattrs` for v2, `attributes` of `zarr.json` for v3), the
  convention of CREMI-derived tools (funlib, daisy).
- N5: the format is column-major, so a Java/Fiji volume has dimensions
  x-y-z; tensorstore keeps that order and this module reverses it. The
  attributes `resolution`/`offset` (or n5-viewer's `pixelResolution`) are
  therefore x-y-z in the file, reversed on read and write.
- precomputed: the `info` file holds `resolution` (nm) and `voxel_offset`
  (voxels), both x-y-z; tensorstore exposes them as the domain's units and
  origin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorstore as ts

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS, Box
from synjax.io.volume_base import DEFAULT_RESOLUTION, Volume

# Metadata objects that mark an existing array or group at a path.
ZARR2_ARRAY, ZARR2_GROUP, ZARR3_NODE = ".zarray", ".zgroup", "zarr.json"
N5_ATTRIBUTES, PRECOMPUTED_INFO = "attributes.json", "info"
METADATA_KEYS = (ZARR2_ARRAY, ZARR2_GROUP, ZARR3_NODE, N5_ATTRIBUTES, PRECOMPUTED_INFO)

# Default chunk edge (voxels) of created volumes; 64^3 uint8 is 256 KiB.
DEFAULT_CHUNK_EDGE = 64
# Voxel block size of neuroglancer's compressed_segmentation encoding.
SEGMENTATION_BLOCK = [8, 8, 8]
# Nanometres per unit for the length units tensorstore may report.
# Micrometre appears with the micro sign (U+00B5) or the Greek mu (U+03BC).
NM_PER_UNIT = {"nm": 1.0, "um": 1e3, "\u00b5m": 1e3, "\u03bcm": 1e3, "mm": 1e6, "m": 1e9}
PRECOMPUTED_DTYPES = ("uint8", "uint16", "uint32", "uint64", "int32", "float32")
PRECOMPUTED_LABEL_DTYPES = ("uint32", "uint64")


class TensorStoreVolume(Volume):
    """A `Volume` over a tensorstore view already in z-y-x order from index 0."""

    def __init__(self, store: ts.TensorStore, **kwargs):
        super().__init__(shape=store.shape, dtype=store.dtype.numpy_dtype, **kwargs)
        self._store = store

    @property
    def store(self) -> ts.TensorStore:
        """The z-y-x tensorstore view, for callers that want async IO."""
        return self._store

    def _read(self, box: Box) -> np.ndarray:
        try:
            return self._store[box.slices()].read().result()
        except ValueError as error:
            # e.g. a damaged chunk: "Invalid blosc-compressed data".
            raise DataError(
                f"{self.path}: cannot read region {[list(b) for b in zip(*box, strict=True)]} "
                f"(truncated or corrupt chunk?): {_first_line(error)}"
            ) from None

    def _write(self, box: Box, block: np.ndarray) -> None:
        self._store[box.slices()].write(block).result()


def kvstore_for(location: str) -> dict | str:
    """Tensorstore kvstore for a local path or a URL (`gs://`, `s3://`, `http://`)."""
    if "://" in location:
        return location if location.endswith("/") else location + "/"
    return {"driver": "file", "path": os.path.abspath(location) + "/"}


def _is_local(kvstore: dict | str) -> bool:
    return isinstance(kvstore, dict) and kvstore.get("driver") == "file"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _read_json(kv: ts.KvStore, key: str) -> dict | None:
    """A JSON object stored under `key`, or None when the key is absent."""
    result = kv.read(key).result()
    if result.state != "value":
        return None
    return json.loads(bytes(result.value))


def _open_kvstore(kvstore: dict | str, name: str) -> ts.KvStore:
    try:
        return ts.KvStore.open(kvstore).result()
    except ValueError as error:
        raise DataError(f"cannot open storage of {name}: {_first_line(error)}") from None


def detect_zarr_driver(kvstore: dict | str, name: str) -> str:
    """Returns 'zarr' (v2) or 'zarr3' from the metadata present at the path."""
    kv = _open_kvstore(kvstore, name)
    if kv.read(ZARR2_ARRAY).result().state == "value":
        return "zarr"
    node = _read_json(kv, ZARR3_NODE)
    if node is not None and node.get("node_type") == "array":
        return "zarr3"
    if node is not None or kv.read(ZARR2_GROUP).result().state == "value":
        raise DataError(
            f"{name} is a zarr group, not an array; name an array inside it "
            f"(arrays here: {', '.join(_local_children(kvstore)) or 'none found'})"
        )
    raise DataError(f"{name} is not a zarr array (neither {ZARR2_ARRAY} nor {ZARR3_NODE} found)")


def _local_children(kvstore: dict | str) -> list[str]:
    """Names of the array folders directly inside a local group (for error messages)."""
    if not _is_local(kvstore):
        return []
    root = kvstore["path"]
    return sorted(
        child
        for child in os.listdir(root)
        if any(os.path.exists(os.path.join(root, child, key)) for key in METADATA_KEYS)
    )


def _resolution_from_units(view: ts.TensorStore) -> tuple[float, ...] | None:
    """Voxel size in nm from the spatial dimension units, if all three are lengths."""
    units = view.schema.dimension_units
    if units is None:
        return None
    sizes = []
    for unit in units[:SPATIAL_DIMS]:
        if unit is None or unit.base_unit not in NM_PER_UNIT:
            return None
        sizes.append(unit.multiplier * NM_PER_UNIT[unit.base_unit])
    return tuple(sizes)


def _zyx_view(store: ts.TensorStore, driver: str, ndim: int, name: str) -> ts.TensorStore:
    """Reorders and translates a store to z-y-x[-channel] from index 0."""
    if driver == "n5":
        view = store.T
    elif driver == "neuroglancer_precomputed":
        view = store[ts.d["z", "y", "x", "channel"].transpose[:]]
        channels = view.shape[-1]
        if ndim == SPATIAL_DIMS:
            if channels != 1:
                raise DataError(
                    f"{name} has {channels} channels; open it with ndim=4 for [z, y, x, channels]"
                )
            view = view[..., 0]
    else:
        view = store
    view = view[ts.d[:].translate_to[0]]
    if view.rank != ndim:
        raise DataError(
            f"{name} has shape {tuple(view.shape)} ({view.rank}D); expected a {ndim}D "
            f"{'[z, y, x]' if ndim == SPATIAL_DIMS else '[z, y, x, channels]'} volume"
            + ("; pass ndim=4 for a channel axis" if view.rank == SPATIAL_DIMS + 1 else "")
        )
    return view


def _origin_zyx(store: ts.TensorStore, driver: str) -> np.ndarray:
    """Index of the first voxel in the store's own domain, z-y-x."""
    origin = np.asarray(store.domain.origin, np.float64)
    if driver == "n5":
        return origin[::-1][:SPATIAL_DIMS]
    if driver == "neuroglancer_precomputed":
        by_label = dict(zip(store.domain.labels, origin, strict=True))
        return np.array([by_label["z"], by_label["y"], by_label["x"]])
    return origin[:SPATIAL_DIMS]


def _attribute_geometry(store: ts.TensorStore, driver: str, name: str):
    """(resolution, offset) stored as attributes (zarr, N5), each possibly None."""
    try:
        kv = store.kvstore
    except ValueError:
        return None, None
    if driver == "zarr":
        attrs = _read_json(kv, ".zattrs") or {}
    elif driver == "zarr3":
        attrs = (_read_json(kv, ZARR3_NODE) or {}).get("attributes", {})
    elif driver == "n5":
        attrs = _read_json(kv, N5_ATTRIBUTES) or {}
    else:
        return None, None
    resolution, offset = attrs.get("resolution"), attrs.get("offset")
    if driver == "n5":
        if resolution is None and "pixelResolution" in attrs:
            pixel = attrs["pixelResolution"]
            resolution = pixel.get("dimensions") if isinstance(pixel, dict) else pixel
        # N5 attributes follow the file's x-y-z order.
        resolution = None if resolution is None else list(resolution)[::-1]
        offset = None if offset is None else list(offset)[::-1]
    for key, value in (("resolution", resolution), ("offset", offset)):
        if value is not None and np.size(value) != SPATIAL_DIMS:
            raise DataError(f"{name}: attribute '{key}' must have 3 values, got {value!r}")
    return resolution, offset


def wrap_store(
    store: ts.TensorStore, driver: str, name: str, ndim: int, writable: bool
) -> TensorStoreVolume:
    """Wraps an opened store: z-y-x view plus resolution and offset in nm."""
    view = _zyx_view(store, driver, ndim, name)
    resolution, offset = _attribute_geometry(store, driver, name)
    if resolution is None:
        resolution = _resolution_from_units(view) or DEFAULT_RESOLUTION
    if offset is None:
        offset = _origin_zyx(store, driver) * np.asarray(resolution, np.float64)
    try:
        chunks = view.chunk_layout.read_chunk.shape
    except ValueError:
        chunks = None
    return TensorStoreVolume(
        view, path=name, resolution=resolution, offset=offset, writable=writable, chunks=chunks
    )


def open_store(spec: dict, name: str, writable: bool) -> ts.TensorStore:
    """`ts.open` with tensorstore's errors turned into one-line `DataError`s."""
    try:
        return ts.open(spec, read=True, write=writable).result()
    except ValueError as error:
        raise DataError(f"cannot open {name}: {_first_line(error)}") from None


def open_path_volume(location: str, fmt: str, name: str, mode: str, ndim: int) -> Volume:
    """Opens an existing zarr/N5/precomputed volume at a path or URL.

    Args:
      location: local path or URL of the array.
      fmt: 'zarr', 'n5' or 'precomputed'.
      name: printable name, for messages.
      mode: 'r' or 'r+'.
      ndim: expected number of dimensions (3, or 4 with channels last).
    """
    kvstore = kvstore_for(location)
    if _is_local(kvstore) and not os.path.exists(location):
        raise DataError(f"volume not found: {name}")
    if fmt == "zarr":
        driver = detect_zarr_driver(kvstore, name)
    else:
        driver = {"n5": "n5", "precomputed": "neuroglancer_precomputed"}[fmt]
    store = open_store({"driver": driver, "kvstore": kvstore}, name, mode == "r+")
    return wrap_store(store, driver, name, ndim, writable=mode == "r+")


def open_spec_volume(spec: dict, mode: str, ndim: int) -> Volume:
    """Opens a tensorstore spec (dict); writable if mode is 'r+' or it creates."""
    driver = spec.get("driver")
    if not isinstance(driver, str):
        raise DataError(f"tensorstore spec has no 'driver': {spec!r}")
    writable = mode == "r+" or bool(spec.get("create"))
    store = open_store(spec, f"tensorstore spec ({driver})", writable)
    try:
        where = store.kvstore.url
    except ValueError:
        where = "?"
    return wrap_store(store, driver, f"tensorstore {driver} at {where}", ndim, writable)


def _default_chunks(shape: Sequence[int]) -> list[int]:
    spatial = [min(DEFAULT_CHUNK_EDGE, max(1, s)) for s in shape[:SPATIAL_DIMS]]
    return spatial + list(shape[SPATIAL_DIMS:])


def _creation_spec(
    fmt: str,
    kvstore: dict | str,
    shape: list[int],
    dtype: np.dtype,
    resolution: tuple[float, ...],
    offset: tuple[float, ...],
    chunks: list[int],
    fill_value: Any,
    name: str,
) -> dict:
    """The tensorstore spec that creates a new volume (geometry included)."""
    if fmt == "zarr":
        return {
            "driver": "zarr",
            "kvstore": kvstore,
            "metadata": {
                "shape": shape,
                "chunks": chunks,
                "dtype": dtype.str,
                "fill_value": dtype.type(fill_value).item(),
            },
        }
    if fill_value != 0:
        raise DataError(f"{name}: {fmt} volumes always read missing chunks as 0 (fill_value=0)")
    if fmt == "n5":
        return {
            "driver": "n5",
            "kvstore": kvstore,
            "metadata": {
                "dimensions": shape[::-1],
                "blockSize": chunks[::-1],
                "dataType": dtype.name,
                "compression": {"type": "gzip"},
                "resolution": list(resolution)[::-1],
                "offset": list(offset)[::-1],
                "pixelResolution": {"dimensions": list(resolution)[::-1], "unit": "nm"},
            },
        }
    if dtype.name not in PRECOMPUTED_DTYPES:
        raise DataError(
            f"{name}: precomputed cannot store {dtype}; use one of {', '.join(PRECOMPUTED_DTYPES)}"
        )
    voxel_offset = np.asarray(offset) / np.asarray(resolution)
    if not np.allclose(voxel_offset, np.round(voxel_offset)):
        raise DataError(
            f"{name}: precomputed needs an offset {offset} that is a whole number of voxels "
            f"of resolution {resolution}"
        )
    is_label = dtype.name in PRECOMPUTED_LABEL_DTYPES
    scale = {
        "size": shape[:SPATIAL_DIMS][::-1],
        "resolution": list(resolution)[::-1],
        "voxel_offset": [int(v) for v in np.round(voxel_offset)[::-1]],
        "chunk_size": chunks[:SPATIAL_DIMS][::-1],
        "encoding": "compressed_segmentation" if is_label else "raw",
    }
    if is_label:
        scale["compressed_segmentation_block_size"] = SEGMENTATION_BLOCK
    num_channels = shape[SPATIAL_DIMS] if len(shape) > SPATIAL_DIMS else 1
    return {
        "driver": "neuroglancer_precomputed",
        "kvstore": kvstore,
        "multiscale_metadata": {
            "type": "segmentation" if is_label else "image",
            "data_type": dtype.name,
            "num_channels": num_channels,
        },
        "scale_metadata": scale,
    }


def _check_destination(kvstore: dict | str, name: str, overwrite: bool) -> bool:
    """Checks that a volume may be created; returns whether one must be deleted first."""
    kv = _open_kvstore(kvstore, name)
    holds_volume = any(kv.read(key).result().state == "value" for key in METADATA_KEYS)
    if _is_local(kvstore):
        path = kvstore["path"].rstrip("/")
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path) and not holds_volume):
            raise DataError(f"{name} exists and is not a volume; refusing to replace it")
    if holds_volume and not overwrite:
        raise DataError(f"{name} already exists; pass overwrite=True to replace it")
    return holds_volume


def create_path_volume(
    location: str,
    fmt: str,
    name: str,
    shape: Sequence[int],
    dtype: np.dtype,
    resolution: tuple[float, ...],
    offset: tuple[float, ...],
    chunks: Sequence[int] | None,
    fill_value: Any,
    overwrite: bool,
) -> Volume:
    """Creates an empty chunked zarr v2 / N5 / precomputed volume (see `create_volume`)."""
    kvstore = kvstore_for(location)
    shape = [int(s) for s in shape]
    chunks = _default_chunks(shape) if chunks is None else [int(c) for c in chunks]
    if len(chunks) != len(shape) or min(chunks) < 1:
        raise DataError(f"{name}: chunks {tuple(chunks)} must be positive, one per axis of {shape}")
    spec = _creation_spec(fmt, kvstore, shape, dtype, resolution, offset, chunks, fill_value, name)
    spec["create"] = True
    spec["delete_existing"] = _check_destination(kvstore, name, overwrite)
    store = open_store(spec, name, writable=True)
    if fmt == "zarr":
        # zarr v2 keeps user attributes beside the array metadata, in `.zattrs`.
        attrs = {"resolution": list(resolution), "offset": list(offset)}
        store.kvstore.write(".zattrs", json.dumps(attrs)).result()
    driver = {"zarr": "zarr", "n5": "n5", "precomputed": "neuroglancer_precomputed"}[fmt]
    return wrap_store(store, driver, name, len(shape), writable=True)
