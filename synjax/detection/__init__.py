"""Detection: 3D Mask R-CNN's parts as Flax modules (FPN, RPN head, box and mask
heads) and fixed-shape JAX ops (anchors, box coding, IoU, matching, NMS, ROIAlign,
proposals; padded outputs with validity masks, boxes (z0, y0, x0, z1, y1, x1) in voxels).

On the level of models: may import io, data, targets and models. Names are
re-exported lazily (JAX); `nms` and `roi_align` are imported from their
modules (`synjax.detection.nms.nms`), whose names they share.
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BoxHead": "heads",
        "BoxHeadSettings": "heads",
        "DEFAULT_SCALE_CLAMP": "box_coder",
        "DEFAULT_WEIGHTS": "box_coder",
        "FPN3D": "fpn",
        "FPNSettings": "fpn",
        "MaskHead": "heads",
        "MaskHeadSettings": "heads",
        "RPNHead": "rpn",
        "RPNSettings": "rpn",
        "assign_levels": "roi_align",
        "box_volume": "iou",
        "rpn_targets": "targets",
        "roi_targets": "targets",
        "mask_targets": "targets",
        "boxes_from_labels": "targets",
        "cartesian_sizes": "anchors",
        "centres_and_sizes": "box_coder",
        "clip_boxes": "box_coder",
        "decode_boxes": "box_coder",
        "encode_boxes": "box_coder",
        "level_anchors": "anchors",
        "match": "matcher",
        "match_boxes": "matcher",
        "multilevel_roi_align": "roi_align",
        "pairwise_intersection": "iou",
        "pairwise_iou": "iou",
        "pyramid_anchors": "anchors",
        "sample_labels": "matcher",
        "select_proposals": "proposals",
    },
)
