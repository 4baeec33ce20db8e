"""Bad input is loud: one error line naming the file, dataset, key or step.

Corrupt or truncated HDF5 files, NaN or Inf in raw volumes, a loss that turns
non-finite while training, unknown config keys in nested blocks and values out
of range: each is checked in the library and through `python -m synjax.main`,
where stderr must hold the one error line and no traceback. Errors found
before the run logs anything (config keys and values, unreadable files) are
the only stderr line at the default verbosity; errors found after the run has
logged its progress (NaN raw, NaN loss) are the only line with
`--verbosity=-1` (warnings and errors only), and the only error line with no
traceback otherwise.
"""

from __future__ import annotations

import os
import pathlib
import re
import runpy

import h5py
import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.io import open_volume, read_cremi
from synjax.io.checks import require_finite
from synjax.pipelines import config_checks
from tests.conftest import REPO_ROOT
from tests.test_main_cli import _error_line, _run

CONFIGS = REPO_ROOT / "configs"
SHIPPED = {
    "demo": ("default", "smoke", "predicted_segmentation"),
    "cremi": ("default", "smoke"),
    "snemi": ("default", "smoke"),
    "fib25": ("default", "smoke"),
}
RAW = "volumes/raw"
# A raw volume at least as large as fib25:smoke's parts (z < 32, 48 x 48 crops).
RAW_SHAPE = (32, 48, 48)
NAN_AT = (3, 10, 20)


def _config(name: str, variant: str = "smoke"):
    return runpy.run_path(str(CONFIGS / f"{name}.py"))["get_config"](variant)


def _write_raw(path: pathlib.Path, raw: np.ndarray, **dataset_options) -> pathlib.Path:
    """An HDF5 file with `volumes/raw` (and its CREMI `resolution` attribute)."""
    with h5py.File(path, "w") as f:
        dataset = f.create_dataset(RAW, data=raw, **dataset_options)
        dataset.attrs["resolution"] = (40.0, 4.0, 4.0)
    return path


def _raw(dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, RAW_SHAPE).astype(dtype)


def _truncated(tmp_path: pathlib.Path) -> pathlib.Path:
    path = _write_raw(tmp_path / "truncated.h5", _raw())
    os.truncate(path, path.stat().st_size // 2)
    return path


def _corrupt_chunk(tmp_path: pathlib.Path) -> pathlib.Path:
    """A file whose header is intact but whose one gzip chunk is overwritten."""
    path = _write_raw(tmp_path / "corrupt.h5", _raw(), chunks=RAW_SHAPE, compression="gzip")
    with h5py.File(path, "r") as f:
        chunk = f[RAW].id.get_chunk_info(0)
    data = bytearray(path.read_bytes())
    data[chunk.byte_offset : chunk.byte_offset + chunk.size] = b"\x07" * chunk.size
    path.write_bytes(bytes(data))
    return path


def _nan_raw_file(tmp_path: pathlib.Path) -> pathlib.Path:
    raw = _raw(np.float32)
    raw[NAN_AT] = np.nan
    return _write_raw(tmp_path / "nan_raw.h5", raw)


# --- require_finite --------------------------------------------------------------


def test_require_finite_returns_finite_and_integer_arrays_unchanged():
    floats = np.linspace(0, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    assert require_finite(floats, "x") is floats
    ints = np.array([0, 255], np.uint8)
    assert require_finite(ints, "x") is ints
    assert require_finite(np.zeros((0, 3), np.float32), "x").shape == (0, 3)
    # The float64 sum of these overflows to inf, but every value is finite.
    huge = np.full(4, np.finfo(np.float64).max / 2)
    assert require_finite(huge, "x") is huge


def test_require_finite_counts_and_locates_nan_and_inf():
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[2, 0, 0] = np.nan
    array[3, 4, 5] = -np.inf
    with pytest.raises(DataError) as caught:
        require_finite(array, "sample.h5:/volumes/raw")
    message = str(caught.value)
    assert message.startswith("sample.h5:/volumes/raw: 2 NaN and 1 infinite value(s) among 120")
    assert "(1, 2, 3)" in message and "\n" not in message


# --- HDF5 files ------------------------------------------------------------------


def test_truncated_hdf5_is_one_line_naming_the_file(tmp_path):
    path = _truncated(tmp_path)
    for read in (lambda: open_volume(f"{path}:/{RAW}"), lambda: read_cremi(path)):
        with pytest.raises(DataError) as caught:
            read()
        message = str(caught.value)
        assert message.startswith(f"{path}: not a readable HDF5 file (truncated or corrupt?)")
        assert "truncated file" in message and "\n" not in message


def test_a_file_that_is_not_hdf5(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("not HDF5 at all")
    with pytest.raises(DataError, match="not a readable HDF5 file.*file signature not found"):
        open_volume(f"{path}:/{RAW}")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        open_volume(str(path))  # no dataset named: the listing needs the file open too


def test_corrupt_chunk_names_the_dataset_and_region(tmp_path):
    path = _corrupt_chunk(tmp_path)
    volume = open_volume(f"{path}:/{RAW}")  # the header is intact
    with pytest.raises(DataError) as caught:
        volume[0:2, 0:8, 0:8]
    message = str(caught.value)
    assert message.startswith(f"{path}:/{RAW}: cannot read region [[0, 2], [0, 8], [0, 8]]")
    assert "\n" not in message
    with pytest.raises(DataError, match=f"{path}: not a readable HDF5 file"):
        read_cremi(path)


def test_missing_dataset_lists_the_present_ones(tmp_path):
    path = _write_raw(tmp_path / "raw_only.h5", _raw())
    with pytest.raises(DataError, match=r"no dataset '/volumes/raww' .*\(datasets: /volumes/raw\)"):
        open_volume(f"{path}:/volumes/raww")


# --- Config checks -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "variant"), [(n, v) for n, variants in SHIPPED.items() for v in variants]
)
def test_every_shipped_config_passes(name, variant):
    config_checks.check_config(_config(name, variant))


def test_mirrored_constants_match_the_library():
    from synjax.data import intensity
    from synjax.inference import blockwise
    from synjax.inference import slicewise as predict
    from synjax.models import deepem3d, pruning, unet3d
    from synjax.targets import boundaries
    from synjax.train import state

    assert config_checks.common.OPTIMIZERS == state.OPTIMIZERS
    assert config_checks.common.SCHEDULES == state.SCHEDULES
    assert set(config_checks.partners.PADDINGS) == set(unet3d.PADDINGS)
    assert set(config_checks.common.EXECUTORS) == set(blockwise.EXECUTORS)
    assert set(config_checks.neurons.BOUNDARY_KERNELS) == set(boundaries.KERNELS)
    assert set(config_checks.neurons.MODEL_SLICES) == set(deepem3d.SUPPORTED_SLICES)
    assert config_checks.neurons.DEEPEM3D_STRIDE == deepem3d.TOTAL_STRIDE
    assert config_checks.neurons.TILE_OVERLAP == predict.DEFAULT_TILE_OVERLAP
    assert set(config_checks.neurons.ORIENTATIONS) == set(predict.ORIENTATIONS)
    assert config_checks.partners.PRUNER_CONVS == pruning.NUM_CONVS
    assert set(config_checks.common.INTENSITY_METHODS) == set(intensity.METHODS)
    assert set(config_checks.common.RESUME_MODES) == set(blockwise.RESUME_MODES)


def _edited(name: str, edit, variant: str = "smoke"):
    config = _config(name, variant)
    edit(config)
    return config


def _set(block_path: str, key: str, value):
    """An edit that sets `key` of the block at `block_path` ("" for the top level)."""

    def edit(config):
        block = config
        for part in filter(None, block_path.split(".")):
            block = block[int(part)] if part.isdigit() else block[part]
        block[key] = value

    return edit


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        # The example: a misspelt only_slices ran the model on every slice.
        (
            "snemi",
            _set("models.0", "only_slice", (1,)),
            "config.models[0]: unknown key 'only_slice' (known: blocks, dilations,",
        ),
        ("demo", _set("neurons.models.0", "widht", 0.5), "config.neurons.models[0]: unknown key"),
        ("demo", _set("candidates", "tauu", 0.3), "config.candidates: unknown key 'tauu'"),
        ("fib25", _set("watershed", "threshold", (0.5,)), "config.watershed: unknown key"),
        ("fib25", _set("data", "crop", None), "config.data: unknown key 'crop'"),
        ("cremi", _set("", "pruning", {}), "config: unknown key 'pruning'"),
    ],
)
def test_unknown_nested_key_is_named_with_its_block(name, edit, message):
    with pytest.raises(ConfigError) as caught:
        config_checks.check_config(_edited(name, edit))
    assert str(caught.value).startswith(message), str(caught.value)


def _delete(block_path: str, key: str):
    def edit(config):
        block = config
        for part in filter(None, block_path.split(".")):
            block = block[int(part)] if part.isdigit() else block[part]
        del block[key]

    return edit


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("demo", _delete("candidates", "omega"), "config.candidates: missing key 'omega'"),
        ("fib25", _delete("models.0", "kernel"), "config.models[0]: missing key 'kernel'"),
    ],
)
def test_missing_key_is_named(name, edit, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_checks.check_config(_edited(name, edit))


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        (
            "demo",
            _set("candidates", "tau", 1.5),
            "config.candidates.tau=1.5: expected a number in (0, 1)",
        ),
        (
            "demo",
            _set("candidates", "tau", 0.0),
            "config.candidates.tau=0.0: expected a number in (0, 1)",
        ),
        (
            "demo",
            _set("candidates", "omega", 0),
            "config.candidates.omega=0: expected an integer >= 1",
        ),
        (
            "demo",
            _set("train", "positive_fraction", 1.5),
            "config.train.positive_fraction=1.5: expected a number in [0, 1]",
        ),
        (
            "demo",
            _set("train", "learning_rate", -1e-3),
            "config.train.learning_rate=-0.001: expected a number > 0",
        ),
        ("demo", _set("train", "steps", 0), "config.train.steps=0: expected an integer >= 1"),
        (
            "demo",
            _set("train", "optimizer", "lamb"),
            "config.train.optimizer='lamb': expected one of",
        ),
        (
            "demo",
            _set("pruner", "window", (8, 32)),
            "config.pruner.window=(8, 32): expected 3 integers >= 1",
        ),
        ("demo", _set("unet", "padding", "same"), "config.unet.padding='same'"),
        ("demo", _set("predict", "executor", "spark"), "config.predict.executor='spark'"),
        ("demo", _set("data", "source", "zarr"), "config.data.source='zarr'"),
        ("demo", _set("neurons.watershed", "hs", (0.0,)), "config.neurons.watershed.hs=(0.0,)"),
        (
            "demo",
            _set("evaluation", "cremi_distance_nm", float("nan")),
            "config.evaluation.cremi_distance_nm=nan",
        ),
        (
            "fib25",
            _set("train", "patch_yx", 40),
            "config.train.patch_yx=40: expected a positive multiple of 16",
        ),
        (
            "fib25",
            _set("data", "train_z", (16, 8)),
            "config.data.train_z=(16, 8): expected None or (start, stop)",
        ),
        ("fib25", _set("data", "crop_yx", (0, 48, 0)), "config.data.crop_yx=(0, 48, 0)"),
        ("fib25", _set("watershed", "smoothing", "4d"), "config.watershed.smoothing='4d'"),
        (
            "fib25",
            _set("watershed", "thresholds", (0.5, 1.5)),
            "config.watershed.thresholds=(0.5, 1.5)",
        ),
        (
            "fib25",
            _set("predict", "orientations", ("z", "z")),
            "config.predict.orientations=('z', 'z')",
        ),
        (
            "snemi",
            _set("predict", "tta_transforms", 3),
            "config.predict.tta_transforms=3: expected one of [1, 2, 4, 8, 16]",
        ),
        ("snemi", _set("predict", "max_tile", 40), "config.predict.max_tile=40"),
        (
            "snemi",
            _set("models.0", "slices", 2),
            "config.models[0].slices=2: expected one of [1, 3, 5]",
        ),
        ("snemi", _set("models.0", "only_slices", (-1,)), "config.models[0].only_slices=(-1,)"),
        (
            "snemi",
            _set("models.0", "dilations", (1, 2)),
            "config.models[0].dilations=(1, 2): expected one or more odd integers",
        ),
        ("snemi", _set("", "seed", -1), "config.seed=-1: expected an integer >= 0"),
        (
            # fib25's model entries are plain dicts (snemi's are typed ConfigDicts,
            # which refuse a float seed themselves).
            "fib25",
            _set("models.0", "seed", 1.0),
            "config.models[0].seed=1.0: expected an integer >= 0",
        ),
    ],
)
def test_value_out_of_range_is_named(name, edit, message):
    with pytest.raises(ConfigError) as caught:
        config_checks.check_config(_edited(name, edit))
    assert str(caught.value).startswith(message), str(caught.value)


def _two_models(config):
    config.models = (config.models[0], dict(config.models[0]))


def _predicted_without_neurons(config):
    config.segmentation.source = "predicted"
    del config["neurons"]


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("fib25", _two_models, "config.models: name 's3_c3' is used twice"),
        (
            "fib25",
            _set("train", "warmup_steps", 2),
            "config.train.warmup_steps=2: expected fewer warm-up steps than "
            "config.models[0].steps=2",
        ),
        ("demo", _set("unet", "depth", 3), "config.unet.pool_factors has 2 entries"),
        ("demo", _set("pruner", "window", (1, 32, 32)), "config.pruner.window=(1, 32, 32)"),
        ("demo", _set("data", "shape", (0, 160, 160)), "config.data.shape=(0, 160, 160)"),
        ("demo", _predicted_without_neurons, "config: missing block 'neurons'"),
    ],
)
def test_keys_that_must_agree(name, edit, message):
    with pytest.raises(ConfigError) as caught:
        config_checks.check_config(_edited(name, edit))
    assert str(caught.value).startswith(message), str(caught.value)


def test_input_files_are_checked_before_the_run(tmp_path):
    config = _config("demo")
    config.data.source = "cremi"
    config.data.train_path = str(_write_raw(tmp_path / "train.h5", _raw()))
    config.data.test_path = str(tmp_path / "absent.h5")
    config.mode = "train"  # reads the training file only
    config_checks.check_input_files(config)
    config.mode = "all"
    with pytest.raises(DataError, match="config.data.test_path=.*absent.h5.*not found"):
        config_checks.check_input_files(config)
    config.data.test_path = str(_truncated(tmp_path))
    with pytest.raises(DataError, match="truncated.h5: not a readable HDF5 file"):
        config_checks.check_input_files(config)


# --- Through the command line --------------------------------------------------------

DEMO, FIB25 = str(CONFIGS / "demo.py"), str(CONFIGS / "fib25.py")


def _partner_args(path: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [
        f"--config={DEMO}:smoke",
        "--config.data.source=cremi",
        f"--config.data.train_path={path}",
        "--config.mode=train",
        f"--workdir={workdir}",
    ]


def _neuron_args(path: pathlib.Path, workdir: pathlib.Path) -> list[str]:
    return [
        f"--config={FIB25}:smoke",
        f"--config.data.train_path={path}",
        "--config.mode=train",
        f"--workdir={workdir}",
    ]


ROUTES = {"partners": _partner_args, "neurons": _neuron_args}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_cli_truncated_hdf5_is_the_only_line(tmp_path, route):
    # Found when the run opens its input files, before it logs anything.
    path = _truncated(tmp_path)
    result = _run(*ROUTES[route](path, tmp_path / "w"))
    assert result.returncode != 0
    line = _error_line(result)
    assert line.startswith(
        f"synjax: error: {path}: not a readable HDF5 file (truncated or corrupt?)"
    )


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_cli_corrupt_chunk_is_one_line(tmp_path, route):
    # The header opens; the damage is found when the raw is read, after the
    # run's first log line: with warnings only, the error is all of stderr.
    path = _corrupt_chunk(tmp_path)
    result = _run(*ROUTES[route](path, tmp_path / "w"), "--verbosity=-1")
    assert result.returncode != 0
    line = _error_line(result)
    assert str(path) in line and "truncated or corrupt" in line


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("verbosity", [None, "-1"])
def test_cli_nan_in_raw_names_file_dataset_and_voxel(tmp_path, route, verbosity):
    path = _nan_raw_file(tmp_path)
    args = ROUTES[route](path, tmp_path / "w")
    result = _run(*args, *([f"--verbosity={verbosity}"] if verbosity else []))
    assert result.returncode != 0
    if verbosity:
        line = _error_line(result)  # the only line on stderr
    else:
        # The run has logged its start; the error is still one line, no traceback.
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
        assert len(errors) == 1 and errors[0].startswith("synjax: error: "), result.stderr
        line = errors[0]
    assert f"{path}:/{RAW}: 1 NaN" in line and str(NAN_AT) in line


def test_cli_missing_dataset_lists_the_present_ones(tmp_path):
    path = _write_raw(tmp_path / "raw_only.h5", _raw())
    result = _run(*_neuron_args(path, tmp_path / "w"), "--config.data.raw_key=volumes/raww")
    assert result.returncode != 0
    line = _error_line(result)
    assert "'/volumes/raww'" in line and str(path) in line and "(datasets: /volumes/raw)" in line


def test_cli_test_file_is_checked_before_training(tmp_path):
    train = _write_raw(tmp_path / "train.h5", _raw())
    args = [a for a in _partner_args(train, tmp_path / "w") if a != "--config.mode=train"]
    result = _run(*args, f"--config.data.test_path={tmp_path / 'absent.h5'}")
    assert result.returncode != 0
    line = _error_line(result)  # nothing was trained or logged first
    assert "config.data.test_path" in line and "absent.h5" in line
    assert not (tmp_path / "w" / "checkpoints").exists()


BAD_CONFIG = """
import runpy


def get_config(arg=None):
    config = runpy.run_path({base!r})["get_config"]("smoke")
    {edit}
    return config
"""


@pytest.mark.parametrize(
    ("base", "edit", "message"),
    [
        (
            "snemi",
            'config.models[0]["only_slice"] = (1,)',
            "config.models[0]: unknown key 'only_slice'",
        ),
        (
            "demo",
            'config.neurons.models[0]["only_slice"] = (1,)',
            "config.neurons.models[0]: unknown key 'only_slice'",
        ),
        ("demo", "config.candidates.tauu = 0.3", "config.candidates: unknown key 'tauu'"),
    ],
)
def test_cli_unknown_key_in_a_config_file(tmp_path, base, edit, message):
    config_file = tmp_path / "bad_config.py"
    config_file.write_text(BAD_CONFIG.format(base=str(CONFIGS / f"{base}.py"), edit=edit))
    result = _run(f"--config={config_file}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0
    assert _error_line(result).startswith(f"synjax: error: {message}")


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        (
            f"{DEMO}:smoke",
            "--config.candidates.tau=1.5",
            "config.candidates.tau=1.5: expected a number in (0, 1)",
        ),
        (
            f"{FIB25}:smoke",
            "--config.train.patch_yx=40",
            "config.train.patch_yx=40: expected a positive multiple of 16",
        ),
    ],
)
def test_cli_value_out_of_range_before_anything_runs(tmp_path, config, override, message):
    result = _run(f"--config={config}", override, f"--workdir={tmp_path / 'w'}")
    assert result.returncode != 0
    assert _error_line(result).startswith(f"synjax: error: {message}")
    assert not (tmp_path / "w" / "checkpoints").exists()


# A U-Net small enough to compile in seconds; an enormous learning rate makes
# the second step's loss non-finite (the first is computed before any update).
TINY_UNET_BLOWS_UP = {
    ("train", "learning_rate"): 1e30,
    ("train", "schedule"): "constant",
    ("train", "warmup_steps"): 0,
    ("train", "steps"): 4,
    ("train", "log_every"): 1,
    ("train", "checkpoint_every"): 1,
    ("train", "batch_size"): 1,
    ("unet", "depth"): 1,
    ("unet", "pool_factors"): ((1, 2, 2),),
    ("unet", "conv_kernels"): ((1, 3, 3), (1, 3, 3)),
    ("unet", "base_features"): 2,
    ("unet", "train_output"): (2, 16, 16),
}


def test_cli_non_finite_loss_names_the_step_and_keeps_a_readable_checkpoint(tmp_path):
    workdir = tmp_path / "w"
    overrides = [
        f"--config.{block}.{key}={value if isinstance(value, str) else repr(value)}"
        for (block, key), value in TINY_UNET_BLOWS_UP.items()
    ]
    result = _run(
        f"--config={DEMO}:smoke",
        "--config.mode=train",
        *overrides,
        f"--workdir={workdir}",
        "--verbosity=-1",
    )
    assert result.returncode != 0
    line = _error_line(result)  # the only line on stderr
    match = re.search(
        r"training proximity: loss is (nan|inf|-inf) at step (\d+); "
        r"the last good checkpoint \(step (\d+)\) is kept",
        line,
    )
    assert match, line
    bad, kept = int(match.group(2)), int(match.group(3))
    # Checked and saved at every step: the step before the bad one is kept.
    assert bad >= 2 and kept == bad - 1
    steps = sorted(int(p.name) for p in (workdir / "checkpoints" / "proximity").glob("[0-9]*"))
    assert steps and steps[-1] == kept

    # The kept checkpoint restores, with finite parameters.
    import jax

    from synjax.stages import proximity

    config = _config("demo")
    for (block, key), value in TINY_UNET_BLOWS_UP.items():
        config[block][key] = value
    leaves = jax.tree.leaves(proximity.ProximityStage.from_config(config).load(workdir).params)
    assert leaves and all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
