"""The EM instance network stage: settings from a config, training crops, train, load, detect.

Training crops are drawn at random from the training part of the volume: a
share `positive_fraction` centred on a random cleft voxel (clefts fill ~1% of
an EM volume: uniform crops would rarely hold one), the rest anywhere;
augmented by flips of z, y and x and 90-degree turns in the y-x plane. Each
batch item packs the normalised image and the crop's instance ids renumbered
1..K (`InstanceUNet`'s training input). The same crops, with a binary target,
train the baseline segmenter (`synjax.stages.cleft_segmenter`).

The raw input follows `config.data.intensity`, measured on the training part,
saved in `checkpoints/instance_unet/intensity.json` and re-applied at
prediction.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from synjax.data.intensity import (
    IntensityNormalization,
    TrainedParams,
    load_normalization,
    normalize_intensity,
    save_normalization,
)
from synjax.detection import two_stage
from synjax.detection.heads import BoxHeadSettings, MaskHeadSettings
from synjax.detection.rpn import RPNSettings
from synjax.errors import ConfigError, DataError
from synjax.models.instance_unet import (
    InstanceUNetSettings,
    UNetBackboneSettings,
    build_instance_unet,
)
from synjax.settings import from_config
from synjax.stages.instance_settings import InstanceNetworkSettings, InstanceTrainSettings
from synjax.stages.mask_rcnn import dense_instances
from synjax.train import checkpoint
from synjax.train.loop import train

MODEL_NAME = "instance_unet"


def network_block(config) -> InstanceNetworkSettings:
    """`config.model` as `InstanceNetworkSettings`."""
    return from_config(InstanceNetworkSettings, config.model, "config.model")


def train_block(config) -> InstanceTrainSettings:
    """`config.train` as `InstanceTrainSettings` (seed from `config.seed`)."""
    return from_config(InstanceTrainSettings, config.train, "config.train", seed=int(config.seed))


def backbone_settings(model: InstanceNetworkSettings) -> UNetBackboneSettings:
    """The U-Net backbone that the network and the baseline segmenter share."""
    return UNetBackboneSettings(
        base_features=int(model.base_features),
        feature_growth=int(model.feature_growth),
        pool_factors=tuple(tuple(int(f) for f in p) for p in model.pool_factors),
    )


def network_settings(model: InstanceNetworkSettings, seed: int = 0) -> InstanceUNetSettings:
    """`InstanceUNetSettings` of a `config.model` block."""
    return InstanceUNetSettings(
        backbone=backbone_settings(model),
        neck_features=int(model.neck_features),
        rpn_level=int(model.rpn_level),
        roi_level=int(model.roi_level),
        anchor_sizes=tuple(tuple(float(v) for v in s) for s in model.anchor_sizes),
        rpn=RPNSettings(features=int(model.rpn_features), num_anchors=len(model.anchor_sizes)),
        box_head=BoxHeadSettings(
            roi_size=tuple(model.box_roi_size), hidden_features=int(model.box_features)
        ),
        mask_head=MaskHeadSettings(
            features=int(model.mask_features),
            num_convs=int(model.mask_convs),
            upsample_factors=tuple(model.mask_upsample),
        ),
        rpn_iou=tuple(float(t) for t in model.rpn_iou),
        rpn_samples=int(model.rpn_samples),
        roi_samples=int(model.roi_samples),
        roi_positive_fraction=float(model.roi_positive_fraction),
        train_pre_nms=int(model.train_pre_nms),
        train_post_nms=int(model.train_post_nms),
        test_pre_nms=int(model.test_pre_nms),
        test_post_nms=int(model.test_post_nms),
        mask_roi_size=tuple(model.mask_roi_size),
        max_instances=int(model.max_instances),
        detections=int(model.detections),
        final_nms=float(model.final_nms),
        semantic_weight=float(model.semantic_weight),
        semantic_positive_weight=float(model.semantic_positive_weight),
        seed=seed,
    )


def check_shape(shape, multiple, key: str) -> tuple[int, int, int]:
    """`shape` (z, y, x) as ints; ConfigError naming `key` unless multiples of `multiple`."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or any(s < 1 or s % m for s, m in zip(shape, multiple, strict=True)):
        raise ConfigError(
            f"{key}={shape}: expected (z, y, x) multiples of {tuple(multiple)} "
            "(the product of config.model.pool_factors)"
        )
    return shape


class TrainingCrops:
    """Random augmented crops of one training volume, for both EM networks.

    `instance_batch(step, n)` gives {"input": `[n, z, y, x, 2]`} (normalised
    image, instance ids 1..K); `segmenter_batch(step, n)` gives {"input":
    `[n, z, y, x, 1]`, "target": `[n, z, y, x, 1]`} (cleft = 1). Both are
    deterministic in `step` (a resumed run sees the batches an uninterrupted
    one would).

    Args:
      image: [z, y, x] normalised training image.
      labels: [z, y, x] its cleft instance ids (0 background).
      patch: (z, y, x) crop; the volume must hold one.
      positive_fraction: share of crops centred on a cleft voxel.
      augment: flips and y-x turns.
      max_instances: instance slots of a crop (`InstanceUNetSettings.max_instances`).
      seed: seed of the draws.
    """

    def __init__(self, image, labels, patch, positive_fraction, augment, max_instances, seed):
        image, labels = np.asarray(image, np.float32), np.asarray(labels)
        if image.shape != labels.shape or image.ndim != 3:
            raise DataError(
                f"training image {image.shape} and labels {labels.shape}: expected equal [z, y, x]"
            )
        self.patch = tuple(int(p) for p in patch)
        if any(p > s for p, s in zip(self.patch, image.shape, strict=True)):
            raise ConfigError(
                f"config.train.patch={self.patch}: larger than the training part {image.shape}"
            )
        if not 0.0 <= positive_fraction <= 1.0:
            raise ConfigError(
                f"config.train.positive_fraction={positive_fraction}: expected a fraction in [0, 1]"
            )
        self.image, self.labels = image, labels
        self.positives = np.argwhere(labels > 0)
        self.positive_fraction = positive_fraction
        self.augment = augment
        self.max_instances = max_instances
        self.seed = seed
        self.square = self.patch[1] == self.patch[2]

    def _start(self, rng: np.random.Generator) -> np.ndarray:
        limits = np.asarray(self.image.shape) - np.asarray(self.patch)
        if self.positives.size and rng.random() < self.positive_fraction:
            centre = self.positives[rng.integers(len(self.positives))]
            jitter = rng.integers(-np.asarray(self.patch) // 4, np.asarray(self.patch) // 4 + 1)
            return np.clip(centre - np.asarray(self.patch) // 2 + jitter, 0, limits)
        return np.asarray([rng.integers(n + 1) for n in limits])

    def crop(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One augmented (image [z, y, x], labels [z, y, x]) crop."""
        z, y, x = self._start(rng)
        pz, py, px = self.patch
        image = self.image[z : z + pz, y : y + py, x : x + px]
        labels = self.labels[z : z + pz, y : y + py, x : x + px]
        if self.augment:
            turn = int(rng.integers(4)) if self.square else 2 * int(rng.integers(2))
            image, labels = np.rot90(image, turn, (1, 2)), np.rot90(labels, turn, (1, 2))
            flips = tuple(a for a in range(3) if rng.random() < 0.5)
            if flips:
                image, labels = np.flip(image, flips), np.flip(labels, flips)
        return np.ascontiguousarray(image), np.ascontiguousarray(labels)

    def instance_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, step))
        items = []
        for _ in range(batch_size):
            image, labels = self.crop(rng)
            dense = dense_instances(labels, self.max_instances).astype(np.float32)
            items.append(np.stack([image, dense], axis=-1))
        return {"input": np.stack(items)}

    def segmenter_batch(self, step: int, batch_size: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng((self.seed, step))
        crops = [self.crop(rng) for _ in range(batch_size)]
        return {
            "input": np.stack([image for image, _ in crops])[..., None],
            "target": np.stack([(labels > 0) for _, labels in crops])[..., None].astype(np.float32),
        }


def fit_intensity(config, image: np.ndarray, name: str) -> IntensityNormalization:
    """`config.data.intensity` measured on the training image."""
    return IntensityNormalization.from_config(config.data.get("intensity")).fit([image], name=name)


def training_crops(config, image: np.ndarray, labels: np.ndarray, intensity) -> TrainingCrops:
    """The crops of `config.train` from the raw training image and its labels."""
    model = network_block(config)
    settings = train_block(config)
    patch = check_shape(
        settings.patch, backbone_settings(model).input_multiple, "config.train.patch"
    )
    return TrainingCrops(
        normalize_intensity(image, intensity, "training image"),
        labels,
        patch,
        float(settings.positive_fraction),
        bool(settings.augment),
        int(model.max_instances),
        int(config.seed),
    )


def train_instance_unet(
    config, image: np.ndarray, labels: np.ndarray, workdir: pathlib.Path
) -> TrainedParams:
    """Trains the instance network on crops of the training part.

    Args:
      config: the run's config (`model`, `train`, `data.intensity`, `seed`).
      image: [z, y, x] raw training image (as read, after any down-sampling).
      labels: [z, y, x] its cleft instance ids, 0 background.
      workdir: the run folder (checkpoints under `checkpoints/instance_unet`).

    Returns:
      The trained parameters with the intensity normalisation (also saved).
    """
    intensity = fit_intensity(config, image, "instance network training image")
    save_normalization(intensity, checkpoint.checkpoint_dir(workdir, MODEL_NAME))
    crops = training_crops(config, image, labels, intensity)
    train_settings = train_block(config)
    batch_fn = functools.partial(crops.instance_batch, batch_size=train_settings.batch_size)
    model = build_instance_unet(network_settings(network_block(config), config.seed), True)
    state = train(
        model, two_stage.training_loss, batch_fn, train_settings, workdir, name=MODEL_NAME
    )
    return TrainedParams(jax.device_get(state.params), intensity)


def load_instance_unet(config, workdir: pathlib.Path) -> TrainedParams:
    """The trained instance network in `workdir`, with its normalisation."""
    settings = network_settings(network_block(config), config.seed)
    sample = np.zeros((1, *train_block(config).patch, 2), np.float32)
    params = checkpoint.restore_params(
        workdir, MODEL_NAME, build_instance_unet(settings, training=True), sample
    )
    return TrainedParams(params, load_normalization(checkpoint.checkpoint_dir(workdir, MODEL_NAME)))


def block_detector(config, params):
    """`[n, z, y, x]` normalised blocks -> detections (numpy): boxes, scores, masks, valid."""
    model = build_instance_unet(network_settings(network_block(config), config.seed))

    @jax.jit
    def apply(blocks):
        return model.apply({"params": params}, blocks[..., None])

    def predict(blocks: np.ndarray) -> dict[str, np.ndarray]:
        out = apply(jnp.asarray(blocks, jnp.float32))
        return {key: np.asarray(value) for key, value in out.items()}

    return predict
