"""The end-to-end 3D synapse instance network for EM (Expert Syst. Appl., 2024).

A 3D U-Net backbone (contracting and expansive paths, "SAME" padding) whose
decoder maps feed detectors and a mask predictor, so that 3D synapse
instances come straight from 3D features, without a binary mask and
connected components in between. detectron2's habit, as the 3D Mask R-CNN
(`synjax.detection.mask_rcnn3d`): the network is a frame around injected
parts (backbone, neck, RPN head, box head, mask head; `build_instance_unet`
builds them from typed settings), and every detection op is one of part 1's
fixed-shape XLA ops, so that one `jax.jit` step trains it all.

Backbone. ssTEM voxels are about 10x coarser in z than in y and x, so the
U-Net pools (1, 2, 2) first and (2, 2, 2) only once y and x have caught up:
for the VNC volume read at (1, 2, 2) (50 x 9.2 x 9.2 nm) the default pools
(1, 2, 2) three times (73.6 nm in y, x against 50 in z), then (2, 2, 2).
Decoder level `l` ("D0" finest) has stride `prod(pool_factors[:l])`.

Why a frame of its own rather than `MaskRCNN3D` with this backbone. That
frame runs the RPN and the ROI heads on one list of levels, with anchors of
`scale x stride` (cubes in units of the level's stride). EM clefts are flat
and small: 1-9 sections thick and 9-58 voxels across at 9.2 nm (VNC). Their
anchors need explicit (z, y, x) shapes and a level whose centres lie close
enough to small clefts ((1, 4, 4) here: 31 of the VNC's 33 clefts have an
anchor at IoU >= 0.4 with nine shapes), while masks of clefts a few voxels
thick need a finer map. Sharing one list would put the RPN on the fine map
too, whose 4x more anchors (all background: too small to match) would fill
most of the negative sample and leave the coarser level's background
unlearnt. So the RPN reads one decoder level (`rpn_level`) with anchors of
explicit (z, y, x) sizes, and the box and mask heads pool from another
(`roi_level`).

Mask predictor: ROIAlign from part 1 plus the Mask R-CNN mask head, not a
per-anchor mask branch. ROIAlign gives every detection a mask on a grid fit
to its own box, at the fine decoder level, whatever the box's size; a
per-anchor branch would predict a fixed-size mask per anchor at the coarse
RPN level (clefts 1-2 feature voxels thick at stride 4) and multiply the
head's output by the number of anchors (~74k per 8 x 128 x 128 patch, times
the mask's voxels). The ROIAlign path reuses tested ops and
heads and costs only the sampled ROIs.

Semantic head (optional, `semantic_weight > 0`): a 1x1x1 convolution on the
finest decoder map gives a cleft logit per voxel, trained with the detection
losses in the same step by binary cross-entropy on "any cleft" (cleft voxels
weighted `semantic_positive_weight`). The instance heads learn from the few
sampled ROIs of a patch; the semantic loss gives the shared backbone a
target at every voxel, as the semantic branch of Hybrid Task Cascade (Chen et
al., CVPR 2019) does for Mask R-CNN. At inference its probabilities can
rescore detections and fill their masks (`synjax.inference.instance_blocks`);
the instances still come from the detector, not from connected components.

Two modes, one parameter tree (as `MaskRCNN3D`):

* `training=True`: on `[batch, z, y, x, 2]` (image, dense instance ids 1..K
  as floats) it returns a dict of scalar losses ("loss" their sum) and counts.
* `training=False`: on `[batch, z, y, x, 1]` it returns detections: `boxes
  [batch, D, 6]`, `scores [batch, D]`, `masks [batch, D, mz, my, mx]`
  (probabilities inside each box), `valid [batch, D]`, after a final NMS,
  and with a semantic head `semantic [batch, z, y, x]` (cleft probability).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from synjax.detection import two_stage
from synjax.detection.anchors import level_anchors
from synjax.detection.heads import BoxHead, BoxHeadSettings, MaskHead, MaskHeadSettings
from synjax.detection.proposals import select_proposals
from synjax.detection.roi_align import roi_align
from synjax.detection.rpn import RPNHead, RPNSettings
from synjax.detection.two_stage import TwoStageSettings
from synjax.errors import ConfigError, DataError
from synjax.geometry import Triple, spatial_triple
from synjax.models.conv import Conv3D
from synjax.models.layers import ConvBlock, Upsample, max_pool3d
from synjax.models.losses import positive_weighted_sigmoid_cross_entropy


@dataclasses.dataclass(frozen=True)
class UNetBackboneSettings:
    """The 3D U-Net backbone ("SAME" padding, PReLU).

    Attributes:
      base_features: channels of the finest level.
      feature_growth: channel factor from one level to the next coarser one.
      pool_factors: (fz, fy, fx) max-pool factors, finest first; their number
        is the depth. (1, 2, 2) first for anisotropic ssTEM.
      conv_kernel: (kz, ky, kx) of every convolution.
      dtype: computation dtype; None follows the input.
    """

    base_features: int = 8
    feature_growth: int = 2
    pool_factors: tuple[Triple, ...] = ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    conv_kernel: Triple = (3, 3, 3)
    dtype: Any = None

    def __post_init__(self):
        if self.base_features < 1 or self.feature_growth < 1 or not self.pool_factors:
            raise ConfigError(
                f"UNetBackboneSettings base_features={self.base_features}, feature_growth="
                f"{self.feature_growth}, pool_factors={self.pool_factors}; expected >= 1, >= 1 "
                "and at least one pooling"
            )
        pools = tuple(spatial_triple(p, "pool_factors entry") for p in self.pool_factors)
        object.__setattr__(self, "pool_factors", pools)
        object.__setattr__(self, "conv_kernel", spatial_triple(self.conv_kernel, "conv_kernel"))

    @property
    def depth(self) -> int:
        """Poolings (decoder levels D0..D{depth-1}; the bottleneck is below them)."""
        return len(self.pool_factors)

    def features(self, level: int) -> int:
        """Channels of level `level` (0 = finest, `depth` = bottleneck)."""
        return self.base_features * self.feature_growth**level

    @property
    def feature_strides(self) -> dict[str, Triple]:
        """Input voxels per feature voxel (z, y, x) of each decoder map "D0".."D{depth-1}"."""
        strides, stride = {}, (1, 1, 1)
        for level in range(self.depth):
            strides[f"D{level}"] = stride
            stride = tuple(a * b for a, b in zip(stride, self.pool_factors[level], strict=True))
        return strides

    @property
    def input_multiple(self) -> Triple:
        """An input's (z, y, x) must be a multiple of this (the product of the poolings)."""
        return tuple(int(np.prod([p[a] for p in self.pool_factors])) for a in range(3))


class UNetBackbone(nn.Module):
    """3D U-Net: `[b, z, y, x, c]` -> {"D0": [b, z, y, x, f0], ..., "D{d-1}": ...}.

    Decoder map `Dl` has shape `input / stride_l` and `features(l)` channels
    (`UNetBackboneSettings.feature_strides`).
    """

    settings: UNetBackboneSettings = UNetBackboneSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        if x.ndim != 5:
            raise DataError(f"UNetBackbone input shape {x.shape}; expected [b, z, y, x, c]")
        multiple = s.input_multiple
        if any(n % m for n, m in zip(x.shape[1:4], multiple, strict=True)):
            raise DataError(
                f"UNetBackbone input (z, y, x) {x.shape[1:4]}; expected multiples of "
                f"{multiple} (the product of the poolings)"
            )
        if s.dtype is not None:
            x = x.astype(s.dtype)
        skips = []
        for level in range(s.depth):
            x = ConvBlock(s.features(level), s.conv_kernel, "SAME", s.dtype, name=f"down{level}")(x)
            skips.append(x)
            pool = s.pool_factors[level]
            x = max_pool3d(x, pool)
        x = ConvBlock(s.features(s.depth), s.conv_kernel, "SAME", s.dtype, name="bottom")(x)
        maps = {}
        for level in reversed(range(s.depth)):
            x = Upsample(
                s.features(level), s.pool_factors[level], dtype=s.dtype, name=f"up{level}"
            )(x)
            x = jnp.concatenate([x, skips[level]], axis=-1)
            x = ConvBlock(s.features(level), s.conv_kernel, "SAME", s.dtype, name=f"dec{level}")(x)
            maps[f"D{level}"] = x
        return maps


class LevelProjection(nn.Module):
    """The neck: 1x1x1 convolutions of chosen decoder maps to `features` channels each.

    Attributes:
      levels: decoder map names to project ("D1", "D3").
      features: output channels.
      dtype: computation dtype; None follows the input.
    """

    levels: tuple[str, ...]
    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, maps: dict[str, jax.Array]) -> dict[str, jax.Array]:
        missing = [name for name in self.levels if name not in maps]
        if missing:
            raise ConfigError(f"LevelProjection: levels {missing} not among {sorted(maps)}")
        return {
            name: nn.relu(Conv3D(self.features, (1, 1, 1), dtype=self.dtype, name=name)(maps[name]))
            for name in self.levels
        }


@dataclasses.dataclass(frozen=True)
class InstanceUNetSettings(TwoStageSettings):
    """Typed settings of the instance network.

    The steps after the backbone take `TwoStageSettings`; the defaults here
    are those of the VNC configuration (`configs/vnc.py`).

    Attributes:
      backbone: the U-Net.
      neck_features: channels of the projected RPN and ROI maps.
      rpn_level, roi_level: decoder levels of the RPN and of the ROI heads.
      anchor_sizes: (z, y, x) anchor sizes in input voxels, one anchor each per
        voxel of the RPN map.
      rpn: the RPN head (`rpn.num_anchors` is set here).
      semantic_weight: weight of the semantic head's loss; 0 builds no head.
      semantic_positive_weight: weight of a cleft voxel in that loss.
    """

    backbone: UNetBackboneSettings = UNetBackboneSettings()
    neck_features: int = 32
    rpn_level: int = 2
    roi_level: int = 1
    anchor_sizes: tuple[Triple, ...] = tuple(
        (z, s, s) for z in (1.5, 3.0, 6.0) for s in (12.0, 24.0, 40.0)
    )
    rpn: RPNSettings = RPNSettings(features=32)
    box_head: BoxHeadSettings = BoxHeadSettings(roi_size=(3, 7, 7), hidden_features=64)
    mask_head: MaskHeadSettings = MaskHeadSettings(
        features=16, num_convs=2, upsample_factors=(1, 2, 2)
    )
    rpn_samples: int = 128
    rpn_iou: tuple[float, float] = (0.3, 0.5)
    train_pre_nms: int = 512
    train_post_nms: int = 128
    test_pre_nms: int = 512
    test_post_nms: int = 128
    roi_samples: int = 64
    roi_positive_fraction: float = 0.5
    mask_roi_size: Triple = (4, 14, 14)
    max_instances: int = 16
    detections: int = 32
    final_nms: float = 0.3
    semantic_weight: float = 0.0
    semantic_positive_weight: float = 10.0

    def __post_init__(self):
        depth = self.backbone.depth
        for name in ("rpn_level", "roi_level"):
            if not 0 <= getattr(self, name) < depth:
                raise ConfigError(
                    f"InstanceUNetSettings.{name}={getattr(self, name)}; expected a decoder "
                    f"level in 0..{depth - 1}"
                )
        sizes = tuple(tuple(float(v) for v in s) for s in self.anchor_sizes)
        if not sizes or any(len(s) != 3 or min(s) <= 0 for s in sizes):
            raise ConfigError(
                f"InstanceUNetSettings.anchor_sizes={self.anchor_sizes}; expected positive "
                "(z, y, x) sizes"
            )
        object.__setattr__(self, "anchor_sizes", sizes)
        if self.rpn.num_anchors != len(sizes):
            object.__setattr__(self, "rpn", dataclasses.replace(self.rpn, num_anchors=len(sizes)))
        super().__post_init__()
        if self.semantic_weight < 0 or self.semantic_positive_weight <= 0:
            raise ConfigError(
                f"InstanceUNetSettings semantic_weight={self.semantic_weight}, "
                f"semantic_positive_weight={self.semantic_positive_weight}; expected >= 0 and > 0"
            )

    def counted_fields(self) -> tuple[str, ...]:
        return (*super().counted_fields(), "neck_features")

    @property
    def rpn_name(self) -> str:
        return f"D{self.rpn_level}"

    @property
    def roi_name(self) -> str:
        return f"D{self.roi_level}"


def build_instance_unet(settings: InstanceUNetSettings, training: bool = False) -> InstanceUNet:
    """The network with its parts built from `settings`."""
    levels = tuple(dict.fromkeys((settings.roi_name, settings.rpn_name)))
    return InstanceUNet(
        settings=settings,
        backbone=UNetBackbone(settings.backbone),
        neck=LevelProjection(levels, settings.neck_features, settings.backbone.dtype),
        rpn=RPNHead(settings.rpn),
        box_head=BoxHead(settings.box_head),
        mask_head=MaskHead(settings.mask_head),
        semantic_head=Conv3D(1, (1, 1, 1), dtype=settings.backbone.dtype)
        if settings.semantic_weight > 0
        else None,
        training=training,
    )


class InstanceUNet(nn.Module):
    """The frame around the parts (see the module docstring for the two modes).

    Besides `__call__`, `maps` (image -> decoder maps) and `box_logits`
    (decoder maps and boxes -> class logits) are methods of their own, so
    that gradient saliency can differentiate a detection's score with
    respect to a backbone map (`synjax.inference.saliency`).

    Attributes:
      settings: `InstanceUNetSettings`.
      backbone: `[b, z, y, x, 1]` -> {"D0": ..., ...} decoder maps.
      neck: decoder maps -> {rpn and roi level: maps of `neck_features` channels}.
      rpn: {level: map} -> (objectness, deltas) dicts.
      box_head: ROI features -> (class logits, per-class box deltas).
      mask_head: ROI features -> mask logits.
      semantic_head: finest decoder map -> `[b, z, y, x, 1]` cleft logits, or None.
      training: return losses (True) or detections (False).
    """

    settings: InstanceUNetSettings
    backbone: nn.Module
    neck: nn.Module
    rpn: nn.Module
    box_head: nn.Module
    mask_head: nn.Module
    semantic_head: nn.Module | None = None
    training: bool = False

    def maps(self, images: jax.Array) -> dict[str, jax.Array]:
        """The backbone's decoder maps of `[b, z, y, x, 1]` images."""
        return self.backbone(images)

    def box_logits(self, maps: dict[str, jax.Array], boxes: jax.Array) -> jax.Array:
        """Class logits `[b, n, 2]` of `[b, n, 6]` boxes, from the backbone's maps."""
        roi = self.neck(maps)[self.settings.roi_name]
        features = self._pool(roi, boxes, self.settings.box_head.roi_size)
        logits, _ = self.box_head(features)
        return logits.reshape(*boxes.shape[:2], -1)

    def _semantic_logits(self, maps: dict[str, jax.Array]) -> jax.Array:
        """`[b, z, y, x]` cleft logits of the semantic head on the finest decoder map."""
        return self.semantic_head(maps["D0"])[..., 0]

    def _rpn(self, maps: dict[str, jax.Array]):
        s = self.settings
        projected = self.neck(maps)
        rpn_map = projected[s.rpn_name]
        logits, deltas = self.rpn({s.rpn_name: rpn_map})
        logits, deltas = logits[s.rpn_name], deltas[s.rpn_name]
        batch = rpn_map.shape[0]
        stride = s.backbone.feature_strides[s.rpn_name]
        anchors = level_anchors(rpn_map.shape[1:4], stride, np.asarray(s.anchor_sizes, np.float32))
        return (
            projected[s.roi_name],
            anchors,
            logits.reshape(batch, -1),
            deltas.reshape(batch, -1, 6),
        )

    def _pool(self, roi_map: jax.Array, boxes: jax.Array, output_size) -> jax.Array:
        """ROIAlign of [b, n, 6] boxes on the ROI level -> [b * n, oz, oy, ox, c]."""
        s = self.settings
        stride = s.backbone.feature_strides[s.roi_name]
        scale = tuple(1.0 / st for st in stride)
        pooled = jax.vmap(lambda f, b: roi_align(f, b, output_size, scale, s.roi_sampling_ratio))(
            roi_map, boxes
        )
        return pooled.reshape(-1, *pooled.shape[2:])

    def _proposals(self, anchors, logits, deltas, volume_shape, pre_nms, post_nms):
        s = self.settings

        def one(level_logits, level_deltas):
            boxes, _, _, valid = select_proposals(
                [anchors],
                [level_logits],
                [level_deltas],
                volume_shape,
                pre_nms,
                post_nms,
                s.rpn_nms,
            )
            return boxes, valid

        return jax.vmap(one)(jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas))

    def __call__(self, x: jax.Array):
        two_stage.check_input(x, self.training, "InstanceUNet")
        if self.training:
            return self._losses(*two_stage.split_training_input(x))
        return self._detect(x)

    def _losses(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        volume_shape = images.shape[1:4]
        maps = self.maps(images)
        roi_map, anchors, logits, deltas = self._rpn(maps)
        gt_boxes, gt_valid, keys = two_stage.ground_truth(s, images, labels)
        losses = two_stage.rpn_losses(s, anchors, logits, deltas, gt_boxes, gt_valid, keys)
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
            lambda boxes, size: self._pool(roi_map, boxes, size),
            self.box_head,
            self.mask_head,
        )
        losses |= roi
        if self.semantic_head is not None:
            losses["semantic"] = s.semantic_weight * positive_weighted_sigmoid_cross_entropy(
                self._semantic_logits(maps), labels > 0, s.semantic_positive_weight
            )
        return two_stage.training_outputs(losses, gt_valid, foreground)

    def _detect(self, images: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        volume_shape = images.shape[1:4]
        maps = self.maps(images)
        roi_map, anchors, logits, deltas = self._rpn(maps)
        proposals, proposal_valid = self._proposals(
            anchors, logits, deltas, volume_shape, s.test_pre_nms, s.test_post_nms
        )
        out = two_stage.detect(
            s,
            volume_shape,
            proposals,
            proposal_valid,
            lambda boxes, size: self._pool(roi_map, boxes, size),
            self.box_head,
            self.mask_head,
        )
        if self.semantic_head is not None:
            out["semantic"] = jax.nn.sigmoid(self._semantic_logits(maps).astype(jnp.float32))
        return out
