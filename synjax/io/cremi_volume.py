"""In-memory form of a CREMI-layout file: raw, labels and synapse annotations.

CREMI stores volumes in z, y, x order with `resolution` and `offset` attributes
in nm; cleft labels use 0xFFFFFFFFFFFFFFFF as background. Arrays here hold the
values exactly as stored (read and written by `synjax.io.cremi`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Background value of `volumes/labels/clefts` in CREMI files.
CREMI_BACKGROUND = np.uint64(0xFFFFFFFFFFFFFFFF)

PRESYNAPTIC_SITE = "presynaptic_site"
POSTSYNAPTIC_SITE = "postsynaptic_site"


@dataclasses.dataclass
class Annotations:
    """Synapse site annotations and pre -> post partner pairs.

    Attributes:
      ids: [n] uint64 annotation ids.
      locations: [n, 3] float64 locations in nm, z-y-x, in the volume's world
        frame (the same frame as the volume's `offset`).
      types: [n] str, `PRESYNAPTIC_SITE` or `POSTSYNAPTIC_SITE`.
      partners: [m, 2] uint64 pairs (presynaptic annotation id, postsynaptic
        annotation id).
    """

    ids: np.ndarray
    locations: np.ndarray
    types: np.ndarray
    partners: np.ndarray

    @classmethod
    def empty(cls) -> Annotations:
        return cls(
            ids=np.zeros((0,), np.uint64),
            locations=np.zeros((0, 3), np.float64),
            types=np.zeros((0,), dtype=object),
            partners=np.zeros((0, 2), np.uint64),
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass
class CremiVolume:
    """A CREMI file's content.

    Attributes:
      raw: [z, y, x] uint8 intensities, or None.
      resolution: voxel size in nm, z-y-x.
      offset: world position of voxel (0, 0, 0) in nm, z-y-x.
      neuron_ids: [z, y, x] uint64 neuron labels (0 = unlabelled), or None.
      clefts: [z, y, x] uint64 cleft instances, background `CREMI_BACKGROUND`,
        or None.
      annotations: synapse sites and partners, or None.
      labels: any other `volumes/labels/<name>` datasets, by name.
    """

    raw: np.ndarray | None
    resolution: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    neuron_ids: np.ndarray | None = None
    clefts: np.ndarray | None = None
    annotations: Annotations | None = None
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
