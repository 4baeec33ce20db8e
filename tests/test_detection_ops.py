"""Detection ops (synjax.detection) against hand-computed values and NumPy references.

The references here are written independently of the ops: plain loops, the
obvious formula, no shared code beyond NumPy.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.detection import (
    DEFAULT_SCALE_CLAMP,
    assign_levels,
    box_volume,
    cartesian_sizes,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    level_anchors,
    match,
    multilevel_roi_align,
    pairwise_intersection,
    pairwise_iou,
    pyramid_anchors,
    sample_labels,
    select_proposals,
)
from synjax.detection.nms import nms
from synjax.detection.roi_align import roi_align
from synjax.errors import ConfigError, DataError

# ----------------------------------------------------------------- references


def np_iou_pair(a, b, dtype=np.float32):
    """IoU of two boxes, one multiplication at a time, in `dtype`."""
    a, b = np.asarray(a, dtype), np.asarray(b, dtype)
    inter = dtype(1)
    vol_a = dtype(1)
    vol_b = dtype(1)
    for d in range(3):
        inter = inter * max(min(a[d + 3], b[d + 3]) - max(a[d], b[d]), dtype(0))
        vol_a = vol_a * max(a[d + 3] - a[d], dtype(0))
        vol_b = vol_b * max(b[d + 3] - b[d], dtype(0))
    union = vol_a + vol_b - inter
    return dtype(inter / union) if union > 0 else dtype(0)


def np_greedy_nms(boxes, scores, threshold, max_outputs, valid=None, groups=None):
    """Plain greedy NMS: visit by score (stable), keep unless a kept box overlaps > threshold."""
    n = len(boxes)
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    groups = np.zeros(n, int) if groups is None else np.asarray(groups)
    ok = valid & (np.asarray(scores) > -np.inf)
    order = sorted(range(n), key=lambda i: -scores[i])  # Python's sort is stable
    kept = []
    for i in order:
        if not ok[i] or len(kept) == max_outputs:
            continue
        if all(
            groups[k] != groups[i] or not np_iou_pair(boxes[k], boxes[i]) > np.float32(threshold)
            for k in kept
        ):
            kept.append(i)
    return kept


def np_interpolate(values, point):
    """Trilinear read of `values` [z, y, x] at index-space `point`, torchvision's border rule."""
    weights = []
    for coord, size in zip(point, values.shape, strict=True):
        if coord < -1.0 or coord > size:
            return 0.0
        coord = max(coord, 0.0)
        low = int(math.floor(coord))
        if low >= size - 1:
            weights.append({size - 1: 1.0})
        else:
            frac = coord - low
            weights.append({low: 1.0 - frac, low + 1: frac})
    total = 0.0
    for (iz, wz), (iy, wy), (ix, wx) in itertools.product(*(w.items() for w in weights)):
        total += wz * wy * wx * values[iz, iy, ix]
    return total


def np_roi_align(features, boxes, out, scale, ratio):
    """ROIAlign by loops over boxes, bins, samples (aligned=True)."""
    result = np.zeros((len(boxes), *out, features.shape[-1]))
    for n, box in enumerate(np.asarray(boxes, np.float64)):
        start = box[:3] * scale - 0.5
        size = (box[3:] - box[:3]) * scale / out
        for bins in itertools.product(*(range(o) for o in out)):
            for samples in itertools.product(*(range(r) for r in ratio)):
                point = [
                    start[a] + (bins[a] + (samples[a] + 0.5) / ratio[a]) * size[a] for a in range(3)
                ]
                for c in range(features.shape[-1]):
                    result[(n, *bins, c)] += np_interpolate(features[..., c], point)
        result[n] /= np.prod(ratio)
    return result


def random_int_boxes(rng, n, extent=20, max_size=8):
    lo = rng.integers(0, extent, (n, 3))
    return np.concatenate([lo, lo + rng.integers(1, max_size, (n, 3))], 1).astype(np.float32)


jit_nms = jax.jit(nms, static_argnames=("max_outputs", "tile_size"))


def kept(indices, valid):
    return [int(i) for i in np.asarray(indices)[np.asarray(valid)]]


# ------------------------------------------------------------------------ iou


def test_volume_and_iou_by_hand():
    boxes = jnp.array(
        [
            [0, 0, 0, 2, 2, 2],  # a: 8 voxels
            [1, 1, 1, 3, 3, 3],  # b: shares 1 voxel with a
            [0, 0, 0, 2, 2, 4],  # c: contains a, 16 voxels
            [2, 0, 0, 4, 2, 2],  # d: touches a's face, shares nothing
            [1, 1, 1, 1, 2, 2],  # e: degenerate (no depth)
        ],
        jnp.float32,
    )
    np.testing.assert_allclose(box_volume(boxes), [8, 8, 16, 8, 0])
    np.testing.assert_allclose(box_volume(jnp.array([[3.0, 0, 0, 1, 2, 2]])), [0.0])
    iou = np.asarray(jax.jit(pairwise_iou)(boxes, boxes))
    np.testing.assert_allclose(iou[0], [1, 1 / 15, 0.5, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(iou[1, 2], 2 / 22, rtol=1e-6)  # b and c share 1x1x2 voxels
    assert iou[4, 4] == 0  # a degenerate box overlaps nothing, not even itself
    np.testing.assert_allclose(pairwise_intersection(boxes[:1], boxes[2:3]), [[8.0]])


def test_iou_matches_reference_on_random_boxes():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 10, (13, 6)).astype(np.float32)
    b = rng.uniform(0, 10, (7, 6)).astype(np.float32)
    a[:, 3:] = a[:, :3] + rng.uniform(0.5, 6, (13, 3))
    b[:, 3:] = b[:, :3] + rng.uniform(0.5, 6, (7, 3))
    expected = [[np_iou_pair(x, y, np.float64) for y in b] for x in a]
    np.testing.assert_allclose(pairwise_iou(a, b), expected, rtol=1e-5, atol=1e-7)


def test_iou_rejects_boxes_without_six_coordinates():
    with pytest.raises(DataError, match=r"pairwise_intersection: boxes_a .*expected \[n, 6\]"):
        pairwise_iou(jnp.zeros((3, 4)), jnp.zeros((2, 6)))


# ------------------------------------------------------------------ box coder


def test_encode_by_hand_with_weights():
    reference = jnp.array([[0.0, 0, 0, 2, 4, 8]])  # centre (1, 2, 4), size (2, 4, 8)
    target = jnp.array([[0.0, 0, 0, 4, 4, 4]])  # centre (2, 2, 2), size (4, 4, 4)
    expected = [0.5, 0.0, -0.25, math.log(2), 0.0, math.log(0.5)]
    np.testing.assert_allclose(encode_boxes(reference, target)[0], expected, atol=1e-6)
    weights = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)
    np.testing.assert_allclose(
        encode_boxes(reference, target, weights)[0],
        np.array(expected) * weights,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        decode_boxes(reference, jnp.array([expected]))[0], [0, 0, 0, 4, 4, 4], atol=1e-5
    )


def test_decode_inverts_encode():
    rng = np.random.default_rng(1)
    weights = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)

    def random_boxes(n):
        lo = rng.uniform(-20, 20, (n, 3))
        return np.concatenate([lo, lo + rng.uniform(0.5, 30, (n, 3))], 1).astype(np.float32)

    reference, target = random_boxes(50), random_boxes(50)
    deltas = jax.jit(encode_boxes, static_argnums=2)(reference, target, weights)
    round_trip = jax.jit(decode_boxes, static_argnums=2)(reference, deltas, weights)
    np.testing.assert_allclose(round_trip, target, rtol=1e-5, atol=1e-4)


def test_decode_clamps_the_log_size():
    reference = jnp.array([[0.0, 0, 0, 2, 2, 2]])
    boxes = decode_boxes(reference, jnp.array([[0.0, 0, 0, 50.0, 0, -1.0]]))
    size = np.asarray(boxes[0, 3:] - boxes[0, :3])
    np.testing.assert_allclose(size, [2 * 1000 / 16, 2, 2 * math.exp(-1)], rtol=1e-5)
    np.testing.assert_allclose(DEFAULT_SCALE_CLAMP, math.log(62.5))
    np.testing.assert_allclose(boxes[0, :3] + boxes[0, 3:], [2, 2, 2], atol=1e-4)  # centre kept


def test_clip_boxes():
    boxes = jnp.array([[-1.0, 2, 3, 5, 40, 9], [12.0, 0, 0, 14, 1, 1]])
    np.testing.assert_allclose(
        clip_boxes(boxes, (10, 20, 30)), [[0, 2, 3, 5, 20, 9], [10, 0, 0, 10, 1, 1]]
    )


def test_box_coder_rejects_bad_weights():
    with pytest.raises(ConfigError, match="encode_boxes: weights"):
        encode_boxes(jnp.ones((1, 6)), jnp.ones((1, 6)), weights=(1.0, 1.0))


# -------------------------------------------------------------------- anchors


def test_cartesian_sizes():
    np.testing.assert_array_equal(
        cartesian_sizes((2, 4), (3,), (5, 6)), [[2, 3, 5], [2, 3, 6], [4, 3, 5], [4, 3, 6]]
    )


def test_level_anchors_by_hand():
    anchors = jax.jit(lambda: level_anchors((1, 2, 2), (2, 4, 4), [(2, 4, 4), (4, 8, 8)]))()
    # Cells centred at z 1, y in {2, 6}, x in {2, 6}; two sizes per cell, size-minor.
    expected = []
    for cy, cx in [(2, 2), (2, 6), (6, 2), (6, 6)]:
        for dz, dy, dx in [(2, 4, 4), (4, 8, 8)]:
            expected.append(
                [1 - dz / 2, cy - dy / 2, cx - dx / 2, 1 + dz / 2, cy + dy / 2, cx + dx / 2]
            )
    np.testing.assert_allclose(anchors, expected)
    shifted = level_anchors((1, 1, 1), 4, [(4, 4, 4)], offset=0.0)
    np.testing.assert_allclose(shifted, [[-2, -2, -2, 2, 2, 2]])


def test_pyramid_anchors_counts_and_levels():
    sizes = [[(2, 2, 2), (4, 4, 4), (8, 8, 8)], [(4, 8, 8)]]
    levels = pyramid_anchors([(4, 12, 12), (2, 6, 6)], [(1, 4, 4), (2, 8, 8)], sizes)
    assert [a.shape for a in levels] == [(4 * 12 * 12 * 3, 6), (2 * 6 * 6, 6)]
    np.testing.assert_array_equal(levels[1], level_anchors((2, 6, 6), (2, 8, 8), sizes[1]))
    with pytest.raises(ConfigError, match="level_anchors: sizes"):
        level_anchors((1, 1, 1), 1, [(2, 2)])


# ------------------------------------------------------------------------ nms


def test_nms_by_hand_is_greedy_and_strict():
    boxes = jnp.array(
        [
            [0.0, 0, 0, 2, 2, 2],  # A, best
            [0.0, 0, 0, 2, 2, 4],  # B: IoU(A, B) = 0.5
            [0.0, 0, 2, 2, 2, 4],  # C: IoU(A, C) = 0, IoU(B, C) = 0.5
        ]
    )
    scores = jnp.array([0.9, 0.8, 0.7])
    # B falls to A, so C (overlapping only B) survives: greedy, not transitive.
    assert kept(*jit_nms(boxes, scores, 0.4, max_outputs=4)) == [0, 2]
    indices, valid = jit_nms(boxes, scores, 0.5, max_outputs=4)
    assert kept(indices, valid) == [0, 1, 2]  # IoU 0.5 is not > 0.5
    np.testing.assert_array_equal(valid, [True, True, True, False])
    assert indices[3] == 0 and indices.dtype == jnp.int32


@pytest.mark.parametrize("tile_size", [5, 16, 256])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.7])
def test_nms_equals_greedy_reference_with_ties_and_duplicates(tile_size, threshold):
    rng = np.random.default_rng(int(threshold * 10) + tile_size)
    boxes = random_int_boxes(rng, 150)
    boxes[100:120] = boxes[:20]  # identical boxes
    scores = rng.integers(0, 6, 150).astype(np.float32)  # many ties
    scores[100:110] = scores[:10]  # identical boxes with identical scores
    expected = np_greedy_nms(boxes, scores, threshold, 60)
    indices, valid = jit_nms(boxes, scores, threshold, max_outputs=60, tile_size=tile_size)
    assert kept(indices, valid) == expected
    assert len(expected) > 5  # not trivial


def test_nms_equals_reference_on_float_boxes():
    rng = np.random.default_rng(7)
    lo = rng.uniform(0, 30, (300, 3))
    boxes = np.concatenate([lo, lo + rng.uniform(1, 10, (300, 3))], 1).astype(np.float32)
    scores = rng.random(300).astype(np.float32)
    expected = np_greedy_nms(boxes, scores, 0.3, 300)
    assert kept(*jit_nms(boxes, scores, 0.3, max_outputs=300, tile_size=64)) == expected


def test_nms_ignores_padding_and_respects_groups():
    rng = np.random.default_rng(3)
    boxes = random_int_boxes(rng, 40)
    scores = rng.random(40).astype(np.float32)
    expected = np_greedy_nms(boxes, scores, 0.3, 40)
    # Padding copies of the best box with higher scores: masked or -inf, never kept.
    best = boxes[np.argmax(scores)]
    padded_boxes = np.concatenate([boxes, np.tile(best, (6, 1))])
    high = np.concatenate([scores, np.full(6, 2.0, np.float32)])
    valid = np.arange(46) < 40
    assert kept(*jit_nms(padded_boxes, high, 0.3, 40, valid=valid, tile_size=8)) == expected
    minus_inf = np.where(valid, high, -np.inf).astype(np.float32)
    assert kept(*jit_nms(padded_boxes, minus_inf, 0.3, 40, tile_size=8)) == expected
    # Two identical boxes in different groups do not suppress each other.
    same = jnp.array([[0.0, 0, 0, 2, 2, 2]] * 3)
    groups = jnp.array([0, 1, 0])
    assert kept(*jit_nms(same, jnp.array([0.5, 0.6, 0.7]), 0.5, 3, groups=groups)) == [2, 1]
    groups = rng.integers(0, 3, 40)
    expected = np_greedy_nms(boxes, scores, 0.1, 40, groups=groups)
    assert kept(*jit_nms(boxes, scores, 0.1, 40, groups=groups, tile_size=8)) == expected


def test_nms_stops_at_max_outputs_and_handles_empty_input():
    rng = np.random.default_rng(4)
    boxes = random_int_boxes(rng, 100, extent=40)
    scores = rng.random(100).astype(np.float32)
    full = np_greedy_nms(boxes, scores, 0.2, 100)
    assert len(full) > 12
    assert kept(*jit_nms(boxes, scores, 0.2, 12, tile_size=8)) == full[:12]
    indices, valid = nms(jnp.zeros((0, 6)), jnp.zeros(0), 0.5, 3)
    assert indices.shape == (3,) and not np.asarray(valid).any()


def test_nms_under_vmap():
    rng = np.random.default_rng(5)
    boxes = np.stack([random_int_boxes(rng, 64) for _ in range(3)])
    scores = rng.random((3, 64)).astype(np.float32)
    indices, valid = jax.jit(jax.vmap(lambda b, s: nms(b, s, 0.25, 32, tile_size=16)))(
        boxes, scores
    )
    for i in range(3):
        assert kept(indices[i], valid[i]) == np_greedy_nms(boxes[i], scores[i], 0.25, 32)


def test_nms_rejects_bad_input():
    with pytest.raises(DataError, match=r"nms: scores has shape \(4,\); expected \(3,\)"):
        nms(jnp.zeros((3, 6)), jnp.zeros(4), 0.5, 2)
    with pytest.raises(ConfigError, match="nms: max_outputs=0"):
        nms(jnp.zeros((3, 6)), jnp.zeros(3), 0.5, 0)


# ------------------------------------------------------------------ roi align


def test_roi_align_one_voxel_by_hand():
    features = np.zeros((4, 4, 4, 1), np.float32)
    features[1, 1, 1, 0] = 8.0
    box = jnp.array([[1.0, 1, 1, 2, 2, 2]])  # exactly voxel (1, 1, 1)
    np.testing.assert_allclose(roi_align(features, box, 1, sampling_ratio=1), [[[[[8.0]]]]])
    # Two samples per axis at 1.25 and 1.75 read voxel 1 with weight 0.75 each:
    # 8 * 0.75^3 = 3.375.
    np.testing.assert_allclose(roi_align(features, box, 1, sampling_ratio=2)[0, 0, 0, 0], [3.375])


def test_roi_align_border_rule_by_hand():
    ones = jnp.ones((2, 2, 2, 1))
    boxes = jnp.array(
        [
            [-2.0, 0, 0, -1, 2, 2],  # sample at z -1.5: index -2, more than a voxel out
            [-1.0, 0, 0, 0, 2, 2],  # sample at z -0.5: index -1, reads the border
        ]
    )
    np.testing.assert_allclose(roi_align(ones, boxes, 1, sampling_ratio=1)[:, 0, 0, 0, 0], [0, 1])


@pytest.mark.parametrize(
    ("scale", "out", "ratio"),
    [(1.0, (2, 3, 4), (1, 2, 3)), ((1.0, 0.5, 0.25), (3, 2, 2), (2, 2, 1))],
)
def test_roi_align_of_a_linear_ramp_is_exact(scale, out, ratio):
    shape = (6, 9, 11)
    slopes = np.array([[1.5, -2.0], [0.25, 0.5], [-0.75, 3.0]])  # per axis, per channel
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in shape), indexing="ij"), -1)
    features = (grid @ slopes + np.array([2.0, -1.0])).astype(np.float32)
    scales = np.broadcast_to(np.asarray(scale, np.float64), (3,))
    # Boxes whose samples stay between the first and last voxel centres.
    rng = np.random.default_rng(6)
    lo = rng.uniform(0.5, 2.0, (5, 3))
    hi = lo + rng.uniform(1.0, 3.5, (5, 3))
    boxes = np.concatenate([lo, hi], 1) / np.tile(scales, 2)
    pooled = jax.jit(lambda f, b: roi_align(f, b, out, scale, ratio))(features, boxes)
    # Each bin's value is the ramp at the bin's centre (in feature index space).
    start, size = boxes[:, :3] * scales - 0.5, (boxes[:, 3:] - boxes[:, :3]) * scales / out
    centres = np.stack(
        np.meshgrid(*(np.arange(o) + 0.5 for o in out), indexing="ij"), -1
    )  # [oz, oy, ox, 3]
    points = start[:, None, None, None, :] + centres[None] * size[:, None, None, None, :]
    expected = points @ slopes + np.array([2.0, -1.0])
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-4)


def test_roi_align_matches_loop_reference_and_batches():
    rng = np.random.default_rng(8)
    features = rng.normal(size=(5, 6, 7, 2)).astype(np.float32)
    lo = rng.uniform(-2, 5, (7, 3))
    boxes = np.concatenate([lo, lo + rng.uniform(0.5, 5, (7, 3))], 1).astype(np.float32)
    expected = np_roi_align(features, boxes, (2, 2, 3), np.array([1.0, 1.0, 1.0]), (2, 1, 2))
    for step in (None, 3):
        pooled = jax.jit(lambda f, b, s=step: roi_align(f, b, (2, 2, 3), 1.0, (2, 1, 2), s))(
            features, boxes
        )
        np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-5)
    batch = jax.jit(jax.vmap(lambda f, b: roi_align(f, b, (2, 2, 3), 1.0, (2, 1, 2))))(
        np.stack([features, -features]), np.stack([boxes, boxes])
    )
    np.testing.assert_allclose(batch[1], -expected, rtol=1e-5, atol=1e-5)


def test_assign_levels_by_hand_and_multilevel_pooling():
    boxes = jnp.array(
        [
            [0.0, 0, 0, 8, 8, 8],  # size 8: canonical, level 1
            [0.0, 0, 0, 16, 16, 16],  # size 16: level 2
            [0.0, 0, 0, 4, 4, 4],  # size 4: level 0
            [0.0, 0, 0, 2, 2, 2],  # size 2: clipped to level 0
            [0.0, 0, 0, 64, 64, 64],  # size 64: clipped to level 2
            [0.0, 0, 0, 2, 8, 32],  # volume 512: size 8, level 1
        ]
    )
    levels = jax.jit(lambda b: assign_levels(b, num_levels=3, canonical_size=8, canonical_level=1))(
        boxes
    )
    np.testing.assert_array_equal(levels, [1, 2, 0, 0, 2, 1])
    rng = np.random.default_rng(9)
    fine = rng.normal(size=(8, 8, 8, 3)).astype(np.float32)
    coarse = rng.normal(size=(4, 4, 4, 3)).astype(np.float32)
    small = jnp.array([[1.0, 1, 1, 5, 5, 5], [2.0, 2, 2, 7, 6, 7]])
    pooled = jax.jit(
        lambda f, c, b: multilevel_roi_align([f, c], b, jnp.array([1, 0]), 2, [1.0, 0.5])
    )(fine, coarse, small)
    np.testing.assert_allclose(pooled[0], roi_align(coarse, small[:1], 2, 0.5)[0], rtol=1e-6)
    np.testing.assert_allclose(pooled[1], roi_align(fine, small[1:], 2, 1.0)[0], rtol=1e-6)


# ------------------------------------------------------------------ proposals


def test_select_proposals_by_hand():
    anchors = jnp.array(
        [
            [0.0, 0, 0, 4, 4, 4],  # A
            [0.0, 0, 1, 4, 4, 5],  # B: IoU(A, B) = 48 / 80 = 0.6
            [10.0, 10, 10, 12, 12, 12],  # C: far away
            [0.0, 0, 30, 2, 2, 31],  # D: clipped to nothing at x 30, dropped
        ]
    )
    scores = jnp.array([0.9, 0.8, 0.1, 0.95])
    deltas = jnp.zeros((4, 6)).at[2, 0].set(0.5)  # C moves 0.5 * 2 = 1 voxel along z
    run = jax.jit(
        lambda a, s, d, k: select_proposals([a], [s], [d], (20, 20, 30), k, 4, 0.5),
        static_argnums=3,
    )
    boxes, out_scores, levels, valid = run(anchors, scores, deltas, 4)
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_allclose(boxes[:2], [[0, 0, 0, 4, 4, 4], [11, 10, 10, 13, 12, 12]])
    np.testing.assert_allclose(out_scores, [0.9, 0.1, 0, 0])
    np.testing.assert_array_equal(levels, [0, 0, 0, 0])
    # With 3 candidates per level, C is never considered.
    _, out_scores, _, valid = run(anchors, scores, deltas, 3)
    np.testing.assert_array_equal(valid, [True, False, False, False])


def test_select_proposals_keeps_levels_apart_and_batches():
    anchors = jnp.array([[0.0, 0, 0, 4, 4, 4]])
    deltas = jnp.zeros((1, 6))

    def run(s0, s1):
        return select_proposals([anchors, anchors], [s0, s1], [deltas, deltas], (8, 8, 8), 5, 3)

    boxes, scores, levels, valid = jax.jit(jax.vmap(run))(
        jnp.array([[0.3], [0.9]]), jnp.array([[0.6], [0.2]])
    )
    np.testing.assert_array_equal(valid, [[True, True, False]] * 2)
    np.testing.assert_array_equal(levels[:, :2], [[1, 0], [0, 1]])  # identical boxes, both kept
    np.testing.assert_allclose(scores[:, :2], [[0.6, 0.3], [0.9, 0.2]])


# ---------------------------------------------------------------- fixed shapes


def test_every_op_has_data_independent_shapes():
    f32 = jax.ShapeDtypeStruct
    boxes = f32((50, 6), jnp.float32)
    scores = f32((50,), jnp.float32)
    shapes = {
        "iou": (jax.eval_shape(pairwise_iou, boxes, f32((7, 6), jnp.float32)), (50, 7)),
        "nms": (jax.eval_shape(lambda b, s: nms(b, s, 0.5, 9)[0], boxes, scores), (9,)),
        "match": (
            jax.eval_shape(lambda i, v: match(i, v)[1], f32((50, 4), jnp.float32), f32((4,), bool)),
            (50,),
        ),
        "sample": (
            jax.eval_shape(
                lambda k, lab: sample_labels(k, lab, 16, 0.5)[1],
                jax.random.key(0),
                f32((50,), jnp.int32),
            ),
            (16,),
        ),
        "roi_align": (
            jax.eval_shape(
                lambda f, b: roi_align(f, b, (2, 3, 3), 0.5),
                f32((8, 16, 16, 4), jnp.float32),
                boxes,
            ),
            (50, 2, 3, 3, 4),
        ),
        "proposals": (
            jax.eval_shape(
                lambda s, d: select_proposals([jnp.zeros((50, 6))], [s], [d], (8, 8, 8), 20, 10)[0],
                scores,
                boxes,
            ),
            (10, 6),
        ),
    }
    for name, (result, expected) in shapes.items():
        assert result.shape == expected, name
