"""3D detection ops as XLA programs: anchors, box coding, IoU, matching, NMS, ROIAlign, proposals.

Fixed shapes inside `jax.jit` (padded outputs with validity masks), batched with
`jax.vmap`; boxes are (z0, y0, x0, z1, y1, x1) in voxels. These ops import only
jax, numpy and `synjax.errors`.
"""

from synjax.detection.anchors import cartesian_sizes, level_anchors, pyramid_anchors
from synjax.detection.box_coder import (
    DEFAULT_SCALE_CLAMP,
    DEFAULT_WEIGHTS,
    centres_and_sizes,
    clip_boxes,
    decode_boxes,
    encode_boxes,
)
from synjax.detection.iou import box_volume, pairwise_intersection, pairwise_iou
from synjax.detection.matcher import match, sample_labels
from synjax.detection.nms import nms
from synjax.detection.proposals import select_proposals
from synjax.detection.roi_align import assign_levels, multilevel_roi_align, roi_align
from synjax.detection.targets import boxes_from_labels, mask_targets, roi_targets, rpn_targets

__all__ = [
    "DEFAULT_SCALE_CLAMP",
    "DEFAULT_WEIGHTS",
    "assign_levels",
    "box_volume",
    "cartesian_sizes",
    "centres_and_sizes",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "level_anchors",
    "match",
    "multilevel_roi_align",
    "nms",
    "pairwise_intersection",
    "pairwise_iou",
    "pyramid_anchors",
    "roi_align",
    "sample_labels",
    "select_proposals",
    "boxes_from_labels",
    "mask_targets",
    "roi_targets",
    "rpn_targets",
]
