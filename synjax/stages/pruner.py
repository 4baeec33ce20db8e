"""The candidate-pruning stage: build from settings, train the pruning CNN on
labelled candidates, load it, score new candidates with it.

`PrunerStage.from_config(config)` reads `config.pruner` (the network, and its
training in `config.pruner.train`) and `config.data.intensity`. The raw
channel of the windows follows the intensity settings, measured on the
training volume, saved in `checkpoints/pruner/intensity.json` and re-applied
when scoring (`synjax.data.intensity`).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from synjax.data.intensity import (
    IntensityNormalization,
    TrainedParams,
    load_normalization,
    save_normalization,
)
from synjax.errors import DataError
from synjax.models.pruning import PruningCNN, sigmoid_bce
from synjax.postprocess.candidates import Candidates
from synjax.postprocess.pruning_windows import NUM_CHANNELS, extract_windows
from synjax.report.progress import progress_bar
from synjax.settings import from_config as settings_from_config
from synjax.stages.settings import PrunerSettings
from synjax.train import checkpoint
from synjax.train.batches import host_batch_size
from synjax.train.loop import train

MODEL_NAME = "pruner"
# Share of positive windows in a training batch: candidates are mostly negative.
POSITIVE_SHARE = 0.5


def _loss(logits, batch):
    loss = sigmoid_bce(logits, batch["label"])
    accuracy = jnp.mean((logits > 0) == (batch["label"] > 0.5))
    return loss, {"bce": loss, "accuracy": accuracy}


@dataclasses.dataclass(frozen=True)
class PrunerStage:
    """The pruning CNN of the partner pipeline, from its typed settings.

    Attributes:
      settings: the network and its training (`config.pruner`; the training
        seed is `config.seed`).
      intensity: how raw becomes the windows' first channel
        (`config.data.intensity`), not yet measured on a volume.
    """

    settings: PrunerSettings
    intensity: IntensityNormalization

    @classmethod
    def from_config(cls, config) -> PrunerStage:
        """The stage of a partner config (unknown keys in its blocks are refused)."""
        return cls(
            settings=settings_from_config(
                PrunerSettings, config.pruner, "config.pruner", seed=config.seed
            ),
            intensity=IntensityNormalization.from_config(config.data.get("intensity")),
        )

    def model(self) -> PruningCNN:
        s = self.settings
        return PruningCNN(features=s.features, pools=s.pools, dense_features=s.dense_features)

    def train(
        self,
        raw: np.ndarray,
        proximity: np.ndarray,
        segmentation: np.ndarray,
        candidates: Candidates,
        labels: np.ndarray,
        workdir: pathlib.Path,
    ) -> TrainedParams:
        """Trains the pruning CNN on augmented windows of labelled candidates.

        Batches hold positives and negatives in equal shares (when both exist),
        drawn anew every step, so a handful of true synapses is enough to learn.
        Only the windows of `raw` are read and converted to float each step.

        Returns:
          The trained parameters with the intensity normalisation of their
          windows (also saved with the checkpoint).

        Raises:
          DataError: there are no candidates to learn from.
        """
        if len(candidates) == 0:
            raise DataError("pruner training: the training volume gave no candidates")
        positives, negatives = np.flatnonzero(labels), np.flatnonzero(~labels)
        logging.info(
            "Pruner training: %d positive, %d negative candidates", len(positives), len(negatives)
        )
        settings = self.settings.train
        window = self.settings.window
        intensity = self.intensity.fit([raw], name="pruner training raw")
        save_normalization(intensity, checkpoint.checkpoint_dir(workdir, MODEL_NAME))

        def batch_fn(step: int) -> dict[str, np.ndarray]:
            rng = np.random.default_rng([settings.seed, step, 1])
            n_pos = (
                int(round(settings.batch_size * POSITIVE_SHARE))
                if len(negatives)
                else settings.batch_size
            )
            n_pos = n_pos if len(positives) else 0
            rows = np.concatenate(
                [
                    rng.choice(positives, n_pos) if n_pos else np.zeros(0, np.int64),
                    rng.choice(negatives, settings.batch_size - n_pos)
                    if settings.batch_size > n_pos
                    else np.zeros(0, np.int64),
                ]
            ).astype(np.int64)
            # The rows of the whole batch are drawn on every process (cheap);
            # each reads the windows of its own share only (multi-host training).
            share = host_batch_size(settings.batch_size)
            rows = rows[jax.process_index() * share : (jax.process_index() + 1) * share]
            windows = extract_windows(
                raw,
                proximity,
                segmentation,
                candidates.select(rows),
                window,
                rng=rng,
                intensity=intensity,
                name="pruner training raw",
            )
            return {"input": windows, "label": labels[rows].astype(np.float32)}

        state = train(self.model(), _loss, batch_fn, settings, workdir, name=MODEL_NAME)
        return TrainedParams(jax.device_get(state.params), intensity)

    def load(self, workdir: pathlib.Path) -> TrainedParams:
        """The trained pruning CNN in `workdir`: parameters and intensity normalisation."""
        sample = np.zeros((1, *self.settings.window, NUM_CHANNELS), np.float32)
        params = checkpoint.restore_params(workdir, MODEL_NAME, self.model(), sample)
        directory = checkpoint.checkpoint_dir(workdir, MODEL_NAME)
        return TrainedParams(params, load_normalization(directory))

    def score(
        self,
        trained: TrainedParams,
        raw: np.ndarray,
        proximity: np.ndarray,
        segmentation: np.ndarray,
        candidates: Candidates,
        name: str = "raw",
        progress: bool = False,
    ) -> np.ndarray:
        """Pruner probabilities that each candidate is a real pre -> post pair.

        Args:
          trained: `train`'s or `load`'s result; its intensity normalisation is
            applied to the windows of `raw`.
          raw: [z, y, x] EM of any dtype the normalisation accepts.
          name: `raw`'s name for errors.
          progress: show a progress bar over the batches of windows.

        Returns:
          [n] float64 probabilities in [0, 1].
        """
        if not isinstance(trained, TrainedParams):
            raise TypeError(
                "PrunerStage.score: expected TrainedParams (params with their intensity)"
            )
        model = self.model()
        params = trained.params
        apply = jax.jit(lambda x: jax.nn.sigmoid(model.apply({"params": params}, x)))
        # The training batch size batches the scoring too.
        batch = self.settings.train.batch_size
        scores = np.zeros(len(candidates), np.float64)
        batches = range(0, len(candidates), batch)
        for start in progress_bar(batches, desc="pruner windows", disable=not progress):
            rows = np.arange(start, min(start + batch, len(candidates)))
            windows = extract_windows(
                raw,
                proximity,
                segmentation,
                candidates.select(rows),
                self.settings.window,
                intensity=trained.intensity,
                name=name,
            )
            # Pad the last batch to one shape so the function compiles once.
            padded = np.zeros((batch, *windows.shape[1:]), np.float32)
            padded[: len(rows)] = windows
            scores[rows] = np.asarray(apply(padded))[: len(rows)]
        return scores
