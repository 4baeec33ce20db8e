"""Synaptic partner candidates from a signed proximity map and a segmentation.

Parag et al. (MICCAI 2018) predict a signed proximity map p in [-1, 1]: about
+1 on the presynaptic side of a cleft, about -1 on the postsynaptic side and 0
elsewhere. Candidates are built as in the paper:

1. threshold p > tau (presynaptic sites) and p < -tau (postsynaptic sites) and
   label the connected components of each separately;
2. pair every component with every segment that it overlaps by at least
   `omega` voxels (a component that straddles a membrane gives one site per
   side);
3. a candidate is (pre component, pre segment, post component, post segment)
   where the two segments differ and share a face (6-neighbourhood), and the
   two sites lie near each other.

"Near" is made concrete here: the sub-masks (component AND segment) of the two
sites must come within `max_gap_nm` of each other, measured between voxel
centres in nm. The paper only requires adjacent segments; without a distance
bound, a pre site and a post site on the two ends of a long shared membrane
would be paired, and such pairs only add false candidates for the pruning net.
200 nm covers a synaptic cleft (about 20-30 nm) plus the PSD and vesicle
cloud on either side, and a couple of sections in anisotropic ssTEM.

Everything volume-sized is vectorised (np.unique over packed label pairs,
shifted comparisons for adjacency and site surfaces); only the closest-point
search loops, once per joined (pre site, post site) row, over the surface
voxels of the two sites that lie near the other site's bounding box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import cc3d
import fastremap
import numpy as np
from scipy.spatial import cKDTree

from synjax.errors import ConfigError, DataError
from synjax.geometry import voxel_size

DEFAULT_TAU = 0.3
DEFAULT_OMEGA = 100
DEFAULT_MAX_GAP_NM = 200.0
VALID_CONNECTIVITY = (6, 18, 26)
DEFAULT_CONNECTIVITY = 26
# Segment id that means "no neuron" (membrane, unlabelled): never paired.
UNLABELLED = 0
# Two ids below 2^32 packed into one uint64 key.
_SHIFT = np.uint64(32)
_LOW = np.uint64(0xFFFFFFFF)
# Up to this many voxel pairs a dense distance matrix beats building a k-d tree.
_BRUTE_FORCE_PAIRS = 20_000
# The k-d tree bound is strict (<); the slack keeps a gap of exactly max_gap_nm.
_BOUND_SLACK = 1.000001


@dataclasses.dataclass
class Candidates:
    """Synaptic partner candidates, one row per candidate.

    Attributes:
      pre_component: [n] int64 id of the presynaptic component (p > tau).
      pre_segment: [n] uint64 presynaptic segment id.
      post_component: [n] int64 id of the postsynaptic component (p < -tau).
      post_segment: [n] uint64 postsynaptic segment id.
      pre_overlap: [n] int64 voxels shared by the pre component and segment.
      post_overlap: [n] int64 voxels shared by the post component and segment.
      location: [n, 3] float64 nm, z-y-x, from voxel (0, 0, 0): the midpoint
        between `pre_point` and `post_point`.
      pre_point: [n, 3] int64 voxel of the pre sub-mask closest to the post one.
      post_point: [n, 3] int64 voxel of the post sub-mask closest to the pre one.
      gap_nm: [n] float64 distance between `pre_point` and `post_point` in nm.
      score: [n] float64 mean |p| over both sub-masks.
    """

    pre_component: np.ndarray
    pre_segment: np.ndarray
    post_component: np.ndarray
    post_segment: np.ndarray
    pre_overlap: np.ndarray
    post_overlap: np.ndarray
    location: np.ndarray
    pre_point: np.ndarray
    post_point: np.ndarray
    gap_nm: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls) -> Candidates:
        """No candidates, with the right dtypes and trailing shapes."""
        ints = np.zeros((0,), np.int64)
        return cls(
            pre_component=ints,
            pre_segment=np.zeros((0,), np.uint64),
            post_component=ints.copy(),
            post_segment=np.zeros((0,), np.uint64),
            pre_overlap=ints.copy(),
            post_overlap=ints.copy(),
            location=np.zeros((0, 3), np.float64),
            pre_point=np.zeros((0, 3), np.int64),
            post_point=np.zeros((0, 3), np.int64),
            gap_nm=np.zeros((0,), np.float64),
            score=np.zeros((0,), np.float64),
        )

    def __len__(self) -> int:
        return len(self.pre_component)

    def select(self, index: np.ndarray) -> Candidates:
        """Rows picked by a boolean mask or an integer index array."""
        return Candidates(
            **{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)}
        )

    def pairs(self) -> np.ndarray:
        """[n, 2] uint64 (pre segment, post segment) per row."""
        return np.stack([self.pre_segment, self.post_segment], axis=1)

    def points_nm(
        self, resolution: Sequence[float], offset: Sequence[float] = (0.0, 0.0, 0.0)
    ) -> tuple[np.ndarray, np.ndarray]:
        """Where each candidate's closest points lie in the world.

        Args:
          resolution: voxel size in nm, z-y-x.
          offset: world position in nm of voxel (0, 0, 0).

        Returns:
          `(pre, post)`, each [n, 3] float64 nm: `pre_point` and `post_point`
          times `resolution`, plus `offset`.
        """
        res, off = np.asarray(resolution, np.float64), np.asarray(offset, np.float64)
        return self.pre_point * res + off, self.post_point * res + off


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels as small consecutive ids (0 kept as 0) and [k] uint64 original ids.

    Sorting dense small ids is much faster than sorting arbitrary uint64 ids,
    and two dense ids fit in one uint64 key.
    """
    dense, mapping = fastremap.renumber(np.asarray(labels), preserve_zero=True, in_place=False)
    original = np.zeros(max(mapping.values(), default=0) + 1, np.uint64)
    original[np.fromiter(mapping.values(), np.int64)] = np.fromiter(mapping.keys(), np.uint64)
    return dense, original


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """np.unique over rows (a[i], b[i]) of ids below 2^32, through one uint64 key.

    Returns:
      (pairs [k, 2] uint64 sorted by a then b, inverse [n], counts [k]).
    """
    key = (a.astype(np.uint64) << _SHIFT) | b.astype(np.uint64)
    keys, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    pairs = np.stack([keys >> _SHIFT, keys & _LOW], axis=1)
    return pairs, inverse.reshape(-1), counts


def component_segment_overlaps(
    components: np.ndarray, segmentation: np.ndarray, omega: int
) -> np.ndarray:
    """(component, segment, voxel count) for every overlap of at least `omega`.

    Args:
      components: [z, y, x] component labels, 0 = background.
      segmentation: [z, y, x] segment labels, 0 = unlabelled.
      omega: minimum number of shared voxels.

    Returns:
      [k, 3] uint64 rows (component, segment, count), sorted by component then
      segment.
    """
    dense, original = _renumber(segmentation)
    rows = _Sites.build(components, dense, omega, np.zeros(components.shape)).rows
    rows[:, 1] = original[rows[:, 1]]
    return rows


@dataclasses.dataclass
class _Sites:
    """Sites (component AND segment sub-masks) with at least omega voxels.

    Attributes:
      rows: [k, 3] uint64 (component, segment, voxel count).
      weight_sums: [k] sum of the weights (|p|) over each site.
      surface: [s, 3] int64 surface voxels of all sites, grouped by site, in
        raster order within a site.
      surface_start: [k + 1] site i's surface voxels are
        surface[surface_start[i] : surface_start[i + 1]].
    """

    rows: np.ndarray
    weight_sums: np.ndarray
    surface: np.ndarray
    surface_start: np.ndarray

    @classmethod
    def build(
        cls, components: np.ndarray, segmentation: np.ndarray, omega: int, weights: np.ndarray
    ) -> _Sites:
        inside = (components != 0) & (segmentation != UNLABELLED)
        if not inside.any():
            empty = np.zeros((0,), np.int64)
            return cls(np.zeros((0, 3), np.uint64), empty * 0.0, np.zeros((0, 3), np.int64), empty)
        pairs, inverse, counts = _unique_pairs(components[inside], segmentation[inside])
        sums = np.bincount(inverse, weights=weights[inside], minlength=len(pairs))
        keep = counts >= omega
        # Site number per voxel (1-based, 0 = none), renumbered over kept sites.
        renumber = np.where(keep, np.cumsum(keep), 0)
        site = np.zeros(components.shape, np.int64)
        site[inside] = renumber[inverse]
        # Closest points of two disjoint sets lie on their surfaces: keep only
        # voxels with a face neighbour outside their site (or the volume).
        surface = np.zeros(site.shape, bool)
        for axis in range(site.ndim):
            lo = [slice(None)] * site.ndim
            hi = [slice(None)] * site.ndim
            lo[axis], hi[axis] = slice(None, -1), slice(1, None)
            differs = site[tuple(lo)] != site[tuple(hi)]
            surface[tuple(lo)] |= differs
            surface[tuple(hi)] |= differs
            edge = [slice(None)] * site.ndim
            edge[axis] = [0, -1]
            surface[tuple(edge)] = True
        surface &= site > 0
        coords = np.argwhere(surface)
        owner = site[surface] - 1
        order = np.argsort(owner, kind="stable")
        start = np.searchsorted(owner[order], np.arange(int(keep.sum()) + 1))
        rows = np.concatenate([pairs[keep], counts[keep, None].astype(np.uint64)], axis=1)
        return cls(rows, sums[keep], coords[order], start)

    def __len__(self) -> int:
        return len(self.rows)

    def boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """([k, 3] first voxel, [k, 3] last voxel) of each site's bounding box."""
        if len(self) == 0:
            return np.zeros((0, 3), np.int64), np.zeros((0, 3), np.int64)
        starts = self.surface_start[:-1]
        # Every kept site has at least one surface voxel, so no segment is empty.
        return (
            np.minimum.reduceat(self.surface, starts, axis=0),
            np.maximum.reduceat(self.surface, starts, axis=0),
        )

    def surface_of(self, i: int) -> np.ndarray:
        """[m, 3] surface voxels of site i."""
        return self.surface[self.surface_start[i] : self.surface_start[i + 1]]


def segment_adjacency(segmentation: np.ndarray) -> np.ndarray:
    """Ordered pairs of distinct labelled segments that share a voxel face.

    Args:
      segmentation: [z, y, x] segment labels, 0 = unlabelled (never adjacent).

    Returns:
      [k, 2] uint64 unique rows (a, b) with a != b; both (a, b) and (b, a)
      appear.
    """
    dense, original = _renumber(segmentation)
    keys = []
    for axis in range(dense.ndim):
        # Compare each voxel with its successor along `axis`.
        lo = np.take(dense, np.arange(dense.shape[axis] - 1), axis=axis).ravel()
        hi = np.take(dense, np.arange(1, dense.shape[axis]), axis=axis).ravel()
        touching = (lo != hi) & (lo != UNLABELLED) & (hi != UNLABELLED)
        lo, hi = lo[touching].astype(np.uint64), hi[touching].astype(np.uint64)
        keys.append((np.minimum(lo, hi) << _SHIFT) | np.maximum(lo, hi))
    keys = np.unique(np.concatenate(keys))
    a, b = original[keys >> _SHIFT], original[keys & _LOW]
    pairs = np.concatenate([np.stack([a, b], 1), np.stack([b, a], 1)])
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _join(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i, j) with left[i] == right[j] (an inner join on keys)."""
    order = np.argsort(right, kind="stable")
    sorted_right = right[order]
    start = np.searchsorted(sorted_right, left, side="left")
    stop = np.searchsorted(sorted_right, left, side="right")
    counts = stop - start
    left_index = np.repeat(np.arange(len(left)), counts)
    # Position of each output row inside its run of equal right keys.
    run_offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    right_index = order[np.repeat(start, counts) + run_offset]
    return left_index, right_index


def _box_gap_nm(
    lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray, res: np.ndarray
) -> np.ndarray:
    """[n] lower bound of the voxel-centre distance between boxes [lo, hi], nm."""
    gap = np.maximum(0, np.maximum(lo_a - hi_b, lo_b - hi_a))
    return np.linalg.norm(gap * res, axis=1)


def _in_box(voxels: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rows of voxels [m, 3] inside the box [lo, hi] (inclusive), order kept."""
    return voxels[np.all((voxels >= lo) & (voxels <= hi), axis=1)]


def _closest(
    a: np.ndarray, b: np.ndarray, res: np.ndarray, max_gap_nm: float
) -> tuple[int, int, float]:
    """Indices of the closest pair between voxel sets a and b, and its distance in nm.

    On ties the first row of `a` wins (a's rows are in raster order). A
    distance over `max_gap_nm` may come back as inf.
    """
    if len(a) * len(b) <= _BRUTE_FORCE_PAIRS:
        d = np.linalg.norm((a[:, None, :] - b[None, :, :]) * res, axis=2)
        i, j = np.unravel_index(int(np.argmin(d)), d.shape)
        return int(i), int(j), float(d[i, j])
    dist, nearest = cKDTree(b * res).query(a * res, distance_upper_bound=max_gap_nm * _BOUND_SLACK)
    i = int(np.argmin(dist))
    return i, int(min(nearest[i], len(b) - 1)), float(dist[i])


def site_components(
    proximity: np.ndarray, tau: float = DEFAULT_TAU, connectivity: int = DEFAULT_CONNECTIVITY
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled components of p > tau (presynaptic) and p < -tau (postsynaptic).

    These are the components that `generate_candidates` numbers
    `pre_component` and `post_component`: a candidate's presynaptic site is
    `(pre == pre_component) & (segmentation == pre_segment)`, and likewise
    for its postsynaptic site.

    Args:
      proximity: [z, y, x] signed proximity in [-1, 1].
      tau: site threshold.
      connectivity: 6, 18 or 26.

    Returns:
      (pre, post): [z, y, x] component labels each, 0 = no site.
    """
    proximity = np.asarray(proximity)
    if connectivity not in VALID_CONNECTIVITY:
        raise ConfigError(f"connectivity={connectivity}: expected one of {VALID_CONNECTIVITY}")
    return (
        cc3d.connected_components(proximity > tau, connectivity=connectivity),
        cc3d.connected_components(proximity < -tau, connectivity=connectivity),
    )


def check_candidate_parameters(
    tau: float, omega: int, connectivity: int, max_gap_nm: float
) -> None:
    """Raises ConfigError for parameters `generate_candidates` cannot use (see its Args)."""
    if connectivity not in VALID_CONNECTIVITY:
        raise ConfigError(f"connectivity={connectivity}: expected one of {VALID_CONNECTIVITY}")
    if not 0.0 <= tau < 1.0 or omega < 1 or max_gap_nm < 0:
        raise ConfigError(
            f"tau={tau}, omega={omega}, max_gap_nm={max_gap_nm}: expected 0 <= tau < 1, "
            "omega >= 1, max_gap_nm >= 0"
        )


def generate_candidates(
    proximity: np.ndarray,
    segmentation: np.ndarray,
    resolution: Sequence[float],
    tau: float = DEFAULT_TAU,
    omega: int = DEFAULT_OMEGA,
    connectivity: int = DEFAULT_CONNECTIVITY,
    max_gap_nm: float = DEFAULT_MAX_GAP_NM,
) -> Candidates:
    """Pairs of pre and post sites on touching segments (see module docstring).

    Args:
      proximity: [z, y, x] signed proximity in [-1, 1].
      segmentation: [z, y, x] neuron segmentation, 0 = unlabelled.
      resolution: voxel size in nm, z-y-x.
      tau: site threshold: p > tau is presynaptic, p < -tau postsynaptic.
      omega: minimum voxels a site must share with a segment to sit on it.
      connectivity: 6, 18 or 26 for the site components.
      max_gap_nm: largest distance between the two sub-masks, in nm.

    Returns:
      The candidates, sorted by (pre component, pre segment, post component,
      post segment).

    Raises:
      DataError: the volumes' shapes differ or are not 3D.
      ConfigError: a parameter is out of range.
    """
    proximity = np.asarray(proximity)
    segmentation = np.asarray(segmentation)
    if proximity.ndim != 3 or proximity.shape != segmentation.shape:
        raise DataError(
            f"proximity {proximity.shape} and segmentation {segmentation.shape}: "
            "expected two 3D volumes of one shape"
        )
    res = voxel_size(resolution)
    check_candidate_parameters(tau, omega, connectivity, max_gap_nm)

    pre_cc, post_cc = site_components(proximity, tau, connectivity)
    dense, original = _renumber(segmentation)
    magnitude = np.abs(proximity)
    pre = _Sites.build(pre_cc, dense, omega, magnitude)
    post = _Sites.build(post_cc, dense, omega, magnitude)
    if len(pre) == 0 or len(post) == 0:
        return Candidates.empty()

    pre_lo, pre_hi = pre.boxes()
    post_lo, post_hi = post.boxes()
    pre_i, post_i = near_site_pairs(
        pre.rows[:, 1],
        post.rows[:, 1],
        segment_adjacency(dense),
        (pre_lo, pre_hi),
        (post_lo, post_hi),
        res,
        max_gap_nm,
    )
    rows = []
    for i, j in zip(pre_i, post_i, strict=True):
        found = closest_site_points(
            pre.surface_of(i),
            post.surface_of(j),
            (pre_lo[i], pre_hi[i]),
            (post_lo[j], post_hi[j]),
            res,
            max_gap_nm,
        )
        if found is None:
            continue
        pre_comp, pre_seg, pre_count = (int(v) for v in pre.rows[i])
        post_comp, post_seg, post_count = (int(v) for v in post.rows[j])
        score = (pre.weight_sums[i] + post.weight_sums[j]) / (pre_count + post_count)
        rows.append(
            CandidateRow(
                pre_comp,
                int(original[pre_seg]),
                post_comp,
                int(original[post_seg]),
                pre_count,
                post_count,
                *found,
                score,
            )
        )
    return candidates_from_rows(rows, res)


class CandidateRow(NamedTuple):
    """One candidate as `generate_candidates` finds it (see `Candidates` for the fields)."""

    pre_component: int
    pre_segment: int
    post_component: int
    post_segment: int
    pre_overlap: int
    post_overlap: int
    pre_point: np.ndarray
    post_point: np.ndarray
    gap_nm: float
    score: float


def candidates_from_rows(rows: Sequence[CandidateRow], resolution: Sequence[float]) -> Candidates:
    """`Candidates` of rows found in any order, sorted by their four ids.

    Args:
      rows: the candidates.
      resolution: voxel size in nm, z-y-x (for `location`).

    Returns:
      The candidates sorted by (pre component, pre segment, post component,
      post segment).
    """
    if not rows:
        return Candidates.empty()
    rows = sorted(rows, key=lambda row: row[:4])
    cols = list(zip(*rows, strict=True))
    pre_point = np.stack(cols[6]).astype(np.int64)
    post_point = np.stack(cols[7]).astype(np.int64)
    return Candidates(
        pre_component=np.asarray(cols[0], np.int64),
        pre_segment=np.asarray(cols[1], np.uint64),
        post_component=np.asarray(cols[2], np.int64),
        post_segment=np.asarray(cols[3], np.uint64),
        pre_overlap=np.asarray(cols[4], np.int64),
        post_overlap=np.asarray(cols[5], np.int64),
        location=(pre_point + post_point) * 0.5 * voxel_size(resolution),
        pre_point=pre_point,
        post_point=post_point,
        gap_nm=np.asarray(cols[8], np.float64),
        score=np.asarray(cols[9], np.float64),
    )


def near_site_pairs(
    pre_segment: np.ndarray,
    post_segment: np.ndarray,
    adjacency: np.ndarray,
    pre_box: tuple[np.ndarray, np.ndarray],
    post_box: tuple[np.ndarray, np.ndarray],
    resolution: Sequence[float],
    max_gap_nm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Pre and post sites on adjacent segments whose bounding boxes lie within `max_gap_nm`.

    Args:
      pre_segment, post_segment: `[k_pre]`, `[k_post]` segment id of each site.
      adjacency: `[m, 2]` ordered pairs of adjacent segments (both orders present).
      pre_box, post_box: `([k, 3], [k, 3])` first and last voxel (inclusive) of
        each site's bounding box.
      resolution: voxel size in nm, z-y-x.
      max_gap_nm: largest distance between the two sites.

    Returns:
      `(pre_index, post_index)` `[n]` each: the site pairs, in join order
      (pre site, then adjacency row, then post site).
    """
    # Join pre sites -> adjacent segment pairs -> post sites on the partner segment.
    pre_i, adj_i = _join(pre_segment, adjacency[:, 0])
    link_i, post_i = _join(adjacency[adj_i, 1], post_segment)
    pre_i = pre_i[link_i]
    # Drop pairs of sites whose bounding boxes are already too far apart.
    res = voxel_size(resolution)
    gap = _box_gap_nm(
        pre_box[0][pre_i], pre_box[1][pre_i], post_box[0][post_i], post_box[1][post_i], res
    )
    near = gap <= max_gap_nm
    return pre_i[near], post_i[near]


def search_margin(resolution: Sequence[float], max_gap_nm: float) -> np.ndarray:
    """`[3]` int64 voxels per axis within which a site can lie `max_gap_nm` from another."""
    return np.floor(max_gap_nm / voxel_size(resolution)).astype(np.int64)


def closest_site_points(
    pre_surface: np.ndarray,
    post_surface: np.ndarray,
    pre_box: tuple[np.ndarray, np.ndarray],
    post_box: tuple[np.ndarray, np.ndarray],
    resolution: Sequence[float],
    max_gap_nm: float,
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """The closest voxels of a pre and a post site, and their distance.

    Only surface voxels within `search_margin` of the other site's box can be
    closest, so `pre_surface` need only hold the pre site's surface voxels
    inside the post box grown by that margin (more are allowed), and likewise
    `post_surface`.

    Args:
      pre_surface, post_surface: `[m, 3]` int64 surface voxels of each site
        (a voxel with a face neighbour outside the site or the volume), in
        raster order: ties go to the first.
      pre_box, post_box: `([3], [3])` first and last voxel of each site's box.
      resolution: voxel size in nm, z-y-x.
      max_gap_nm: largest distance between the two sites.

    Returns:
      `(pre_point [3], post_point [3], gap_nm)`, or None when the sites lie
      farther apart than `max_gap_nm`.
    """
    res = voxel_size(resolution)
    margin = search_margin(resolution, max_gap_nm)
    pre_vox = _in_box(pre_surface, post_box[0] - margin, post_box[1] + margin)
    post_vox = _in_box(post_surface, pre_box[0] - margin, pre_box[1] + margin)
    if len(pre_vox) == 0 or len(post_vox) == 0:
        return None
    # Once more with the boxes of what is left, which are often much smaller.
    pre_vox = _in_box(pre_vox, post_vox.min(0) - margin, post_vox.max(0) + margin)
    if len(pre_vox) == 0:
        return None
    post_vox = _in_box(post_vox, pre_vox.min(0) - margin, pre_vox.max(0) + margin)
    if len(post_vox) == 0:
        return None
    a, b, gap = _closest(pre_vox, post_vox, res, max_gap_nm)
    if gap > max_gap_nm:
        return None
    # Copies: a row of `pre_vox` is a view that would keep all of it alive.
    return pre_vox[a].copy(), post_vox[b].copy(), gap
