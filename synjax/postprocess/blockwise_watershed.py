"""Seeded watershed and mean-boundary agglomeration of a volume read block by block.

`segment_blockwise` computes what `watershed.segment` followed by
`agglomeration.agglomerate` computes on a whole volume, holding one block
(with its halo) and tables of ids in memory:

0. Range: each block is smoothed (with the Gaussian's reach of extra input)
   and the minimum and maximum over the mask are gathered, for the min-max
   rescaling and for the H-minima transform's special cases.
1. Fragments: each block is flooded on its *halo box*, its voxels grown by
   `halo` on every side (cut to the volume): smoothed, quantised with the
   whole volume's range, H-minima seeds (a morphological reconstruction),
   scikit-image's watershed. The block's own voxels are written to `dest`
   with ids made unique by an offset. For each face towards another block the
   block keeps one bit per face voxel: whether its flood gave the voxel just
   across the face the same label as the face voxel.
2. Stitching: fragments of neighbouring blocks that touch across a face are
   joined where *both* blocks' bits say "same segment" (a conservative rule:
   where the two floods disagree the fragments stay apart, and step 3 may
   still merge them). Joined fragments are numbered by the raster position
   of their seed's first voxel, which is how the whole-volume watershed
   numbers its segments (cc3d numbers the seed components in that order).
3. Region graph: per block, with one voxel of the stitched labels around it,
   the contacts that `agglomeration.region_graph` (scikit-image's
   `rag_boundary`) counts: each voxel's smallest and largest neighbour label,
   with the boundary value summed and counted per label pair. The graph (ids
   only) is merged with `agglomeration.merge_graph`, as the whole-volume
   agglomeration does.
4. Relabelling: `dest` is rewritten block by block, fragment id -> final id.

The passes are in `blockwise_passes`; this module orders them and keeps
their state.

When it equals the whole volume (exactness)
-------------------------------------------
Let the *foreground* be the voxels that are flooded: inside `mask` and, with
`background_threshold`, at or below it (after smoothing and rescaling). The
block-wise labels equal those of `segment` + `agglomerate` on the whole
volume, up to renumbering, when **every connected component (6-connected) of
the foreground that meets a block lies inside that block's halo box**. Why:
smoothing and quantising are exact on the halo box (extra input covers the
Gaussian's reach, and the range is the whole volume's); background is raised
to the top level, so the H-minima reconstruction and the priority flood of a
foreground component depend only on the component's own voxels (the flood's
order among them, ties included, is the same sequence of heap pops and
pushes); so each block's labels equal the whole volume's on every
foreground component that meets the block, both blocks agree on every
face and stitching joins exactly the fragments of one segment; the contact
sums are then those of the whole volume's region graph. The H-minima
fallback (no seed anywhere: the global minima seed) is decided from all
blocks, as on the whole volume. One caveat
of floating point: contact sums are added in another order, so edge weights
may differ in the last bit unless the boundary values are exact binary
fractions (multiples of 1/256, say; k/255 is not one); only a contact weight
within rounding of the threshold, or two contacts tied within rounding, can
then merge differently.

The condition is checked in every block (exactly: the foreground is labelled
one voxel past the halo box, and a component reaching both the block and
that outer layer leaves the halo box); blocks where it fails are reported
(`BlockwiseSegmentation.inexact_blocks`), or raise with `require_exact`. It
holds where a `background_threshold` or `mask` cuts the volume into pieces
smaller than the halo (membrane-thick gaps between cells, separated objects).
Where neurons span many blocks it cannot hold; the result is then a
watershed per halo box, stitched where neighbouring floods agree and
agglomerated across the faces. Like any exact result, the exact one does not
depend on the block size; the tests check both.

Resuming: with a `state` folder each pass keeps what it has finished
(`blockwise_pass_state`), block by block with a done-array: each block's
range, its fragment count, seed keys and face bits, its contacts folded by
pair; and once a pass is over its result: the range, the stitched pairs, the
region graph, and the final id table, saved before `dest` is relabelled in
place; the relabelling records each of `dest`'s chunks once rewritten. A run
killed part-way (even by SIGKILL) and started again computes no finished
block again and writes the labels an uninterrupted run writes. Only the
stitching (which reads the faces, no flood) is redone whole if killed in it.

Memory: one halo box of float64 and a few of its label arrays, the fragment,
seed and contact tables (ids), and the face bits: one bit per voxel on each
face between two blocks, so about `6 / (8 * block edge)` bytes per voxel of
the volume (a 128-voxel block: 1/170 of the voxel count in bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS
from synjax.inference.block_grid import BlockGrid
from synjax.postprocess import blockwise_passes
from synjax.postprocess.agglomeration import merge_graph, relabel
from synjax.postprocess.blockwise_components import join_ids
from synjax.postprocess.blockwise_pass_state import PassState
from synjax.postprocess.watershed import (
    Smoothing,
    check_h,
    smoothing_radius,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BlockwiseSegmentation:
    """What `segment_blockwise` wrote to `dest`.

    Attributes:
      num_fragments: Labels found by the blocks before stitching.
      num_segments: Watershed segments after stitching.
      num_labels: Labels in `dest` (after agglomeration; `num_segments` without).
      inexact_blocks: Ids (`BlockGrid` order) of the blocks where a foreground
        component leaves the halo box, so that the result may differ from the
        whole-volume one (see the module docstring). Empty: equal to it.
    """

    num_fragments: int
    num_segments: int
    num_labels: int
    inexact_blocks: tuple[int, ...]


def segment_blockwise(
    boundary: Any,
    dest: Any,
    block_shape: Sequence[int] | int,
    sigma_xy: float,
    h: float,
    *,
    halo: int,
    smoothing: Smoothing = "2d",
    mask: Any = None,
    background_threshold: float | None = None,
    rescale: bool = True,
    threshold: float | None = None,
    agglomeration_boundary: Any = None,
    require_exact: bool = False,
    progress: bool = False,
    state: str | os.PathLike | None = None,
    provenance: dict | None = None,
) -> BlockwiseSegmentation:
    """`watershed.segment` (then `agglomeration.agglomerate`) block by block into `dest`.

    Args:
      boundary: `[z, y, x]` map high on boundaries (any array-like volume).
      dest: `[z, y, x]` uint64 volume written block by block (numpy, zarr,
        tensorstore...); it ends up holding segment ids 1..n, 0 = background.
      block_shape: `(bz, by, bx)` (or one int) of the blocks; best a multiple
        of `dest`'s chunks.
      sigma_xy, h, smoothing, mask, background_threshold, rescale: as in
        `watershed.segment` (`mask` may be a volume read block by block).
      halo: voxels of context flooded around each block (>= 1); see the
        module docstring for when the result is exact.
      threshold: agglomeration threshold in [0, 1]; None: the watershed alone.
      agglomeration_boundary: the boundary map the agglomeration averages, in
        [0, 1]; None: `boundary` itself (as the neuron pipeline passes it).
      require_exact: raise instead of reporting inexact blocks.
      progress: a progress bar per pass over the blocks (and a log line per
        pass with its time).
      state: a folder where the passes keep what they have finished
        (`blockwise_pass_state.PassState`), so that a run killed part-way and
        started again with the same arguments and `dest` computes only what
        is left, with the same result; removed once `dest` is finished.
        None: no state, a killed run starts over. The state belongs to
        `dest`: a caller that recreates `dest` removes it.
      provenance: what `boundary` (and `mask`, `agglomeration_boundary`) are
        (JSON-serialisable); a state made from another provenance, or with
        other parameters or blocks, is started afresh.

    Returns:
      Counts and the blocks where the result may differ from the whole volume's.

    Raises:
      DataError: shapes differ, or (with `require_exact`) a block is inexact,
        naming the block.
      ConfigError: a parameter is out of range.
    """
    shape = tuple(boundary.shape)
    volumes = [("dest", dest), ("mask", mask), ("agglomeration_boundary", agglomeration_boundary)]
    for name, volume in volumes:
        if len(shape) != SPATIAL_DIMS or (volume is not None and tuple(volume.shape) != shape):
            raise DataError(
                f"segment_blockwise: boundary {shape} and {name} "
                f"{None if volume is None else tuple(volume.shape)}: expected 3D volumes of "
                "one shape"
            )
    if int(halo) < 1:
        raise ConfigError(f"segment_blockwise halo={halo}: expected >= 1 voxel")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"agglomeration threshold must be in [0, 1], got {threshold}")
    depth = check_h(h)
    smoothing_radius(sigma_xy, smoothing)  # checks sigma and smoothing
    grid = BlockGrid(shape, block_shape)
    passes = None
    if state is not None:
        parameters = {
            "sigma_xy": float(sigma_xy),
            "h": float(h),
            "halo": int(halo),
            "smoothing": smoothing,
            "background_threshold": background_threshold,
            "rescale": bool(rescale),
            "threshold": threshold,
            "mask": mask is not None,
            "agglomeration_boundary": agglomeration_boundary is not None,
        }
        passes = PassState(
            state, grid, blockwise_passes.state_provenance(provenance, grid.block_shape, parameters)
        )

    start = time.perf_counter()
    finished = None if passes is None else passes.load("relabel")
    if finished is None:
        finished = _final_ids(
            boundary,
            dest,
            mask,
            grid,
            int(halo),
            sigma_xy,
            smoothing,
            depth,
            progress,
            background_threshold,
            rescale,
            threshold,
            agglomeration_boundary,
            require_exact,
            passes,
        )
    else:
        log.info("Block-wise watershed: final ids found in %s; relabelling what is left", state)
    log.info(
        "Block-wise watershed: %d segments, %d after agglomeration; relabelling (%.0f s so far)",
        int(finished["num_segments"]),
        int(finished["num_labels"]),
        time.perf_counter() - start,
    )
    blockwise_passes.relabel_dest(dest, finished["to_segment"], grid, passes, progress)
    if passes is not None:
        passes.remove()
    return BlockwiseSegmentation(
        int(finished["num_fragments"]),
        int(finished["num_segments"]),
        int(finished["num_labels"]),
        tuple(int(b) for b in finished["inexact"]),
    )


def _final_ids(
    boundary,
    dest,
    mask,
    grid,
    halo,
    sigma_xy,
    smoothing,
    depth,
    progress,
    background_threshold,
    rescale,
    threshold,
    agglomeration_boundary,
    require_exact,
    passes: PassState | None,
) -> dict[str, Any]:
    """Passes 0-3: the final id of every fragment (`to_segment`) and the counts.

    With `passes`, each pass's result is saved as it finishes and read back
    by a rerun; the final table is saved before `dest` is relabelled.
    """
    start = time.perf_counter()
    stored = None if passes is None else passes.load("range")
    if stored is None:
        whole = blockwise_passes.whole_range(
            boundary,
            mask,
            grid,
            sigma_xy,
            smoothing,
            rescale,
            depth,
            background_threshold,
            progress,
            passes,
        )
        if passes is not None:
            passes.save("range", **blockwise_passes.range_arrays(whole))
    else:
        whole = blockwise_passes.range_from(stored)
    args = (boundary, dest, mask, grid, halo, sigma_xy, smoothing, depth, progress)
    num_fragments, keys, faces, inexact = blockwise_passes.fragments(
        *args, background_threshold, whole, passes
    )
    if num_fragments == 0 and not whole.minima_only:
        # No H-minimum anywhere: the whole-volume watershed seeds the global minima.
        whole = dataclasses.replace(whole, minima_only=True)
        if passes is not None:
            passes.save("range", **blockwise_passes.range_arrays(whole))
        num_fragments, keys, faces, inexact = blockwise_passes.fragments(
            *args, background_threshold, whole, passes
        )
    if require_exact and inexact:
        block = inexact[0]
        raise DataError(
            f"segment_blockwise: block {block} "
            f"{blockwise_passes.block_core(grid, block).slices()}: a foreground "
            f"component leaves its halo box (halo={halo}), so the block-wise watershed may "
            "differ from the whole volume's; raise halo, or cut the foreground with "
            "background_threshold or mask"
        )

    log.info(
        "Block-wise watershed: %d fragments in %d blocks of %s (%.0f s)",
        num_fragments,
        grid.num_blocks,
        grid.block_shape,
        time.perf_counter() - start,
    )
    stitched = None if passes is None else passes.load("stitch")
    if stitched is None:
        first, second = blockwise_passes.stitch(dest, grid, faces, progress)
        if passes is not None:
            passes.save("stitch", first=first, second=second)
    else:
        first, second = stitched["first"], stitched["second"]
    del faces
    num_segments, group = join_ids(num_fragments, first, second)
    # Number segments by their seed's first voxel (ties: by group), as the whole volume does.
    key_of_group = np.full(num_segments + 1, np.iinfo(np.int64).max)
    np.minimum.at(key_of_group, group, keys)
    order = np.lexsort((np.arange(num_segments), key_of_group[1:]))
    rank = np.zeros(num_segments + 1, np.uint64)
    rank[order + 1] = np.arange(1, num_segments + 1, dtype=np.uint64)
    to_segment = rank[group]
    num_labels = num_segments

    if threshold is not None and num_segments:
        contacts = None if passes is None else passes.load("graph")
        if contacts is None:
            table = blockwise_passes.contacts(
                boundary if agglomeration_boundary is None else agglomeration_boundary,
                dest,
                to_segment,
                grid,
                progress,
                passes,
            )
            small, large, (count, total) = table.result()
            contacts = {"small": small, "large": large, "count": count, "total": total}
            if passes is not None:
                passes.save("graph", **contacts)
        ids = np.arange(num_segments + 1)
        graph = blockwise_passes.region_graph(
            contacts["small"], contacts["large"], contacts["count"], contacts["total"], num_segments
        )
        rag = merge_graph(graph, ids, threshold)
        to_label = relabel(ids, rag)
        to_segment = to_label[to_segment]
        num_labels = int(rag.number_of_nodes())
    finished = {
        "to_segment": to_segment,
        "num_fragments": num_fragments,
        "num_segments": num_segments,
        "num_labels": num_labels,
        "inexact": np.asarray(inexact, np.int64),
    }
    if passes is not None:
        # Saved before the first block is relabelled: from then on `dest` holds final ids
        # in some blocks, and passes 1-3 could not be made again from it.
        passes.save("relabel", **finished)
    return finished
