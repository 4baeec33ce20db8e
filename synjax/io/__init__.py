"""Volume IO: one `Volume` type over zarr, N5, precomputed, HDF5 and TIFF; CREMI files;
the synapse table every method writes; the workdir's file names (`layout`); atomic writes.

The first package of the flow: it imports only `errors` and `geometry`.
"""

from synjax.io.checks import require_file, require_finite
from synjax.io.cremi import (
    SynapseSummary,
    cleft_instance_ids,
    cleft_instances,
    partner_table,
    read_cremi,
    synapse_pairs,
    synapse_summary,
    write_cremi,
)
from synjax.io.cremi_volume import CREMI_BACKGROUND, Annotations, CremiVolume
from synjax.io.synapse_table import SynapseTable
from synjax.io.volume_base import Volume
from synjax.io.volumes import create_volume, open_volume
from synjax.io.voxels import inside_volume, nearest_voxel, segment_ids_at, world_to_voxel

__all__ = [
    "CREMI_BACKGROUND",
    "Annotations",
    "CremiVolume",
    "SynapseSummary",
    "SynapseTable",
    "Volume",
    "cleft_instance_ids",
    "cleft_instances",
    "create_volume",
    "inside_volume",
    "nearest_voxel",
    "open_volume",
    "partner_table",
    "read_cremi",
    "require_file",
    "require_finite",
    "segment_ids_at",
    "synapse_pairs",
    "synapse_summary",
    "world_to_voxel",
    "write_cremi",
]
