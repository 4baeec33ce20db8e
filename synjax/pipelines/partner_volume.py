"""The partner pipeline on a user's volume: its signed proximity, block by block.

`config.predict.input` (`volume_input.py`) is predicted with the U-Net trained
in the workdir into `<config.predict.output>/proximity.zarr`.
"""

from __future__ import annotations

import pathlib

from absl import logging

from synjax.io.provenance import describe_model
from synjax.pipelines import volume_input
from synjax.pipelines.partners import _model
from synjax.stages import proximity
from synjax.stages.proximity import ProximityStage

# The proximity of a user's volume, in `config.predict.output`.
PROXIMITY_OUTPUT = "proximity.zarr"


def predict_volume(config, workdir: pathlib.Path) -> pathlib.Path:
    """Predicts signed proximity over `config.predict.input` with the U-Net trained in `workdir`.

    The input is read block by block (any size; `config.predict.roi` limits it
    to a region) and the proximity is written to
    `<config.predict.output>/proximity.zarr`, resumable like the test volume's
    (its done-state beside it records the model and the input).

    Returns:
      The path of the proximity output.

    Raises:
      DataError: no trained U-Net in `workdir`, or a bad input (named).
    """
    raw, roi = volume_input.open_input(config)
    out = volume_input.output_dir(config) / PROXIMITY_OUTPUT
    unet_stage = ProximityStage.from_config(config)
    trained = unet_stage.load(workdir)
    unet = _model(workdir, proximity.MODEL_NAME, trained)
    logging.info(
        "Predicting %s (region %s..%s of %s) with %s into %s",
        config.predict.input,
        roi.start,
        roi.stop,
        raw.shape,
        describe_model(unet),
        out,
    )
    unet_stage.predict_volume(
        trained,
        raw,
        out,
        raw.resolution,
        step=unet["step"],
        input_path=config.predict.input,
        roi=roi,
        offset=raw.offset,
        workdir=workdir,
    )
    return out
