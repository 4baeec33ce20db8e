"""DeepEM3D's slice-wise prediction slab by slab through the block-wise runner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.inference.slicewise import predict_orientations, predict_slices
from synjax.inference.slicewise_blocks import OrientedVolume, predict_slices_blockwise
from synjax.inference.tta import TRANSFORMS
from synjax.io import create_volume, open_volume
from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn

SHAPE = (9, 20, 24)  # no multiple of the slab depths nor of the stride


@pytest.fixture(autouse=True)
def _fast_compile():
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="module")
def tiny_net():
    """A DeepEM3D-Net of 3 input slices, a few features: the real network, small."""
    model = DeepEM3DNet(DeepEM3DSettings(slices=3, width=1 / 32, side_features=4))
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32, 1)))
    return make_apply_fn(model, variables)


def _raw(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_oriented_view_reads_and_writes_the_swapped_axes():
    volume = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    view = OrientedVolume(volume, "y")
    assert view.shape == (3, 2, 4)
    np.testing.assert_array_equal(view[0:2, 0:2, 1:3], volume[0:2, 0:2, 1:3].transpose(1, 0, 2))
    view[2:3, 0:1, 0:4] = np.full((1, 1, 4), -1)
    np.testing.assert_array_equal(volume[0, 2], [-1, -1, -1, -1])
    assert (volume == -1).sum() == 4


@pytest.mark.parametrize("depth", [2, 4])
def test_slabs_equal_the_whole_volume_along_z(tiny_net, depth):
    raw = _raw()
    kwargs = dict(slices=3, stride=TOTAL_STRIDE, batch_size=2, tta=False)
    whole = predict_slices(tiny_net, raw, progress=False, **kwargs)
    dest = np.full(SHAPE, -1, np.float32)
    summary = predict_slices_blockwise(tiny_net, raw, dest, depth=depth, progress=False, **kwargs)
    assert summary.computed == -(-SHAPE[0] // depth)
    np.testing.assert_allclose(dest, whole, rtol=1e-5, atol=1e-6)
    assert np.ptp(whole) > 0  # the network is no constant


@pytest.mark.parametrize("orientation,depth", [("y", 3), ("x", 5)])
def test_slabs_equal_the_whole_volume_along_other_axes_with_tta(tiny_net, orientation, depth):
    raw = _raw(seed=1)
    transforms = TRANSFORMS[::8]  # identity and mirror
    kwargs = dict(slices=3, stride=TOTAL_STRIDE, batch_size=4, tta=True, transforms=transforms)

    def whole(volume):
        return predict_slices(tiny_net, volume, progress=False, **kwargs)

    expected = predict_orientations(whole, raw, (orientation,))
    dest = np.zeros(SHAPE, np.float32)
    predict_slices_blockwise(
        tiny_net, raw, dest, depth=depth, orientation=orientation, progress=False, **kwargs
    )
    np.testing.assert_allclose(dest, expected, rtol=1e-5, atol=1e-6)


def test_slabs_resume_from_a_done_state_on_zarr(tiny_net, tmp_path):
    raw = _raw(seed=2)
    kwargs = dict(slices=3, stride=TOTAL_STRIDE, batch_size=2, tta=False, depth=4)
    whole = predict_slices(tiny_net, raw, 3, 2, False, False, stride=TOTAL_STRIDE)
    dest = create_volume(str(tmp_path / "b.zarr"), SHAPE, np.float32, chunks=(4, 20, 24))
    done = tmp_path / "b.zarr.blocks"
    first = predict_slices_blockwise(
        tiny_net, raw, dest, manifest_path=done, progress=False, **kwargs
    )
    again = predict_slices_blockwise(
        tiny_net, raw, dest, manifest_path=done, progress=False, **kwargs
    )
    assert (first.computed, again.skipped, again.computed) == (3, 3, 0)
    np.testing.assert_allclose(open_volume(str(tmp_path / "b.zarr")).read(), whole, atol=1e-6)
