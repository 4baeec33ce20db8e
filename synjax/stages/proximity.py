"""The signed-proximity U-Net stage: build from settings, train, load, predict block by block.

`ProximityStage.from_config(config)` reads `config.unet`, `config.train`,
`config.predict` and `config.data.intensity` into typed settings
(`synjax.stages.settings`). The raw input follows the intensity settings,
measured on the training volume, saved in `checkpoints/proximity/intensity.json`
and re-applied at prediction (`synjax.data.intensity`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from synjax.data.augment import AugmentSettings
from synjax.data.intensity import (
    IntensityNormalization,
    NormalizedVolume,
    TrainedParams,
    load_normalization,
    save_normalization,
)
from synjax.data.sampling import PatchSampler
from synjax.errors import ConfigError
from synjax.geometry import Box
from synjax.inference.block_grid import BlockGrid
from synjax.inference.block_output import open_block_output
from synjax.inference.blockwise import LazyPredictor, predict_blockwise
from synjax.io import open_volume
from synjax.io.provenance import input_fingerprint, model_provenance
from synjax.models.losses import weighted_mse
from synjax.models.unet3d import UNet3D, UNet3DSettings
from synjax.settings import from_config as settings_from_config
from synjax.stages.settings import (
    BlockwisePredictSettings,
    ProximityNetworkSettings,
    ProximityTrainSettings,
)
from synjax.train import checkpoint
from synjax.train.batches import process_batch_fn
from synjax.train.loop import train

MODEL_NAME = "proximity"


def _loss(outputs, batch):
    loss = weighted_mse(outputs, batch["target"], batch["weight"])
    return loss, {"mse": loss}


@dataclasses.dataclass(frozen=True)
class ProximityStage:
    """The proximity U-Net of the partner pipeline, from its typed settings.

    Attributes:
      network: the U-Net and its patch shapes (`config.unet`).
      training: how it is trained (`config.train`; its seed is `config.seed`).
      prediction: block-wise prediction (`config.predict`).
      intensity: how raw becomes its input (`config.data.intensity`), not yet
        measured on a volume.
    """

    network: ProximityNetworkSettings
    training: ProximityTrainSettings
    prediction: BlockwisePredictSettings
    intensity: IntensityNormalization

    @classmethod
    def from_config(cls, config) -> ProximityStage:
        """The stage of a partner config (unknown keys in its blocks are refused)."""
        return cls(
            network=settings_from_config(ProximityNetworkSettings, config.unet, "config.unet"),
            training=settings_from_config(
                ProximityTrainSettings, config.train, "config.train", seed=config.seed
            ),
            prediction=settings_from_config(
                BlockwisePredictSettings, config.predict, "config.predict"
            ),
            intensity=IntensityNormalization.from_config(config.data.get("intensity")),
        )

    def unet_settings(self) -> UNet3DSettings:
        """The network's settings: one output channel, the signed proximity."""
        n = self.network
        return UNet3DSettings(
            depth=n.depth,
            base_features=n.base_features,
            feature_growth=n.feature_growth,
            pool_factors=n.pool_factors,
            conv_kernels=n.conv_kernels,
            padding=n.padding,
            out_channels=1,
            conv_implementation=n.conv_implementation,
            remat=n.remat,
        )

    def model(self) -> UNet3D:
        return UNet3D(self.unet_settings())

    def train(self, sources: list[dict[str, np.ndarray]], workdir: pathlib.Path) -> TrainedParams:
        """Trains the U-Net on patches of `sources` (see `partner_data.proximity_targets`).

        Returns:
          The trained parameters with the intensity normalisation measured on
          the sources' raw (also saved with the checkpoint).
        """
        intensity = self.intensity.fit(
            [source["raw"] for source in sources], name="U-Net training raw"
        )
        save_normalization(intensity, checkpoint.checkpoint_dir(workdir, MODEL_NAME))
        # Each process samples its own share of the batch (multi-host training).
        batch_fn = process_batch_fn(
            self.patch_sampler(sources, intensity).batch, self.training.batch_size
        )
        state = train(self.model(), _loss, batch_fn, self.training, workdir, name=MODEL_NAME)
        return TrainedParams(jax.device_get(state.params), intensity)

    def patch_sampler(
        self, sources: list[dict[str, np.ndarray]], intensity: IntensityNormalization
    ) -> PatchSampler:
        """The training patches: `input_shape` raw around `output_shape` targets, augmented.

        Args:
          sources: as for `train`.
          intensity: the normalisation fitted on the sources' raw.
        """
        cfg = self.unet_settings()
        input_shape = cfg.valid_input_shape(self.network.train_output)
        output_shape = cfg.output_shape(input_shape)
        logging.info("U-Net training patch: input %s -> output %s", input_shape, output_shape)
        return PatchSampler(
            sources,
            input_shape=input_shape,
            output_shape=output_shape,
            input_keys=("raw",),
            augment=AugmentSettings(),
            seed=self.training.seed,
            positive_key="synaptic",
            positive_fraction=self.training.positive_fraction,
            intensity=intensity,
        )

    def load(self, workdir: pathlib.Path) -> TrainedParams:
        """The trained U-Net in `workdir` (for predict-only runs), with its normalisation."""
        cfg = self.unet_settings()
        sample = np.zeros((1, *cfg.valid_input_shape(self.network.train_output), 1), np.float32)
        params = checkpoint.restore_params(workdir, MODEL_NAME, UNet3D(cfg), sample)
        directory = checkpoint.checkpoint_dir(workdir, MODEL_NAME)
        return TrainedParams(params, load_normalization(directory))

    def predict(
        self,
        trained: TrainedParams,
        raw: np.ndarray,
        dest_path: pathlib.Path,
        resolution,
        step: int | None = None,
        input_path=None,
        input_dataset: str | None = None,
        workdir: pathlib.Path | None = None,
    ) -> np.ndarray:
        """Predicts signed proximity over `raw` block by block; reads the result back.

        See `predict_volume`, which this calls for the whole of `raw`.

        Returns:
          [z, y, x] float32 proximity, read back from the output.
        """
        self.predict_volume(
            trained,
            raw,
            dest_path,
            resolution,
            step=step,
            input_path=input_path,
            input_dataset=input_dataset,
            workdir=workdir,
        )
        return open_volume(str(dest_path)).read()

    def predict_volume(
        self,
        trained: TrainedParams,
        raw,
        dest_path: pathlib.Path,
        resolution,
        step: int | None = None,
        input_path=None,
        input_dataset: str | None = None,
        roi: Box | None = None,
        offset=(0.0, 0.0, 0.0),
        progress: bool = True,
        workdir: pathlib.Path | None = None,
    ):
        """Predicts signed proximity over `raw` (or a region of it) block by block into zarr.

        Memory holds a few blocks, whatever the size of `raw`. The run is
        resumable: the done-state of every block is kept next to the output
        (`<dest>.blocks`, `synjax.inference.done_blocks`), with what made them
        (the parameters' step and hash, the input's path, shape, dtype and
        content fingerprint, the region), and a restarted run skips them. When
        the model, the input or the block grid differ from those recorded,
        `config.predict.resume` decides: "auto" (default) predicts the output
        afresh and logs why, "strict" stops with an error naming what differs.
        A failing block is retried `config.predict.retries` times.

        Args:
          trained: `train`'s or `load`'s result; its intensity
            normalisation is applied to each block of `raw` as it is read.
          raw: [z, y, x] EM of any dtype the normalisation accepts (a numpy
            array or a lazy `synjax.io` volume).
          dest_path: the `.zarr` output, of the region's shape.
          resolution: voxel size (nm, z-y-x) recorded with the output.
          step: checkpoint step of the parameters, recorded with the output.
          input_path: file `raw` was read from (None for generated volumes).
          input_dataset: dataset of `raw` inside `input_path`.
          roi: the region of `raw` to predict (None: all of it); context
            around it is read from `raw`.
          offset: world position (nm) of `raw`'s first voxel; the output's
            offset is that of the region's first voxel.
          progress: show a progress bar (blocks done, rate, ETA).
          workdir: the run folder holding the checkpoint at `step`; needed by
            `config.predict.executor="dask"`, whose workers each load the
            model from it once (`LazyPredictor`) rather than receive it.

        Returns:
          The output `Volume` (opened for reading).

        Raises:
          ConfigError: `config.predict.resume` is not "auto" or "strict".
          DataError: with "strict", the existing output was made differently.
          BlockError: a block failed every retry (named with the error).
        """
        roi = Box.from_shape(raw.shape[:3]) if roi is None else roi
        cfg = self.unet_settings()
        block = tuple(
            min(b, s) for b, s in zip(self.network.predict_output, roi.shape, strict=True)
        )
        if cfg.padding == "VALID":
            input_shape = cfg.valid_input_shape(block)
            output_shape = cfg.output_shape(input_shape)
            crop = (slice(None),) * 4
        else:
            # A same-padded network sees zeros past its input: predict a margin
            # of real context around each block and keep only the block.
            margin = tuple(self.network.predict_context)
            output_shape = block
            input_shape = tuple(b + 2 * m for b, m in zip(block, margin, strict=True))
            crop = (slice(None), *(slice(m, m + b) for m, b in zip(margin, block, strict=True)))
        grid = BlockGrid.from_io_shapes(roi.shape, input_shape, output_shape)
        if not isinstance(trained, TrainedParams):
            raise TypeError(
                "ProximityStage.predict: expected TrainedParams (params with their intensity)"
            )
        provenance = prediction_provenance(trained, raw, step, input_path, input_dataset)
        if roi != Box.from_shape(raw.shape[:3]):
            provenance["input"]["roi"] = [list(roi.start), list(roi.stop)]
        # Blocks are read through a normalising view: each is converted as it is
        # read, exactly as training patches were, and never the whole volume.
        raw = NormalizedVolume(raw, trained.intensity, name=f"raw predicted into {dest_path.name}")
        if self.prediction.executor == "dask":
            if workdir is None:
                raise ConfigError(
                    "config.predict.executor='dask': the workers load the U-Net from the "
                    "workdir's checkpoint, and none was given"
                )
            block_fn = LazyPredictor(
                load_block_fn, cfg, self.network.train_output, str(workdir), step, crop
            )
        else:
            block_fn = block_fn_of(cfg, trained.params, crop)

        resume = self.prediction.resume
        origin_nm = (
            float(o) + a * r for o, a, r in zip(offset, roi.start, resolution, strict=True)
        )
        dest, done = open_block_output(
            dest_path,
            roi.shape,
            np.float32,
            grid,
            provenance,
            resume,
            resolution,
            tuple(origin_nm),
            chunks=output_shape,
        )
        summary = predict_blockwise(
            block_fn,
            raw,
            dest,
            grid,
            batch_size=self.prediction.batch_size,
            manifest_path=done,
            executor=self.prediction.executor,
            provenance=provenance,
            resume=resume,
            retries=self.prediction.retries,
            origin=roi.start,
            progress=progress,
            client=self.prediction.scheduler or None,
        )
        logging.info("Proximity %s: %s", dest_path.name, summary)
        return open_volume(str(dest_path))


def block_fn_of(settings: UNet3DSettings, params, crop) -> Callable[[np.ndarray], np.ndarray]:
    """The runner's block function: `[b, iz, iy, ix]` normalised raw -> `[b, oz, oy, ox]` proximity.

    Args:
      settings: the U-Net's settings.
      params: its parameters.
      crop: slices of the network's `[b, z, y, x]` output kept (the block).
    """
    model = UNet3D(settings)

    @jax.jit
    def apply(batch):
        return model.apply({"params": params}, batch[..., None])[..., 0][crop]

    return lambda batch: np.asarray(apply(jnp.asarray(batch)))


def load_block_fn(
    settings: UNet3DSettings, train_output, workdir: str, step: int | None, crop
) -> Callable[[np.ndarray], np.ndarray]:
    """`block_fn_of` the U-Net restored from `workdir`'s checkpoint at `step` (a Dask worker's)."""
    sample = np.zeros((1, *settings.valid_input_shape(train_output), 1), np.float32)
    params = checkpoint.restore_params(workdir, MODEL_NAME, UNet3D(settings), sample, step=step)
    return block_fn_of(settings, params, crop)


def prediction_provenance(
    trained: TrainedParams,
    raw,
    step: int | None = None,
    input_path=None,
    input_dataset: str | None = None,
) -> dict:
    """What a proximity prediction is made of: the U-Net, its input scaling and the input.

    Args:
      trained: the U-Net parameters with their intensity normalisation.
      raw: [z, y, x] input volume as stored (only sampled boxes are read when
        it is large).
      step: the checkpoint step of the parameters, when known.
      input_path: the file `raw` was read from, if any.
      input_dataset: the dataset inside that file, if any.

    Returns:
      `{"model": {name, step, params_hash, intensity}, "input": {path,
      dataset, shape, dtype, fingerprint, sampled}}` (see `synjax.io.provenance`).
    """
    return {
        "model": model_provenance(MODEL_NAME, step, trained.params)
        | {"intensity": trained.intensity.to_dict()},
        "input": input_fingerprint(raw, path=input_path, dataset=input_dataset),
    }
