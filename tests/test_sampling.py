"""Patch sampling: crop geometry, determinism, positive sampling, errors."""

import h5py
import numpy as np
import pytest

from synjax.data.augment import AugmentSettings
from synjax.data.intensity import IntensityNormalization
from synjax.data.sampling import PatchSampler, center_crop, is_positive
from synjax.errors import ConfigError, DataError
from synjax.io.cremi_volume import CREMI_BACKGROUND

VOLUME = (6, 8, 8)
INPUT = (4, 5, 5)
OUTPUT = (2, 3, 3)
NO_JITTER = AugmentSettings(intensity_scale=0.0, intensity_shift=0.0)


def _source():
    size = int(np.prod(VOLUME))
    labels = np.arange(size, dtype=np.uint64).reshape(VOLUME)
    return {"raw": (labels % 256).astype(np.uint8), "labels": labels}


class LazyVolume:
    """Volume-like array that records the windows read from it."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape
        self.reads = []

    def __getitem__(self, window):
        self.reads.append(window)
        return self._array[window]


def test_crop_geometry_by_hand():
    source = _source()
    sampler = PatchSampler([source], INPUT, OUTPUT)
    example = sampler.read(0, (1, 2, 3))
    assert example["input"].shape == (*INPUT, 1) and example["input"].dtype == np.float32
    np.testing.assert_allclose(example["input"][..., 0], source["raw"][1:5, 2:7, 3:8] / 255.0)
    # Valid padding removes (4 - 2) // 2 = 1 and (5 - 3) // 2 = 1 voxel per side.
    assert np.array_equal(example["labels"], source["labels"][2:4, 3:6, 4:7])
    assert example["labels"].dtype == np.uint64
    odd = np.arange(5)[:, None, None] * np.ones((1, 1, 1))
    # Odd margins put the extra voxel after the crop.
    assert center_crop(odd, (2, 1, 1)).ravel().tolist() == [1, 2]


def test_input_channels_and_vector_targets():
    source = _source()
    source["membrane"] = (source["labels"] % 2).astype(np.float32)
    source["affinities"] = np.stack([source["labels"] % 5, source["labels"] % 7], -1)
    sampler = PatchSampler([source], INPUT, OUTPUT, input_keys=("raw", "membrane"))
    example = sampler.read(0, (0, 0, 0))
    assert example["input"].shape == (*INPUT, 2)
    np.testing.assert_array_equal(example["input"][..., 1], source["membrane"][:4, :5, :5])
    assert set(example) == {"input", "labels", "affinities"}
    assert example["affinities"].shape == (*OUTPUT, 2)
    np.testing.assert_array_equal(example["affinities"], source["affinities"][1:3, 1:4, 1:4])


def test_augmented_targets_move_with_raw():
    source = _source()
    sampler = PatchSampler([source], INPUT, OUTPUT, augment=NO_JITTER, seed=1)
    batch = sampler.batch(0, 16)
    raw_values = np.rint(center_crop(np.moveaxis(batch["input"][..., 0], 0, -1), OUTPUT) * 255)
    labels = np.moveaxis(batch["labels"], 0, -1)
    assert np.array_equal(raw_values.astype(np.uint64), labels % 256)
    # The crops came from different places or orientations.
    assert len({example.tobytes() for example in batch["labels"]}) > 8


def test_batch_is_deterministic_in_step():
    sampler = PatchSampler([_source()], INPUT, OUTPUT, augment=AugmentSettings(), seed=3)
    first, again = sampler.batch(5, 4), sampler.batch(5, 4)
    for key in first:
        assert np.array_equal(first[key], again[key])
    assert not np.array_equal(first["labels"], sampler.batch(6, 4)["labels"])
    other_seed = PatchSampler([_source()], INPUT, OUTPUT, augment=AugmentSettings(), seed=4)
    assert not np.array_equal(first["labels"], other_seed.batch(5, 4)["labels"])
    shard = sampler.batch(5, 4, shard=1, num_shards=2)
    assert shard["input"].shape == (2, *INPUT, 1)
    with pytest.raises(ConfigError, match="config.train.batch_size=5"):
        sampler.batch(0, 5, num_shards=2)


def test_positive_sampling_hits_mask():
    source = _source()
    positive = np.zeros(VOLUME, np.uint8)
    positive[0, 0, 0] = 1  # no input patch can be centred here
    positive[3, 4, 5] = 1
    positive[2, 3, 2] = 1
    source["synapse"] = positive
    sampler = PatchSampler([source], INPUT, OUTPUT, positive_key="synapse", positive_fraction=1.0)
    rng = np.random.default_rng(0)
    centres = set()
    for _ in range(30):
        _, origin = sampler.sample_location(rng)
        centre = tuple(o + p // 2 for o, p in zip(origin, INPUT, strict=True))
        centres.add(centre)
        assert sampler.read(0, origin)["synapse"][1, 1, 1] == 1
    assert centres == {(3, 4, 5), (2, 3, 2)}
    mixed = PatchSampler([source], INPUT, OUTPUT, positive_key="synapse", positive_fraction=0.5)
    hits = [mixed.sample(rng)["synapse"][1, 1, 1] for _ in range(200)]
    # Half the draws are forced positive; uniform draws hit 2 of 2 * 4 * 4 centres.
    assert 0.4 < np.mean(hits) < 0.7


def test_mask_key_restricts_centres():
    source = _source()
    mask = np.zeros(VOLUME, bool)
    mask[2:4, 2:4, 3] = True
    source["labelled"] = mask
    sampler = PatchSampler([source], INPUT, OUTPUT, mask_key="labelled")
    for example in sampler.batch(0, 12)["labelled"]:
        assert example[1, 1, 1]


def test_is_positive_cremi_background():
    clefts = np.array([[[CREMI_BACKGROUND, 0, 7]]], np.uint64)
    assert is_positive(clefts).tolist() == [[[False, False, True]]]
    two_channels = np.array([[[[0, 0], [0, 1]]]])
    assert is_positive(two_channels).tolist() == [[[False, True]]]


def test_sample_weights_and_lazy_reads():
    lazy = LazyVolume(_source()["raw"])
    small = {"raw": lazy, "labels": _source()["labels"]}
    sampler = PatchSampler([_source(), small], INPUT, OUTPUT, sample_weights=[0.0, 1.0])
    sampler.batch(0, 3)
    assert len(lazy.reads) == 3
    for window in lazy.reads:
        assert tuple(s.stop - s.start for s in window) == INPUT


def test_patch_does_not_fit():
    with pytest.raises(DataError, match=r"source 0 key 'raw': a patch of input_shape \(8, 5, 5\)"):
        PatchSampler([_source()], (8, 5, 5))
    source = _source()
    source["labels"] = source["labels"][:, :, :7]
    with pytest.raises(DataError, match="key 'labels'.*differs"):
        PatchSampler([source], INPUT)
    with pytest.raises(ConfigError, match="larger than input_shape"):
        PatchSampler([_source()], INPUT, (5, 3, 3))
    with pytest.raises(DataError, match="source 0: keys"):
        PatchSampler([{"labels": _source()["labels"]}], INPUT)
    empty = {**_source(), "synapse": np.zeros(VOLUME, np.uint8)}
    with pytest.raises(DataError, match="positive_key 'synapse'"):
        PatchSampler([empty], INPUT, positive_key="synapse")


def test_real_clefts_positive_sampling(shared_data):
    with h5py.File(shared_data / "vnc-larva-left.h5", "r") as f:
        source = {"raw": f["volumes/raw"], "clefts": f["volumes/labels/clefts"]}
        sampler = PatchSampler(
            [source],
            (5, 64, 64),
            (1, 32, 32),
            positive_key="clefts",
            positive_fraction=1.0,
            augment=AugmentSettings(),
        )
        batch = sampler.batch(0, 4)
    assert batch["input"].shape == (4, 5, 64, 64, 1)
    # uint8 scaled to [0, 1], then scaled by at most 1.1 and shifted by at most 0.1.
    assert -0.1 <= batch["input"].min() and batch["input"].max() <= 1.2 + 1e-6
    assert batch["input"].std() > 0.01
    centre = batch["clefts"][:, 0, 16, 16]
    assert (centre != CREMI_BACKGROUND).all()


def _dtype_copies(raw_u8):
    """The same volume as uint8, uint16 (x 257) and float32 (/ 255)."""
    return {
        "uint8": raw_u8,
        "uint16": raw_u8.astype(np.uint16) * 257,
        "float32": raw_u8.astype(np.float32) / np.float32(255),
    }


def test_training_patches_identical_for_uint16_and_float_copies():
    source = _source()
    source["raw"] = np.random.default_rng(5).integers(0, 256, VOLUME, dtype=np.uint8)
    batches = {}
    for dtype, raw in _dtype_copies(source["raw"]).items():
        sampler = PatchSampler([{**source, "raw": raw}], INPUT, OUTPUT, augment=AugmentSettings())
        batches[dtype] = sampler.batch(3, 6)
    for dtype in ("uint16", "float32"):
        for key in ("input", "labels"):
            np.testing.assert_array_equal(batches[dtype][key], batches["uint8"][key])


def test_percentile_patches_identical_for_a_uint16_copy():
    source = _source()
    source["raw"] = np.random.default_rng(6).integers(40, 200, VOLUME, dtype=np.uint8)
    settings = IntensityNormalization("percentiles", low_percent=5.0, high_percent=95.0)
    inputs = []
    for raw in (source["raw"], source["raw"].astype(np.uint16) * 257):
        fitted = settings.fit([raw], "training raw")
        sampler = PatchSampler([{**source, "raw": raw}], INPUT, OUTPUT, intensity=fitted)
        inputs.append(sampler.read(0, (1, 2, 3))["input"][..., 0])
    np.testing.assert_array_equal(inputs[1], inputs[0])
    low, high = np.percentile(source["raw"], [5.0, 95.0], method="nearest")
    window = source["raw"][1:5, 2:7, 3:8].astype(np.float64)
    np.testing.assert_allclose(inputs[0], np.clip((window - low) / (high - low), 0, 1), atol=1e-6)
    assert inputs[0].min() == 0.0 and inputs[0].max() == 1.0


def test_bad_intensities_name_the_source():
    source = _source()
    source["raw"] = source["raw"].astype(np.float32) / np.float32(255)
    source["raw"][2, 3, 4] = np.nan
    sampler = PatchSampler([source], INPUT, OUTPUT)
    with pytest.raises(DataError, match=r"training source 0 key 'raw': 1 NaN or Inf"):
        sampler.read(0, (1, 2, 3))
    with pytest.raises(ConfigError, match="must be measured on the training volume"):
        PatchSampler([_source()], INPUT, OUTPUT, intensity=IntensityNormalization("percentiles"))
