"""Block-wise inference of the EM instance network: detect per block, paint, fuse by axis.

The paper's inference for volumes larger than the network's input: the
stack is cut into overlapping blocks (`synjax.inference.fusion.block_boxes`),
the network predicts 3D synapses in each block, and the blocks' instances are
fused along z, then x, then y (`synjax.inference.fusion.fuse_blocks`), those
meeting across a seam with IoU above a threshold becoming one.

Detection and painting are apart, so that the score and mask thresholds can
be chosen on a validation slab from one pass of the network:
`detect_blocks` keeps every detection of every block; `paint_block` turns
one block's detections into local labels at a (score, mask) threshold pair;
`fuse_detections` paints all blocks at that pair and fuses them.

Painting: detections above the score threshold, highest score first, each
pasted at the mask threshold (`synjax.inference.instances.paste_mask`);
a voxel keeps the first (highest-scoring) instance that claims it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import scipy.ndimage

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box
from synjax.inference.fusion import block_boxes, fuse_blocks
from synjax.inference.instances import paste_mask

# `detector(blocks [n, z, y, x]) -> dict` of "boxes" [n, D, 6], "scores" [n, D],
# "masks" [n, D, mz, my, mx] (probabilities) and "valid" [n, D], numpy.
BlockDetector = Callable[[np.ndarray], dict]
# Fusion order of the paper: z, then x, then y.
AXIS_ORDER = ("z", "x", "y")


class BlockDetections(NamedTuple):
    """Every detection of every block of a volume.

    Attributes:
      boxes: the blocks (`Box`, volume voxels), as `block_boxes` gives them.
      detections: per block, {"boxes", "scores", "masks"} of its valid
        detections (boxes in block voxels).
      shape: (z, y, x) of the volume.
    """

    boxes: list[Box]
    detections: list[dict[str, np.ndarray]]
    shape: tuple[int, int, int]


def detect_blocks(
    detector: BlockDetector,
    image: np.ndarray,
    block_shape: Sequence[int],
    overlap: Sequence[int],
    batch_size: int = 1,
) -> BlockDetections:
    """Runs the detector on the overlapping blocks of `image`.

    Args:
      detector: `BlockDetector` on `[n, *block_shape]` blocks.
      image: [z, y, x] normalised image.
      block_shape: (z, y, x) network input; blocks that `block_boxes` clips
        at the volume's end are padded with zeros up to it.
      overlap: (z, y, x) overlap of neighbouring blocks.
      batch_size: blocks per detector call.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise DataError(f"detect_blocks: image shape {image.shape}; expected [z, y, x]")
    if batch_size < 1:
        raise ConfigError(f"detect_blocks: batch_size={batch_size}; expected >= 1")
    block = tuple(int(b) for b in block_shape)
    boxes = list(block_boxes(image.shape, block, tuple(int(o) for o in overlap)))
    detections: list[dict[str, np.ndarray]] = []
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        blocks = np.zeros((len(chunk), *block), np.float32)
        for i, box in enumerate(chunk):
            data = image[box.slices()]
            blocks[(i, *(slice(0, n) for n in data.shape))] = data
        out = detector(blocks)
        for i in range(len(chunk)):
            valid = np.asarray(out["valid"][i], bool)
            detections.append(
                {
                    "boxes": np.asarray(out["boxes"][i])[valid],
                    "scores": np.asarray(out["scores"][i])[valid],
                    "masks": np.asarray(out["masks"][i])[valid],
                }
            )
    return BlockDetections(boxes, detections, tuple(int(s) for s in image.shape))


def paint_block(
    detections: dict[str, np.ndarray],
    block_shape: Sequence[int],
    score_threshold: float,
    mask_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Local labels of one block's detections.

    Args:
      detections: {"boxes" [D, 6], "scores" [D], "masks" [D, mz, my, mx]}.
      block_shape: (z, y, x) of the block's labels.
      score_threshold: detections scoring at or below this are left out.
      mask_threshold: mask probability above which a voxel is in the instance.

    Returns:
      (labels [z, y, x] uint32 ids 1..k, scores [k] float32 of id i + 1);
      instances left without a voxel are dropped and the rest renumbered.
    """
    shape = tuple(int(s) for s in block_shape)
    labels = np.zeros(int(np.prod(shape)), np.uint32)
    scores = []
    order = np.argsort(-np.asarray(detections["scores"]), kind="stable")
    for d in order:
        score = float(detections["scores"][d])
        if score <= score_threshold:
            break
        voxels = paste_mask(
            detections["masks"][d], detections["boxes"][d], (0, 0, 0), shape, mask_threshold
        )
        free = voxels[labels[voxels] == 0]
        if free.size:
            scores.append(score)
            labels[free] = len(scores)
    return labels.reshape(shape), np.asarray(scores, np.float32)


def fuse_detections(
    found: BlockDetections,
    score_threshold: float,
    mask_threshold: float,
    iou_threshold: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Paints every block at one threshold pair and fuses them along z, then x, then y.

    Returns:
      (labels [z, y, x] uint32 fused instance ids 1..k, scores [k] float32:
      the highest score of the block instances that make up instance i + 1).
    """
    painted = [
        paint_block(det, box.shape, score_threshold, mask_threshold)
        for det, box in zip(found.detections, found.boxes, strict=True)
    ]
    out = np.zeros(found.shape, np.uint32)
    fuse_blocks(
        found.boxes,
        lambda i: painted[i][0],
        out,
        iou_threshold=iou_threshold,
        axis_order=AXIS_ORDER,
    )
    best = np.zeros(found.shape, np.float32)
    for (labels, scores), box in zip(painted, found.boxes, strict=True):
        lookup = np.concatenate([[0.0], scores]).astype(np.float32)
        region = box.slices()
        best[region] = np.maximum(best[region], lookup[labels])
    ids = np.unique(out)
    ids = ids[ids > 0]
    if ids.size == 0:
        return out, np.zeros(0, np.float32)
    # Fused ids renumbered 1..k in increasing order (fastremap-free: a lookup).
    lookup = np.zeros(int(ids.max()) + 1, np.uint32)
    lookup[ids] = np.arange(1, ids.size + 1, dtype=np.uint32)
    out = lookup[out]
    scores = scipy.ndimage.maximum(best, out, np.arange(1, ids.size + 1))
    return out, np.asarray(scores, np.float32)
