"""The neuron pipeline on a user's volume: the ensemble's boundary map, slab by slab.

`config.predict.input` (`volume_input.py`) is predicted with the DeepEM3D
models trained in the workdir into `config.predict.output`.
"""

from __future__ import annotations

import pathlib

import numpy as np
from absl import logging

from synjax.data.intensity import load_normalization
from synjax.errors import ConfigError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_output import open_block_output
from synjax.inference.lazy_model import LazyPredictor
from synjax.inference.slicewise_blocks import (
    ensemble_max_blockwise,
    predict_slices_blockwise,
    slab_chunks,
    slab_grid,
)
from synjax.inference.tta import TRANSFORMS
from synjax.io import open_volume
from synjax.io.provenance import input_fingerprint
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn
from synjax.pipelines import volume_input
from synjax.pipelines.neurons import _read_tuned
from synjax.stages.boundary_models import BoundaryEnsembleStage
from synjax.train import checkpoint
from synjax.train.checkpoint import checkpoint_provenance

# The boundary map of a user's volume, in `config.predict.output`.
BOUNDARIES_OUTPUT = "boundaries.zarr"


def predict_volume(config, workdir: pathlib.Path) -> pathlib.Path:
    """The ensemble's boundary map of `config.predict.input`, slab by slab, into zarr.

    Each model slices the input (or its `config.predict.roi`, predicted as a
    volume of its own) along each of `config.predict.orientations` in slabs of
    `config.predict.slab_depth` slices (`predict_slices_blockwise`), into
    `<output>/boundaries_<model>_<orientation>.zarr`; their voxel-wise
    maximum is `<output>/boundaries.zarr`. Every output is resumable and
    records the model and input it was made with. The watershed parameters
    tuned in `workdir` are checked to belong to these models. Models with an
    `only_slices` list are left out: their lists name slices of the test part.

    Returns:
      The path of the ensemble's boundary map.

    Raises:
      DataError: no trained models or tuned parameters in `workdir`, or a bad
        input (named in one line).
    """
    raw, roi = volume_input.open_input(config)
    out_dir = volume_input.output_dir(config)
    _read_tuned(config, workdir)
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
    return out


def load_apply_fn(network: DeepEM3DSettings, workdir: str, name: str):
    """The inference function of model `name` restored from `workdir` (a Dask worker's load)."""
    model = DeepEM3DNet(network)
    sample = np.zeros((1, network.slices, TOTAL_STRIDE, TOTAL_STRIDE, 1), np.float32)
    return make_apply_fn(model, checkpoint.restore_variables(workdir, name, model, sample))
