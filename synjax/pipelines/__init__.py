"""End-to-end jobs: each module has `run(config, workdir)`.

Pipelines are imported lazily so that `python -m synjax.main --help` and the
config checks stay fast.
"""

from __future__ import annotations

import importlib
import pathlib

from absl import logging

from synjax.errors import ConfigError
from synjax.pipelines import config_checks

PIPELINES = {
    "partners": "synjax.pipelines.partners",
    "neurons": "synjax.pipelines.neurons",
    "fluorescence": "synjax.pipelines.fluorescence",
}
MODES = ("train", "predict", "evaluate", "all")


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
    config_checks.check_input_files(config)
    logging.info("synjax: %s pipeline, mode %s, workdir %s", config.pipeline, config.mode, workdir)
    module = importlib.import_module(PIPELINES[config.pipeline])
    return module.run(config, workdir)
