"""Block-wise host stages: components, watershed + agglomeration, contingency metrics.

Each block-wise function is checked on hand-made volumes with hand-counted
results, and against the whole-volume function it replaces (cc3d, the
candidates' overlaps and adjacency, `watershed.segment` + `agglomerate`,
`rand_voi`) at block shapes that do and do not divide the volume.
"""

from __future__ import annotations

import cc3d
import numpy as np
import pytest
from skimage.morphology import h_minima

from synjax.errors import DataError
from synjax.evaluation.contingency import contingency_table_blockwise
from synjax.evaluation.rand_voi import (
    adapted_rand_error,
    contingency_table,
    variation_of_information,
)
from synjax.postprocess.agglomeration import agglomerate
from synjax.postprocess.blockwise_components import (
    label_components_blockwise,
    segment_adjacency_blockwise,
    site_components_blockwise,
    site_overlaps_blockwise,
)
from synjax.postprocess.blockwise_watershed import segment_blockwise
from synjax.postprocess.candidates import (
    component_segment_overlaps,
    segment_adjacency,
    site_components,
)
from synjax.postprocess.watershed import (
    FACE_CONNECTIVITY,
    relief_and_keep,
    segment,
    smooth_and_quantise,
)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Labels equal up to renumbering (0 stays 0)."""
    if not np.array_equal(a == 0, b == 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _label(volume, block_shape, foreground, connectivity):
    dest = np.zeros(volume.shape, np.uint64)
    count = label_components_blockwise(volume, dest, block_shape, foreground, connectivity)
    return count, dest


# --- connected components ---------------------------------------------------------------


def test_u_shape_split_by_a_block_is_one_component():
    # A U in y-x: two arms in block x < 4 joined by a bar that lies in block x >= 4.
    # Inside the first block the arms are two components; across the face, one.
    mask = np.zeros((1, 5, 6), bool)
    mask[0, 0, :] = True  # bar of the U along x, through both blocks
    mask[0, :, 5] = True  # right arm (second block)
    mask[0, 4, 3:] = True  # bottom stroke from x = 3 (first block) to the arm
    mask[0, 2, 0:2] = True  # a separate blob in the first block
    count, labels = _label(mask, (1, 5, 4), lambda b: b, 6)
    assert count == 2
    assert len(np.unique(labels[mask])) == 2
    u = labels[0, 0, 0]
    assert (labels[0, 4, 3] == u) and (labels[0, 2, 0] != u) and labels[0, 2, 0] != 0
    assert (labels[~mask] == 0).all()


def test_corner_contact_joins_with_26_not_with_6():
    # Two voxels meeting only at a corner, each in its own block of a 2x2x2 grid.
    mask = np.zeros((4, 4, 4), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True
    assert _label(mask, 2, lambda b: b, 26)[0] == 1
    assert _label(mask, 2, lambda b: b, 18)[0] == 2
    assert _label(mask, 2, lambda b: b, 6)[0] == 2
    # An edge contact (two axes differ) across blocks joins with 18.
    mask = np.zeros((4, 4, 4), bool)
    mask[0, 1, 1] = mask[0, 2, 2] = True
    assert _label(mask, 2, lambda b: b, 18)[0] == 1


@pytest.mark.parametrize("connectivity", [6, 18, 26])
@pytest.mark.parametrize("block_shape", [(4, 5, 6), (7, 7, 7), (13, 2, 19)])
def test_components_equal_cc3d_of_the_whole_volume(connectivity, block_shape):
    volume = np.random.default_rng(connectivity).random((13, 17, 19))
    # Sparse enough not to percolate into one component at this connectivity.
    level = {6: 0.6, 18: 0.75, 26: 0.85}[connectivity]
    count, labels = _label(volume, block_shape, lambda b: b > level, connectivity)
    whole = cc3d.connected_components(volume > level, connectivity=connectivity)
    assert count == whole.max() > 1
    # Ids included: components are numbered by their first voxel, as cc3d does.
    np.testing.assert_array_equal(labels, whole)


def test_site_components_on_a_zarr_volume(tmp_path):
    from synjax.io import create_volume

    proximity = np.random.default_rng(1).uniform(-1, 1, (10, 12, 14)).astype(np.float32)
    pre = create_volume(tmp_path / "pre.zarr", proximity.shape, "uint64", chunks=(5, 6, 7))
    post = create_volume(tmp_path / "post.zarr", proximity.shape, "uint64", chunks=(5, 6, 7))
    counts = site_components_blockwise(proximity, pre, post, (5, 6, 7), tau=0.5)
    whole_pre, whole_post = site_components(proximity, 0.5, 26)
    assert counts == (whole_pre.max(), whole_post.max())
    np.testing.assert_array_equal(pre[:, :, :], whole_pre)
    np.testing.assert_array_equal(post[:, :, :], whole_post)


def test_site_overlaps_hand_counted():
    components = np.zeros((2, 4, 4), np.uint64)
    segmentation = np.zeros((2, 4, 4), np.uint64)
    components[0, 0:2, 0:3] = 7  # 6 voxels
    segmentation[0, 0:2, 0:2] = 3  # component 7 on segment 3: 4 voxels
    segmentation[0, 0:2, 2:4] = 5  # component 7 on segment 5: 2 voxels (x = 2)
    components[1, 3, 3] = 9  # on segment 0: left out
    weights = np.arange(32, dtype=np.float64).reshape(2, 4, 4)
    table = site_overlaps_blockwise(components, segmentation, (1, 3, 3), weights)
    np.testing.assert_array_equal(table.component, [7, 7])
    np.testing.assert_array_equal(table.segment, [3, 5])
    np.testing.assert_array_equal(table.count, [4, 2])
    # weights at (0,0,0),(0,0,1),(0,1,0),(0,1,1) = 0+1+4+5; at (0,0,2),(0,1,2) = 2+6.
    np.testing.assert_array_equal(table.weight_sum, [10.0, 8.0])
    np.testing.assert_array_equal(table.start, [[0, 0, 0], [0, 0, 2]])
    np.testing.assert_array_equal(table.stop, [[1, 2, 2], [1, 2, 3]])


def test_site_overlaps_and_adjacency_equal_the_whole_volume():
    rng = np.random.default_rng(2)
    components = cc3d.connected_components(rng.random((11, 13, 15)) > 0.5, connectivity=26)
    segmentation = rng.integers(0, 6, components.shape).astype(np.uint64) * np.uint64(2**40)
    weights = rng.random(components.shape)
    table = site_overlaps_blockwise(components, segmentation, (4, 5, 6), weights)
    rows = component_segment_overlaps(components, segmentation, omega=1)
    assert {tuple(r) for r in rows.tolist()} == set(
        zip(table.component.tolist(), table.segment.tolist(), table.count.tolist(), strict=True)
    )
    # Weight sums and boxes from a direct computation per row.
    for i in range(len(table)):
        inside = (components == table.component[i]) & (segmentation == table.segment[i])
        assert table.weight_sum[i] == pytest.approx(weights[inside].sum())
        voxels = np.argwhere(inside)
        np.testing.assert_array_equal(table.start[i], voxels.min(0))
        np.testing.assert_array_equal(table.stop[i], voxels.max(0) + 1)
    np.testing.assert_array_equal(
        segment_adjacency_blockwise(segmentation, (4, 5, 6)), segment_adjacency(segmentation)
    )


# --- watershed and agglomeration -------------------------------------------------------


def _cells(shape=(12, 32, 40), spacing=(12, 8, 10), seed=0) -> np.ndarray:
    """Boundary map of cells on a lattice, walled off from each other by background.

    Each lattice cell holds an ellipsoid whose map rises from 0 at its centre to
    0.6 at its rim, split in two along x by a ridge of random height (0.2 to
    0.6; their contacts average 0.68 to 0.89, so that the agglomeration at 0.78
    merges some halves and not others), plus
    noise; everything outside the ellipsoids is 1.0 (background above the
    threshold 0.7). Values are multiples of 1/256, so contact sums are exact in
    any order.
    """
    rng = np.random.default_rng(seed)
    image = np.ones(shape)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for corner in np.ndindex(*[-(-n // s) for n, s in zip(shape, spacing, strict=True)]):
        centre = (np.asarray(corner) + 0.5) * spacing + rng.uniform(-1, 1, 3)
        radius = np.asarray(spacing) * rng.uniform(0.3, 0.42, 3)
        d = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radius, strict=True))
        ridge = np.abs(xx - centre[2]) < 1.0  # two voxels wide
        inside = 0.6 * np.sqrt(np.minimum(d, 1)) + rng.uniform(0.2, 0.6) * ridge
        image = np.minimum(image, np.where(d <= 1, inside, 1.0))
    image = np.minimum(image + 0.2 * rng.random(shape) * (image < 1), 1.0)
    return np.round(image * 256) / 256


WATERSHED = dict(sigma_xy=0.8, h=0.08, background_threshold=0.7)


def _blockwise(image, block_shape, halo=10, **kwargs):
    dest = np.zeros(image.shape, np.uint64)
    result = segment_blockwise(image, dest, block_shape, halo=halo, **kwargs)
    return result, dest


@pytest.mark.parametrize("block_shape", [(6, 16, 14), (5, 11, 9)])
def test_watershed_equals_the_whole_volume_when_the_halo_covers_the_cells(block_shape):
    image = _cells()
    whole = segment(image, **WATERSHED)
    result, labels = _blockwise(image, block_shape, **WATERSHED)
    assert result.inexact_blocks == ()
    assert result.num_fragments > result.num_segments == whole.max() > 10
    # Numbered by the seeds' first voxels, as the whole volume: equal ids, not only up
    # to renumbering. (5, 11, 9) does not divide the (12, 32, 40) volume.
    np.testing.assert_array_equal(labels, whole)


def test_agglomeration_equals_the_whole_volume_and_not_the_block_size():
    image = _cells(seed=3)
    whole = agglomerate(segment(image, **WATERSHED), image, threshold=0.78)
    results = [_blockwise(image, b, threshold=0.78, **WATERSHED) for b in [(6, 16, 14), (5, 11, 9)]]
    for result, labels in results:
        assert result.inexact_blocks == ()
        assert result.num_segments > result.num_labels == whole.max() > 1
        assert _same_partition(labels, whole)
    assert _same_partition(results[0][1], results[1][1])


def test_a_cell_across_a_face_is_stitched_into_one_segment():
    # One basin (a valley along x, lowest at x = 5) cut by the block face at x = 8.
    image = np.ones((1, 5, 16))
    image[0, 1:4, 1:15] = np.abs(np.arange(1, 15) - 5) / 20
    result, labels = _blockwise(
        image, (1, 5, 8), halo=8, sigma_xy=0.0, h=0.1, rescale=False, background_threshold=0.9
    )
    assert result.num_fragments == 2 and result.num_segments == 1 and result.inexact_blocks == ()
    assert (labels[0, 1:4, 1:15] == 1).all() and (labels[image == 1] == 0).all()


def test_a_halo_too_small_is_reported_and_where_it_matters_results_differ():
    # A deep basin (x < 4) and a long tube of foreground near the top level; the tube
    # is flooded from the basin. A block of the tube whose halo box misses the basin
    # finds no basin of depth h in it (the tube lies within h of the top), so its
    # voxels stay unlabelled: a halo that does not cover the flooding gives another
    # result, and the blocks say so.
    image = np.ones((1, 3, 24))
    image[0, 1, :] = 0.97
    image[0, 1, :4] = 0.0
    kwargs = dict(sigma_xy=0.0, h=0.05, rescale=False, mask=image < 1)
    whole = segment(image, **kwargs)
    assert whole.max() == 1 and (whole[0, 1] == 1).all()
    result, labels = _blockwise(image, (1, 3, 6), halo=2, **kwargs)
    assert result.inexact_blocks == (0, 1, 2, 3)
    assert (labels[0, 1, :6] == 1).all() and (labels[0, 1, 12:] == 0).all()
    with pytest.raises(DataError, match=r"block 0 .*halo"):
        _blockwise(image, (1, 3, 6), halo=2, require_exact=True, **kwargs)
    # A halo over the whole tube makes every block exact, and the result the whole one.
    result, labels = _blockwise(image, (1, 3, 6), halo=24, require_exact=True, **kwargs)
    assert result.num_segments == 1
    np.testing.assert_array_equal(labels, whole)


def test_h_above_the_relief_seeds_the_global_minima_as_the_whole_volume_does():
    # Two separate cells of range 0.2..0.5 (background 1.0 excluded by a mask), h = 0.8:
    # no basin is deep enough, so the whole-volume watershed falls back to the global
    # minima, which lie in one cell only; the other cell stays unlabelled.
    image = np.ones((3, 6, 20))
    image[:, 1:5, 1:8] = 0.2 + 0.3 * np.random.default_rng(4).random((3, 4, 7))
    image[:, 1:5, 12:19] = 0.3 + 0.2 * np.random.default_rng(5).random((3, 4, 7))
    image = np.round(image * 255) / 255
    mask = image < 1
    kwargs = dict(sigma_xy=0.0, h=0.8, rescale=False, mask=mask)
    relief, keep = relief_and_keep(smooth_and_quantise(image, 0.0, rescale=False), mask)
    assert not h_minima(relief, np.uint16(0.8 * 65535), footprint=FACE_CONNECTIVITY).any()
    whole = segment(image, **kwargs)
    result, labels = _blockwise(image, (3, 6, 10), halo=10, **kwargs)
    assert result.inexact_blocks == ()
    np.testing.assert_array_equal(labels, whole)
    assert whole.max() == 1 and (whole[:, 1:5, 12:19] == 0).all()


def test_watershed_into_a_zarr_volume_with_a_mask_volume(tmp_path):
    from synjax.io import create_volume

    image = _cells(shape=(12, 24, 21), seed=6)
    mask = np.ones(image.shape, bool)
    mask[:, :, :3] = False
    whole = segment(image, mask=mask, **WATERSHED)
    dest = create_volume(tmp_path / "seg.zarr", image.shape, "uint64", chunks=(6, 8, 7))
    result = segment_blockwise(image, dest, (6, 8, 7), halo=10, mask=mask, **WATERSHED)
    assert result.inexact_blocks == ()
    np.testing.assert_array_equal(dest[:, :, :], whole)


def test_watershed_rejects_bad_input():
    image = np.zeros((4, 4, 4))
    with pytest.raises(DataError, match="dest"):
        segment_blockwise(image, np.zeros((4, 4, 5), np.uint64), 2, 0.0, 0.1, halo=1)
    with pytest.raises(Exception, match="halo"):
        segment_blockwise(image, np.zeros((4, 4, 4), np.uint64), 2, 0.0, 0.1, halo=0)


# --- contingency tables and metrics -------------------------------------------------------


def test_contingency_table_hand_counted():
    seg = np.array([[[1, 1, 2, 2, 2]]], np.uint64)
    gt = np.array([[[5, 5, 5, 0, 6]]], np.uint64)
    table = contingency_table_blockwise(seg, gt, (1, 1, 2)).toarray()
    # Rows: segments 1, 2; columns: bodies 5, 6 (gt 0 ignored).
    np.testing.assert_array_equal(table, [[2, 0], [1, 1]])
    table = contingency_table_blockwise(seg, gt, (1, 1, 2), ignore_gt=(), ignore_seg=(1,))
    np.testing.assert_array_equal(table.toarray(), [[1, 1, 1]])


@pytest.mark.parametrize("block_shape", [(3, 4, 5), (8, 9, 10), (1, 17, 2)])
def test_rand_and_voi_from_blocks_equal_the_whole_volume(block_shape):
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 6, (8, 9, 10)).astype(np.uint64) * np.uint64(2**40)
    seg = (gt // np.uint64(2**40) + rng.integers(0, 3, gt.shape).astype(np.uint64)) % np.uint64(5)
    table = contingency_table_blockwise(seg, gt, block_shape)
    assert table.sum() == (gt != 0).sum() == contingency_table(seg, gt).sum()
    are, whole_are = adapted_rand_error(table=table), adapted_rand_error(seg, gt)
    np.testing.assert_allclose(are, whole_are, rtol=1e-12)
    voi, whole_voi = variation_of_information(table=table), variation_of_information(seg, gt)
    np.testing.assert_allclose(voi, whole_voi, rtol=1e-12)
    assert 0 < are.error < 1 and voi.split > 0 and voi.merge > 0


def test_contingency_rejects_other_shapes_and_float_labels():
    with pytest.raises(DataError, match="one shape"):
        contingency_table_blockwise(np.zeros((2, 2, 2), int), np.zeros((2, 2, 3), int), 2)
    with pytest.raises(DataError, match="integers"):
        contingency_table_blockwise(np.zeros((2, 2, 2)), np.zeros((2, 2, 2), int), 2)
