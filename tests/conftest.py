"""Shared test set-up.

Eight host CPU devices are forced before JAX is imported so that sharding tests
can build a real 8-device mesh on a CPU-only machine.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Folder of the real EM volumes (`../shared/data`); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real EM volumes not found: {SHARED_DATA} (../shared/data) is absent")
    return SHARED_DATA


def load_config(path: pathlib.Path, variant: str | None = None):
    """`get_config(variant)` of the config file at `path`, as `--config=path:variant` loads it."""
    spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def run_main(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m synjax.main ARGS` in a subprocess on one CPU device, as a user starts it."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one device, as on a user's laptop
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "synjax.main", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def smoke_config(name: str):
    """`configs/<name>.py:smoke` on one device."""
    config = load_config(REPO_ROOT / "configs" / f"{name}.py", "smoke")
    config.train.num_devices = 1
    return config


def _train_smoke(tmp_path_factory, name: str) -> pathlib.Path:
    """A workdir with `smoke_config(name)` trained (with XLA's optimisations off: faster here)."""
    import jax

    from synjax import pipelines

    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        workdir = tmp_path_factory.mktemp(f"{name}_smoke_run")
        config = smoke_config(name)
        config.mode = "train"
        pipelines.run(config, workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", before)
    return workdir


@pytest.fixture(scope="session")
def vnc_smoke_workdir(tmp_path_factory) -> pathlib.Path:
    """`configs/vnc.py:smoke` trained once for every test module that predicts with it."""
    return _train_smoke(tmp_path_factory, "vnc")


@pytest.fixture(scope="session")
def fluorescence_smoke_workdir(tmp_path_factory) -> pathlib.Path:
    """`configs/fluorescence.py:smoke` trained once for every test module that predicts with it."""
    return _train_smoke(tmp_path_factory, "fluorescence")


@pytest.fixture
def without_onednn(monkeypatch):
    """Conv3D's rules as on a machine where the oneDNN convolution could not be built."""
    from synjax.models import conv_onednn

    monkeypatch.setattr(conv_onednn, "available", lambda: False)
