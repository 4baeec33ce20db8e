"""Typed settings of the stages: one frozen dataclass per config block a stage reads.

| config block                     | settings                         | stage                   |
|----------------------------------|----------------------------------|-------------------------|
| `config.unet`                    | `ProximityNetworkSettings`       | `ProximityStage`        |
| `config.train` (partners)        | `ProximityTrainSettings`         | `ProximityStage`        |
| `config.predict` (partners)      | `BlockwisePredictSettings`       | `ProximityStage`        |
| `config.pruner`                  | `PrunerSettings`                 | `PrunerStage`           |
| `config.pruner.train`            | `PrunerTrainSettings`            | `PrunerStage`           |
| each `config.models` entry       | `BoundaryModelSettings`          | `BoundaryEnsembleStage` |
| `config.train` (neurons)         | `BoundaryTrainSettings`          | `BoundaryEnsembleStage` |
| `config.predict` (neurons)       | `SlicePredictSettings`           | `BoundaryEnsembleStage` |

Each is built by `synjax.settings.from_config`, which refuses a key that is
not a field; the config checks (`synjax.pipelines.config_checks`) read the
keys of these blocks from the same classes. A field without a default is a
key every config must hold. The training blocks extend `TrainSettings` with
the stage's own fields, so one block is one class.

This module imports no JAX, so that checking a config stays fast.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from synjax.settings import nested
from synjax.train.settings import TrainSettings

Triples = tuple[tuple[int, int, int], ...]


@dataclasses.dataclass(frozen=True)
class ProximityNetworkSettings:
    """The signed-proximity U-Net and its patches (`config.unet`).

    Attributes:
      depth, base_features, feature_growth, pool_factors, conv_kernels,
        padding: the network (`synjax.models.unet3d.UNet3DSettings`).
      train_output: wanted output (z, y, x) of a training patch.
      predict_output: output block (z, y, x) of block-wise prediction.
      predict_context: with "SAME" padding, real context (z, y, x) read
        around each block and cropped from the output.
      conv_implementation: how the 3D convolutions run
        (`synjax.models.conv.IMPLEMENTATIONS`; "auto": oneDNN's convolutions
        on CPU where they could be built, else "folded"; "native" on GPU;
        every choice gives the same result up to rounding).
      remat: recompute the conv blocks' activations in the backward pass
        instead of storing them (less memory for large training patches,
        about one more forward pass of compute; the same results).
    """

    depth: int
    base_features: int
    feature_growth: int
    pool_factors: Triples
    conv_kernels: Triples
    padding: str
    train_output: tuple[int, int, int]
    predict_output: tuple[int, int, int]
    predict_context: tuple[int, int, int]
    conv_implementation: str = "auto"
    remat: bool = False


@dataclasses.dataclass(frozen=True)
class ProximityTrainSettings(TrainSettings):
    """Training of the proximity U-Net (`config.train` of the partner pipeline).

    Attributes:
      positive_fraction: share of patches centred on a synaptic voxel.
    """

    positive_fraction: float = dataclasses.field(kw_only=True)


@dataclasses.dataclass(frozen=True)
class BlockwisePredictSettings:
    """Block-wise prediction (`config.predict` of the partner pipeline).

    Attributes:
      batch_size: blocks per compiled call.
      executor: "local" or "dask" (`synjax.inference.blockwise`).
      resume: an existing output made by another model, input or block grid:
        "auto" predicts it afresh, "strict" stops with an error.
      retries: how many more times a failing block is tried before the run
        stops with an error naming it.
      input: a volume of the user's (any `synjax.io.open_volume` source) to
        predict with the trained models instead of the test data; "": none.
      output: folder of the predictions of `input` (zarr).
      roi: region of `input` to predict, "z0:z1,y0:y1,x0:x1" in voxels; "": all.
      scheduler: with executor "dask", the address of a running scheduler
        ("tcp://host:8786", e.g. of a dask-jobqueue or dask-kubernetes
        cluster); "": a `LocalCluster` on this machine.
      segmentation: with `input`, the neuron segmentation of it (any
        `open_volume` source, of the input's or the roi's shape) that the
        candidates pair sites on; "": the prediction stops at the proximity.
      candidate_block: with `input`, the blocks `(z, y, x)` that the
        candidates are found in (`synjax.postprocess.blockwise_candidates`).
    """

    batch_size: int
    executor: str
    resume: str = "auto"
    retries: int = 2
    input: str = ""
    output: str = ""
    roi: str = ""
    scheduler: str = ""
    segmentation: str = ""
    candidate_block: tuple[int, int, int] = (32, 384, 384)


@dataclasses.dataclass(frozen=True)
class PrunerTrainSettings(TrainSettings):
    """Training of the pruning CNN (`config.pruner.train`).

    Attributes:
      label_distance_nm: a candidate within this distance of a true pair of
        its cells is a positive training example.
    """

    label_distance_nm: float = dataclasses.field(kw_only=True)


@dataclasses.dataclass(frozen=True)
class PrunerSettings:
    """The candidate-pruning CNN (`config.pruner`): its network, then its training.

    Attributes:
      window: (z, y, x) window around a candidate.
      features: output channels of the five convolutions.
      pools: (z, y, x) max-pooling windows between them.
      dense_features: width of the hidden dense layer.
      train: `PrunerTrainSettings`; its batch size also batches the scoring.
    """

    window: tuple[int, int, int]
    features: tuple[int, ...]
    pools: Triples
    dense_features: int
    train: PrunerTrainSettings = nested(PrunerTrainSettings)


@dataclasses.dataclass(frozen=True)
class BoundaryModelSettings:
    """One DeepEM3D-Net of the ensemble (an entry of `config.models`).

    Attributes:
      name: the model's name (its folder `checkpoints/<name>`).
      slices: input slices s (1, 3 or 5).
      kernel: boundary kernel of its labels ("c3", "c5" or "l3").
      width: multiplier on the paper's feature counts.
      steps: optimizer steps.
      seed: seed of its initialisation and patches; None: the config's `seed`.
      blocks, side_features, dilations: as `synjax.models.deepem3d.DeepEM3DSettings`.
      only_slices: z indices of the test part it alone contributes to; None:
        every slice.
    """

    name: str
    slices: int
    kernel: str
    width: float
    steps: int
    seed: int | None = None
    blocks: tuple[int, int, int] = (1, 1, 1)
    side_features: int = 16
    dilations: tuple[int, ...] = (1, 3, 5)
    only_slices: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class BoundaryTrainSettings(TrainSettings):
    """Training of every model of the ensemble (`config.train` of the neuron pipeline).

    Each model's `steps` and `seed` come from its own entry.

    Attributes:
      patch_yx: y and x size of the training patches (a multiple of 16).
      augment: flips, yx rotations, z flip and intensity jitter.
    """

    GIVEN: ClassVar[tuple[str, ...]] = ("seed", "steps")

    patch_yx: int = dataclasses.field(kw_only=True)
    augment: bool = dataclasses.field(kw_only=True)


@dataclasses.dataclass(frozen=True)
class SlicePredictSettings:
    """Slice-wise prediction of the ensemble (`config.predict` of the neuron pipeline).

    Attributes:
      tta: test-time augmentation.
      tta_transforms: how many of the 16 transforms (1, 2, 4, 8 or 16).
      batch_size: output slices per compiled call.
      progress: a progress bar per batch of slices.
      max_tile: tile size for slices larger than this; None: whole slices.
      orientations: slicing axes, voxel-wise maximum over them.
      slab_depth: slices per block when a volume is predicted block by block
        (`config.predict.input`).
      resume: an existing output of another model or input: "auto" predicts
        it afresh, "strict" stops with an error.
      retries: how many more times a failing slab is tried before the run
        stops with an error naming it.
      input: a volume of the user's (any `synjax.io.open_volume` source) to
        predict with the trained models instead of the test data; "": none.
      output: folder of the predictions of `input` (zarr).
      roi: region of `input` to predict, "z0:z1,y0:y1,x0:x1" in voxels; "": all.
      executor: how `input`'s slabs run: "local" or "dask".
      scheduler: with "dask", a running scheduler's address; "": a
        `LocalCluster` on this machine.
      segment_block: (z, y, x) voxels of a block of the block-wise
        segmentation of `input` (`neuron_volume.segment_volume`).
      segment_halo: voxels of context flooded around each such block.
      groundtruth: labels of `input` (any `open_volume` source) that its
        segmentation is scored against, block by block; None: not scored.
    """

    tta: bool
    tta_transforms: int
    batch_size: int
    progress: bool
    max_tile: int | None = None
    orientations: tuple[str, ...] = ("z",)
    slab_depth: int = 16
    resume: str = "auto"
    retries: int = 2
    input: str = ""
    output: str = ""
    roi: str = ""
    executor: str = "local"
    scheduler: str = ""
    segment_block: tuple[int, int, int] = (128, 128, 128)
    segment_halo: int = 16
    groundtruth: str | None = None
