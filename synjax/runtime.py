"""Process set-up for the command line: flag parsing, workdir, distributed init.

Kept apart from `main.py` so that the entry point stays short and these checks
can be tested without running a pipeline.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

from synjax.errors import ConfigError, SynjaxError

_CONFIG_FLAG = re.compile(r"^--config(?:=|$)")
_OVERRIDE_FLAG = re.compile(r"^--config\.([A-Za-z0-9_.]+)")
# Libraries whose INFO lines (dozens per checkpoint) drown the progress log.
_CHATTY_LIBRARIES = ("/orbax/",)
# Where `compilation_cache="auto"` keeps JAX's compiled programs: beside the
# workdir, so that every run in the same parent folder shares them.
AUTO_CACHE_DIR = ".jax_compilation_cache"
# The `jax.monitoring` events of the persistent compilation cache.
_CACHE_HIT = "/jax/compilation_cache/cache_hits"
_CACHE_STORE = "/jax/compilation_cache/cache_misses"
# glibc's `mallopt` parameters (<malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# Freed memory at the top of the heap is kept up to this size (glibc's maximum).
_KEEP_FREED_BYTES = 2**31 - 1


def _config_path(argv: Sequence[str]) -> str | None:
    """The file part of `--config=path[:variant]` (or `--config path`)."""
    for index, arg in enumerate(argv):
        if _CONFIG_FLAG.match(arg):
            value = (
                arg.split("=", 1)[1]
                if "=" in arg
                else (argv[index + 1] if index + 1 < len(argv) else "")
            )
            return value.split(":", 1)[0]
    return None


def _synjax_cause(error: BaseException) -> SynjaxError | None:
    """The innermost `SynjaxError` that `error` was raised while handling, if any."""
    found = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, SynjaxError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """Parses absl flags, turning config-file problems into one-line `ConfigError`s.

    Args:
      argv: the process arguments, program name first.

    Returns:
      The arguments absl left unparsed.

    Raises:
      ConfigError: the config file is missing, or an override names a key the
        config does not have, or gives a value of the wrong type.
      SynjaxError: the one that the config file's `get_config` raised (e.g.
        an unknown variant), with its own message.
    """
    path = _config_path(argv[1:])
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"--config: config file {path!r} does not exist (expected e.g. configs/demo.py)"
        )
    try:
        remaining = flags.FLAGS(argv)
    except flags.Error as error:
        cause = _synjax_cause(error)
        if cause is not None:
            # A config file's own one-line error (e.g. an unknown variant),
            # which ml_collections re-raises with its traceback in the message.
            raise cause.with_traceback(None) from None
        raise ConfigError(f"bad flag: {error}") from None
    except (AttributeError, KeyError) as error:
        missing = str(error).strip("\"'")
        culprits = [a for a in argv if _OVERRIDE_FLAG.match(a) and missing in a] or [missing]
        raise ConfigError(
            f"unknown config key {missing!r} in {', '.join(culprits)} (not a field of {path})"
        ) from None
    return remaining


def prepare_workdir(workdir: str) -> pathlib.Path:
    """Creates the workdir if needed; refuses a path that is a file."""
    path = pathlib.Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--workdir={workdir} is a file; expected a folder (it is created if absent)"
        )
    path.mkdir(parents=True, exist_ok=True)
    return path


# This process's place in a multi-process run, where no cluster manager that JAX
# recognises (SLURM, Open MPI, Cloud TPU, Kubernetes) says it. The coordinator
# (host:port of process 0) is JAX's own variable, JAX_COORDINATOR_ADDRESS.
NUM_PROCESSES_ENV = "SYNJAX_NUM_PROCESSES"
PROCESS_ID_ENV = "SYNJAX_PROCESS_ID"


def _int_from_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r}: expected an integer") from None


def initialize_distributed(config) -> None:
    """Joins a multi-process JAX run when the config asks for one (`config.distributed`).

    Must run before any device is touched; without `config.distributed` it
    does nothing. Under SLURM or Open MPI, JAX finds the coordinator, the
    process count and this process's index itself; elsewhere set
    `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `SYNJAX_NUM_PROCESSES`
    and `SYNJAX_PROCESS_ID` on every host. Processes on CPUs only
    (`JAX_PLATFORMS=cpu`, e.g. a test) exchange gradients through gloo, the
    CPU collectives that JAX ships.

    Raises:
      ConfigError: a bad environment variable, or JAX could not set up the
        run (no coordinator found, or it did not answer).
    """
    if not config.get("distributed", False):
        return
    import jax

    kwargs = {
        "num_processes": _int_from_env(NUM_PROCESSES_ENV),
        "process_id": _int_from_env(PROCESS_ID_ENV),
    }
    if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(
            f"config.distributed=True: jax.distributed.initialize failed ({first_line}); "
            f"outside SLURM or Open MPI set JAX_COORDINATOR_ADDRESS=host:port of process 0, "
            f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} on every host"
        ) from None


class _QuietLibraries(logging.Filter):
    """Drops INFO and DEBUG records of `_CHATTY_LIBRARIES`; keeps their warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        chatty = any(part in record.pathname for part in _CHATTY_LIBRARIES)
        return record.levelno >= logging.WARNING or not chatty


def quiet_library_logs() -> None:
    """Keeps the run's log readable: synjax's progress lines, libraries' warnings."""
    absl_logging.get_absl_handler().addFilter(_QuietLibraries())


@dataclasses.dataclass
class CompilationCacheLog:
    """Counts the programs a run loaded from JAX's persistent cache and the ones it compiled.

    Attributes:
      directory: the cache folder.
      loaded: programs read from the cache instead of being compiled.
      stored: programs compiled in this run and written to the cache.
    """

    directory: pathlib.Path
    loaded: int = 0
    stored: int = 0

    def __call__(self, event: str, **kwargs) -> None:
        # A `jax.monitoring` event listener.
        if event == _CACHE_HIT:
            self.loaded += 1
        elif event == _CACHE_STORE:
            self.stored += 1

    def summary(self) -> str:
        return (
            f"JAX compilation cache {self.directory}: {self.loaded} programs loaded from the "
            f"cache, {self.stored} compiled and stored"
        )


def retain_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it.

    XLA:CPU allocates a program's large buffers (activations, gradients)
    afresh at every call. glibc serves blocks over 32 MB, and any block a
    worker thread's arena cannot hold, with a fresh `mmap` and unmaps them when
    they are freed, so every call faults its buffers in again page by page: the
    pruning CNN's training step (batch 4 of 16x160x160) took 83,000 minor page
    faults and 0.16 s of kernel time per step, 0.37 s in all on the 2-core CPU;
    with one arena, no `mmap` and no trimming, the heap grows to the program's
    peak once, later calls reuse it: no faults, 0.27 s (`benchmarks/run_all.py`
    measures every network this way). Values do not change. Memory is given
    back to the system only at exit, and one arena fragments differently: peak
    RSS of the demo 1.74 GB instead of 1.42 GB (wall 71 s instead of 83 s), of
    the 500^3 neuron volume 1.08 GB (1.23 GB before). PyTorch and NumPy in the
    same process share the policy.

    Call it before the first JAX computation: threads that already have an
    arena of their own keep it.

    Returns:
      Whether the settings took: False where the C library has no `mallopt`
      (not glibc: macOS, musl), which leaves its allocator as it is.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)


def configure_host_memory(config) -> None:
    """Applies `config.retain_freed_memory` (default on; see `retain_freed_memory`)."""
    if config.get("retain_freed_memory", True) and not retain_freed_memory():
        logging.info("retain_freed_memory: no glibc mallopt here; the allocator is unchanged")


def cache_directory(setting: str | None, workdir: pathlib.Path) -> pathlib.Path | None:
    """The folder of the persistent compilation cache that `config.compilation_cache` names.

    Args:
      setting: "auto" (`<workdir's parent>/.jax_compilation_cache`), a folder,
        or None / "" for no cache.
      workdir: the run's folder.
    """
    if not setting:
        return None
    if setting == "auto":
        return pathlib.Path(workdir).expanduser().absolute().parent / AUTO_CACHE_DIR
    return pathlib.Path(setting).expanduser().absolute()


def enable_compilation_cache(config, workdir: pathlib.Path) -> CompilationCacheLog | None:
    """Turns on JAX's persistent compilation cache, so a second run compiles nothing again.

    Every program is cached however short its compilation (JAX's default keeps
    only those that took over a second), since a run compiles dozens of small
    ones. Returns the log that counts loads and compilations, or None when
    `config.compilation_cache` is off.

    Raises:
      ConfigError: the cache folder cannot be created.
    """
    directory = cache_directory(config.get("compilation_cache", "auto"), workdir)
    if directory is None:
        return None
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"config.compilation_cache: cannot create the cache folder {directory} ({error})"
        ) from None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log = CompilationCacheLog(directory)
    jax.monitoring.register_event_listener(log)
    return log
