"""The EM instance network and its helpers: backbone, training step, painting and fusion of
block detections, Grad-CAM, the baseline's components, training crops, the read grid.

Expected values are computed by hand in the comments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from synjax.detection.heads import BoxHeadSettings, MaskHeadSettings
from synjax.detection.rpn import RPNSettings
from synjax.errors import ConfigError, DataError
from synjax.inference.instance_blocks import Painting, detect_blocks, fuse_detections, paint_block
from synjax.inference.saliency import grad_cam
from synjax.io.instance_table import instance_rows
from synjax.models.instance_unet import (
    InstanceUNetSettings,
    UNetBackbone,
    UNetBackboneSettings,
    build_instance_unet,
)
from synjax.pipelines.instance_data import downsample, upsample
from synjax.postprocess.components import cleft_components, tune_components
from synjax.stages.instance_unet import TrainingCrops
from tests.two_stage_training import train_on_fixed_batch

TINY_BACKBONE = UNetBackboneSettings(base_features=4, pool_factors=((1, 2, 2), (2, 2, 2)))


def _tiny_settings(**overrides) -> InstanceUNetSettings:
    fields = dict(
        backbone=TINY_BACKBONE,
        neck_features=8,
        rpn_level=1,
        roi_level=1,
        anchor_sizes=((2.0, 8.0, 8.0), (2.0, 12.0, 12.0)),
        rpn=RPNSettings(features=8),
        box_head=BoxHeadSettings(roi_size=(2, 4, 4), hidden_features=16),
        mask_head=MaskHeadSettings(features=8, num_convs=1, upsample_factors=(1, 2, 2)),
        mask_roi_size=(2, 4, 4),
        rpn_samples=32,
        train_pre_nms=64,
        train_post_nms=16,
        test_pre_nms=64,
        test_post_nms=16,
        roi_samples=16,
        max_instances=4,
        detections=8,
    )
    fields.update(overrides)
    return InstanceUNetSettings(**fields)


def _fixed_batch() -> np.ndarray:
    """Two [4, 32, 32] patches, each with two bright slabs (clefts) on noise."""
    rng = np.random.default_rng(0)
    batch = np.zeros((2, 4, 32, 32, 2), np.float32)
    batch[..., 0] = rng.normal(0.0, 0.1, batch.shape[:-1])
    for b, ((z0, y0, x0), (z1, y1, x1)) in enumerate(
        [((1, 4, 4), (0, 18, 16)), ((0, 20, 6), (2, 4, 20))]
    ):
        batch[b, z0 : z0 + 2, y0 : y0 + 8, x0 : x0 + 10, 1] = 1
        batch[b, z1 : z1 + 2, y1 : y1 + 10, x1 : x1 + 8, 1] = 2
    batch[..., 0] += (batch[..., 1] > 0) * 1.0
    return batch


def test_backbone_maps_have_the_decoder_strides():
    model = UNetBackbone(TINY_BACKBONE)
    x = jnp.zeros((1, 4, 32, 32, 1))
    variables = jax.jit(model.init)(jax.random.key(0), x)
    maps = jax.jit(model.apply)(variables, x)
    # Level l: stride prod(pools[:l]), 4 * 2**l channels.
    assert TINY_BACKBONE.feature_strides == {"D0": (1, 1, 1), "D1": (1, 2, 2)}
    assert TINY_BACKBONE.input_multiple == (2, 4, 4)
    assert maps["D0"].shape == (1, 4, 32, 32, 4)
    assert maps["D1"].shape == (1, 4, 16, 16, 8)
    with pytest.raises(DataError, match=r"multiples of \(2, 4, 4\)"):
        model.apply(variables, jnp.zeros((1, 3, 32, 32, 1)))


def test_settings_name_bad_levels_and_anchors():
    with pytest.raises(ConfigError, match="rpn_level=2"):
        _tiny_settings(rpn_level=2)
    with pytest.raises(ConfigError, match="anchor_sizes"):
        _tiny_settings(anchor_sizes=((2.0, 0.0, 8.0),))
    # The RPN gets one anchor per size whatever its settings said.
    assert _tiny_settings(rpn=RPNSettings(features=8, num_anchors=5)).rpn.num_anchors == 2


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    settings = _tiny_settings()
    model = build_instance_unet(settings, training=True)
    batch = jnp.asarray(_fixed_batch())
    params, first, later = train_on_fixed_batch(model, batch, steps=6)
    # Each of the first steps lowers the loss (later ones find more foreground ROIs,
    # whose box terms then join the loss, so the total is compared early).
    losses = [float(out["loss"]) for out in [first, *later]]
    out = later[-1]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < losses[0] - 0.05
    assert float(out["mask"]) < 0.95 * float(first["mask"])

    detector = build_instance_unet(settings)
    det = jax.jit(lambda p, x: detector.apply({"params": p}, x))(params, batch[..., :1])
    assert det["boxes"].shape == (2, 8, 6)
    assert det["masks"].shape == (2, 8, 2, 8, 8)  # mask_roi_size (2, 4, 4) x (1, 2, 2)
    scores, valid = np.asarray(det["scores"]), np.asarray(det["valid"])
    assert np.all(scores[~valid] == 0)
    assert np.all(np.diff(scores[0][valid[0]]) <= 0)

    # Grad-CAM of the first valid detection: in [0, 1], its maximum 1 unless nothing
    # is positive evidence; read on the (1, 2, 2) ROI map and repeated to the input
    # grid, so constant within each 1 x 2 x 2 cell.
    box = np.asarray(det["boxes"][0, :1])
    heat = grad_cam(detector, params, np.asarray(batch[0, ..., 0]), box)
    assert heat.shape == (1, 4, 32, 32)
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() == pytest.approx(1.0) or heat.max() == 0.0
    cells = heat[0].reshape(4, 16, 2, 16, 2)
    np.testing.assert_array_equal(cells, np.broadcast_to(cells[:, :, :1, :, :1], cells.shape))
    assert grad_cam(detector, params, np.asarray(batch[0, ..., 0]), np.zeros((0, 6))).shape == (
        0,
        4,
        32,
        32,
    )


def test_semantic_head_trains_with_the_detector_and_gives_a_cleft_probability():
    plain = build_instance_unet(_tiny_settings(), training=True)
    settings = _tiny_settings(semantic_weight=2.0, semantic_positive_weight=10.0)
    model = build_instance_unet(settings, training=True)
    batch = jnp.asarray(_fixed_batch())
    params = jax.jit(model.init)(jax.random.key(1), batch[:1])["params"]
    # One 1x1x1 convolution on D0 (4 channels): 4 weights and a bias more.
    assert "semantic_head" in params
    plain_params = jax.jit(plain.init)(jax.random.key(1), batch[:1])["params"]
    count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert count(params) - count(plain_params) == 5
    out = jax.jit(lambda p: model.apply({"params": p}, batch))(params)
    # The semantic term is 2 x the positive-weighted BCE of its logits on "any cleft".
    logits = model.apply(
        {"params": params},
        batch[..., :1],
        method=lambda m, x: m.semantic_head(m.maps(x)["D0"])[..., 0],
    )
    targets = (batch[..., 1] > 0).astype(jnp.float32)
    per_voxel = optax.sigmoid_binary_cross_entropy(logits, targets)
    weights = jnp.where(targets > 0, 10.0, 1.0)
    expected = 2.0 * float(jnp.sum(weights * per_voxel) / jnp.sum(weights))
    assert float(out["semantic"]) == pytest.approx(expected, rel=1e-5)
    total = sum(float(out[k]) for k in ("rpn_objectness", "rpn_box", "roi_class", "roi_box"))
    assert float(out["loss"]) == pytest.approx(total + float(out["mask"]) + expected, rel=1e-5)

    tx = optax.adam(3e-3)

    @jax.jit
    def step(params, opt_state):
        (_, out), grads = jax.value_and_grad(
            lambda p: (lambda o: (o["loss"], o))(model.apply({"params": p}, batch)), has_aux=True
        )(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, out

    opt_state = tx.init(params)
    first = None
    for _ in range(8):
        params, opt_state, out = step(params, opt_state)
        first = first or out
    # 1.38 -> 1.15 measured after 8 steps; 0.9 leaves room for float rounding.
    assert float(out["semantic"]) < 0.9 * float(first["semantic"])
    det = jax.jit(lambda p, x: build_instance_unet(settings).apply({"params": p}, x))(
        params, batch[..., :1]
    )
    assert det["semantic"].shape == (2, 4, 32, 32)
    semantic = np.asarray(det["semantic"])
    assert semantic.min() >= 0.0 and semantic.max() <= 1.0
    # Trained a few steps on this batch, clefts already read higher than background.
    clefts = np.asarray(batch[..., 1] > 0)
    assert semantic[clefts].mean() > semantic[~clefts].mean() + 0.05
    # Without the head, no semantic output.
    assert "semantic" not in jax.eval_shape(
        lambda p, x: build_instance_unet(_tiny_settings()).apply({"params": p}, x),
        plain_params,
        batch[..., :1],
    )


def test_paint_block_gives_each_voxel_to_the_highest_score():
    full = np.ones((1, 2, 2), np.float32)
    detections = {
        # Box 0 covers y 0..3, x 0..3 of z 0; box 1 (higher score) y 2..5, x 2..5.
        "boxes": np.asarray([[0, 0, 0, 1, 4, 4], [0, 2, 2, 1, 6, 6], [0, 0, 6, 1, 2, 8]], float),
        "scores": np.asarray([0.6, 0.9, 0.2], np.float32),
        "masks": np.stack([full, full, full]),
    }
    labels, scores = paint_block(detections, (1, 8, 8), Painting(0.3, 0.5))
    expected = np.zeros((1, 8, 8), np.uint32)
    expected[0, 0:4, 0:4] = 2
    expected[0, 2:6, 2:6] = 1  # painted first, keeps the shared 2x2 corner
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_allclose(scores, [0.9, 0.6])
    # A detection whose voxels are all taken is dropped; the rest keep 1..k.
    detections["boxes"][0] = [0, 2, 2, 1, 4, 4]
    labels, scores = paint_block(detections, (1, 8, 8), Painting(0.3, 0.5))
    assert labels.max() == 1 and scores.tolist() == [pytest.approx(0.9)]


def test_paint_block_drops_a_detection_with_too_few_free_voxels():
    full = np.ones((1, 2, 2), np.float32)
    detections = {
        # Box 1 (0.9) y 2..5, x 2..5; box 0 (0.6) y 0..3, x 0..3: 4 of its 16 voxels
        # are taken, 12 free (0.75).
        "boxes": np.asarray([[0, 0, 0, 1, 4, 4], [0, 2, 2, 1, 6, 6]], float),
        "scores": np.asarray([0.6, 0.9], np.float32),
        "masks": np.stack([full, full]),
    }
    labels, _ = paint_block(detections, (1, 8, 8), Painting(0.3, 0.5, min_free_fraction=0.75))
    assert labels.max() == 2 and (labels == 2).sum() == 12
    labels, scores = paint_block(detections, (1, 8, 8), Painting(0.3, 0.5, min_free_fraction=0.8))
    assert labels.max() == 1 and (labels == 1).sum() == 16
    np.testing.assert_allclose(scores, [0.9])


def test_keep_large_instances_by_hand():
    from synjax.postprocess.components import keep_large_instances

    # Sizes of ids 1..4: 5, 1, 9, 3; at 3 ids 1, 3, 4 stay as 1, 2, 3.
    np.testing.assert_array_equal(
        keep_large_instances(np.asarray([5, 1, 9, 3]), 3), [0, 1, 0, 2, 3]
    )
    np.testing.assert_array_equal(keep_large_instances(np.asarray([5, 1]), 0), [0, 1, 2])
    with pytest.raises(ConfigError, match="min_size=-1"):
        keep_large_instances(np.asarray([1]), -1)


def _two_box_detections():
    """Two 1 x 4 x 4 boxes side by side; the mask head says the left half of each."""
    half = np.zeros((1, 4, 4), np.float32)
    half[..., :2] = 1.0
    semantic = np.zeros((1, 4, 8), np.float32)
    # Box 0 (x 0..3): cleft probability 0.8 over its whole box; box 1 (x 4..7): 0.1.
    semantic[..., 0:4] = 0.8
    semantic[..., 4:8] = 0.1
    return {
        "boxes": np.asarray([[0, 0, 0, 1, 4, 4], [0, 0, 4, 1, 4, 8]], float),
        "scores": np.asarray([0.6, 0.9], np.float32),
        "masks": np.stack([half, half]),
        "semantic": semantic,
    }


def test_paint_block_semantic_rescoring_multiplies_by_the_mean_over_the_mask():
    detections = _two_box_detections()
    # Mask head alone: both kept, 8 voxels each (x 0..1 and x 4..5), 0.9 first.
    labels, scores = paint_block(detections, (1, 4, 8), Painting(0.3, 0.5))
    np.testing.assert_allclose(scores, [0.9, 0.6])
    assert (labels == 1).sum() == (labels == 2).sum() == 8
    # Rescored: 0.6 * 0.8 = 0.48 and 0.9 * 0.1 = 0.09; the second falls below 0.3.
    labels, scores = paint_block(detections, (1, 4, 8), Painting(0.3, 0.5, 0.0, True))
    np.testing.assert_allclose(scores, [0.48], rtol=1e-6)
    expected = np.zeros((1, 4, 8), np.uint32)
    expected[..., 0:2] = 1
    np.testing.assert_array_equal(labels, expected)


def test_paint_block_semantic_mix_fills_the_mask_where_the_semantic_head_agrees():
    detections = _two_box_detections()
    # mix 0.5: box 0's right half reads 0.5 * 0 + 0.5 * 0.8 = 0.4 > 0.3 (in), its
    # left half 0.9; box 1's right half 0.05 (out), its left half 0.55 (in).
    labels, _ = paint_block(detections, (1, 4, 8), Painting(0.3, 0.3, 0.5, False))
    expected = np.zeros((1, 4, 8), np.uint32)
    expected[..., 4:6] = 1  # box 1 scores 0.9: painted first
    expected[..., 0:4] = 2
    np.testing.assert_array_equal(labels, expected)
    # At mask threshold 0.5 box 0's right half (0.4) stays out.
    labels, _ = paint_block(detections, (1, 4, 8), Painting(0.3, 0.5, 0.5, False))
    assert (labels == 2).sum() == 8


def test_paint_block_refuses_semantic_painting_without_a_semantic_map():
    detections = _two_box_detections()
    del detections["semantic"]
    with pytest.raises(ConfigError, match="semantic"):
        paint_block(detections, (1, 4, 8), Painting(0.3, 0.5, 0.5, False))


def _cube_detector(volume_boxes, block_boxes):
    """A detector that finds the given volume boxes in each block (masks all ones)."""
    calls = iter(block_boxes)

    def detect(blocks):
        out = {"boxes": [], "scores": [], "masks": [], "valid": []}
        for _ in blocks:
            block = next(calls)
            start = np.asarray(block.start, float)
            found = []
            for box in volume_boxes:
                lo = np.maximum(np.asarray(box[:3], float) - start, 0)
                hi = np.minimum(np.asarray(box[3:], float) - start, block.shape)
                if np.all(hi > lo):
                    found.append(np.concatenate([lo, hi]))
            pad = 4 - len(found)
            out["boxes"].append(np.asarray(found + [np.zeros(6)] * pad))
            out["scores"].append(np.asarray([0.9] * len(found) + [0.0] * pad))
            out["masks"].append(np.ones((4, 2, 2, 2), np.float32))
            out["valid"].append(np.asarray([True] * len(found) + [False] * pad))
        return {k: np.stack(v) for k, v in out.items()}

    return detect


def test_detect_and_fuse_join_an_instance_cut_by_every_seam():
    from synjax.inference.fusion import block_boxes

    shape, block, overlap = (8, 24, 24), (4, 12, 12), (2, 4, 4)
    # One box across the middle of every axis, one inside a single block's corner.
    objects = [(2, 6, 6, 6, 18, 18), (0, 0, 20, 1, 2, 24)]
    boxes = block_boxes(shape, block, overlap)
    found = detect_blocks(_cube_detector(objects, boxes), np.zeros(shape), block, overlap)
    assert len(found.boxes) == len(boxes) > 8
    labels, scores = fuse_detections(found, Painting(0.5, 0.5), iou_threshold=0.5)
    expected = np.zeros(shape, np.uint32)
    expected[2:6, 6:18, 6:18] = 1
    expected[0:1, 0:2, 20:24] = 2
    assert labels.max() == 2
    # Up to renumbering: each object is exactly one id.
    for z0, y0, x0, z1, y1, x1 in objects:
        ids = np.unique(labels[z0:z1, y0:y1, x0:x1])
        assert ids.size == 1 and ids[0] > 0
    np.testing.assert_array_equal(labels > 0, expected > 0)
    np.testing.assert_allclose(scores, [0.9, 0.9])


def test_fused_instances_take_the_best_score_of_their_block_instances():
    from synjax.geometry import Box
    from synjax.inference.instance_blocks import BlockDetections

    full = np.ones((1, 2, 2), np.float32)
    # Two 1 x 4 x 12 blocks overlapping in x 6..11 (block-local boxes below).
    boxes = [Box((0, 0, 0), (1, 4, 12)), Box((0, 0, 6), (1, 4, 18))]
    detections = [
        # Block 0: the shared object (x 4..10) at 0.4, a lone one (x 0..2) at 0.3.
        {
            "boxes": np.asarray([[0, 0, 4, 1, 4, 10], [0, 0, 0, 1, 4, 2]], float),
            "scores": np.asarray([0.4, 0.3], np.float32),
            "masks": np.stack([full, full]),
        },
        # Block 1: the same object (volume x 6..10 is local 0..4) at 0.8.
        {
            "boxes": np.asarray([[0, 0, 0, 1, 4, 4]], float),
            "scores": np.asarray([0.8], np.float32),
            "masks": np.stack([full]),
        },
    ]
    found = BlockDetections(boxes, detections, (1, 4, 18))
    labels, scores = fuse_detections(found, Painting(0.0, 0.5), iou_threshold=0.3)
    # Margin x 6..11: block 0's object covers x 6..9 there, block 1's x 6..9: IoU 1.
    assert labels.max() == 2
    shared, lone = labels[0, 0, 7], labels[0, 0, 1]
    assert shared != lone and shared > 0 and lone > 0
    assert set(np.unique(labels[0, :, 4:10]).tolist()) == {shared}
    np.testing.assert_allclose(scores[[shared - 1, lone - 1]], [0.8, 0.3])


def test_cleft_components_threshold_remove_small_and_tune():
    probability = np.zeros((3, 10, 10), np.float32)
    probability[0:2, 0:3, 0:3] = 0.8  # 18 voxels
    probability[2, 8:10, 8:10] = 0.6  # 4 voxels
    probability[1, 5, 5] = 0.95  # 1 voxel
    labels = cleft_components(probability, 0.5, min_size=0)
    assert labels.max() == 3 and labels.dtype == np.uint32
    assert np.count_nonzero(labels) == 23
    labels = cleft_components(probability, 0.5, min_size=4)
    # The single voxel goes; 4 voxels stays (cc3d.dust removes fewer than `threshold`).
    assert labels.max() == 2 and np.count_nonzero(labels) == 22
    assert cleft_components(probability, 0.7, 0).max() == 2  # the 0.6 blob is gone
    with pytest.raises(ConfigError, match="min_size"):
        cleft_components(probability, 0.5, -1)

    # Score 1 - |components - 2|: (0.5, 0) has 3 components, (0.5, 4) 2, (0.7, 0) 2
    # (the 18-voxel blob and the 0.95 voxel), (0.7, 4) 1. The tie of (0.5, 4) and
    # (0.7, 0) goes to the higher threshold.
    choice = tune_components(
        probability, lambda lab: 1.0 - abs(int(lab.max()) - 2), (0.5, 0.7), (0, 4)
    )
    assert (choice.threshold, choice.min_size, choice.score) == (0.7, 0, 1.0)
    assert len(choice.table) == 4


def test_training_crops_keep_image_and_labels_aligned():
    labels = np.zeros((6, 40, 40), np.uint64)
    labels[2:4, 10:14, 20:30] = 7
    labels[0, 30:36, 2:5] = 9
    image = labels.astype(np.float32) * 0.1 + 0.05
    crops = TrainingCrops(image, labels, (4, 16, 16), 1.0, True, 4, seed=3)
    for step in range(5):
        batch = crops.instance_batch(step, 2)["input"]
        assert batch.shape == (2, 4, 16, 16, 2)
        for item in batch:
            # Every crop is centred near a cleft: it holds one, ids dense 1..K.
            ids = np.unique(item[..., 1])
            assert ids[-1] >= 1 and np.array_equal(ids, np.arange(ids.size))
            # Image and labels moved together: image > 0.1 exactly on clefts.
            np.testing.assert_array_equal(item[..., 0] > 0.1, item[..., 1] > 0)
        seg = crops.segmenter_batch(step, 2)
        np.testing.assert_array_equal(seg["target"][..., 0] > 0, seg["input"][..., 0] > 0.1)
    np.testing.assert_array_equal(
        crops.instance_batch(4, 2)["input"], crops.instance_batch(4, 2)["input"]
    )
    with pytest.raises(ConfigError, match="config.train.patch"):
        TrainingCrops(image, labels, (8, 16, 16), 1.0, True, 4, seed=0)


def test_read_grid_round_trip_by_hand():
    raw = np.arange(16, dtype=np.uint8).reshape(1, 4, 4)
    labels = np.zeros((1, 4, 4), np.uint64)
    labels[0, 0, 1] = 5  # one voxel of the top-left 2x2 block
    image, read = downsample(raw, labels, (1, 2, 2))
    # Means of [[0, 1], [4, 5]] = 2.5, [[2, 3], [6, 7]] = 4.5, ...
    np.testing.assert_allclose(image, [[[2.5, 4.5], [10.5, 12.5]]])
    np.testing.assert_array_equal(read, [[[5, 0], [0, 0]]])
    np.testing.assert_array_equal(upsample(read, (1, 2, 2))[0, :2, :2], [[5, 5], [5, 5]])
    with pytest.raises(ConfigError, match="downsample"):
        downsample(raw[:, :3], labels[:, :3], (1, 2, 2))


def test_synapse_table_by_hand():
    labels = np.zeros((2, 4, 4), np.uint32)
    labels[0, 0, 0:2] = 1  # voxel centres (0.5, 0.5, 1.0)
    labels[1, 2:4, 3] = 2  # (1.5, 3.0, 3.5)
    rows = instance_rows(labels, np.asarray([0.9, 0.5]), (50.0, 4.0, 2.0), (0.0, 100.0, 0.0))
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["z_nm"] == pytest.approx(25.0)
    assert rows[0]["y_nm"] == pytest.approx(102.0)  # 0.5 * 4 + 100 offset
    assert rows[0]["x_nm"] == pytest.approx(2.0)
    assert rows[1]["y_nm"] == pytest.approx(112.0) and rows[1]["x_nm"] == pytest.approx(7.0)
    assert rows[0]["voxels"] == 2 and rows[1]["score"] == 0.5
    with pytest.raises(DataError, match="3 scores for 2 instances"):
        instance_rows(labels, np.zeros(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
