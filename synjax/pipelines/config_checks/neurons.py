"""Checks of a neuron (DeepEM3D) config, and the segmenter block a partner config may hold."""

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
from synjax.pipelines.config_checks.rules import (
    Block,
    Entries,
    Value,
    boolean,
    choice,
    fraction,
    integer,
    integers,
    is_int,
    is_sequence,
    non_negative,
    number,
    optional,
    positive,
    sequence,
    settings_block,
    text,
    yx_crop,
    z_range,
)
from synjax.stages.settings import (
    BoundaryModelSettings,
    BoundaryTrainSettings,
    SlicePredictSettings,
)

# Mirrors of library constants (tests/test_bad_input.py checks they agree).
BOUNDARY_KERNELS = ("c3", "c5", "l3")  # synjax.targets.boundaries.KERNELS
MODEL_SLICES = (1, 3, 5)  # synjax.models.deepem3d.SUPPORTED_SLICES
DEEPEM3D_STRIDE = 16  # synjax.models.deepem3d.TOTAL_STRIDE
TILE_OVERLAP = 64  # synjax.inference.slicewise.DEFAULT_TILE_OVERLAP
ORIENTATIONS = ("z", "y", "x")  # synjax.inference.slicewise.ORIENTATIONS
TTA_COUNTS = (1, 2, 4, 8, 16)
SMOOTHINGS = ("2d", "3d")


def orientations() -> Value:
    return Value(
        lambda v: (
            is_sequence(v) and len(v) >= 1 and len(set(v)) == len(v) and set(v) <= {*ORIENTATIONS}
        ),
        f"distinct axes among {list(ORIENTATIONS)} (at least one)",
        required=False,
    )


WATERSHED = {
    "smoothing": choice(SMOOTHINGS),
    "sigmas": sequence(non_negative()),
    "hs": sequence(number(0, 1, open_low=True)),
}


MODEL = settings_block(
    BoundaryModelSettings,
    {
        "name": text(non_empty=True),
        "slices": choice(MODEL_SLICES),
        "kernel": choice(BOUNDARY_KERNELS),
        "width": positive(),
        "steps": integer(1),
        "seed": integer(0),
        "blocks": integers(3, 0),
        "side_features": integer(1),
        "dilations": integers(None, 1, odd=True),
        "only_slices": optional(sequence(integer(0), 0)),
    },
).schema

# What `boundary_models` and `neurons.train_segmenter` read of a neuron config.

SEGMENTER = {
    "seed": integer(0),
    "models": Entries(MODEL),
    "train": settings_block(
        BoundaryTrainSettings,
        {
            **TRAIN_RULES,
            "patch_yx": Value(
                lambda v: is_int(v) and v >= DEEPEM3D_STRIDE and v % DEEPEM3D_STRIDE == 0,
                f"a positive multiple of {DEEPEM3D_STRIDE} (DeepEM3D's pooling factor)",
            ),
            "augment": boolean(),
        },
    ),
    "predict": settings_block(
        SlicePredictSettings,
        {
            "tta": boolean(),
            "tta_transforms": choice(TTA_COUNTS),
            "batch_size": integer(1),
            "progress": boolean(),
            "max_tile": optional(
                Value(
                    lambda v: is_int(v) and v > TILE_OVERLAP and v % DEEPEM3D_STRIDE == 0,
                    f"a multiple of {DEEPEM3D_STRIDE} greater than the tile overlap {TILE_OVERLAP}",
                )
            ),
            "orientations": orientations(),
            "slab_depth": integer(1),
            "executor": choice(EXECUTORS),
            "scheduler": text(),
            **PREDICT_VOLUME_RULES,
            # The block-wise segmentation of `input` (configlib.volume_segmentation_fields).
            "segment_block": integers(3, 1),
            "segment_halo": integer(1),
            # Labels of `input` to score its segmentation against (None: not scored).
            "groundtruth": optional(text(non_empty=True)),
        },
    ),
    "watershed": Block({**WATERSHED, "thresholds": sequence(fraction(), 0, required=False)}),
    # A partner config's `neurons` block names only the segmenter's input scaling.
    "data": Block({"intensity": INTENSITY}, required=False),
}


SCHEMA = {
    **TOP,
    **SEGMENTER,
    "data": Block(
        {
            "dataset": text(required=False),
            "published_at": text(required=False),
            "train_path": text(non_empty=True),
            "test_path": text(non_empty=True),
            # Labels in files of their own (SNEMI3D's TIFF stacks); None: in the raw's file.
            "train_labels_path": optional(text(non_empty=True)),
            "test_labels_path": optional(text(non_empty=True)),
            "raw_key": text(non_empty=True),
            "labels_key": text(non_empty=True),
            "oversegmentation_key": text(non_empty=True),
            "resolution": optional(sequence(positive())),
            "train_z": z_range(),
            "tune_z": z_range(),
            "test_z": z_range(),
            "crop_yx": yx_crop(),
            "misaligned_slices": sequence(integer(0), 0, required=False),
            "intensity": INTENSITY,
        }
    ),
    "baseline": Block(WATERSHED),
    "evaluation": Block({"plot_slices": integer(1)}),
}


def check_segmenter(block, where: str) -> None:
    """Model names are distinct (each names a checkpoint folder); warm-up < each model's steps."""
    names = [model["name"] for model in block.models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"{where}.models: name {repeated[0]!r} is used twice (each model needs its own "
            "checkpoints/<name>)"
        )
    warmup = block.train.get("warmup_steps", 0)
    for index, model in enumerate(block.models):
        check_warmup(
            warmup, model["steps"], f"{where}.train.warmup_steps", f"{where}.models[{index}].steps"
        )


def _require_hdf5_dataset(path: str, dataset: str) -> None:
    """The file opens as HDF5 and holds `dataset` as a 3D volume."""
    open_volume(f"{path}:/{dataset}").close()


def check_relations(config) -> None:
    """Checks across the keys of a neuron config."""
    check_segmenter(config, "config")
    check_predict_volume(config.predict, "config.predict")
    if config.predict.get("groundtruth") and not config.predict.get("input"):
        raise ConfigError(
            f"config.predict.groundtruth={config.predict.groundtruth!r} is set without "
            "config.predict.input: it scores the segmentation of a volume of your own "
            "(the test part is scored by mode=evaluate against config.data's labels)"
        )


def check_input_files(config) -> None:
    """Opens the raw (and label) volumes of each split the run's mode reads.

    Raises:
      DataError: naming the config key, the file and what is wrong with it.
    """
    from synjax.pipelines.neuron_data import volume_source

    data = config.data
    dataset = data.get("dataset", "neuron EM volume")
    published_at = data.get("published_at", "its publisher")
    for split in needed_splits(config.mode):
        key = f"{split}_path"
        path = require_file(data[key], f"config.data.{key}", dataset, published_at)
        # Raw and (where they have files of their own) labels, as the loader reads them.
        open_volume(volume_source(path, data.raw_key, key)).close()
        labels_key = f"{split}_labels_path"
        if data.get(labels_key):
            labels = require_file(
                data[labels_key], f"config.data.{labels_key}", dataset, published_at
            )
            open_volume(volume_source(labels, data.labels_key, labels_key)).close()
