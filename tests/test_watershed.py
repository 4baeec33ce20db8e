"""Tests of synjax.postprocess.watershed on constructed boundary maps."""

import numpy as np
import pytest

from synjax.errors import ConfigError, DataError
from synjax.evaluation.rand_voi import adapted_rand_error
from synjax.postprocess.watershed import (
    QUANT_MAX,
    grid_search,
    segment,
    smooth_and_quantise,
)

SHAPE = (6, 8, 17)  # [z, y, x]
RIDGE_X = 8
LEFT_LEVEL, RIGHT_LEVEL, RIDGE_LEVEL, FRAME_LEVEL = 0.0, 0.1, 0.4, 1.0


def _two_cubes(noise=0.0, seed=0):
    """Two basins (x < 8 at 0.0, x > 8 at 0.1) split by a ridge at x = 8 (0.4).

    The last x-slice is a frame at 1.0, so that the map spans [0, 1]; the depths
    are 0.4 for the left basin and 0.3 for the right one.
    """
    image = np.full(SHAPE, LEFT_LEVEL)
    image[..., RIDGE_X + 1 :] = RIGHT_LEVEL
    image[..., RIDGE_X] = RIDGE_LEVEL
    image[..., -1] = FRAME_LEVEL
    if noise:
        rng = np.random.default_rng(seed)
        image[..., :RIDGE_X] += noise * rng.random(image[..., :RIDGE_X].shape)
        image[..., RIDGE_X + 1 : -1] += noise * rng.random(image[..., RIDGE_X + 1 : -1].shape)
    gt = np.ones(SHAPE, dtype=np.uint64)
    gt[..., RIDGE_X + 1 :] = 2
    gt[..., RIDGE_X] = 0  # the ridge belongs to neither cube
    return image, gt


def test_ridge_separates_two_segments():
    image, gt = _two_cubes()
    labels = segment(image, sigma_xy=0.0, h=0.2, rescale=False)
    assert labels.dtype == np.uint64
    left, right = labels[..., :RIDGE_X], labels[..., RIDGE_X + 1 :]
    assert np.unique(left).size == 1 and np.unique(right).size == 1
    assert left.flat[0] != right.flat[0]
    assert set(np.unique(labels)) == {left.flat[0], right.flat[0]}
    assert adapted_rand_error(labels, gt).error == 0.0


@pytest.mark.parametrize("smoothing", ["2d", "3d"])
def test_ridge_separates_after_smoothing(smoothing):
    image, gt = _two_cubes()
    labels = segment(image, sigma_xy=1.0, h=0.1, smoothing=smoothing)
    assert np.unique(labels).size == 2
    assert adapted_rand_error(labels, gt).error == 0.0


def test_h_above_ridge_merges():
    image, _ = _two_cubes()
    # The right basin is 0.3 deep: h = 0.35 drops its seed, so it floods from the left.
    labels = segment(image, sigma_xy=0.0, h=0.35, rescale=False)
    assert np.unique(labels).size == 1
    # h above the whole range: only the global minimum seeds.
    assert np.unique(segment(image, sigma_xy=0.0, h=1.0, rescale=False)).size == 1


def test_noise_with_small_h_oversegments():
    image, gt = _two_cubes(noise=0.05)
    labels = segment(image, sigma_xy=0.0, h=0.01, rescale=False)
    assert np.unique(labels).size > 2
    assert adapted_rand_error(labels, gt).recall < 1.0


def test_mask_and_background_threshold():
    image, _ = _two_cubes()
    mask = np.ones(SHAPE, dtype=bool)
    mask[:, :2] = False
    labels = segment(image, sigma_xy=0.0, h=0.2, mask=mask, rescale=False)
    assert (labels[~mask] == 0).all() and (labels[mask] > 0).all()
    labels = segment(image, sigma_xy=0.0, h=0.2, background_threshold=0.3, rescale=False)
    background = image > 0.3  # ridge and frame
    np.testing.assert_array_equal(labels == 0, background)


def test_smooth_and_quantise_per_slice():
    image = np.zeros((3, 9, 9))
    image[1, 4, 4] = 2.0
    levels = smooth_and_quantise(image, sigma_xy=1.0, smoothing="2d")
    # Per-slice smoothing keeps slices 0 and 2 untouched (zero); the rescaled
    # peak is the top level.
    assert levels.dtype == np.uint16
    assert levels[0].max() == 0 and levels[2].max() == 0
    assert levels[1, 4, 4] == QUANT_MAX
    # 3D smoothing spreads into the neighbouring slices.
    assert smooth_and_quantise(image, 1.0, smoothing="3d")[0].max() > 0
    # Unscaled input: 0.5 maps to the middle level.
    half = smooth_and_quantise(np.full((1, 2, 2), 0.5), 0.0, rescale=False)
    assert (half == round(0.5 * QUANT_MAX)).all()


def test_bad_arguments():
    image, _ = _two_cubes()
    with pytest.raises(ConfigError, match="h must be"):
        segment(image, 0.0, h=0.0)
    with pytest.raises(ConfigError, match="smoothing"):
        segment(image, 1.0, 0.2, smoothing="4d")
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        segment(image * 3.0, 0.0, 0.2, rescale=False)
    with pytest.raises(DataError, match="3D"):
        segment(image[0], 0.0, 0.2)


def test_grid_search_finds_best_pair():
    image, gt = _two_cubes(noise=0.05)
    sigmas, hs = (0.0, 1.0), (0.01, 0.2, 0.35)
    best_sigma, best_h, table = grid_search(
        image, gt, sigmas, hs, metric=adapted_rand_error, rescale=False
    )
    assert [(row.sigma, row.h) for row in table] == [(s, h) for s in sigmas for h in hs]
    for row in table:
        expected = adapted_rand_error(segment(image, row.sigma, row.h, rescale=False), gt).error
        assert row.score == pytest.approx(expected)
    assert best_h == 0.2
    best = min(table, key=lambda row: row.score)
    assert (best_sigma, best_h) == (best.sigma, best.h)
    assert best.score == 0.0
    # Too small an h splits, too large merges: both score worse.
    scores = {(row.sigma, row.h): row.score for row in table}
    assert scores[(best_sigma, 0.01)] > 0.0 and scores[(best_sigma, 0.35)] > 0.0


def test_grid_search_over_several_volumes():
    volumes = [_two_cubes(noise=0.05, seed=seed) for seed in (1, 2)]
    _, best_h, table = grid_search(
        [v[0] for v in volumes],
        [v[1] for v in volumes],
        (0.0,),
        (0.2, 0.35),
        metric=adapted_rand_error,
        rescale=False,
    )
    assert best_h == 0.2 and len(table) == 2
    with pytest.raises(DataError, match="ground truths"):
        grid_search([volumes[0][0]], [], (0.0,), (0.2,), metric=adapted_rand_error)
