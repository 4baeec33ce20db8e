"""Helpers that config files import.

Config files are loaded by path (`--config=configs/demo.py:smoke`), so they
cannot import each other; what they share lives here.
"""

from __future__ import annotations

from collections.abc import Iterable

import ml_collections
from ml_collections import config_dict as ml_config_dict

from synjax.errors import ConfigError


def variant(arg: str | None, known: Iterable[str], config_name: str) -> str:
    """Returns the variant named after the colon in `--config=file.py:variant`.

    Args:
      arg: the text after the colon, or None for the default variant.
      known: variant names the config file defines ("default" among them).
      config_name: the config file's name, for the error message.

    Raises:
      ConfigError: the variant is not one of `known`.
    """
    name = arg or "default"
    known = tuple(known)
    if name not in known:
        raise ConfigError(f"{config_name}: unknown variant {name!r}; expected one of {list(known)}")
    return name


def config_dict(fields: dict) -> ml_collections.ConfigDict:
    """A ConfigDict whose nested dicts become ConfigDicts too."""
    return ml_collections.ConfigDict(fields)


def train_block(
    *,
    batch_size: int,
    learning_rate: float,
    optimizer: str,
    schedule: str,
    warmup_steps: int,
    log_every: int,
    checkpoint_every: int,
    keep_checkpoints: int,
    steps: int | None = None,
    num_devices: int | None = None,
    **stage_fields,
) -> dict:
    """A training block: the fields of `synjax.train.settings.TrainSettings`.

    Every config's training blocks (`config.train`, `config.pruner.train`,
    `config.neurons.train`) are made here, so that their fields are named and
    explained once:

    Args:
      batch_size: global batch size, over all devices and processes.
      learning_rate: peak learning rate.
      optimizer: "adam", "adamw" or "sgd".
      schedule: "constant", "cosine" or "warmup_cosine" (cosine decay to 0
        at the last step, after a linear warm-up from 0).
      warmup_steps: steps of linear warm-up (fewer than the steps).
      log_every: steps between metric lines (metrics/<model>.jsonl,
        TensorBoard and the log); 0: never.
      checkpoint_every: steps between checkpoints (one is saved at the end
        too); a re-run resumes from the newest.
      keep_checkpoints: most recent checkpoints kept.
      steps: optimizer steps; None leaves the key out (DeepEM3D's models give
        their own in `config.models`).
      num_devices: local devices to use; None: all of them (the key still
        takes an integer on the command line).
      **stage_fields: the stage's own fields in the same block (e.g.
        `positive_fraction`), commented where the config passes them.

    Returns:
      A dict for `config_dict`.
    """
    block = {} if steps is None else {"steps": steps}
    return block | {
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": optimizer,
        "schedule": schedule,
        "warmup_steps": warmup_steps,
        "log_every": log_every,
        "checkpoint_every": checkpoint_every,
        "keep_checkpoints": keep_checkpoints,
        "num_devices": ml_config_dict.placeholder(int) if num_devices is None else num_devices,
        **stage_fields,
    }


def intensity_block(
    method: str = "dtype", low_percent: float = 1.0, high_percent: float = 99.0
) -> dict:
    """How raw intensities become the networks' [0, 1] input (`config.data.intensity`).

    The choice is saved with each checkpoint (checkpoints/<model>/intensity.json)
    and re-applied at prediction (`synjax.data.intensity`).

    Args:
      method: "dtype": uint8 / 255, uint16 / 65535, floats must already lie in
        [0, 1]; "percentiles": the training volume's low/high percentiles map
        to 0 and 1 (clipped), measured once on it and never on the test volume.
      low_percent: the low percentile of "percentiles".
      high_percent: the high percentile of "percentiles".
    """
    return {"method": method, "low_percent": low_percent, "high_percent": high_percent}


def job_fields(pipeline: str) -> dict:
    """The fields every config starts with (override them like any other).

    Returns:
      `pipeline`: the end-to-end job (see `synjax.pipelines.PIPELINES`);
      `mode`: "train", "predict", "evaluate", or "all" three in turn;
      `seed`: seed of parameter initialisation and patch sampling (a
      `config.models` entry may have its own); `distributed`: call
      `jax.distributed.initialize()` first (multi-host runs; see
      `synjax.runtime.initialize_distributed` for the environment it reads);
      `compilation_cache`: folder of JAX's persistent compilation cache, so a
      second run compiles nothing again ("auto": `.jax_compilation_cache`
      beside the workdir; "" for none); `retain_freed_memory`: keep freed
      host memory for the next call instead of faulting it in afresh (glibc's
      malloc; about a quarter of a CPU training step otherwise, see
      `synjax.runtime.retain_freed_memory`).
    """
    return {
        "pipeline": pipeline,
        "mode": "all",
        "seed": 0,
        "distributed": False,
        "compilation_cache": "auto",
        "retain_freed_memory": True,
    }


def volume_predict_fields() -> dict:
    """The prediction keys every block-wise pipeline shares (override them like any other).

    Returns:
      `executor`: "local", or "dask" (the `distributed` extra) on the
      scheduler at `scheduler` ("tcp://host:8786", e.g. from dask-jobqueue
      on SLURM or dask-kubernetes; "": a LocalCluster on this machine);
      `resume`: an output made by another model, input or block grid is
      predicted afresh and the reason logged ("auto"), or the run stops with
      an error naming what differs ("strict");
      `retries`: how many more times a failing block is tried before the run
      stops with an error naming it (index, voxel box, error);
      `input`: a volume of your own to predict with the models trained in
      the workdir (with `--config.mode=predict`): any `synjax.io` source
      (x.zarr, x.n5, precomputed://..., x.h5:/dataset, x.tif); "" predicts
      the test data; `output`: the folder the predictions go to (zarr,
      block by block); `roi`: the region "z0:z1,y0:y1,x0:x1" in voxels
      ("" = the whole volume).
    """
    return {
        "executor": "local",
        "scheduler": "",
        "resume": "auto",
        "retries": 2,
        "input": "",
        "output": "",
        "roi": "",
    }


def volume_segmentation_fields(
    block: tuple[int, int, int] = (128, 128, 128), halo: int = 16
) -> dict:
    """The neuron pipeline's keys of the segmentation of a volume of your own.

    After the boundary map of `config.predict.input`, the watershed and
    agglomeration tuned in the workdir segment it block by block
    (`synjax.postprocess.blockwise_watershed.segment_blockwise`) into
    `<output>/segmentation.zarr`.

    Args:
      block: `segment_block`, the (z, y, x) voxels of one block; memory holds
        one block with its halo (float64 and a few label arrays), so 128^3
        with halo 16 is about 0.3 GB.
      halo: `segment_halo`, voxels of context flooded around each block; the
        result equals the whole volume's where every foreground component
        meeting a block lies within its halo (see that module), else it is a
        watershed per halo box stitched and agglomerated across the faces.

    Returns:
      `segment_block` and `segment_halo`.
    """
    return {"segment_block": tuple(block), "segment_halo": int(halo)}
