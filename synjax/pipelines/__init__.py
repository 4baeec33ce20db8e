"""End-to-end jobs: each module has `run(config, workdir)`.

Pipelines are imported lazily so that `python -m synjax.main --help` and the
config checks stay fast.
"""

from __future__ import annotations

import importlib
import pathlib

from synjax.errors import ConfigError

PIPELINES = {
    "partners": "synjax.pipelines.partners",
    "neurons": "synjax.pipelines.neurons",
}
MODES = ("train", "predict", "evaluate", "all")


def run(config, workdir: pathlib.Path) -> dict:
    """Runs `config.pipeline` in `config.mode`; returns its metrics."""
    if config.pipeline not in PIPELINES:
        raise ConfigError(
            f"config.pipeline={config.pipeline!r}; expected one of {sorted(PIPELINES)}"
        )
    if config.mode not in MODES:
        raise ConfigError(f"config.mode={config.mode!r}; expected one of {list(MODES)}")
    module = importlib.import_module(PIPELINES[config.pipeline])
    return module.run(config, workdir)
