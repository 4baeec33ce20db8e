"""Partner candidates of volumes read block by block (on-disk proximity and segmentation).

`generate_candidates_blockwise` finds the candidates that
`synjax.postprocess.candidates.generate_candidates` finds on the whole volume,
the same rows in the same order (scores equal up to the order of a float64
sum), while memory holds one block plus tables of ids:

1. the components of p > tau and p < -tau are labelled block by block into
   two label volumes (`blockwise_components.site_components_blockwise`; the
   ids equal cc3d's on the whole volume);
2. every (component, segment) overlap's voxel count, sum of |p| and bounding
   box are accumulated per block (`site_overlaps_blockwise`); the sites are
   the overlaps of at least omega voxels;
3. the segments' face adjacency is accumulated per block
   (`segment_adjacency_blockwise`), and pre and post sites on adjacent
   segments whose boxes lie within `max_gap_nm` are paired
   (`candidates.near_site_pairs`);
4. each site's surface is read back once from the label volumes and the
   segmentation, only where a closest point can lie (its box cut to its
   partners' boxes grown by the search margin, plus one voxel to tell its
   surface), and each pair's closest points are found as on the whole volume
   (`candidates.closest_site_points`).

Step 4 reads a region up to the size of a site's box, not a block: synaptic
sites are small, but a site as large as the volume would be read whole here.

Resuming: with a `state` folder (`blockwise_pass_state.PassState`, keyed by
the block grid, the caller's provenance and every parameter) each pass keeps
what it has finished: the labelling's blocks (a prefix: ids count on from
the blocks before), its joins per block, the final id table before the
label volumes are relabelled in place, and that relabelling per storage
chunk, so no chunk is relabelled twice; the overlaps' and adjacency's rows
per block and their tables when the pass ends; the closest points per batch
of `PAIR_BATCH` site pairs. A run killed part-way, SIGKILL included, and
started again on the same label volumes finds the same candidates.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from synjax.errors import DataError
from synjax.geometry import SPATIAL_DIMS, Box, voxel_size
from synjax.inference.block_grid import BlockGrid
from synjax.postprocess.blockwise_components import (
    SiteTable,
    segment_adjacency_blockwise,
    site_components_blockwise,
    site_overlaps_blockwise,
)
from synjax.postprocess.blockwise_pass_state import PassState, each_block_result
from synjax.postprocess.candidates import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_MAX_GAP_NM,
    DEFAULT_OMEGA,
    DEFAULT_TAU,
    CandidateRow,
    Candidates,
    candidates_from_rows,
    check_candidate_parameters,
    closest_site_points,
    near_site_pairs,
    search_margin,
)
from synjax.report.progress import progress_bar

# Bound of the surfaces kept for post sites that come back in later pairs.
DEFAULT_CACHE_BYTES = 64 << 20
# Site pairs whose closest points a state keeps together (one file per batch).
PAIR_BATCH = 1024
CANDIDATES_STATE_FORMAT = "synjax-candidates-passes-v1"
PAIRS_PASS, CANDIDATES_PASS = "pairs", "candidates"


class _Magnitude:
    """|p| of a `[z, y, x]` volume, read region by region (a weight for the overlaps)."""

    def __init__(self, volume: Any):
        self.volume = volume
        self.shape = tuple(int(s) for s in volume.shape)

    def __getitem__(self, key) -> np.ndarray:
        return np.abs(np.asarray(self.volume[key]))


def _sites(
    components: Any,
    segmentation: Any,
    block_shape,
    omega: int,
    magnitude: _Magnitude,
    progress: bool,
    passes: PassState | None = None,
    side: str = "pre",
) -> SiteTable:
    """The (component, segment) overlaps of at least `omega` voxels."""
    overlaps = site_overlaps_blockwise(
        components, segmentation, block_shape, magnitude, progress, passes, f"{side}_overlaps"
    )
    return overlaps.select(overlaps.count >= omega)


def site_surface_near(
    components: Any,
    segmentation: Any,
    component: int,
    segment: int,
    site_box: Box,
    near: Box,
) -> np.ndarray:
    """Surface voxels of one site that lie in `near`, read from the volumes around them.

    A site is the voxels of `component` in `components` and of `segment` in
    `segmentation`; a surface voxel is one with a face neighbour outside the
    site or the volume (as `candidates.generate_candidates` has it).

    Args:
      components: `[z, y, x]` component labels (lazy volume or array).
      segmentation: `[z, y, x]` segment labels.
      component, segment: the site's ids.
      site_box: the site's bounding box (voxels outside it are not read).
      near: the region to look in.

    Returns:
      `[m, 3]` int64 voxels in raster order.
    """
    search = site_box.intersect(near)
    if search.is_empty():
        return np.zeros((0, SPATIAL_DIMS), np.int64)
    volume = Box.from_shape(tuple(components.shape[:SPATIAL_DIMS]))
    # One voxel more on each side tells whether a voxel at the search's edge is on the surface.
    read = search.pad(1).intersect(volume)
    site = (np.asarray(components[read.slices()]) == component) & (
        np.asarray(segmentation[read.slices()]) == segment
    )
    # Past the volume's edge is outside the site; the padding stands for it.
    padded = np.pad(site, 1, constant_values=False)
    inner = site.copy()
    for axis in range(SPATIAL_DIMS):
        for step in (-1, 1):
            inner &= np.roll(padded, step, axis=axis)[(slice(1, -1),) * SPATIAL_DIMS]
    surface = site & ~inner
    local = search.relative_to(read)
    return np.argwhere(surface[local.slices()]) + np.asarray(search.start)


def _search_regions(
    site_index: np.ndarray,
    partner_box: tuple[np.ndarray, np.ndarray],
    num_sites: int,
    margin: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per site, the box around all its partners' boxes grown by `margin` (inclusive ends).

    Args:
      site_index: `[n]` the site of each pair.
      partner_box: `([n, 3], [n, 3])` the box of each pair's partner site
        (already indexed per pair).
      num_sites: sites on this side.
      margin: `[3]` voxels of the closest-point search.

    Returns:
      `([num_sites, 3] first voxel, [num_sites, 3] last voxel)`; a site
      without a pair gets an empty box (first > last).
    """
    lo = np.full((num_sites, SPATIAL_DIMS), np.iinfo(np.int64).max, np.int64)
    hi = np.full((num_sites, SPATIAL_DIMS), np.iinfo(np.int64).min, np.int64)
    np.minimum.at(lo, site_index, partner_box[0] - margin)
    np.maximum.at(hi, site_index, partner_box[1] + margin)
    return lo, hi


class _SiteSurfaces:
    """Surface voxels of the sites of one side, each read once near all of its partners.

    A site's surface is read in its box cut to `regions` (its partners'
    boxes grown by the search margin, `_search_regions`), which holds every
    voxel `closest_site_points` looks at for any of its pairs. Pairs come
    grouped by pre site, so the pre side needs one entry; the post side's
    repeats are served from a cache of the latest sites, bounded in bytes
    (a site's surface may be large; its count is not what fills memory).
    """

    def __init__(
        self,
        components: Any,
        segmentation: Any,
        sites: SiteTable,
        regions: tuple[np.ndarray, np.ndarray],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        self.components, self.segmentation, self.sites = components, segmentation, sites
        self.regions, self.cache_bytes = regions, cache_bytes
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._held = 0

    def __call__(self, k: int) -> np.ndarray:
        """`[m, 3]` surface voxels of site `k` near its partners, in raster order."""
        k = int(k)
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        site = self.sites
        surface = site_surface_near(
            self.components,
            self.segmentation,
            site.component[k],
            site.segment[k],
            Box(tuple(site.start[k]), tuple(site.stop[k])),
            Box(tuple(self.regions[0][k]), tuple(self.regions[1][k] + 1)),
        )
        self._cache[k] = surface
        self._held += surface.nbytes
        # The newest entry stays even when it alone is over the bound.
        while self._held > self.cache_bytes and len(self._cache) > 1:
            self._held -= self._cache.popitem(last=False)[1].nbytes
        return surface


def _at(box: tuple[np.ndarray, np.ndarray], index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return box[0][index], box[1][index]


def _inclusive_box(start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(start, np.int64), np.asarray(stop, np.int64) - 1


def _row_arrays(rows: Sequence[CandidateRow]) -> dict[str, np.ndarray]:
    """Candidate rows as named columns (to keep a batch of them in a pass state)."""
    columns = {name: [] for name in CandidateRow._fields}
    for row in rows:
        for name, value in zip(CandidateRow._fields, row, strict=True):
            columns[name].append(value)
    arrays = {name: np.asarray(values) for name, values in columns.items()}
    for name in ("pre_point", "post_point"):
        arrays[name] = np.asarray(columns[name], np.int64).reshape(-1, SPATIAL_DIMS)
    return arrays


def _rows_of(arrays: dict[str, np.ndarray]) -> list[CandidateRow]:
    """`_row_arrays` read back: the same rows, with Python ints and floats."""
    ints = ("pre_component", "pre_segment", "post_component", "post_segment")
    ints += ("pre_overlap", "post_overlap")
    count = len(arrays["pre_component"])
    return [
        CandidateRow(
            *(int(arrays[name][k]) for name in ints),
            arrays["pre_point"][k],
            arrays["post_point"][k],
            float(arrays["gap_nm"][k]),
            float(arrays["score"][k]),
        )
        for k in range(count)
    ]


def _pair_rows(pre, post, pre_i, post_i, pre_surfaces, post_surfaces, boxes, res, max_gap_nm):
    """The candidate rows of the site pairs `(pre_i[k], post_i[k])` whose sites come close."""
    pre_box, post_box = boxes
    rows = []
    for i, j in zip(pre_i, post_i, strict=True):
        found = closest_site_points(
            pre_surfaces(i),
            post_surfaces(j),
            (pre_box[0][i], pre_box[1][i]),
            (post_box[0][j], post_box[1][j]),
            res,
            max_gap_nm,
        )
        if found is None:
            continue
        count_pre, count_post = int(pre.count[i]), int(post.count[j])
        score = (pre.weight_sum[i] + post.weight_sum[j]) / (count_pre + count_post)
        rows.append(
            CandidateRow(
                int(pre.component[i]),
                int(pre.segment[i]),
                int(post.component[j]),
                int(post.segment[j]),
                count_pre,
                count_post,
                *found,
                float(score),
            )
        )
    return rows


def open_candidates_state(
    path: str | os.PathLike,
    volume_shape: Sequence[int],
    block_shape: Sequence[int] | int,
    provenance: Any,
    tau: float = DEFAULT_TAU,
    omega: int = DEFAULT_OMEGA,
    connectivity: int = DEFAULT_CONNECTIVITY,
    max_gap_nm: float = DEFAULT_MAX_GAP_NM,
) -> PassState:
    """The pass state of `generate_candidates_blockwise` at `path` (wiped if made otherwise).

    Keyed by the block grid, `provenance` (what the proximity and the
    segmentation are) and every parameter that changes the candidates.
    """
    grid = BlockGrid(tuple(int(s) for s in volume_shape[:SPATIAL_DIMS]), block_shape)
    parameters = {
        "format": CANDIDATES_STATE_FORMAT,
        "tau": float(tau),
        "omega": int(omega),
        "connectivity": int(connectivity),
        "max_gap_nm": float(max_gap_nm),
        "pair_batch": PAIR_BATCH,
    }
    return PassState(
        path, grid, {"made_from": provenance, "block_shape": list(grid.block_shape)} | parameters
    )


def generate_candidates_blockwise(
    proximity: Any,
    segmentation: Any,
    resolution: Sequence[float],
    pre_components: Any,
    post_components: Any,
    block_shape: Sequence[int] | int,
    tau: float = DEFAULT_TAU,
    omega: int = DEFAULT_OMEGA,
    connectivity: int = DEFAULT_CONNECTIVITY,
    max_gap_nm: float = DEFAULT_MAX_GAP_NM,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
    state: str | os.PathLike | None = None,
    provenance: Any = None,
    remove_state: bool = True,
) -> Candidates:
    """`candidates.generate_candidates` of volumes read block by block.

    Args:
      proximity: `[z, y, x]` signed proximity in [-1, 1] (a lazy volume or an array).
      segmentation: `[z, y, x]` neuron segmentation, 0 = unlabelled.
      resolution: voxel size in nm, z-y-x.
      pre_components, post_components: `[z, y, x]` writable integer volumes
        (uint64 or uint32) that receive the labels of p > tau and p < -tau
        (see `site_components`); on disk for volumes larger than memory.
        With `state`, a resumed run must be given the volumes the killed
        one wrote (their labels are relabelled in place, chunk by chunk).
      block_shape: `(bz, by, bx)` (or one int) of the blocks read and written;
        a multiple of the volumes' chunks reads and writes whole chunks.
      tau, omega, connectivity, max_gap_nm: as `generate_candidates`.
      progress: show progress bars over the blocks of each pass and the site pairs.
      report: called with a line on each step (e.g. `logging.info`).
      state: a folder where the passes keep what they have finished
        (`blockwise_pass_state.PassState`): every per-block pass records its
        blocks, the tables are saved as each pass ends, the closest points
        are kept per batch of `PAIR_BATCH` site pairs, and the candidates
        once found; a run killed part-way (SIGKILL included) and started
        again with the same arguments finds the same candidates without
        computing again what was finished. None: no state.
      provenance: what the proximity and segmentation are (JSON-serialisable);
        a state made from another provenance, block shape or parameters is
        wiped rather than reused.
      remove_state: delete the state once the candidates are found; False
        keeps it (with the candidates) for a caller whose next steps may be
        killed too, and who removes it (`PassState.remove`) when done.

    Returns:
      The candidates, sorted by (pre component, pre segment, post component,
      post segment), as `generate_candidates` gives them.

    Raises:
      DataError: the volumes' shapes differ or are not 3D.
      ConfigError: a parameter is out of range.
    """
    shapes = {tuple(v.shape) for v in (proximity, segmentation, pre_components, post_components)}
    if len(shapes) != 1 or len(next(iter(shapes))) != SPATIAL_DIMS:
        raise DataError(
            f"proximity {tuple(proximity.shape)}, segmentation {tuple(segmentation.shape)} and "
            f"the component volumes: expected 3D volumes of one shape, got {sorted(shapes)}"
        )
    check_candidate_parameters(tau, omega, connectivity, max_gap_nm)
    passes = None
    if state is not None:
        passes = open_candidates_state(
            state,
            next(iter(shapes)),
            block_shape,
            provenance,
            tau,
            omega,
            connectivity,
            max_gap_nm,
        )
    stored = None if passes is None else passes.load(CANDIDATES_PASS)
    if stored is not None:
        found = Candidates(**stored)
        (report or (lambda line: None))(f"candidates: {len(found)} found before in {state}")
    else:
        found = _candidates(
            proximity,
            segmentation,
            resolution,
            pre_components,
            post_components,
            block_shape,
            tau,
            omega,
            connectivity,
            max_gap_nm,
            progress,
            report,
            passes,
        )
        if passes is not None and not remove_state:
            passes.save(CANDIDATES_PASS, **dataclasses.asdict(found))
    if passes is not None and remove_state:
        passes.remove()
    return found


def _candidates(
    proximity,
    segmentation,
    resolution,
    pre_components,
    post_components,
    block_shape,
    tau,
    omega,
    connectivity,
    max_gap_nm,
    progress,
    report,
    passes: PassState | None,
) -> Candidates:
    """The passes of `generate_candidates_blockwise` (each resumable with `passes`)."""
    res = voxel_size(resolution)
    say = report or (lambda line: None)
    n_pre, n_post = site_components_blockwise(
        proximity, pre_components, post_components, block_shape, tau, connectivity, progress, passes
    )
    say(f"candidates: {n_pre} components of p > {tau}, {n_post} of p < -{tau}")
    magnitude = _Magnitude(proximity)
    pre = _sites(
        pre_components, segmentation, block_shape, omega, magnitude, progress, passes, "pre"
    )
    post = _sites(
        post_components, segmentation, block_shape, omega, magnitude, progress, passes, "post"
    )
    say(f"candidates: {len(pre)} pre and {len(post)} post sites of at least {omega} voxels")
    if len(pre) == 0 or len(post) == 0:
        return Candidates.empty()
    adjacency = segment_adjacency_blockwise(segmentation, block_shape, progress, passes)
    pre_box, post_box = _inclusive_box(pre.start, pre.stop), _inclusive_box(post.start, post.stop)
    pre_i, post_i = near_site_pairs(
        pre.segment, post.segment, adjacency, pre_box, post_box, res, max_gap_nm
    )
    say(
        f"candidates: {len(adjacency) // 2} pairs of touching segments, {len(pre_i)} pairs of "
        f"sites on them within {max_gap_nm:g} nm (boxes)"
    )
    if len(pre_i) == 0:
        return Candidates.empty()
    margin = search_margin(res, max_gap_nm)
    pre_surfaces = _SiteSurfaces(
        pre_components,
        segmentation,
        pre,
        _search_regions(pre_i, _at(post_box, post_i), len(pre), margin),
        cache_bytes=0,  # pairs come grouped by pre site: the latest one is enough
    )
    post_surfaces = _SiteSurfaces(
        post_components,
        segmentation,
        post,
        _search_regions(post_i, _at(pre_box, pre_i), len(post), margin),
    )
    # The site pairs in batches, a 1-D grid of them (x only) for the done-array.
    batches = BlockGrid((1, 1, len(pre_i)), (1, 1, PAIR_BATCH))
    rows: list[CandidateRow] = []

    def batch_rows(batch: int) -> dict[str, np.ndarray]:
        pairs = slice(batch * PAIR_BATCH, (batch + 1) * PAIR_BATCH)
        return _row_arrays(
            _pair_rows(
                pre,
                post,
                pre_i[pairs],
                post_i[pairs],
                pre_surfaces,
                post_surfaces,
                (pre_box, post_box),
                res,
                max_gap_nm,
            )
        )

    for found in each_block_result(
        passes,
        PAIRS_PASS,
        batches.block_ids(),
        batch_rows,
        lambda ids: progress_bar(
            ids, total=len(ids), desc="site pair batches", disable=not progress
        ),
        grid=batches,
    ):
        rows.extend(_rows_of(found))
    say(f"candidates: {len(rows)} within {max_gap_nm:g} nm")
    return candidates_from_rows(rows, res)
