"""Inference: prediction over whole volumes: DeepEM3D's slice-wise (2.5D) prediction
and test-time augmentation, the block grid and the resumable block-wise runner,
the sparse mask merge.

May import io, data, targets, models, detection and train. Names are re-exported
lazily (JAX).
"""

from synjax.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "BlockGrid": "block_grid",
        "BlockwiseSummary": "blockwise",
        "block_boxes": "fusion",
        "fuse_blocks": "fusion",
        "predict_blockwise": "blockwise",
        "merge_masks": "merge",
        "paint_masks": "merge",
        "ensemble_max": "slicewise",
        "pad_end": "slicewise",
        "predict_orientations": "slicewise",
        "predict_slices": "slicewise",
        "TRANSFORMS": "tta",
        "make_tta_fn": "tta",
        "predict_with_tta": "tta",
    },
)
