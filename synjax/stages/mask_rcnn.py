"""The 3D Mask R-CNN stage: settings from a config, training patches, train, load, detect.

Training follows Chen et al.: the training volume is cut into non-overlapping
patches (96 x 96 x 32 x-y-z in the paper); each batch item is one of them,
shifted by at most one voxel in y and x, rotated by 0/90/180/270 degrees about
z or by 180 degrees about y or x (90 degrees about y or x would swap the
anisotropic z with a fine axis), and replaced by a black, empty patch with
probability `negative_fraction` (one in ten in the paper). The raw input
follows `config.data.intensity`, measured on the training volume, saved in
`checkpoints/mask_rcnn/intensity.json` and re-applied at prediction.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Mapping, Sequence

import fastremap
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from synjax.data.intensity import (
    IntensityNormalization,
    TrainedParams,
    load_normalization,
    normalize_intensity,
    save_normalization,
)
from synjax.detection import two_stage
from synjax.detection.fpn import FPNSettings
from synjax.detection.heads import BoxHeadSettings, MaskHeadSettings
from synjax.detection.mask_rcnn3d import MaskRCNN3DSettings, build_mask_rcnn
from synjax.detection.rpn import RPNSettings
from synjax.errors import ConfigError, DataError
from synjax.inference.instances import PatchDetections, detect_patches
from synjax.models.resnet3d import ResNet3DSettings
from synjax.train import checkpoint
from synjax.train.loop import train
from synjax.train.settings import TrainSettings

MODEL_NAME = "mask_rcnn"


def mask_rcnn_settings(model: Mapping, seed: int = 0) -> MaskRCNN3DSettings:
    """`MaskRCNN3DSettings` from a config's `model` block (see configs/fluorescence.py)."""
    anchor_scales = tuple(float(s) for s in model["anchor_scales"])
    return MaskRCNN3DSettings(
        backbone=ResNet3DSettings(
            depth=int(model["depth"]),
            base_features=int(model["base_features"]),
            norm_groups=int(model["norm_groups"]),
        ),
        fpn=FPNSettings(features=int(model["fpn_features"])),
        rpn=RPNSettings(features=int(model["rpn_features"]), num_anchors=len(anchor_scales)),
        box_head=BoxHeadSettings(
            roi_size=tuple(model["box_roi_size"]),
            hidden_features=int(model["box_features"]),
            norm_groups=int(model["head_norm_groups"]),
        ),
        mask_head=MaskHeadSettings(
            features=int(model["mask_features"]),
            num_convs=int(model["mask_convs"]),
            norm_groups=int(model["head_norm_groups"]),
        ),
        levels=tuple(model["levels"]),
        anchor_scales=anchor_scales,
        rpn_iou=tuple(float(t) for t in model["rpn_iou"]),
        rpn_samples=int(model["rpn_samples"]),
        train_pre_nms=int(model["train_pre_nms"]),
        train_post_nms=int(model["train_post_nms"]),
        test_pre_nms=int(model["test_pre_nms"]),
        test_post_nms=int(model["test_post_nms"]),
        roi_samples=int(model["roi_samples"]),
        roi_positive_fraction=float(model["roi_positive_fraction"]),
        mask_roi_size=tuple(model["mask_roi_size"]),
        roi_canonical_size=float(model["roi_canonical_size"]),
        max_instances=int(model["max_instances"]),
        detections=int(model["detections"]),
        final_nms=float(model["final_nms"]),
        seed=seed,
    )


def dense_instances(labels: np.ndarray, max_instances: int) -> np.ndarray:
    """Patch labels renumbered 1..K in raster order of first voxel, at most `max_instances`.

    When a patch holds more instances, the smallest beyond `max_instances`
    become background (logged: raise `model.max_instances` if it happens often).
    """
    dense, _ = fastremap.renumber(np.asarray(labels), preserve_zero=True, in_place=False)
    count = int(dense.max()) if dense.size else 0
    if count <= max_instances:
        return dense.astype(np.int32)
    sizes = np.bincount(dense.ravel(), minlength=count + 1)
    order = np.argsort(-sizes[1:], kind="stable")[:max_instances] + 1
    lookup = np.zeros(count + 1, np.int32)
    lookup[np.sort(order)] = np.arange(1, max_instances + 1, dtype=np.int32)
    logging.warning("training patch has %d instances; kept the %d largest", count, max_instances)
    return lookup[dense]


class TrainingPatches:
    """Batches of augmented non-overlapping patches of one training volume.

    `batch(step, batch_size)` is deterministic in `step` (a resumed run sees
    the batches an uninterrupted one would) and returns {"input":
    `[batch, z, y, x, 2]` float32}: the normalised image and the dense
    instance ids of each patch (`MaskRCNN3D`'s training input).

    Args:
      image: [z, y, x] raw training image.
      labels: [z, y, x] its instance labels.
      patch: (z, y, x) patch size; the volume must hold at least one patch.
      intensity: the measured normalisation.
      max_instances: instances per patch (`MaskRCNN3DSettings.max_instances`).
      negative_fraction: probability that an item is a black, empty patch.
      augment: apply shifts and rotations.
      seed: seed of the draws.
    """

    def __init__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        patch: Sequence[int],
        intensity: IntensityNormalization,
        max_instances: int,
        negative_fraction: float,
        augment: bool,
        seed: int,
    ):
        if image.shape != labels.shape or image.ndim != 3:
            raise DataError(
                f"training image {image.shape} and labels {labels.shape}: expected equal [z, y, x]"
            )
        self.patch = tuple(int(p) for p in patch)
        counts = [s // p for s, p in zip(image.shape, self.patch, strict=True)]
        if min(counts) < 1:
            raise ConfigError(
                f"config.train.patch={self.patch}: larger than the training volume {image.shape}"
            )
        # One voxel of margin in y and x for the one-voxel shifts.
        pad = ((0, 0), (1, 1), (1, 1))
        self.image = np.pad(normalize_intensity(image, intensity, "training image"), pad, "edge")
        self.labels = np.pad(np.asarray(labels), pad)
        self.origins = [
            (z * self.patch[0], 1 + y * self.patch[1], 1 + x * self.patch[2])
            for z in range(counts[0])
            for y in range(counts[1])
            for x in range(counts[2])
        ]
        self.max_instances = max_instances
        self.negative_fraction = negative_fraction
        self.augment = augment
        self.seed = seed
        self.square = self.patch[1] == self.patch[2]

    def item(self, rng: np.random.Generator) -> np.ndarray:
        """One `[z, y, x, 2]` training item."""
        pz, py, px = self.patch
        if rng.random() < self.negative_fraction:
            return np.zeros((pz, py, px, 2), np.float32)
        z, y, x = self.origins[rng.integers(len(self.origins))]
        if self.augment:
            y, x = y + int(rng.integers(-1, 2)), x + int(rng.integers(-1, 2))
        image = self.image[z : z + pz, y : y + py, x : x + px]
        labels = self.labels[z : z + pz, y : y + py, x : x + px]
        if self.augment:
            turn = int(rng.integers(4)) if self.square else 2 * int(rng.integers(2))
            image, labels = np.rot90(image, turn, (1, 2)), np.rot90(labels, turn, (1, 2))
            flip = int(rng.integers(3))  # none, 180 degrees about y (z, x), about x (z, y)
            if flip:
                axes = (0, 2) if flip == 1 else (0, 1)
                image, labels = np.flip(image, axes), np.flip(labels, axes)
        dense = dense_instances(labels, self.max_instances)
        return np.stack([image, dense.astype(np.float32)], axis=-1)

    def batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, step))
        return {"input": np.stack([self.item(rng) for _ in range(batch_size)])}


def train_mask_rcnn(
    config, image: np.ndarray, labels: np.ndarray, workdir: pathlib.Path
) -> TrainedParams:
    """Trains the 3D Mask R-CNN on `config.train` patches of one training volume.

    Returns:
      The trained parameters with the intensity normalisation measured on the
      training image (also saved with the checkpoint).
    """
    intensity = IntensityNormalization.from_config(config.data.get("intensity")).fit(
        [image], name="Mask R-CNN training image"
    )
    save_normalization(intensity, checkpoint.checkpoint_dir(workdir, MODEL_NAME))
    settings = mask_rcnn_settings(config.model, config.seed)
    patches = TrainingPatches(
        image,
        labels,
        config.train.patch,
        intensity,
        settings.max_instances,
        float(config.train.negative_fraction),
        bool(config.train.augment),
        config.seed,
    )
    train_settings = TrainSettings.from_config(config.train, config.seed)
    batch_fn = functools.partial(patches.batch, batch_size=train_settings.batch_size)
    model = build_mask_rcnn(settings, training=True)
    state = train(
        model, two_stage.training_loss, batch_fn, train_settings, workdir, name=MODEL_NAME
    )
    return TrainedParams(jax.device_get(state.params), intensity)


def load_mask_rcnn(config, workdir: pathlib.Path) -> TrainedParams:
    """The trained Mask R-CNN in `workdir` (predict-only runs), with its normalisation."""
    settings = mask_rcnn_settings(config.model, config.seed)
    sample = np.zeros((1, *config.train.patch, 2), np.float32)
    params = checkpoint.restore_params(
        workdir, MODEL_NAME, build_mask_rcnn(settings, training=True), sample
    )
    return TrainedParams(params, load_normalization(checkpoint.checkpoint_dir(workdir, MODEL_NAME)))


def patch_detector(settings: MaskRCNN3DSettings, params):
    """`PatchDetector` of the trained model: `[n, z, y, x]` patches -> detections (numpy)."""
    model = build_mask_rcnn(settings)

    @jax.jit
    def apply(patches):
        return model.apply({"params": params}, patches[..., None])

    def predict(patches: np.ndarray) -> dict:
        out = apply(jnp.asarray(patches, jnp.float32))
        return {key: np.asarray(value) for key, value in out.items()}

    return predict


def detect_volume(config, trained: TrainedParams, image: np.ndarray) -> PatchDetections:
    """Every detection of the model on overlapping patches of `image`, pasted.

    Detections at any score above 0 are kept, so that the score threshold
    can be chosen afterwards (`synjax.inference.instances.merge_detections`).
    """
    settings = mask_rcnn_settings(config.model, config.seed)
    normalised = normalize_intensity(image, trained.intensity, "Mask R-CNN input")
    return detect_patches(
        patch_detector(settings, trained.params),
        normalised,
        config.train.patch,
        config.predict.overlap,
        min_score=0.0,
        batch_size=int(config.predict.batch_size),
    )
