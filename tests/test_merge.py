"""Sparse mask merge: hand-built cases and a direct Python loop of the same rule."""

import numpy as np
import pytest
import scipy.sparse

from synjax.errors import ConfigError, DataError
from synjax.inference.merge import mask_overlaps, mask_sizes, merge_masks, paint_masks

SHAPE = (10, 12, 12)


def _box(z, y, x, shape=SHAPE):
    """Boolean `[z, y, x]` volume with the box `volume[z, y, x]` set (slices)."""
    volume = np.zeros(shape, bool)
    volume[z, y, x] = True
    return volume


def _matrix(volumes, fmt="csc"):
    """`[voxels, masks]` sparse matrix with one column per boolean volume."""
    dense = np.stack([v.ravel() for v in volumes], 1)
    return scipy.sparse.csc_matrix(dense).asformat(fmt)


def reference_merge(dense: np.ndarray, min_overlap: int) -> list[int]:
    """The merge rule as a direct loop over rounds, groups and masks (dense overlaps)."""
    as_int = dense.astype(np.int64)
    overlap = as_int.T @ as_int
    sizes = np.diag(overlap)
    undecided = set(range(dense.shape[1]))
    kept = []
    while undecided:
        seen, decided = set(), set()
        for start in sorted(undecided):
            if start in seen:
                continue
            group, stack = [], [start]
            seen.add(start)
            while stack:
                mask = stack.pop()
                group.append(mask)
                for other in sorted(undecided):
                    if other not in seen and other != mask and overlap[mask, other] >= min_overlap:
                        seen.add(other)
                        stack.append(other)
            winner = max(group, key=lambda m: (sizes[m], -m))
            kept.append(winner)
            decided.add(winner)
            decided.update(m for m in group if m != winner and overlap[m, winner] >= min_overlap)
        undecided -= decided
    return sorted(kept)


def test_copies_collapse_to_the_largest():
    cube = _box(slice(2, 7), slice(2, 7), slice(2, 7))  # 125 voxels
    shifted = _box(slice(2, 7), slice(2, 7), slice(3, 8))  # shares 100 with cube
    trimmed = cube.copy()
    trimmed[2, 2, 2:7] = False  # 120 voxels
    longer = _box(slice(2, 7), slice(2, 7), slice(1, 7))  # 150 voxels
    # Equal sizes: the lowest index wins.
    np.testing.assert_array_equal(merge_masks(_matrix([trimmed, cube, shifted, cube])), [1])
    np.testing.assert_array_equal(merge_masks(_matrix([cube, shifted, longer, trimmed])), [2])


def test_overlap_below_threshold_keeps_both():
    a = _box(slice(0, 5), slice(0, 5), slice(0, 5))  # 125 voxels
    touching = _box(slice(4, 9), slice(2, 5), slice(2, 5))  # shares 1 x 3 x 3 = 9
    np.testing.assert_array_equal(merge_masks(_matrix([a, touching])), [0, 1])
    sharing_ten = _box(slice(4, 9), slice(0, 2), slice(0, 5))  # shares 1 x 2 x 5 = 10
    np.testing.assert_array_equal(merge_masks(_matrix([sharing_ten, a])), [1])
    # The threshold is a parameter: at 9 voxels the first pair is linked too.
    np.testing.assert_array_equal(merge_masks(_matrix([a, touching]), min_overlap=9), [0])


def test_neighbour_of_a_discarded_copy_survives_to_the_next_round():
    big = _box(slice(0, 5), slice(0, 5), slice(0, 6))  # 150 voxels
    copy = _box(slice(0, 5), slice(0, 5), slice(3, 8))  # 125 voxels, shares 75 with big
    beyond = _box(slice(0, 1), slice(0, 5), slice(5, 9))  # shares 5 with big, 15 with copy
    # One component {big, copy, beyond}: big is kept, copy discarded; beyond
    # shares < 10 voxels with big, so it is decided in round 2, alone: kept.
    np.testing.assert_array_equal(merge_masks(_matrix([copy, beyond, big])), [1, 2])
    first, second, overlap = mask_overlaps(_matrix([copy, beyond, big]))
    np.testing.assert_array_equal(
        np.stack([first, second, overlap], 1), [[0, 1, 15], [0, 2, 75], [1, 2, 5]]
    )


def test_chain_needs_several_rounds():
    # Slabs along x, each sharing one x-plane (25 voxels) with the next; the
    # last is the largest.
    slabs = [_box(slice(0, 5), slice(0, 5), slice(2 * i, 2 * i + 3 + (i == 4))) for i in range(5)]
    # Round 1: slab 4 (100 voxels) kept, slab 3 discarded; round 2: slabs 0-2,
    # sizes equal, slab 0 (lowest index) kept, 1 discarded; round 3: slab 2.
    np.testing.assert_array_equal(merge_masks(_matrix(slabs), min_overlap=10), [0, 2, 4])
    dense = np.stack([s.ravel() for s in slabs], 1)
    assert reference_merge(dense, 10) == [0, 2, 4]


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_reference_loop_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 10, 10)
    volumes = []
    for _ in range(rng.integers(1, 25)):
        start = rng.integers(0, [5, 8, 8])
        stop = start + rng.integers(1, 6, 3)
        volume = _box(*[slice(a, b) for a, b in zip(start, stop, strict=True)], shape=shape)
        volume &= rng.random(shape) > rng.choice([0.0, 0.2])
        volumes.append(volume)
        if rng.random() < 0.5:  # a jittered copy
            volumes.append(np.roll(volume, rng.integers(-1, 2), axis=int(rng.integers(3))))
    order = rng.permutation(len(volumes))
    dense = np.stack([volumes[i].ravel() for i in order], 1)
    min_overlap = int(rng.choice([1, 3, 10]))
    got = merge_masks(scipy.sparse.csc_matrix(dense), min_overlap)
    assert got.tolist() == reference_merge(dense, min_overlap)
    # The overlap pairs are the off-diagonal entries of the dense A^T A.
    full = dense.astype(np.int64).T @ dense.astype(np.int64)
    first, second, overlap = mask_overlaps(scipy.sparse.csc_matrix(dense), min_overlap)
    want = np.argwhere(np.triu(full >= min_overlap, 1))
    np.testing.assert_array_equal(np.stack([first, second], 1), want)
    np.testing.assert_array_equal(overlap, full[want[:, 0], want[:, 1]])
    np.testing.assert_array_equal(mask_sizes(scipy.sparse.csc_matrix(dense)), np.diag(full))


def test_formats_duplicates_and_zeros_give_the_same_result():
    a = _box(slice(0, 5), slice(0, 5), slice(0, 5))
    b = _box(slice(0, 5), slice(0, 5), slice(2, 6))
    c = _box(slice(6, 9), slice(6, 9), slice(6, 9))
    want = [0, 2]
    for fmt in ("csc", "csr", "coo"):
        np.testing.assert_array_equal(merge_masks(_matrix([a, b, c], fmt)), want)
    coo = _matrix([a, b, c], "coo")
    # 0/1 floats with an explicit zero where b has no voxel, and b's entries
    # repeated (built from indptr, which keeps duplicates): still the same masks.
    rows = np.r_[coo.row, coo.row[coo.col == 1], 999]
    cols = np.r_[coo.col, coo.col[coo.col == 1], 1]
    data = np.r_[np.ones(coo.nnz + (coo.col == 1).sum()), 0.0]
    order = np.argsort(cols, kind="stable")
    indptr = np.r_[0, np.cumsum(np.bincount(cols, minlength=3))]
    messy = scipy.sparse.csc_matrix((data[order], rows[order], indptr), shape=coo.shape)
    assert messy.nnz == 125 + 2 * 100 + 27 + 1
    np.testing.assert_array_equal(merge_masks(messy), want)
    np.testing.assert_array_equal(mask_sizes(messy), [125, 100, 27])


def test_empty_and_isolated_masks():
    assert merge_masks(scipy.sparse.csc_matrix((100, 0), dtype=bool)).size == 0
    # An all-empty column is a mask of size 0 that overlaps nothing: kept.
    empty_and_one = scipy.sparse.csc_matrix(([True], ([5], [1])), shape=(100, 2))
    np.testing.assert_array_equal(merge_masks(empty_and_one), [0, 1])


def test_bad_input():
    with pytest.raises(DataError, match="scipy.sparse"):
        merge_masks(np.ones((4, 2), bool))
    with pytest.raises(DataError, match="0/1"):
        merge_masks(scipy.sparse.csc_matrix(np.array([[2.0, 1.0]])))
    with pytest.raises(ConfigError, match="min_overlap"):
        merge_masks(scipy.sparse.csc_matrix(np.ones((4, 2), bool)), min_overlap=0)


def test_paint_masks_smaller_on_top_ids_in_kept_order():
    big = _box(slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    small = _box(slice(3, 5), slice(3, 5), slice(3, 5))  # 8 voxels, shares 1 with big
    other = _box(slice(8, 10), slice(8, 10), slice(8, 10))
    masks = _matrix([other, big, small])
    labels = paint_masks(masks, [2, 1], SHAPE)  # small gets id 1, big id 2
    assert labels.dtype == np.uint32 and labels.shape == SHAPE
    expected = np.zeros(SHAPE, np.uint32)
    expected[big] = 2
    expected[small] = 1  # on top of big at (3, 3, 3)
    np.testing.assert_array_equal(labels, expected)
    # Listed the other way round, ids swap; the small mask still wins.
    swapped = paint_masks(masks, [1, 2], SHAPE)
    assert swapped[3, 3, 3] == 2 and (swapped == 1).sum() == 63
    # Equal sizes: the one listed first ends on top.
    twin = _box(slice(3, 5), slice(3, 5), slice(4, 6))  # 8 voxels, shares 4 with small
    pair = _matrix([small, twin])
    assert paint_masks(pair, [0, 1], SHAPE)[3, 3, 4] == 1
    assert paint_masks(pair, [1, 0], SHAPE)[3, 3, 4] == 1
    assert paint_masks(pair, [], SHAPE).max() == 0


def test_paint_after_merge_covers_each_kept_mask():
    volumes = [np.roll(_box(slice(2, 6), slice(2, 6), slice(2, 6)), s, axis=2) for s in (0, 1, 5)]
    volumes[1][3, 3, 3] = False  # 63 voxels: the copy is the smaller
    masks = _matrix(volumes)
    kept = merge_masks(masks)
    np.testing.assert_array_equal(kept, [0, 2])  # 0 and 1 share 47 voxels; 2 none
    labels = paint_masks(masks, kept, SHAPE)
    np.testing.assert_array_equal(labels > 0, volumes[0] | volumes[2])


def test_paint_shape_mismatch():
    with pytest.raises(DataError, match="rows"):
        paint_masks(_matrix([_box(0, 0, 0)]), [0], (5, 5, 5))
    with pytest.raises(DataError, match="kept"):
        paint_masks(_matrix([_box(0, 0, 0)]), [1], SHAPE)


def test_lexsort_fallback_for_volumes_too_large_to_pack():
    from synjax.inference.merge import _group_by_voxel

    rng = np.random.default_rng(3)
    voxels = rng.integers(0, 50, 300)
    columns = rng.integers(0, 20, 300)
    packed = _group_by_voxel(voxels.copy(), columns.copy(), (50, 20))
    unpacked = _group_by_voxel(voxels.copy(), columns.copy(), (2**60, 20))  # 60 + 5 bits > 63
    pairs = np.unique(np.stack([voxels, columns], 1), axis=0)
    for got in (packed, unpacked):
        np.testing.assert_array_equal(np.stack(got, 1), pairs)
