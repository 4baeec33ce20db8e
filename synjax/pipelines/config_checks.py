"""Checks of a whole config, and of the files it names, before any data is read.

Config files are plain Python: a misspelt key (`only_slice` for
`only_slices`) would be silently ignored by code that reads fields with
`.get`, and a value out of range surfaces only when the stage that uses it
runs, maybe after an hour of training. `check_config` walks the config against
a schema of the keys each pipeline reads, with the range of each value, and
raises one `ConfigError` naming the full key (`config.models[1]: unknown key
'only_slice'`). `check_input_files` then opens every input file the run will
read, so that a missing, truncated or corrupt file is reported at once.

The keys of a block that a stage reads (`config.unet`, `config.train`,
`config.pruner`, each `config.models` entry, ...) are the fields of its
settings class (`synjax.stages.settings`, `synjax.train.settings`): the
schema takes them from there (`settings_block`), required where a field has
no default, and adds only the range of each value. So a key is declared once,
in its settings class, and the stages build those classes with the same
`synjax.settings.from_config`, which refuses unknown keys too. The other
blocks (data, candidates, watershed, ...) are declared here. A new config
field goes in its settings class or here; the tests run every shipped config
variant through `check_config`.

The value sets below mirror library constants (optimizers, kernels, ...) so
that these checks stay fast (no JAX import: a bad config is reported in a
second); a test keeps them equal.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from synjax.errors import ConfigError
from synjax.io import open_volume
from synjax.io.checks import require_file
from synjax.settings import config_fields, is_required, nested_class
from synjax.stages.settings import (
    BlockwisePredictSettings,
    BoundaryModelSettings,
    BoundaryTrainSettings,
    ProximityNetworkSettings,
    ProximityTrainSettings,
    PrunerSettings,
    SlicePredictSettings,
)

# Mirrors of library constants (tests/test_bad_input.py checks they agree).
OPTIMIZERS = ("adam", "adamw", "sgd")  # synjax.train.state.OPTIMIZERS
SCHEDULES = ("constant", "cosine", "warmup_cosine")  # synjax.train.state.SCHEDULES
PADDINGS = ("VALID", "SAME")  # synjax.models.unet3d.PADDINGS
EXECUTORS = ("local", "dask")  # synjax.inference.blockwise.EXECUTORS
BOUNDARY_KERNELS = ("c3", "c5", "l3")  # synjax.targets.boundaries.KERNELS
MODEL_SLICES = (1, 3, 5)  # synjax.models.deepem3d.SUPPORTED_SLICES
DEEPEM3D_STRIDE = 16  # synjax.models.deepem3d.TOTAL_STRIDE
TILE_OVERLAP = 64  # synjax.inference.slicewise.DEFAULT_TILE_OVERLAP
ORIENTATIONS = ("z", "y", "x")  # synjax.inference.slicewise.ORIENTATIONS
PRUNER_CONVS = 5  # synjax.models.pruning.NUM_CONVS
TTA_COUNTS = (1, 2, 4, 8, 16)
SMOOTHINGS = ("2d", "3d")
PARTNER_SOURCES = ("synthetic", "cremi")
SEGMENTATION_SOURCES = ("groundtruth", "predicted")
INTENSITY_METHODS = ("dtype", "percentiles")  # synjax.data.intensity methods
RESUME_MODES = ("auto", "strict")  # synjax.inference.blockwise.RESUME_MODES
CREMI_RAW = "volumes/raw"


# --- Rules: what one key may hold -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Value:
    """A leaf: `test(value)` must hold; `expected` says what it wants."""

    test: Callable[[Any], bool]
    expected: str
    required: bool = True

    def check(self, value: Any, key: str) -> None:
        if not self.test(value):
            raise ConfigError(f"{key}={value!r}: expected {self.expected}")


@dataclasses.dataclass(frozen=True)
class Block:
    """A nested block (ConfigDict or dict) with its own schema."""

    schema: Mapping[str, Any]
    required: bool = True

    @property
    def expected(self) -> str:
        return f"a block with keys {', '.join(sorted(self.schema))}"

    def check(self, value: Any, key: str) -> None:
        _check_block(value, self.schema, key)


@dataclasses.dataclass(frozen=True)
class Entries:
    """A non-empty sequence of blocks of one schema (e.g. `config.models`)."""

    schema: Mapping[str, Any]
    required: bool = True

    @property
    def expected(self) -> str:
        return f"a non-empty sequence of blocks with keys {', '.join(sorted(self.schema))}"

    def check(self, value: Any, key: str) -> None:
        if not _is_sequence(value) or not value:
            raise ConfigError(f"{key}={value!r}: expected {self.expected}")
        for index, entry in enumerate(value):
            _check_block(entry, self.schema, f"{key}[{index}]")


def _is_mapping(value: Any) -> bool:
    # ConfigDicts are not `Mapping`s, but have keys() and item access.
    return isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "__getitem__"))


def _check_block(block: Any, schema: Mapping[str, Any], where: str) -> None:
    """Every key of `block` is in `schema`, every required one is there, each value fits."""
    if not _is_mapping(block):
        raise ConfigError(f"{where}={block!r}: expected a block with keys {', '.join(schema)}")
    keys = list(block.keys())
    unknown = [key for key in keys if key not in schema]
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(schema))})"
        )
    for key, rule in schema.items():
        if key in keys:
            rule.check(block[key], f"{where}.{key}")
        elif rule.required:
            raise ConfigError(f"{where}: missing key {key!r} (expected {rule.expected})")


def _is_sequence(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(minimum: int | None = None, required: bool = True) -> Value:
    """An integer, at least `minimum` when given."""
    return Value(
        lambda v: _is_int(v) and (minimum is None or v >= minimum),
        "an integer" if minimum is None else f"an integer >= {minimum}",
        required,
    )


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    required: bool = True,
) -> Value:
    """A real number within [low, high] (ends open where asked; None: unbounded)."""

    def test(v: Any) -> bool:
        if not _is_number(v) or v != v:  # v != v: NaN
            return False
        above = low is None or (v > low if open_low else v >= low)
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    if low is not None and high is not None:
        expected = f"a number in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        expected = f"a number {'>' if open_low else '>='} {low}"
    else:
        expected = "a number"
    return Value(test, expected, required)


def positive(required: bool = True) -> Value:
    return number(0, open_low=True, required=required)


def non_negative(required: bool = True) -> Value:
    return number(0, required=required)


def fraction(required: bool = True) -> Value:
    return number(0, 1, required=required)


def choice(options: Sequence[Any], required: bool = True) -> Value:
    return Value(lambda v: v in options, f"one of {list(options)}", required)


def boolean(required: bool = True) -> Value:
    return Value(lambda v: isinstance(v, bool), "True or False", required)


def text(required: bool = True, non_empty: bool = False) -> Value:
    return Value(
        lambda v: isinstance(v, str) and (bool(v) or not non_empty),
        "a non-empty string" if non_empty else "a string",
        required,
    )


def optional(rule: Value) -> Value:
    """None or what `rule` accepts; the key itself may be absent."""
    return Value(lambda v: v is None or rule.test(v), f"None or {rule.expected}", required=False)


def integers(
    count: int | None = None, minimum: int = 1, odd: bool = False, required: bool = True
) -> Value:
    """A sequence of `count` (any number, but at least one, if None) integers >= minimum."""

    def test(v: Any) -> bool:
        return (
            _is_sequence(v)
            and (len(v) == count if count is not None else len(v) >= 1)
            and all(_is_int(x) and x >= minimum and (x % 2 == 1 or not odd) for x in v)
        )

    size = f"{count}" if count is not None else "one or more"
    kind = "odd integers" if odd else "integers"
    return Value(test, f"{size} {kind} >= {minimum}", required)


def sequence(element: Value, min_len: int = 1, required: bool = True) -> Value:
    """A sequence of at least `min_len` elements, each accepted by `element`."""
    size = "a non-empty sequence" if min_len == 1 else f"a sequence of >= {min_len} items"
    return Value(
        lambda v: _is_sequence(v) and len(v) >= min_len and all(element.test(x) for x in v),
        f"{size}, each {element.expected}",
        required,
    )


def triples(minimum: int = 1, odd: bool = False) -> Value:
    """A non-empty sequence of (z, y, x) integer triples (pooling windows, kernels)."""
    triple = integers(3, minimum, odd)
    return Value(
        lambda v: _is_sequence(v) and len(v) >= 1 and all(triple.test(x) for x in v),
        f"a sequence of (z, y, x) triples of {triple.expected.split(' ', 1)[1]}",
    )


def z_range() -> Value:
    """None or (start, stop) with 0 <= start < stop."""
    return optional(
        Value(
            lambda v: integers(2, 0).test(v) and v[0] < v[1],
            "(start, stop) with 0 <= start < stop",
        )
    )


def yx_crop() -> Value:
    """None or (y0, y1, x0, x1) with y0 < y1 and x0 < x1."""
    return optional(
        Value(
            lambda v: integers(4, 0).test(v) and v[0] < v[1] and v[2] < v[3],
            "(y0, y1, x0, x1) with 0 <= y0 < y1 and 0 <= x0 < x1",
        )
    )


def orientations() -> Value:
    return Value(
        lambda v: (
            _is_sequence(v) and len(v) >= 1 and len(set(v)) == len(v) and set(v) <= {*ORIENTATIONS}
        ),
        f"distinct axes among {list(ORIENTATIONS)} (at least one)",
        required=False,
    )


ANY = Value(lambda v: True, "any value")


def settings_block(cls: type, rules: Mapping[str, Any], required: bool = True) -> Block:
    """The schema of a block that settings class `cls` reads.

    Args:
      cls: a settings dataclass; its config fields are the block's keys, and
        a field without a default is a key the block must hold.
      rules: the range rule (`Value`) of some of those keys; for a nested
        block (`synjax.settings.nested`), a mapping of its own rules. Keys
        without a rule take any value; rules of fields that the class is
        given elsewhere (`GIVEN`, e.g. a model's steps) are not used.
      required: whether the block itself must be present.

    Raises:
      TypeError: a rule names no field of `cls` (a programming error).
    """
    fields = config_fields(cls)
    stray = sorted(set(rules) - {field.name for field in dataclasses.fields(cls)})
    if stray:
        raise TypeError(f"config_checks: rules for {stray}, which are no fields of {cls.__name__}")
    schema: dict[str, Any] = {}
    for name, field in fields.items():
        sub = nested_class(field)
        if sub is not None:
            schema[name] = settings_block(sub, rules.get(name, {}), is_required(field))
        else:
            schema[name] = dataclasses.replace(rules.get(name, ANY), required=is_required(field))
    return Block(schema, required)


# --- Schemas: the keys each pipeline reads ---------------------------------

# Ranges of the `synjax.train.settings.TrainSettings` fields.
_TRAIN_RULES = {
    "steps": integer(1),
    "batch_size": integer(1),
    "learning_rate": positive(),
    "optimizer": choice(OPTIMIZERS),
    "schedule": choice(SCHEDULES),
    "warmup_steps": integer(0),
    "weight_decay": non_negative(),
    "grad_clip_norm": optional(positive()),
    "log_every": integer(0),
    "eval_every": integer(0),
    "checkpoint_every": integer(1),
    "keep_checkpoints": integer(1),
    "num_devices": optional(integer(1)),
}


_INTENSITY = Block(
    {
        "method": choice(INTENSITY_METHODS),
        "low_percent": number(0, 100, required=False),
        "high_percent": number(0, 100, required=False),
    },
    required=False,
)

_TOP = {
    "pipeline": text(),
    "mode": text(),
    "seed": integer(0),
    "distributed": boolean(required=False),
}

_WATERSHED = {
    "smoothing": choice(SMOOTHINGS),
    "sigmas": sequence(non_negative()),
    "hs": sequence(number(0, 1, open_low=True)),
}

_MODEL = settings_block(
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
_SEGMENTER = {
    "seed": integer(0),
    "models": Entries(_MODEL),
    "train": settings_block(
        BoundaryTrainSettings,
        {
            **_TRAIN_RULES,
            "patch_yx": Value(
                lambda v: _is_int(v) and v >= DEEPEM3D_STRIDE and v % DEEPEM3D_STRIDE == 0,
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
                    lambda v: _is_int(v) and v > TILE_OVERLAP and v % DEEPEM3D_STRIDE == 0,
                    f"a multiple of {DEEPEM3D_STRIDE} greater than the tile overlap {TILE_OVERLAP}",
                )
            ),
            "orientations": orientations(),
        },
    ),
    "watershed": Block({**_WATERSHED, "thresholds": sequence(fraction(), 0, required=False)}),
    # A partner config's `neurons` block names only the segmenter's input scaling.
    "data": Block({"intensity": _INTENSITY}, required=False),
}

NEURON_SCHEMA = {
    **_TOP,
    **_SEGMENTER,
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
            "intensity": _INTENSITY,
        }
    ),
    "baseline": Block(_WATERSHED),
    "evaluation": Block({"plot_slices": integer(1)}),
}

PARTNER_SCHEMA = {
    **_TOP,
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
            "intensity": _INTENSITY,
        }
    ),
    "segmentation": Block({"source": choice(SEGMENTATION_SOURCES)}),
    # The neuron segmentation trained when segmentation.source == "predicted".
    "neurons": Block(_SEGMENTER, required=False),
    "targets": Block({"alpha": positive(), "sigma": positive(), "radius_nm": positive()}),
    "unet": settings_block(
        ProximityNetworkSettings,
        {
            "depth": integer(0),
            "base_features": integer(1),
            "feature_growth": integer(1),
            "pool_factors": Value(
                lambda v: _is_sequence(v) and all(integers(3, 1).test(x) for x in v),
                "a sequence (one per level) of (z, y, x) triples of integers >= 1",
            ),
            "conv_kernels": triples(1, odd=True),
            "padding": choice(PADDINGS),
            "train_output": integers(3, 1),
            "predict_output": integers(3, 1),
            "predict_context": integers(3, 0),
        },
    ),
    "train": settings_block(
        ProximityTrainSettings, {**_TRAIN_RULES, "positive_fraction": fraction()}
    ),
    "predict": settings_block(
        BlockwisePredictSettings,
        {
            "batch_size": integer(1),
            "executor": choice(EXECUTORS),
            "resume": choice(RESUME_MODES),
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
            "train": {**_TRAIN_RULES, "label_distance_nm": positive()},
        },
    ),
    "evaluation": Block({"cremi_distance_nm": positive(), "same_ids_distance_nm": positive()}),
}

# --- The fluorescence pipeline (synjax.pipelines.fluorescence) ---------------

FLUORESCENCE_DEPTHS = (18, 34, 50, 101)  # synjax.models.resnet3d.ARCHITECTURES
FLUORESCENCE_LEVELS = ("P2", "P3", "P4", "P5")


def _numbers_in_order(count: int, low: float = 0.0) -> Value:
    """`count` numbers > low, non-decreasing (a (min, max) range when count == 2)."""
    return Value(
        lambda v: (
            _is_sequence(v)
            and len(v) == count
            and all(_is_number(x) and x > low for x in v)
            and list(v) == sorted(v)
        ),
        f"{count} non-decreasing numbers > {low}",
    )


FLUORESCENCE_SCHEMA = {
    **_TOP,
    "data": Block(
        {
            "train_shape": integers(3, 1),
            "test_shape": integers(3, 1),
            "resolution": Value(
                lambda v: (
                    _is_sequence(v) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v)
                ),
                "3 positive voxel sizes (z, y, x) in nm",
            ),
            "train_seed": integer(0),
            "test_seed": integer(0),
            "density": non_negative(),
            "punctum_diameter_nm": _numbers_in_order(2),
            "punctum_z_stretch": _numbers_in_order(2),
            "min_separation": non_negative(),
            "psf_fwhm_nm": Value(
                lambda v: (
                    _is_sequence(v) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v)
                ),
                "3 positive widths (z, y, x) in nm",
            ),
            "intensity": _INTENSITY,
        }
    ),
    "model": Block(
        {
            "depth": choice(FLUORESCENCE_DEPTHS),
            "base_features": integer(1),
            "norm_groups": integer(1),
            "fpn_features": integer(1),
            "rpn_features": integer(1),
            "levels": Value(
                lambda v: (
                    _is_sequence(v)
                    and len(v) >= 1
                    and all(x in FLUORESCENCE_LEVELS for x in v)
                    and list(v) == sorted(set(v), key=FLUORESCENCE_LEVELS.index)
                ),
                f"distinct levels among {list(FLUORESCENCE_LEVELS)}, finest first",
            ),
            "anchor_scales": sequence(positive()),
            "box_roi_size": integers(3, 1),
            "box_features": integer(1),
            "mask_roi_size": integers(3, 1),
            "mask_features": integer(1),
            "mask_convs": integer(0),
            "head_norm_groups": integer(0),
            "rpn_iou": _numbers_in_order(2),
            "rpn_samples": integer(1),
            "roi_samples": integer(1),
            "roi_positive_fraction": number(0, 1, open_low=True),
            "train_pre_nms": integer(1),
            "train_post_nms": integer(1),
            "test_pre_nms": integer(1),
            "test_post_nms": integer(1),
            "roi_canonical_size": positive(),
            "max_instances": integer(1),
            "detections": integer(1),
            "final_nms": number(0, 1, open_low=True),
        }
    ),
    "train": Block(
        {
            **_TRAIN_RULES,
            "patch": integers(3, 1),
            "negative_fraction": fraction(),
            "augment": boolean(),
        }
    ),
    "predict": Block(
        {
            "overlap": integers(3, 0),
            "score_thresholds": sequence(number(0, 1, open_high=True)),
            "batch_size": integer(1),
            "min_overlap": integer(1),
        }
    ),
    "baseline": Block(
        {
            "n_trees": integer(1),
            "max_depth": integer(1),
            "samples_per_class": integer(1),
            "thresholds": sequence(number(0, 1, open_high=True)),
            "hs_nm": sequence(positive()),
            "min_sizes": sequence(integer(0)),
        }
    ),
    "evaluation": Block({"plot_slices": integer(1)}),
}


def _check_fluorescence_relations(config) -> None:
    """Patches fit the training volume and overlap less than their size."""
    patch, overlap = tuple(config.train.patch), tuple(config.predict.overlap)
    shape = tuple(config.data.train_shape)
    if any(p > s for p, s in zip(patch, shape, strict=True)):
        raise ConfigError(
            f"config.train.patch={patch}: larger than config.data.train_shape={shape}"
        )
    if any(o >= p for o, p in zip(overlap, patch, strict=True)):
        raise ConfigError(
            f"config.predict.overlap={overlap}: expected less than config.train.patch={patch}"
        )


SCHEMAS = {
    "partners": PARTNER_SCHEMA,
    "neurons": NEURON_SCHEMA,
    "fluorescence": FLUORESCENCE_SCHEMA,
}
_SYNTHETIC_FIELDS = ("shape", "resolution", "train_seed", "test_seed", "n_synapses")


# --- Checks across keys ----------------------------------------------------


def _check_warmup(warmup: int, steps: int, warmup_key: str, steps_key: str) -> None:
    if warmup and warmup >= steps:
        raise ConfigError(
            f"{warmup_key}={warmup}: expected fewer warm-up steps than {steps_key}={steps}"
        )


def _check_segmenter(block, where: str) -> None:
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
        _check_warmup(
            warmup, model["steps"], f"{where}.train.warmup_steps", f"{where}.models[{index}].steps"
        )


def _check_partner_relations(config) -> None:
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
        _check_warmup(
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
        _check_segmenter(config.neurons, "config.neurons")


def check_config(config) -> None:
    """Checks every key and value of a pipeline's config.

    Args:
      config: the run's config; `config.pipeline` chooses the schema.

    Raises:
      ConfigError: naming the first unknown key, missing key, or value out of
        range, by its full name (e.g. `config.candidates.tau=1.5: expected a
        number in (0, 1)`).
    """
    schema = SCHEMAS.get(config.pipeline)
    if schema is None:
        raise ConfigError(f"config.pipeline={config.pipeline!r}; expected one of {sorted(SCHEMAS)}")
    _check_block(config, schema, "config")
    if config.pipeline == "partners":
        _check_partner_relations(config)
    elif config.pipeline == "fluorescence":
        _check_fluorescence_relations(config)
    else:
        _check_segmenter(config, "config")


# --- Input files -------------------------------------------------------------


def _needed_splits(mode: str) -> list[str]:
    """Which of the "train" and "test" files a run in `mode` reads."""
    return [
        split
        for split, modes in (("train", ("train", "all")), ("test", ("predict", "evaluate", "all")))
        if mode in modes
    ]


def _require_hdf5_dataset(path: str, dataset: str) -> None:
    """The file opens as HDF5 and holds `dataset` as a 3D volume."""
    open_volume(f"{path}:/{dataset}").close()


def check_input_files(config) -> None:
    """Opens each input file the run's mode reads, before any training starts.

    A missing file, a truncated or corrupt one, or one without its raw volume
    is reported now rather than when the stage that reads it runs (the test
    file is read only after training).

    Raises:
      DataError: naming the config key, the file and what is wrong with it.
    """
    data = config.data
    if config.pipeline == "fluorescence":
        return  # synthetic volumes, generated by the pipeline
    if config.pipeline == "partners":
        if data.source != "cremi":
            return
        from synjax.pipelines.partner_data import CREMI_PUBLISHED_AT

        dataset, published_at, raw_key = "CREMI sample", CREMI_PUBLISHED_AT, CREMI_RAW
    else:
        dataset = data.get("dataset", "neuron EM volume")
        published_at, raw_key = data.get("published_at", "its publisher"), data.raw_key
    for split in _needed_splits(config.mode):
        key = f"{split}_path"
        path = require_file(data[key], f"config.data.{key}", dataset, published_at)
        if config.pipeline == "partners":
            _require_hdf5_dataset(path, raw_key)
            continue
        from synjax.pipelines.neuron_data import volume_source

        # Raw and (where they have files of their own) labels, as the loader reads them.
        open_volume(volume_source(path, raw_key, key)).close()
        labels_key = f"{split}_labels_path"
        if data.get(labels_key):
            labels = require_file(
                data[labels_key], f"config.data.{labels_key}", dataset, published_at
            )
            open_volume(volume_source(labels, data.labels_key, labels_key)).close()
