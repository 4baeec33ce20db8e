"""The DeepEM3D boundary-model stage: build from settings, train, load and predict an ensemble.

Each entry of `config.models` is one DeepEM3D-Net (its own number of input
slices s, boundary kernel, width, steps, seed); all share `config.train`.
`BoundaryEnsembleStage.from_config(config)` reads them, `config.predict` and
`config.data.intensity` into typed settings (`synjax.stages.settings`).
A model is trained on `[s, y, x]` patches of the training part's raw with the
boundary labels of the centre slice as target (class-weighted softmax
cross-entropy) and checkpointed under `checkpoints/<name>`, so a re-run
resumes. The raw input follows the intensity settings, measured on the
training volume and saved as `checkpoints/<name>/intensity.json`; prediction
re-applies each model's own (`synjax.data.intensity`). Prediction runs every
model slice by slice (optionally with test-time augmentation) and takes the
voxel-wise maximum (`ensemble_max`).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
from absl import logging

from synjax.data.augment import AugmentSettings
from synjax.data.intensity import IntensityNormalization, load_normalization, save_normalization
from synjax.data.sampling import PatchSampler
from synjax.errors import ConfigError
from synjax.inference.slicewise import ensemble_max, predict_orientations, predict_slices
from synjax.inference.tta import TRANSFORMS
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn
from synjax.models.losses import class_weighted_softmax_cross_entropy
from synjax.settings import from_config as settings_from_config
from synjax.stages.settings import (
    BoundaryModelSettings,
    BoundaryTrainSettings,
    SlicePredictSettings,
)
from synjax.targets.boundaries import boundary_labels, class_weights
from synjax.train import checkpoint
from synjax.train.batches import process_batch_fn
from synjax.train.loop import train

TARGET_KEY = "boundary"
NUM_CLASSES = 2
TTA_COUNTS = (1, 2, 4, 8, 16)


def _loss(weights: np.ndarray):
    def loss(logits, batch):
        value = class_weighted_softmax_cross_entropy(logits, batch[TARGET_KEY], weights)
        return value, {"weighted_ce": value}

    return loss


def _centre_slice_batch(
    sampler: PatchSampler, step: int, batch_size: int, shard: int = 0, num_shards: int = 1
) -> dict:
    """Sampler batch (this process's share of it, as `PatchSampler.batch`); the target
    `[batch, 1, y, x]` becomes the centre slice's `[batch, y, x]`."""
    batch = sampler.batch(step, batch_size, shard=shard, num_shards=num_shards)
    return {"input": batch["input"], TARGET_KEY: batch[TARGET_KEY][:, 0].astype(np.int32)}


@dataclasses.dataclass(frozen=True)
class BoundaryEnsembleStage:
    """The DeepEM3D ensemble of the neuron pipeline, from its typed settings.

    Attributes:
      models: one entry per network (`config.models`), each with its seed
        (the config's `seed` where the entry has none).
      training: per model, how it is trained (`config.train`, with the
        model's steps and seed).
      prediction: slice-wise prediction (`config.predict`).
      intensity: how raw becomes the input (`config.data.intensity`), not yet
        measured on a volume.
    """

    models: tuple[BoundaryModelSettings, ...]
    training: tuple[BoundaryTrainSettings, ...]
    prediction: SlicePredictSettings
    intensity: IntensityNormalization

    @classmethod
    def from_config(cls, config) -> BoundaryEnsembleStage:
        """The stage of a neuron config, or of a partner config's `neurons` block."""
        if not config.models:
            raise ConfigError("config.models: expected at least one model")
        models = []
        for index, entry in enumerate(config.models):
            model = settings_from_config(BoundaryModelSettings, entry, f"config.models[{index}]")
            seed = config.seed if model.seed is None else model.seed
            models.append(dataclasses.replace(model, seed=int(seed)))
        training = tuple(
            settings_from_config(
                BoundaryTrainSettings,
                config.train,
                "config.train",
                seed=model.seed,
                steps=int(model.steps),
            )
            for model in models
        )
        return cls(
            models=tuple(models),
            training=training,
            prediction=settings_from_config(SlicePredictSettings, config.predict, "config.predict"),
            intensity=IntensityNormalization.from_config(config.get("data", {}).get("intensity")),
        )

    @staticmethod
    def network_settings(model: BoundaryModelSettings) -> DeepEM3DSettings:
        """`DeepEM3DSettings` of one model."""
        return DeepEM3DSettings(
            slices=int(model.slices),
            num_classes=NUM_CLASSES,
            width=float(model.width),
            blocks=tuple(model.blocks),
            side_features=int(model.side_features),
            dilations=tuple(model.dilations),
        )

    def _sample_input(self, model: BoundaryModelSettings, patch: int) -> np.ndarray:
        return np.zeros((1, int(model.slices), patch, patch, 1), np.float32)

    def train(self, raw: np.ndarray, neuron_ids: np.ndarray, workdir) -> None:
        """Trains every model on one training volume (resumable).

        The intensity settings are measured on `raw` and saved with every model.

        Args:
          raw: `[z, y, x]` EM of the training part (uint8, uint16 or float in [0, 1]).
          neuron_ids: `[z, y, x]` dense labels of the same part.
          workdir: run folder; checkpoints go to `checkpoints/<name>`.
        """
        patch = self.training[0].patch_yx  # one train block for every model
        if patch % TOTAL_STRIDE:
            raise ConfigError(
                f"config.train.patch_yx={patch}: expected a multiple of {TOTAL_STRIDE} "
                "(DeepEM3D's pooling factor)"
            )
        intensity = self.intensity.fit([raw], name="DeepEM3D training raw")
        labels_by_kernel: dict[str, np.ndarray] = {}
        for model, settings in zip(self.models, self.training, strict=True):
            name, kernel = model.name, model.kernel
            save_normalization(intensity, checkpoint.checkpoint_dir(workdir, name))
            if kernel not in labels_by_kernel:
                labels_by_kernel[kernel] = boundary_labels(neuron_ids, kernel=kernel)
            labels = labels_by_kernel[kernel]
            weights = class_weights(labels, NUM_CLASSES)
            slices = int(model.slices)
            sampler = PatchSampler(
                [{"raw": raw, TARGET_KEY: labels}],
                input_shape=(slices, patch, patch),
                # The centre slice's labels: centre_crop keeps z (s - 1) // 2.
                output_shape=(1, patch, patch),
                input_keys=("raw",),
                augment=AugmentSettings() if settings.augment else None,
                seed=model.seed,
                intensity=intensity,
            )
            # Each process samples its own share of the batch (multi-host training).
            batch_fn = process_batch_fn(
                functools.partial(_centre_slice_batch, sampler), settings.batch_size
            )
            logging.info(
                "Model %s: s%d, kernel %s, width %s, %d steps, boundary share %.3f, weights %s",
                name,
                slices,
                kernel,
                model.width,
                settings.steps,
                float(labels.mean()),
                np.round(weights, 3).tolist(),
            )
            start = time.perf_counter()
            train(
                DeepEM3DNet(self.network_settings(model)),
                _loss(weights),
                batch_fn,
                settings,
                workdir,
                name,
            )
            logging.info("Model %s trained in %.0f s", name, time.perf_counter() - start)

    def tta_transforms(self) -> tuple:
        """`tta_transforms` of the 16 (1, 2, 4, 8 or 16; evenly picked)."""
        count = int(self.prediction.tta_transforms)
        if count not in TTA_COUNTS:
            raise ConfigError(f"config.predict.tta_transforms={count}: expected 1, 2, 4, 8 or 16")
        # TRANSFORMS varies z flip fastest, then rotation, then mirror: a stride of
        # 2 drops the z flips, 4 also the odd rotations, 8 keeps identity and mirror.
        return TRANSFORMS[:: len(TRANSFORMS) // count]

    def load(self, workdir) -> list:
        """One inference function per model, from its newest checkpoint."""
        fns = []
        for model, settings in zip(self.models, self.training, strict=True):
            network = DeepEM3DNet(self.network_settings(model))
            variables = checkpoint.restore_variables(
                workdir, model.name, network, self._sample_input(model, settings.patch_yx)
            )
            fns.append(make_apply_fn(network, variables))
        return fns

    def predict(
        self, workdir, raw, apply_fns: list | None = None, slice_lists: bool = True
    ) -> np.ndarray:
        """Boundary probability of `raw` `[z, y, x]`: every model, then their maximum.

        Each model slices along the `orientations` of the prediction settings
        (default z only) and keeps its maximum over them before the ensemble
        maximum. Each model's intensity normalisation is read from its
        checkpoint folder in `workdir` (absent: the dtype's range, with a
        warning).

        Args:
          apply_fns: the models' inference functions (`load`), to load the
            checkpoints once; None loads them.
          slice_lists: whether `raw` is the volume whose z indices the models'
            `only_slices` name (the test part). False for any other volume (a
            tuning part, a training volume): models with an `only_slices` list
            are left out there, since their list says nothing about its slices.

        Returns:
          float32 `[z, y, x]` in [0, 1].

        Raises:
          ConfigError: no model contributes to `raw`.
        """
        apply_fns = apply_fns or self.load(workdir)
        p = self.prediction
        orientations = tuple(p.orientations or ("z",))
        predictions, masks = [], []
        for model, fn in zip(self.models, apply_fns, strict=True):
            name = model.name
            mask = _slice_mask(model, raw.shape[0]) if slice_lists else None
            listed = model.only_slices is not None
            if (listed and not slice_lists) or (mask is not None and not mask.any()):
                # Running a model that contributes to no slice would only cost time.
                logging.info("Model %s left out: it contributes to no slice of %s", name, raw.shape)
                continue
            start = time.perf_counter()
            slice_wise = functools.partial(
                predict_slices,
                fn,
                slices=int(model.slices),
                stride=TOTAL_STRIDE,
                batch_size=p.batch_size,
                tta=p.tta,
                progress=p.progress,
                transforms=self.tta_transforms() if p.tta else TRANSFORMS,
                max_tile=p.max_tile,
                intensity=load_normalization(checkpoint.checkpoint_dir(workdir, name)),
                name=f"raw predicted by {name}",
            )
            predictions.append(predict_orientations(slice_wise, raw, orientations))
            logging.info(
                "Model %s predicted %s along %s in %.0f s (TTA %s)",
                name,
                raw.shape,
                "/".join(orientations),
                time.perf_counter() - start,
                p.tta_transforms if p.tta else "off",
            )
            masks.append(mask)
        if not predictions:
            raise ConfigError(
                f"config.models: no model contributes to a volume of shape {raw.shape} "
                "(every model has an only_slices list)"
            )
        return ensemble_max(predictions, masks)


def _slice_mask(model: BoundaryModelSettings, depth: int) -> np.ndarray | None:
    """bool `[z]` of the slices a model contributes to (`only_slices`), or None for all.

    `only_slices` are z indices of the volume being predicted. DeepEM3D's
    SNEMI3D ensemble (Table 2, last row) runs its three 2D nets on every slice
    and adds its 5-slice 3D-fusion net (s5_c3) only on the misaligned slices;
    an empty `only_slices` makes a model contribute nothing.
    """
    only = model.only_slices
    if only is None:
        return None
    mask = np.zeros(depth, bool)
    mask[np.asarray(only, int)] = True
    return mask
