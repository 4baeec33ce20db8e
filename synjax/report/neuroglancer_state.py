"""The neuroglancer state of a run: its outputs as layers over the raw they came from.

`write_state(workdir, raw, resolution)` writes `layout.NEUROGLANCER_STATE_FILE`,
a neuroglancer JSON state (what neuroglancer's URL fragment and
`neuroglancer.ViewerState` hold), with one layer for each of these outputs
that the run wrote, in this order:

    raw           image         predictions/raw.zarr (the predicted raw, copied)
    proximity     image         predictions/proximity.zarr (red pre, blue post)
    boundaries    image         predictions/boundaries.zarr
    segmentation  segmentation  predictions/test_segmentation.zarr (partners) or
                                predictions/segmentation.zarr (neurons)
    watershed     segmentation  predictions/watershed.zarr (before agglomeration)
    synapses      annotation    synapses.csv: one line per row, from its presynaptic
                                site (pointA) to its postsynaptic site (pointB)

The raw is copied into the run folder because the pipelines predict on a crop
of their input held in memory (or on generated volumes that have no file):
the copy is the one voxel frame that the predictions share.

A volume of your own (`config.predict.input`) is never copied: the state that
`write_volume_state` writes into `config.predict.output` shows the input
where it lies (zarr, N5 or precomputed; neuroglancer reads no HDF5 or TIFF,
so such an input gets no layer) under the outputs of `OWN_VOLUME_LAYERS`.
Each zarr layer sits at its stored offset (a translation of offset / voxel
size), so the outputs of a `config.predict.roi` cover their region of the
input; an N5 or precomputed input is placed by neuroglancer from its own
metadata (its voxel size and offset), which synjax reads the same way. The
neuron segmentation that the partner pipeline paired sites on
(`config.predict.segmentation`) is shown where it lies too, placed as the
pipeline read it (`segmentation_layer`), unless it is the output folder's own
`segmentation.zarr` (the neuron pipeline's, predicted into the same folder).

Sources. A volume layer's source is `zarr://file:///absolute/path.zarr`:
the file it shows, named exactly. Browsers cannot read `file://` URLs;
`synjax.view` serves the folders over HTTP and rewrites them
(`neuroglancer_serve.rewrite_sources`); to publish a run elsewhere, copy it and
replace the `file://` prefix with the files' new URL. Neuroglancer reads no
voxel size from a plain zarr array, so each source carries a transform that
names its dimensions z, y, x (and `c^` for channels) with the voxel size in
metres. Annotation points are in nm: the synapse table's world positions put
voxel i's centre at `i * resolution`, neuroglancer puts it at
`(i + 1/2) * resolution`, so half a voxel is added.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS
from synjax.io import layout
from synjax.io.atomic import write_text_atomic
from synjax.io.synapse_table import SynapseTable
from synjax.io.volumes import CREATE_DTYPES, create_volume, open_volume, parse_source

# Neuroglancer's data source prefix for zarr (v2 and v3, told apart by their metadata).
ZARR_PREFIX = "zarr://"
# Source of an annotation layer whose annotations are stored in the state itself.
LOCAL_ANNOTATIONS = "local://annotations"
# Metres per nanometre: neuroglancer's coordinate spaces are in SI units.
METRES_PER_NM = 1e-9
# Axis names of a synjax volume, in its array order; neuroglancer displays x, y, z.
ARRAY_AXES = ("z", "y", "x")
DISPLAY_AXES = ("x", "y", "z")
# A channel axis: the trailing `^` makes it a channel of the layer, not a position.
CHANNEL_AXIS = "c^"

# Signed proximity in [-1, 1]: red where positive (presynaptic), blue where negative.
PROXIMITY_SHADER = """void main() {
  float v = getDataValue();
  emitRGBA(vec4(max(v, 0.0), 0.0, max(-v, 0.0), min(abs(v), 1.0)));
}
"""

# (layer name, neuroglancer layer type, path in the workdir, shader or None), in display order.
VOLUME_LAYERS = (
    ("raw", "image", layout.VIEW_RAW, None),
    ("proximity", "image", layout.PROXIMITY, PROXIMITY_SHADER),
    ("boundaries", "image", layout.BOUNDARIES, None),
    ("segmentation", "segmentation", layout.volume_segmentation("test"), None),
    ("segmentation", "segmentation", layout.SEGMENTATION, None),
    ("watershed", "segmentation", layout.WATERSHED_ONLY, None),
)
SYNAPSE_LAYER = "synapses"
# The outputs of a volume of your own, in `config.predict.output` (a flat folder).
OWN_VOLUME_LAYERS = (
    ("proximity", "image", layout.VOLUME_PROXIMITY, PROXIMITY_SHADER),
    ("boundaries", "image", layout.VOLUME_BOUNDARIES, None),
    ("segmentation", "segmentation", layout.VOLUME_SEGMENTATION, None),
    ("synapse instances", "segmentation", layout.VOLUME_INSTANCES, None),
    # The partner pipeline's candidate sites (components of |proximity| > tau).
    ("pre sites", "segmentation", layout.VOLUME_PRE_SITES, None),
    ("post sites", "segmentation", layout.VOLUME_POST_SITES, None),
)
INPUT_LAYER = "raw"
SEGMENTATION_LAYER = "segmentation"
# synjax source formats that neuroglancer reads, with its data source prefix.
NEUROGLANCER_FORMATS = {"zarr": "zarr://", "n5": "n5://", "precomputed": "precomputed://"}


def file_url(path: str | os.PathLike) -> str:
    """`file://` URL of a local path, absolute (what a layer's source names)."""
    return pathlib.Path(path).absolute().as_uri()


def dimensions(names: tuple[str, ...], resolution_nm) -> dict[str, list]:
    """A neuroglancer coordinate space: `{name: [metres per voxel, "m"]}`."""
    return {
        name: [float(size) * METRES_PER_NM, "m"]
        for name, size in zip(names, resolution_nm, strict=True)
    }


def source_url(source: str | os.PathLike) -> str | None:
    """Neuroglancer's data source URL of a volume that `synjax.io.open_volume` reads.

    Args:
      source: a synjax source (`x.zarr`, `x.zarr/raw`, `x.n5`,
        `precomputed://path`; URLs such as `gs://...` stay URLs).

    Returns:
      e.g. `zarr://file:///abs/x.zarr`, or None for a format neuroglancer
      does not read (HDF5, TIFF).

    Raises:
      DataError: `source` is no synjax volume source.
    """
    fmt, location, _ = parse_source(source)
    prefix = NEUROGLANCER_FORMATS.get(fmt)
    if prefix is None:
        return None
    return prefix + (location if "://" in location else file_url(location))


def volume_layer(
    name: str,
    kind: str,
    path: str | os.PathLike,
    resolution_nm,
    channels: int | None = None,
    offset_nm=None,
    *,
    url: str | None = None,
) -> dict[str, Any]:
    """An image or segmentation layer over a zarr array written by synjax (or any source).

    Args:
      name: the layer's name.
      kind: "image" or "segmentation".
      path: the zarr array, `[z, y, x]` or `[z, y, x, channels]`.
      resolution_nm: voxel size in nm, z-y-x.
      channels: the channel count of a `[z, y, x, channels]` array, None for `[z, y, x]`.
      offset_nm: world position in nm (z-y-x) of voxel (0, 0, 0); None or
        zeros: the origin.
      url: the layer's data source instead of `path`'s zarr URL (`source_url`).

    Returns:
      The layer's JSON, its source the array's `file://` URL with its voxel
      size, translated by `offset_nm / resolution_nm` voxels where not zero.
    """
    output = dimensions(ARRAY_AXES, resolution_nm)
    if channels is not None:
        output[CHANNEL_AXIS] = [1, ""]
    transform: dict[str, Any] = {"outputDimensions": output}
    translation = voxel_offset(offset_nm, resolution_nm)
    if any(translation):
        # Rows: output dimensions; the last column: the translation in their units (voxels).
        rank = len(output)
        matrix = np.eye(rank, rank + 1)
        matrix[:SPATIAL_DIMS, rank] = translation
        transform["matrix"] = matrix.tolist()
    layer: dict[str, Any] = {
        "type": kind,
        "name": name,
        "source": {
            "url": url if url is not None else ZARR_PREFIX + file_url(path),
            "transform": transform,
        },
    }
    if kind == "segmentation":
        layer["segments"] = []
    return layer


def voxel_offset(offset_nm, resolution_nm) -> list[float]:
    """A volume's offset in its own voxels, z-y-x (zeros for None)."""
    if offset_nm is None:
        return [0.0] * SPATIAL_DIMS
    return [float(o) / float(r) for o, r in zip(offset_nm, resolution_nm, strict=True)]


def synapse_layer(table: SynapseTable, resolution_nm, name: str = SYNAPSE_LAYER) -> dict[str, Any]:
    """An annotation layer with a line from each synapse's pre to its post site.

    Args:
      table: the synapses; positions in nm, z-y-x, voxel i centred at
        `i * resolution`.
      resolution_nm: voxel size in nm, z-y-x (for the half-voxel shift).
      name: the layer's name.

    Returns:
      A layer with `len(table)` line annotations, points in nm, x-y-z.
    """
    half = np.asarray(resolution_nm, np.float64) / 2
    # z-y-x -> x-y-z, the order of the layer's dimensions.
    pre = (table.pre_location + half)[:, ::-1]
    post = (table.post_location + half)[:, ::-1]
    annotations = [
        {
            "type": "line",
            "id": str(row),
            "pointA": [float(v) for v in pre[row]],
            "pointB": [float(v) for v in post[row]],
            "description": (
                f"{table.kind[row]} {int(table.pre_segment[row])} -> "
                f"{int(table.post_segment[row])}, score {table.score[row]:.3g}"
            ),
        }
        for row in range(len(table))
    ]
    return {
        "type": "annotation",
        "name": name,
        "source": {
            "url": LOCAL_ANNOTATIONS,
            "transform": {"outputDimensions": dimensions(DISPLAY_AXES, (1.0, 1.0, 1.0))},
        },
        "annotationColor": "#ffff00",
        "annotations": annotations,
    }


def _open_any(path: pathlib.Path):
    """Opens a `[z, y, x]` or `[z, y, x, channels]` volume (metadata only)."""
    try:
        return open_volume(str(path))
    except DataError:
        return open_volume(str(path), ndim=SPATIAL_DIMS + 1)


def _output_layers(folder: pathlib.Path, table) -> list[tuple[dict[str, Any], Any]]:
    """(layer, volume) of each output of `table` (`VOLUME_LAYERS`' form) present in `folder`."""
    found, names = [], set()
    for name, kind, relative, shader in table:
        path = folder / relative
        if name in names or not path.is_dir():
            continue
        volume = _open_any(path)
        channels = volume.shape[SPATIAL_DIMS] if len(volume.shape) > SPATIAL_DIMS else None
        layer = volume_layer(name, kind, path, volume.resolution, channels, volume.offset)
        if shader is not None:
            layer["shader"] = shader
        found.append((layer, volume))
        names.add(name)
    return found


def _assemble(folder: pathlib.Path, layers: list, frame, centre) -> dict[str, Any]:
    """The state of `layers` (and `folder`'s synapse table) in the voxel frame of `frame`.

    The global dimensions are `frame`'s voxel size; the view starts at the
    centre of `centre` (both volumes, or None when there is no volume layer).
    """
    state: dict[str, Any] = {}
    if frame is not None:
        state["dimensions"] = dimensions(DISPLAY_AXES, frame.resolution[::-1])
        # In `frame`'s voxels: `centre`'s offset and half its extent (x-y-z).
        start = np.asarray(centre.offset, np.float64) / np.asarray(frame.resolution, np.float64)
        extent = np.asarray(centre.shape[:SPATIAL_DIMS], np.float64) * (
            np.asarray(centre.resolution, np.float64) / np.asarray(frame.resolution, np.float64)
        )
        state["position"] = [float(v) for v in (start + extent / 2)[::-1]]
    table_path = folder / layout.SYNAPSES_CSV_FILE
    if table_path.is_file():
        if frame is None:
            raise DataError(f"{table_path}: synapses without a volume to place them in")
        layers.append(synapse_layer(SynapseTable.from_csv(table_path), frame.resolution))
    state["layers"] = layers
    state["layout"] = "4panel"
    return state


def build_state(workdir: str | os.PathLike) -> dict[str, Any]:
    """The neuroglancer state of the outputs present in `workdir` (nothing is written).

    Args:
      workdir: the run folder.

    Returns:
      The state: layers of `VOLUME_LAYERS` whose arrays exist (each with its
      own stored voxel size and offset) and the synapse table, if written;
      the view's dimensions and position from the first volume layer.
    """
    workdir = pathlib.Path(workdir)
    found = _output_layers(workdir, VOLUME_LAYERS)
    first = found[0][1] if found else None
    return _assemble(workdir, [layer for layer, _ in found], first, first)


def segmentation_layer(source: str, input_volume, region=None) -> dict[str, Any] | None:
    """The layer of a neuron segmentation of a volume of your own, where the pipeline read it.

    The partner pipeline reads `config.predict.segmentation` in the input's
    voxels: one of the input's shape covers the input, one of the region's
    shape covers the region (`partner_volume.open_segmentation`). A zarr
    layer is placed so (the input's voxel size; the input's or the region's
    offset), whatever the array stores; N5 and precomputed are placed by
    neuroglancer from their own metadata.

    Args:
      source: the segmentation (an `open_volume` source).
      input_volume: the opened input (`config.predict.input`).
      region: an opened output of the predicted region (its shape and
        offset), or None.

    Returns:
      A segmentation layer named `SEGMENTATION_LAYER`, or None for a format
      neuroglancer does not read (HDF5, TIFF).

    Raises:
      DataError: the segmentation cannot be opened.
    """
    url = source_url(source)
    if url is None:
        return None
    if not url.startswith(ZARR_PREFIX):
        return {"type": "segmentation", "name": SEGMENTATION_LAYER, "source": url, "segments": []}
    volume = open_volume(source)
    try:
        shape = tuple(volume.shape)
        resolution = input_volume.resolution
        if shape == tuple(input_volume.shape):
            offset = input_volume.offset
        elif region is not None and shape == tuple(region.shape[:SPATIAL_DIMS]):
            offset = region.offset
        else:
            # Not a shape the pipeline pairs sites on: shown as it is stored.
            resolution, offset = volume.resolution, volume.offset
        return volume_layer(
            SEGMENTATION_LAYER, "segmentation", "", resolution, None, offset, url=url
        )
    finally:
        volume.close()


def _is_output(source: str, output: pathlib.Path, relative: str) -> bool:
    """Whether the volume source `source` is `output / relative`."""
    location = parse_source(source)[1]
    if "://" in location:
        return False
    return pathlib.Path(location).resolve() == (output / relative).resolve()


def build_volume_state(
    output: str | os.PathLike, input_source: str, segmentation: str | None = None
) -> dict[str, Any]:
    """The state of the predictions of a volume of your own (nothing is written or copied).

    Args:
      output: the folder of the predictions (`config.predict.output`).
      input_source: the volume they were predicted from (`config.predict.input`).
      segmentation: the neuron segmentation that the partner pipeline paired
        sites on (`config.predict.segmentation`), or None / "".

    Returns:
      The state: the input where it lies (when neuroglancer reads its
      format, see `source_url`), the layers of `OWN_VOLUME_LAYERS` present in
      `output`, the segmentation where it lies (`segmentation_layer`; after
      the image layers, unless it is `output`'s own segmentation, listed
      already) and the synapse table, if written; the view's voxel size is
      the input's, and it starts at the centre of the predicted region.

    Raises:
      DataError: the input or the segmentation cannot be opened.
    """
    output = pathlib.Path(output)
    found = _output_layers(output, OWN_VOLUME_LAYERS)
    raw = open_volume(input_source)
    try:
        url = source_url(input_source)
        layers = [layer for layer, _ in found]
        if url is not None and url.startswith(ZARR_PREFIX):
            layer = volume_layer(
                INPUT_LAYER, "image", "", raw.resolution, None, raw.offset, url=url
            )
            layers.insert(0, layer)
        elif url is not None:
            # N5 and precomputed name their own axes, voxel size and offset.
            layers.insert(0, {"type": "image", "name": INPUT_LAYER, "source": url})
        region = found[0][1] if found else None
        if segmentation and not _is_output(segmentation, output, layout.VOLUME_SEGMENTATION):
            layer = segmentation_layer(segmentation, raw, region)
            if layer is not None:
                images = [i for i, other in enumerate(layers) if other["type"] == "image"]
                layers.insert(images[-1] + 1 if images else 0, layer)
        return _assemble(output, layers, raw, region if region is not None else raw)
    finally:
        raw.close()


def write_raw(workdir: str | os.PathLike, raw: np.ndarray, resolution_nm) -> pathlib.Path:
    """Copies the raw that the run predicted on to `layout.VIEW_RAW` (replacing it).

    Args:
      workdir: the run folder.
      raw: `[z, y, x]` intensities; dtypes zarr output does not take (int8,
        float16, bool) are written as float32.
      resolution_nm: voxel size in nm, z-y-x.

    Returns:
      The path of the copy.
    """
    raw = np.asarray(raw)
    if raw.dtype.name not in CREATE_DTYPES:
        raw = raw.astype(np.float32)
    path = pathlib.Path(workdir) / layout.VIEW_RAW
    with create_volume(str(path), raw.shape, raw.dtype, resolution_nm, overwrite=True) as volume:
        volume[...] = raw
    return path


def write_state(
    workdir: str | os.PathLike, raw: np.ndarray | None = None, resolution_nm=None
) -> pathlib.Path:
    """Writes the run's neuroglancer state (and the raw it shows) into `workdir`.

    Args:
      workdir: the run folder.
      raw: `[z, y, x]` raw that the run's predictions are of, or None to
        leave out (or keep an earlier copy of) the raw layer.
      resolution_nm: the raw's voxel size in nm, z-y-x; required with `raw`.

    Returns:
      The path of `layout.NEUROGLANCER_STATE_FILE`.
    """
    workdir = pathlib.Path(workdir)
    if raw is not None:
        if resolution_nm is None:
            raise DataError("write_state: raw given without its resolution (nm, z-y-x)")
        write_raw(workdir, raw, resolution_nm)
    path = workdir / layout.NEUROGLANCER_STATE_FILE
    write_text_atomic(path, json.dumps(build_state(workdir), indent=1))
    return path


def write_volume_state(
    output: str | os.PathLike, input_source: str, segmentation: str | None = None
) -> pathlib.Path:
    """Writes the neuroglancer state of a volume of your own's predictions into `output`.

    See `build_volume_state`: the input (and `segmentation`) are referenced
    where they lie, never copied.

    Returns:
      The path of `output/layout.NEUROGLANCER_STATE_FILE`.
    """
    path = pathlib.Path(output) / layout.NEUROGLANCER_STATE_FILE
    state = build_volume_state(output, input_source, segmentation)
    write_text_atomic(path, json.dumps(state, indent=1))
    return path


def read_state(workdir: str | os.PathLike) -> dict[str, Any]:
    """The neuroglancer state a run wrote.

    Raises:
      DataError: `workdir` is not a folder, has no state, or the state is not JSON.
    """
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise DataError(
            f"run folder {workdir} does not exist (expected a --workdir of synjax.main)"
        )
    path = workdir / layout.NEUROGLANCER_STATE_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is absent: run synjax.main with --config.mode=predict (or all) on "
            "this workdir, or with this folder as --config.predict.output, first"
        )
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not a JSON neuroglancer state ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
        raise DataError(f"{path}: expected a neuroglancer state with a 'layers' list")
    return state
