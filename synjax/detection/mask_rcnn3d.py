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

from synjax.detection import two_stage
from synjax.detection.anchors import level_anchors
from synjax.detection.fpn import FPN3D, FPNSettings
from synjax.detection.heads import BoxHead, MaskHead
from synjax.detection.proposals import select_proposals
from synjax.detection.roi_align import assign_levels, multilevel_roi_align
from synjax.detection.rpn import RPNHead, RPNSettings
from synjax.detection.two_stage import TwoStageSettings
from synjax.errors import ConfigError
from synjax.models.resnet3d import ResNet3D, ResNet3DSettings


@dataclasses.dataclass(frozen=True)
class MaskRCNN3DSettings(TwoStageSettings):
    """Typed settings of the 3D Mask R-CNN; defaults are the paper's where it gives them.

    The steps after the backbone take `TwoStageSettings` (whose defaults are
    this network's: final NMS at IoU 0.2 as in the paper, detectron2's elsewhere).

    Attributes:
      backbone, fpn, rpn: the parts' settings (the heads': `TwoStageSettings`).
      levels: pyramid levels that the RPN and the ROI heads use, finest first.
      anchor_scales: anchor sizes in units of each level's stride.
      roi_canonical_size, roi_canonical_level: a box of this size (cube root
        of its volume, voxels) is pooled on `levels[roi_canonical_level]`,
        each doubling one level coarser.
    """

    backbone: ResNet3DSettings = ResNet3DSettings()
    fpn: FPNSettings = FPNSettings()
    rpn: RPNSettings = RPNSettings()
    levels: tuple[str, ...] = ("P2", "P3", "P4", "P5")
    anchor_scales: tuple[float, ...] = (2.0, 4.0, 8.0)
    roi_canonical_size: float = 16.0
    roi_canonical_level: int = 0

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
        super().__post_init__()

    @property
    def level_strides(self) -> dict[str, tuple[int, int, int]]:
        """Input voxels per feature voxel, (z, y, x), of every pyramid level."""
        strides = {f"P{name[1:]}": s for name, s in self.backbone.feature_strides.items()}
        if self.fpn.p6_strides is not None:
            strides["P6"] = tuple(
                a * b for a, b in zip(strides["P5"], self.fpn.p6_strides, strict=True)
            )
        return strides


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
        two_stage.check_input(x, self.training, "MaskRCNN3D")
        if self.training:
            return self._losses(*two_stage.split_training_input(x))
        return self._detect(x)

    def _losses(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        volume_shape = images.shape[1:4]
        features, anchors, logits, deltas, scales = self._pyramid(images)
        gt_boxes, gt_valid, keys = two_stage.ground_truth(s, images, labels)
        losses = two_stage.rpn_losses(
            s,
            jnp.concatenate(anchors),
            jnp.concatenate(logits, axis=1),
            jnp.concatenate(deltas, axis=1),
            gt_boxes,
            gt_valid,
            keys,
        )
        proposals, proposal_valid = self._proposals(
            anchors, logits, deltas, volume_shape, s.train_pre_nms, s.train_post_nms
        )
        roi, foreground = two_stage.roi_losses(
            s,
            labels,
            proposals,
            proposal_valid,
            gt_boxes,
            gt_valid,
            keys,
            lambda boxes, size: self._pool(features, boxes, size, scales),
            self.box_head,
            self.mask_head,
        )
        return two_stage.training_outputs(losses | roi, gt_valid, foreground)

    def _detect(self, images: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        volume_shape = images.shape[1:4]
        features, anchors, logits, deltas, scales = self._pyramid(images)
        proposals, proposal_valid = self._proposals(
            anchors, logits, deltas, volume_shape, s.test_pre_nms, s.test_post_nms
        )
        return two_stage.detect(
            s,
            volume_shape,
            proposals,
            proposal_valid,
            lambda boxes, size: self._pool(features, boxes, size, scales),
            self.box_head,
            self.mask_head,
        )
