"""Typed settings of the EM instance stages: one frozen dataclass per config block.

| config block                  | settings                   | read by                          |
|-------------------------------|----------------------------|----------------------------------|
| `config.model`                | `InstanceNetworkSettings`  | `stages.instance_unet`           |
| `config.train`                | `InstanceTrainSettings`    | both stages (patches, optimizer) |
| `config.baseline`             | `CleftBaselineSettings`    | `stages.cleft_segmenter`         |
| `config.predict` (instances)  | `InstancePredictSettings`  | `pipelines.instances`            |

Built by `synjax.settings.from_config`, which refuses unknown keys; the
config checks read the keys from these classes. No JAX here, so that checking
a config stays fast.
"""

from __future__ import annotations

import dataclasses

from synjax.train.settings import TrainSettings

Triple = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class InstanceNetworkSettings:
    """The instance network (`config.model`); see `synjax.models.instance_unet`.

    Attributes:
      base_features, feature_growth, pool_factors: the U-Net backbone (shared
        with the baseline segmenter).
      neck_features: channels of the projected RPN and ROI maps.
      rpn_level, roi_level: decoder levels of the RPN and of the ROI heads.
      anchor_sizes: (z, y, x) anchor sizes in (read) voxels.
      rpn_features: channels of the RPN's shared conv.
      box_roi_size, box_features: the box head's ROIAlign size and width.
      mask_roi_size, mask_features, mask_convs, mask_upsample: the mask head.
      rpn_iou: the RPN matcher's (low, high) IoU.
      rpn_samples: anchors sampled per patch for the RPN loss.
      roi_samples, roi_positive_fraction: ROIs sampled per patch.
      train_pre_nms, train_post_nms, test_pre_nms, test_post_nms: proposals.
      max_instances: ground-truth slots per training patch.
      detections: detections per block.
      final_nms: NMS IoU of the detections.
      semantic_weight: weight of the semantic (cleft probability) head's
        loss; 0 builds no head.
      semantic_positive_weight: weight of a cleft voxel in that loss.
    """

    base_features: int
    feature_growth: int
    pool_factors: tuple[Triple, ...]
    neck_features: int
    rpn_level: int
    roi_level: int
    anchor_sizes: tuple[tuple[float, float, float], ...]
    rpn_features: int
    box_roi_size: Triple
    box_features: int
    mask_roi_size: Triple
    mask_features: int
    mask_convs: int
    mask_upsample: Triple = (1, 2, 2)
    rpn_iou: tuple[float, float] = (0.3, 0.5)
    rpn_samples: int = 128
    roi_samples: int = 64
    roi_positive_fraction: float = 0.5
    train_pre_nms: int = 512
    train_post_nms: int = 128
    test_pre_nms: int = 512
    test_post_nms: int = 128
    max_instances: int = 16
    detections: int = 32
    final_nms: float = 0.3
    semantic_weight: float = 0.0
    semantic_positive_weight: float = 10.0


@dataclasses.dataclass(frozen=True)
class InstanceTrainSettings(TrainSettings):
    """Training of the instance network (`config.train`); the baseline shares its patches.

    Attributes:
      patch: (z, y, x) training patch in read voxels (multiples of the poolings).
      positive_fraction: share of patches centred on a cleft voxel.
      augment: flips of z, y and x and 90-degree turns in the y-x plane.
    """

    patch: Triple = dataclasses.field(kw_only=True)
    positive_fraction: float = dataclasses.field(kw_only=True)
    augment: bool = dataclasses.field(kw_only=True)


@dataclasses.dataclass(frozen=True)
class CleftBaselineSettings:
    """The two-step baseline (`config.baseline`): segmenter training and its grid.

    The segmenter trains on the instance network's patches (`config.train`)
    with its own step count and learning rate.

    Attributes:
      steps: optimizer steps.
      learning_rate: peak learning rate.
      positive_weight: weight of cleft voxels in the binary cross-entropy
        (clefts are ~1% of the voxels).
      thresholds: probability thresholds tried on the validation slab.
      min_sizes: smallest kept component (read voxels) tried there.
    """

    steps: int
    learning_rate: float
    positive_weight: float
    thresholds: tuple[float, ...]
    min_sizes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class InstancePredictSettings:
    """Block-wise prediction and the grids chosen on the validation slab (`config.predict`).

    Attributes:
      block: (z, y, x) block in read voxels (multiples of the poolings).
      overlap: (z, y, x) overlap of neighbouring blocks.
      batch_size: blocks per compiled call.
      context: y rows (read voxels) of the preceding part read as image
        context before a slab (labels of that part are never used).
      score_thresholds, mask_thresholds: the instance network's grids.
      semantic_mixes: shares of the semantic head's probability in the
        probability that a voxel of a detection's box is in its mask (0: the
        mask head alone); a grid. Nonzero needs the semantic head.
      semantic_rescoring: whether a detection's score is multiplied by the
        mean semantic probability over its mask; a grid of booleans.
      min_sizes: fused instances of fewer read voxels are dropped (the
        baseline's size rule); a grid.
      min_free_fraction: a detection whose mask has fewer than this share of
        free voxels left when it is painted is dropped (`Painting`).
      fusion_iou: instances matched across a seam above this IoU become one.
      input, output, roi, resume, retries, executor, scheduler: predicting a
        volume of your own (`synjax.pipelines.instance_volume`; the keys of
        `synjax.configlib.volume_predict_fields`: "local", or "dask" workers
        on `scheduler` or, for "", a LocalCluster).
    """

    block: Triple
    overlap: Triple
    batch_size: int
    context: int
    score_thresholds: tuple[float, ...]
    mask_thresholds: tuple[float, ...]
    semantic_mixes: tuple[float, ...] = (0.0,)
    semantic_rescoring: tuple[bool, ...] = (False,)
    min_sizes: tuple[int, ...] = (0,)
    min_free_fraction: float = 0.0
    fusion_iou: float = 0.5
    input: str = ""
    output: str = ""
    roi: str = ""
    resume: str = "auto"
    retries: int = 2
    executor: str = "local"
    scheduler: str = ""
