"""Volume IO: one `Volume` type over zarr, N5, precomputed, HDF5 and TIFF;
CREMI files; the synapse table that every method writes."""

from synjax.io.cremi import (
    cleft_instance_ids,
    cleft_instances,
    partner_table,
    read_cremi,
    write_cremi,
)
from synjax.io.cremi_volume import CREMI_BACKGROUND, Annotations, CremiVolume
from synjax.io.synapse_table import SynapseTable
from synjax.io.volume_base import Volume
from synjax.io.volumes import create_volume, open_volume
from synjax.io.voxels import segment_ids_at, world_to_voxel

__all__ = [
    "CREMI_BACKGROUND",
    "Annotations",
    "CremiVolume",
    "SynapseTable",
    "Volume",
    "cleft_instance_ids",
    "cleft_instances",
    "create_volume",
    "open_volume",
    "partner_table",
    "read_cremi",
    "segment_ids_at",
    "world_to_voxel",
    "write_cremi",
]
