"""Detection: 3D Mask R-CNN's parts as Flax modules and fixed-shape JAX ops (FPN,
RPN head, box and mask heads; anchors, box coding, IoU, matching, NMS, ROIAlign).

On the level of models: may import io, data, targets and models. Names are
re-exported lazily (JAX).
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BoxHead": "heads",
        "BoxHeadSettings": "heads",
        "FPN3D": "fpn",
        "FPNSettings": "fpn",
        "MaskHead": "heads",
        "MaskHeadSettings": "heads",
        "RPNHead": "rpn",
        "RPNSettings": "rpn",
    },
)
