"""Predicting a user's volume with a trained run: `config.predict.input`, `.output`, `.roi`.

The models are trained here for a step or two (their values do not matter,
only that prediction uses them); the predictions of a user's volume are
compared with the stages' whole-volume prediction of the same array.
"""

import importlib.util
import json
import os
import subprocess
import sys

import h5py
import jax
import numpy as np
import pytest

from synjax import pipelines
from synjax.errors import ConfigError, DataError
from synjax.inference.blockwise import BlockError
from synjax.io import create_volume, open_volume
from synjax.pipelines import neuron_volume, neurons, partner_data, volume_input
from synjax.stages.boundary_models import BoundaryEnsembleStage
from synjax.stages.proximity import ProximityStage
from tests.conftest import REPO_ROOT

DEMO = REPO_ROOT / "configs" / "demo.py"
RESOLUTION = (40.0, 4.0, 4.0)


@pytest.fixture(scope="module", autouse=True)
def _fast_compile():
    # Module scope: set before the module's trained runs, the slowest compilations here.
    jax.config.update("jax_disable_most_optimizations", True)


def _load_config(path, variant=None):
    spec = importlib.util.spec_from_file_location(path.stem + "_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _demo_smoke():
    return _load_config(DEMO, "smoke")


def _raw(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _zarr(path, array, resolution=RESOLUTION):
    volume = create_volume(str(path), array.shape, array.dtype, resolution=resolution)
    volume[...] = array
    return str(path)


# ---------------------------------------------------------------- roi syntax


def test_roi_parsing_by_hand_and_its_errors():
    roi = volume_input.parse_roi("2:5, :30 ,10:", (8, 40, 50))
    assert (roi.start, roi.stop) == ((2, 0, 10), (5, 30, 50))
    assert volume_input.parse_roi("", (8, 40, 50)).shape == (8, 40, 50)
    with pytest.raises(ConfigError, match=r"config.predict.roi='1:2,3:4': expected three ranges"):
        volume_input.parse_roi("1:2,3:4", (8, 40, 50))
    with pytest.raises(ConfigError, match="range '5:5' is empty"):
        volume_input.parse_roi("5:5,:,:", (8, 40, 50))
    with pytest.raises(DataError, match=r"leaves the input volume of shape \(8, 40, 50\)"):
        volume_input.parse_roi("0:9,:,:", (8, 40, 50))


# ------------------------------------------------------------ partner pipeline


@pytest.fixture(scope="module")
def partner_run(tmp_path_factory):
    """A workdir with a U-Net trained for 2 steps on the smoke demo's volume."""
    workdir = tmp_path_factory.mktemp("partner_run")
    config = _demo_smoke()
    config.data.shape = (12, 96, 96)
    config.data.n_synapses = 2
    # The tests' mesh has 8 CPU devices: one small patch each.
    config.train.update(steps=2, warmup_steps=1, log_every=1, checkpoint_every=2, batch_size=8)
    config.unet.train_output = (4, 16, 16)
    config.unet.predict_output = (4, 32, 32)
    config.unet.predict_context = (2, 16, 16)
    volume = partner_data.load_volume(config, "train")
    ProximityStage.from_config(config).train(
        [partner_data.proximity_targets(volume, config)], workdir
    )
    return config, workdir


def test_partner_prediction_of_a_user_volume_and_its_region(partner_run, tmp_path):
    config, workdir = partner_run
    raw = _raw((10, 70, 90))
    stage = ProximityStage.from_config(config)
    trained = stage.load(workdir)
    whole = stage.predict(trained, raw, tmp_path / "whole.zarr", RESOLUTION)
    assert np.ptp(whole) > 0

    config.mode = "predict"
    config.predict.input = _zarr(tmp_path / "user.zarr", raw)
    config.predict.output = str(tmp_path / "out")
    pipelines.run(config, workdir)
    got = open_volume(str(tmp_path / "out" / "proximity.zarr"))
    np.testing.assert_allclose(got.read(), whole, rtol=1e-5, atol=1e-6)
    assert got.resolution == RESOLUTION
    assert (tmp_path / "out" / "proximity.zarr.blocks" / "done.zarr").is_dir()

    # A region starting on the block grid, read with its real context around it,
    # gives the whole volume's values there; from an HDF5 dataset this time.
    with h5py.File(tmp_path / "user.h5", "w") as f:
        f.create_dataset("em/raw", data=raw).attrs["resolution"] = RESOLUTION
    config.predict.input = f"{tmp_path / 'user.h5'}:/em/raw"
    config.predict.output = str(tmp_path / "region")
    config.predict.roi = "4:8,32:64,0:64"
    pipelines.run(config, workdir)
    region = open_volume(str(tmp_path / "region" / "proximity.zarr"))
    assert region.shape == (4, 32, 64)
    np.testing.assert_allclose(region.read(), whole[4:8, 32:64, 0:64], rtol=1e-5, atol=1e-6)
    assert region.offset == (4 * 40.0, 32 * 4.0, 0.0)


def test_partner_prediction_on_a_dask_scheduler_from_the_config(partner_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    config, workdir = partner_run
    raw = _raw((6, 40, 50), seed=3)
    stage = ProximityStage.from_config(config)
    local = stage.predict(stage.load(workdir), raw, tmp_path / "local.zarr", RESOLUTION)
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        config.mode = "predict"
        config.predict.update(
            input=_zarr(tmp_path / "user.zarr", raw),
            output=str(tmp_path / "out"),
            roi="",
            executor="dask",
            scheduler=cluster.scheduler_address,
        )
        try:
            pipelines.run(config, workdir)
        finally:
            config.predict.update(executor="local", scheduler="")
    got = open_volume(str(tmp_path / "out" / "proximity.zarr")).read()
    np.testing.assert_allclose(got, local, rtol=1e-5, atol=1e-6)


def test_a_failing_block_stops_the_run_naming_it_and_keeps_the_others(
    partner_run, tmp_path, monkeypatch
):
    from synjax.stages import proximity

    config, workdir = partner_run
    raw = _raw((8, 64, 64), seed=4) // 2  # 0..127, and one voxel of 255
    raw[4, 32, 40] = 255
    real = proximity.block_fn_of
    attempts = []

    def failing(settings, params, crop):
        fn = real(settings, params, crop)

        def block_fn(batch):  # normalised raw: 255 -> 1.0, in the block's own core
            if np.any(batch[(slice(None), *crop[1:])] == 1.0):
                attempts.append(1)
                raise RuntimeError("device lost")
            return fn(batch)

        return block_fn

    monkeypatch.setattr(proximity, "block_fn_of", failing)
    config.mode = "predict"
    config.predict.update(
        input=_zarr(tmp_path / "user.zarr", raw), output=str(tmp_path / "out"), roi="", retries=2
    )
    with pytest.raises(BlockError) as error:
        pipelines.run(config, workdir)
    # Grid (2, 2, 2) of (4, 32, 32) blocks; z 4, y 32, x 40 lies in index (1, 1, 1) = id 7.
    assert str(error.value) == (
        "computing of block 7 (index (1, 1, 1), voxels [4:8, 32:64, 32:64]) failed 3 time(s): "
        "RuntimeError: device lost"
    )
    assert len(attempts) == 3
    done = open_volume(str(tmp_path / "out" / "proximity.zarr.blocks" / "done.zarr")).read()
    assert done.reshape(-1).tolist() == [1] * 7 + [0]
    config.predict.retries = 2


# ------------------------------------------------------------- neuron pipeline


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    """A workdir with the smoke demo's DeepEM3D net trained for 2 steps and 'tuned'."""
    workdir = tmp_path_factory.mktemp("neuron_run")
    config = _demo_smoke().neurons
    config.models = ({**config.models[0], "steps": 2},)
    config.train.update(warmup_steps=1, log_every=1, checkpoint_every=2, batch_size=8, patch_yx=32)
    config.predict.orientations = ("z", "y")
    raw = _raw((8, 64, 64), seed=5)
    labels = np.repeat(np.arange(4, dtype=np.uint32), 16)[None, None, :] * np.ones(
        (8, 64, 1), np.uint32
    )
    BoundaryEnsembleStage.from_config(config).train(raw, labels, workdir)
    # Stands for a tuning run: the parameters and the models they were tuned for.
    chosen = {"sigma": 1.0, "h": 0.2, "threshold": None}
    (workdir / "watershed.json").write_text(
        json.dumps({"deepem3d": chosen, "provenance": {"models": neurons._models(config, workdir)}})
    )
    return config, workdir


def test_neuron_prediction_of_a_user_volume_equals_the_whole_volume(neuron_run, tmp_path):
    config, workdir = neuron_run
    raw = _raw((9, 40, 50), seed=6)
    whole = BoundaryEnsembleStage.from_config(config).predict(workdir, raw, slice_lists=False)
    with config.unlocked():
        config.predict.update(
            input=_zarr(tmp_path / "user.zarr", raw),
            output=str(tmp_path / "out"),
            roi="",
            slab_depth=4,
            resume="auto",
            retries=0,
        )
    out = neuron_volume.predict_volume(config, workdir).boundaries
    np.testing.assert_allclose(open_volume(str(out)).read(), whole, rtol=1e-5, atol=1e-6)
    for orientation in ("z", "y"):
        assert (tmp_path / "out" / f"boundaries_deepem3d_s3_{orientation}.zarr").is_dir()


def test_neuron_prediction_on_a_dask_cluster_equals_local(neuron_run, tmp_path):
    distributed = pytest.importorskip("distributed")
    config, workdir = neuron_run
    raw = _raw((6, 32, 40), seed=7)
    whole = BoundaryEnsembleStage.from_config(config).predict(workdir, raw, slice_lists=False)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        config.unlocked(),
    ):
        config.predict.update(
            input=_zarr(tmp_path / "user.zarr", raw),
            output=str(tmp_path / "out"),
            roi="",
            slab_depth=2,
            resume="auto",
            retries=0,
            executor="dask",
            scheduler=cluster.scheduler_address,
        )
        try:
            out = neuron_volume.predict_volume(config, workdir).boundaries
        finally:
            config.predict.update(executor="local", scheduler="")
    np.testing.assert_allclose(open_volume(str(out)).read(), whole, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- bad input, CLI


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "synjax.main",
            f"--config={DEMO}:smoke",
            "--config.mode=predict",
            *args,
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_line(result):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("synjax: error: "), result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "input_name,roi,expected",
    [
        ("missing.zarr", "", "config.predict.input='{tmp}/missing.zarr'"),
        ("user.h5:/no/such", "", "/no/such"),
        ("user.zarr", "0:4,0:9", "config.predict.roi='0:4,0:9': expected three ranges"),
        ("user.zarr", "0:99,:,:", "config.predict.roi='0:99,:,:' leaves the input volume"),
    ],
)
def test_bad_input_path_dataset_or_roi_is_one_line(tmp_path, input_name, roi, expected):
    raw = _raw((6, 20, 20))
    _zarr(tmp_path / "user.zarr", raw)
    with h5py.File(tmp_path / "user.h5", "w") as f:
        f.create_dataset("raw", data=raw)
    result = _cli(
        f"--workdir={tmp_path / 'run'}",
        f"--config.predict.input={tmp_path / input_name}",
        f"--config.predict.output={tmp_path / 'out'}",
        f"--config.predict.roi={roi}",
    )
    assert expected.format(tmp=tmp_path) in _error_line(result)


@pytest.mark.parametrize(
    "key,value,expected",
    [
        ("roi", "0:4;0:9", "config.predict.roi='0:4;0:9': expected three ranges"),
        ("retries", -1, "config.predict.retries=-1: expected"),
        ("input", "x.zarr", "config.predict.output is empty"),
    ],
)
def test_config_checks_of_the_predict_keys(key, value, expected):
    from synjax.pipelines import config_checks

    config = _demo_smoke()
    config.predict[key] = value
    with pytest.raises(ConfigError) as error:
        config_checks.check_config(config)
    assert expected in str(error.value)
    # The neuron pipeline's prediction block has the same keys and rules.
    neuron = _load_config(REPO_ROOT / "configs" / "fib25.py")
    neuron.predict[key] = value
    with pytest.raises(ConfigError) as error:
        config_checks.check_config(neuron)
    assert expected in str(error.value)


def test_a_workdir_without_trained_models_is_named(tmp_path):
    config = _demo_smoke()
    config.mode = "predict"
    config.predict.update(
        input=_zarr(tmp_path / "user.zarr", _raw((4, 16, 16))), output=str(tmp_path / "out")
    )
    with pytest.raises(DataError, match=r"checkpoints/proximity"):
        pipelines.run(config, tmp_path / "untrained")
    config.mode = "all"
    with pytest.raises(ConfigError, match="config.predict.input is set with config.mode='all'"):
        pipelines.run(config, tmp_path / "untrained")
