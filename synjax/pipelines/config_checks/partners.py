"""Checks of a partner (signed proximity + pruner) config, and of its input files."""

from __future__ import annotations

from synjax.errors import ConfigError
from synjax.io import open_volume
from synjax.io.checks import require_file
from synjax.pipelines.config_checks.common import (
    EXECUTORS,
    INTENSITY,
    PREDICT_VOLUME_RULES,
    TOP,
    TRAIN_RULES,
    check_predict_volume,
    check_warmup,
    needed_splits,
)
from synjax.pipelines.config_checks.neurons import SEGMENTER, check_segmenter
from synjax.pipelines.config_checks.rules import (
    Block,
    Value,
    boolean,
    choice,
    fraction,
    integer,
    integers,
    is_sequence,
    non_negative,
    number,
    positive,
    sequence,
    settings_block,
    text,
    triples,
)
from synjax.stages.settings import (
    BlockwisePredictSettings,
    ProximityNetworkSettings,
    ProximityTrainSettings,
    PrunerSettings,
)

# Mirrors of library constants (tests/test_bad_input.py checks they agree).
PADDINGS = ("VALID", "SAME")  # synjax.models.unet3d.PADDINGS
PRUNER_CONVS = 5  # synjax.models.pruning.NUM_CONVS
PARTNER_SOURCES = ("synthetic", "cremi")
SEGMENTATION_SOURCES = ("groundtruth", "predicted")
CREMI_RAW = "volumes/raw"

SCHEMA = {
    **TOP,
    "data": Block(
        {
            "source": choice(PARTNER_SOURCES),
            "train_path": text(),
            "test_path": text(),
            # Synthetic volumes only (checked below when the source is synthetic).
            "shape": integers(3, 0, required=False),
            "resolution": sequence(positive(), required=False),
            "train_seed": integer(0, required=False),
            "test_seed": integer(0, required=False),
            "n_synapses": integer(0, required=False),
            "polyadic_fraction": fraction(required=False),
            "intensity": INTENSITY,
        }
    ),
    "segmentation": Block({"source": choice(SEGMENTATION_SOURCES)}),
    # The neuron segmentation trained when segmentation.source == "predicted".
    "neurons": Block(SEGMENTER, required=False),
    "targets": Block({"alpha": positive(), "sigma": positive(), "radius_nm": positive()}),
    "unet": settings_block(
        ProximityNetworkSettings,
        {
            "depth": integer(0),
            "base_features": integer(1),
            "feature_growth": integer(1),
            "pool_factors": Value(
                lambda v: is_sequence(v) and all(integers(3, 1).test(x) for x in v),
                "a sequence (one per level) of (z, y, x) triples of integers >= 1",
            ),
            "conv_kernels": triples(1, odd=True),
            "padding": choice(PADDINGS),
            "train_output": integers(3, 1),
            "predict_output": integers(3, 1),
            "predict_context": integers(3, 0),
            "remat": boolean(),
        },
    ),
    "train": settings_block(
        ProximityTrainSettings, {**TRAIN_RULES, "positive_fraction": fraction()}
    ),
    "predict": settings_block(
        BlockwisePredictSettings,
        {
            **PREDICT_VOLUME_RULES,
            "batch_size": integer(1),
            "executor": choice(EXECUTORS),
            "scheduler": text(),
            "segmentation": text(),
            "candidate_block": integers(3, 1),
        },
    ),
    "candidates": Block(
        {
            "tau": number(0, 1, open_low=True, open_high=True),
            "omega": integer(1),
            "max_gap_nm": non_negative(),
            "nms_radius_nm": non_negative(),
        }
    ),
    "pruner": settings_block(
        PrunerSettings,
        {
            "window": integers(3, 1),
            "features": integers(PRUNER_CONVS, 1),
            "pools": triples(1),
            "dense_features": integer(1),
            "train": {**TRAIN_RULES, "label_distance_nm": positive()},
        },
    ),
    "evaluation": Block({"cremi_distance_nm": positive(), "same_ids_distance_nm": positive()}),
}

_SYNTHETIC_FIELDS = ("shape", "resolution", "train_seed", "test_seed", "n_synapses")


def check_relations(config) -> None:
    check_predict_volume(config.predict, "config.predict")
    data = config.data
    if data.source == "synthetic":
        for key in (*_SYNTHETIC_FIELDS, "polyadic_fraction"):
            if key not in data:
                raise ConfigError(f"config.data: missing key {key!r} (synthetic volumes need it)")
        if min(data.shape) < 1:
            raise ConfigError(
                f"config.data.shape={tuple(data.shape)}: expected 3 integers >= 1 for synthetic "
                "volumes"
            )
        if len(data.resolution) != 3:
            raise ConfigError(
                f"config.data.resolution={tuple(data.resolution)}: expected 3 sizes in nm (z, y, x)"
            )
    unet = config.unet
    if len(unet.pool_factors) != unet.depth:
        raise ConfigError(
            f"config.unet.pool_factors has {len(unet.pool_factors)} entries: expected one per "
            f"level, config.unet.depth={unet.depth}"
        )
    if len(unet.conv_kernels) != unet.depth + 1:
        raise ConfigError(
            f"config.unet.conv_kernels has {len(unet.conv_kernels)} entries: expected "
            f"config.unet.depth + 1 = {unet.depth + 1}"
        )
    for values, block in ((config.train, "train"), (config.pruner.train, "pruner.train")):
        check_warmup(
            values.get("warmup_steps", 0),
            values.steps,
            f"config.{block}.warmup_steps",
            f"config.{block}.steps",
        )
    pruner = config.pruner
    if len(pruner.pools) != len(pruner.features) - 1:
        raise ConfigError(
            f"config.pruner.pools has {len(pruner.pools)} windows: expected one between each "
            f"two of the {len(pruner.features)} convolutions, {len(pruner.features) - 1}"
        )
    reduction = [1, 1, 1]
    for window in pruner.pools:
        reduction = [r * w for r, w in zip(reduction, window, strict=True)]
    if any(size < r for size, r in zip(pruner.window, reduction, strict=True)):
        raise ConfigError(
            f"config.pruner.window={tuple(pruner.window)}: expected at least the pooling "
            f"windows' product {tuple(reduction)} along each axis"
        )
    if config.segmentation.source == "predicted":
        if "neurons" not in config:
            raise ConfigError(
                "config: missing block 'neurons' (the DeepEM3D segmentation that "
                "config.segmentation.source='predicted' trains)"
            )
        check_segmenter(config.neurons, "config.neurons")


def check_input_files(config) -> None:
    """Opens the CREMI files of each split the run's mode reads (synthetic volumes: none).

    Raises:
      DataError: naming the config key, the file and what is wrong with it.
    """
    data = config.data
    if data.source != "cremi":
        return
    from synjax.pipelines.partner_data import CREMI_PUBLISHED_AT

    for split in needed_splits(config.mode):
        key = f"{split}_path"
        path = require_file(data[key], f"config.data.{key}", "CREMI sample", CREMI_PUBLISHED_AT)
        # The file opens as HDF5 and holds the raw as a 3D volume.
        open_volume(f"{path}:/{CREMI_RAW}").close()
