"""The anchor matcher (dense and tiled) and fixed-count label sampling: by hand, cross-checked."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.detection import match, match_boxes, pairwise_iou, sample_labels

# -------------------------------------------------------------------- matcher


IOU = jnp.array(
    [
        # gt0   gt1   gt2   gt3 (padding)
        [0.80, 0.10, 0.00, 0.00],  # a0: foreground for gt0
        [0.50, 0.20, 0.28, 0.00],  # a1: between thresholds, but ties gt2's best
        [0.10, 0.25, 0.28, 0.00],  # a2: below 0.3, yet ties gt2's best
        [0.00, 0.00, 0.00, 0.95],  # a3: only the padding column overlaps
        [0.20, 0.90, 0.00, 0.00],  # a4: foreground for gt1
        [0.10, 0.50, 0.00, 0.00],  # a5: ignored
    ]
)
GT_VALID = jnp.array([True, True, True, False])


def test_match_thresholds_and_low_quality_by_hand():
    matched, labels = jax.jit(match)(IOU, GT_VALID)
    np.testing.assert_array_equal(labels, [1, 1, 1, 0, 1, -1])
    np.testing.assert_array_equal(matched, [0, 0, 2, 0, 1, 1])  # argmax, not the low-quality gt
    _, plain = match(IOU, GT_VALID, allow_low_quality_matches=False)
    np.testing.assert_array_equal(plain, [1, -1, 0, 0, 1, -1])
    _, masked = match(IOU, GT_VALID, anchor_valid=jnp.array([1, 1, 0, 1, 1, 1], bool))
    np.testing.assert_array_equal(masked, [1, 1, -1, 0, 1, -1])


def test_match_without_ground_truth_is_all_background():
    matched, labels = match(IOU, jnp.zeros(4, bool))
    np.testing.assert_array_equal(labels, np.zeros(6))
    np.testing.assert_array_equal(matched, np.zeros(6))
    # A valid box overlapping no anchor makes no anchor foreground.
    _, labels = match(jnp.zeros((3, 1)), jnp.ones(1, bool))
    np.testing.assert_array_equal(labels, [0, 0, 0])


def test_sample_labels_counts_and_order():
    labels = jnp.array([1, 1, 1] + [0] * 10 + [-1] * 5)
    sampled, indices, valid = jax.jit(sample_labels, static_argnums=(2, 3))(
        jax.random.key(0), labels, 8, 0.25
    )
    sampled, indices, valid = map(np.asarray, (sampled, indices, valid))
    assert (sampled == 1).sum() == 2 and (sampled == 0).sum() == 6
    assert np.all(sampled[sampled >= 0] == np.asarray(labels)[sampled >= 0])
    assert valid.all() and len(set(indices.tolist())) == 8
    np.testing.assert_array_equal(sampled[indices], [1, 1, 0, 0, 0, 0, 0, 0])
    # Too few candidates: every one is taken and the rest of the slots are padding.
    few = jnp.array([1, 0, -1, 0])
    sampled, indices, valid = sample_labels(jax.random.key(1), few, 8, 0.5)
    np.testing.assert_array_equal(sampled, [1, 0, -1, 0])
    np.testing.assert_array_equal(valid, [True] * 3 + [False] * 5)
    assert sorted(np.asarray(indices)[:3].tolist()[1:]) == [1, 3] and indices[0] == 0


def test_sample_labels_draws_uniformly():
    labels = jnp.array([0] * 10 + [1] * 4)
    keys = jax.random.split(jax.random.key(2), 2000)
    sampled, _, _ = jax.vmap(lambda k: sample_labels(k, labels, 8, 0.25))(keys)
    chosen = np.asarray(sampled >= 0).mean(axis=0)
    # 6 of 10 negatives and 2 of 4 positives per draw.
    np.testing.assert_allclose(chosen, [0.6] * 10 + [0.5] * 4, atol=0.05)


# ------------------------------------------------------- match_boxes (tiled)


def _random_boxes(rng, count, extent=20, largest=8):
    low = rng.integers(0, extent, (count, 3)).astype(np.float32)
    size = rng.integers(1, largest, (count, 3)).astype(np.float32)
    return np.concatenate([low, low + size], axis=1)


@pytest.mark.parametrize(
    "thresholds, low_quality, tile, candidates",
    [((0.3, 0.7), True, 7, 3), ((0.0, 0.5), True, 24, 16), ((0.5, 0.5), False, 5, 2)],
)
def test_match_boxes_equals_match_of_the_dense_iou(thresholds, low_quality, tile, candidates):
    low, high = thresholds
    rng = np.random.default_rng(7)
    run = jax.jit(lambda a, b, v: match_boxes(a, b, v, high, low, low_quality, tile, candidates))
    for trial in range(8):
        # 101 boxes: not a multiple of the tile; with few candidates per round,
        # crowded tiles need several rounds.
        anchors = _random_boxes(rng, 101)
        gt = _random_boxes(rng, 23)
        if trial % 2:  # identical boxes: ties broken towards the lower index
            gt[len(gt) // 2] = gt[0]
            anchors[len(anchors) // 2] = anchors[0]
        valid = rng.random(len(gt)) < 0.8
        expected = match(pairwise_iou(anchors, gt), valid, high, low, low_quality)
        got = run(anchors, gt, valid)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_array_equal(got[0], expected[0])


def test_match_boxes_by_hand_and_without_ground_truth():
    # Anchor 0 is gt 0 itself (IoU 1); anchor 1 overlaps gt 1 at IoU 1/2 (its best,
    # so foreground by the low-quality rule); anchor 2 overlaps nothing.
    anchors = jnp.array([[0, 0, 0, 2, 2, 2], [10, 10, 10, 12, 12, 12], [30, 30, 30, 31, 31, 31]])
    gt = jnp.array([[0, 0, 0, 2, 2, 2], [10, 10, 10, 12, 12, 13], [0, 0, 0, 1, 1, 1]], jnp.float32)
    matched, labels = match_boxes(
        anchors.astype(jnp.float32), gt, jnp.array([1, 1, 0], bool), tile_size=2, candidates=1
    )
    np.testing.assert_array_equal(labels, [1, 1, 0])
    np.testing.assert_array_equal(matched[:2], [0, 1])
    _, labels = match_boxes(anchors.astype(jnp.float32), gt, jnp.zeros(3, bool))
    np.testing.assert_array_equal(labels, [0, 0, 0])


def test_sample_labels_takes_the_lowest_priorities_like_a_stable_sort():
    # With many equal priorities a top-k must pick what a stable argsort picks.
    labels = jnp.array([1, 0] * 300 + [-1] * 50)
    for seed in range(5):
        key = jax.random.key(seed)
        sampled, _, _ = sample_labels(key, labels, 64, 0.25)
        priority = np.asarray(jax.random.uniform(key, (labels.shape[0],)))
        for value, count in ((1, 16), (0, 48)):
            candidates = np.asarray(labels) == value
            order = np.argsort(np.where(candidates, priority, 2.0), kind="stable")[:count]
            expected = np.zeros(labels.shape[0], bool)
            expected[order] = True
            np.testing.assert_array_equal(np.asarray(sampled) == value, expected)
