"""The name of every file and folder that synjax writes in a workdir (the run folder).

    checkpoints/<model>/<step>/             orbax checkpoints (`synjax.train.checkpoint`)
    checkpoints/<model>/intensity.json      the model's input scaling (`synjax.data.intensity`)
    metrics/<model>.jsonl, tensorboard/<model>/   training curves (`synjax.train.loop`)
    predictions/<name>.zarr                 predicted volumes, written block by block;
    predictions/<name>.zarr.blocks          its finished blocks (`synjax.inference.blockwise`)
    metrics.json, example_slices.png        every pipeline's scores and example slices
    neuroglancer_state.json, predictions/raw.zarr   the run's outputs as neuroglancer layers
                                            over the raw they came from (`synjax.report.
                                            neuroglancer_state`; opened by `synjax.view`)

    partner pipeline: predictions/proximity.zarr, predictions/train_proximity.zarr,
      predictions/<volume>_segmentation.zarr, pruner_threshold.json, candidates.csv,
      detections.csv, synapses.csv, synapses.h5, precision_recall.png
    neuron pipeline: predictions/boundaries.zarr, predictions/watershed.zarr,
      predictions/segmentation.zarr, watershed.json
    a volume of your own, in `config.predict.output`: proximity.zarr (partners);
      boundaries.zarr, boundaries_<model>_<axis>.zarr, segmentation.zarr (neurons);
      neuroglancer_state.json
    classical instance baseline: pixel_forest.joblib (`synjax.models.pixel_forest`)
    instance pipelines (fluorescence, instances): chosen.json (every parameter
      chosen on training or validation data), instances.csv,
      predictions/mask_rcnn.zarr or predictions/instances.zarr,
      predictions/baseline.zarr, volume_histogram.png, attention/*.png

Every module that writes or reads one of these takes its name from here, so a
file is named once and the list above is the whole of a workdir.
"""

from __future__ import annotations

import os
import pathlib

# Folders.
CHECKPOINTS_DIR = "checkpoints"
METRICS_DIR = "metrics"
TENSORBOARD_DIR = "tensorboard"
PREDICTIONS_DIR = "predictions"

# Inside a model's checkpoint folder.
INTENSITY_FILE = "intensity.json"

# Results of every pipeline.
METRICS_FILE = "metrics.json"
EXAMPLE_SLICES_FILE = "example_slices.png"

# The neuroglancer state of a run's outputs and the raw it shows them over.
NEUROGLANCER_STATE_FILE = "neuroglancer_state.json"
VIEW_RAW = f"{PREDICTIONS_DIR}/raw.zarr"

# Partner pipeline.
THRESHOLD_FILE = "pruner_threshold.json"
CANDIDATES_FILE = "candidates.csv"
DETECTIONS_FILE = "detections.csv"
SYNAPSES_CSV_FILE = "synapses.csv"
SYNAPSES_CREMI_FILE = "synapses.h5"
PRECISION_RECALL_FILE = "precision_recall.png"
PROXIMITY = f"{PREDICTIONS_DIR}/proximity.zarr"
TRAIN_PROXIMITY = f"{PREDICTIONS_DIR}/train_proximity.zarr"

# Neuron pipeline.
WATERSHED_FILE = "watershed.json"
BOUNDARIES = f"{PREDICTIONS_DIR}/boundaries.zarr"
WATERSHED_ONLY = f"{PREDICTIONS_DIR}/watershed.zarr"
SEGMENTATION = f"{PREDICTIONS_DIR}/segmentation.zarr"

# A volume of your own (`config.predict.input`): what predict mode writes into
# `config.predict.output` (a folder of its own, flat), with its neuroglancer state
# (NEUROGLANCER_STATE_FILE) over the input where it lies.
VOLUME_PROXIMITY = "proximity.zarr"
VOLUME_BOUNDARIES = "boundaries.zarr"
VOLUME_SEGMENTATION = "segmentation.zarr"
VOLUME_INSTANCES = "instances.zarr"
VOLUME_INSTANCES_TABLE = "instances.csv"
VOLUME_INSTANCE_BLOCKS = "instance_blocks.zarr"
VOLUME_INSTANCE_SCORES = "instance_scores.zarr"
# The partner pipeline's candidate sites: components of the thresholded proximity.
VOLUME_PRE_SITES, VOLUME_POST_SITES = "pre_sites.zarr", "post_sites.zarr"

# Classical instance baseline.
FOREST_FILE = "pixel_forest.joblib"

# Instance pipelines (fluorescence Mask R-CNN, EM instance network).
CHOSEN_FILE = "chosen.json"
INSTANCES_TABLE_FILE = "instances.csv"
MASK_RCNN_INSTANCES = f"{PREDICTIONS_DIR}/mask_rcnn.zarr"
NETWORK_INSTANCES = f"{PREDICTIONS_DIR}/instances.zarr"
BASELINE_INSTANCES = f"{PREDICTIONS_DIR}/baseline.zarr"
VOLUME_HISTOGRAM_FILE = "volume_histogram.png"
ATTENTION_DIR = "attention"

# Suffix of a block-wise output's done-state (a folder: `synjax.inference.done_blocks`).
BLOCKS_SUFFIX = ".blocks"
# Suffix of the line-per-batch manifest that earlier versions kept instead.
BLOCKS_V1_SUFFIX = ".blocks.jsonl"


def checkpoint_dir(workdir: str | os.PathLike, name: str) -> pathlib.Path:
    """Folder that holds the checkpoints of model `name` (absolute: orbax wants one)."""
    return pathlib.Path(workdir).absolute() / CHECKPOINTS_DIR / name


def training_log(workdir: str | os.PathLike, name: str) -> pathlib.Path:
    """JSONL file of model `name`'s training metrics."""
    return pathlib.Path(workdir) / METRICS_DIR / f"{name}.jsonl"


def tensorboard_dir(workdir: str | os.PathLike, name: str) -> pathlib.Path:
    """TensorBoard folder of model `name`'s training."""
    return pathlib.Path(workdir) / TENSORBOARD_DIR / name


def volume_segmentation(volume: str) -> str:
    """The predicted neuron segmentation of partner volume `volume` ("train" or "test")."""
    return f"{PREDICTIONS_DIR}/{volume}_segmentation.zarr"


def blocks_manifest(output: str | os.PathLike) -> pathlib.Path:
    """The done-state of the blocks of a block-wise output, beside it."""
    output = pathlib.Path(output)
    return output.with_name(output.name + BLOCKS_SUFFIX)


def blocks_manifest_v1(output: str | os.PathLike) -> pathlib.Path:
    """The line-per-batch manifest that earlier versions kept beside a block-wise output."""
    output = pathlib.Path(output)
    return output.with_name(output.name + BLOCKS_V1_SUFFIX)
