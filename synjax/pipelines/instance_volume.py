"""The EM instance pipeline on a user's volume: the instance network block by block, fused.

    python -m synjax.main --config=configs/vnc.py --workdir=RUN --config.mode=predict \
        --config.predict.input=/data/em.zarr --config.predict.output=/data/em_synapses

`config.predict.input` (`volume_input.py`, optionally its `roi`) is read on
the network's grid: the mean over each `config.data.downsample` cell, as in
training (voxels past the last whole cell at the far edges are left out). It
is cut into the overlapping blocks of `config.predict.block` and `overlap`,
each detected by the network trained in RUN and painted with the painting
chosen on the validation slab (`RUN/chosen.json`); the blocks are fused along
z, then x, then y (`synjax.inference.fusion`) and instances under the chosen
size dropped. Outputs, in
`config.predict.output`:

* `instances.zarr`: uint32 instance ids 1..n on the network's grid (voxel
  size: the input's times the down-sampling; offset: the region's corner);
* `instances.csv`: one row per instance (id, centroid in nm in the input's
  frame, voxels, volume, score);
* `instance_blocks.zarr` and `instance_scores.zarr`: each block's painted
  labels (one chunk per block, stacked along z) and scores, with a done-state
  that records the model, the input and the painting. A run killed part-way
  resumes without detecting a finished block again; one made with another
  model, input or painting is predicted afresh (`resume="auto"`) or refused
  (`"strict"`).

Memory holds one block, its detections and tables of ids: never the volume.
Detection runs on this machine's default device (`config.predict.executor=
"local"`) or on Dask workers (`"dask"`, on `config.predict.scheduler` or a
LocalCluster), each loading the network once and storing its blocks itself;
the fusion runs here (`synjax.pipelines.volume_blocks`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import logging

from synjax.data.intensity import load_normalization, normalize_intensity
from synjax.errors import DataError
from synjax.geometry import Box
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_output import open_block_output
from synjax.inference.done_blocks import open_done_state
from synjax.inference.fusion import block_boxes, fuse_blocks
from synjax.inference.instance_blocks import (
    AXIS_ORDER,
    FusedScores,
    Painting,
    block_detections,
    paint_block,
)
from synjax.inference.lazy_model import LazyPredictor
from synjax.io import create_volume, layout, open_volume
from synjax.io.instance_table import InstanceSums, write_instance_table
from synjax.io.provenance import input_fingerprint
from synjax.pipelines import volume_input
from synjax.pipelines.instance_data import downsample_image
from synjax.pipelines.instances import OURS, TABLE_COLUMNS, chosen_painting
from synjax.pipelines.volume_blocks import BlockWork, check_executor, predict_pending
from synjax.postprocess.components import keep_large_instances
from synjax.report import files
from synjax.settings import from_config
from synjax.stages import instance_unet
from synjax.stages.instance_settings import InstancePredictSettings
from synjax.train import checkpoint
from synjax.train.checkpoint import checkpoint_provenance

# Chunks of the fused labels (and of the table's block-wise pass).
OUTPUT_CHUNKS = (16, 256, 256)


def read_block_image(source, box: Box, factors, intensity) -> np.ndarray:
    """The normalised network input of a read-grid `box`: cell means of the native voxels.

    Args:
      source: the native `[z, y, x]` volume (numpy slicing).
      box: the block on the read grid.
      factors: (z, y, x) down-sampling of the read grid.
      intensity: the training run's `IntensityNormalization`.

    Returns:
      `[box.shape]` float32.
    """
    native = tuple(
        slice(a * f, b * f) for a, b, f in zip(box.start, box.stop, factors, strict=True)
    )
    image = downsample_image(np.asarray(source[native]), factors)
    return normalize_intensity(image, intensity, "instance network input")


def _scores_store(path: pathlib.Path, num_blocks: int, detections: int, reuse: bool):
    """Per-block scores `[blocks, 1, detections]`, kept when the painted blocks are reused."""
    if reuse and path.exists():
        return open_volume(str(path), mode="r+")
    return create_volume(
        str(path),
        (num_blocks, 1, detections),
        np.float32,
        chunks=(1, 1, detections),
        overwrite=True,
    )


def _paint_blocks(
    config, predict, workdir, source, boxes, factors, intensity, painting, provenance, out_dir
):
    """Detects and paints every block not yet done; returns the two stores."""
    model = instance_unet.network_block(config)
    block = instance_unet.check_shape(
        predict.block,
        instance_unet.backbone_settings(model).input_multiple,
        "config.predict.block",
    )
    detections = int(model.detections)
    stack_shape = (len(boxes) * block[0], block[1], block[2])
    grid = BlockGrid(stack_shape, block)
    labels_path = out_dir / layout.VOLUME_INSTANCE_BLOCKS
    labels_store, done_path = open_block_output(
        labels_path, stack_shape, np.uint32, grid, provenance, predict.resume, chunks=block
    )
    scores_store = _scores_store(
        out_dir / layout.VOLUME_INSTANCE_SCORES, len(boxes), detections, reuse=done_path.exists()
    )
    done = open_done_state(done_path, grid, provenance, predict.resume)
    if not done.todo().size:
        logging.info("All %d blocks of %s were painted before: reused", len(boxes), labels_path)
        return labels_store, scores_store, block
    executor = str(predict.executor)
    check_executor(executor)
    if executor == "dask":
        # Each worker loads the network from the workdir's checkpoint once.
        detector = LazyPredictor(load_block_detector, config, str(workdir))
    else:
        detector = load_block_detector(config, str(workdir))
    work = BlockWork(
        predict=PaintBlocks(detector, source, tuple(boxes), block, factors, intensity, painting),
        store=StorePainted(labels_store, scores_store, block, detections),
        describe=DescribeBlocks(tuple(boxes)),
        batch_size=int(predict.batch_size),
        retries=int(predict.retries),
    )
    predict_pending(
        done,
        len(boxes),
        work,
        desc="instances",
        output=str(labels_path),
        executor=executor,
        client=predict.scheduler or None,
    )
    return labels_store, scores_store, block


def load_block_detector(config, workdir: str):
    """The detector of the instance network trained in `workdir` (`block_detector`)."""
    trained = instance_unet.load_instance_unet(config, pathlib.Path(workdir))
    return instance_unet.block_detector(config, trained.params)


@dataclasses.dataclass(frozen=True)
class PaintBlocks:
    """Block ids -> their painted (labels [box.shape], scores [k]); picklable with its detector.

    Attributes:
      detector: `[n, *block]` normalised images -> detections (`block_detector`).
      source: the native `[z, y, x]` region.
      boxes: every block's box on the read grid.
      block: (z, y, x) of the network's blocks.
      factors: (z, y, x) down-sampling of the read grid.
      intensity: the training run's `IntensityNormalization`.
      painting: the painting chosen on the validation slab.
    """

    detector: Callable
    source: Any
    boxes: tuple[Box, ...]
    block: tuple[int, int, int]
    factors: tuple[int, int, int]
    intensity: Any
    painting: Painting

    def __call__(self, chunk: list[int]):
        boxes = [self.boxes[b] for b in chunk]
        images = np.zeros((len(boxes), *self.block), np.float32)
        for i, box in enumerate(boxes):
            data = read_block_image(self.source, box, self.factors, self.intensity)
            images[(i, *(slice(0, n) for n in data.shape))] = data
        out = self.detector(images)
        return [
            paint_block(block_detections(out, i, box), box.shape, self.painting)
            for i, box in enumerate(boxes)
        ]


@dataclasses.dataclass(frozen=True)
class StorePainted:
    """Writes painted blocks into their chunks of the two stores, durably (picklable)."""

    labels_store: Any
    scores_store: Any
    block: tuple[int, int, int]
    detections: int

    def __call__(self, chunk: list[int], painted) -> None:
        block = self.block
        for b, (labels, scores) in zip(chunk, painted, strict=True):
            full = np.zeros(block, np.uint32)
            full[tuple(slice(0, n) for n in labels.shape)] = labels
            self.labels_store[b * block[0] : (b + 1) * block[0]] = full
            row = np.zeros((1, 1, self.detections), np.float32)
            row[0, 0, : scores.size] = scores
            self.scores_store[b : b + 1] = row
        # The blocks are recorded as done next: their data must be durable first.
        for store in (self.labels_store, self.scores_store):
            if hasattr(store, "flush"):
                store.flush()


@dataclasses.dataclass(frozen=True)
class DescribeBlocks:
    """Block ids -> words naming them and the first one's read-grid box (picklable)."""

    boxes: tuple[Box, ...]

    def __call__(self, chunk) -> str:
        b = chunk[0]
        return (
            f"instance blocks {list(chunk)} (first: read-grid voxels "
            f"{self.boxes[b].start}..{self.boxes[b].stop})"
        )


def predict_volume(config, workdir: pathlib.Path) -> pathlib.Path:
    """Synapse instances of `config.predict.input` with the network trained in `workdir`.

    Returns:
      The path of the fused instance labels.

    Raises:
      DataError: no trained network or `chosen.json` in `workdir`, a bad
        input (named in one line), or a block that failed every try.
    """
    workdir = pathlib.Path(workdir)
    chosen_path = workdir / layout.CHOSEN_FILE
    if not chosen_path.is_file():
        raise DataError(
            f"{chosen_path} is missing: train in this workdir first (config.mode=train), "
            "which chooses the painting on the validation slab"
        )
    chosen = files.read_json(chosen_path)[OURS]
    painting = chosen_painting(chosen)
    raw, roi = volume_input.open_input(config)
    source = volume_input.RegionVolume(raw, roi)
    factors = tuple(int(f) for f in config.data.downsample)
    read_shape = tuple(n // f for n, f in zip(source.shape, factors, strict=True))
    if min(read_shape) < 1:
        raise DataError(
            f"{volume_input.INPUT_KEY}={config.predict.input!r}: region {source.shape} is "
            f"smaller than one cell of config.data.downsample={factors}"
        )
    predict = from_config(InstancePredictSettings, config.predict, "config.predict")
    boxes = block_boxes(read_shape, tuple(predict.block), tuple(predict.overlap))
    out_dir = volume_input.output_dir(config)
    name = instance_unet.MODEL_NAME
    intensity = load_normalization(checkpoint.checkpoint_dir(workdir, name))
    provenance = {
        "model": checkpoint_provenance(workdir, name) | {"intensity": intensity.to_dict()},
        "input": input_fingerprint(raw, path=config.predict.input)
        | {"roi": [list(roi.start), list(roi.stop)]},
        "painting": painting._asdict(),
        "grid": {"downsample": list(factors), "overlap": list(predict.overlap)},
    }
    logging.info(
        "Predicting instances of %s (region %s..%s, read grid %s, %d blocks) into %s",
        config.predict.input,
        roi.start,
        roi.stop,
        read_shape,
        len(boxes),
        out_dir,
    )
    labels_store, scores_store, block = _paint_blocks(
        config, predict, workdir, source, boxes, factors, intensity, painting, provenance, out_dir
    )

    resolution = tuple(float(r) * f for r, f in zip(raw.resolution, factors, strict=True))
    offset = tuple(
        float(o) + a * float(r)
        for o, a, r in zip(raw.offset, roi.start, raw.resolution, strict=True)
    )
    chunks = tuple(min(c, n) for c, n in zip(OUTPUT_CHUNKS, read_shape, strict=True))
    out_path = out_dir / layout.VOLUME_INSTANCES
    out = create_volume(
        str(out_path),
        read_shape,
        np.uint32,
        resolution=resolution,
        offset=offset,
        chunks=chunks,
        overwrite=True,
    )

    def block_labels(i: int) -> np.ndarray:
        box = boxes[i]
        z0 = i * block[0]
        return np.asarray(labels_store[z0 : z0 + box.shape[0], : box.shape[1], : box.shape[2]])

    scores = FusedScores()
    count = fuse_blocks(
        boxes,
        block_labels,
        out,
        iou_threshold=float(predict.fusion_iou),
        axis_order=AXIS_ORDER,
        scratch_dir=out_dir,
        on_block_ids=lambda b, local, fused: scores.add(
            local, fused, np.asarray(scores_store[b : b + 1])[0, 0]
        ),
    )
    sums = InstanceSums(count)
    grid = BlockGrid(read_shape, chunks)
    for b in grid.block_ids():
        region = grid.output_box(b)
        sums.add(np.asarray(out[region]), origin=tuple(r.start for r in region))
    fused_scores = scores.result(count)
    # The smallest instance chosen on the validation slab (read voxels), block by block.
    lookup = keep_large_instances(sums.voxels[1:], int(chosen.get("min_size", 0)))
    if np.count_nonzero(lookup) < count:
        for b in grid.block_ids():
            region = grid.output_box(b)
            out[region] = lookup[np.asarray(out[region])]
        sums = sums.select(lookup)
        fused_scores = fused_scores[lookup[1:] > 0]
    write_instance_table(
        out_dir / layout.VOLUME_INSTANCES_TABLE,
        sums.rows(fused_scores, resolution, offset),
        TABLE_COLUMNS,
    )
    logging.info(
        "%d synapse instances in %s and %s",
        sums.count,
        out_path,
        out_dir / layout.VOLUME_INSTANCES_TABLE,
    )
    return out_path
