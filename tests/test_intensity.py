"""The intensity convention: dtype range, percentiles, checks, saving next to checkpoints."""

import json
import logging

import ml_collections
import numpy as np
import pytest

from synjax.data import intensity
from synjax.data.intensity import (
    DTYPE_RANGE,
    IntensityNormalization,
    NormalizedVolume,
    load_normalization,
    normalize_intensity,
    save_normalization,
    strided_sample,
)
from synjax.errors import ConfigError, DataError

ALL_UINT8 = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)


def _bits(array):
    return np.asarray(array, np.float32).view(np.uint32)


class LoggedVolume:
    """Volume-like array that records the windows read from it."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape
        self.reads = []

    def __getitem__(self, window):
        self.reads.append(window)
        return self._array[window]


def test_uint8_is_bit_identical_to_the_historical_division():
    got = normalize_intensity(ALL_UINT8, DTYPE_RANGE, "raw")
    assert got.dtype == np.float32 and got.shape == ALL_UINT8.shape
    # What the sampler, the pruning windows and slice-wise prediction computed before.
    historical = ALL_UINT8.astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(_bits(got), _bits(historical))
    assert got.flat[0] == 0.0 and got.flat[255] == 1.0


def test_uint16_and_float_copies_give_identical_values():
    u16 = ALL_UINT8.astype(np.uint16) * 257
    f32 = ALL_UINT8.astype(np.float32) / np.float32(255)
    reference = _bits(normalize_intensity(ALL_UINT8, DTYPE_RANGE, "uint8"))
    np.testing.assert_array_equal(_bits(normalize_intensity(u16, DTYPE_RANGE, "uint16")), reference)
    np.testing.assert_array_equal(_bits(normalize_intensity(f32, DTYPE_RANGE, "float")), reference)
    # uint16 by hand: 65535 -> 1, 0 -> 0, 13107 = 65535 / 5 -> 0.2.
    by_hand = normalize_intensity(np.array([0, 13107, 65535], np.uint16), DTYPE_RANGE, "u16")
    np.testing.assert_array_equal(by_hand, np.float32([0.0, 0.2, 1.0]))


def test_dtype_range_rejects_what_it_cannot_scale():
    with pytest.raises(DataError, match=r"test raw: float intensities span \[0.0, 255.0\]"):
        normalize_intensity(np.array([0.0, 255.0], np.float32), DTYPE_RANGE, "test raw")
    with pytest.raises(DataError, match="test raw: dtype int16 has no"):
        normalize_intensity(np.array([1, 2], np.int16), DTYPE_RANGE, "test raw")
    with pytest.raises(DataError, match="test raw: dtype bool"):
        normalize_intensity(np.array([True]), DTYPE_RANGE, "test raw")
    # Float data in [0, 1] is used as it is (float64 cast to float32).
    got = normalize_intensity(np.array([0.0, 0.25, 1.0]), DTYPE_RANGE, "x")
    assert got.dtype == np.float32 and got.tolist() == [0.0, 0.25, 1.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_the_volume_name(bad):
    values = np.array([0.1, bad, 0.5], np.float32)
    with pytest.raises(DataError, match="my volume: 1 NaN or Inf"):
        normalize_intensity(values, DTYPE_RANGE, "my volume")
    fitted = IntensityNormalization("percentiles", low=0.0, high=1.0)
    with pytest.raises(DataError, match="my volume: 1 NaN or Inf"):
        normalize_intensity(values, fitted, "my volume")
    with pytest.raises(DataError, match="training raw: 1 NaN or Inf"):
        IntensityNormalization("percentiles").fit([values.reshape(1, 1, 3)], "training raw")


def test_percentiles_by_hand_and_exact_for_a_uint16_copy():
    raw = np.arange(100, dtype=np.uint8).reshape(1, 10, 10)
    settings = IntensityNormalization("percentiles", low_percent=10.0, high_percent=90.0)
    fitted = settings.fit([raw], "training raw")
    # Nearest rank over 0..99: 10% -> position 9.9 -> 10; 90% -> position 89.1 -> 89.
    assert (fitted.low, fitted.high) == (10.0, 89.0)
    assert fitted.to_dict() == {
        "method": "percentiles",
        "low_percent": 10.0,
        "high_percent": 90.0,
        "low": 10.0,
        "high": 89.0,
    }
    got = normalize_intensity(np.array([5, 10, 50, 89, 95], np.uint8), fitted, "test raw")
    np.testing.assert_array_equal(got, np.float32([0.0, 0.0, 40 / 79, 1.0, 1.0]))
    # The x257 copy measures x257 percentiles and gives the same values bit for bit.
    fitted16 = settings.fit([raw.astype(np.uint16) * 257], "training raw")
    assert (fitted16.low, fitted16.high) == (2570.0, 22873.0)
    np.testing.assert_array_equal(
        _bits(normalize_intensity(raw.astype(np.uint16) * 257, fitted16, "x")),
        _bits(normalize_intensity(raw, fitted, "x")),
    )
    # A float copy agrees to float rounding.
    fitted_f = settings.fit([raw / np.float32(255)], "training raw")
    np.testing.assert_allclose(
        normalize_intensity(raw / np.float32(255), fitted_f, "x"),
        normalize_intensity(raw, fitted, "x"),
        atol=1e-6,
    )
    with pytest.raises(DataError, match="flat: the 10.0 and 90.0 percentiles are both 7.0"):
        settings.fit([np.full((2, 2, 2), 7, np.uint8)], "flat")


def test_unmeasured_percentiles_are_refused():
    settings = IntensityNormalization("percentiles")
    assert not settings.measured and DTYPE_RANGE.measured
    with pytest.raises(ConfigError, match="before its percentiles were measured"):
        normalize_intensity(ALL_UINT8, settings, "raw")
    with pytest.raises(ConfigError, match="measure the percentiles first"):
        save_normalization(settings, "/nonexistent")
    assert DTYPE_RANGE.fit([ALL_UINT8], "raw") is DTYPE_RANGE


def test_settings_from_config_and_dict_round_trip():
    section = ml_collections.ConfigDict(
        {"method": "percentiles", "low_percent": 0.5, "high_percent": 99.5}
    )
    settings = IntensityNormalization.from_config(section)
    assert settings == IntensityNormalization("percentiles", 0.5, 99.5)
    assert IntensityNormalization.from_config(None) == DTYPE_RANGE
    fitted = settings.fit([ALL_UINT8], "raw")
    assert IntensityNormalization.from_dict(fitted.to_dict()) == fitted
    with pytest.raises(ConfigError, match=r"config.data.intensity.method='minmax'"):
        IntensityNormalization.from_config({"method": "minmax"})
    with pytest.raises(ConfigError, match=r"unknown fields \['low'\]"):
        IntensityNormalization.from_config({"method": "dtype", "low": 3})
    with pytest.raises(ConfigError, match="low_percent=90.0, high_percent=10.0"):
        IntensityNormalization.from_config({"low_percent": 90.0, "high_percent": 10.0})
    with pytest.raises(DataError, match="f.json: expected the fields"):
        IntensityNormalization.from_dict({"method": "dtype"}, source="f.json")
    with pytest.raises(DataError, match="f.json: intensity low=5.0, high=1.0"):
        IntensityNormalization.from_dict({**fitted.to_dict(), "low": 5.0, "high": 1.0}, "f.json")


def test_strided_sample_stays_under_the_budget():
    array = np.random.default_rng(0).integers(0, 256, (20, 300, 300), dtype=np.uint8)
    lazy = LoggedVolume(array)
    # (1.8e6 / 1e4) ** (1/3) = 5.6 -> 5 gives 4 * 60 * 60 = 14400 > 1e4; 6 gives 4 * 50 * 50.
    sample = strided_sample(lazy, max_voxels=10_000)
    np.testing.assert_array_equal(sample, array[::6, ::6, ::6])
    assert sample.shape == (4, 50, 50)
    # Lazy volumes are read one z slice at a time.
    assert [(w.start, w.stop) for w in lazy.reads] == [(z, z + 1) for z in (0, 6, 12, 18)]
    np.testing.assert_array_equal(strided_sample(array, max_voxels=10_000), sample)
    np.testing.assert_array_equal(strided_sample(array[:2, :5, :5]), array[:2, :5, :5])


def test_fit_measures_on_the_subsample(monkeypatch):
    array = np.random.default_rng(1).integers(0, 256, (20, 300, 300), dtype=np.uint8)
    monkeypatch.setattr(intensity, "MAX_STATISTICS_VOXELS", 10_000)
    fitted = IntensityNormalization("percentiles", 2.0, 98.0).fit([LoggedVolume(array)], "raw")
    expected = np.percentile(array[::6, ::6, ::6], [2.0, 98.0], method="nearest")
    assert (fitted.low, fitted.high) == tuple(float(v) for v in expected)


def test_normalized_volume_converts_only_what_is_read():
    lazy = LoggedVolume(ALL_UINT8.astype(np.uint16) * 257)
    view = NormalizedVolume(lazy, DTYPE_RANGE, "raw")
    assert view.shape == ALL_UINT8.shape and view.dtype == np.float32 and view.ndim == 3
    window = view[1:3, 2:4, 0:5]
    assert lazy.reads == [(slice(1, 3), slice(2, 4), slice(0, 5))]
    np.testing.assert_array_equal(window, ALL_UINT8[1:3, 2:4, 0:5] / np.float32(255))


def test_save_and_load_next_to_checkpoints(tmp_path, caplog):
    fitted = IntensityNormalization("percentiles", 1.0, 99.0).fit([ALL_UINT8], "raw")
    folder = tmp_path / "checkpoints" / "model"
    path = save_normalization(fitted, folder)
    assert path == folder / intensity.INTENSITY_FILE
    assert json.loads(path.read_text())["low"] == fitted.low
    assert load_normalization(folder) == fitted
    save_normalization(fitted, folder)  # the same again: fine (a resumed run)
    with pytest.raises(ConfigError, match="trained with intensity"):
        save_normalization(DTYPE_RANGE, folder)
    # A checkpoint folder from before the file existed was trained on dtype range.
    old = tmp_path / "checkpoints" / "old"
    (old / "100").mkdir(parents=True)
    with pytest.raises(ConfigError, match="'method': 'dtype'"):
        save_normalization(fitted, old)
    with caplog.at_level(logging.WARNING):
        assert load_normalization(old) == DTYPE_RANGE
    assert "intensity.json is absent" in caplog.text
    save_normalization(DTYPE_RANGE, old)
    assert load_normalization(old) == DTYPE_RANGE
    (old / intensity.INTENSITY_FILE).write_text("{not json")
    with pytest.raises(DataError, match="intensity.json: not JSON"):
        load_normalization(old)
