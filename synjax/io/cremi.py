"""CREMI HDF5 files: read, write (atomically), clefts, partner tables and synapses.

The layout follows the CREMI challenge's own reader/writer
(cremi/cremi_python, `cremi/io/CremiFile.py`):

- `volumes/raw` (uint8), `volumes/labels/neuron_ids` (uint64),
  `volumes/labels/clefts` (uint64, background 0xFFFFFFFFFFFFFFFF), and any
  other `volumes/labels/<name>`; each with `resolution` and (CREMI writes it
  only when non-zero) `offset` attributes, float64 nm, z-y-x.
- `annotations/ids` (uint64), `annotations/types` (variable-length UTF-8
  strings `presynaptic_site` / `postsynaptic_site`), `annotations/locations`
  (float64 nm, z-y-x, relative to the `offset` attribute of the
  `annotations` group), `annotations/presynaptic_site/partners` ([m, 2]
  uint64 pre id, post id).
- the root attribute `file_format` = "0.2".

`CremiVolume.annotations.locations` are in the world frame (annotation offset
added), the frame of the volumes' `offset`. `synapse_summary` reads the
ground truth of any such volume, file or synthetic, as one record per synapse.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import h5py
import numpy as np
from scipy.spatial import cKDTree

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS, Box, number_triple
from synjax.io.atomic import atomic_path
from synjax.io.cremi_volume import (
    CREMI_BACKGROUND,
    POSTSYNAPTIC_SITE,
    PRESYNAPTIC_SITE,
    Annotations,
    CremiVolume,
)
from synjax.io.file_volumes import hdf5_error_line, list_hdf5_datasets, open_hdf5_file
from synjax.io.voxels import inside_volume, segment_ids_at, world_to_voxel

RAW = "volumes/raw"
LABELS = "volumes/labels"
NEURON_IDS, CLEFTS = "neuron_ids", "clefts"
ANNOTATIONS = "annotations"
PARTNERS = "annotations/presynaptic_site/partners"
FILE_FORMAT = "0.2"
SITE_TYPES = (PRESYNAPTIC_SITE, POSTSYNAPTIC_SITE)


def _geometry(dataset: h5py.Dataset, path: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    where = f"{path}:{dataset.name}"
    if "resolution" not in dataset.attrs:
        raise DataError(f"{where} has no 'resolution' attribute")
    resolution = number_triple(dataset.attrs["resolution"], f"{where} resolution", DataError)
    return resolution, number_triple(
        dataset.attrs.get("offset", (0.0, 0.0, 0.0)), f"{where} offset", DataError
    )


def _read_annotations(file: h5py.File, path: str) -> Annotations | None:
    if ANNOTATIONS not in file:
        return None
    group = file[ANNOTATIONS]
    for key in ("ids", "types", "locations"):
        if key not in group:
            raise DataError(f"{path}: {ANNOTATIONS}/{key} is missing")
    origin = number_triple(
        group.attrs.get("offset", (0.0, 0.0, 0.0)), f"{path}:/annotations offset", DataError
    )
    ids = group["ids"][()].astype(np.uint64)
    locations = group["locations"][()].astype(np.float64).reshape(-1, SPATIAL_DIMS)
    types = np.array(group["types"].asstr()[()], dtype=object).reshape(-1)
    if not len(ids) == len(locations) == len(types):
        raise DataError(
            f"{path}: annotations have {len(ids)} ids, {len(locations)} locations, "
            f"{len(types)} types"
        )
    partners = np.zeros((0, 2), np.uint64)
    if PARTNERS in file:
        partners = file[PARTNERS][()].astype(np.uint64).reshape(-1, 2)
    return Annotations(ids=ids, locations=locations + origin, types=types, partners=partners)


def read_cremi(path: str | os.PathLike, require_raw: bool = True) -> CremiVolume:
    """Reads a CREMI file entirely into memory, values exactly as stored.

    For regions of large files, use `open_volume("x.h5:/volumes/raw")`.

    Args:
      path: the HDF5 file.
      require_raw: whether `volumes/raw` must exist; a submission (labels or
        annotations only) is read with False, and takes its resolution from
        its first label volume.

    Returns:
      The `CremiVolume`; `annotations` is None when the file has none.

    Raises:
      DataError: missing, truncated or corrupt file, missing raw (the message
        lists the datasets), missing `resolution`, or labels whose shape,
        resolution or offset differ from raw's.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"CREMI file not found: {path}")
    with open_hdf5_file(path) as file:
        try:
            return _read_open_cremi(file, path, require_raw)
        except OSError as error:
            # Opened, but a dataset or its metadata cannot be read back.
            raise DataError(
                f"{path}: not a readable HDF5 file (truncated or corrupt?): "
                f"{hdf5_error_line(error)}"
            ) from None


def _read_open_cremi(file: h5py.File, path: str, require_raw: bool) -> CremiVolume:
    """`read_cremi` of an open file."""
    labels_group = file.get(LABELS)
    labels = {}
    if isinstance(labels_group, h5py.Group):
        labels = {k: v for k, v in labels_group.items() if isinstance(v, h5py.Dataset)}
    volumes = ([file[RAW]] if RAW in file else []) + list(labels.values())
    annotations = _read_annotations(file, path)
    if RAW not in file and (require_raw or not (volumes or annotations)):
        listing = ", ".join(list_hdf5_datasets(file)) or "none"
        raise DataError(f"{path}: no dataset /{RAW} (datasets: {listing})")
    if not volumes:
        # A submission file: annotations only, in its own frame.
        group = file[ANNOTATIONS]
        where = f"{path}:/{ANNOTATIONS}"
        resolution = number_triple(
            group.attrs.get("resolution", (1.0, 1.0, 1.0)), f"{where} resolution", DataError
        )
        offset = number_triple(
            group.attrs.get("offset", (0.0, 0.0, 0.0)), f"{where} offset", DataError
        )
        return CremiVolume(raw=None, resolution=resolution, offset=offset, annotations=annotations)
    # Labels set the frame; a larger (padded) raw is cropped to it.
    reference = next(iter(labels.values())) if labels else volumes[0]
    resolution, offset = _geometry(reference, path)
    arrays = {}
    for name, dataset in labels.items():
        if dataset.shape != reference.shape:
            raise DataError(
                f"{path}: /{LABELS}/{name} has shape {dataset.shape}, "
                f"{reference.name} has {reference.shape}"
            )
        if _geometry(dataset, path) != (resolution, offset):
            raise DataError(
                f"{path}: /{LABELS}/{name} resolution/offset {_geometry(dataset, path)} "
                f"differ from {reference.name}'s {(resolution, offset)}"
            )
        arrays[name] = dataset[()]
    raw = (
        _raw_in_frame(file[RAW], reference.shape, resolution, offset, path) if RAW in file else None
    )
    return CremiVolume(
        raw=raw,
        resolution=resolution,
        offset=offset,
        neuron_ids=arrays.pop(NEURON_IDS, None),
        clefts=arrays.pop(CLEFTS, None),
        annotations=annotations,
        labels=arrays,
    )


def _raw_in_frame(
    raw: h5py.Dataset,
    shape: tuple[int, ...],
    resolution: tuple[float, ...],
    offset: tuple[float, ...],
    path: str,
) -> np.ndarray:
    """Raw over the labels' region: the padded CREMI files pad raw around it.

    Raises:
      DataError: raw's resolution differs, or the labels' region is not a
        voxel-aligned part of raw.
    """
    raw_resolution, raw_offset = _geometry(raw, path)
    if raw.shape == shape and raw_offset == offset:
        if raw_resolution != resolution:
            raise DataError(
                f"{path}: /{RAW} resolution {raw_resolution} differs from labels' {resolution}"
            )
        return raw[()]
    try:
        box = Box.from_nm(offset, shape, resolution, raw_offset)
    except DataError:
        box = None  # not on raw's voxel grid
    if (
        raw_resolution != resolution
        or box is None
        or box.intersect(Box.from_shape(raw.shape)) != box
    ):
        raise DataError(
            f"{path}: labels of shape {shape} at offset {offset} nm do not lie on the voxel grid "
            f"inside /{RAW} (shape {raw.shape}, offset {raw_offset}, resolution {raw_resolution})"
        )
    return raw[box.slices()]


def _check_annotations(annotations: Annotations, path: str) -> None:
    n = len(annotations.ids)
    if annotations.locations.shape != (n, SPATIAL_DIMS) or annotations.types.shape != (n,):
        raise DataError(
            f"{path}: annotations need [n] ids, [n, 3] locations, [n] types; got "
            f"{annotations.ids.shape}, {annotations.locations.shape}, {annotations.types.shape}"
        )
    if len(np.unique(annotations.ids)) != n:
        raise DataError(f"{path}: annotation ids are not unique")
    unknown = sorted(set(annotations.types.tolist()) - set(SITE_TYPES))
    if unknown:
        raise DataError(f"{path}: annotation types {unknown} are not {' or '.join(SITE_TYPES)}")
    partners = np.asarray(annotations.partners).reshape(-1, 2)
    missing = np.setdiff1d(partners.astype(np.uint64), annotations.ids.astype(np.uint64))
    if missing.size:
        raise DataError(f"{path}: partners name annotation ids {missing[:5].tolist()} not present")


def _check_volume(volume: CremiVolume, path: str) -> dict[str, np.ndarray]:
    """Validates a `CremiVolume` for writing; returns its datasets by HDF5 path."""
    datasets = {} if volume.raw is None else {RAW: np.asarray(volume.raw)}
    labels = dict(volume.labels)
    for name, array in ((NEURON_IDS, volume.neuron_ids), (CLEFTS, volume.clefts)):
        if array is not None:
            labels[name] = array
    for name, array in labels.items():
        array = np.asarray(array)
        if name in (NEURON_IDS, CLEFTS) and array.dtype != np.uint64:
            if array.dtype.kind not in "iu" or (array.size and array.min() < 0):
                raise DataError(f"{path}: {name} must be non-negative integers, got {array.dtype}")
            array = array.astype(np.uint64)
        datasets[f"{LABELS}/{name}"] = array
    has_annotations = volume.annotations is not None and len(volume.annotations)
    if not datasets and not has_annotations:
        raise DataError(f"{path}: nothing to write (no raw, no labels and no annotations)")
    shapes = {key: array.shape for key, array in datasets.items()}
    # An annotations-only file (a CREMI submission) has no volumes to agree.
    if datasets and (
        len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != SPATIAL_DIMS
    ):
        raise DataError(f"{path}: volumes must share one [z, y, x] shape, got {shapes}")
    for key, array in datasets.items():
        if array.dtype.kind not in "biuf":
            raise DataError(f"{path}: {key} has unsupported dtype {array.dtype}")
    if volume.annotations is not None:
        _check_annotations(volume.annotations, path)
    return datasets


def _write_annotations(file: h5py.File, annotations: Annotations, offset: np.ndarray) -> None:
    group = file.create_group(ANNOTATIONS)
    group.attrs["offset"] = offset
    group.create_dataset("ids", data=annotations.ids.astype(np.uint64))
    types = np.asarray(annotations.types, dtype=object)
    group.create_dataset("types", data=types, dtype=h5py.string_dtype("utf-8"))
    # Locations are stored relative to the group's offset, as CREMI does.
    group.create_dataset("locations", data=annotations.locations.astype(np.float64) - offset)
    partners = np.asarray(annotations.partners, np.uint64).reshape(-1, 2)
    if len(partners):
        file.create_dataset(PARTNERS, data=partners)


def write_cremi(path: str | os.PathLike, volume: CremiVolume, overwrite: bool = False) -> None:
    """Writes a CREMI file atomically: a failure leaves any old file untouched.

    The file is written to a temporary file in the same folder, fsync'ed and
    moved over `path` with `os.replace` only once complete (`atomic_path`).
    Empty annotations are not written (as in CREMI's writer), so they read
    back as None.

    Args:
      path: destination HDF5 file.
      volume: the content; raw, neuron_ids, clefts and labels must share one
        shape; neuron_ids and clefts are stored as uint64.
      overwrite: replace an existing file; otherwise that is an error.
    """
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise DataError(f"{path} already exists; pass overwrite=True to replace it")
    datasets = _check_volume(volume, path)
    resolution = np.asarray(
        number_triple(volume.resolution, f"{path} resolution", DataError), np.float64
    )
    offset = np.asarray(number_triple(volume.offset, f"{path} offset", DataError), np.float64)
    with atomic_path(path) as temporary, h5py.File(temporary, "w") as file:
        file.attrs["file_format"] = FILE_FORMAT
        for key, array in datasets.items():
            dataset = file.create_dataset(key, data=array, compression="gzip")
            dataset.attrs["resolution"] = resolution
            dataset.attrs["offset"] = offset
        if volume.annotations is not None and len(volume.annotations):
            _write_annotations(file, volume.annotations, offset)
            # Annotations-only files keep the frame the locations refer to.
            file[ANNOTATIONS].attrs["resolution"] = resolution


def _zero_cleft_id(clefts: np.ndarray) -> np.uint64 | None:
    """The id `cleft_instances` gives a cleft stored as 0, or None without one."""
    foreground = clefts[clefts != CREMI_BACKGROUND]
    if not (foreground == 0).any():
        return None
    return foreground.max() + np.uint64(1)


def cleft_instances(clefts: np.ndarray) -> np.ndarray:
    """Cleft labels with background 0 instead of CREMI's 0xFFFFFFFFFFFFFFFF.

    A cleft stored with id 0 (legal in CREMI) is given the id one above the
    largest cleft id, so that it does not merge into the background. Cleft ids
    read from the CREMI labels elsewhere (e.g. a partner pair's cleft) must
    follow the same renumbering: `cleft_instance_ids`.

    Args:
      clefts: [z, y, x] integer cleft ids, background `CREMI_BACKGROUND`.

    Returns:
      [z, y, x] uint64 cleft ids, background 0.
    """
    clefts = np.asarray(clefts).astype(np.uint64, copy=False)
    out = clefts.copy()
    zero_id = _zero_cleft_id(clefts)
    if zero_id is not None:
        out[clefts == 0] = zero_id
    out[clefts == CREMI_BACKGROUND] = 0
    return out


def cleft_instance_ids(cleft_ids: np.ndarray, clefts: np.ndarray) -> np.ndarray:
    """The ids `cleft_instances(clefts)` gives the CREMI cleft ids `cleft_ids`.

    Only cleft 0 changes (to one above the largest id, when `clefts` holds a
    cleft 0); every other id is kept, in the dtype it came in.

    Args:
      cleft_ids: [k] cleft ids as stored in `clefts` (e.g. the cleft of each
        ground-truth synapse).
      clefts: [z, y, x] the CREMI cleft labels, background `CREMI_BACKGROUND`.

    Returns:
      [k] the same ids in the numbering of `cleft_instances(clefts)`.
    """
    ids = np.array(cleft_ids, copy=True).reshape(-1)
    zero_id = _zero_cleft_id(np.asarray(clefts).astype(np.uint64, copy=False))
    if zero_id is not None:
        ids[ids == 0] = zero_id
    return ids


def partner_table(volume: CremiVolume) -> dict[str, np.ndarray]:
    """One row per annotated partner pair, with the segments the sites lie in.

    Args:
      volume: a CREMI volume with annotations (neuron_ids optional).

    Returns:
      Arrays, one row per partner pair: `pre_id`, `post_id` ([m] uint64
      annotation ids), `pre_location`, `post_location` ([m, 3] nm, world
      frame), `pre_segment`, `post_segment` ([m] uint64 `neuron_ids` at those
      locations; 0 without neuron_ids or outside the volume), and
      `pre_inside`, `post_inside` ([m] bool).
    """
    annotations = volume.annotations if volume.annotations is not None else Annotations.empty()
    partners = np.asarray(annotations.partners, np.uint64).reshape(-1, 2)
    ids = np.asarray(annotations.ids, np.uint64)
    order = np.argsort(ids)
    table: dict[str, np.ndarray] = {}
    for side, column in (("pre", 0), ("post", 1)):
        wanted = partners[:, column]
        position = np.searchsorted(ids, wanted, sorter=order)
        rows = order[np.minimum(position, max(len(ids) - 1, 0))] if len(ids) else position
        if len(wanted) and (not len(ids) or not np.array_equal(ids[rows], wanted)):
            raise DataError(f"partners name {side} annotation ids that are not annotated")
        locations = annotations.locations[rows].reshape(-1, SPATIAL_DIMS).astype(np.float64)
        voxels = world_to_voxel(locations, volume.resolution, volume.offset)
        if volume.neuron_ids is None:
            segments, inside = np.zeros(len(voxels), np.uint64), np.zeros(len(voxels), bool)
        else:
            segments = segment_ids_at(
                volume.neuron_ids, locations, volume.resolution, volume.offset
            ).astype(np.uint64)
            inside = inside_volume(voxels, volume.neuron_ids.shape)
        table[f"{side}_id"] = wanted
        table[f"{side}_location"] = locations
        table[f"{side}_segment"] = segments
        table[f"{side}_inside"] = inside
    return table


@dataclasses.dataclass(frozen=True)
class SynapseSummary:
    """One synapse as seen through a volume's ground truth.

    Attributes:
      cleft_id: id in `clefts`.
      pre_segment: presynaptic neuron id.
      post_segments: postsynaptic neuron ids, in annotation order.
      pre_annotation: id of the presynaptic site annotation.
      post_annotations: ids of the postsynaptic site annotations.
      polyadic: more than one postsynaptic partner.
    """

    cleft_id: int
    pre_segment: int
    post_segments: tuple[int, ...]
    pre_annotation: int
    post_annotations: tuple[int, ...]
    polyadic: bool


def synapse_summary(volume: CremiVolume) -> list[SynapseSummary]:
    """Synapses of a volume from its annotations, segmentation and clefts.

    Works on any CREMI volume with `neuron_ids`, `clefts` and `annotations`
    (not only synthetic ones): each presynaptic annotation with partners is one
    synapse; segments are the neuron ids under the sites, and the cleft is the
    cleft instance nearest the presynaptic site.

    Returns:
      One `SynapseSummary` per presynaptic annotation, in annotation order.

    Raises:
      DataError: the volume lacks annotations, neuron_ids or clefts, or a site
        lies outside the volume.
    """
    ann = volume.annotations
    if ann is None or volume.neuron_ids is None or volume.clefts is None:
        raise DataError("synapse_summary needs a volume with annotations, neuron_ids and clefts")
    res = np.asarray(volume.resolution, np.float64)
    voxels = world_to_voxel(ann.locations, res, volume.offset)
    if not np.all(inside_volume(voxels, volume.neuron_ids.shape)):
        raise DataError("synapse_summary: annotation locations lie outside the volume")
    segment_of = dict(
        zip(ann.ids.tolist(), volume.neuron_ids[tuple(voxels.T)].tolist(), strict=True)
    )
    row_of = {a: i for i, a in enumerate(ann.ids.tolist())}
    cleft_voxels = np.stack(np.nonzero(volume.clefts != CREMI_BACKGROUND), axis=1)
    cleft_tree = cKDTree(cleft_voxels * res) if len(cleft_voxels) else None

    out = []
    for pre in ann.ids[ann.types == PRESYNAPTIC_SITE].tolist():
        posts = tuple(ann.partners[ann.partners[:, 0] == pre, 1].tolist())
        if not posts:
            continue
        cleft_id = -1
        if cleft_tree is not None:
            _, nearest = cleft_tree.query(voxels[row_of[pre]] * res)
            cleft_id = int(volume.clefts[tuple(cleft_voxels[nearest])])
        out.append(
            SynapseSummary(
                cleft_id=cleft_id,
                pre_segment=int(segment_of[pre]),
                post_segments=tuple(int(segment_of[p]) for p in posts),
                pre_annotation=int(pre),
                post_annotations=posts,
                polyadic=len(posts) > 1,
            )
        )
    return out


def synapse_pairs(summary: Sequence[SynapseSummary]) -> np.ndarray:
    """[m, 3] int64 rows (cleft id, pre segment, post segment), one per partner.

    The column order matches `synjax.targets.signed_proximity` (PAIR_CLEFT,
    PAIR_PRE, PAIR_POST).
    """
    rows = [(x.cleft_id, x.pre_segment, post) for x in summary for post in x.post_segments]
    return np.asarray(rows, np.int64).reshape(-1, 3)
