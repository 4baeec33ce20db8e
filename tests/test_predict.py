"""Slice-wise prediction over volumes and the slice-masked max ensemble."""

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.data.intensity import IntensityNormalization
from synjax.errors import ConfigError, DataError
from synjax.geometry import reflect_indices
from synjax.inference import slicewise as predict
from synjax.inference.slicewise import (
    ensemble_max,
    predict_orientations,
    predict_slices,
)
from synjax.inference.tta import TRANSFORMS_NO_TRANSPOSE
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn

SLICES = 5


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)


def centre_slice(x):
    """[n, s, y, x, 1] -> [n, y, x, 1]: the input's centre slice."""
    return x[:, x.shape[1] // 2]


def first_slice(x):
    return x[:, 0]


def box3(x):
    """3x3 box sum of the centre slice, zero padded (equivariant, local)."""
    plane = jnp.pad(centre_slice(x)[..., 0], ((0, 0), (1, 1), (1, 1)))
    ny, nx = plane.shape[1] - 2, plane.shape[2] - 2
    total = sum(plane[:, dy : dy + ny, dx : dx + nx] for dy in range(3) for dx in range(3))
    return total[..., None]


class LoggedVolume:
    """Volume-like: numpy slicing along z only, logging every read."""

    def __init__(self, data):
        self._data = data
        self.shape = data.shape
        self.reads = []

    def __getitem__(self, index):
        assert isinstance(index, slice)
        self.reads.append((index.start, index.stop))
        return self._data[index]


def _volume(shape=(7, 20, 40), seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_reflect_indices_by_hand():
    np.testing.assert_array_equal(
        reflect_indices(np.array([-2, -1, 0, 3, 4, 5, 7]), 4), [2, 1, 0, 3, 2, 1, 1]
    )
    np.testing.assert_array_equal(reflect_indices(np.array([-2, 0, 2]), 1), [0, 0, 0])


def test_tiles_partition_by_hand():
    # size 100, tile 48, overlap 16: starts 0, 32, 52; cuts at the overlap middles.
    assert predict._tiles(100, 48, 16) == [(0, 0, 40), (32, 40, 66), (52, 66, 100)]
    assert predict._tiles(40, 48, 16) == [(0, 0, 40)]


@pytest.mark.parametrize("tta", [False, True])
def test_centre_slice_reproduces_volume(tta):
    vol = _volume()
    got = predict_slices(
        centre_slice, vol, SLICES, batch_size=3, tta=tta, stride=TOTAL_STRIDE, progress=False
    )
    assert got.shape == vol.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, vol, rtol=1e-6)


def test_stack_reflects_at_volume_ends():
    vol = _volume((6, 16, 16))
    got = predict_slices(
        first_slice, vol, SLICES, batch_size=4, tta=False, stride=TOTAL_STRIDE, progress=False
    )
    # Output z reads the stack's first slice, z - 2, reflected: 2, 1, 0, 1, 2, 3.
    np.testing.assert_array_equal(got, vol[[2, 1, 0, 1, 2, 3]])


def test_integer_volume_scaled_and_read_in_batches():
    data = np.random.default_rng(1).integers(0, 256, (9, 16, 16), dtype=np.uint8)
    vol = LoggedVolume(data)
    got = predict_slices(
        centre_slice, vol, SLICES, batch_size=2, tta=False, stride=TOTAL_STRIDE, progress=False
    )
    np.testing.assert_allclose(got, data / 255.0, rtol=1e-6)
    # Never the whole volume at once: at most batch + s - 1 slices per read.
    assert max(stop - start for start, stop in vol.reads) <= 2 + SLICES - 1
    assert len(vol.reads) == 5


def test_tiled_equals_untiled_for_local_model():
    vol = _volume((3, 40, 50), seed=2)
    whole = predict_slices(
        box3, vol, 3, batch_size=3, tta=True, stride=TOTAL_STRIDE, progress=False
    )
    tiled = predict_slices(
        box3,
        vol,
        3,
        batch_size=3,
        tta=True,
        stride=TOTAL_STRIDE,
        progress=False,
        max_tile=16,
        tile_overlap=4,
    )
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
    # Box sum of the interior by hand.
    inner = sum(
        vol[:, 1 + dy : 39 + dy, 1 + dx : 49 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    )
    np.testing.assert_allclose(whole[:, 1:39, 1:49], inner, rtol=1e-5)


def test_no_transpose_transforms_and_out_array():
    vol = _volume((4, 16, 32), seed=3)
    out = np.full(vol.shape, -1.0, np.float32)
    got = predict_slices(
        centre_slice,
        vol,
        3,
        2,
        True,
        False,
        stride=TOTAL_STRIDE,
        transforms=TRANSFORMS_NO_TRANSPOSE,
        out=out,
    )
    assert got is out
    np.testing.assert_allclose(out, vol, rtol=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(DataError, match=r"\[z, y, x\]"):
        predict_slices(centre_slice, np.zeros((4, 4)), stride=TOTAL_STRIDE, progress=False)
    with pytest.raises(ConfigError, match="odd"):
        predict_slices(
            centre_slice, np.zeros((4, 4, 4)), slices=4, stride=TOTAL_STRIDE, progress=False
        )
    with pytest.raises(ConfigError, match="max_tile"):
        predict_slices(
            centre_slice, np.zeros((4, 4, 4)), max_tile=20, stride=TOTAL_STRIDE, progress=False
        )


def test_ensemble_max_with_slice_masks_by_hand():
    a = np.array([[[0.1, 0.9]], [[0.5, 0.2]], [[0.3, 0.3]]], np.float32)  # [3, 1, 2]
    b = np.array([[[0.8, 0.0]], [[0.1, 0.7]], [[0.2, 0.9]]], np.float32)
    np.testing.assert_array_equal(ensemble_max([a, b]), np.maximum(a, b))
    # b (say, trained for misaligned sections) only on slice 1.
    got = ensemble_max([a, b], [None, np.array([False, True, False])])
    expected = np.array([[[0.1, 0.9]], [[0.5, 0.7]], [[0.3, 0.3]]], np.float32)
    np.testing.assert_array_equal(got, expected)
    # Disjoint masks: each slice from its own model.
    got = ensemble_max([a, b], [np.array([True, False, True]), np.array([False, True, False])])
    np.testing.assert_array_equal(got, np.stack([a[0], b[1], a[2]]))


def test_ensemble_max_errors():
    a = np.zeros((2, 1, 1), np.float32)
    with pytest.raises(DataError, match=r"no model contributes on slices \[1\]"):
        ensemble_max([a], [np.array([True, False])])
    with pytest.raises(DataError, match="shape"):
        ensemble_max([a, np.zeros((3, 1, 1))])
    with pytest.raises(DataError, match="slice mask 0"):
        ensemble_max([a], [np.array([True])])


def test_deepem3d_on_real_em_stack(shared_data):
    model = DeepEM3DNet(DeepEM3DSettings(slices=3, width=1 / 16, side_features=4))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32, 1)))
    with h5py.File(shared_data / "vnc-larva-left.h5", "r") as f:
        # 40 x 40 is no multiple of 16: exercises the yx padding with the real network.
        crop = LoggedVolume(f["volumes/raw"][:4, :40, :40])
    got = predict_slices(
        make_apply_fn(model, variables), crop, 3, batch_size=4, stride=TOTAL_STRIDE, progress=False
    )
    assert got.shape == (4, 40, 40)
    assert np.all((got >= 0) & (got <= 1)) and np.isfinite(got).all()


def _first_axis_index(volume: np.ndarray) -> np.ndarray:
    """A 'slice-wise predictor' whose output on slice i is i everywhere."""
    index = np.arange(volume.shape[0], dtype=np.float32)
    return np.broadcast_to(index[:, None, None], volume.shape).copy()


def test_orientations_map_back_and_take_the_maximum():
    shape = (2, 3, 4)
    volume = np.zeros(shape, np.float32)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    # Along z alone the predictor sees z-slices: the z index.
    np.testing.assert_array_equal(predict_orientations(_first_axis_index, volume), z)
    # Along y (x) it slices y (x): mapped back, the y (x) index.
    np.testing.assert_array_equal(predict_orientations(_first_axis_index, volume, ("y",)), y)
    np.testing.assert_array_equal(predict_orientations(_first_axis_index, volume, ("x",)), x)
    both = predict_orientations(_first_axis_index, volume, ("z", "y", "x"))
    np.testing.assert_array_equal(both, np.maximum(np.maximum(z, y), x))
    assert both.dtype == np.float32 and both.shape == shape


@pytest.mark.parametrize("orientations", [(), ("w",), ("z", "z")])
def test_bad_orientations(orientations):
    with pytest.raises(ConfigError, match="orientations"):
        predict_orientations(_first_axis_index, np.zeros((2, 2, 2)), orientations)


def test_deepem3d_predictions_identical_for_uint16_and_float_copies():
    model = DeepEM3DNet(DeepEM3DSettings(slices=3, width=1 / 16, side_features=4))
    variables = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 3, 32, 32, 1)))
    fn = make_apply_fn(model, variables)
    raw = np.random.default_rng(4).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    copies = {
        "uint8": raw,
        "uint16": raw.astype(np.uint16) * 257,
        "float32": raw.astype(np.float32) / np.float32(255),
    }
    got = {
        dtype: predict_slices(
            fn, copy, 3, batch_size=4, tta=False, stride=TOTAL_STRIDE, progress=False
        )
        for dtype, copy in copies.items()
    }
    assert np.ptp(got["uint8"]) > 0
    for dtype in ("uint16", "float32"):
        np.testing.assert_array_equal(got[dtype], got["uint8"])
    # Percentiles measured on each copy give identical input too; applied to a
    # copy they were not measured on, they give another input and prediction.
    settings = IntensityNormalization("percentiles", low_percent=5.0, high_percent=95.0)
    fitted = {dtype: settings.fit([copies[dtype]], dtype) for dtype in ("uint8", "uint16")}
    by_percentiles = {
        dtype: predict_slices(
            fn,
            copies[dtype],
            3,
            batch_size=4,
            tta=False,
            stride=TOTAL_STRIDE,
            progress=False,
            intensity=fit,
        )
        for dtype, fit in fitted.items()
    }
    np.testing.assert_array_equal(by_percentiles["uint16"], by_percentiles["uint8"])
    assert not np.array_equal(by_percentiles["uint8"], got["uint8"])
    with pytest.raises(DataError, match=r"test raw: float intensities span"):
        predict_slices(
            fn, copies["float32"] * 255, 3, stride=TOTAL_STRIDE, progress=False, name="test raw"
        )
