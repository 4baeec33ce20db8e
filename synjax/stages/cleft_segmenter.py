"""The two-step baseline's first step: the instance network's U-Net as a binary cleft segmenter.

Trained on the instance network's crops (`config.train`: patch, batch size,
optimizer) with `config.baseline`'s steps and learning rate, by binary
cross-entropy with cleft voxels weighted `positive_weight`. Prediction runs
on overlapping blocks (`config.predict.block`, `overlap`) and keeps each
voxel from the block in which it lies farthest from a block face, so that
no voxel is predicted from a block edge where an inner one exists. The
intensity normalisation is measured on the training part and saved in
`checkpoints/cleft_segmenter/intensity.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from synjax.data.intensity import (
    TrainedParams,
    load_normalization,
    normalize_intensity,
    save_normalization,
)
from synjax.inference.instances import patch_starts
from synjax.models.cleft_segmenter import CleftSegmenter
from synjax.models.losses import positive_weighted_sigmoid_cross_entropy
from synjax.settings import from_config
from synjax.stages.instance_settings import CleftBaselineSettings, InstancePredictSettings
from synjax.stages.instance_unet import (
    backbone_settings,
    check_shape,
    fit_intensity,
    network_block,
    train_block,
    training_crops,
)
from synjax.train import checkpoint
from synjax.train.loop import train

MODEL_NAME = "cleft_segmenter"


def baseline_block(config) -> CleftBaselineSettings:
    """`config.baseline` as `CleftBaselineSettings`."""
    return from_config(CleftBaselineSettings, config.baseline, "config.baseline")


def build_segmenter(config) -> CleftSegmenter:
    return CleftSegmenter(backbone_settings(network_block(config)))


def train_cleft_segmenter(
    config, image: np.ndarray, labels: np.ndarray, workdir: pathlib.Path
) -> TrainedParams:
    """Trains the segmenter on crops of the training part (see the module docstring).

    Args:
      config: the run's config (`model`, `train`, `baseline`, `data.intensity`, `seed`).
      image: [z, y, x] raw training image (as read).
      labels: [z, y, x] its cleft instance ids, 0 background.
      workdir: the run folder (checkpoints under `checkpoints/cleft_segmenter`).
    """
    baseline = baseline_block(config)
    intensity = fit_intensity(config, image, "cleft segmenter training image")
    save_normalization(intensity, checkpoint.checkpoint_dir(workdir, MODEL_NAME))
    crops = training_crops(config, image, labels, intensity)
    settings = dataclasses.replace(
        train_block(config),
        steps=int(baseline.steps),
        learning_rate=float(baseline.learning_rate),
        checkpoint_every=min(train_block(config).checkpoint_every, int(baseline.steps)),
    )
    weight = float(baseline.positive_weight)

    def loss_fn(logits, batch):
        loss = positive_weighted_sigmoid_cross_entropy(logits, batch["target"], weight)
        return loss, {}

    batch_fn = functools.partial(crops.segmenter_batch, batch_size=settings.batch_size)
    state = train(build_segmenter(config), loss_fn, batch_fn, settings, workdir, name=MODEL_NAME)
    return TrainedParams(jax.device_get(state.params), intensity)


def load_cleft_segmenter(config, workdir: pathlib.Path) -> TrainedParams:
    """The trained segmenter in `workdir`, with its normalisation."""
    sample = np.zeros((1, *train_block(config).patch, 1), np.float32)
    params = checkpoint.restore_params(workdir, MODEL_NAME, build_segmenter(config), sample)
    return TrainedParams(params, load_normalization(checkpoint.checkpoint_dir(workdir, MODEL_NAME)))


def _inner_distance(shape) -> np.ndarray:
    """[z, y, x] distance of each voxel of a block to its nearest face (in voxels, >= 1)."""
    axes = [np.minimum(np.arange(n) + 1, n - np.arange(n)) for n in shape]
    return np.minimum.reduce(np.meshgrid(*axes, indexing="ij"))


def predict_probability(config, trained: TrainedParams, image: np.ndarray) -> np.ndarray:
    """Cleft probability `[z, y, x]` float32 of a raw image, block by block.

    Blocks of `config.predict.block` overlapping by `overlap` (the image is
    padded at its far ends up to one block); each voxel comes from the block
    in which it lies farthest from a face.
    """
    predict = from_config(InstancePredictSettings, config.predict, "config.predict")
    multiple = backbone_settings(network_block(config)).input_multiple
    block = check_shape(predict.block, multiple, "config.predict.block")
    normalised = normalize_intensity(image, trained.intensity, "cleft segmenter input")
    shape = normalised.shape
    padded = tuple(max(s, b) for s, b in zip(shape, block, strict=True))
    normalised = np.pad(normalised, [(0, p - s) for s, p in zip(shape, padded, strict=True)])
    model = build_segmenter(config)
    apply = jax.jit(lambda x: jax.nn.sigmoid(model.apply({"params": trained.params}, x)))
    starts = [
        patch_starts(n, b, int(o)) for n, b, o in zip(padded, block, predict.overlap, strict=True)
    ]
    origins = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    best = np.zeros(padded, np.int32)
    out = np.zeros(padded, np.float32)
    inner = _inner_distance(block)
    batch = int(predict.batch_size)
    for first in range(0, len(origins), batch):
        chunk = origins[first : first + batch]
        blocks = np.stack(
            [normalised[z : z + block[0], y : y + block[1], x : x + block[2]] for z, y, x in chunk]
        )
        probs = np.asarray(apply(jnp.asarray(blocks[..., None])))[..., 0]
        for (z, y, x), prob in zip(chunk, probs, strict=True):
            index = (slice(z, z + block[0]), slice(y, y + block[1]), slice(x, x + block[2]))
            better = inner > best[index]
            out[index] = np.where(better, prob, out[index])
            best[index] = np.where(better, inner, best[index])
    return out[: shape[0], : shape[1], : shape[2]]
