"""3D Mask R-CNN: target assignment, losses, a training step, volume inference.

Expected values are computed by hand in the comments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from synjax.detection.fpn import FPNSettings
from synjax.detection.heads import BoxHeadSettings, MaskHeadSettings
from synjax.detection.losses import (
    box_regression_loss,
    classification_loss,
    mask_loss,
    objectness_loss,
    smooth_l1,
)
from synjax.detection.mask_rcnn3d import MaskRCNN3DSettings, build_mask_rcnn
from synjax.detection.rpn import RPNSettings
from synjax.detection.targets import boxes_from_labels, mask_targets, roi_targets, rpn_targets
from synjax.errors import ConfigError, DataError
from synjax.inference.instances import (
    PatchDetections,
    detect_patches,
    merge_detections,
    paste_mask,
    patch_starts,
)
from synjax.models.resnet3d import ResNet3DSettings
from synjax.stages.mask_rcnn import TrainingPatches, dense_instances
from tests.two_stage_training import train_on_fixed_batch

KEY = jax.random.key(0)


# --- target assignment -------------------------------------------------------


def test_boxes_from_labels_reads_each_ids_extent():
    labels = np.zeros((4, 6, 8), np.int32)
    labels[1:3, 2:5, 0:2] = 1  # box (1, 2, 0, 3, 5, 2)
    labels[3, 0, 7] = 2  # one voxel: (3, 0, 7, 4, 1, 8)
    labels[0, 5, 3] = 9  # above max_instances: ignored
    boxes, valid = boxes_from_labels(jnp.asarray(labels), 3)
    np.testing.assert_array_equal(valid, [True, True, False])
    np.testing.assert_array_equal(boxes[0], [1, 2, 0, 3, 5, 2])
    np.testing.assert_array_equal(boxes[1], [3, 0, 7, 4, 1, 8])
    np.testing.assert_array_equal(boxes[2], np.zeros(6))


def test_rpn_targets_label_and_encode_by_hand():
    gt = jnp.asarray([[0.0, 0, 0, 2, 2, 2], [0, 0, 0, 0, 0, 0]])
    gt_valid = jnp.asarray([True, False])
    anchors = jnp.asarray(
        [
            [0.0, 0, 0, 2, 2, 2],  # IoU 1: foreground, deltas 0
            [0.0, 0, 0, 2, 2, 4],  # IoU 8 / 16 = 0.5: between 0.3 and 0.7, ignored
            [10.0, 10, 10, 12, 12, 12],  # IoU 0: background
            [1.0, 0, 0, 3, 2, 2],  # IoU 4 / 12 = 1/3: ignored
        ]
    )
    targets = rpn_targets(KEY, anchors, gt, gt_valid, num_samples=8, positive_fraction=0.5)
    np.testing.assert_array_equal(targets.labels, [1, -1, 0, -1])
    np.testing.assert_allclose(targets.deltas[0], np.zeros(6), atol=1e-6)


def test_rpn_targets_deltas_of_a_shifted_anchor():
    # Anchor centred 1 voxel below the box in x, twice as wide: dx = (1 - 2) / 4,
    # dw = log(2 / 4); the rest 0. The box's best anchor is foreground although
    # its IoU (4 / 16 + ...) is below 0.7 (the low-quality rule).
    gt = jnp.asarray([[0.0, 0, 1, 2, 2, 3]])
    anchors = jnp.asarray([[0.0, 0, -1, 2, 2, 3], [20.0, 20, 20, 22, 22, 22]])
    targets = rpn_targets(KEY, anchors, gt, jnp.asarray([True]), num_samples=4)
    np.testing.assert_array_equal(targets.labels, [1, 0])
    np.testing.assert_allclose(
        targets.deltas[0], [0, 0, 0.25, 0, 0, np.log(0.5)], rtol=1e-6, atol=1e-6
    )


def test_rpn_targets_sample_a_fixed_number():
    gt = jnp.asarray([[0.0, 0, 0, 2, 2, 2]])
    # 10 background anchors, far away; the sample keeps 4 - 1 = 3 of them.
    far = jnp.asarray([[10.0 + 3 * i, 10, 10, 12 + 3 * i, 12, 12] for i in range(10)])
    anchors = jnp.concatenate([gt, far])
    targets = rpn_targets(KEY, anchors, gt, jnp.asarray([True]), num_samples=4)
    assert int(targets.labels[0]) == 1
    assert int(jnp.sum(targets.labels == 0)) == 3
    assert int(jnp.sum(targets.labels == -1)) == 7


def test_roi_targets_append_the_ground_truth_and_match_at_one_half():
    gt = jnp.asarray([[0.0, 0, 0, 4, 4, 4]])
    proposals = jnp.asarray(
        [
            [0.0, 0, 0, 4, 4, 2],  # IoU 32 / 64 = 0.5: foreground
            [0.0, 0, 0, 4, 4, 1],  # IoU 0.25: background
            [0.0, 0, 0, 0, 0, 0],  # padding
        ]
    )
    valid = jnp.asarray([True, True, False])
    rois = roi_targets(
        KEY, proposals, valid, gt, jnp.asarray([True]), num_samples=4, positive_fraction=1.0
    )
    # Candidates: 2 proposals and the ground-truth box; padding never sampled.
    assert int(jnp.sum(rois.valid)) == 3
    foreground = np.asarray(rois.classes == 1)
    assert foreground.sum() == 2
    fg_boxes = {tuple(np.asarray(b).tolist()) for b in rois.boxes[foreground]}
    assert fg_boxes == {(0, 0, 0, 4, 4, 2), (0, 0, 0, 4, 4, 4)}
    # Foreground slots come first, then the background one, then padding.
    np.testing.assert_array_equal(rois.classes, [1, 1, 0, 0])
    np.testing.assert_array_equal(rois.valid, [True, True, True, False])
    np.testing.assert_array_equal(rois.matched[:2], [0, 0])
    # The half-width box: centre x 1 -> 2 over width 2 (x 10), width x2 (log 2 x 5).
    half = int(np.flatnonzero([tuple(np.asarray(b)) == (0, 0, 0, 4, 4, 2) for b in rois.boxes])[0])
    weights = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)
    rois_w = roi_targets(
        KEY,
        proposals,
        valid,
        gt,
        jnp.asarray([True]),
        num_samples=4,
        positive_fraction=1.0,
        weights=weights,
    )
    np.testing.assert_allclose(
        rois_w.deltas[half], [0, 0, 10 * 0.5, 0, 0, 5 * np.log(2.0)], rtol=1e-5, atol=1e-6
    )


def test_mask_targets_crop_the_instance_inside_its_box():
    labels = np.zeros((4, 6, 6), np.int32)
    labels[1:3, 1:5, 2:4] = 3
    labels[1:3, 1:3, 4:6] = 5  # a neighbour inside the box reads as background
    box = jnp.asarray([[1.0, 1, 2, 3, 5, 6]])  # 2 x 4 x 4 voxels
    target = mask_targets(jnp.asarray(labels), box, jnp.asarray([3]), (2, 4, 4), samples=1)
    expected = (labels[1:3, 1:5, 2:6] == 3).astype(np.float32)
    np.testing.assert_array_equal(target[0], expected)
    # Bins of 2 voxels in x average 2 reads: [1, 0] columns -> 1, 0 (instance x 2:4).
    coarse = mask_targets(jnp.asarray(labels), box, jnp.asarray([3]), (2, 4, 2), samples=2)
    np.testing.assert_allclose(coarse[0], np.broadcast_to([1.0, 0.0], (2, 4, 2)))
    # Id 0 (a background ROI): all zeros; a box past the volume reads background there.
    np.testing.assert_array_equal(
        mask_targets(jnp.asarray(labels), box, jnp.asarray([0]), (2, 4, 4), samples=1),
        np.zeros((1, 2, 4, 4)),
    )
    outside = mask_targets(
        jnp.asarray(labels), jnp.asarray([[1.0, 1, 4, 3, 5, 8]]), jnp.asarray([5]), (2, 4, 4), 1
    )
    np.testing.assert_array_equal(outside[0][:, :2, :2], np.ones((2, 2, 2)))
    np.testing.assert_array_equal(outside[0][:, :, 2:], np.zeros((2, 4, 2)))


# --- losses -------------------------------------------------------------------


def test_losses_by_hand():
    # smooth L1 with beta 1: 0.5 * 0.5^2 = 0.125 below, 2 - 0.5 = 1.5 above.
    np.testing.assert_allclose(smooth_l1(jnp.asarray([0.5, -2.0]), 1.0), [0.125, 1.5])
    np.testing.assert_allclose(smooth_l1(jnp.asarray([0.5, -2.0]), 0.0), [0.5, 2.0])
    # Objectness: logit 0 costs log 2 for either label; the -1 entry is not counted.
    logits = jnp.asarray([0.0, 0.0, 100.0])
    assert float(objectness_loss(logits, jnp.asarray([1, 0, -1]))) == pytest.approx(np.log(2))
    # Box: |0.5| * 6 entries of the foreground row over 4 sampled.
    deltas = jnp.asarray([[0.5] * 6, [9.0] * 6])
    loss = box_regression_loss(deltas, jnp.zeros((2, 6)), jnp.asarray([True, False]), 4.0)
    assert float(loss) == pytest.approx(0.75)
    # Class: two valid ROIs with uniform logits over 2 classes: log 2.
    ce = classification_loss(jnp.zeros((3, 2)), jnp.asarray([0, 1, 1]), jnp.asarray([1, 1, 0]))
    assert float(ce) == pytest.approx(np.log(2))
    # Mask: a foreground ROI with logits 0 (log 2 per voxel); the other ignored.
    m = mask_loss(jnp.zeros((2, 1, 2, 2)), jnp.ones((2, 1, 2, 2)), jnp.asarray([True, False]))
    assert float(m) == pytest.approx(np.log(2))


# --- the model ------------------------------------------------------------------


def _tiny_settings(**overrides) -> MaskRCNN3DSettings:
    fields = dict(
        backbone=ResNet3DSettings(depth=18, base_features=4, norm_groups=4),
        fpn=FPNSettings(features=8),
        rpn=RPNSettings(features=8),
        box_head=BoxHeadSettings(hidden_features=16, roi_size=(2, 4, 4)),
        mask_head=MaskHeadSettings(features=8, num_convs=1),
        levels=("P2",),
        mask_roi_size=(2, 4, 4),
        train_pre_nms=64,
        train_post_nms=32,
        test_pre_nms=64,
        test_post_nms=32,
        roi_samples=16,
        rpn_samples=64,
        detections=8,
        max_instances=4,
    )
    fields.update(overrides)
    return MaskRCNN3DSettings(**fields)


def _fixed_batch() -> np.ndarray:
    labels = np.zeros((2, 8, 32, 32), np.float32)
    labels[:, 2:5, 4:12, 6:14] = 1
    labels[:, 3:6, 18:26, 16:25] = 2
    noise = 0.05 * np.random.default_rng(0).normal(size=labels.shape)
    image = (labels > 0).astype(np.float32) + noise.astype(np.float32)
    return np.stack([image, labels], -1)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    settings = _tiny_settings()
    model = build_mask_rcnn(settings, training=True)
    batch = jnp.asarray(_fixed_batch())
    params, first, later = train_on_fixed_batch(model, batch, steps=8)
    out = later[-1]
    assert float(out["loss"]) < 0.8 * float(first["loss"])
    assert float(out["mask"]) < float(first["mask"])

    detector = build_mask_rcnn(settings)
    det = jax.jit(lambda p, x: detector.apply({"params": p}, x))(params, batch[..., :1])
    assert det["boxes"].shape == (2, 8, 6)
    assert det["masks"].shape == (2, 8, 4, 8, 8)
    scores = np.asarray(det["scores"])
    assert np.all(scores[~np.asarray(det["valid"])] == 0)
    assert np.all(np.diff(scores[0][np.asarray(det["valid"][0])]) <= 0)


def test_model_input_errors_name_the_channels():
    model = build_mask_rcnn(_tiny_settings(), training=True)
    with pytest.raises(DataError, match="2 .image and instance ids"):
        jax.eval_shape(model.init, KEY, jnp.zeros((1, 8, 32, 32, 1)))
    with pytest.raises(ConfigError, match="anchor scales"):
        _tiny_settings(anchor_scales=(2.0, 4.0))


# --- volume inference ---------------------------------------------------------------


def test_patch_starts_cover_the_axis_with_the_overlap():
    assert patch_starts(96, 96, 34) == [0]
    assert patch_starts(50, 96, 34) == [0]
    # step 62: 0, 62, then flush with the end at 192 - 96 = 96.
    assert patch_starts(192, 96, 34) == [0, 62, 96]
    assert patch_starts(10, 4, 1) == [0, 3, 6]
    with pytest.raises(ConfigError):
        patch_starts(10, 4, 4)


def test_paste_mask_lands_at_the_box_in_volume_coordinates():
    volume = (20, 40, 50)
    mask = np.ones((2, 4, 4), np.float32)
    voxels = paste_mask(mask, (2, 3, 4, 5, 8, 9), (10, 20, 30), volume)
    expected = np.zeros(volume, bool)
    expected[12:15, 23:28, 34:39] = True
    np.testing.assert_array_equal(voxels, np.flatnonzero(expected))
    # Left half of the mask on: x voxels 34, 35 of 34..38 (centres 0.5, 1.5 of 5 -> mask
    # coordinates -0.3, 0.5: inside the "on" half; 2.5 -> 1.5 interpolates to 0.5, not above).
    half = np.zeros((2, 4, 4), np.float32)
    half[..., :2] = 1.0
    voxels = paste_mask(half, (2, 3, 4, 5, 8, 9), (10, 20, 30), volume)
    expected[...] = False
    expected[12:15, 23:28, 34:36] = True
    np.testing.assert_array_equal(voxels, np.flatnonzero(expected))
    # Cut at the volume's end.
    voxels = paste_mask(mask, (0, 0, 0, 2, 2, 2), (19, 39, 49), volume)
    np.testing.assert_array_equal(voxels, [np.ravel_multi_index((19, 39, 49), volume)])


def test_detect_and_merge_a_hand_built_detector():
    # A detector that finds one cube at volume voxels z 0:2, y 10:14, x 10:14 in
    # every patch that holds it whole: two overlapping patches see it twice.
    image = np.zeros((2, 16, 24), np.float32)
    image[0:2, 10:14, 10:14] = 1.0

    def detector(patches):
        n = len(patches)
        boxes = np.zeros((n, 2, 6), np.float32)
        scores = np.zeros((n, 2), np.float32)
        valid = np.zeros((n, 2), bool)
        for i, patch in enumerate(patches):
            z, y, x = np.nonzero(patch > 0.5)
            if z.size == 32:
                boxes[i, 0] = [z.min(), y.min(), x.min(), z.max() + 1, y.max() + 1, x.max() + 1]
                scores[i, 0], valid[i, 0] = 0.9 + 0.01 * i, True
            boxes[i, 1] = [0, 0, 0, 1, 1, 1]
            scores[i, 1], valid[i, 1] = 0.3, True  # a weak detection at each patch corner
        return {"boxes": boxes, "scores": scores, "masks": np.ones((n, 2, 2, 2, 2)), "valid": valid}

    detections = detect_patches(detector, image, (2, 16, 16), (0, 0, 8), batch_size=2)
    assert detections.num_patches == 2  # x starts 0 and 8
    assert np.count_nonzero(detections.scores > 0.5) == 2
    merged = merge_detections(detections, 0.5, min_overlap=10)
    expected = np.zeros(image.shape, np.uint32)
    expected[0:2, 10:14, 10:14] = 1
    np.testing.assert_array_equal(merged.labels, expected)
    assert merged.num_detections == 2
    np.testing.assert_allclose(merged.scores, [0.9])  # the first copy (lower index) is kept
    # A low threshold keeps the corner voxels too: single voxels, never merged.
    low = merge_detections(detections, 0.1, min_overlap=10)
    assert low.labels.max() == 3


def test_merge_detections_with_nothing_above_the_threshold():
    none = PatchDetections([np.asarray([3])], np.asarray([0.2], np.float32), (2, 2, 2), 1)
    out = merge_detections(none, 0.5)
    assert out.labels.shape == (2, 2, 2) and out.labels.max() == 0 and out.scores.size == 0


# --- training patches ---------------------------------------------------------------


def test_training_patches_keep_image_and_labels_aligned():
    from synjax.data.intensity import IntensityNormalization

    rng = np.random.default_rng(0)
    labels = np.zeros((4, 20, 20), np.uint32)
    labels[1:3, 2:6, 3:9] = 7
    labels[0:4, 12:15, 11:18] = 9
    image = np.where(labels > 0, 100.0, 0.0) + rng.uniform(0, 1, labels.shape)
    intensity = IntensityNormalization("percentiles", 0.0, 100.0).fit([image], "test")
    patches = TrainingPatches(image, labels, (4, 10, 10), intensity, 8, 0.3, True, seed=0)
    assert len(patches.origins) == 4
    batch = patches.batch(5, 16)["input"]
    assert batch.shape == (16, 4, 10, 10, 2)
    negatives = 0
    for item in batch:
        image_on, ids = item[..., 0] > 0.5, item[..., 1]
        np.testing.assert_array_equal(image_on, ids > 0)  # rotated and flipped together
        present = np.unique(ids[ids > 0])
        np.testing.assert_array_equal(present, np.arange(1, present.size + 1))
        negatives += int(not item.any())
    assert 0 < negatives < 16
    np.testing.assert_array_equal(patches.batch(5, 16)["input"], batch)  # deterministic


def test_dense_instances_keep_the_largest():
    labels = np.zeros((1, 1, 10), np.uint32)
    labels[0, 0, :5] = 40
    labels[0, 0, 5:6] = 3
    labels[0, 0, 7:9] = 8
    np.testing.assert_array_equal(dense_instances(labels, 3), [[[1] * 5 + [2, 0, 3, 3, 0]]])
    np.testing.assert_array_equal(dense_instances(labels, 2), [[[1] * 5 + [0, 0, 2, 2, 0]]])
