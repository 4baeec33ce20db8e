"""The two-stage core that the 3D Mask R-CNN and the EM instance network share.

Both networks are frames around a backbone that end in the same steps
(detectron2's `GeneralizedRCNN` with its standard ROI heads): anchors scored
and regressed by an RPN, proposals by NMS, a sample of proposals matched to
the ground truth, box classification and regression on ROIAlign features,
and a mask head on the foreground ROIs; at inference, the proposals scored,
decoded, clipped, thinned by a final class-agnostic NMS and given masks.
The frames differ only in where the anchors and the ROI features come from
(a feature pyramid with level assignment, or one decoder map each), so each
gives this module its anchors, RPN outputs, proposals and a `pool` function,
and the steps after them live here once.

Every function runs inside the frame's Flax method, so `box_head` and
`mask_head` are the frame's bound submodules.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from synjax.detection.box_coder import clip_boxes, decode_boxes
from synjax.detection.heads import BoxHeadSettings, MaskHeadSettings
from synjax.detection.losses import (
    box_regression_loss,
    classification_loss,
    mask_loss,
    objectness_loss,
)
from synjax.detection.nms import nms
from synjax.detection.targets import boxes_from_labels, mask_targets, roi_targets, rpn_targets
from synjax.errors import ConfigError, DataError
from synjax.geometry import Triple, spatial_triple

# Second-stage box coder weights (detectron2's default for the ROI heads).
ROI_BOX_WEIGHTS = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)

# `pool(boxes [b, n, 6], output_size (z, y, x)) -> [b * n, oz, oy, ox, c]` ROI features.
PoolFn = Callable[[jax.Array, Triple], jax.Array]


@dataclasses.dataclass(frozen=True)
class TwoStageSettings:
    """Settings of the steps after the backbone; each network's settings extend these.

    Attributes:
      box_head, mask_head: the ROI heads.
      rpn_samples, rpn_positive_fraction: anchors sampled per image for the RPN loss.
      rpn_iou: (low, high) IoU thresholds of the RPN matcher.
      rpn_nms: NMS IoU of the proposals.
      train_pre_nms, train_post_nms: proposals kept before NMS and after it,
        while training; test_pre_nms, test_post_nms at inference.
      roi_samples, roi_positive_fraction, roi_iou: the ROI sample per image.
      mask_roi_size: (z, y, x) ROIAlign size of the mask head's input; the
        masks are this times `mask_head.upsample_factors`.
      roi_sampling_ratio: ROIAlign samples per bin and axis.
      max_instances: ground-truth slots per patch.
      detections: detections returned per image.
      box_score_threshold: candidates below this foreground probability are
        dropped before the final NMS.
      final_nms: class-agnostic NMS IoU of the detections.
      mask_samples: reads per bin and axis of the mask targets.
      seed: base of the sampling keys.
    """

    box_head: BoxHeadSettings = BoxHeadSettings()
    mask_head: MaskHeadSettings = MaskHeadSettings()
    rpn_samples: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_iou: tuple[float, float] = (0.3, 0.7)
    rpn_nms: float = 0.7
    train_pre_nms: int = 2000
    train_post_nms: int = 1000
    test_pre_nms: int = 1000
    test_post_nms: int = 1000
    roi_samples: int = 128
    roi_positive_fraction: float = 0.25
    roi_iou: float = 0.5
    mask_roi_size: Triple = (7, 14, 14)
    roi_sampling_ratio: int = 2
    max_instances: int = 64
    detections: int = 100
    box_score_threshold: float = 0.05
    final_nms: float = 0.2
    mask_samples: int = 2
    seed: int = 0

    def __post_init__(self):
        name = type(self).__name__
        low, high = self.rpn_iou
        if not 0.0 <= low <= high <= 1.0 or not 0.0 < self.roi_iou <= 1.0:
            raise ConfigError(
                f"{name} rpn_iou={self.rpn_iou}, roi_iou={self.roi_iou}; expected "
                "0 <= low <= high <= 1 and 0 < roi_iou <= 1"
            )
        for field in self.counted_fields():
            value = getattr(self, field)
            if int(value) < 1:
                raise ConfigError(f"{name}.{field}={value}; expected >= 1")
        object.__setattr__(
            self, "mask_roi_size", spatial_triple(self.mask_roi_size, "mask_roi_size")
        )

    def counted_fields(self) -> tuple[str, ...]:
        """Fields that count something and must be >= 1 (a network's settings add theirs)."""
        return (
            "rpn_samples",
            "train_pre_nms",
            "train_post_nms",
            "test_pre_nms",
            "test_post_nms",
            "roi_samples",
            "max_instances",
            "detections",
            "roi_sampling_ratio",
            "mask_samples",
        )

    @property
    def mask_size(self) -> Triple:
        """(z, y, x) of the predicted masks."""
        factors = self.mask_head.upsample_factors
        return tuple(r * f for r, f in zip(self.mask_roi_size, factors, strict=True))


def check_input(x: jax.Array, training: bool, network: str) -> None:
    """DataError unless `x` is `[b, z, y, x, 2]` (training) or `[b, z, y, x, 1]`."""
    if x.ndim != 5:
        raise DataError(f"{network} input shape {x.shape}; expected [batch, z, y, x, channels]")
    want = 2 if training else 1
    if x.shape[-1] != want:
        what = "image and instance ids" if training else "image"
        raise DataError(
            f"{network} (training={training}) input has {x.shape[-1]} channels; "
            f"expected {want} ({what})"
        )


def split_training_input(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`[b, z, y, x, 2]` -> (images `[b, z, y, x, 1]`, instance ids `[b, z, y, x]` int32)."""
    return x[..., :1], jnp.round(x[..., 1]).astype(jnp.int32)


def sampling_key(seed: int, images: jax.Array) -> jax.Array:
    """A key that differs between batches: the bits of the image sum, folded into `seed`."""
    total = jnp.sum(images.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(total, jnp.uint32)
    return jax.random.fold_in(jax.random.key(seed), bits)


def ground_truth(s: TwoStageSettings, images: jax.Array, labels: jax.Array):
    """Boxes of the instances and the anchor and ROI sampling keys of a batch.

    Returns:
      (gt_boxes [b, max_instances, 6], gt_valid [b, max_instances], keys [b, 2]).
    """
    batch = images.shape[0]
    gt_boxes, gt_valid = jax.vmap(lambda lab: boxes_from_labels(lab, s.max_instances))(labels)
    keys = jax.random.split(sampling_key(s.seed, images), 2 * batch).reshape(batch, 2)
    return gt_boxes, gt_valid, keys


def rpn_losses(
    s: TwoStageSettings, anchors, logits, deltas, gt_boxes, gt_valid, keys
) -> dict[str, jax.Array]:
    """Objectness and box losses of the RPN on a sample of anchors.

    Args:
      s: the settings.
      anchors: [A, 6] every anchor of the image.
      logits: [b, A] objectness logits; deltas: [b, A, 6].
      gt_boxes, gt_valid, keys: from `ground_truth`.
    """
    low, high = s.rpn_iou
    rpn = jax.vmap(
        lambda k, b, v: rpn_targets(
            k, anchors, b, v, s.rpn_samples, s.rpn_positive_fraction, high, low
        )
    )(keys[:, 0], gt_boxes, gt_valid)
    sampled = jnp.sum(rpn.labels >= 0).astype(jnp.float32)
    return {
        "rpn_objectness": objectness_loss(logits, rpn.labels),
        "rpn_box": box_regression_loss(deltas, rpn.deltas, rpn.labels == 1, sampled),
    }


def roi_losses(
    s: TwoStageSettings,
    labels: jax.Array,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    keys: jax.Array,
    pool: PoolFn,
    box_head,
    mask_head,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Box classification, box regression and mask losses on a sample of proposals.

    Args:
      s: the settings.
      labels: [b, z, y, x] instance ids.
      proposals: [b, P, 6]; proposal_valid: [b, P].
      gt_boxes, gt_valid, keys: from `ground_truth`.
      pool: the frame's ROI feature pooling.
      box_head, mask_head: the frame's ROI heads.

    Returns:
      ({"roi_class", "roi_box", "mask"}, foreground [b * roi_samples] bool).
    """
    rois = jax.vmap(
        lambda k, p, pv, b, v: roi_targets(
            k, p, pv, b, v, s.roi_samples, s.roi_positive_fraction, s.roi_iou, ROI_BOX_WEIGHTS
        )
    )(keys[:, 1], proposals, proposal_valid, gt_boxes, gt_valid)
    class_logits, box_deltas = box_head(pool(rois.boxes, s.box_head.roi_size))
    classes = rois.classes.reshape(-1)
    foreground = classes == 1
    valid = rois.valid.reshape(-1)
    losses = {
        "roi_class": classification_loss(class_logits, classes, valid),
        "roi_box": box_regression_loss(
            box_deltas[:, 0], rois.deltas.reshape(-1, 6), foreground, jnp.sum(valid)
        ),
    }
    # roi_targets lists foreground first: every foreground ROI is in the first slots.
    num_mask = min(s.roi_samples, math.ceil(s.roi_samples * s.roi_positive_fraction))
    mask_boxes = rois.boxes[:, :num_mask]
    mask_fg = rois.classes[:, :num_mask] == 1
    mask_ids = jnp.where(mask_fg, rois.matched[:, :num_mask] + 1, 0)
    mask_logits = mask_head(pool(mask_boxes, s.mask_roi_size))[..., 0]
    targets = jax.vmap(lambda lab, b, i: mask_targets(lab, b, i, s.mask_size, s.mask_samples))(
        labels, mask_boxes, mask_ids
    )
    losses["mask"] = mask_loss(mask_logits, targets.reshape(mask_logits.shape), mask_fg.reshape(-1))
    return losses, foreground


def training_outputs(
    losses: dict[str, jax.Array], gt_valid: jax.Array, foreground: jax.Array
) -> dict[str, jax.Array]:
    """The losses, "loss" their sum, and the counts logged per image."""
    batch = gt_valid.shape[0]
    out = dict(losses)
    out["loss"] = sum(losses.values())
    out["gt_instances"] = jnp.sum(gt_valid).astype(jnp.float32) / batch
    out["roi_foreground"] = jnp.sum(foreground).astype(jnp.float32) / batch
    return out


def detect(
    s: TwoStageSettings,
    volume_shape: Triple,
    proposals: jax.Array,
    proposal_valid: jax.Array,
    pool: PoolFn,
    box_head,
    mask_head,
) -> dict[str, jax.Array]:
    """Detections of [b, P, 6] proposals: scored, decoded, clipped, final NMS, masks.

    Returns:
      {"boxes" [b, D, 6], "scores" [b, D] (foreground probability, 0 where
      invalid), "masks" [b, D, mz, my, mx] (probabilities), "valid" [b, D]}.
    """
    class_logits, box_deltas = box_head(pool(proposals, s.box_head.roi_size))
    batch, count = proposals.shape[:2]
    scores = jax.nn.softmax(class_logits, axis=-1)[:, 1].reshape(batch, count)
    boxes = decode_boxes(proposals.reshape(-1, 6), box_deltas[:, 0], ROI_BOX_WEIGHTS)
    boxes = clip_boxes(boxes, volume_shape).reshape(batch, count, 6)
    sizes = boxes[..., 3:] - boxes[..., :3]
    keep = proposal_valid & (scores > s.box_score_threshold) & jnp.all(sizes > 0, axis=-1)

    def final(b, sc, ok):
        index, index_valid = nms(b, sc, s.final_nms, s.detections, valid=ok)
        return b[index], jnp.where(index_valid, sc[index], 0.0), index_valid

    det_boxes, det_scores, det_valid = jax.vmap(final)(boxes, scores, keep)
    det_boxes = jnp.where(det_valid[..., None], det_boxes, 0.0)
    masks = jax.nn.sigmoid(mask_head(pool(det_boxes, s.mask_roi_size))[..., 0])
    masks = masks.reshape(batch, s.detections, *masks.shape[1:])
    return {"boxes": det_boxes, "scores": det_scores, "masks": masks, "valid": det_valid}


def training_loss(outputs: dict[str, jax.Array], batch) -> tuple[jax.Array, dict]:
    """The train loop's loss of a two-stage network: its "loss" output, the rest as metrics.

    The network computed its losses from the packed input (image and instance
    ids), so `batch` is not read.
    """
    del batch
    return outputs["loss"], {k: v for k, v in outputs.items() if k != "loss"}
