r"""synjax's command-line entry point.

    python -m synjax.main --config=configs/demo.py --workdir=/tmp/synjax-demo
    python -m synjax.main --config=configs/demo.py:smoke --workdir=/tmp/smoke \
        --config.mode=train --config.train.steps=20

The config file chooses the pipeline (`config.pipeline`) and what to run of it
(`config.mode`: train, predict, evaluate or all); the jobs themselves live in
`synjax.pipelines`.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from synjax import pipelines, runtime
from synjax.errors import SynjaxError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a variant: configs/demo.py:smoke.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, predictions and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        runtime.quiet_library_logs()
        config = _CONFIG.value
        runtime.configure_host_memory(config)
        workdir = runtime.prepare_workdir(_WORKDIR.value)
        runtime.initialize_distributed(config)
        cache = runtime.enable_compilation_cache(config, workdir)
        pipelines.run(config, workdir)
        if cache is not None:
            logging.info(cache.summary())
    except SynjaxError as error:
        # One line naming the culprit is more useful to a user than a traceback.
        sys.exit(f"synjax: error: {error}")


def run() -> None:
    """Parses flags (reporting config-file problems in one line) and runs `main`."""
    try:
        app.run(main, flags_parser=runtime.parse_flags)
    except SynjaxError as error:
        sys.exit(f"synjax: error: {error}")


if __name__ == "__main__":
    run()
