"""Checks of a whole config, and of the files it names, before any data is read.

Config files are plain Python: a misspelt key (`only_slice` for
`only_slices`) would be silently ignored by code that reads fields with
`.get`, and a value out of range surfaces only when the stage that uses it
runs, maybe after an hour of training. `check_config` walks the config against
a schema of the keys each pipeline reads, with the range of each value, and
raises one `ConfigError` naming the full key (`config.models[1]: unknown key
'only_slice'`). `check_input_files` then opens every input file the run will
read, so that a missing, truncated or corrupt file is reported at once.

The keys of a block that a stage reads (`config.unet`, `config.train`,
`config.pruner`, each `config.models` entry, ...) are the fields of its
settings class (`synjax.stages.settings`, `synjax.train.settings`): the
schema takes them from there (`settings_block`), required where a field has
no default, and adds only the range of each value. So a key is declared once,
in its settings class, and the stages build those classes with the same
`synjax.settings.from_config`, which refuses unknown keys too. The other
blocks (data, candidates, watershed, ...) are declared here. A new config
field goes in its settings class or here; the tests run every shipped config
variant through `check_config`.

One module per pipeline (`partners`, `neurons`, `fluorescence`, `instances`) holds its
schema (`SCHEMA`), its checks across keys (`check_relations`) and the input
files it opens (`check_input_files`); `rules` holds what one key may hold,
`common` the blocks several pipelines share. A new pipeline adds its module
and one line to `CHECKS`. The value sets mirror library constants so that
these checks stay fast (no JAX import: a bad config is reported in a second);
a test keeps them equal.
"""

from __future__ import annotations

from synjax.errors import ConfigError
from synjax.pipelines.config_checks import fluorescence, instances, neurons, partners
from synjax.pipelines.config_checks.rules import check_block

# The checks of each pipeline, by `config.pipeline`.
CHECKS = {
    "partners": partners,
    "neurons": neurons,
    "fluorescence": fluorescence,
    "instances": instances,
}


def _checks_of(config):
    checks = CHECKS.get(config.pipeline)
    if checks is None:
        raise ConfigError(f"config.pipeline={config.pipeline!r}; expected one of {sorted(CHECKS)}")
    return checks


def check_config(config) -> None:
    """Checks every key and value of a pipeline's config.

    Args:
      config: the run's config; `config.pipeline` chooses the schema.

    Raises:
      ConfigError: naming the first unknown key, missing key, or value out of
        range, by its full name (e.g. `config.candidates.tau=1.5: expected a
        number in (0, 1)`).
    """
    checks = _checks_of(config)
    check_block(config, checks.SCHEMA, "config")
    checks.check_relations(config)


def check_input_files(config) -> None:
    """Opens each input file the run's mode reads, before any training starts.

    A missing file, a truncated or corrupt one, or one without its raw volume
    is reported now rather than when the stage that reads it runs (the test
    file is read only after training).

    Raises:
      DataError: naming the config key, the file and what is wrong with it.
    """
    _checks_of(config).check_input_files(config)
