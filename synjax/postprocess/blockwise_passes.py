"""The passes of `blockwise_watershed.segment_blockwise`, each over the blocks of a grid.

0. `whole_range`: the smoothed map's extremes (quantisation, seed mode).
1. `fragments`: a seeded watershed per halo box, ids made unique, face bits.
2. `stitch`: fragments joined across faces where both floods agree.
3. `contacts` and `region_graph`: the agglomeration's region graph, block by block.
4. `relabel_dest`: `dest` rewritten block by block, fragment id -> final id.

Why each is exact, and what the face bits are, is in `blockwise_watershed`'s
docstring. With a `PassState` each pass is resumable block by block.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

from synjax.geometry import SPATIAL_DIMS, Box, read_padded
from synjax.inference.block_grid import BlockGrid
from synjax.postprocess.agglomeration import COUNT, WEIGHT
from synjax.postprocess.blockwise_components import relabel_blockwise
from synjax.postprocess.blockwise_pass_state import PassState, each_block_result
from synjax.postprocess.pair_table import PairTable
from synjax.postprocess.watershed import (
    FACE_CONNECTIVITY,
    QUANT_MAX,
    Smoothing,
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
class WholeRange:
    """What the whole volume's smoothed map decides: the quantisation and seed mode."""

    low: float
    high: float
    rescale: bool
    # Seeds are the relief's global minima (the whole-volume fallback), not H-minima.
    minima_only: bool
    lowest_level: int


def block_core(grid: BlockGrid, block_id: int) -> Box:
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
    """`compute(block_id)` of every block, in block order, behind a progress bar named `what`.

    With `passes`, resumable (`blockwise_pass_state.each_block_result`).
    """
    return each_block_result(
        passes,
        name,
        grid.block_ids(),
        compute,
        lambda ids: _each_block(grid, progress, what, ids),
        grid,
    )


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
    core = block_core(grid, block_id)
    volume = Box.from_shape(grid.volume_shape)
    smoothed = _read_smoothed(boundary, core, volume, sigma_xy, smoothing)
    inside = _read_mask(mask, core)
    outside = inside is not None and not inside.all()
    if inside is not None:
        smoothed = smoothed[inside]
    if not smoothed.size:
        return {"low": np.inf, "high": -np.inf, "outside": outside}
    return {"low": float(smoothed.min()), "high": float(smoothed.max()), "outside": outside}


def whole_range(
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
) -> WholeRange:
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
        return WholeRange(0.0, 0.0, rescale, True, QUANT_MAX)
    # quantise is monotone, so the extreme voxels' levels are the extreme levels.
    lowest, highest = (int(v) for v in quantise(np.array([low, high]), low, high, rescale))
    threshold = (
        QUANT_MAX if background_threshold is None else round(background_threshold * QUANT_MAX)
    )
    any_background = any_outside_mask or highest > threshold
    top = QUANT_MAX if any_background else highest
    # skimage's h_minima returns nothing when h exceeds the relief's range.
    return WholeRange(low, high, rescale, depth > top - lowest, lowest)


def _seeds(relief: np.ndarray, keep: np.ndarray, depth: np.uint16, whole: WholeRange) -> np.ndarray:
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
    core = block_core(grid, block_id)
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


def fragments(
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


def stitch(dest, grid: BlockGrid, faces, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: fragment pairs across faces that both blocks put in one segment."""
    joins = PairTable(())
    for block_id in _each_block(grid, progress, "watershed: stitching"):
        core = block_core(grid, block_id)
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
    """Pass 3 on one block: its contacts folded by segment pair (see `contacts`).

    Returns:
      `{"small", "large", "count", "total"}`: one row per pair of segment ids
      in contact, sorted, with the voxel count and the summed boundary value.
    """
    core = block_core(grid, block_id)
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


def contacts(
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


def region_graph(small, large, count, total, num_segments: int):
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


def relabel_dest(dest, to_segment: np.ndarray, grid: BlockGrid, state, progress: bool) -> None:
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
        _relabel_block(dest, to_segment, block_core(units, unit))
        done.record([unit])


def state_provenance(provenance, block_shape, parameters: dict) -> dict:
    """What a pass state is keyed by: the caller's provenance and every parameter of the passes."""
    return {"made_from": provenance, "block_shape": list(block_shape), "parameters": parameters}


def range_arrays(whole: WholeRange) -> dict:
    return dataclasses.asdict(whole)


def range_from(arrays: dict) -> WholeRange:
    return WholeRange(
        float(arrays["low"]),
        float(arrays["high"]),
        bool(arrays["rescale"]),
        bool(arrays["minima_only"]),
        int(arrays["lowest_level"]),
    )
