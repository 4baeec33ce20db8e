"""Tests of synjax.targets.signed_proximity with hand-computed values."""

import math

import numpy as np
import pytest

from synjax.errors import DataError
from synjax.targets import signed_proximity as sp

ALPHA, SIGMA = 5.0, 10.0
# ssTEM-like anisotropy: one z step is ten in-plane steps.
RES = (40.0, 4.0, 4.0)


def paper_formula(d, alpha=ALPHA, sigma=SIGMA):
    """The paper's formula written literally, with the logistic, for one scalar."""
    return math.exp(-(d**2) / (2 * sigma**2)) * (2 / (1 + math.exp(-alpha * d)) - 1)


def test_signed_proximity_matches_paper_formula_1d():
    d = np.array([-30.0, -10.0, -1.0, -0.2, 0.0, 0.2, 1.0, 10.0, 30.0])
    got = sp.signed_proximity(d, ALPHA, SIGMA)
    expected = np.array([paper_formula(v) for v in d])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert got[4] == 0.0
    np.testing.assert_allclose(got[::-1], -got, atol=1e-15)
    assert np.all(got[:4] < 0) and np.all(got[5:] > 0)
    # One unit from the contact the field is nearly saturated: tanh(2.5).
    assert got[6] == pytest.approx(math.exp(-1 / 200) * math.tanh(2.5))
    assert got[6] > 0.98


def test_signed_proximity_infinite_distance_is_zero():
    got = sp.signed_proximity(np.array([-np.inf, np.inf]))
    np.testing.assert_array_equal(got, [0.0, 0.0])


def line_volume():
    """[1, 1, 7]: pre at x = 0..2, contact at x = 3, post at x = 4..6."""
    pre = np.zeros((1, 1, 7), bool)
    post = np.zeros((1, 1, 7), bool)
    contact = np.zeros((1, 1, 7), bool)
    pre[..., :3] = True
    contact[..., 3] = True
    post[..., 4:] = True
    return pre, post, contact


def test_signed_contact_distance_line():
    pre, post, contact = line_volume()
    d = sp.signed_contact_distance(pre, post, RES, contact)
    np.testing.assert_allclose(d[0, 0], [12, 8, 4, 0, -4, -8, -12])


def test_signed_contact_distance_without_contact_uses_interface():
    pre = np.zeros((1, 1, 4), bool)
    post = np.zeros((1, 1, 4), bool)
    pre[..., :2] = True
    post[..., 2:] = True
    d = sp.signed_contact_distance(pre, post, RES)
    np.testing.assert_allclose(d[0, 0], [8, 4, -4, -8])


def test_target_on_line_in_inplane_voxel_units():
    pre, post, contact = line_volume()
    target = sp.signed_proximity_target(pre, post, RES, ALPHA, SIGMA, contact=contact)
    assert target.dtype == np.float32
    # Default unit = finest voxel (4 nm): d = 3, 2, 1, 0, -1, -2, -3.
    expected = [paper_formula(v) for v in (3, 2, 1, 0, -1, -2, -3)]
    np.testing.assert_allclose(target[0, 0], expected, rtol=1e-6)
    # An explicit unit of 1 nm makes d = 12 nm etc.
    target_nm = sp.signed_proximity_target(
        pre, post, RES, ALPHA, SIGMA, contact=contact, distance_unit_nm=1.0
    )
    assert target_nm[0, 0, 0] == pytest.approx(paper_formula(12.0), rel=1e-6)


def test_target_anisotropy_z_vs_x():
    contact = np.zeros((3, 3, 3), bool)
    contact[1, 1, 1] = True
    pre = np.zeros_like(contact)
    pre[0, 1, 1] = True  # one voxel away along z: 40 nm = 10 in-plane voxels
    pre[1, 1, 0] = True  # one voxel away along x: 4 nm = 1 in-plane voxel
    post = np.zeros_like(contact)
    post[1, 1, 2] = True
    target = sp.signed_proximity_target(pre, post, RES, ALPHA, SIGMA, contact=contact)
    assert target[0, 1, 1] == pytest.approx(paper_formula(10.0), rel=1e-6)
    assert target[1, 1, 0] == pytest.approx(paper_formula(1.0), rel=1e-6)
    assert target[0, 1, 1] != pytest.approx(target[1, 1, 0])
    assert target[1, 1, 2] == pytest.approx(-target[1, 1, 0])
    assert target[1, 1, 1] == 0.0 and target[2, 2, 2] == 0.0


def test_target_rejects_overlapping_masks():
    mask = np.ones((1, 2, 2), bool)
    with pytest.raises(DataError, match="overlap"):
        sp.signed_proximity_target(mask, mask, RES)


def brute_force_within(cleft_mask, radius_nm, resolution):
    """[z, y, x] bool: voxels within radius of any cleft voxel, all pairs compared."""
    grid = np.stack(np.indices(cleft_mask.shape), -1).reshape(-1, 3) * np.asarray(resolution)
    cleft_points = grid[cleft_mask.reshape(-1)]
    dist = np.sqrt(((grid[:, None, :] - cleft_points[None, :, :]) ** 2).sum(-1)).min(1)
    return (dist <= radius_nm).reshape(cleft_mask.shape)


def two_neuron_volume():
    """Pre neuron 5 (x < 6) facing post neurons 9 (y < 5) and 11 (y >= 5).

    Cleft 3 straddles the contact at z = 1, y = 4..5, x = 5..6.
    """
    shape = (3, 10, 12)
    neurons = np.full(shape, 5, np.uint64)
    neurons[:, :5, 6:] = 9
    neurons[:, 5:, 6:] = 11
    clefts = np.zeros(shape, np.uint64)
    clefts[1, 4:6, 5:7] = 3
    return clefts, neurons


def test_partner_masks_polyadic_two_post_neurons():
    clefts, neurons = two_neuron_volume()
    pairs = np.array(
        [
            [3, 5, 9],
            [3, 5, 11],
            [99, 5, 9],  # cleft outside this volume: ignored
            [3, 0, 9],  # unlabelled pre segment: ignored
        ],
        np.uint64,
    )
    radius = 10.0
    pre, post = sp.partner_masks(clefts, neurons, pairs, RES, radius)
    within = brute_force_within(clefts == 3, radius, RES)
    np.testing.assert_array_equal(pre, within & (neurons == 5))
    np.testing.assert_array_equal(post, within & ((neurons == 9) | (neurons == 11)))
    # By hand: 8 nm in-plane is inside the radius, 12 nm and one z step are not.
    assert pre[1, 4, 3] and not pre[1, 4, 2] and not pre[0, 4, 5]
    assert post[1, 4, 8] and post[1, 6, 8] and not post[1, 4, 9]
    assert post[1, 3, 6] and neurons[1, 3, 6] == 9 and post[1, 6, 6] and neurons[1, 6, 6] == 11
    assert not np.any(pre & post)


def test_partner_masks_nearest_cleft_wins_and_cremi_background():
    shape = (1, 1, 12)
    neurons = np.array([[[1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]]], np.uint64)
    background = np.uint64(0xFFFFFFFFFFFFFFFF)
    clefts = np.full(shape, background)
    clefts[0, 0, 3] = 7  # neuron 1 -> neuron 2
    clefts[0, 0, 8] = 8  # neuron 2 -> neuron 1
    pairs = np.array([[7, 1, 2], [8, 2, 1]], np.uint64)
    pre, post = sp.partner_masks(clefts, neurons, pairs, (1.0, 1.0, 1.0), 10.0, background)
    # Every voxel is within 10 nm of both clefts; each takes the nearer one's role.
    np.testing.assert_array_equal(pre[0, 0], [1, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(post[0, 0], [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1])


def test_partner_masks_then_target_signs():
    clefts, neurons = two_neuron_volume()
    pairs = np.array([[3, 5, 9], [3, 5, 11]], np.uint64)
    pre, post = sp.partner_masks(clefts, neurons, pairs, RES, 10.0)
    target = sp.signed_proximity_target(pre, post, RES, contact=clefts != 0)
    assert np.all(target[pre & (clefts == 0)] > 0)
    assert np.all(target[post & (clefts == 0)] < 0)
    assert np.all(target[~(pre | post)] == 0)


def test_partner_masks_rejects_bad_input():
    clefts, neurons = two_neuron_volume()
    with pytest.raises(DataError, match="pairs"):
        sp.partner_masks(clefts, neurons, np.zeros((2, 2), np.uint64), RES, 10.0)
    with pytest.raises(DataError, match="shape"):
        sp.partner_masks(clefts, neurons[:, :5], np.zeros((0, 3), np.uint64), RES, 10.0)
    with pytest.raises(DataError, match="same id"):
        sp.partner_masks(clefts, neurons, np.array([[3, 5, 5]], np.uint64), RES, 10.0)


def test_balanced_weights_by_hand():
    target = np.zeros(10, np.float32)
    target[[2, 7]] = [0.5, -0.9]
    target[4] = 0.005  # below the synaptic threshold: background
    w = sp.balanced_weights(target)
    # 2 synaptic of 10 voxels: 10 / (2 * 2) = 2.5; 8 background: 10 / 16.
    np.testing.assert_allclose(w[[2, 7]], 2.5)
    np.testing.assert_allclose(np.delete(w, [2, 7]), 0.625)
    assert w[[2, 7]].sum() == pytest.approx(np.delete(w, [2, 7]).sum())
    assert w.mean() == pytest.approx(1.0)


def test_balanced_weights_mask_and_single_class():
    target = np.array([0.9, 0.0, 0.0, 0.0, -0.5])
    mask = np.array([1, 1, 1, 0, 0], bool)
    w = sp.balanced_weights(target, mask=mask)
    np.testing.assert_allclose(w, [1.5, 0.75, 0.75, 0.0, 0.0])
    np.testing.assert_array_equal(sp.balanced_weights(np.zeros(4)), np.ones(4))


def test_three_class_target():
    pre = np.array([[[1, 0, 0, 0]]], bool)
    post = np.array([[[0, 0, 1, 1]]], bool)
    labels = sp.three_class_target(pre, post)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels[0, 0], [sp.PRE_CLASS, sp.REST_CLASS, 2, 2])
    with pytest.raises(DataError, match="overlap"):
        sp.three_class_target(pre, pre)
