"""The proximity U-Net stage: its intensity normalisation from training to prediction."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from synjax.data.intensity import INTENSITY_FILE, IntensityNormalization, TrainedParams
from synjax.models.unet3d import UNet3D
from synjax.stages import proximity

SHAPE = (4, 24, 24)


@pytest.fixture(autouse=True)
def _fast_compile():
    """Tiny networks: XLA's optimisations cost more than they save."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


def _config(method: str = "dtype"):
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "data": {"intensity": {"method": method, "low_percent": 5.0, "high_percent": 95.0}},
            "unet": {
                "depth": 1,
                "base_features": 2,
                "feature_growth": 2,
                "pool_factors": ((1, 2, 2),),
                "conv_kernels": ((1, 3, 3), (1, 3, 3)),
                "padding": "SAME",
                "train_output": (2, 8, 8),
                "predict_output": (4, 16, 16),
                "predict_context": (0, 4, 4),
            },
            "train": {
                "steps": 1,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "positive_fraction": 0.5,
                "num_devices": 1,
            },
            "predict": {"batch_size": 1, "executor": "local"},
        }
    )


def _raw():
    return np.random.default_rng(3).integers(0, 256, SHAPE, dtype=np.uint8)


def _random_params(config):
    model = UNet3D(proximity.ProximityStage.from_config(config).unet_settings())
    x = jnp.zeros((1, 2, 16, 16, 1))
    return jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]


def _predict(config, trained, raw, path):
    return proximity.ProximityStage.from_config(config).predict(
        trained, raw, path, (40.0, 4.0, 4.0)
    )


def test_predictions_identical_for_uint16_and_float_copies(tmp_path):
    config = _config()
    raw = _raw()
    trained = TrainedParams(_random_params(config), IntensityNormalization())
    copies = {
        "uint8": raw,
        "uint16": raw.astype(np.uint16) * 257,
        "float32": raw.astype(np.float32) / np.float32(255),
    }
    got = {
        dtype: _predict(config, trained, copy, tmp_path / f"{dtype}.zarr")
        for dtype, copy in copies.items()
    }
    assert got["uint8"].shape == SHAPE and np.ptp(got["uint8"]) > 0
    for dtype in ("uint16", "float32"):
        np.testing.assert_array_equal(got[dtype], got["uint8"])
    with pytest.raises(TypeError, match="TrainedParams"):
        _predict(config, trained.params, raw, tmp_path / "bare.zarr")


def test_training_saves_percentiles_that_prediction_reapplies(tmp_path, monkeypatch):
    config = _config("percentiles")
    raw = _raw()
    synaptic = np.zeros(SHAPE, bool)
    synaptic[2, 12, 12] = True
    source = {
        "raw": raw,
        "target": np.zeros(SHAPE, np.float32),
        "weight": np.ones(SHAPE, np.float32),
        "synaptic": synaptic,
    }
    batches, samplers = [], []

    class RecordingSampler(proximity.PatchSampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            samplers.append(self)

    class FakeState:
        params = _random_params(config)

    def fake_train(model, loss, batch_fn, settings, workdir, name):
        # The optimisation is the train loop's business; here only what it is fed.
        batches.append(batch_fn(0))
        return FakeState()

    monkeypatch.setattr(proximity, "train", fake_train)
    monkeypatch.setattr(proximity, "PatchSampler", RecordingSampler)
    trained = proximity.ProximityStage.from_config(config).train([source], tmp_path)
    low, high = np.percentile(raw, [5.0, 95.0], method="nearest")
    assert trained.intensity == IntensityNormalization("percentiles", 5.0, 95.0, low, high)
    saved = tmp_path / "checkpoints" / proximity.MODEL_NAME / INTENSITY_FILE
    assert IntensityNormalization.from_dict(json.loads(saved.read_text())) == trained.intensity
    # The training patches were drawn with the same (saved) normalisation.
    assert [s.intensity for s in samplers] == [trained.intensity]
    assert batches[0]["input"].shape == (2, 2, 8, 8, 1)
    # Prediction applies the saved percentiles: a uint16 copy, read against
    # them, is another input; the uint8 volume gives what the normalised
    # float copy gives under the dtype range.
    u8 = _predict(config, trained, raw, tmp_path / "u8.zarr")
    as_float = np.clip((raw.astype(np.float32) - low) / np.float32(high - low), 0, 1)
    dtype_range = TrainedParams(trained.params, IntensityNormalization())
    np.testing.assert_allclose(
        u8, _predict(config, dtype_range, as_float, tmp_path / "f.zarr"), atol=1e-6
    )
    u16 = _predict(config, trained, raw.astype(np.uint16) * 257, tmp_path / "u16.zarr")
    assert not np.allclose(u16, u8, atol=1e-6)
