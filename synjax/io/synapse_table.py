"""`SynapseTable`: the one table of synapses that every method produces.

One row per synapse: the segments it connects (pre -> post), where it is (nm,
z-y-x, world frame), the pre- and postsynaptic site locations, a score, a size
in voxels (0 when unknown) and the kind of result ("partner" for partner
detection, "instance" for synapse instance segmentation, ...). Columns are
plain numpy arrays; CSV is the exchange format.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from synjax.errors import DataError
from synjax.io.atomic import atomic_open
from synjax.io.cremi import partner_table
from synjax.io.cremi_volume import POSTSYNAPTIC_SITE, PRESYNAPTIC_SITE, Annotations, CremiVolume

AXES = ("z", "y", "x")
POINT_COLUMNS = ("location", "pre_location", "post_location")
CSV_HEADER = (
    ["pre_segment", "post_segment"]
    + [f"{column}_{axis}" for column in POINT_COLUMNS for axis in AXES]
    + ["score", "size", "kind"]
)
DEFAULT_KIND = "partner"


@dataclasses.dataclass
class SynapseTable:
    """Synapses as columns; construction converts and checks every column.

    Attributes:
      pre_segment: [n] uint64 presynaptic segment id (0 = unknown).
      post_segment: [n] uint64 postsynaptic segment id (0 = unknown).
      location: [n, 3] float64 synapse (cleft) location, nm, z-y-x.
      pre_location: [n, 3] float64 presynaptic site, nm, z-y-x.
      post_location: [n, 3] float64 postsynaptic site, nm, z-y-x.
      score: [n] float64 confidence (higher is surer).
      size: [n] int64 size in voxels, 0 when unknown.
      kind: [n] str (object array), which result the row is.
    """

    pre_segment: np.ndarray
    post_segment: np.ndarray
    location: np.ndarray
    pre_location: np.ndarray
    post_location: np.ndarray
    score: np.ndarray
    size: np.ndarray
    kind: np.ndarray

    def __post_init__(self):
        self.pre_segment = np.asarray(self.pre_segment, np.uint64).reshape(-1)
        n = len(self.pre_segment)
        self.post_segment = np.asarray(self.post_segment, np.uint64).reshape(-1)
        for name in POINT_COLUMNS:
            points = np.asarray(getattr(self, name), np.float64)
            if points.shape != (n, len(AXES)):
                raise DataError(f"SynapseTable column {name} must be [{n}, 3], got {points.shape}")
            setattr(self, name, points)
        self.score = np.asarray(self.score, np.float64).reshape(-1)
        self.size = np.asarray(self.size, np.int64).reshape(-1)
        self.kind = np.asarray(self.kind, dtype=object).reshape(-1)
        for name in ("post_segment", "score", "size", "kind"):
            if len(getattr(self, name)) != n:
                raise DataError(
                    f"SynapseTable column {name} has {len(getattr(self, name))} rows, "
                    f"pre_segment has {n}"
                )

    @classmethod
    def build(
        cls,
        pre_segment: Sequence[int] | np.ndarray,
        post_segment: Sequence[int] | np.ndarray,
        location: np.ndarray,
        pre_location: np.ndarray | None = None,
        post_location: np.ndarray | None = None,
        score: float | np.ndarray = 1.0,
        size: int | np.ndarray = 0,
        kind: str | np.ndarray = DEFAULT_KIND,
    ) -> SynapseTable:
        """A table with defaults: sites at the synapse location, scalars broadcast."""
        location = np.asarray(location, np.float64).reshape(-1, len(AXES))
        n = len(location)
        return cls(
            pre_segment=pre_segment,
            post_segment=post_segment,
            location=location,
            pre_location=location if pre_location is None else pre_location,
            post_location=location if post_location is None else post_location,
            score=np.broadcast_to(np.asarray(score, np.float64), (n,)),
            size=np.broadcast_to(np.asarray(size, np.int64), (n,)),
            kind=np.broadcast_to(np.asarray(kind, dtype=object), (n,)),
        )

    @classmethod
    def empty(cls) -> SynapseTable:
        return cls.build([], [], np.zeros((0, 3)))

    def __len__(self) -> int:
        return len(self.pre_segment)

    def select(self, rows: np.ndarray) -> SynapseTable:
        """The rows picked by a boolean mask or an index array."""
        return SynapseTable(
            **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)}
        )

    def filter_by_score(self, min_score: float) -> SynapseTable:
        """The rows with `score >= min_score` (NaN scores are dropped)."""
        return self.select(self.score >= min_score)

    @classmethod
    def concatenate(cls, tables: Sequence[SynapseTable]) -> SynapseTable:
        """All rows of several tables, in order."""
        if not tables:
            return cls.empty()
        return cls(
            **{
                f.name: np.concatenate([getattr(t, f.name) for t in tables])
                for f in dataclasses.fields(cls)
            }
        )

    def to_csv(self, path: str | os.PathLike) -> None:
        """Writes the table as CSV, atomically (`synjax.io.atomic`: temporary file, fsync, rename).

        Floats are written with `repr`, so `from_csv` gives back the same bits.
        """
        path = os.fspath(path)
        points = np.concatenate([getattr(self, name) for name in POINT_COLUMNS], axis=1)
        with atomic_open(path, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(CSV_HEADER)
            # One row per synapse (not per voxel); csv quotes commas in `kind`.
            for i in range(len(self)):
                writer.writerow(
                    [int(self.pre_segment[i]), int(self.post_segment[i])]
                    + [repr(float(v)) for v in points[i]]
                    + [repr(float(self.score[i])), int(self.size[i]), str(self.kind[i])]
                )

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> SynapseTable:
        """Reads a table written by `to_csv`."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"synapse table not found: {path}")
        with open(path, newline="") as stream:
            rows = list(csv.reader(stream))
        if not rows or rows[0] != CSV_HEADER:
            missing = sorted(set(CSV_HEADER) - set(rows[0] if rows else []))
            raise DataError(f"{path}: not a synapse table CSV (columns missing: {missing})")
        body = rows[1:]
        if any(len(row) != len(CSV_HEADER) for row in body):
            raise DataError(f"{path}: every row needs {len(CSV_HEADER)} fields")
        columns = {name: [row[i] for row in body] for i, name in enumerate(CSV_HEADER)}
        try:
            points = {
                name: np.array(
                    [columns[f"{name}_{axis}"] for axis in AXES], dtype=np.float64
                ).T.reshape(-1, len(AXES))
                for name in POINT_COLUMNS
            }
            return cls(
                pre_segment=np.array([int(v) for v in columns["pre_segment"]], np.uint64),
                post_segment=np.array([int(v) for v in columns["post_segment"]], np.uint64),
                score=np.array(columns["score"], np.float64),
                size=np.array([int(v) for v in columns["size"]], np.int64),
                kind=np.array(columns["kind"], dtype=object),
                **points,
            )
        except ValueError as error:
            raise DataError(f"{path}: bad value in synapse table ({error})") from None

    def to_annotations(self, first_id: int = 0) -> Annotations:
        """CREMI annotations: one pre and one post site per row, linked as partners.

        Row i gets annotation ids `first_id + 2 i` (pre) and `first_id + 2 i + 1`
        (post).
        """
        n = len(self)
        pre_ids = np.uint64(first_id) + 2 * np.arange(n, dtype=np.uint64)
        post_ids = pre_ids + np.uint64(1)
        return Annotations(
            ids=np.stack([pre_ids, post_ids], axis=1).reshape(-1),
            locations=np.stack([self.pre_location, self.post_location], axis=1).reshape(-1, 3),
            types=np.array([PRESYNAPTIC_SITE, POSTSYNAPTIC_SITE] * n, dtype=object),
            partners=np.stack([pre_ids, post_ids], axis=1),
        )

    @classmethod
    def from_annotations(
        cls,
        annotations: Annotations,
        segmentation: np.ndarray | None = None,
        resolution: Sequence[float] = (1.0, 1.0, 1.0),
        offset: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> SynapseTable:
        """One row per partner pair of CREMI annotations.

        The synapse location is the midpoint of the two sites; the segments are
        looked up in `segmentation` (voxel = round((location - offset) /
        resolution)), 0 without one or outside it.

        Args:
          annotations: sites and partners, locations in nm (world frame).
          segmentation: [z, y, x] neuron labels, or None.
          resolution: voxel size of `segmentation` in nm, z-y-x.
          offset: world position of its voxel (0, 0, 0) in nm.
        """
        volume = CremiVolume(
            raw=None,
            resolution=tuple(resolution),
            offset=tuple(offset),
            neuron_ids=segmentation,
            annotations=annotations,
        )
        table = partner_table(volume)
        pre, post = table["pre_location"], table["post_location"]
        pre_segment, post_segment = table["pre_segment"], table["post_segment"]
        return cls.build(
            pre_segment,
            post_segment,
            (pre + post) / 2,
            pre_location=pre,
            post_location=post,
            kind=DEFAULT_KIND,
        )
