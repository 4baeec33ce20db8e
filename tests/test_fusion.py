"""Axis-wise block fusion: hand-built seams, and blocks cut from one global label volume."""

import cc3d
import numpy as np
import pytest
import scipy.ndimage
import tensorstore as ts

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box
from synjax.inference.fusion import block_boxes, fuse_blocks


def _same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether `a` and `b` have the same background and a one-to-one map between their ids."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _cropped_blocks(labels: np.ndarray, boxes, seed: int = 0):
    """`block_labels` that crops `labels` and renames its ids at random in each block.

    Every block gets its own random ids (drawn from a small range, so ids of
    different instances in different blocks collide), so the global ids do not
    survive into the blocks.
    """
    rng = np.random.default_rng(seed)
    global_ids = np.unique(labels)
    renames = []
    for _ in boxes:
        local = np.zeros(global_ids.max() + 1, np.int64)
        local[global_ids[global_ids != 0]] = rng.permutation(np.count_nonzero(global_ids)) + 1
        renames.append(local)

    def block_labels(i):
        return renames[i][labels[boxes[i].slices()]].astype(np.uint32)

    return block_labels


def _blobs(shape, seed=0) -> np.ndarray:
    """Synthetic instances: thresholded smoothed noise, 6-connected components (cc3d)."""
    rng = np.random.default_rng(seed)
    noise = scipy.ndimage.gaussian_filter(rng.standard_normal(shape), (1.0, 2.5, 2.5))
    return cc3d.connected_components(noise > 0.15, connectivity=6).astype(np.int64)


def test_block_boxes_hand_computed():
    boxes = block_boxes((10, 7, 5), (4, 4, 8), (1, 2, 3))
    # z: stride 3 -> starts 0, 3, then 6 (shifted back to end at 10).
    # y: stride 2 -> starts 0, 2, then 3 (shifted back to end at 7). x: one cropped block.
    z = [(0, 4), (3, 7), (6, 10)]
    y = [(0, 4), (2, 6), (3, 7)]
    expected = [Box((za, ya, 0), (zb, yb, 5)) for za, zb in z for ya, yb in y]
    assert boxes == expected


def test_block_boxes_exact_multiple_has_no_duplicate():
    # volume 10 = 4 + 2 * 3: the stride grid ends exactly at the edge.
    boxes = block_boxes((10, 1, 1), 4, 1)
    assert [b.start[0] for b in boxes] == [0, 3, 6]
    assert [b.stop[0] for b in boxes] == [4, 7, 10]


@pytest.mark.parametrize(
    "args, word",
    [
        (((10, 10, 10), (4, 4, 4), (1, 4, 1)), "overlap"),
        (((10, 10, 10), (4, 4, 4), (1, -1, 1)), "overlap"),
        (((10, 0, 10), (4, 4, 4), 1), "volume_shape"),
        (((10, 10, 10), (4, 4), 1), "block_shape"),
    ],
)
def test_block_boxes_bad_arguments(args, word):
    with pytest.raises(ConfigError, match=word) as error:
        block_boxes(*args)
    assert "\n" not in str(error.value)


def test_instance_cut_along_every_axis_is_one_id():
    labels = np.zeros((12, 12, 12), np.int64)
    labels[2:10, 2:10, 2:10] = 5
    boxes = block_boxes(labels.shape, 6, 2)
    assert len(boxes) == 27  # three blocks per axis: the cube crosses two seams per axis
    out = np.zeros(labels.shape, np.uint16)
    n = fuse_blocks(boxes, _cropped_blocks(labels, boxes), out)
    assert n == 1
    np.testing.assert_array_equal(out, (labels > 0).astype(np.uint16))


def _two_blocks_along_x(block0: np.ndarray, block1: np.ndarray, threshold: float):
    """Fuses a (2, 2, 20) volume cut into x [0, 12) and [8, 20) (margin x [8, 12))."""
    boxes = block_boxes((2, 2, 20), (2, 2, 12), (0, 0, 4))
    assert boxes == [Box((0, 0, 0), (2, 2, 12)), Box((0, 0, 8), (2, 2, 20))]
    out = np.zeros((2, 2, 20), np.int32)
    n = fuse_blocks(boxes, [block0, block1].__getitem__, out, iou_threshold=threshold)
    return n, out[0, 0]  # every (z, y) row is the same


def _row(pieces, length):
    """A (2, 2, length) block whose x row holds `id` on each `(start, stop, id)`."""
    row = np.zeros(length, np.int64)
    for start, stop, label in pieces:
        row[start:stop] = label
    return np.broadcast_to(row, (2, 2, length)).copy()


@pytest.mark.parametrize("threshold, expected_n", [(0.5, 2), (0.49, 1)])
def test_iou_threshold_in_the_margin(threshold, expected_n):
    # Block 0: instance 1 on x [0, 12): 16 margin voxels. Block 1 (starts at x 8):
    # instance 3 on x [10, 20): 8 margin voxels, all shared. IoU = 8 / 16 = 0.5,
    # not above 0.5. The cores meet in the middle of the margin, at x 10.
    n, row = _two_blocks_along_x(_row([(0, 12, 1)], 12), _row([(2, 12, 3)], 12), threshold)
    assert n == expected_n
    assert np.all(row[:10] == row[0]) and np.all(row[10:] == row[10]) and row[0] > 0
    assert (row[0] == row[10]) == (expected_n == 1)


def test_touching_instances_across_a_seam_stay_two():
    # Instances 1 (x < 10) and 2 (x >= 10) touch at x 10, inside the margin x [8, 12).
    global_row = _row([(0, 10, 1), (10, 20, 2)], 20)
    n, row = _two_blocks_along_x(global_row[..., :12], global_row[..., 8:] * 3, 0.5)
    assert n == 2
    assert len(set(row[:10])) == 1 and len(set(row[10:])) == 1 and row[0] != row[10]


def test_matching_is_one_to_one():
    # Block 0 sees A on x [0, 9) and B on x [9, 12); block 1 sees one instance C on
    # all of x [8, 20). In the margin x [8, 12): IoU(A, C) = 4 / 16, IoU(B, C) = 12 / 16.
    # Both are above 0.2, but C may join only one: B. Joining all candidates would
    # make A, B and C one instance.
    n, row = _two_blocks_along_x(_row([(0, 9, 1), (9, 12, 2)], 12), _row([(0, 12, 7)], 12), 0.2)
    assert n == 2
    assert len(set(row[:9])) == 1 and len(set(row[9:])) == 1 and row[0] != row[9]


@pytest.mark.parametrize("threshold, expected_n", [(0.45, 1), (0.55, 2)])
def test_later_axis_sums_overlaps_over_its_seams(threshold, expected_n):
    # Volume (4, 1, 20): z blocks [0, 3) and [1, 4), x blocks [0, 12) and [8, 20).
    boxes = block_boxes((4, 1, 20), (3, 1, 12), (2, 0, 4))
    assert [(b.start[0], b.start[2]) for b in boxes] == [(0, 0), (0, 8), (1, 0), (1, 8)]
    # The lower-x blocks see A on x [0, 12); the upper-x blocks see B on x [12, 20)
    # and, in the x margin [8, 12), on z rows 0 and 1 only. The z step joins A's two
    # blocks and B's two blocks (identical in the z margins). Then x: seam z [0, 3)
    # shares 8 of A's 12 and B's 8 margin voxels (IoU 2/3), seam z [1, 4) 4 of 12
    # and 4 (IoU 1/3); summed over both seams IoU = 12 / (24 + 12 - 12) = 0.5.
    lower = np.zeros((4, 1, 20), np.int64)
    lower[:, :, :12] = 1
    upper = np.zeros((4, 1, 20), np.int64)
    upper[:, :, 12:] = 2
    upper[:2, :, 8:12] = 2
    views = [upper if b.start[2] else lower for b in boxes]
    out = np.zeros((4, 1, 20), np.int64)
    n = fuse_blocks(boxes, lambda i: views[i][boxes[i].slices()], out, threshold)
    assert n == expected_n
    # The cores meet at x 10: A's voxels left of it, B's right of it.
    (a,), (b,) = np.unique(out[:, :, :10]), np.unique(out[:, :, 12:])
    assert a > 0 and b > 0 and (a == b) == (expected_n == 1)
    np.testing.assert_array_equal(out[:, :, 10:] > 0, upper[:, :, 10:] > 0)


@pytest.mark.parametrize(
    "block_shape, overlap", [((8, 20, 16), (3, 6, 5)), ((11, 24, 20), (4, 8, 6))]
)
def test_fused_blocks_equal_the_global_labels(block_shape, overlap):
    labels = _blobs((19, 45, 39))
    assert len(np.unique(labels)) > 20
    boxes = block_boxes(labels.shape, block_shape, overlap)
    # The volume is not a multiple of the stride on any axis: the last blocks are shifted.
    stride = np.subtract(block_shape, overlap)
    assert np.all(np.mod(np.subtract(labels.shape, block_shape), stride) != 0)
    out = np.zeros(labels.shape, np.uint32)
    n = fuse_blocks(boxes, _cropped_blocks(labels, boxes, seed=sum(block_shape)), out)
    assert n == len(np.unique(labels)) - 1
    assert set(np.unique(out)) == set(range(n + 1))
    assert _same_up_to_renumbering(out, labels)


def test_result_does_not_depend_on_the_block_size():
    labels = _blobs((17, 40, 43), seed=3)
    results = []
    for block_shape, overlap in (((7, 18, 15), (2, 6, 4)), ((9, 25, 22), (3, 5, 7))):
        boxes = block_boxes(labels.shape, block_shape, overlap)
        out = np.zeros(labels.shape, np.int32)
        fuse_blocks(boxes, _cropped_blocks(labels, boxes, seed=1), out)
        results.append(out)
    assert _same_up_to_renumbering(*results)


def test_out_as_tensorstore_and_margins_on_disk(tmp_path):
    labels = _blobs((9, 30, 26), seed=5)
    boxes = block_boxes(labels.shape, (6, 14, 12), (2, 4, 4))
    block_labels = _cropped_blocks(labels, boxes)
    expected = np.zeros(labels.shape, np.uint32)
    n_expected = fuse_blocks(boxes, block_labels, expected)
    store = ts.open(
        {
            "driver": "zarr",
            "kvstore": {"driver": "memory"},
            "metadata": {"shape": list(labels.shape), "chunks": [4, 8, 8], "dtype": "<u4"},
        },
        create=True,
    ).result()
    scratch = tmp_path / "scratch"
    n = fuse_blocks(boxes, block_labels, store, scratch_dir=scratch)
    assert n == n_expected
    np.testing.assert_array_equal(store.read().result(), expected)
    assert list(scratch.iterdir()) == []  # the pending margins were removed


def test_block_labels_called_twice_per_block():
    labels = _blobs((9, 20, 20), seed=2)
    boxes = block_boxes(labels.shape, (5, 12, 12), 3)
    crop = _cropped_blocks(labels, boxes)
    calls = []

    def block_labels(i):
        calls.append(i)
        return crop(i)

    fuse_blocks(boxes, block_labels, np.zeros(labels.shape, np.int32))
    assert sorted(calls) == sorted(list(range(len(boxes))) * 2)


def _fuse_error(boxes=None, labels=None, out=None, **kwargs):
    volume = np.zeros((6, 6, 6), np.int64)
    volume[1:5, 1:5, 1:5] = 1
    boxes = block_boxes(volume.shape, 4, 2) if boxes is None else boxes
    labels = _cropped_blocks(volume, boxes) if labels is None else labels
    out = np.zeros(volume.shape, np.int32) if out is None else out
    return fuse_blocks(boxes, labels, out, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, word",
    [
        ({"iou_threshold": 1.0}, ConfigError, "iou_threshold"),
        ({"iou_threshold": -0.1}, ConfigError, "iou_threshold"),
        ({"axis_order": ("z", "z", "y")}, ConfigError, "axis_order"),
        ({"axis_order": ("z", "x")}, ConfigError, "axis_order"),
        ({"out": np.zeros((6, 6, 5), np.int32)}, ConfigError, "out"),
        ({"out": np.zeros((6, 6, 6), np.float32)}, ConfigError, "out"),
        ({"boxes": block_boxes((6, 6, 6), 4, 2)[1:]}, ConfigError, "grid"),
        ({"boxes": block_boxes((6, 6, 6), 3, 0)}, ConfigError, "overlap"),
        ({"boxes": block_boxes((6, 6, 8), 4, 2)}, ConfigError, "out"),
        ({"labels": lambda i: np.zeros((4, 4, 3), np.int32)}, DataError, r"block_labels\(0\)"),
        ({"labels": lambda i: np.zeros((4, 4, 4), np.float32)}, DataError, "dtype"),
        ({"labels": lambda i: np.full((4, 4, 4), -1)}, DataError, "negative"),
    ],
)
def test_fuse_blocks_bad_arguments(kwargs, error, word):
    with pytest.raises(error, match=word) as raised:
        _fuse_error(**kwargs)
    assert "\n" not in str(raised.value)


def test_labels_that_change_between_calls_are_an_error():
    calls = []

    def block_labels(i):
        calls.append(i)
        return np.full((4, 4, 4), 1 + (len(calls) > 8), np.int32)

    with pytest.raises(DataError, match="same labels every time"):
        _fuse_error(labels=block_labels)


def test_out_dtype_too_small_for_the_ids():
    labels = np.zeros((1, 40, 40), np.int64)
    labels[0, ::2, ::2] = np.arange(1, 401).reshape(20, 20)  # 400 separate voxels
    boxes = block_boxes(labels.shape, (1, 24, 24), (0, 8, 8))
    with pytest.raises(ConfigError, match="uint8"):
        fuse_blocks(boxes, _cropped_blocks(labels, boxes), np.zeros(labels.shape, np.uint8))
