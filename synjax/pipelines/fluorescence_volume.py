"""The fluorescence pipeline on a user's volume: the 3D Mask R-CNN block by block, merged.

    python -m synjax.main --config=configs/fluorescence.py --workdir=RUN --config.mode=predict \
        --config.predict.input=/data/puncta.zarr --config.predict.output=/data/puncta_synapses

The result is the in-memory prediction of the same volume (`stages.mask_rcnn.
detect_volume` + `inference.instances.merge_detections`, Chen et al.'s sparse
merge) computed with memory bounded by a block, whatever the block size:

1. Patches. `config.predict.input` (`volume_input.py`, optionally its `roi`)
   is covered by the patches of the whole region, as in memory: the network's
   input `config.train.patch`, overlapping by `config.predict.overlap`
   (`inference.instances.patch_starts`). The patch grid depends on the region
   only, never on the block size.
2. Detection, block by block. The region is cut into `config.predict.block`
   cells (`BlockGrid`); a block reads the raw voxels of the patches that start
   in its cell, normalises them as in training (`data.intensity`, saved with
   the checkpoint), detects, and keeps the detections scoring above the
   threshold chosen on the training volume (`RUN/chosen.json`), their masks
   pasted as sparse voxel lists (`mask_rcnn_detections/block_<id>.npz`). A
   done-state beside them records the model, the input and the threshold:
   a run killed part-way resumes without detecting a finished block again,
   and a block that fails every try (`config.predict.retries`) stops the run
   naming it.
3. Merge. Every detection gets the index it has in memory (patch order, then
   detection order). The pairwise mask overlaps (`A^T A` of the sparse merge)
   are counted cell by cell, each cell from the masks that reach it, and
   summed; the links (at least `config.predict.min_overlap` voxels) and mask
   sizes go through the merge's rounds (`inference.merge.keep_one_per_group`).
   Only one number per detection and per overlapping pair is in memory.
4. Painting, cell by cell, with `paint_masks`' rule (largest kept mask first,
   a smaller one on top), into `instances.zarr`; instances painted over
   entirely are dropped and the rest renumbered as in memory.

Outputs, in `config.predict.output`: `instances.zarr` (uint32 ids 1..n, the
input's voxel size, offset: the region's corner in nm) and `instances.csv`
(one row per instance: id, centroid in nm in the input's frame, voxels,
volume in um^3, mean raw intensity, score). Detection runs on this machine's
default device (`config.predict.executor="local"`) or on Dask workers
(`"dask"`, on `config.predict.scheduler` or a LocalCluster), each loading the
Mask R-CNN once and writing its block files itself; the merge and painting
run here (`synjax.pipelines.volume_blocks`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse
from absl import logging

from synjax.data.intensity import load_normalization, normalize_intensity
from synjax.errors import DataError
from synjax.geometry import Box
from synjax.inference.block_grid import BlockGrid
from synjax.inference.done_blocks import done_state_differences, open_done_state
from synjax.inference.instances import paste_detections, patch_starts
from synjax.inference.lazy_model import LazyPredictor
from synjax.inference.merge import keep_one_per_group, mask_overlaps
from synjax.io import create_volume, layout
from synjax.io.atomic import atomic_open
from synjax.io.instance_table import InstanceSums, write_instance_table
from synjax.io.provenance import input_fingerprint
from synjax.pipelines import volume_input
from synjax.pipelines.fluorescence import OURS, TABLE_COLUMNS, warn_tied_scores
from synjax.pipelines.volume_blocks import BlockWork, check_executor, predict_pending
from synjax.report import files
from synjax.report.progress import progress_bar
from synjax.stages import mask_rcnn
from synjax.train import checkpoint

# The per-block detections (sparse masks) and, beside them, their done-state.
DETECTIONS_DIR = "mask_rcnn_detections"
# Largest chunk of the instance labels; smaller where the block is.
OUTPUT_CHUNKS = (16, 256, 256)
# The paste's mask threshold, as in memory (`inference.instances.detect_patches`).
MASK_THRESHOLD = 0.5
_KEYS = ("patch", "index", "score", "length", "low", "high")


class PatchPlan:
    """The patches of a region and the block cells they start in.

    Args:
      shape: (z, y, x) of the region.
      patch: (z, y, x) network input.
      overlap: (z, y, x) overlap of neighbouring patches.
      grid: the cells of the blocks.
    """

    def __init__(self, shape, patch, overlap, grid: BlockGrid):
        self.shape = tuple(int(s) for s in shape)
        self.patch = tuple(int(p) for p in patch)
        # A region smaller than a patch is padded at its end (one start, 0), as in memory.
        self.starts = [
            np.asarray(patch_starts(max(s, p), p, int(o)), np.int64)
            for s, p, o in zip(self.shape, self.patch, overlap, strict=True)
        ]
        self.counts = tuple(len(s) for s in self.starts)
        self.grid = grid

    @property
    def num_patches(self) -> int:
        return int(np.prod(self.counts))

    def cell(self, block_id: int) -> Box:
        """The voxels of a block's cell (cropped to the region)."""
        return self.grid.block_box(block_id).intersect(Box.from_shape(self.shape))

    def patches_of(self, block_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(global indices [n], increasing; origins [n, 3]) of the patches starting in a cell."""
        box = self.cell(block_id)
        axes = [
            np.flatnonzero((s >= a) & (s < b))
            for s, a, b in zip(self.starts, box.start, box.stop, strict=True)
        ]
        grid = np.meshgrid(*axes, indexing="ij")
        index = np.stack([g.ravel() for g in grid], axis=1)
        origins = np.stack([self.starts[a][index[:, a]] for a in range(3)], axis=1)
        return np.ravel_multi_index(tuple(index.T), self.counts).astype(np.int64), origins

    def blocks_reaching(self, block_id: int) -> list[int]:
        """The cells whose patches' masks can cover voxels of cell `block_id` (itself included).

        A patch starting in cell j (voxels [j * block, (j + 1) * block)) covers
        voxels up to (j + 1) * block - 1 + patch, so it reaches cell i >= j
        when j >= i - ceil((patch - 1) / block), on each axis.
        """
        index = self.grid.block_index(block_id)
        ranges = [
            range(max(0, i - -(-(p - 1) // b)), i + 1)
            for i, p, b in zip(index, self.patch, self.grid.block_shape, strict=True)
        ]
        return [
            int(np.ravel_multi_index((z, y, x), self.grid.grid_shape))
            for z in ranges[0]
            for y in ranges[1]
            for x in ranges[2]
        ]


def detect_block(detector, source, intensity, plan: PatchPlan, block_id: int, threshold, batch):
    """The detections of the patches that start in one cell (see the module docstring).

    Args:
      detector: `stages.mask_rcnn.patch_detector` of the trained model.
      source: the region, `[z, y, x]` raw (numpy slicing).
      intensity: the training run's `IntensityNormalization`.
      plan: the region's patches and cells.
      block_id: the cell.
      threshold: detections scoring at or below this are left out.
      batch: patches per detector call (the last call padded with empty patches).

    Returns:
      {"patch" [n] global patch index, "index" [n] detection index in its
      patch, "score" [n] float32, "length" [n] mask voxels, "low"/"high"
      [n, 3] the mask's bounding box (voxels, stop exclusive), "voxels" [sum
      length] int64 flat region indices of the masks, one after another}.
    """
    patches, origins = plan.patches_of(block_id)
    found = []
    if patches.size:
        low = origins.min(axis=0)
        high = np.minimum(origins.max(axis=0) + plan.patch, plan.shape)
        read = tuple(slice(int(a), int(b)) for a, b in zip(low, high, strict=True))
        image = normalize_intensity(np.asarray(source[read]), intensity, "Mask R-CNN input")
        for first in range(0, patches.size, batch):
            chunk = origins[first : first + batch]
            stack = np.zeros((batch, *plan.patch), np.float32)  # zero past the region's end
            for i, origin in enumerate(chunk):
                data = image[
                    tuple(
                        slice(int(o - a), int(o - a + p))
                        for o, a, p in zip(origin, low, plan.patch, strict=True)
                    )
                ]
                stack[(i, *(slice(0, n) for n in data.shape))] = data
            pasted = paste_detections(
                detector(stack),
                [tuple(int(v) for v in o) for o in chunk],
                plan.shape,
                min_score=threshold,
                mask_threshold=MASK_THRESHOLD,
            )
            found += [(int(patches[first + i]), d, v, s) for i, d, v, s in pasted]
    voxels = [v for _, _, v, _ in found]
    coords = [np.stack(np.unravel_index(v, plan.shape), axis=1) for v in voxels]
    return {
        "patch": np.asarray([p for p, _, _, _ in found], np.int64),
        "index": np.asarray([d for _, d, _, _ in found], np.int64),
        "score": np.asarray([s for _, _, _, s in found], np.float32),
        "length": np.asarray([v.size for v in voxels], np.int64),
        "low": np.asarray([c.min(axis=0) for c in coords], np.int64).reshape(-1, 3),
        "high": np.asarray([c.max(axis=0) + 1 for c in coords], np.int64).reshape(-1, 3),
        "voxels": np.concatenate(voxels) if voxels else np.zeros(0, np.int64),
    }


def _block_file(folder: pathlib.Path, block_id: int) -> pathlib.Path:
    return folder / f"block_{block_id}.npz"


def _load(path: pathlib.Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays `keys` of a stored block.

    Raises:
      DataError: the file is missing or unreadable though its block is recorded as done.
    """
    try:
        with np.load(path) as data:
            return {key: data[key] for key in keys}
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"{path}: a block recorded as done cannot be read ({error}); delete "
            f"{layout.blocks_manifest(path.parent)} to detect every block again"
        ) from error


def _save(path: pathlib.Path, found: dict) -> None:
    with atomic_open(path, "wb") as stream:
        np.savez(stream, **found)


class Detections:
    """The stored detections of every cell, indexed as in memory.

    `column` of a detection is its place in the in-memory order (patch, then
    detection index): the merge's column and tie-break.

    Args:
      folder: the per-block files.
      plan: the region's patches and cells.
    """

    def __init__(self, folder: pathlib.Path, plan: PatchPlan):
        self.folder, self.plan = folder, plan
        meta = {key: [] for key in _KEYS}
        self.block_of, self.position = [], []
        for b in plan.grid.block_ids():
            data = _load(_block_file(folder, b), _KEYS)
            for key in _KEYS:
                meta[key].append(data[key])
            n = meta["patch"][-1].size
            self.block_of.append(np.full(n, b, np.int64))
            self.position.append(np.arange(n, dtype=np.int64))
        for key in _KEYS:
            meta[key] = np.concatenate(meta[key]) if meta[key] else np.zeros(0)
        order = np.lexsort((meta["index"], meta["patch"]))
        # Everything below is in column order.
        self.scores = meta["score"][order].astype(np.float32)
        self.sizes = meta["length"][order].astype(np.int64)
        self.low, self.high = meta["low"][order], meta["high"][order]
        self.block_of = np.concatenate(self.block_of)[order]
        self.position = np.concatenate(self.position)[order]
        self.count = int(order.size)
        # The columns of each cell, increasing.
        by_block = np.argsort(self.block_of, kind="stable")
        bounds = np.searchsorted(self.block_of[by_block], np.arange(plan.grid.num_blocks + 1))
        self._columns = [by_block[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def in_region(self, region: Box, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The voxels of `region` covered by the masks of `columns`, flat in the region.

        Returns:
          (voxels [k] int64 flat indices in `region`, their columns [k]); the
          columns in increasing order.
        """
        columns = np.asarray(columns, np.int64)
        start, stop = np.asarray(region.start), np.asarray(region.stop)
        meets = np.all((self.low[columns] < stop) & (self.high[columns] > start), axis=1)
        columns = columns[meets]
        voxels, owners = [], []
        for b in np.unique(self.block_of[columns]):
            mine = columns[self.block_of[columns] == b]
            data = _load(_block_file(self.folder, int(b)), ("length", "voxels"))
            lengths, flat = data["length"], data["voxels"]
            ends = np.cumsum(lengths)
            for column in mine:
                p = self.position[column]
                voxels.append(flat[ends[p] - lengths[p] : ends[p]])
                owners.append(np.full(lengths[p], column, np.int64))
        if not voxels:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        voxels, owners = np.concatenate(voxels), np.concatenate(owners)
        coords = np.stack(np.unravel_index(voxels, self.plan.shape), axis=0)
        inside = np.all((coords >= start[:, None]) & (coords < stop[:, None]), axis=0)
        local = np.ravel_multi_index(
            tuple(coords[:, inside] - start[:, None]), tuple(int(s) for s in region.shape)
        )
        return local.astype(np.int64), owners[inside]

    def columns_reaching(self, block_id: int) -> np.ndarray:
        """The columns stored by the cells whose patches reach cell `block_id`, increasing."""
        reaching = [self._columns[b] for b in self.plan.blocks_reaching(block_id)]
        return np.sort(np.concatenate(reaching))


def count_links(found: Detections, min_overlap: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs of detections sharing at least `min_overlap` voxels, counted cell by cell.

    Returns:
      (first [e], second [e]) columns, first < second, each pair once.
    """
    n = max(found.count, 1)
    keys, counts = [], []
    for b in found.plan.grid.block_ids():
        region = found.plan.cell(b)
        voxels, owners = found.in_region(region, found.columns_reaching(b))
        if voxels.size == 0:
            continue
        # Local columns in increasing global order, so that first < second holds globally.
        present, local = np.unique(owners, return_inverse=True)
        matrix = scipy.sparse.csc_matrix(
            (np.ones(voxels.size, bool), (voxels, local)),
            shape=(int(np.prod(region.shape)), present.size),
        )
        first, second, overlap = mask_overlaps(matrix, 1)
        keys.append(present[first] * n + present[second])
        counts.append(overlap)
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    totals = np.bincount(inverse, weights=np.concatenate(counts))
    linked = pairs[totals >= min_overlap]
    return linked // n, linked % n


def paint_ranks(sizes: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`paint_masks`' order of the kept masks: (rank of each kept position, position of each rank).

    Largest first, among equal sizes the later in `kept` first; the highest
    rank covering a voxel is on top.
    """
    paint_order = np.lexsort((-np.arange(kept.size), -sizes[kept]))
    rank = np.empty(kept.size, np.int64)
    rank[paint_order] = np.arange(kept.size)
    return rank, paint_order


def paint_cell(found: Detections, block_id: int, position_of, rank, paint_order) -> np.ndarray:
    """`[cell shape]` uint32 labels of one cell: kept position + 1 of the mask on top.

    Args:
      found: the stored detections.
      block_id: the cell.
      position_of: [columns] position of each column in the kept masks, -1 if not kept.
      rank, paint_order: `paint_ranks` of the kept masks.
    """
    region = found.plan.cell(block_id)
    columns = found.columns_reaching(block_id)
    columns = columns[position_of[columns] >= 0]
    voxels, owners = found.in_region(region, columns)
    top = np.full(int(np.prod(region.shape)), -1, np.int64)
    np.maximum.at(top, voxels, rank[position_of[owners]])
    labels = np.where(top >= 0, paint_order[np.maximum(top, 0)] + 1, 0).astype(np.uint32)
    return labels.reshape(region.shape)


def _chosen_threshold(workdir: pathlib.Path) -> float:
    path = workdir / layout.CHOSEN_FILE
    if not path.is_file():
        raise DataError(
            f"{path} is missing: train in this workdir first (config.mode=train), which "
            "chooses the Mask R-CNN's score threshold on the training volume"
        )
    chosen = files.read_json(path)
    if OURS not in chosen or "score_threshold" not in chosen[OURS]:
        raise DataError(f"{path}: no {OURS}.score_threshold (not a fluorescence run's choice)")
    return float(chosen[OURS]["score_threshold"])


def _detect_blocks(config, workdir, source, plan, threshold, provenance, out_dir) -> pathlib.Path:
    """Detects every cell not yet done; returns the folder of the per-block detections."""
    predict = config.predict
    folder = out_dir / DETECTIONS_DIR
    done_path = layout.blocks_manifest(folder)
    stale = done_state_differences(done_path, plan.grid, provenance) if done_path.exists() else None
    if stale and predict.resume != "strict":
        logging.warning("%s was made differently (%s); detecting afresh", folder, "; ".join(stale))
        shutil.rmtree(folder, ignore_errors=True)
    done = open_done_state(done_path, plan.grid, provenance, predict.resume)
    folder.mkdir(parents=True, exist_ok=True)
    if not done.todo().size:
        logging.info(
            "All %d blocks of %s were detected before: reused", plan.grid.num_blocks, folder
        )
        return folder
    executor = str(predict.executor)
    check_executor(executor)
    if executor == "dask":
        # Each worker loads the Mask R-CNN from the workdir's checkpoint once.
        detector = LazyPredictor(load_patch_detector, config, str(workdir))
    else:
        detector = load_patch_detector(config, str(workdir))
    intensity = load_normalization(checkpoint.checkpoint_dir(workdir, mask_rcnn.MODEL_NAME))
    work = BlockWork(
        predict=DetectCells(detector, source, intensity, plan, threshold, int(predict.batch_size)),
        store=SaveCells(folder),
        describe=DescribeCell(plan),
        batch_size=1,
        retries=int(predict.retries),
    )
    predict_pending(
        done,
        plan.grid.num_blocks,
        work,
        desc="Mask R-CNN",
        output=str(folder),
        executor=executor,
        client=predict.scheduler or None,
    )
    return folder


def load_patch_detector(config, workdir: str):
    """The patch detector of the Mask R-CNN trained in `workdir` (`mask_rcnn.patch_detector`)."""
    trained = mask_rcnn.load_mask_rcnn(config, pathlib.Path(workdir))
    return mask_rcnn.patch_detector(
        mask_rcnn.mask_rcnn_settings(config.model, config.seed), trained.params
    )


@dataclasses.dataclass(frozen=True)
class DetectCells:
    """Cell ids -> their detections (`detect_block` each); picklable with its detector."""

    detector: Callable
    source: Any
    intensity: Any
    plan: PatchPlan
    threshold: float
    batch: int

    def __call__(self, chunk: list[int]) -> list[dict]:
        return [
            detect_block(
                self.detector, self.source, self.intensity, self.plan, b, self.threshold, self.batch
            )
            for b in chunk
        ]


@dataclasses.dataclass(frozen=True)
class SaveCells:
    """Writes each cell's detections to its own file (atomic, so durable when it returns)."""

    folder: pathlib.Path

    def __call__(self, chunk: list[int], results: list[dict]) -> None:
        for b, found in zip(chunk, results, strict=True):
            _save(_block_file(self.folder, b), found)


@dataclasses.dataclass(frozen=True)
class DescribeCell:
    """Cell ids -> words naming the first and the voxels its patches start in (picklable)."""

    plan: PatchPlan

    def __call__(self, chunk: Sequence[int]) -> str:
        box = self.plan.cell(chunk[0])
        return (
            f"Mask R-CNN block {chunk[0]} (patches starting in voxels "
            f"{box.start}..{box.stop} of the region)"
        )


def predict_volume(config, workdir: pathlib.Path) -> pathlib.Path:
    """Fluorescent synapse instances of `config.predict.input` with the Mask R-CNN of `workdir`.

    Returns:
      The path of the instance labels.

    Raises:
      DataError: no `chosen.json` or checkpoint in `workdir`, a bad input
        (named in one line), or a block that failed every try.
    """
    workdir = pathlib.Path(workdir)
    threshold = _chosen_threshold(workdir)
    raw, roi = volume_input.open_input(config)
    source = volume_input.RegionVolume(raw, roi)
    predict = config.predict
    grid = BlockGrid(source.shape, tuple(int(b) for b in predict.block))
    plan = PatchPlan(source.shape, config.train.patch, predict.overlap, grid)
    name = mask_rcnn.MODEL_NAME
    model = checkpoint.checkpoint_provenance(workdir, name)
    intensity = load_normalization(checkpoint.checkpoint_dir(workdir, name))
    provenance = {
        "model": model | {"intensity": intensity.to_dict()},
        "input": input_fingerprint(raw, path=predict.input)
        | {"roi": [list(roi.start), list(roi.stop)]},
        "detection": {
            "score_threshold": threshold,
            "patch": list(plan.patch),
            "overlap": [int(o) for o in predict.overlap],
            "mask_threshold": MASK_THRESHOLD,
        },
    }
    out_dir = volume_input.output_dir(config)
    logging.info(
        "Predicting fluorescent synapses of %s (region %s..%s, %d patches in %d blocks) into %s",
        predict.input,
        roi.start,
        roi.stop,
        plan.num_patches,
        grid.num_blocks,
        out_dir,
    )
    folder = _detect_blocks(config, workdir, source, plan, threshold, provenance, out_dir)

    found = Detections(folder, plan)
    first, second = count_links(found, int(predict.min_overlap))
    kept = keep_one_per_group(found.sizes, first, second)
    rank, paint_order = paint_ranks(found.sizes, kept)
    logging.info("%d detections above %.3g merged into %d masks", found.count, threshold, kept.size)

    resolution = tuple(float(r) for r in raw.resolution)
    offset = tuple(
        float(o) + a * float(r)
        for o, a, r in zip(raw.offset, roi.start, raw.resolution, strict=True)
    )
    chunks = tuple(
        min(c, b, n) for c, b, n in zip(OUTPUT_CHUNKS, grid.block_shape, source.shape, strict=True)
    )
    out_path = out_dir / layout.VOLUME_INSTANCES
    out = create_volume(
        str(out_path),
        source.shape,
        np.uint32,
        resolution=resolution,
        offset=offset,
        chunks=chunks,
        overwrite=True,
    )
    position_of = np.full(found.count, -1, np.int64)
    position_of[kept] = np.arange(kept.size)
    sums = InstanceSums(int(kept.size))
    for b in progress_bar(grid.block_ids(), unit="block", desc="painting"):
        region = plan.cell(b)
        labels = paint_cell(found, b, position_of, rank, paint_order)
        out[region.slices()] = labels
        sums.add(labels, origin=region.start, image=np.asarray(source[region.slices()]))
    # A kept mask painted over entirely by smaller ones leaves no id behind (as in memory).
    lookup = np.zeros(kept.size + 1, np.uint32)
    present = np.flatnonzero(sums.voxels[1:]) + 1
    lookup[present] = np.arange(1, present.size + 1, dtype=np.uint32)
    if present.size < kept.size:
        for b in grid.block_ids():
            region = plan.cell(b)
            out[region.slices()] = lookup[np.asarray(out[region.slices()])]
        sums = sums.select(lookup)
    scores = found.scores[kept][present - 1]
    warn_tied_scores(scores)
    write_instance_table(
        out_dir / layout.VOLUME_INSTANCES_TABLE,
        sums.rows(scores, resolution, offset),
        TABLE_COLUMNS,
    )
    logging.info(
        "%d synapse instances in %s and %s",
        sums.count,
        out_path,
        out_dir / layout.VOLUME_INSTANCES_TABLE,
    )
    return out_path
