"""Per-instance tables and label volumes written by the instance pipelines.

Both instance pipelines (fluorescence Mask R-CNN, EM instance network) write
their instances as a uint32 zarr label volume and a CSV with one row per
instance: id, centroid in nm (voxel centres), voxel count, volume, optional
mean intensity, and the detector's score.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

from synjax.errors import DataError
from synjax.io.atomic import atomic_open
from synjax.io.volumes import create_volume

# Columns written as integers; every other column as `%.6g`.
_INTEGER_COLUMNS = ("id", "voxels")


class InstanceSums:
    """Voxel counts, coordinate sums and intensity sums per instance id, block by block.

    `instance_rows` of a whole volume is one `add`; a volume larger than
    memory adds its blocks one at a time (each voxel once).

    Args:
      count: the largest instance id k (ids 1..k).
    """

    def __init__(self, count: int):
        self.count = int(count)
        self.voxels = np.zeros(self.count + 1, np.int64)
        self.coordinates = np.zeros((3, self.count + 1), np.float64)
        self.intensity: np.ndarray | None = None

    def add(
        self,
        labels: np.ndarray,
        origin: Sequence[int] = (0, 0, 0),
        image: np.ndarray | None = None,
    ) -> None:
        """Adds a block of labels whose voxel (0, 0, 0) is voxel `origin` of the volume.

        Args:
          labels: [z, y, x] instance ids of the block (at most `count`).
          origin: (z, y, x) of the block in the volume.
          image: optional [z, y, x] raw intensities of the block.

        Raises:
          DataError: an id above `count`.
        """
        flat = np.asarray(labels).ravel().astype(np.int64)
        if flat.size and int(flat.max()) > self.count:
            raise DataError(
                f"instance table: id {int(flat.max())} in a block; expected ids 1..{self.count}"
            )
        self.voxels += np.bincount(flat, minlength=self.count + 1)
        grids = np.indices(labels.shape).reshape(3, -1)
        for a in range(3):
            self.coordinates[a] += np.bincount(
                flat, weights=grids[a] + (0.5 + origin[a]), minlength=self.count + 1
            )
        if image is not None:
            if self.intensity is None:
                self.intensity = np.zeros(self.count + 1, np.float64)
            self.intensity += np.bincount(
                flat, weights=np.asarray(image).ravel(), minlength=self.count + 1
            )

    def select(self, lookup: np.ndarray) -> InstanceSums:
        """The sums of the kept instances under new ids: `lookup[old id]` (0 = dropped)."""
        lookup = np.asarray(lookup)
        keep = lookup[1:] > 0
        kept = InstanceSums(int(keep.sum()))
        index = np.concatenate([[0], np.nonzero(keep)[0] + 1])
        kept.voxels = self.voxels[index]
        kept.coordinates = self.coordinates[:, index]
        if self.intensity is not None:
            kept.intensity = self.intensity[index]
        return kept

    def rows(
        self,
        scores: np.ndarray,
        resolution: Sequence[float],
        offset_nm: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> list[dict]:
        """One row per instance id 1..k (see `instance_rows`).

        Raises:
          DataError: `scores` does not hold one score per instance.
        """
        if scores.shape != (self.count,):
            raise DataError(f"instance table: {scores.shape[0]} scores for {self.count} instances")
        voxels = self.voxels[1:]
        safe = np.maximum(voxels, 1)
        centroid = [self.coordinates[a][1:] / safe * resolution[a] + offset_nm[a] for a in range(3)]
        voxel_um3 = float(np.prod(resolution)) / 1e9
        rows = [
            {
                "id": i + 1,
                "z_nm": float(centroid[0][i]),
                "y_nm": float(centroid[1][i]),
                "x_nm": float(centroid[2][i]),
                "voxels": int(voxels[i]),
                "volume_um3": float(voxels[i] * voxel_um3),
                "score": float(scores[i]),
            }
            for i in range(self.count)
        ]
        if self.intensity is not None:
            for row, total, n in zip(rows, self.intensity[1:], safe, strict=True):
                row["mean_intensity"] = float(total / n)
        return rows


def instance_rows(
    labels: np.ndarray,
    scores: np.ndarray,
    resolution: Sequence[float],
    offset_nm: Sequence[float] = (0.0, 0.0, 0.0),
    image: np.ndarray | None = None,
) -> list[dict]:
    """One row per instance id 1..k: centroid (nm), voxels, volume, mean intensity, score.

    Args:
      labels: [z, y, x] instance ids 1..k (0 background).
      scores: [k] score of instance i + 1.
      resolution: voxel size (z, y, x) in nm.
      offset_nm: (z, y, x) position in nm of the labels' voxel (0, 0, 0) corner.
      image: optional [z, y, x] raw intensities; adds "mean_intensity".

    Returns:
      Rows with "id", "z_nm", "y_nm", "x_nm" (centroid of voxel centres),
      "voxels", "volume_um3", "score", and "mean_intensity" when `image` is given.

    Raises:
      DataError: `scores` does not hold one score per instance.
    """
    sums = InstanceSums(int(labels.max()) if labels.size else 0)
    sums.add(labels, image=image)
    return sums.rows(scores, resolution, offset_nm)


def write_instance_table(path: str | os.PathLike, rows: list[dict], columns: Sequence[str]) -> None:
    """Writes `columns` of `rows` as CSV, atomically (ids and voxel counts as integers)."""
    with atomic_open(pathlib.Path(path), "w") as stream:
        stream.write(",".join(columns) + "\n")
        for row in rows:
            stream.write(
                ",".join(str(row[c]) if c in _INTEGER_COLUMNS else f"{row[c]:.6g}" for c in columns)
            )
            stream.write("\n")


def write_instance_labels(
    path: str | os.PathLike, labels: np.ndarray, resolution: Sequence[float]
) -> None:
    """Writes `[z, y, x]` instance ids as a uint32 zarr volume (replacing one there)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    volume = create_volume(
        str(path), labels.shape, np.uint32, resolution=resolution, overwrite=True
    )
    volume[...] = labels
