"""Checks of an EM instances (instance network against U-Net + components) config.

The `model`, `train`, `baseline` and `predict` blocks are the fields of their
settings classes (`synjax.stages.instance_settings`); `data` and
`evaluation` are declared here. Across keys: patches and blocks are
multiples of the poolings, the RPN and ROI levels exist, the slabs are in
order (train, then validation, then test, none overlapping) and the
training slab holds a patch.
"""

from __future__ import annotations

import math

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
)
from synjax.pipelines.config_checks.rules import (
    Block,
    Value,
    boolean,
    choice,
    integer,
    integers,
    is_number,
    is_sequence,
    number,
    positive,
    sequence,
    settings_block,
    text,
    triples,
)
from synjax.stages.instance_settings import (
    CleftBaselineSettings,
    InstanceNetworkSettings,
    InstancePredictSettings,
    InstanceTrainSettings,
)

SOURCES = ("file", "synthetic")
DATASET = "VNC ssTEM stack (Gerhard et al. 2013)"
PUBLISHED_AT = "figshare doi:10.6084/m9.figshare.856713"
SPLIT_ORDER = ("train", "validation", "test")


def _rows() -> Value:
    return Value(
        lambda v: integers(2, 0).test(v) and v[0] < v[1], "(start, stop) with 0 <= start < stop"
    )


def _sizes() -> Value:
    return Value(
        lambda v: (
            is_sequence(v)
            and len(v) >= 1
            and all(
                is_sequence(s) and len(s) == 3 and all(is_number(x) and x > 0 for x in s) for s in v
            )
        ),
        "a non-empty sequence of positive (z, y, x) sizes",
    )


def _iou_range() -> Value:
    return Value(
        lambda v: (
            is_sequence(v)
            and len(v) == 2
            and all(is_number(x) for x in v)
            and 0 <= v[0] <= v[1] <= 1
        ),
        "(low, high) with 0 <= low <= high <= 1",
    )


def _thresholds() -> Value:
    return sequence(number(0, 1, open_high=True))


SCHEMA = {
    **TOP,
    "data": Block(
        {
            "source": choice(SOURCES),
            "path": text(non_empty=True),
            "raw_key": text(non_empty=True),
            "clefts_key": text(non_empty=True),
            "synthetic": Block(
                {
                    "shape": integers(3, 1),
                    "resolution": Value(
                        lambda v: (
                            is_sequence(v)
                            and len(v) == 3
                            and all(is_number(x) and x > 0 for x in v)
                        ),
                        "3 positive voxel sizes (z, y, x) in nm",
                    ),
                    "seed": integer(0),
                    "n_synapses": integer(1),
                }
            ),
            "downsample": integers(3, 1),
            "splits": Block({name: _rows() for name in SPLIT_ORDER}),
            "intensity": INTENSITY,
        }
    ),
    "model": settings_block(
        InstanceNetworkSettings,
        {
            "base_features": integer(1),
            "feature_growth": integer(1),
            "pool_factors": triples(1),
            "neck_features": integer(1),
            "rpn_level": integer(0),
            "roi_level": integer(0),
            "anchor_sizes": _sizes(),
            "rpn_features": integer(1),
            "box_roi_size": integers(3, 1),
            "box_features": integer(1),
            "mask_roi_size": integers(3, 1),
            "mask_features": integer(1),
            "mask_convs": integer(0),
            "mask_upsample": integers(3, 1),
            "rpn_iou": _iou_range(),
            "rpn_samples": integer(1),
            "roi_samples": integer(1),
            "roi_positive_fraction": number(0, 1, open_low=True),
            "train_pre_nms": integer(1),
            "train_post_nms": integer(1),
            "test_pre_nms": integer(1),
            "test_post_nms": integer(1),
            "max_instances": integer(1),
            "detections": integer(1),
            "final_nms": number(0, 1, open_low=True),
            "semantic_weight": number(0),
            "semantic_positive_weight": positive(),
        },
    ),
    "train": settings_block(
        InstanceTrainSettings,
        {
            **TRAIN_RULES,
            "patch": integers(3, 1),
            "positive_fraction": number(0, 1),
            "augment": boolean(),
        },
    ),
    "baseline": settings_block(
        CleftBaselineSettings,
        {
            "steps": integer(1),
            "learning_rate": positive(),
            "positive_weight": positive(),
            "thresholds": _thresholds(),
            "min_sizes": sequence(integer(0)),
        },
    ),
    "predict": settings_block(
        InstancePredictSettings,
        {
            "block": integers(3, 1),
            "overlap": integers(3, 0),
            "batch_size": integer(1),
            "context": integer(0),
            "score_thresholds": _thresholds(),
            "mask_thresholds": sequence(number(0, 1, open_low=True, open_high=True)),
            "semantic_mixes": sequence(number(0, 1)),
            "semantic_rescoring": sequence(boolean()),
            "min_sizes": sequence(integer(0)),
            "min_free_fraction": number(0, 1),
            **PREDICT_VOLUME_RULES,
            "executor": choice(EXECUTORS),
            "scheduler": text(),
            "fusion_iou": number(0, 1, open_high=True),
        },
    ),
    "evaluation": Block({"plot_slices": integer(1), "attention_instances": integer(0)}),
}


def check_relations(config) -> None:
    """Shapes against the poolings, levels against the depth, slabs in order."""
    model, train, predict, data = config.model, config.train, config.predict, config.data
    pools = [tuple(p) for p in model.pool_factors]
    multiple = tuple(math.prod(p[a] for p in pools) for a in range(3))
    for key, shape in (
        ("config.train.patch", train.patch),
        ("config.predict.block", predict.block),
    ):
        if any(int(s) % m for s, m in zip(shape, multiple, strict=True)):
            raise ConfigError(
                f"{key}={tuple(shape)}: expected multiples of {multiple} "
                f"(the product of config.model.pool_factors)"
            )
    if any(o >= b for o, b in zip(predict.overlap, predict.block, strict=True)):
        raise ConfigError(
            f"config.predict.overlap={tuple(predict.overlap)}: expected less than "
            f"config.predict.block={tuple(predict.block)}"
        )
    for key in ("rpn_level", "roi_level"):
        if model[key] >= len(pools):
            raise ConfigError(
                f"config.model.{key}={model[key]}: expected a decoder level in "
                f"0..{len(pools) - 1} (one per entry of config.model.pool_factors)"
            )
    semantic_grid = any(float(m) > 0 for m in predict.get("semantic_mixes", (0.0,))) or any(
        predict.get("semantic_rescoring", (False,))
    )
    if semantic_grid and not float(model.get("semantic_weight", 0.0)) > 0:
        raise ConfigError(
            f"config.predict.semantic_mixes={tuple(predict.get('semantic_mixes', ()))}, "
            f"semantic_rescoring={tuple(predict.get('semantic_rescoring', ()))}: they read the "
            "semantic head, which config.model.semantic_weight=0 does not build; expected "
            "semantic_weight > 0, or mixes (0.0,) and rescoring (False,)"
        )
    check_predict_volume(predict, "config.predict")
    check_warmup(train.warmup_steps, train.steps, "config.train.warmup_steps", "config.train.steps")
    splits = [tuple(data.splits[name]) for name in SPLIT_ORDER]
    for (name, (_, stop)), (next_name, (start, _)) in zip(
        zip(SPLIT_ORDER, splits, strict=True),
        list(zip(SPLIT_ORDER, splits, strict=True))[1:],
        strict=False,
    ):
        if start < stop:
            raise ConfigError(
                f"config.data.splits.{next_name}={data.splits[next_name]}: expected to start "
                f"at or after config.data.splits.{name} ends ({stop})"
            )
    factor = int(data.downsample[1])
    train_rows = (splits[0][1] - splits[0][0]) // factor
    if int(train.patch[1]) > train_rows:
        raise ConfigError(
            f"config.train.patch={tuple(train.patch)}: taller than the training slab "
            f"({train_rows} read rows of config.data.splits.train)"
        )


def check_input_files(config) -> None:
    """Opens the raw and cleft volumes of a file source (any mode reads them)."""
    data = config.data
    if data.source != "file":
        return
    path = require_file(data.path, "config.data.path", DATASET, PUBLISHED_AT)
    for key in ("raw_key", "clefts_key"):
        open_volume(f"{path}:/{data[key]}").close()
