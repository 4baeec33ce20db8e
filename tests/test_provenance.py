"""Provenance of cached outputs: fingerprints, checkpoint identity, and the
pipelines' refusal to reuse outputs made by another model or input."""

import importlib.util
import json
import pathlib
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from synjax.data.intensity import DTYPE_RANGE, IntensityNormalization, TrainedParams
from synjax.errors import DataError
from synjax.io import create_volume, open_volume
from synjax.io import provenance as prov
from synjax.io.provenance import (
    differences,
    input_fingerprint,
    model_provenance,
    params_fingerprint,
    sample_boxes,
)
from synjax.models.unet3d import UNet3D
from synjax.pipelines import neurons, partners
from synjax.report import files
from synjax.stages import proximity
from synjax.train.checkpoint import checkpoint_provenance
from synjax.train.loop import train
from synjax.train.settings import TrainSettings

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


# -------------------------------------------------------------- fingerprints


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "Conv_0": {"kernel": rng.random((2, 3), np.float32), "bias": np.zeros(3, np.float32)},
        "Dense_0": {"kernel": rng.random((3, 1), np.float32)},
    }


def test_params_fingerprint_depends_on_values_not_containers():
    params = _params()
    reordered = {
        "Dense_0": {"kernel": jnp.asarray(params["Dense_0"]["kernel"])},
        "Conv_0": FrozenDict(
            bias=jnp.asarray(params["Conv_0"]["bias"]),
            kernel=jnp.asarray(params["Conv_0"]["kernel"]),
        ),
    }
    assert params_fingerprint(reordered) == params_fingerprint(params)
    assert len(params_fingerprint(params)) == 2 * prov.DIGEST_BYTES

    def changed(edit):
        copy = jax.tree.map(np.copy, params)
        edit(copy)
        return params_fingerprint(copy)

    kernel = params["Conv_0"]["kernel"]
    one_ulp = changed(
        lambda p: p["Conv_0"]["kernel"].__setitem__((0, 0), np.nextafter(kernel[0, 0], 2))
    )
    renamed = changed(lambda p: p.__setitem__("Conv_1", p.pop("Conv_0")))
    reshaped = changed(lambda p: p["Conv_0"].__setitem__("kernel", kernel.reshape(3, 2)))
    narrower = changed(lambda p: p["Conv_0"].__setitem__("bias", np.zeros(3, np.float16)))
    found = {params_fingerprint(params), one_ulp, renamed, reshaped, narrower}
    assert len(found) == 5, "each change must give its own fingerprint"


def test_sample_boxes_by_hand():
    boxes = sample_boxes((100, 10, 200), count=3, edge=64)
    # First and last corners; y is shorter than the edge, so it is read whole.
    assert boxes[0] == (slice(0, 64), slice(0, 10), slice(0, 64))
    assert boxes[1] == (slice(36, 100), slice(0, 10), slice(136, 200))
    for box in boxes:
        assert [b.stop - b.start for b in box] == [64, 10, 64]
        assert all(0 <= b.start and b.stop <= s for b, s in zip(box, (100, 10, 200), strict=True))
    assert sample_boxes((100, 10, 200), count=3, edge=64) == boxes


class _Recording:
    def __init__(self, array):
        self.array, self.reads = array, []

    shape = property(lambda self: self.array.shape)
    dtype = property(lambda self: self.array.dtype)

    def __getitem__(self, box):
        self.reads.append(box)
        return self.array[box]


def test_small_inputs_are_hashed_whole(tmp_path):
    raw = np.random.default_rng(0).integers(0, 255, (6, 20, 30), dtype=np.uint8)
    found = input_fingerprint(raw, path=tmp_path / "a.h5", dataset="volumes/raw")
    assert found["path"] == str(tmp_path / "a.h5") and found["dataset"] == "volumes/raw"
    assert (found["shape"], found["dtype"], found["sampled"]) == ([6, 20, 30], "uint8", False)
    edited = raw.copy()
    edited[3, 11, 17] ^= 1  # one voxel anywhere is enough
    assert input_fingerprint(edited)["fingerprint"] != found["fingerprint"]
    wider = raw.astype(np.uint16)  # same values, another dtype
    assert input_fingerprint(wider)["fingerprint"] != found["fingerprint"]
    # The same content in a zarr volume: the same fingerprint.
    stored = create_volume(str(tmp_path / "raw.zarr"), raw.shape, np.uint8, chunks=(3, 10, 10))
    stored[...] = raw
    assert input_fingerprint(stored)["fingerprint"] == found["fingerprint"]


def test_large_inputs_read_only_sampled_boxes(monkeypatch):
    monkeypatch.setattr(prov, "FULL_HASH_BYTES", 1000)
    raw = np.random.default_rng(1).integers(0, 255, (40, 300, 300), dtype=np.uint8)
    volume = _Recording(raw)
    found = input_fingerprint(volume)
    assert found["sampled"]
    assert volume.reads == sample_boxes(raw.shape)
    read = sum(int(np.prod([b.stop - b.start for b in box])) for box in volume.reads)
    assert read == prov.SAMPLE_COUNT * 40 * 64 * 64 < raw.size
    covered = np.zeros(raw.shape, bool)
    for box in volume.reads:
        covered[box] = True
    inside, outside = raw.copy(), raw.copy()
    inside[0, 0, 0] ^= 1
    outside[tuple(np.argwhere(~covered)[0])] ^= 1
    assert input_fingerprint(inside)["fingerprint"] != found["fingerprint"]
    # The documented trade-off: a change outside every sampled box goes unseen.
    assert input_fingerprint(outside)["fingerprint"] == found["fingerprint"]


def test_differences_by_hand():
    recorded = {"model": {"name": "u", "step": 8}, "input": {"shape": [2, 3], "path": "/a"}}
    current = {"model": {"name": "u", "step": 16}, "input": {"shape": (2, 3), "dtype": "uint8"}}
    assert differences(recorded, current) == [
        "input.dtype: not recorded -> 'uint8'",
        "input.path: '/a' -> not given",
        "model.step: 8 -> 16",
    ]
    assert differences(recorded, json.loads(json.dumps(recorded))) == []
    assert differences(None, {"a": 1}) == ["provenance: None -> {'a': 1}"]


# --------------------------------------------------------------- checkpoints


class _TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (1, 3, 3), padding="SAME")(x)


def _loss(outputs, batch):
    return jnp.mean((outputs - batch["target"]) ** 2), {}


def _batch(step):
    rng = np.random.default_rng([5, step])
    return {
        "input": rng.random((2, 1, 4, 4, 1), dtype=np.float32),
        "target": rng.random((2, 1, 4, 4, 2), dtype=np.float32),
    }


def _train_tiny(workdir, name, steps):
    settings = TrainSettings(
        steps=steps,
        batch_size=2,
        learning_rate=1e-2,
        schedule="constant",
        warmup_steps=0,
        log_every=0,
        checkpoint_every=2,
        keep_checkpoints=2,
        num_devices=2,
    )
    return train(_TinyNet(), _loss, _batch, settings, workdir, name)


def test_checkpoint_provenance_names_step_and_parameters(tmp_path):
    # Saved from a 2-device mesh, read onto one device: the hash of the same values.
    params = jax.device_get(_train_tiny(tmp_path, "tiny", 2).params)
    assert checkpoint_provenance(tmp_path, "tiny") == model_provenance("tiny", 2, params)
    longer = _train_tiny(tmp_path, "tiny", 4)  # "retrain with more steps"
    after = checkpoint_provenance(tmp_path, "tiny")
    assert after == model_provenance("tiny", 4, jax.device_get(longer.params))
    assert after["params_hash"] != params_fingerprint(params)
    assert checkpoint_provenance(tmp_path, "tiny", step=2) == model_provenance("tiny", 2, params)
    with pytest.raises(DataError, match="no checkpoints for model 'absent'"):
        checkpoint_provenance(tmp_path, "absent")
    with pytest.raises(DataError, match="no checkpoint at step 3"):
        checkpoint_provenance(tmp_path, "tiny", step=3)


def test_watershed_tuned_for_other_checkpoints_is_refused(tmp_path):
    workdir = tmp_path
    _train_tiny(workdir, "tiny", 2)
    config = types.SimpleNamespace(models=[{"name": "tiny"}])
    tuned = {neurons.OURS: {"sigma": 1.0, "h": 0.1, "threshold": None}}
    files.write_json(workdir / neurons.WATERSHED_FILE, tuned)
    with pytest.raises(DataError, match="records no model provenance; retrain"):
        neurons._read_tuned(config, workdir)
    files.write_json(
        workdir / neurons.WATERSHED_FILE,
        tuned | {"provenance": {"models": neurons._models(config, workdir)}},
    )
    assert neurons._read_tuned(config, workdir)[neurons.OURS] == tuned[neurons.OURS]
    _train_tiny(workdir, "tiny", 4)
    with pytest.raises(DataError) as error:
        neurons.segment_with_trained_models(config, workdir, np.zeros((3, 16, 16), np.uint8))
    message = str(error.value)
    assert "was tuned for tiny step 2" in message and "now tiny step 4" in message
    assert message.endswith("retrain (mode=train)") and "\n" not in message


def test_pruner_threshold_chosen_for_other_models_is_refused(tmp_path):
    unet_then = model_provenance(proximity.MODEL_NAME, 8, _params(0))
    choice = {"pruner": False, "threshold": 0.5, "provenance": {"proximity": unet_then}}
    partners._check_threshold(tmp_path, choice, unet_then, None)  # the same: accepted
    unet_now = model_provenance(proximity.MODEL_NAME, 16, _params(1))
    with pytest.raises(DataError) as error:
        partners._check_threshold(tmp_path, choice, unet_now, None)
    message = str(error.value)
    assert "chosen for proximity step 8" in message and "now proximity step 16" in message
    assert "retrain (mode=train)" in message
    with pytest.raises(DataError, match="records no model provenance"):
        partners._check_threshold(tmp_path, {"pruner": False}, unet_now, None)
    with pytest.raises(DataError, match="train mode first"):
        partners._read_threshold(tmp_path)


# ------------------------------------------------- block-wise proximity outputs


def _demo_config():
    spec = importlib.util.spec_from_file_location("config_demo", CONFIGS / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    # The smallest U-Net (one pooling), so that compiling it is cheap.
    config.unet.depth = 1
    config.unet.pool_factors = ((1, 2, 2),)
    config.unet.conv_kernels = ((1, 3, 3), (1, 3, 3))
    config.unet.base_features = 2
    config.unet.predict_output = (4, 16, 16)
    config.unet.predict_context = (1, 4, 4)
    return config


@pytest.fixture()
def fast_compile():
    # Compilation dominates these tiny predictions; the values only need to be consistent.
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture()
def summaries(monkeypatch):
    """The `BlockwiseSummary` of every block-wise run of `predict_proximity`."""
    found = []
    real = proximity.predict_blockwise

    def spy(*args, **kwargs):
        found.append(real(*args, **kwargs))
        return found[-1]

    monkeypatch.setattr(proximity, "predict_blockwise", spy)
    return found


def test_predict_proximity_redoes_outputs_of_another_model_or_input(
    tmp_path, summaries, fast_compile
):
    config = _demo_config()
    assert config.predict.resume == "auto"
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 255, (8, 32, 32), dtype=np.uint8)
    other_raw = rng.integers(0, 255, raw.shape, dtype=np.uint8)  # same shape, other "file"
    model = UNet3D(proximity.ProximityStage.from_config(config).unet_settings())
    sample = jnp.zeros((1, 6, 24, 24, 1))
    trained = model.init(jax.random.key(0), sample)["params"]
    retrained = model.init(jax.random.key(1), sample)["params"]  # "trained further"
    dest = tmp_path / "predictions" / "proximity.zarr"
    source = {"input_path": tmp_path / "sample_A.h5", "input_dataset": "volumes/raw"}

    def predict(params, volume, step, path=dest, intensity=DTYPE_RANGE, **overrides):
        return proximity.ProximityStage.from_config(config).predict(
            TrainedParams(params, intensity),
            volume,
            path,
            (40.0, 4.0, 4.0),
            step=step,
            **(source | overrides),
        )

    first = predict(trained, raw, 8)
    blocks = summaries[-1].total
    assert blocks == 8 and summaries[-1].computed == blocks
    # Unchanged: every block is skipped and the output is the same.
    np.testing.assert_array_equal(predict(trained, raw, 8), first)
    assert (summaries[-1].skipped, summaries[-1].computed) == (blocks, 0)

    # Retrained: every block is predicted again, as a fresh run would.
    second = predict(retrained, raw, 16)
    assert summaries[-1].computed == blocks
    assert not np.allclose(second, first)
    fresh = predict(retrained, raw, 16, path=tmp_path / "fresh" / "p.zarr")
    np.testing.assert_array_equal(second, fresh)

    # Another test file of the same shape.
    third = predict(retrained, other_raw, 16, input_path=tmp_path / "sample_B.h5")
    assert summaries[-1].computed == blocks
    assert not np.allclose(third, second)

    # strict: the difference is named, nothing is overwritten.
    config.predict.resume = "strict"
    with pytest.raises(DataError) as error:
        predict(trained, other_raw, 8, input_path=tmp_path / "sample_B.h5")
    message = str(error.value)
    assert "model.step: 16 -> 8" in message and "model.params_hash" in message
    assert "input" not in message.split("(", 1)[1].split(")")[0]
    assert "config.predict.resume=strict" in message and "\n" not in message
    np.testing.assert_array_equal(open_volume(str(dest)).read(), third)
    # strict with nothing changed resumes as usual.
    predict(retrained, other_raw, 16, input_path=tmp_path / "sample_B.h5")
    assert summaries[-1].computed == 0
    # Another input scaling is another model: named, not reused.
    percentiles = IntensityNormalization("percentiles", 1.0, 99.0, low=10.0, high=200.0)
    with pytest.raises(DataError, match="model.intensity"):
        predict(
            retrained, other_raw, 16, input_path=tmp_path / "sample_B.h5", intensity=percentiles
        )
