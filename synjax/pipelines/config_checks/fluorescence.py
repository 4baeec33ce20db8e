"""Checks of a fluorescence (3D Mask R-CNN against pixel forest + watershed) config."""

from __future__ import annotations

from synjax.errors import ConfigError
from synjax.pipelines.config_checks.common import (
    EXECUTORS,
    INTENSITY,
    PREDICT_VOLUME_RULES,
    TOP,
    TRAIN_RULES,
    check_predict_volume,
)
from synjax.pipelines.config_checks.rules import (
    Block,
    Value,
    boolean,
    choice,
    fraction,
    integer,
    integers,
    is_number,
    is_sequence,
    non_negative,
    number,
    positive,
    sequence,
    text,
)

FLUORESCENCE_DEPTHS = (18, 34, 50, 101)  # synjax.models.resnet3d.ARCHITECTURES
FLUORESCENCE_LEVELS = ("P2", "P3", "P4", "P5")


def _numbers_in_order(count: int, low: float = 0.0) -> Value:
    """`count` numbers > low, non-decreasing (a (min, max) range when count == 2)."""
    return Value(
        lambda v: (
            is_sequence(v)
            and len(v) == count
            and all(is_number(x) and x > low for x in v)
            and list(v) == sorted(v)
        ),
        f"{count} non-decreasing numbers > {low}",
    )


SCHEMA = {
    **TOP,
    "data": Block(
        {
            "train_shape": integers(3, 1),
            "test_shape": integers(3, 1),
            "resolution": Value(
                lambda v: is_sequence(v) and len(v) == 3 and all(is_number(x) and x > 0 for x in v),
                "3 positive voxel sizes (z, y, x) in nm",
            ),
            "train_seed": integer(0),
            "test_seed": integer(0),
            "density": non_negative(),
            "punctum_diameter_nm": _numbers_in_order(2),
            "punctum_z_stretch": _numbers_in_order(2),
            "min_separation": non_negative(),
            "psf_fwhm_nm": Value(
                lambda v: is_sequence(v) and len(v) == 3 and all(is_number(x) and x > 0 for x in v),
                "3 positive widths (z, y, x) in nm",
            ),
            "intensity": INTENSITY,
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
                    is_sequence(v)
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
            **TRAIN_RULES,
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
            "block": integers(3, 1),
            **PREDICT_VOLUME_RULES,
            "executor": choice(EXECUTORS),
            "scheduler": text(),
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


def check_relations(config) -> None:
    """Patches fit the training volume and overlap less than their size; an input has an output."""
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
    check_predict_volume(config.predict, "config.predict")


def check_input_files(config) -> None:
    """Nothing to open: the pipeline generates its synthetic volumes."""
