"""DeepEM3D's slice-wise prediction block by block, through the block-wise runner.

A block is a slab of `depth` consecutive slices along the slicing axis, over
the whole extent of the other two axes, read with `s // 2` slices of context
on each side (reflected at the volume's ends, as `predict_slices` does). Each
output slice depends only on its own `s`-slice stack, which lies inside its
block's input, and the slices are predicted whole (tiled in y and x by
`max_tile` exactly as `predict_slices` tiles them), so the block-wise result
equals the whole-volume one whatever the slab depth, and memory holds a few
slabs whatever the volume's depth. Other orientations ("y", "x") slice
through a permuted view of the same volumes (`OrientedVolume`).

Being the runner's, a slab prediction resumes after a kill, retries a
failing slab, and runs on the local or the Dask executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from synjax.data.intensity import DTYPE_RANGE, IntensityNormalization, NormalizedVolume
from synjax.errors import ConfigError
from synjax.inference.block_grid import BlockGrid
from synjax.inference.blockwise import (
    BlockwiseSummary,
    LazyPredictor,
    blockwise_map,
    predict_blockwise,
)
from synjax.inference.slicewise import DEFAULT_BATCH_SIZE, ORIENTATIONS, SlicePredictor
from synjax.inference.tta import TRANSFORMS, Transform


class OrientedVolume:
    """A `[z, y, x]` volume seen with the slicing axis `orientation` first.

    Reads and writes go to the underlying volume with the axes swapped back
    (each orientation swaps two axes, its own inverse), so a runner that
    slices along the first axis slices the volume along `orientation`.
    """

    def __init__(self, volume: Any, orientation: str):
        if orientation not in ORIENTATIONS:
            raise ConfigError(f"orientation={orientation!r}: expected one of {tuple(ORIENTATIONS)}")
        self.volume = volume
        self.perm = ORIENTATIONS[orientation]
        self.shape = tuple(int(volume.shape[a]) for a in self.perm)
        self.dtype = volume.dtype
        chunks = getattr(volume, "chunks", None)
        self.chunks = None if not chunks else tuple(chunks[a] for a in self.perm)

    def _key(self, key: tuple[slice, ...]) -> tuple[slice, ...]:
        return tuple(key[a] for a in self.perm)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return np.transpose(np.asarray(self.volume[self._key(key)]), self.perm)

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        self.volume[self._key(key)] = np.transpose(np.asarray(value), self.perm)

    def flush(self) -> None:
        if hasattr(self.volume, "flush"):
            self.volume.flush()


@dataclasses.dataclass
class SlabPredictor:
    """The block function: `[1, depth + 2c, Y, X]` normalised slab -> `[1, depth, Y, X]`.

    Attributes:
      predict_stacks: `SlicePredictor` of the slices' shape.
      slices: s, the odd number of slices per stack (c = s // 2).
      batch_size: output slices per compiled call; the last batch of a slab
        is padded by repeating its last stack (one compiled shape).
    """

    predict_stacks: SlicePredictor
    slices: int
    batch_size: int

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        c = self.slices // 2
        offsets = np.arange(self.slices) - c
        out = []
        for slab in batch:
            depth = len(slab) - 2 * c
            prob = np.empty((depth, *slab.shape[1:]), np.float32)
            for z0 in range(0, depth, self.batch_size):
                z1 = min(z0 + self.batch_size, depth)
                zs = np.minimum(np.arange(z0, z0 + self.batch_size), z1 - 1) + c
                prob[z0:z1] = self.predict_stacks(slab[zs[:, None] + offsets])[: z1 - z0]
            out.append(prob)
        return np.stack(out)


def predict_slices_blockwise(
    apply_fn: Callable[[jax.Array], jax.Array],
    source: Any,
    dest: Any,
    *,
    slices: int,
    stride: int,
    depth: int,
    orientation: str = "z",
    batch_size: int = DEFAULT_BATCH_SIZE,
    tta: bool = True,
    transforms: Sequence[Transform] = TRANSFORMS,
    max_tile: int | None = None,
    intensity: IntensityNormalization = DTYPE_RANGE,
    name: str = "raw",
    **runner: Any,
) -> BlockwiseSummary:
    """Slice-wise boundary probability of `source` into `dest`, slab by slab.

    Args:
      apply_fn: `[n, s, y, x, 1] float32 -> [n, y, x, c]` (as `predict_slices`).
      source: `[z, y, x]` raw volume (numpy slicing; read a slab at a time).
      dest: `[z, y, x]` float32 volume of the same shape, written slab by slab.
      slices: s, the odd number of input slices per output slice.
      stride: the network's total stride (y and x are padded to a multiple).
      depth: slices per slab along the slicing axis.
      orientation: the slicing axis, "z", "y" or "x".
      batch_size, tta, transforms, max_tile: as `predict_slices`.
      intensity: the model's input normalisation, applied to each slab as read.
      name: the source's name for errors.
      **runner: passed on to `predict_blockwise` (`manifest_path`,
        `provenance`, `resume`, `retries`, `executor`, `client`, `progress`).
        With `executor="dask"`, `apply_fn` must pickle (e.g. a
        `LazyPredictor` that loads the model from its checkpoint).

    Returns:
      The runner's summary (blocks skipped and computed).
    """
    if slices < 1 or slices % 2 == 0:
        raise ConfigError(f"slices={slices}: expected an odd number >= 1")
    if depth < 1:
        raise ConfigError(f"slab depth={depth}: expected >= 1")
    view = OrientedVolume(NormalizedVolume(source, intensity, name), orientation)
    out = OrientedVolume(dest, orientation)
    shape = view.shape
    grid = BlockGrid(shape, (min(depth, shape[0]), *shape[1:]), context=(slices // 2, 0, 0))
    recipe = (apply_fn, shape[1:], stride, tta, tuple(transforms), max_tile, slices, batch_size)
    if runner.get("executor", "local") == "dask":
        # Tasks ship the recipe; each worker compiles the slab predictor once.
        block_fn = LazyPredictor(slab_predictor, *recipe)
    else:
        block_fn = slab_predictor(*recipe)
    return predict_blockwise(block_fn, view, out, grid, batch_size=1, **runner)


def slab_predictor(
    apply_fn, shape_yx, stride, tta, transforms, max_tile, slices, batch_size
) -> SlabPredictor:
    """The `SlabPredictor` of `predict_slices_blockwise`'s arguments (see there)."""
    if isinstance(apply_fn, LazyPredictor):
        apply_fn = apply_fn.build()  # loaded now, not inside the jit trace
    predictor = SlicePredictor(
        apply_fn, shape_yx, stride=stride, tta=tta, transforms=transforms, max_tile=max_tile
    )
    return SlabPredictor(predictor, slices, batch_size)


def slab_grid(shape: Sequence[int], orientation: str, depth: int, slices: int) -> BlockGrid:
    """The grid of `predict_slices_blockwise` over a `[z, y, x]` volume of `shape`.

    In the oriented view's axes (the slicing axis first), as its done-state records it.
    """
    shape = tuple(int(shape[a]) for a in ORIENTATIONS[orientation])
    return BlockGrid(shape, (min(depth, shape[0]), *shape[1:]), context=(slices // 2, 0, 0))


def slab_chunks(shape: Sequence[int], orientation: str, depth: int) -> tuple[int, int, int]:
    """Chunks of a `[z, y, x]` output written in slabs: `depth` along the slicing axis."""
    axis = ORIENTATIONS[orientation][0]
    edge = 256  # in-plane chunk edge (slabs cover the plane: no chunk is shared)
    return tuple(
        min(depth, n) if a == axis else min(edge, n) for a, n in enumerate(int(s) for s in shape)
    )


class _StackedVolumes:
    """`[z, y, x, k]` view of k volumes of one shape: a read stacks the same box of each."""

    def __init__(self, volumes: Sequence[Any]):
        self.volumes = list(volumes)
        self.shape = (*tuple(int(s) for s in self.volumes[0].shape), len(self.volumes))
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        return np.stack([np.asarray(v[key[:3]], np.float32) for v in self.volumes], axis=-1)


def _max_over_last(block: np.ndarray) -> np.ndarray:
    return block.max(axis=-1)


def ensemble_max_blockwise(
    predictions: Sequence[Any], dest: Any, block_shape: Sequence[int], **runner: Any
) -> BlockwiseSummary:
    """Voxel-wise maximum of several `[z, y, x]` maps into `dest`, block by block.

    Every model contributes on every slice (`ensemble_max` without slice masks).

    Args:
      predictions: float volumes of one shape (e.g. each model's and
        orientation's boundary map).
      dest: float32 volume of that shape.
      block_shape: block `(z, y, x)`, a multiple of dest's chunks.
      **runner: passed on to `blockwise_map` (`manifest_path`, `provenance`, ...).
    """
    return blockwise_map(_max_over_last, _StackedVolumes(predictions), dest, block_shape, **runner)
