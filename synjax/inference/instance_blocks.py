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

Painting (`Painting`): detections above the score threshold, highest score
first, each pasted at the mask threshold; a voxel keeps the first
(highest-scoring) instance that claims it, and a detection with too few free
voxels left is dropped (`min_free_fraction`). With the network's semantic head
(`semantic [z, y, x]` cleft probability per block), two choices:

* `semantic_mix` a: a voxel of a detection's box is in its mask where
  (1 - a) * mask + a * semantic > mask threshold (the mask head's
  probability resampled onto the voxel, `pasted_probabilities`). The mask
  head sees a 14 x 14 grid per box; the semantic head predicts every voxel.
* `semantic_rescore`: a detection's score is multiplied by the mean semantic
  probability over its mask-head mask (mask > threshold), so that a box the
  classifier likes over membrane without a cleft falls below the threshold.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from synjax.errors import ConfigError, DataError
from synjax.geometry import Box
from synjax.inference.fusion import block_boxes, fuse_blocks
from synjax.inference.instances import pasted_probabilities

# `detector(blocks [n, z, y, x]) -> dict` of "boxes" [n, D, 6], "scores" [n, D],
# "masks" [n, D, mz, my, mx] (probabilities) and "valid" [n, D], numpy.
BlockDetector = Callable[[np.ndarray], dict]
# Fusion order of the paper: z, then x, then y.
AXIS_ORDER = ("z", "x", "y")


class Painting(NamedTuple):
    """How one block's detections become labels (see the module docstring).

    Attributes:
      score_threshold: detections scoring at or below this are left out.
      mask_threshold: probability above which a voxel is in the instance.
      semantic_mix: share of the semantic probability in that probability.
      semantic_rescore: multiply scores by the mean semantic probability of the mask.
      min_free_fraction: a detection is left out when fewer than this share
        of its mask's voxels are still free (detectron2's panoptic
        `overlap_threshold`, 0.5 there): a mask mostly covered by a better
        detection would otherwise leave a sliver as an instance of its own.
    """

    score_threshold: float
    mask_threshold: float
    semantic_mix: float = 0.0
    semantic_rescore: bool = False
    min_free_fraction: float = 0.0

    @property
    def uses_semantic(self) -> bool:
        return self.semantic_mix > 0 or self.semantic_rescore


class BlockDetections(NamedTuple):
    """Every detection of every block of a volume.

    Attributes:
      boxes: the blocks (`Box`, volume voxels), as `block_boxes` gives them.
      detections: per block, {"boxes", "scores", "masks"} of its valid
        detections (boxes in block voxels), and "semantic" (the block's
        [z, y, x] cleft probability, cut to the block) where the detector
        gives one.
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
        detections.extend(block_detections(out, i, box) for i, box in enumerate(chunk))
    return BlockDetections(boxes, detections, tuple(int(s) for s in image.shape))


def block_detections(out: dict, index: int, box: Box) -> dict[str, np.ndarray]:
    """Detections of block `index` of a detector batch: its valid ones, semantic cut to `box`.

    Args:
      out: a `BlockDetector`'s output for a batch of blocks.
      index: the block's place in the batch.
      box: the block's box in the volume (its data may be smaller than the
        network's input at the volume's end).
    """
    valid = np.asarray(out["valid"][index], bool)
    found = {
        "boxes": np.asarray(out["boxes"][index])[valid],
        "scores": np.asarray(out["scores"][index])[valid],
        "masks": np.asarray(out["masks"][index])[valid],
    }
    if "semantic" in out:
        inside = tuple(slice(0, n) for n in box.shape)
        found["semantic"] = np.asarray(out["semantic"][index], np.float32)[inside]
    return found


def paint_block(
    detections: dict[str, np.ndarray], block_shape: Sequence[int], painting: Painting
) -> tuple[np.ndarray, np.ndarray]:
    """Local labels of one block's detections.

    Args:
      detections: {"boxes" [D, 6], "scores" [D], "masks" [D, mz, my, mx]},
        and "semantic" [z, y, x] (the block's cleft probability) when
        `painting` uses it.
      block_shape: (z, y, x) of the block's labels.
      painting: thresholds and the use of the semantic probability.

    Returns:
      (labels [z, y, x] uint32 ids 1..k, scores [k] float32 of id i + 1,
      rescored where asked); instances left without a voxel are dropped and
      the rest renumbered.
    """
    shape = tuple(int(s) for s in block_shape)
    semantic = None
    if painting.uses_semantic:
        if "semantic" not in detections:
            raise ConfigError(
                f"paint_block: {painting} reads the semantic probability, which the detector "
                "did not give (a network without a semantic head)"
            )
        semantic = np.asarray(detections["semantic"], np.float32)
        if semantic.shape != shape:
            raise DataError(f"paint_block: semantic {semantic.shape}; expected the block {shape}")
        semantic = semantic.reshape(-1)
    labels = np.zeros(int(np.prod(shape)), np.uint32)
    candidates = []
    for d, score in enumerate(np.asarray(detections["scores"], np.float64)):
        # Rescoring multiplies by a probability (<= 1): a detection at or below the
        # threshold stays there, so its mask need not be pasted.
        if score <= painting.score_threshold:
            continue
        flat, mask = pasted_probabilities(
            detections["masks"][d], detections["boxes"][d], (0, 0, 0), shape
        )
        own = mask > painting.mask_threshold
        if semantic is not None:
            semantic_here = semantic[flat]
            if painting.semantic_rescore:
                score *= float(semantic_here[own].mean()) if own.any() else 0.0
            mixed = (1.0 - painting.semantic_mix) * mask + painting.semantic_mix * semantic_here
            own = mixed > painting.mask_threshold
        candidates.append((float(score), flat[own]))
    scores = []
    order = np.argsort([-score for score, _ in candidates], kind="stable")
    for d in order:
        score, voxels = candidates[d]
        if score <= painting.score_threshold:
            break
        free = voxels[labels[voxels] == 0]
        if free.size and free.size >= painting.min_free_fraction * voxels.size:
            scores.append(score)
            labels[free] = len(scores)
    return labels.reshape(shape), np.asarray(scores, np.float32)


def fuse_detections(
    found: BlockDetections, painting: Painting, iou_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Paints every block one way (`Painting`) and fuses them along z, then x, then y.

    Returns:
      (labels [z, y, x] uint32 fused instance ids 1..k, scores [k] float32:
      the highest score of the block instances that make up instance i + 1).
    """
    painted = [
        paint_block(det, box.shape, painting)
        for det, box in zip(found.detections, found.boxes, strict=True)
    ]
    out = np.zeros(found.shape, np.uint32)
    scores = FusedScores()
    count = fuse_blocks(
        found.boxes,
        lambda i: painted[i][0],
        out,
        iou_threshold=iou_threshold,
        axis_order=AXIS_ORDER,
        on_block_ids=lambda block, local, fused: scores.add(local, fused, painted[block][1]),
    )
    return out, scores.result(count)


class FusedScores:
    """The highest score of the block instances that make up each fused instance."""

    def __init__(self):
        self._best: dict[int, float] = {}

    def add(self, local_ids: np.ndarray, fused_ids: np.ndarray, block_scores: np.ndarray) -> None:
        """One block's instances: painted ids `local_ids` (1..k) became `fused_ids` (0: none).

        Args:
          local_ids: [n] painted ids present in the block.
          fused_ids: [n] the output id of each (0 where it owns no output voxel).
          block_scores: [k] score of painted id i + 1.
        """
        for local, fused in zip(local_ids.tolist(), fused_ids.tolist(), strict=True):
            if fused:
                score = float(block_scores[local - 1])
                self._best[fused] = max(score, self._best.get(fused, score))

    def result(self, count: int) -> np.ndarray:
        """[count] float32 score of fused instance i + 1."""
        out = np.zeros(count, np.float32)
        for fused, score in self._best.items():
            out[fused - 1] = score
        return out
