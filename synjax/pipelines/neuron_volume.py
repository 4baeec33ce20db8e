"""The neuron pipeline on a user's volume: the ensemble's boundary map, then its segmentation.

`config.predict.input` (`volume_input.py`) is predicted with the DeepEM3D
models trained in the workdir into `config.predict.output`, slab by slab;
the boundary map is segmented with the watershed and agglomeration tuned in
the workdir, block by block (`segment_volume`). With
`config.predict.groundtruth` the segmentation is then scored against it
(`score_volume`: the neuron pipeline's scores from a contingency table
counted block by block) into `<output>/metrics.json`. Memory holds a slab or
a block (with its halo) and tables of ids, whatever the volume's size.
"""

from __future__ import annotations

import pathlib
import time
from typing import NamedTuple

import numpy as np
from absl import logging

from synjax.data.intensity import load_normalization
from synjax.errors import ConfigError, DataError
from synjax.evaluation.segmentation_scores import segmentation_scores
from synjax.geometry import Box
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_output import open_block_output
from synjax.inference.done_blocks import DoneBlocks
from synjax.inference.lazy_model import LazyPredictor
from synjax.inference.slicewise_blocks import (
    ensemble_max_blockwise,
    predict_slices_blockwise,
    slab_chunks,
    slab_grid,
)
from synjax.inference.tta import TRANSFORMS
from synjax.io import layout, open_volume
from synjax.io.provenance import input_fingerprint
from synjax.io.volume_base import DEFAULT_OFFSET, DEFAULT_RESOLUTION, Volume
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn
from synjax.pipelines import volume_input
from synjax.pipelines.neurons import OURS, _read_tuned
from synjax.postprocess.blockwise_watershed import segment_blockwise
from synjax.report import files
from synjax.stages.boundary_models import BoundaryEnsembleStage
from synjax.train import checkpoint
from synjax.train.checkpoint import checkpoint_provenance

# The boundary map and the segmentation of a user's volume, in `config.predict.output`.
BOUNDARIES_OUTPUT = layout.VOLUME_BOUNDARIES
SEGMENTATION_OUTPUT = layout.VOLUME_SEGMENTATION


GROUNDTRUTH_KEY = "config.predict.groundtruth"
# Inside the segmentation's done-state folder: removed with it when the segmentation is stale.
PASSES_STATE = "passes"


class VolumeOutputs(NamedTuple):
    """What `predict_volume` wrote: the boundary map, the segmentation and (None) its scores."""

    boundaries: pathlib.Path
    segmentation: pathlib.Path
    metrics: pathlib.Path | None = None


def open_groundtruth(config, raw: Volume, roi: Box):
    """`config.predict.groundtruth` as the predicted region's labels, or None when unset.

    The ground truth covers the predicted region: it has the region's shape,
    or the whole input's (then the region is cut from it). Where it records
    a voxel size or an offset (metadata other than synjax's defaults), they
    must be those of the region it covers.

    Args:
      config: the neuron config (`predict.groundtruth`, any `open_volume` source).
      raw: the opened `config.predict.input`.
      roi: the predicted region of `raw`.

    Returns:
      A `[z, y, x]` label volume of the region's shape (read by slicing), or None.

    Raises:
      DataError: it does not open, is not 3D integer labels, or its shape,
        voxel size or offset is not the region's (one line naming the key).
    """
    source = config.predict.get("groundtruth")
    if not source:
        return None
    where = f"{GROUNDTRUTH_KEY}={source!r}"
    try:
        gt = open_volume(source)
    except DataError as error:
        raise DataError(f"{where}: {error}") from error
    if not (np.issubdtype(gt.dtype, np.integer) or gt.dtype == bool):
        raise DataError(f"{where}: dtype {gt.dtype}, expected integer labels")
    shape = tuple(gt.shape)
    region_offset = tuple(
        o + a * r for o, a, r in zip(raw.offset, roi.start, raw.resolution, strict=True)
    )
    if shape == tuple(roi.shape):
        region, offset = gt, region_offset
    elif shape == tuple(raw.shape):
        region, offset = volume_input.RegionVolume(gt, roi), raw.offset
    else:
        raise DataError(
            f"{where} has shape {shape}: expected the predicted region's {tuple(roi.shape)} "
            f"(or the input's {tuple(raw.shape)}, cut to {volume_input.ROI_KEY})"
        )
    if tuple(gt.resolution) not in (DEFAULT_RESOLUTION, tuple(raw.resolution)):
        raise DataError(
            f"{where}: voxel size {tuple(gt.resolution)} nm, expected the input's "
            f"{tuple(raw.resolution)}"
        )
    if tuple(gt.offset) not in (DEFAULT_OFFSET, tuple(offset)):
        raise DataError(
            f"{where}: offset {tuple(gt.offset)} nm, expected {tuple(offset)} (where it lies "
            "in the input)"
        )
    return region


def score_volume(
    segmentation: pathlib.Path, groundtruth, path: pathlib.Path, block_shape, source: str = ""
) -> dict:
    """Scores the segmentation at `segmentation` against `groundtruth`; writes them to `path`.

    The neuron pipeline's scores (`evaluation.segmentation_scores`, as its
    evaluate mode gives them on the test part): adapted Rand error with
    precision and recall, Rand index, VOI split and merge, segments. Both
    volumes are read block by block.

    Args:
      segmentation: the zarr `segment_volume` wrote.
      groundtruth: `[z, y, x]` labels of the same shape (`open_groundtruth`);
        label 0 is left out of the scores.
      path: the JSON file to write.
      block_shape: `(z, y, x)` voxels read at a time (the segmentation's chunks).
      source: where the ground truth was read from, for the record.

    Returns:
      `{"deepem3d": scores, "groundtruth", "segmentation", "shape"}`, as written.
    """
    start = time.perf_counter()
    seg = open_volume(str(segmentation))
    scores = segmentation_scores(seg, groundtruth, block_shape)
    metrics = {
        OURS: scores,
        "groundtruth": source,
        "segmentation": str(segmentation),
        "shape": list(seg.shape),
    }
    files.write_json(path, metrics)
    logging.info(
        "Segmentation %s against %s: adapted Rand error %.4f (P %.4f R %.4f), Rand index %.4f, "
        "VOI split %.4f merge %.4f, %d segments (%.1f s) -> %s",
        segmentation,
        metrics["groundtruth"],
        scores["adapted_rand_error"],
        scores["rand_precision"],
        scores["rand_recall"],
        scores["rand_index"],
        scores["voi_split"],
        scores["voi_merge"],
        scores["segments"],
        time.perf_counter() - start,
        path,
    )
    return metrics


def predict_volume(config, workdir: pathlib.Path) -> VolumeOutputs:
    """The boundary map and segmentation of `config.predict.input`, block by block, into zarr.

    Each model slices the input (or its `config.predict.roi`, predicted as a
    volume of its own) along each of `config.predict.orientations` in slabs of
    `config.predict.slab_depth` slices (`predict_slices_blockwise`), into
    `<output>/boundaries_<model>_<orientation>.zarr`; their voxel-wise
    maximum is `<output>/boundaries.zarr`, segmented by `segment_volume`
    into `<output>/segmentation.zarr`. Every output is resumable and records
    what it was made from. The watershed parameters tuned in `workdir` are
    checked to belong to these models. Models with an `only_slices` list are
    left out: their lists name slices of the test part.

    With `config.predict.groundtruth`, the segmentation is scored against it
    (`score_volume`) into `<output>/metrics.json`.

    Returns:
      The paths of the ensemble's boundary map, of the segmentation and of
      the metrics (None without ground truth).

    Raises:
      DataError: no trained models or tuned parameters in `workdir`, or a bad
        input or ground truth (named in one line).
    """
    raw, roi = volume_input.open_input(config)
    # Checked before hours of prediction, not after.
    groundtruth = open_groundtruth(config, raw, roi)
    out_dir = volume_input.output_dir(config)
    chosen = _read_tuned(config, workdir)[OURS]
    ensemble = BoundaryEnsembleStage.from_config(config)
    p = ensemble.prediction
    source = volume_input.RegionVolume(raw, roi)
    resolution = raw.resolution
    offset = tuple(o + a * r for o, a, r in zip(raw.offset, roi.start, resolution, strict=True))
    input_provenance = input_fingerprint(raw, path=config.predict.input) | {
        "roi": [list(roi.start), list(roi.stop)]
    }
    maps = []
    dask = p.executor == "dask"
    loaded = [None] * len(ensemble.models) if dask else ensemble.load(workdir)
    for model, fn in zip(ensemble.models, loaded, strict=True):
        if model.only_slices is not None:
            logging.info(
                "Model %s left out: its only_slices name slices of the test part", model.name
            )
            continue
        intensity = load_normalization(checkpoint.checkpoint_dir(workdir, model.name))
        if dask:
            # Each worker loads the model from its checkpoint once.
            network = ensemble.network_settings(model)
            fn = LazyPredictor(load_apply_fn, network, str(workdir), model.name)
        for orientation in tuple(p.orientations or ("z",)):
            path = out_dir / f"boundaries_{model.name}_{orientation}.zarr"
            grid = slab_grid(source.shape, orientation, p.slab_depth, int(model.slices))
            provenance = {
                "model": checkpoint_provenance(workdir, model.name)
                | {"intensity": intensity.to_dict()},
                "input": input_provenance,
                "slicing": {
                    "orientation": orientation,
                    "tta": p.tta_transforms if p.tta else 1,
                    "max_tile": p.max_tile,
                },
            }
            dest, done = open_block_output(
                path,
                source.shape,
                np.float32,
                grid,
                provenance,
                p.resume,
                resolution,
                offset,
                slab_chunks(source.shape, orientation, p.slab_depth),
            )
            summary = predict_slices_blockwise(
                fn,
                source,
                dest,
                slices=int(model.slices),
                stride=TOTAL_STRIDE,
                depth=p.slab_depth,
                orientation=orientation,
                batch_size=p.batch_size,
                tta=p.tta,
                transforms=ensemble.tta_transforms() if p.tta else TRANSFORMS,
                max_tile=p.max_tile,
                intensity=intensity,
                name=f"{config.predict.input} predicted by {model.name}",
                manifest_path=done,
                provenance=provenance,
                resume=p.resume,
                retries=p.retries,
                progress=p.progress,
                executor=p.executor,
                client=p.scheduler or None,
            )
            logging.info("Model %s along %s: %s", model.name, orientation, summary)
            maps.append((path, provenance))
    if not maps:
        raise ConfigError(
            "config.models: every model has an only_slices list; none predicts a new volume"
        )
    out = out_dir / BOUNDARIES_OUTPUT
    chunks = tuple(min(64, n) for n in source.shape)
    grid = BlockGrid(source.shape, chunks)
    provenance = {"maps": [made for _, made in maps]}
    dest, done = open_block_output(
        out, source.shape, np.float32, grid, provenance, p.resume, resolution, offset, chunks
    )
    ensemble_max_blockwise(
        [open_volume(str(path)) for path, _ in maps],
        dest,
        chunks,
        manifest_path=done,
        provenance=provenance,
        resume=p.resume,
        retries=p.retries,
        progress=p.progress,
    )
    segmentation = segment_volume(
        out,
        out_dir / SEGMENTATION_OUTPUT,
        chosen,
        config.watershed.smoothing,
        boundary_provenance=provenance,
        block_shape=p.segment_block,
        halo=p.segment_halo,
        resume=p.resume,
        progress=p.progress,
    )
    if groundtruth is None:
        return VolumeOutputs(out, segmentation)
    metrics = out_dir / layout.METRICS_FILE
    score_volume(segmentation, groundtruth, metrics, p.segment_block, p.groundtruth)
    return VolumeOutputs(out, segmentation, metrics)


def segment_volume(
    boundary_path: pathlib.Path,
    path: pathlib.Path,
    chosen: dict,
    smoothing: str,
    *,
    boundary_provenance: dict,
    block_shape,
    halo: int,
    resume: str = "auto",
    progress: bool = False,
) -> pathlib.Path:
    """Segments the boundary map at `boundary_path` block by block into the zarr `path`.

    `segment_blockwise` runs the watershed and (with a threshold) the
    mean-boundary agglomeration of `chosen` on blocks of `block_shape`, each
    flooded with `halo` voxels of context; `path` (uint64, chunks of one block,
    the boundary map's resolution and offset) holds segment ids 1..n, 0 =
    background. One made from the same boundary map (its provenance) with
    the same parameters and blocks, and recorded as finished in its
    done-state, is reused; a stale one is made afresh. The passes over the
    volume keep what they have finished in `<path>.blocks/passes`
    (`blockwise_pass_state`): a run killed part-way, even by SIGKILL, and
    started again goes on from there, computing no finished block again,
    with the same labels as an uninterrupted run.

    Args:
      boundary_path: `[z, y, x]` float32 boundary map in [0, 1] (zarr).
      path: the segmentation to write.
      chosen: the tuned `{"sigma", "h", "threshold"}` (threshold None: the
        watershed alone), as `neurons._read_tuned` returns them.
      smoothing: the watershed's "2d" or "3d" smoothing.
      boundary_provenance: what made the boundary map.
      block_shape: `(z, y, x)` voxels of a block.
      halo: voxels flooded around each block (see `segment_blockwise`).
      resume: "auto" (a stale segmentation is made afresh, the reason
        logged) or "strict" (it is an error).
      progress: progress bars over the blocks of each pass.

    Returns:
      `path`.

    Raises:
      DataError: (`resume="strict"`) an existing segmentation was made from
        another boundary map or with other parameters.
    """
    boundary = open_volume(str(boundary_path))
    shape = tuple(int(s) for s in boundary.shape)
    grid = BlockGrid(shape, block_shape)
    threshold = chosen.get("threshold")
    provenance = {
        "boundaries": boundary_provenance,
        "watershed": {
            "sigma": float(chosen["sigma"]),
            "h": float(chosen["h"]),
            "threshold": None if threshold is None else float(threshold),
            "smoothing": smoothing,
        },
        "halo": int(halo),
    }
    chunks = tuple(min(b, n) for b, n in zip(grid.block_shape, shape, strict=True))
    dest, done_path = open_block_output(
        path,
        shape,
        np.uint64,
        grid,
        provenance,
        resume,
        boundary.resolution,
        boundary.offset,
        chunks,
    )
    done = DoneBlocks(done_path, grid, provenance, resume)
    if done.todo().size == 0:
        logging.info("Segmentation %s is made from this boundary map already: reused", path)
        return path
    logging.info(
        "Segmenting %s (%s voxels) in %d blocks of %s, halo %d, into %s",
        boundary_path,
        shape,
        grid.num_blocks,
        grid.block_shape,
        halo,
        path,
    )
    start = time.perf_counter()
    result = segment_blockwise(
        boundary,
        dest,
        grid.block_shape,
        float(chosen["sigma"]),
        float(chosen["h"]),
        halo=int(halo),
        smoothing=smoothing,
        threshold=None if threshold is None else float(threshold),
        progress=progress,
        state=done_path / PASSES_STATE,
        provenance=provenance,
    )
    # Recorded only now: each pass is over the whole volume; until this line
    # a rerun goes on from what the passes state records.
    done.record(np.arange(grid.num_blocks))
    if result.inexact_blocks:
        logging.warning(
            "Segmentation %s: in %d of %d blocks a region reaches past the halo (%d voxels), "
            "so the result there may differ from a whole-volume watershed (first: block %d)",
            path,
            len(result.inexact_blocks),
            grid.num_blocks,
            halo,
            result.inexact_blocks[0],
        )
    logging.info(
        "Segmentation %s: %d labels (%d watershed segments) in %.1f s",
        path,
        result.num_labels,
        result.num_segments,
        time.perf_counter() - start,
    )
    return path


def load_apply_fn(network: DeepEM3DSettings, workdir: str, name: str):
    """The inference function of model `name` restored from `workdir` (a Dask worker's load)."""
    model = DeepEM3DNet(network)
    sample = np.zeros((1, network.slices, TOTAL_STRIDE, TOTAL_STRIDE, 1), np.float32)
    return make_apply_fn(model, checkpoint.restore_variables(workdir, name, model, sample))
