"""Tests of the classical instance baseline: voxel features, pixel forest, instance watershed."""

import dataclasses

import numpy as np
import pytest
import scipy.ndimage as ndi

from synjax.data.voxel_features import (
    FEATURES_PER_SCALE,
    feature_halo,
    feature_names,
    sigmas_per_axis,
    voxel_features,
)
from synjax.errors import ConfigError, DataError
from synjax.models import pixel_forest
from synjax.models.pixel_forest import (
    FOREST_FILE,
    PixelForestSettings,
    load_pixel_forest,
    predict_foreground,
    sample_training_voxels,
    save_pixel_forest,
    train_or_load_pixel_forest,
    train_pixel_forest,
)
from synjax.postprocess.instance_watershed import (
    InstanceWatershedGrid,
    InstanceWatershedParams,
    instance_watershed,
    remove_small_instances,
    tune_instance_watershed,
)

RES = (200.0, 100.0, 100.0)  # nm, z-y-x: z twice as coarse
SMALL_SCALES = (0.7, 1.6)
GAUSSIAN = FEATURES_PER_SCALE.index("gaussian")
LOG = FEATURES_PER_SCALE.index("laplacian_of_gaussian")
GRADIENT = FEATURES_PER_SCALE.index("gradient_magnitude")
DOG = FEATURES_PER_SCALE.index("difference_of_gaussians")
TENSOR0 = FEATURES_PER_SCALE.index("structure_tensor_ev0")
HESSIAN0 = FEATURES_PER_SCALE.index("hessian_ev0")
N_PER_SCALE = len(FEATURES_PER_SCALE)


def _channels(features, index):
    """The channels of one feature kind at every scale, `[..., n_scales]`."""
    return features[..., index::N_PER_SCALE]


def _balls(shape, resolution, centres_nm, radius_nm):
    """Bool masks `[n, z, y, x]` of balls (physical radius) around voxel centres in nm."""
    axes = [np.arange(n) * r for n, r in zip(shape, resolution, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack(
        [
            sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius_nm**2
            for centre in centres_nm
        ]
    )


# ---------------------------------------------------------------- voxel features


def test_features_shape_dtype_names_and_finite():
    image = np.random.default_rng(0).normal(10.0, 2.0, (8, 48, 48))
    features = voxel_features(image, RES, SMALL_SCALES)
    assert features.shape == (8, 48, 48, N_PER_SCALE * len(SMALL_SCALES))
    assert features.dtype == np.float32
    assert np.all(np.isfinite(features))
    names = feature_names(SMALL_SCALES)
    assert len(names) == features.shape[-1] and names[0] == "gaussian_s0.7"
    assert names[N_PER_SCALE] == "gaussian_s1.6"


def test_sigma_per_axis_keeps_one_physical_sigma():
    # 1.6 finest voxels = 153.6 nm; along z that is 153.6 / 1000 voxels.
    assert sigmas_per_axis(1.6, (1000.0, 96.0, 96.0)) == pytest.approx((0.1536, 1.6, 1.6))
    assert sigmas_per_axis(2.0, RES) == pytest.approx((1.0, 2.0, 2.0))


def test_constant_volume_smooths_to_itself_and_has_no_structure():
    features = voxel_features(np.full((8, 48, 48), 7.5), RES, SMALL_SCALES)
    np.testing.assert_allclose(_channels(features, GAUSSIAN), 7.5, rtol=1e-6)
    others = np.delete(features, np.arange(GAUSSIAN, features.shape[-1], N_PER_SCALE), axis=-1)
    np.testing.assert_allclose(others, 0.0, atol=1e-5)


def test_linear_ramp_has_zero_laplacian_and_its_slope_as_gradient():
    shape = (16, 40, 40)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    slope = np.array([0.6, 0.2, 0.5])  # per voxel along z, y, x
    image = slope[0] * z + slope[1] * y + slope[2] * x
    features = voxel_features(image, RES, SMALL_SCALES)
    hz, hy, hx = feature_halo(SMALL_SCALES, RES)
    inner = features[hz:-hz, hy:-hy, hx:-hx]
    assert inner.size > 0
    # Per finest-voxel side (100 nm): a z voxel is 2 of them, so the z slope halves.
    physical = slope / np.array([2.0, 1.0, 1.0])
    np.testing.assert_allclose(_channels(inner, LOG), 0.0, atol=1e-4)
    np.testing.assert_allclose(_channels(inner, HESSIAN0), 0.0, atol=1e-4)
    np.testing.assert_allclose(_channels(inner, GRADIENT), np.linalg.norm(physical), rtol=1e-4)
    # A ramp's structure tensor is g g^T: one eigenvalue |g|^2, the others 0.
    np.testing.assert_allclose(_channels(inner, TENSOR0), physical @ physical, rtol=1e-4)
    np.testing.assert_allclose(_channels(inner, TENSOR0 + 1), 0.0, atol=1e-5)
    # A Gaussian of a ramp is the ramp, so the difference of Gaussians vanishes too.
    np.testing.assert_allclose(_channels(inner, GAUSSIAN)[..., 0], image[hz:-hz, hy:-hy, hx:-hx])
    np.testing.assert_allclose(_channels(inner, DOG), 0.0, atol=1e-4)


def test_bright_blob_centre_is_a_maximum_with_negative_laplacian():
    image = np.zeros((9, 33, 33))
    image[4, 16, 16] = 100.0
    features = voxel_features(image, RES, SMALL_SCALES)
    assert np.all(_channels(features, LOG)[4, 16, 16] < 0)
    assert np.all(_channels(features, GRADIENT)[4, 16, 16] < 1e-4)  # zero at the peak
    assert np.all(_channels(features, DOG)[4, 16, 16] < 0)  # the narrower Gaussian is higher


def test_halo_makes_block_features_equal_and_one_less_does_not():
    image = np.random.default_rng(1).normal(0.0, 1.0, (20, 24, 24))
    full = voxel_features(image, RES, SMALL_SCALES)
    halo_z = feature_halo(SMALL_SCALES, RES)[0]
    z0, z1 = 9, 12
    for margin, equal in ((halo_z, True), (halo_z - 1, False)):
        block = voxel_features(image[z0 - margin : z1 + margin], RES, SMALL_SCALES)
        assert np.array_equal(block[margin:-margin], full[z0:z1]) is equal


def test_bad_feature_inputs_raise_one_line_errors():
    with pytest.raises(DataError, match="z, y, x"):
        voxel_features(np.zeros((8, 8)), RES)
    with pytest.raises(DataError, match="NaN"):
        voxel_features(np.full((4, 8, 8), np.nan), RES)
    with pytest.raises(ConfigError, match="scales"):
        voxel_features(np.zeros((4, 8, 8)), RES, (0.0,))
    with pytest.raises(ConfigError, match="resolution"):
        voxel_features(np.zeros((4, 8, 8)), (1.0, 1.0))


# ---------------------------------------------------------------- pixel forest

BLOB_RADIUS_NM = 250.0
FOREST = PixelForestSettings(
    scales=SMALL_SCALES, n_trees=10, max_depth=8, samples_per_class=600, slab_z=3
)


def _blob_volume(centres_nm, seed, shape=(8, 48, 48)):
    """Bright blurred balls on a dim noisy background, and their labels."""
    balls = _balls(shape, RES, centres_nm, BLOB_RADIUS_NM)
    labels = np.zeros(shape, np.uint32)
    for index, ball in enumerate(balls):
        labels[ball] = index + 1
    rng = np.random.default_rng(seed)
    clean = ndi.gaussian_filter(60.0 * (labels > 0), (0.5, 1.0, 1.0)) + 5.0
    return (clean + rng.normal(0.0, 3.0, shape)).astype(np.float32), labels


TRAIN_CENTRES = [(800, 1000, 1000), (600, 1200, 3600), (1000, 3500, 1500), (800, 3400, 3600)]
TEST_CENTRES = [(800, 2400, 2400), (700, 800, 2500)]


@pytest.fixture(scope="module")
def trained():
    image, labels = _blob_volume(TRAIN_CENTRES, seed=0)
    return image, labels, train_pixel_forest(image, labels, RES, FOREST)


def test_forest_separates_blobs_from_background(trained):
    _, _, forest = trained
    image, labels = _blob_volume(TEST_CENTRES, seed=5)
    probability = forest.predict(image, RES)
    assert probability.shape == image.shape and probability.dtype == np.float32
    centres = np.round(np.array(TEST_CENTRES) / np.array(RES)).astype(int)
    assert np.all(probability[tuple(centres.T)] > 0.5)
    distance = ndi.distance_transform_edt(labels == 0, sampling=RES)
    far = distance > 600.0
    assert far.sum() > 1000
    assert np.all(probability[far] < 0.5)
    # Slab by slab equals all at once: the halo carries every slab's context.
    one_slab = dataclasses.replace(
        forest, settings=dataclasses.replace(FOREST, slab_z=image.shape[0])
    )
    np.testing.assert_array_equal(one_slab.predict(image, RES), probability)


def test_sample_is_balanced_with_its_band_share():
    _, labels = _blob_volume(TRAIN_CENTRES, seed=0)
    n_foreground = int((labels > 0).sum())
    assert n_foreground > 100
    settings = PixelForestSettings(samples_per_class=100, band_nm=200.0, band_share=0.3)
    indices, targets = sample_training_voxels(labels, RES, settings)
    assert len(np.unique(indices)) == len(indices) == 200
    assert np.array_equal(labels.ravel()[indices] > 0, targets == 1)
    assert (targets == 1).sum() == 100
    # Independent reference: scipy's anisotropic distance of background to the blobs.
    distance = ndi.distance_transform_edt(labels == 0, sampling=RES).ravel()
    assert (distance[indices[targets == 0]] <= 200.0).sum() == 30
    # Asking for more than there is takes every foreground voxel, and as many background.
    indices, targets = sample_training_voxels(
        labels, RES, dataclasses.replace(settings, samples_per_class=10**6)
    )
    assert (targets == 1).sum() == (targets == 0).sum() == n_foreground


def test_prediction_refuses_another_resolution(trained):
    image, _, forest = trained
    with pytest.raises(DataError, match="resolution"):
        predict_foreground(forest, image, (100.0, 100.0, 100.0))


def test_training_labels_need_both_classes():
    image = np.zeros((4, 16, 16), np.float32)
    with pytest.raises(DataError, match="foreground"):
        train_pixel_forest(image, np.zeros(image.shape, np.uint32), RES, FOREST)


def test_saved_forest_is_reused_until_the_training_volume_changes(tmp_path, monkeypatch, trained):
    image, labels, _ = trained
    calls = []
    real_train = pixel_forest.train_pixel_forest

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pixel_forest, "train_pixel_forest", counting_train)
    first = train_or_load_pixel_forest(image, labels, RES, FOREST, tmp_path)
    assert (tmp_path / FOREST_FILE).is_file() and len(calls) == 1
    again = train_or_load_pixel_forest(image, labels, RES, FOREST, tmp_path)
    assert len(calls) == 1 and again.fingerprint == first.fingerprint
    np.testing.assert_array_equal(again.predict(image, RES), first.predict(image, RES))

    changed = image.copy()
    changed[0, 0, 0] += 1.0
    retrained = train_or_load_pixel_forest(changed, labels, RES, FOREST, tmp_path)
    assert len(calls) == 2 and retrained.fingerprint != first.fingerprint
    assert load_pixel_forest(tmp_path).fingerprint == retrained.fingerprint
    fewer_trees = dataclasses.replace(FOREST, n_trees=5)
    train_or_load_pixel_forest(changed, labels, RES, fewer_trees, tmp_path)
    assert len(calls) == 3


def test_loading_a_missing_or_foreign_file_raises(tmp_path, trained):
    with pytest.raises(DataError, match=FOREST_FILE):
        load_pixel_forest(tmp_path)
    save_pixel_forest(trained[2], tmp_path)
    assert load_pixel_forest(tmp_path).settings == FOREST
    (tmp_path / FOREST_FILE).write_bytes(b"not a forest")
    with pytest.raises(DataError, match="not a saved pixel forest"):
        load_pixel_forest(tmp_path)


# ---------------------------------------------------------------- instance watershed

SPHERES_SHAPE = (12, 48, 48)
SPHERE_RADIUS = 800.0
# Two spheres 1300 nm apart touch through a neck of radius sqrt(800^2 - 650^2) = 466 nm;
# the third stands alone. The distance peaks at about 800 nm, so the touching pair's
# lower peak rises about 800 - 466 = 334 nm (less on the voxel grid) above the saddle.
SPHERE_CENTRES = [(1200, 1200, 1200), (1200, 1200, 2500), (1200, 3600, 3000)]


@pytest.fixture(scope="module")
def spheres():
    balls = _balls(SPHERES_SHAPE, RES, SPHERE_CENTRES, SPHERE_RADIUS)
    probability = np.where(balls.any(0), 0.9, 0.1)
    truth = np.zeros(SPHERES_SHAPE, np.uint32)
    for index in (2, 1, 0):  # the overlap of the touching pair goes to the first
        truth[balls[index]] = index + 1
    return balls, probability, truth


def test_touching_spheres_split_and_the_isolated_one_stays_whole(spheres):
    balls, probability, _ = spheres
    labels = instance_watershed(probability, RES, InstanceWatershedParams(h_nm=100.0))
    assert labels.dtype == np.uint32 and labels.max() == 3
    only = [balls[0] & ~balls[1], balls[1] & ~balls[0], balls[2]]
    ids = [np.unique(labels[region]) for region in only]
    assert all(len(found) == 1 and found[0] > 0 for found in ids)
    assert len({int(found[0]) for found in ids}) == 3
    assert np.array_equal(labels > 0, balls.any(0))
    # A seed height above the pair's peak-to-saddle rise merges them into one.
    merged = instance_watershed(probability, RES, InstanceWatershedParams(h_nm=400.0))
    assert merged.max() == 2
    assert len(np.unique(merged[balls[0] | balls[1]])) == 1


def test_blob_lower_than_h_is_kept_whole_beside_a_seeded_one():
    probability = np.zeros((10, 30, 30))
    probability[2:8, 4:24, 4:24] = 1.0  # its distance peaks at 600 nm (3 z voxels)
    probability[4:6, 26:29, 26:29] = 1.0  # its distance peaks at 200 nm
    params = InstanceWatershedParams(h_nm=300.0, min_size=0, distance_sigma_nm=0.0)
    labels = instance_watershed(probability, RES, params)
    assert labels.max() == 2 and np.array_equal(labels > 0, probability > 0.5)
    assert len(np.unique(labels[2:8, 4:24, 4:24])) == 1
    assert len(np.unique(labels[4:6, 26:29, 26:29])) == 1


def test_small_instances_are_removed_and_ids_renumbered():
    labels = np.zeros((4, 10, 10), np.int64)
    labels[0, :2, :2] = 5  # 4 voxels
    labels[2:, 3:, 3:] = 9  # 98 voxels
    labels[1, 8:, 0] = 7  # 2 voxels
    kept = remove_small_instances(labels, 4)
    assert kept.dtype == np.uint32
    assert set(np.unique(kept)) == {0, 1, 2}
    assert np.all(kept[0, :2, :2] == 1) and np.all(kept[2:, 3:, 3:] == 2)
    assert np.all(kept[1, 8:, 0] == 0)


def _count_score(predicted, true):
    """Toy score: minus the difference in the number of instances."""
    return -abs(int(predicted.max()) - int(true.max()))


def test_tuning_picks_the_best_scoring_grid_point(spheres):
    _, probability, truth = spheres
    grid = InstanceWatershedGrid(thresholds=(0.95, 0.5), hs_nm=(400.0, 100.0), min_sizes=(5000, 0))
    best, table = tune_instance_watershed(probability, truth, grid, _count_score, resolution=RES)
    assert len(table) == 8
    assert [(row.threshold, row.h_nm, row.min_size) for row in table[:2]] == [
        (0.95, 400.0, 5000),
        (0.95, 400.0, 0),
    ]
    # Above 0.9 nothing is foreground; min_size 5000 removes every sphere (about
    # 1000 voxels); h = 400 merges the pair: only (0.5, 100, 0) finds all three.
    assert (best.threshold, best.h_nm, best.min_size) == (0.5, 100.0, 0)
    assert max(table, key=lambda row: row.score).score == 0
    for row in table:
        params = InstanceWatershedParams(
            threshold=row.threshold, h_nm=row.h_nm, min_size=row.min_size
        )
        assert row.score == _count_score(instance_watershed(probability, RES, params), truth)
    assert sorted(row.score for row in table) == [-3] * 6 + [-1, 0]


def test_tuning_keeps_the_first_of_tied_grid_points(spheres):
    _, probability, truth = spheres
    grid = InstanceWatershedGrid(thresholds=(0.6, 0.5), hs_nm=(50.0,), min_sizes=(3, 1))
    best, table = tune_instance_watershed(
        probability, truth, grid, lambda predicted, true: 1.0, resolution=RES
    )
    assert (best.threshold, best.min_size) == (0.6, 3) and len(table) == 4


def test_tuning_rejects_a_non_finite_score_and_mismatched_shapes(spheres):
    _, probability, truth = spheres
    grid = InstanceWatershedGrid(thresholds=(0.5,), hs_nm=(50.0,), min_sizes=(0,))
    with pytest.raises(ConfigError, match="score_fn"):
        tune_instance_watershed(probability, truth, grid, lambda p, t: np.nan, resolution=RES)
    with pytest.raises(DataError, match="shape"):
        tune_instance_watershed(probability, truth[:-1], grid, _count_score, resolution=RES)
