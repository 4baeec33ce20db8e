"""Tests of the synthetic EM and fluorescence volumes (`synjax.data.synthetic`)."""

import edt
import numpy as np
import pytest

from synjax.data import synthetic, synthetic_em
from synjax.errors import ConfigError, DataError
from synjax.io.cremi import SynapseSummary, partner_table, synapse_pairs, synapse_summary
from synjax.io.cremi_volume import (
    CREMI_BACKGROUND,
    POSTSYNAPTIC_SITE,
    PRESYNAPTIC_SITE,
    Annotations,
    CremiVolume,
)
from synjax.io.voxels import world_to_voxel

SMALL_SHAPE = (12, 128, 128)
RES = np.array([40.0, 4.0, 4.0])
FACE_OFFSETS = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], np.int64
)


@pytest.fixture(scope="module")
def default_volume() -> CremiVolume:
    return synthetic.make_em_volume(seed=0)


@pytest.fixture(scope="module")
def small_volume() -> CremiVolume:
    return synthetic.make_em_volume(shape=SMALL_SHAPE, seed=3, n_synapses=4)


def _face_neighbour_labels(labels: np.ndarray, voxels: np.ndarray) -> np.ndarray:
    """[k, 7] labels of voxels and their 6 face neighbours (0 outside the volume)."""
    padded = np.pad(labels, 1)
    steps = np.concatenate([np.zeros((1, 3), np.int64), FACE_OFFSETS])
    at = voxels[:, None, :] + 1 + steps[None, :, :]
    return padded[at[..., 0], at[..., 1], at[..., 2]]


def _touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        differ = lo != hi
        pairs |= set(zip(lo[differ].tolist(), hi[differ].tolist(), strict=True))
    return pairs | {(b, a) for a, b in pairs}


def _site_voxels(volume: CremiVolume) -> dict[int, np.ndarray]:
    voxels = world_to_voxel(volume.annotations.locations, volume.resolution, volume.offset)
    return dict(zip(volume.annotations.ids.tolist(), voxels, strict=True))


# --- EM volumes --------------------------------------------------------------


def test_em_shapes_dtypes_and_dense_labels(default_volume):
    v = default_volume
    assert v.raw.shape == v.neuron_ids.shape == v.clefts.shape == (32, 256, 256)
    assert v.raw.dtype == np.uint8
    assert v.neuron_ids.dtype == v.clefts.dtype == np.uint64
    assert v.resolution == (40.0, 4.0, 4.0)
    ids = np.unique(v.neuron_ids)
    assert ids[0] == 1 and np.array_equal(ids, np.arange(1, len(ids) + 1))
    # ~400 nm neurons in a 1.3 x 1.0 x 1.0 um volume: tens of them.
    assert 15 <= len(ids) <= 120
    mito = v.labels["mitochondria"]
    assert mito.dtype == np.uint64 and mito.max() >= 1
    assert v.raw.std() > 10  # not a constant image


def test_em_same_seed_same_volume_different_seed_differs(small_volume):
    again = synthetic.make_em_volume(shape=SMALL_SHAPE, seed=3, n_synapses=4)
    for name in ("raw", "neuron_ids", "clefts"):
        assert np.array_equal(getattr(small_volume, name), getattr(again, name)), name
    assert np.array_equal(small_volume.annotations.locations, again.annotations.locations)
    assert np.array_equal(small_volume.annotations.partners, again.annotations.partners)
    other = synthetic.make_em_volume(shape=SMALL_SHAPE, seed=4, n_synapses=4)
    assert not np.array_equal(small_volume.raw, other.raw)
    assert not np.array_equal(small_volume.neuron_ids, other.neuron_ids)


def test_dyadic_and_polyadic_present_by_default(default_volume):
    summary = synapse_summary(default_volume)
    assert len(summary) >= 6
    n_posts = [len(s.post_segments) for s in summary]
    assert 1 in n_posts
    assert any(2 <= n <= 4 for n in n_posts)
    assert max(n_posts) <= 4
    assert sorted(s.cleft_id for s in summary) == list(range(1, len(summary) + 1))


def test_polyadic_fraction_extremes():
    dyadic = synthetic.make_em_volume(SMALL_SHAPE, seed=1, n_synapses=3, polyadic_fraction=0.0)
    assert all(not s.polyadic for s in synapse_summary(dyadic))
    poly = synthetic.make_em_volume(SMALL_SHAPE, seed=1, n_synapses=3, polyadic_fraction=1.0)
    summary = synapse_summary(poly)
    assert summary and all(s.polyadic for s in summary)


@pytest.mark.parametrize("fixture", ["default_volume", "small_volume"])
def test_partners_are_touching_neurons(fixture, request):
    volume = request.getfixturevalue(fixture)
    touching = _touching_pairs(volume.neuron_ids)
    pairs = synapse_pairs(synapse_summary(volume))
    assert len(pairs)
    for _, pre, post in pairs.tolist():
        assert pre != post and (pre, post) in touching


@pytest.mark.parametrize("fixture", ["default_volume", "small_volume"])
def test_every_cleft_voxel_lies_between_pre_and_a_post(fixture, request):
    """Cleft voxel: in pre or a post, with pre and a post among itself + 6 face neighbours."""
    volume = request.getfixturevalue(fixture)
    summary = synapse_summary(volume)
    labelled = volume.clefts != CREMI_BACKGROUND
    assert set(np.unique(volume.clefts[labelled]).tolist()) == {s.cleft_id for s in summary}
    for s in summary:
        voxels = np.argwhere(volume.clefts == s.cleft_id)
        hood = _face_neighbour_labels(volume.neuron_ids, voxels)
        partners = [s.pre_segment, *s.post_segments]
        assert np.isin(hood[:, 0], partners).all()
        assert (hood == s.pre_segment).any(axis=1).all()
        assert np.isin(hood, s.post_segments).any(axis=1).all()
        # Every post neuron has its own share of the cleft.
        for post in s.post_segments:
            assert (hood[:, 0] == post).sum() > 0


@pytest.mark.parametrize("fixture", ["default_volume", "small_volume"])
def test_sites_inside_their_neurons_near_the_cleft(fixture, request):
    volume = request.getfixturevalue(fixture)
    ann = volume.annotations
    assert len(np.unique(ann.ids)) == len(ann.ids)
    type_of = dict(zip(ann.ids.tolist(), ann.types.tolist(), strict=True))
    sites = _site_voxels(volume)
    for s in synapse_summary(volume):
        assert type_of[s.pre_annotation] == PRESYNAPTIC_SITE
        cleft_nm = np.argwhere(volume.clefts == s.cleft_id) * RES
        # The segment under each site is a partner the cleft itself touches.
        cleft_owners = set(volume.neuron_ids[volume.clefts == s.cleft_id].tolist())
        assert cleft_owners == {s.pre_segment, *s.post_segments}
        for site, segment in [(s.pre_annotation, s.pre_segment)] + list(
            zip(s.post_annotations, s.post_segments, strict=True)
        ):
            assert volume.neuron_ids[tuple(sites[site])] == segment
            distance = np.linalg.norm(cleft_nm - sites[site] * RES, axis=1).min()
            assert 50.0 <= distance <= 150.0
        for site in s.post_annotations:
            assert type_of[site] == POSTSYNAPTIC_SITE


def test_locations_follow_the_offset():
    offset = (400.0, -80.0, 1000.0)
    plain = synthetic.make_em_volume(SMALL_SHAPE, seed=2, n_synapses=2)
    shifted = synthetic.make_em_volume(SMALL_SHAPE, seed=2, n_synapses=2, offset=offset)
    assert len(plain.annotations) > 0
    np.testing.assert_allclose(
        shifted.annotations.locations - plain.annotations.locations,
        np.broadcast_to(offset, plain.annotations.locations.shape),
    )
    assert shifted.offset == offset
    # Locations are voxel centres: index * resolution.
    index = plain.annotations.locations / RES
    np.testing.assert_allclose(index, np.round(index))


def test_cleft_darker_than_cytoplasm_and_cues_show_direction(default_volume):
    v = default_volume
    raw = v.raw.astype(np.float64)
    flat_z = (1e6, 4.0, 4.0)
    from_membrane = edt.edt(v.neuron_ids, anisotropy=flat_z, black_border=False)
    cytoplasm = raw[(from_membrane > 60.0) & (v.labels["mitochondria"] == 0)].mean()
    cleft = raw[v.clefts != CREMI_BACKGROUND].mean()
    assert cleft < cytoplasm - 100.0

    cleft_mask = v.clefts != CREMI_BACKGROUND
    dist = edt.edt(~cleft_mask, anisotropy=tuple(RES), black_border=False)
    pre_near = np.zeros(v.raw.shape, bool)
    post_near = np.zeros(v.raw.shape, bool)
    for s in synapse_summary(v):
        near = dist <= 200.0
        pre_near |= near & (v.neuron_ids == s.pre_segment)
        post_near |= near & np.isin(v.neuron_ids, s.post_segments)
    overlap = pre_near & post_near  # a neuron that is pre here and post elsewhere
    pre_near &= ~overlap
    post_near &= ~overlap
    band = (dist >= 12.0) & (dist <= 24.0)
    cloud = (dist >= 40.0) & (dist <= 160.0)
    # PSD: the post side right next to the cleft is darker than the pre side.
    assert raw[post_near & band].mean() < raw[pre_near & band].mean() - 30.0
    # Vesicles: the pre side further in is darker than the post side.
    assert raw[pre_near & cloud].mean() < raw[post_near & cloud].mean() - 10.0


def test_unknown_setting_and_bad_arguments_raise():
    with pytest.raises(ConfigError, match="membrane_thicknes"):
        synthetic.make_em_volume(SMALL_SHAPE, membrane_thicknes=3.0)
    with pytest.raises(ConfigError, match="polyadic_fraction"):
        synthetic.make_em_volume(SMALL_SHAPE, polyadic_fraction=1.5)
    with pytest.raises(ConfigError, match="shape"):
        synthetic.make_em_volume((4, 4))


def test_summary_needs_ground_truth():
    with pytest.raises(DataError, match="annotations"):
        synapse_summary(CremiVolume(raw=None, resolution=(40.0, 4.0, 4.0)))


def test_synapse_pairs_rows():
    summary = [
        SynapseSummary(3, 7, (8,), 1, (2,), False),
        SynapseSummary(5, 9, (1, 2), 3, (4, 6), True),
    ]
    expected = [[3, 7, 8], [5, 9, 1], [5, 9, 2]]
    assert synapse_pairs(summary).tolist() == expected
    assert synapse_pairs([]).shape == (0, 3)


def test_summary_on_hand_made_volume():
    labels = np.ones((1, 4, 4), np.uint64)
    labels[:, :, 2:] = 2
    clefts = np.full(labels.shape, CREMI_BACKGROUND, np.uint64)
    clefts[0, 1:3, 1:3] = 9
    ann = Annotations(
        ids=np.array([10, 11], np.uint64),
        locations=np.array([[0.0, 4.0, 0.0], [0.0, 4.0, 12.0]]) + [100.0, 0.0, 0.0],
        types=np.array([PRESYNAPTIC_SITE, POSTSYNAPTIC_SITE], dtype=object),
        partners=np.array([[10, 11]], np.uint64),
    )
    volume = CremiVolume(None, (40.0, 4.0, 4.0), (100.0, 0.0, 0.0), labels, clefts, ann)
    (s,) = synapse_summary(volume)
    assert (s.cleft_id, s.pre_segment, s.post_segments, s.polyadic) == (9, 1, (2,), False)


def test_summary_rounds_half_voxels_up_like_partner_table():
    labels = np.ones((1, 4, 4), np.uint64)
    labels[:, :, 3:] = 2
    clefts = np.full(labels.shape, CREMI_BACKGROUND, np.uint64)
    clefts[0, 1:3, 2:4] = 9
    # The pre site sits half-way between x voxels 2 (neuron 1) and 3 (neuron
    # 2): 10 nm = 2.5 voxels goes up, to neuron 2 (np.round would say 1).
    ann = Annotations(
        ids=np.array([10, 11], np.uint64),
        locations=np.array([[0.0, 4.0, 10.0], [0.0, 4.0, 0.0]]),
        types=np.array([PRESYNAPTIC_SITE, POSTSYNAPTIC_SITE], dtype=object),
        partners=np.array([[10, 11]], np.uint64),
    )
    volume = CremiVolume(None, (40.0, 4.0, 4.0), (0.0, 0.0, 0.0), labels, clefts, ann)
    (s,) = synapse_summary(volume)
    assert (s.pre_segment, s.post_segments) == (2, (1,))
    table = partner_table(volume)
    assert (table["pre_segment"].tolist(), table["post_segment"].tolist()) == ([2], [1])


# --- geometry helpers, hand-computed -----------------------------------------


def test_in_plane_interfaces_hand_computed():
    labels = np.array([[[1, 2], [1, 3]], [[4, 4], [4, 4]]], np.uint64)
    index, own, other = synthetic_em.in_plane_interfaces(labels)
    rows = set(zip(index.tolist(), own.tolist(), other.tolist(), strict=True))
    # Flat indices in section 0: 0=(0,0) 1=(0,1) 2=(1,0) 3=(1,1); z faces ignored.
    expected = {(0, 1, 2), (1, 2, 1), (2, 1, 3), (3, 3, 1), (1, 2, 3), (3, 3, 2)}
    assert rows == expected


def test_distance_to_is_anisotropic_and_bounded():
    mask = np.zeros((3, 1, 40), bool)
    mask[0, 0, 0] = True
    dist = synthetic_em.distance_to(mask, RES, reach_nm=50.0)
    assert dist[0, 0, 0] == 0.0
    assert dist[0, 0, 2] == pytest.approx(8.0)
    assert dist[1, 0, 0] == pytest.approx(40.0)
    assert dist[1, 0, 3] == pytest.approx(np.hypot(40.0, 12.0))
    # Beyond the reach (50 nm -> 13 voxels in x) nothing is computed.
    assert np.isinf(dist[0, 0, 20])


def test_ellipsoid_mask_hand_computed():
    q = synthetic_em.ellipsoid_mask(
        (3, 21, 21), np.array([1, 10, 10]), np.array([40.0, 40.0, 20.0]), 0.0, RES
    )
    assert q[1, 10, 10] == 0.0
    assert q[0, 10, 10] == pytest.approx(1.0)  # one section = 40 nm = z semi-axis
    assert q[1, 20, 10] == pytest.approx(1.0)  # 10 voxels * 4 nm along y
    assert q[1, 10, 15] == pytest.approx(1.0)  # 5 voxels * 4 nm along x
    rotated = synthetic_em.ellipsoid_mask(
        (3, 21, 21), np.array([1, 10, 10]), np.array([40.0, 40.0, 20.0]), np.pi / 2, RES
    )
    assert rotated[1, 10, 20] == pytest.approx(1.0)  # long axis now along x


def test_pick_site_prefers_depth_within_range():
    dist = np.array([[[10.0, 60.0, 100.0, 140.0, 200.0]]])
    depth = np.array([[[5.0, 10.0, 30.0, 50.0, 90.0]]])
    inside = np.ones(dist.shape, bool)
    # Scores in range: 10 - 0.25*40 = 0, 30 - 0 = 30, min(50, 40) - 10 = 30 -> first max.
    site = synthetic_em.pick_site(inside, dist, depth, (50.0, 150.0), 40.0)
    assert site.tolist() == [0, 0, 2]
    inside[0, 0, 1:4] = False
    assert synthetic_em.pick_site(inside, dist, depth, (50.0, 150.0), 40.0) is None


def test_smooth_noise_unit_variance_and_smooth():
    rng = np.random.default_rng(0)
    field = synthetic_em.smooth_noise(rng, (8, 64, 64), RES, 40.0)
    assert field.shape == (8, 64, 64) and field.dtype == np.float32
    assert 0.7 < field.std() < 1.3
    # Neighbours 4 nm apart (a tenth of the correlation length) are nearly equal.
    step = np.abs(np.diff(field, axis=2)).mean()
    assert step < 0.2 * np.abs(field).mean()


# --- fluorescence -------------------------------------------------------------


@pytest.fixture(scope="module")
def fluorescence():
    return synthetic.make_fluorescence_volume(seed=0)


def test_fluorescence_shapes_and_determinism(fluorescence):
    image, labels = fluorescence
    assert image.shape == labels.shape == (32, 128, 128)
    assert image.dtype == np.float32 and labels.dtype == np.uint32
    image2, labels2 = synthetic.make_fluorescence_volume(seed=0)
    assert np.array_equal(image, image2) and np.array_equal(labels, labels2)
    image3, _ = synthetic.make_fluorescence_volume(seed=1)
    assert not np.array_equal(image, image3)


def test_fluorescence_count_size_brightness_touching(fluorescence):
    image, labels = fluorescence
    ids = np.unique(labels)
    assert np.array_equal(ids, np.arange(len(ids)))
    volume_um3 = 32 * 0.2 * 128 * 0.1 * 128 * 0.1
    requested = synthetic.FluorescenceSyntheticSettings().density * volume_um3
    assert 0.7 * requested <= len(ids) - 1 <= 1.1 * requested
    sizes = np.bincount(labels.ravel())[1:]
    diameters_nm = np.cbrt(sizes * 200.0 * 100.0 * 100.0 * 6.0 / np.pi)
    assert 350.0 <= np.median(diameters_nm) <= 700.0
    assert image[labels > 0].mean() > 2.0 * image[labels == 0].mean()
    touching = {(a, b) for a, b in _touching_pairs(labels) if a and b}
    assert len(touching) >= 0.1 * (len(ids) - 1)


def test_fluorescence_density_and_psf():
    _, sparse = synthetic.make_fluorescence_volume((8, 64, 64), seed=2, density=0.5)
    _, dense = synthetic.make_fluorescence_volume((8, 64, 64), seed=2, density=2.0)
    assert sparse.max() < dense.max()
    with pytest.raises(ConfigError, match="brightnes"):
        synthetic.make_fluorescence_volume(brightnes=3.0)


def _moments(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    grid = np.indices(weights.shape).reshape(3, -1).astype(np.float64)
    w = weights.ravel() / weights.sum()
    mean = grid @ w
    return mean, ((grid - mean[:, None]) ** 2) @ w


def test_fluorescence_psf_adds_its_variance():
    """Blurring adds the PSF's variance: var(image) = var(punctum) + sigma_psf^2 per axis."""
    shape, res, fwhm = (24, 48, 48), np.array([200.0, 100.0, 100.0]), (800.0, 300.0, 300.0)
    for seed in range(40):
        image, labels = synthetic.make_fluorescence_volume(
            shape,
            res,
            seed=seed,
            density=0.02,
            read_noise=0.0,
            background_photons=0.0,
            brightness_photons=1e6,
            psf_fwhm_nm=fwhm,
        )
        if labels.max() != 1:
            continue
        centre, _ = _moments((labels > 0).astype(np.float64))
        # Far enough from the border that the blur is not cut.
        if np.all(np.abs(centre - np.array(shape) / 2) < 0.25 * np.array(shape)):
            break
    else:
        pytest.fail("no seed gave a single central punctum")
    _, var_object = _moments((labels > 0).astype(np.float64))
    _, var_image = _moments(image)
    sigma_vox = np.asarray(fwhm) / (2.0 * np.sqrt(2.0 * np.log(2.0))) / res
    np.testing.assert_allclose(var_image - var_object, sigma_vox**2, rtol=0.15)


def test_save_em_volume_round_trip(tmp_path, small_volume):
    cremi = pytest.importorskip("synjax.io.cremi")
    path = tmp_path / "synthetic.h5"
    synthetic.save_em_volume(path, small_volume)
    back = cremi.read_cremi(path)
    assert np.array_equal(back.raw, small_volume.raw)
    assert np.array_equal(back.clefts, small_volume.clefts)
    assert np.array_equal(back.annotations.partners, small_volume.annotations.partners)
