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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

from synjax.errors import ConfigError, DataError
from synjax.geometry import SPATIAL_DIMS, Box, read_padded
from synjax.inference.block_grid import BlockGrid
from synjax.postprocess.agglomeration import COUNT, WEIGHT, merge_graph, relabel
from synjax.postprocess.blockwise_components import join_ids, relabel_blockwise
from synjax.postprocess.blockwise_pass_state import PassState
from synjax.postprocess.pair_table import PairTable
from synjax.postprocess.watershed import (
    FACE_CONNECTIVITY,
    QUANT_MAX,
    Smoothing,
    check_h,
    quantise,
    relief_and_keep,
    smooth,
    smoothing_radius,
)
from synjax.report.progress import progress_bar

# Sides of a block along an axis: towards lower and towards higher indices.
LOWER, UPPER = 0, 1

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


@dataclasses.dataclass(frozen=True)
class _Range:
    """What the whole volume's smoothed map decides: the quantisation and seed mode."""

    low: float
    high: float
    rescale: bool
    # Seeds are the relief's global minima (the whole-volume fallback), not H-minima.
    minima_only: bool
    lowest_level: int


def _core(grid: BlockGrid, block_id: int) -> Box:
    return Box.from_slices(grid.output_box(block_id))


def _each_block(
    grid: BlockGrid, progress: bool, what: str, ids: Sequence[int] | None = None
) -> Iterable[int]:
    """Block ids (all of the grid's by default), behind a progress bar with `progress`.

    The bar shows blocks done, rate and ETA.
    """
    ids = grid.block_ids() if ids is None else ids
    return progress_bar(ids, total=len(ids), desc=what, unit="block", disable=not progress)


def _each_result(
    passes, name: str, grid: BlockGrid, progress: bool, what: str, compute
) -> Iterator[dict[str, Any]]:
    """`compute(block_id)` of every block, in block order; with `passes`, resumable.

    With a pass state, each block's result (a dict of arrays) is saved and
    the block recorded as done before it is yielded; blocks recorded by an
    earlier run are read back instead of computed. The results come in the
    same order either way, so what they are folded into is the same.
    """
    if passes is None:
        for block_id in _each_block(grid, progress, what):
            yield compute(block_id)
        return
    done = passes.blocks(name)
    todo = set(done.todo().tolist())
    if len(todo) < grid.num_blocks:
        log.info(
            "Block-wise watershed, %s: %d of %d blocks done before",
            what,
            grid.num_blocks - len(todo),
            grid.num_blocks,
        )
    for block_id in _each_block(grid, progress, what):
        if block_id not in todo:
            yield passes.load_block(name, block_id)
            continue
        result = compute(block_id)
        passes.save_block(name, block_id, **result)
        done.record([block_id])
        yield result


def _read_smoothed(
    boundary: Any, box: Box, volume: Box, sigma_xy: float, smoothing: Smoothing
) -> np.ndarray:
    """The smoothed map on `box` (cut to the volume), equal to the whole volume's there.

    Reads the Gaussian's reach of extra input on every side that is not the
    volume's edge; at the edge scipy's reflection sees the same voxels as on
    the whole volume.
    """
    reach = smoothing_radius(sigma_xy, smoothing)
    box = box.intersect(volume)
    read = box.pad(reach).intersect(volume)
    smoothed = smooth(np.asarray(boundary[read.slices()]), sigma_xy, smoothing)
    return smoothed[box.relative_to(read).slices()]


def _read_mask(mask: Any, box: Box) -> np.ndarray | None:
    return None if mask is None else np.asarray(mask[box.slices()], dtype=bool)


def _range_block(boundary, mask, grid, sigma_xy, smoothing, block_id: int) -> dict[str, Any]:
    """Pass 0 on one block: the smoothed map's extremes over the mask, and if any voxel is outside.

    Extremes are +inf, -inf where no voxel of the block is inside the mask.
    """
    core = _core(grid, block_id)
    volume = Box.from_shape(grid.volume_shape)
    smoothed = _read_smoothed(boundary, core, volume, sigma_xy, smoothing)
    inside = _read_mask(mask, core)
    outside = inside is not None and not inside.all()
    if inside is not None:
        smoothed = smoothed[inside]
    if not smoothed.size:
        return {"low": np.inf, "high": -np.inf, "outside": outside}
    return {"low": float(smoothed.min()), "high": float(smoothed.max()), "outside": outside}


def _whole_range(
    boundary,
    mask,
    grid,
    sigma_xy,
    smoothing,
    rescale,
    depth,
    background_threshold,
    progress,
    passes=None,
) -> _Range:
    """Pass 0: the smoothed map's range over the mask, and the relief's extremes."""
    low, high, any_outside_mask = np.inf, -np.inf, False
    for found in _each_result(
        passes,
        "range",
        grid,
        progress,
        "watershed: range",
        lambda b: _range_block(boundary, mask, grid, sigma_xy, smoothing, b),
    ):
        low, high = min(low, float(found["low"])), max(high, float(found["high"]))
        any_outside_mask |= bool(found["outside"])
    if low > high:  # nothing inside the mask: `segment` gives all background
        return _Range(0.0, 0.0, rescale, True, QUANT_MAX)
    # quantise is monotone, so the extreme voxels' levels are the extreme levels.
    lowest, highest = (int(v) for v in quantise(np.array([low, high]), low, high, rescale))
    threshold = (
        QUANT_MAX if background_threshold is None else round(background_threshold * QUANT_MAX)
    )
    any_background = any_outside_mask or highest > threshold
    top = QUANT_MAX if any_background else highest
    # skimage's h_minima returns nothing when h exceeds the relief's range.
    return _Range(low, high, rescale, depth > top - lowest, lowest)


def _seeds(relief: np.ndarray, keep: np.ndarray, depth: np.uint16, whole: _Range) -> np.ndarray:
    """H-minima seeds on a halo box, as `skimage.morphology.h_minima` finds them.

    The H-minima transform is written out (reconstruction by erosion of the
    relief raised by `depth`, clipped at the top level) because skimage's
    shortcut, nothing when `h` exceeds the image's range, would look at the
    halo box's range instead of the whole volume's.
    """
    if whole.minima_only:
        return keep & (relief == whole.lowest_level)
    raised = np.where(relief > QUANT_MAX - depth, np.uint16(QUANT_MAX), relief + depth)
    filled = reconstruction(raised, relief, method="erosion", footprint=FACE_CONNECTIVITY)
    return (filled - relief >= depth) & keep


def _face_bits(labels: np.ndarray, core: Box, halo_box: Box, grid: BlockGrid, block_id: int):
    """For each face towards another block: does the flood continue the face voxel's label?

    Returns:
      `{(axis, side): bits}`, bits packed from a bool `[face]` array that is True
      where the voxel just across the face got the face voxel's label.
    """
    index = grid.block_index(block_id)
    inner = core.relative_to(halo_box)
    bits = {}
    for axis in range(SPATIAL_DIMS):
        for side in (LOWER, UPPER):
            neighbour = index[axis] + (1 if side == UPPER else -1)
            if not 0 <= neighbour < grid.grid_shape[axis]:
                continue
            face, across = list(inner.slices()), list(inner.slices())
            if side == UPPER:
                face[axis] = slice(inner.stop[axis] - 1, inner.stop[axis])
                across[axis] = slice(inner.stop[axis], inner.stop[axis] + 1)
            else:
                face[axis] = slice(inner.start[axis], inner.start[axis] + 1)
                across[axis] = slice(inner.start[axis] - 1, inner.start[axis])
            same = labels[tuple(face)] == labels[tuple(across)]
            bits[axis, side] = np.packbits(same.ravel())
    return bits


def _leaves_halo_box(keep_outer: np.ndarray, core: Box, halo_box: Box, outer: Box) -> bool:
    """Whether a foreground component meeting the block reaches past the halo box.

    `keep_outer` is the foreground on `outer`, the halo box grown by one voxel
    (cut to the volume): its voxels outside the halo box are where a component
    would leave it.
    """
    components = cc3d.connected_components(keep_outer, connectivity=6)
    in_block = np.unique(components[core.relative_to(outer).slices()])
    rim = components.copy()
    rim[halo_box.relative_to(outer).slices()] = 0
    leaving = np.unique(rim)
    return bool(np.intersect1d(in_block[in_block != 0], leaving[leaving != 0]).size)


@dataclasses.dataclass(frozen=True)
class _BlockFragments:
    """What pass 1 keeps of one block (besides its fragment ids, written to `dest`).

    Attributes:
      count: fragments of the block (its ids are the fragments before, plus 1..count).
      keys: int64 `[count]` raster index in the volume of each fragment's seed's first voxel.
      faces: `{(axis, side): packed bits}` of `_face_bits`.
      inexact: whether a foreground component meeting the block leaves its halo box.
    """

    count: int
    keys: np.ndarray
    faces: dict[tuple[int, int], np.ndarray]
    inexact: bool

    def arrays(self) -> dict[str, np.ndarray]:
        """The block's results as named arrays (to save with `PassState.save_block`)."""
        faces = {f"face_{axis}_{side}": bits for (axis, side), bits in self.faces.items()}
        return {"count": self.count, "keys": self.keys, "inexact": self.inexact, **faces}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> _BlockFragments:
        faces = {
            (int(name.split("_")[1]), int(name.split("_")[2])): bits
            for name, bits in arrays.items()
            if name.startswith("face_")
        }
        return cls(int(arrays["count"]), arrays["keys"], faces, bool(arrays["inexact"]))


def _fragment_block(
    boundary,
    dest,
    mask,
    grid,
    halo,
    sigma_xy,
    smoothing,
    depth,
    background_threshold,
    whole,
    block_id: int,
    before: int,
) -> _BlockFragments:
    """Pass 1 on one block: its halo box flooded, its voxels' fragment ids written to `dest`.

    `before` fragments precede the block's (those of the blocks before it).
    """
    volume = Box.from_shape(grid.volume_shape)
    core = _core(grid, block_id)
    halo_box = core.pad(halo).intersect(volume)
    outer = core.pad(halo + 1).intersect(volume)
    smoothed = _read_smoothed(boundary, outer, volume, sigma_xy, smoothing)
    levels = quantise(smoothed, whole.low, whole.high, whole.rescale)
    relief_outer, keep_outer = relief_and_keep(
        levels, _read_mask(mask, outer), background_threshold
    )
    inexact = _leaves_halo_box(keep_outer, core, halo_box, outer)
    inner = halo_box.relative_to(outer).slices()
    relief, keep = relief_outer[inner], keep_outer[inner]
    markers = cc3d.connected_components(_seeds(relief, keep, depth, whole), connectivity=6)
    labels = watershed(relief, markers=markers, connectivity=1, mask=keep)
    # Each label's key: the raster index in the volume of its seed's first voxel.
    seeded = np.flatnonzero(markers)
    ids, first = np.unique(markers.ravel()[seeded], return_index=True)
    where = np.unravel_index(seeded[first], markers.shape)
    keys = np.ravel_multi_index(
        tuple(w + s for w, s in zip(where, halo_box.start, strict=True)), grid.volume_shape
    )
    block_labels = labels[core.relative_to(halo_box).slices()]
    present = np.unique(block_labels)
    present = present[present != 0]
    # Fragment ids: this block's labels renumbered 1..k, plus the fragments before.
    to_fragment = np.zeros(int(labels.max()) + 1, np.uint64)
    to_fragment[present] = np.arange(1, len(present) + 1, dtype=np.uint64) + np.uint64(before)
    dest[core.slices()] = to_fragment[block_labels]
    key_of_label = np.zeros(int(labels.max()) + 1, np.int64)
    key_of_label[ids] = keys
    faces = _face_bits(labels, core, halo_box, grid, block_id)
    return _BlockFragments(len(present), key_of_label[present], faces, bool(inexact))


def _fragments(
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
    whole,
    state: PassState | None,
):
    """Pass 1: a watershed per halo box; returns fragment count, seed keys, face bits, inexact.

    With `state`, each block's results are saved and the block recorded as
    done; a rerun reads the blocks done (a prefix of the grid: blocks run in
    order) and computes the others.
    """
    name = "fragments_minima" if whole.minima_only else "fragments"
    done = None if state is None else state.blocks(name)
    first = 0
    found: list[_BlockFragments] = []
    if done is not None:
        todo = done.todo()
        # Fragment ids count on from the blocks before, so runs go on from the first not done.
        first = int(todo[0]) if todo.size else grid.num_blocks
        found = [_BlockFragments.from_arrays(state.load_block(name, b)) for b in range(first)]
        if first:
            log.info(
                "Block-wise watershed: fragments of %d of %d blocks reused", first, grid.num_blocks
            )
    total = sum(block.count for block in found)
    todo_ids = range(first, grid.num_blocks)
    for block_id in _each_block(grid, progress, "watershed: fragments", todo_ids):
        block = _fragment_block(
            boundary,
            dest,
            mask,
            grid,
            halo,
            sigma_xy,
            smoothing,
            depth,
            background_threshold,
            whole,
            block_id,
            total,
        )
        if state is not None:
            state.save_block(name, block_id, **block.arrays())
            done.record([block_id])
        found.append(block)
        total += block.count
    keys = np.concatenate([np.full(1, -1, np.int64)] + [block.keys for block in found])  # 0: bg
    faces = {
        (block_id, axis, side): bits
        for block_id, block in enumerate(found)
        for (axis, side), bits in block.faces.items()
    }
    inexact = tuple(block_id for block_id, block in enumerate(found) if block.inexact)
    return total, keys, faces, inexact


def _stitch(dest, grid: BlockGrid, faces, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: fragment pairs across faces that both blocks put in one segment."""
    joins = PairTable(())
    for block_id in _each_block(grid, progress, "watershed: stitching"):
        core = _core(grid, block_id)
        index = grid.block_index(block_id)
        for axis in range(SPATIAL_DIMS):
            if index[axis] + 1 >= grid.grid_shape[axis]:
                continue
            neighbour_index = list(index)
            neighbour_index[axis] += 1
            neighbour = int(np.ravel_multi_index(neighbour_index, grid.grid_shape))
            last, first = list(core.slices()), list(core.slices())
            last[axis] = slice(core.stop[axis] - 1, core.stop[axis])
            first[axis] = slice(core.stop[axis], core.stop[axis] + 1)
            mine = np.asarray(dest[tuple(last)]).ravel()
            theirs = np.asarray(dest[tuple(first)]).ravel()
            agree = np.unpackbits(faces[block_id, axis, UPPER], count=mine.size).astype(bool)
            agree &= np.unpackbits(faces[neighbour, axis, LOWER], count=mine.size).astype(bool)
            agree &= (mine != 0) & (theirs != 0)
            a, b = mine[agree], theirs[agree]
            joins.add(np.minimum(a, b), np.maximum(a, b), [])
    first, second, _ = joins.result()
    return first, second


def _contact_block(boundary, dest, to_segment: np.ndarray, grid: BlockGrid, block_id: int):
    """Pass 3 on one block: its contacts folded by segment pair (see `_contacts`).

    Returns:
      `{"small", "large", "count", "total"}`: one row per pair of segment ids
      in contact, sorted, with the voxel count and the summed boundary value.
    """
    core = _core(grid, block_id)
    around = to_segment[read_padded(dest, core.pad(1), "edge")].astype(np.int64)
    inner = (slice(1, -1),) * SPATIAL_DIMS
    labels = around[inner]
    eroded = ndimage.grey_erosion(around, footprint=FACE_CONNECTIVITY)[inner]
    dilated = ndimage.grey_dilation(around, footprint=FACE_CONNECTIVITY)[inner]
    values = np.asarray(boundary[core.slices()], dtype=np.float64)
    below, above = eroded != labels, dilated != labels
    small = np.concatenate([eroded[below], labels[above]])
    large = np.concatenate([labels[below], dilated[above]])
    value = np.concatenate([values[below], values[above]])
    block = PairTable(("sum", "sum"))
    block.add(small, large, [np.ones(len(small), np.int64), value])
    small, large, (count, total) = block.result()
    return {"small": small, "large": large, "count": count, "total": total}


def _contacts(
    boundary, dest, to_segment: np.ndarray, grid: BlockGrid, progress: bool, passes=None
) -> PairTable:
    """Pass 3: boundary sums and counts of the region graph's contacts, per block.

    The contacts of `skimage.graph.rag_boundary` with face connectivity: each
    voxel pairs its label with the smallest label around it (if smaller) and
    with the largest (if larger), and adds its boundary value to both pairs.
    One voxel of stitched labels around the block is read; past the volume's
    edge it repeats the edge voxel, which is what scipy's erosion sees there.
    Each block's rows are folded by pair first (as `PairTable.add` does), so
    a resumed run adds the same rows in the same order.
    """
    table = PairTable(("sum", "sum"))
    for found in _each_result(
        passes,
        "contacts",
        grid,
        progress,
        "agglomeration: contacts",
        lambda b: _contact_block(boundary, dest, to_segment, grid, b),
    ):
        table.add(found["small"], found["large"], [found["count"], found["total"]])
    return table


def _region_graph(small, large, count, total, num_segments: int):
    """The `skimage.graph.RAG` that `agglomeration.region_graph` builds from these contacts.

    `small`, `large`, `count`, `total`: the rows of the contacts' `PairTable`
    (segment pair, voxel count, summed boundary value), sorted by pair.
    """
    from skimage import graph as skgraph

    rag = skgraph.RAG()
    # Edges in the order rag_boundary adds them (its sparse matrix's row-major order).
    rag.add_weighted_edges_from(
        zip(small.tolist(), large.tolist(), (total / count).tolist(), strict=True), weight=WEIGHT
    )
    rag.add_weighted_edges_from(
        zip(small.tolist(), large.tolist(), count.tolist(), strict=True), weight=COUNT
    )
    if len(small) == 0 and num_segments == 1:
        rag.add_node(1)  # one segment filling the volume: no contact
    for node in rag.nodes():
        rag.nodes[node].update({"labels": [node]})
    if rag.has_node(0):
        rag.remove_node(0)
    return rag


def _relabel_block(dest, to_segment: np.ndarray, box: Box) -> None:
    """Pass 4 on one block: fragment id -> final id, in place."""
    dest[box.slices()] = to_segment[np.asarray(dest[box.slices()])].astype(dest.dtype, copy=False)


def _relabel(dest, to_segment: np.ndarray, grid: BlockGrid, state, progress: bool) -> None:
    """Pass 4: `dest` rewritten block by block through `to_segment`.

    In place, so a block must never be relabelled twice: with `state`, the
    units are `dest`'s storage chunks (each rewritten whole, atomically, by
    tensorstore) or, for a volume without a `chunks` attribute, the blocks;
    each unit is recorded as done once written, and a rerun relabels only the
    others. (A kill while a block that spans several storage chunks is
    written could leave it half relabelled: give such volumes blocks of one
    chunk, as `neuron_volume.segment_volume` does.)
    """
    if state is None:
        relabel_blockwise(dest, to_segment, grid.block_shape, progress)
        return
    chunks = getattr(dest, "chunks", None)
    units = grid if chunks is None else BlockGrid(grid.volume_shape, tuple(chunks)[:SPATIAL_DIMS])
    done = state.blocks("relabel", units)
    todo = done.todo()
    if todo.size < units.num_blocks:
        log.info(
            "Block-wise watershed: %d of %d blocks relabelled before",
            units.num_blocks - todo.size,
            units.num_blocks,
        )
    for unit in _each_block(units, progress, "relabelling", todo.tolist()):
        _relabel_block(dest, to_segment, _core(units, unit))
        done.record([unit])


def _state_provenance(provenance, block_shape, parameters: dict) -> dict:
    """What a pass state is keyed by: the caller's provenance and every parameter of the passes."""
    return {"made_from": provenance, "block_shape": list(block_shape), "parameters": parameters}


def _range_arrays(whole: _Range) -> dict:
    return dataclasses.asdict(whole)


def _range_from(arrays: dict) -> _Range:
    return _Range(
        float(arrays["low"]),
        float(arrays["high"]),
        bool(arrays["rescale"]),
        bool(arrays["minima_only"]),
        int(arrays["lowest_level"]),
    )


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
        passes = PassState(state, grid, _state_provenance(provenance, grid.block_shape, parameters))

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
    _relabel(dest, finished["to_segment"], grid, passes, progress)
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
        whole = _whole_range(
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
            passes.save("range", **_range_arrays(whole))
    else:
        whole = _range_from(stored)
    args = (boundary, dest, mask, grid, halo, sigma_xy, smoothing, depth, progress)
    num_fragments, keys, faces, inexact = _fragments(*args, background_threshold, whole, passes)
    if num_fragments == 0 and not whole.minima_only:
        # No H-minimum anywhere: the whole-volume watershed seeds the global minima.
        whole = dataclasses.replace(whole, minima_only=True)
        if passes is not None:
            passes.save("range", **_range_arrays(whole))
        num_fragments, keys, faces, inexact = _fragments(*args, background_threshold, whole, passes)
    if require_exact and inexact:
        block = inexact[0]
        raise DataError(
            f"segment_blockwise: block {block} {_core(grid, block).slices()}: a foreground "
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
        first, second = _stitch(dest, grid, faces, progress)
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
            table = _contacts(
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
        graph = _region_graph(
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
