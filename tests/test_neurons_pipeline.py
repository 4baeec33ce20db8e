"""The neuron pipeline (DeepEM3D) end to end on a crop of the real FIB-25 volume,
the SNEMI3D config's missing-file error, and BatchNorm state in the train loop."""

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax import pipelines
from synjax.errors import DataError
from synjax.io import open_volume
from synjax.pipelines import neurons
from synjax.train.checkpoint import latest_step, restore_variables
from synjax.train.loop import train
from synjax.train.settings import TrainSettings

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _load_config(name: str, variant: str | None = None):
    spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, shared_data):
    # Compilation dominates this tiny run; the numbers only need to exist.
    jax.config.update("jax_disable_most_optimizations", True)
    config = _load_config("fib25", "smoke")
    assert pathlib.Path(config.data.train_path) == shared_data / "fib-medulla-250.h5"
    workdir = tmp_path_factory.mktemp("fib25_smoke")
    metrics = pipelines.run(config, workdir)
    yield config, workdir, metrics
    jax.config.update("jax_disable_most_optimizations", False)


def test_fib25_smoke_end_to_end(smoke_run):
    config, workdir, metrics = smoke_run
    test_shape = (
        config.data.test_z[1] - config.data.test_z[0],
        config.data.crop_yx[1] - config.data.crop_yx[0],
        config.data.crop_yx[3] - config.data.crop_yx[2],
    )
    boundary = open_volume(str(workdir / neurons.BOUNDARIES)).read()
    seg = open_volume(str(workdir / neurons.SEGMENTATION)).read()
    assert boundary.shape == seg.shape == test_shape
    assert boundary.dtype == np.float32 and 0.0 <= boundary.min() <= boundary.max() <= 1.0
    assert seg.dtype == np.uint64 and seg.max() >= 1

    written = neurons.files.read_json(workdir / "metrics.json")
    for method in (neurons.OURS, neurons.OURS_WATERSHED_ONLY, neurons.OVERSEG, neurons.CLASSICAL):
        scores = written[method]
        assert 0.0 <= scores["adapted_rand_error"] <= 1.0
        assert scores["voi"] == pytest.approx(scores["voi_split"] + scores["voi_merge"])
        assert scores == metrics[method]
    assert (workdir / "example_slices.png").stat().st_size > 0
    chosen = neurons.files.read_json(workdir / neurons.WATERSHED_FILE)
    assert chosen[neurons.OURS]["sigma"] in config.watershed.sigmas
    assert chosen[neurons.OURS]["threshold"] in config.watershed.thresholds
    # Agglomeration only merges: never more segments than the watershed it starts from.
    over = open_volume(str(workdir / neurons.WATERSHED_ONLY)).read()
    assert written[neurons.OURS]["segments"] <= written[neurons.OURS_WATERSHED_ONLY]["segments"]
    assert over.shape == seg.shape
    assert chosen[neurons.CLASSICAL]["h"] in config.baseline.hs
    assert latest_step(workdir, config.models[0]["name"]) == config.models[0]["steps"]


def test_segment_with_trained_models(smoke_run):
    config, workdir, _ = smoke_run
    # Not a multiple of 16 in y or x: the predictor pads and crops back.
    raw = np.random.default_rng(0).integers(0, 255, (5, 40, 36), dtype=np.uint8)
    seg = neurons.segment_with_trained_models(config, workdir, raw)
    assert seg.shape == raw.shape and seg.dtype == np.uint64
    assert seg.min() >= 1  # the watershed floods every voxel


def test_snemi_missing_file_names_dataset_key_and_source(tmp_path):
    config = _load_config("snemi")
    config.data.train_path = str(tmp_path / "train-input.tif")
    with pytest.raises(DataError) as error:
        pipelines.run(config, tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "SNEMI3D" in message and "config.data.train_path" in message
    assert "brainiac2.mit.edu/SNEMI3D" in message
    # The paper's final ensemble: three 2D nets and one 5-slice net.
    assert len(config.models) == 4 and sorted(m["slices"] for m in config.models) == [1, 1, 1, 5]


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(2, (1, 3, 3), padding="SAME")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


def _loss(outputs, batch):
    return jnp.mean((outputs - batch["target"]) ** 2), {}


def _batch(step):
    rng = np.random.default_rng([3, step])
    return {
        "input": rng.normal(2.0, 3.0, (4, 1, 6, 6, 1)).astype(np.float32),
        "target": rng.random((4, 1, 6, 6, 2), dtype=np.float32),
    }


def _settings(steps):
    return TrainSettings(
        steps=steps,
        batch_size=4,
        learning_rate=1e-2,
        log_every=0,
        checkpoint_every=2,
        num_devices=1,
    )


def test_batchnorm_model_trains_and_resumes(tmp_path):
    straight = train(_BatchNormNet(), _loss, _batch, _settings(4), tmp_path / "a")
    # The running mean moves from its initial 0 towards the batches' statistics.
    mean = np.asarray(straight.batch_stats["BatchNorm_0"]["mean"])
    assert np.abs(mean).max() > 0.1

    train(_BatchNormNet(), _loss, _batch, _settings(2), tmp_path / "b")
    resumed = train(_BatchNormNet(), _loss, _batch, _settings(4), tmp_path / "b")
    for a, b in zip(
        jax.tree.leaves((straight.params, straight.batch_stats)),
        jax.tree.leaves((resumed.params, resumed.batch_stats)),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)

    variables = restore_variables(tmp_path / "b", "model", _BatchNormNet(), _batch(0)["input"])
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(
        np.asarray(variables["batch_stats"]["BatchNorm_0"]["var"]),
        np.asarray(straight.batch_stats["BatchNorm_0"]["var"]),
    )
