r"""DeepEM3D on SNEMI3D (Zeng, Wu, Ji, Bioinformatics 2017): the paper's set-up.

SNEMI3D (Kasthuri et al. 2015, mouse cortex, ssSEM, 6 x 6 x 29 nm) has a
training stack (100 x 1024 x 1024, with dense labels) and a test stack of the
same size whose labels the challenge keeps: evaluate mode scores the test
stack only when its file holds `volumes/labels/neuron_ids`; otherwise submit
`predictions/segmentation.zarr` to the challenge. Both stacks must be CREMI-layout
HDF5 files (`volumes/raw`, `volumes/labels/neuron_ids`).

The ensemble follows the paper: DeepEM3D-Nets at full width with 1, 3 and 5
input slices (early 3D fusion for s3/s5) and boundary maps from the c5 and c3
kernels, combined by voxel-wise maximum after 16-fold test-time augmentation,
then a per-slice-smoothed H-minima 3D watershed. The 2D (s1) model is the one
the paper adds on misaligned slices; set its `only_slices` to those z indices
(None: all slices).

    python -m synjax.main --config=configs/snemi.py --workdir=workdir/snemi \
        --config.data.train_path=/data/snemi3d/train.h5 \
        --config.data.test_path=/data/snemi3d/test.h5
    python -m synjax.main --config=configs/snemi.py:smoke --workdir=/tmp/snemi_smoke
"""

from synjax import configlib
from synjax.postprocess.agglomeration import THRESHOLD_GRID

VARIANTS = ("default", "smoke")
DATASET = "SNEMI3D"
PUBLISHED_AT = (
    "http://brainiac2.mit.edu/SNEMI3D/ (Kasthuri et al. 2015; convert to CREMI-layout HDF5)"
)
DEFAULT_TRAIN = "data/snemi3d/train.h5"
DEFAULT_TEST = "data/snemi3d/test.h5"


def _model(name, slices, kernel, steps, width, seed, only_slices=None):
    return {
        "name": name,
        "slices": slices,
        "kernel": kernel,
        "width": width,
        "side_features": 16,
        "steps": steps,
        "seed": seed,
        "only_slices": only_slices,
    }


def get_config(arg: str | None = None):
    variant = configlib.variant(arg, VARIANTS, "configs/snemi.py")
    smoke = variant == "smoke"
    steps = 4 if smoke else 30000
    width = 1 / 32 if smoke else 1.0
    config = configlib.config_dict(
        {
            # Which end-to-end job runs (see synjax.pipelines.PIPELINES).
            "pipeline": "neurons",
            # train, predict, evaluate, or all three in turn.
            "mode": "all",
            # Seed of parameter initialisation and patch sampling.
            "seed": 0,
            # Call jax.distributed.initialize() first (multi-host runs).
            "distributed": False,
            "data": {
                # Named in the error when a file below is missing.
                "dataset": DATASET,
                "published_at": PUBLISHED_AT,
                # CREMI-layout HDF5 of the SNEMI3D training and test stacks.
                "train_path": DEFAULT_TRAIN,
                "test_path": DEFAULT_TEST,
                "raw_key": "volumes/raw",
                "labels_key": "volumes/labels/neuron_ids",
                # SNEMI3D ships no machine over-segmentation; absent -> skipped.
                "oversegmentation_key": "volumes/labels/oversegmentation",
                # z ranges [start, stop) of the training file (None: all) and of
                # the tuning part used to choose the watershed's sigma, h and
                # agglomeration threshold: held out of network training, so
                # that they are chosen on a map as uncertain as the test's.
                "train_z": (0, 80),
                "tune_z": (80, 100),
                "test_z": None,
                # yx crop (y0, y1, x0, x1); None: whole 1024 x 1024 slices.
                "crop_yx": (0, 64, 0, 64) if smoke else None,
                # How raw intensities become the networks' [0, 1] input (saved with each
                # checkpoint as checkpoints/<model>/intensity.json, re-applied at prediction):
                # "dtype": uint8 / 255, uint16 / 65535, floats must already lie in [0, 1];
                # "percentiles": the training volume's low/high percentiles map to 0 and 1
                # (clipped), measured once on it and never on the test volume.
                "intensity": {"method": "dtype", "low_percent": 1.0, "high_percent": 99.0},
            },
            # The paper's ensemble: s1/s3/s5 inputs, c5/c3 boundary kernels.
            "models": (
                _model("s3_c5", 3, "c5", steps, width, 0),
                _model("s5_c5", 5, "c5", steps, width, 1),
                _model("s3_c3", 3, "c3", steps, width, 2),
                _model("s1_c5", 1, "c5", steps, width, 3),
            ),
            "train": {
                # yx size of training patches (a multiple of 16).
                "patch_yx": 32 if smoke else 256,
                "batch_size": 2 if smoke else 8,
                "learning_rate": 1e-3,
                "optimizer": "adam",
                "schedule": "warmup_cosine",
                "warmup_steps": 1 if smoke else 500,
                "log_every": 1 if smoke else 100,
                "checkpoint_every": 2 if smoke else 2000,
                "keep_checkpoints": 2,
                # Flips, yx rotations, z flip, intensity jitter.
                "augment": True,
                # None: all local devices.
                "num_devices": 1 if smoke else None,
            },
            "predict": {
                # 16-fold test-time augmentation as in the paper.
                "tta": True,
                "tta_transforms": 2 if smoke else 16,
                "batch_size": 2,
                "progress": not smoke,
                # 1024^2 slices in 512^2 tiles (with overlap) to bound memory.
                "max_tile": None if smoke else 512,
                # Slicing axes (anisotropic sections: z only).
                "orientations": ("z",),
            },
            "watershed": {
                # Per-slice Gaussian (anisotropic data) before the H-minima watershed.
                "smoothing": "2d",
                "sigmas": (1.0,) if smoke else (1.0, 2.0, 3.0),
                "hs": (0.2,) if smoke else (0.02, 0.05, 0.1, 0.2, 0.3),
                # Mean-boundary agglomeration thresholds tried on every
                # watershed of the grid (empty: watershed alone, as in the paper).
                "thresholds": (0.5,) if smoke else THRESHOLD_GRID,
            },
            "baseline": {
                # Classical watershed on inverted raw, tuned on the tuning part.
                "smoothing": "2d",
                "sigmas": (1.0,) if smoke else (1.5, 2.5, 4.0),
                "hs": (0.2,) if smoke else (0.1, 0.2, 0.3),
            },
            "evaluation": {
                # Test slices shown in example_slices.png.
                "plot_slices": 3,
            },
        }
    )
    if smoke:
        config.models = config.models[:1]
    return config
