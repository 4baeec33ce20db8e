"""Pipelines: the end-to-end jobs, their data loaders and the config checks.

`partners.py` (synaptic partners, Parag et al.) and `neurons.py` (DeepEM3D
neuron segmentation) each define `train(config, workdir)`,
`load_test(config)`, `predict(config, workdir, test)` and
`evaluate(config, workdir, test)`; `run` checks the config, then runs the
phases of `config.mode` in order. With `config.predict.input` (a volume of the
user's, `volume_input.py`), predict mode runs `predict_volume(config, workdir)`
of `partner_volume.py`, `neuron_volume.py`, `instance_volume.py` or
`fluorescence_volume.py` instead of
predicting the test data, then writes the neuroglancer state of its outputs
into `config.predict.output` (the input referenced where it lies, not copied;
`python -m synjax.view OUTPUT`). May
import every package before it (the stages included); only `main.py` imports
the pipelines. Jobs are imported lazily so that `python -m synjax.main --help`
and the config checks stay fast.
"""

from __future__ import annotations

import importlib
import pathlib

from absl import logging

from synjax.errors import ConfigError
from synjax.pipelines import config_checks, volume_input

PIPELINES = {
    "partners": "synjax.pipelines.partners",
    "neurons": "synjax.pipelines.neurons",
    "fluorescence": "synjax.pipelines.fluorescence",
    "instances": "synjax.pipelines.instances",
}
MODES = ("train", "predict", "evaluate", "all")
# The jobs that predict a user's volume (`config.predict.input`): `predict_volume(config, workdir)`.
VOLUME_JOBS = {
    "partners": "synjax.pipelines.partner_volume",
    "neurons": "synjax.pipelines.neuron_volume",
    "instances": "synjax.pipelines.instance_volume",
    "fluorescence": "synjax.pipelines.fluorescence_volume",
}


def run(config, workdir: pathlib.Path) -> dict:
    """Runs `config.pipeline` in `config.mode`; returns its metrics.

    The whole config (`config_checks.check_config`) and the input files it
    names (`config_checks.check_input_files`) are checked first, before
    anything is logged, read or trained, so that a bad key, value or file is
    one error line at once rather than a failure an hour into the run.

    Raises:
      ConfigError, DataError: a bad config or input file (see `config_checks`).
    """
    if config.pipeline not in PIPELINES:
        raise ConfigError(
            f"config.pipeline={config.pipeline!r}; expected one of {sorted(PIPELINES)}"
        )
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r}; expected one of {list(MODES)}")
    config_checks.check_config(config)
    volume_input.check_mode(config)
    if volume_input.predicts_own_volume(config):
        if config.pipeline not in VOLUME_JOBS:
            raise ConfigError(
                f"config.predict.input: the {config.pipeline} pipeline predicts no volume of "
                f"your own yet; expected one of {sorted(VOLUME_JOBS)}"
            )
        # The test data is not read: the input volume and its region are checked instead.
        volume_input.open_input(config)[0].close()
        logging.info("synjax: %s pipeline on %s", config.pipeline, config.predict.input)
        job = importlib.import_module(VOLUME_JOBS[config.pipeline])
        job.predict_volume(config, pathlib.Path(workdir))
        from synjax.report import neuroglancer_state  # tensorstore: not for --help

        output = volume_input.output_dir(config)
        path = neuroglancer_state.write_volume_state(
            output, config.predict.input, config.predict.get("segmentation")
        )
        logging.info(
            "Neuroglancer state in %s (open it with python -m synjax.view %s)", path, output
        )
        return {}
    config_checks.check_input_files(config)
    logging.info("synjax: %s pipeline, mode %s, workdir %s", config.pipeline, config.mode, workdir)
    job = importlib.import_module(PIPELINES[config.pipeline])
    return run_phases(job, config, pathlib.Path(workdir))


def run_phases(job, config, workdir: pathlib.Path) -> dict:
    """Runs the phases of `config.mode` of one job, in order.

    "train" trains; "predict" and "evaluate" load the test data once and
    predict, evaluate, or both ("all" does the three in turn).

    Args:
      job: a pipeline module (`train`, `load_test`, `predict`, `evaluate`).
      config: the run's config.
      workdir: the run folder.

    After the phases, the neuroglancer state of what the run wrote
    (`synjax.report.neuroglancer_state`) is written, over a copy of the test
    raw when the phases loaded one.

    Returns:
      The metrics of "evaluate", or {} when the mode does not evaluate.
    """
    mode = config.mode
    metrics: dict = {}
    test = None
    if mode in ("train", "all"):
        job.train(config, workdir)
    if mode in ("predict", "evaluate", "all"):
        test = job.load_test(config)
        if mode in ("predict", "all"):
            job.predict(config, workdir, test)
        if mode in ("evaluate", "all"):
            metrics = job.evaluate(config, workdir, test)
    # Only predictions (after predict, or an earlier run's for evaluate) are
    # shown, so a training-only run writes no state.
    if mode != "train":
        from synjax.report import neuroglancer_state  # tensorstore: not for --help

        raw = getattr(test, "raw", None)
        resolution = getattr(test, "resolution", None)
        path = neuroglancer_state.write_state(workdir, raw, resolution)
        logging.info("Neuroglancer state in %s (open it with python -m synjax.view)", path)
    return metrics
