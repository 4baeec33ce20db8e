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
from synjax.io.volumes import CREATE_DTYPES, create_volume, open_volume

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


def file_url(path: str | os.PathLike) -> str:
    """`file://` URL of a local path, absolute (what a layer's source names)."""
    return pathlib.Path(path).absolute().as_uri()


def dimensions(names: tuple[str, ...], resolution_nm) -> dict[str, list]:
    """A neuroglancer coordinate space: `{name: [metres per voxel, "m"]}`."""
    return {
        name: [float(size) * METRES_PER_NM, "m"]
        for name, size in zip(names, resolution_nm, strict=True)
    }


def volume_layer(
    name: str, kind: str, path: str | os.PathLike, resolution_nm, channels: int | None = None
) -> dict[str, Any]:
    """An image or segmentation layer over a zarr array written by synjax.

    Args:
      name: the layer's name.
      kind: "image" or "segmentation".
      path: the zarr array, `[z, y, x]` or `[z, y, x, channels]`.
      resolution_nm: voxel size in nm, z-y-x.
      channels: the channel count of a `[z, y, x, channels]` array, None for `[z, y, x]`.

    Returns:
      The layer's JSON, its source the array's `file://` URL with its voxel size.
    """
    output = dimensions(ARRAY_AXES, resolution_nm)
    if channels is not None:
        output[CHANNEL_AXIS] = [1, ""]
    layer: dict[str, Any] = {
        "type": kind,
        "name": name,
        "source": {
            "url": ZARR_PREFIX + file_url(path),
            "transform": {"outputDimensions": output},
        },
    }
    if kind == "segmentation":
        layer["segments"] = []
    return layer


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


def build_state(workdir: str | os.PathLike) -> dict[str, Any]:
    """The neuroglancer state of the outputs present in `workdir` (nothing is written).

    Args:
      workdir: the run folder.

    Returns:
      The state: layers of `VOLUME_LAYERS` whose arrays exist (each with its
      own stored voxel size) and the synapse table, if written; the view's
      dimensions and position from the first volume layer.
    """
    workdir = pathlib.Path(workdir)
    layers, first = [], None
    names: set[str] = set()
    for name, kind, relative, shader in VOLUME_LAYERS:
        path = workdir / relative
        if name in names or not path.is_dir():
            continue
        volume = _open_any(path)
        channels = volume.shape[SPATIAL_DIMS] if len(volume.shape) > SPATIAL_DIMS else None
        layer = volume_layer(name, kind, path, volume.resolution, channels)
        if shader is not None:
            layer["shader"] = shader
        layers.append(layer)
        names.add(name)
        first = first or volume
    state: dict[str, Any] = {}
    if first is not None:
        # Global dimensions in voxels of the first layer; the view starts at its centre.
        state["dimensions"] = dimensions(DISPLAY_AXES, first.resolution[::-1])
        state["position"] = [float(s) / 2 for s in first.shape[:SPATIAL_DIMS][::-1]]
    table_path = workdir / layout.SYNAPSES_CSV_FILE
    if table_path.is_file():
        if first is None:
            raise DataError(f"{table_path}: synapses without a volume to place them in")
        layers.append(synapse_layer(SynapseTable.from_csv(table_path), first.resolution))
    state["layers"] = layers
    state["layout"] = "4panel"
    return state


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
            "this workdir first"
        )
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not a JSON neuroglancer state ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("layers"), list):
        raise DataError(f"{path}: expected a neuroglancer state with a 'layers' list")
    return state
