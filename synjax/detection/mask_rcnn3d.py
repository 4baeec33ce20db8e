"""The 3D Mask R-CNN of Chen et al., assembled from injected parts.

detectron2's habit: the model is a frame around five parts it is given
(backbone, FPN, RPN head, box head, mask head), so any part can be swapped
(a smaller backbone, another head) without touching the frame;
`build_mask_rcnn` builds the parts from typed settings. The frame adds
anchors, proposals, ROIAlign, target assignment and losses, all fixed-shape
XLA ops (`synjax.detection`), so that one `jax.jit` train step does it all.

Two modes, one parameter tree:

* `training=True`: called on `[batch, z, y, x, 2]`, channel 0 the normalised
  image and channel 1 the patch's instance ids as floats (dense 1..K, K at
  most `max_instances`), it returns a dict of scalar losses ("loss" their sum)
  and counts. Packing the labels with the image lets `synjax.train.loop.train`
  (which hands the model only `batch["input"]`) run the whole step. The
  sampling key of the anchors and ROIs comes from the bits of the batch's
  image sum, folded into `settings.seed`: a different batch draws a
  different sample, the same batch the same one.
* `training=False`: called on `[batch, z, y, x, 1]` images, it returns
  detections: `boxes [batch, D, 6]`, `scores [batch, D]` (foreground
  probability), `masks [batch, D, mz, my, mx]` (probabilities inside each
  box), `valid [batch, D]`, after a final class-agnostic NMS (IoU 0.2 in the
  paper).

Anchors: at a level with stride `(sz, sy, sx)` the anchors of scale `s`
measure `(s sz, s sy, s sx)` input voxels (the paper's scales 2, 4 and 8 in
each of x, y and z), one anchor per scale at every feature voxel.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synjax.detection.anchors import level_anchors
from synjax.detection.box_coder import clip_boxes, decode_boxes
from synjax.detection.fpn import FPN3D, FPNSettings
from synjax.detection.heads import BoxHead, BoxHeadSettings, MaskHead, MaskHeadSettings
from synjax.detection.losses import (
    box_regression_loss,
    classification_loss,
    mask_loss,
    objectness_loss,
)
from synjax.detection.nms import nms
from synjax.detection.proposals import select_proposals
from synjax.detection.roi_align import assign_levels, multilevel_roi_align
from synjax.detection.rpn import RPNHead, RPNSettings
from synjax.detection.targets import boxes_from_labels, mask_targets, roi_targets, rpn_targets
from synjax.errors import ConfigError, DataError
from synjax.models.resnet3d import ResNet3D, ResNet3DSettings, Triple, spatial_triple

# Second-stage box coder weights (detectron2's default for the ROI heads).
ROI_BOX_WEIGHTS = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)


@dataclasses.dataclass(frozen=True)
class MaskRCNN3DSettings:
    """Typed settings of the 3D Mask R-CNN; defaults are the paper's where it gives them.

    Attributes:
      backbone, fpn, rpn, box_head, mask_head: the parts' settings.
      levels: pyramid levels that the RPN and the ROI heads use, finest first.
      anchor_scales: anchor sizes in units of each level's stride.
      rpn_samples, rpn_positive_fraction: anchors sampled per image for the RPN loss.
      rpn_iou: (low, high) IoU thresholds of the RPN matcher.
      rpn_nms: NMS IoU of the proposals.
      train_pre_nms, train_post_nms: proposals kept per level before NMS and
        in all after it, while training; test_pre_nms, test_post_nms at inference.
      roi_samples, roi_positive_fraction, roi_iou: the ROI sample per image.
      mask_roi_size: (z, y, x) ROIAlign size of the mask head's input; its
        output is this times `mask_head.upsample_factors`.
      roi_sampling_ratio: ROIAlign samples per bin and axis.
      roi_canonical_size, roi_canonical_level: a box of this size (cube root
        of its volume, voxels) is pooled on `levels[roi_canonical_level]`,
        each doubling one level coarser.
      max_instances: ground-truth slots per patch.
      detections: detections returned per image.
      box_score_threshold: candidates below this foreground probability are
        dropped before the final NMS.
      final_nms: class-agnostic NMS IoU of the detections (0.2 in the paper).
      mask_samples: reads per bin and axis of the mask targets.
      seed: base of the sampling keys.
    """

    backbone: ResNet3DSettings = ResNet3DSettings()
    fpn: FPNSettings = FPNSettings()
    rpn: RPNSettings = RPNSettings()
    box_head: BoxHeadSettings = BoxHeadSettings()
    mask_head: MaskHeadSettings = MaskHeadSettings()
    levels: tuple[str, ...] = ("P2", "P3", "P4", "P5")
    anchor_scales: tuple[float, ...] = (2.0, 4.0, 8.0)
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
    roi_canonical_size: float = 16.0
    roi_canonical_level: int = 0
    max_instances: int = 64
    detections: int = 100
    box_score_threshold: float = 0.05
    final_nms: float = 0.2
    mask_samples: int = 2
    seed: int = 0

    def __post_init__(self):
        if len(self.anchor_scales) != self.rpn.num_anchors:
            raise ConfigError(
                f"MaskRCNN3DSettings: {len(self.anchor_scales)} anchor scales but "
                f"rpn.num_anchors={self.rpn.num_anchors}; expected one anchor per scale"
            )
        if not self.levels or any(
            len(name) < 2 or name[0] != "P" or not name[1:].isdigit() for name in self.levels
        ):
            raise ConfigError(f"MaskRCNN3DSettings.levels={self.levels}; expected names like P2")
        top = 6 if self.fpn.p6_strides is not None else 5
        if any(not 2 <= int(name[1:]) <= top for name in self.levels):
            raise ConfigError(
                f"MaskRCNN3DSettings.levels={self.levels}; expected levels among P2..P{top}"
            )
        low, high = self.rpn_iou
        if not 0.0 <= low <= high <= 1.0 or not 0.0 < self.roi_iou <= 1.0:
            raise ConfigError(
                f"MaskRCNN3DSettings rpn_iou={self.rpn_iou}, roi_iou={self.roi_iou}; expected "
                "0 <= low <= high <= 1 and 0 < roi_iou <= 1"
            )
        counts = {
            "rpn_samples": self.rpn_samples,
            "train_pre_nms": self.train_pre_nms,
            "train_post_nms": self.train_post_nms,
            "test_pre_nms": self.test_pre_nms,
            "test_post_nms": self.test_post_nms,
            "roi_samples": self.roi_samples,
            "max_instances": self.max_instances,
            "detections": self.detections,
            "roi_sampling_ratio": self.roi_sampling_ratio,
            "mask_samples": self.mask_samples,
        }
        for name, value in counts.items():
            if int(value) < 1:
                raise ConfigError(f"MaskRCNN3DSettings.{name}={value}; expected >= 1")
        object.__setattr__(
            self, "mask_roi_size", spatial_triple(self.mask_roi_size, "mask_roi_size")
        )

    @property
    def level_strides(self) -> dict[str, tuple[int, int, int]]:
        """Input voxels per feature voxel, (z, y, x), of every pyramid level."""
        strides = {f"P{name[1:]}": s for name, s in self.backbone.feature_strides.items()}
        if self.fpn.p6_strides is not None:
            strides["P6"] = tuple(
                a * b for a, b in zip(strides["P5"], self.fpn.p6_strides, strict=True)
            )
        return strides

    @property
    def mask_size(self) -> Triple:
        """(z, y, x) of the predicted masks."""
        factors = self.mask_head.upsample_factors
        return tuple(r * f for r, f in zip(self.mask_roi_size, factors, strict=True))


def build_mask_rcnn(settings: MaskRCNN3DSettings, training: bool = False) -> MaskRCNN3D:
    """The model with its parts built from `settings`."""
    return MaskRCNN3D(
        settings=settings,
        backbone=ResNet3D(settings.backbone),
        fpn=FPN3D(settings.fpn),
        rpn=RPNHead(settings.rpn),
        box_head=BoxHead(settings.box_head),
        mask_head=MaskHead(settings.mask_head),
        training=training,
    )


def _sampling_key(seed: int, images: jax.Array) -> jax.Array:
    """A key that differs between batches: the bits of the image sum, folded into `seed`."""
    total = jnp.sum(images.astype(jnp.float32))
    bits = jax.lax.bitcast_convert_type(total, jnp.uint32)
    return jax.random.fold_in(jax.random.key(seed), bits)


class MaskRCNN3D(nn.Module):
    """The frame around the parts (see the module docstring for the two modes).

    Attributes:
      settings: `MaskRCNN3DSettings`.
      backbone: `[b, z, y, x, 1]` -> {"C2": ..., "C5": ...}.
      fpn: {"C*"} -> {"P*"} maps of equal channels.
      rpn: {"P*"} -> (objectness {"P*": [b, z, y, x, A]}, deltas {"P*": [b, z, y, x, A, 6]}).
      box_head: ROI features -> (class logits, per-class box deltas).
      mask_head: ROI features -> mask logits.
      training: return losses (True) or detections (False).
    """

    settings: MaskRCNN3DSettings
    backbone: nn.Module
    fpn: nn.Module
    rpn: nn.Module
    box_head: nn.Module
    mask_head: nn.Module
    training: bool = False

    def _pyramid(self, images: jax.Array):
        s = self.settings
        pyramid = self.fpn(self.backbone(images))
        missing = [name for name in s.levels if name not in pyramid]
        if missing:
            raise ConfigError(
                f"MaskRCNN3D: levels {missing} are not in the pyramid {list(pyramid)}"
            )
        features = {name: pyramid[name] for name in s.levels}
        logits, deltas = self.rpn(features)
        strides = s.level_strides
        anchors, flat_logits, flat_deltas = [], [], []
        for name in s.levels:
            shape = features[name].shape[1:4]
            stride = strides[name]
            sizes = [[scale * st for st in stride] for scale in s.anchor_scales]
            anchors.append(level_anchors(shape, stride, np.asarray(sizes, np.float32)))
            batch = logits[name].shape[0]
            flat_logits.append(logits[name].reshape(batch, -1))
            flat_deltas.append(deltas[name].reshape(batch, -1, 6))
        scales = [tuple(1.0 / st for st in strides[name]) for name in s.levels]
        return [features[n] for n in s.levels], anchors, flat_logits, flat_deltas, scales

    def _pool(self, features, boxes, output_size, scales):
        """ROIAlign of [b, n, 6] boxes on their levels -> [b * n, oz, oy, ox, c]."""
        s = self.settings
        levels = jax.vmap(
            lambda b: assign_levels(b, len(s.levels), s.roi_canonical_size, s.roi_canonical_level)
        )(boxes)
        pooled = jax.vmap(
            lambda f, b, lv: multilevel_roi_align(
                f, b, lv, output_size, scales, s.roi_sampling_ratio
            )
        )(features, boxes, levels)
        return pooled.reshape(-1, *pooled.shape[2:])

    def _proposals(self, anchors, logits, deltas, volume_shape, pre_nms, post_nms):
        s = self.settings

        def one(level_logits, level_deltas):
            boxes, _, _, valid = select_proposals(
                anchors, level_logits, level_deltas, volume_shape, pre_nms, post_nms, s.rpn_nms
            )
            return boxes, valid

        logits = [jax.lax.stop_gradient(x) for x in logits]
        deltas = [jax.lax.stop_gradient(x) for x in deltas]
        return jax.vmap(one)(logits, deltas)

    def __call__(self, x: jax.Array):
        if x.ndim != 5:
            raise DataError(
                f"MaskRCNN3D input shape {x.shape}; expected [batch, z, y, x, channels]"
            )
        want = 2 if self.training else 1
        if x.shape[-1] != want:
            what = "image and instance ids" if self.training else "image"
            raise DataError(
                f"MaskRCNN3D (training={self.training}) input has {x.shape[-1]} channels; "
                f"expected {want} ({what})"
            )
        if self.training:
            return self._losses(x[..., :1], jnp.round(x[..., 1]).astype(jnp.int32))
        return self._detect(x)

    def _losses(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        batch = images.shape[0]
        volume_shape = images.shape[1:4]
        features, anchors, logits, deltas, scales = self._pyramid(images)
        all_anchors = jnp.concatenate(anchors)
        all_logits = jnp.concatenate(logits, axis=1)
        all_deltas = jnp.concatenate(deltas, axis=1)
        gt_boxes, gt_valid = jax.vmap(lambda lab: boxes_from_labels(lab, s.max_instances))(labels)
        keys = jax.random.split(_sampling_key(s.seed, images), 2 * batch).reshape(batch, 2)

        low, high = s.rpn_iou
        rpn = jax.vmap(
            lambda k, b, v: rpn_targets(
                k, all_anchors, b, v, s.rpn_samples, s.rpn_positive_fraction, high, low
            )
        )(keys[:, 0], gt_boxes, gt_valid)
        rpn_sampled = jnp.sum(rpn.labels >= 0).astype(jnp.float32)
        losses = {
            "rpn_objectness": objectness_loss(all_logits, rpn.labels),
            "rpn_box": box_regression_loss(all_deltas, rpn.deltas, rpn.labels == 1, rpn_sampled),
        }

        proposals, proposal_valid = self._proposals(
            anchors, logits, deltas, volume_shape, s.train_pre_nms, s.train_post_nms
        )
        rois = jax.vmap(
            lambda k, p, pv, b, v: roi_targets(
                k,
                p,
                pv,
                b,
                v,
                s.roi_samples,
                s.roi_positive_fraction,
                s.roi_iou,
                ROI_BOX_WEIGHTS,
            )
        )(keys[:, 1], proposals, proposal_valid, gt_boxes, gt_valid)
        box_features = self._pool(features, rois.boxes, s.box_head.roi_size, scales)
        class_logits, box_deltas = self.box_head(box_features)
        classes = rois.classes.reshape(-1)
        foreground = classes == 1
        valid = rois.valid.reshape(-1)
        losses["roi_class"] = classification_loss(class_logits, classes, valid)
        losses["roi_box"] = box_regression_loss(
            box_deltas[:, 0], rois.deltas.reshape(-1, 6), foreground, jnp.sum(valid)
        )

        # sample_labels lists foreground first: every foreground ROI is in the first slots.
        num_mask = min(s.roi_samples, int(np.ceil(s.roi_samples * s.roi_positive_fraction)))
        mask_boxes = rois.boxes[:, :num_mask]
        mask_fg = rois.classes[:, :num_mask] == 1
        mask_ids = jnp.where(mask_fg, rois.matched[:, :num_mask] + 1, 0)
        mask_features = self._pool(features, mask_boxes, s.mask_roi_size, scales)
        mask_logits = self.mask_head(mask_features)[..., 0]
        targets = jax.vmap(lambda lab, b, i: mask_targets(lab, b, i, s.mask_size, s.mask_samples))(
            labels, mask_boxes, mask_ids
        )
        losses["mask"] = mask_loss(
            mask_logits, targets.reshape(mask_logits.shape), mask_fg.reshape(-1)
        )
        out = dict(losses)
        out["loss"] = sum(losses.values())
        out["gt_instances"] = jnp.sum(gt_valid).astype(jnp.float32) / batch
        out["roi_foreground"] = jnp.sum(foreground).astype(jnp.float32) / batch
        return out

    def _detect(self, images: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        volume_shape = images.shape[1:4]
        features, anchors, logits, deltas, scales = self._pyramid(images)
        proposals, proposal_valid = self._proposals(
            anchors, logits, deltas, volume_shape, s.test_pre_nms, s.test_post_nms
        )
        box_features = self._pool(features, proposals, s.box_head.roi_size, scales)
        class_logits, box_deltas = self.box_head(box_features)
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
        mask_features = self._pool(features, det_boxes, s.mask_roi_size, scales)
        masks = jax.nn.sigmoid(self.mask_head(mask_features)[..., 0])
        masks = masks.reshape(batch, s.detections, *masks.shape[1:])
        return {"boxes": det_boxes, "scores": det_scores, "masks": masks, "valid": det_valid}
