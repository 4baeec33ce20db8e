r"""Fluorescent synapse instances: 3D Mask R-CNN (Chen et al.) against pixel forest + watershed.

Synthetic two-photon puncta volumes (dense, touching, anisotropic PSF, shot
noise), training and test volumes from different seeds, voxels of
1000 x 96 x 96 nm (z-y-x) as the paper's data. Puncta measure 0.8-1.2 um
across in x-y and 2.5-4 times that in z, so a punctum spans 2-5 z-planes and
100-280 voxels (10th-90th percentile; median 171, extent 3 x 10 x 10 voxels),
near the paper's ~200. At 0.05 puncta per um^3 the training volume holds about
1200 puncta, ~130 per 96 x 96 x 32 patch, and 40% of them touch another.

    python -m synjax.main --config=configs/fluorescence.py --workdir=workdir/fluorescence
    python -m synjax.main --config=configs/fluorescence.py:smoke --workdir=/tmp/fluo_smoke
    python -m synjax.main --config=configs/fluorescence.py:paper --workdir=workdir/fluo_paper

default: sized for 2 CPU cores: a ResNet-18 backbone (depth 18, basic
         blocks 2-2-2-2) of base width 8 (C2..C5: 8, 16, 32, 64 channels,
         GroupNorm of 4 groups), a 32-channel FPN and RPN on the P2 level only
         (the puncta are small), a 64-wide box head, a 16-wide mask head with
         two convs; 800 steps of 2 patches of 32 x 96 x 96 (z-y-x). Measured
         at 397fb46 on 2 quiet CPU cores: 13 min 56 s in all (training 12 min,
         0.88 s a step; results/fluorescence/RUN.json).
paper:   the paper's ResNet-101 (base width 64), 256-channel FPN over P2..P5,
         128-channel RPN, four-conv mask head, score threshold 0.99, sized for
         a GPU.
smoke:   a tiny network and volume that run end to end (about 90 s on a loaded
         2-core CPU, mostly compilation).

A volume of your own, with the network and score threshold of a trained RUN
(zarr, N5, precomputed://, file.h5:/dataset or TIFF; `roi` optional):

    python -m synjax.main --config=configs/fluorescence.py --workdir=workdir/fluorescence \
        --config.mode=predict --config.predict.input=/data/puncta.zarr \
        --config.predict.output=/data/puncta_synapses --config.predict.roi=0:32,0:2048,0:2048

The training step matches anchors to boxes tile by tile
(`synjax.detection.matcher.match_boxes`, the same labels as the dense
55k x 192 IoU matrix, which took 0.4-0.6 s a step), draws the anchor sample
by a top-k instead of a full sort, and takes the stem pool's gradient without
index tracking: 0.76-0.79x the step time of before, measured back to back on
the shared 2-core CPU (20 and 12 steps).

Results (README, results/fluorescence/): Mask R-CNN F1 0.954 at IoU 0.5,
1 merge; pixel forest + watershed 0.919, 39 merges; every parameter of both
chosen on the training volume.
"""

from ml_collections import config_dict

from synjax import configlib

VARIANTS = ("default", "smoke", "paper")


def get_config(arg: str | None = None):
    variant = configlib.variant(arg, VARIANTS, "configs/fluorescence.py")
    smoke, paper = variant == "smoke", variant == "paper"
    config = configlib.config_dict(
        {
            "pipeline": "fluorescence",
            # train, predict, evaluate, or all three in turn.
            "mode": "all",
            # Seed of parameter initialisation, patch sampling and the forest.
            "seed": 0,
            "distributed": False,
            "data": {
                # Synthetic volumes (z, y, x) in voxels; z spans the whole stack.
                "train_shape": (16, 64, 64) if smoke else (32, 288, 288),
                "test_shape": (16, 64, 64) if smoke else (32, 192, 192),
                "resolution": (1000.0, 96.0, 96.0),
                "train_seed": 1,
                "test_seed": 2,
                # Puncta per um^3, their x-y diameter (nm), z / x-y elongation,
                # and the least centre distance as a fraction of the mean diameter.
                "density": 0.05,
                "punctum_diameter_nm": (800.0, 1200.0),
                "punctum_z_stretch": (2.5, 4.0),
                "min_separation": 0.7,
                # Point-spread function, full width at half maximum (nm), z-y-x.
                "psf_fwhm_nm": (1500.0, 300.0, 300.0),
                # The network input: the training volume's 1st and 99.9th percentiles
                # map to 0 and 1 (saved with the checkpoint, re-applied at prediction).
                "intensity": {"method": "percentiles", "low_percent": 1.0, "high_percent": 99.9},
            },
            "model": {
                # ResNet depth (18, 34, 50, 101), width of its first stage, GroupNorm groups.
                "depth": 101 if paper else 18,
                "base_features": 64 if paper else (4 if smoke else 8),
                "norm_groups": 32 if paper else 4,
                "fpn_features": 256 if paper else (8 if smoke else 32),
                # The paper limits the RPN's maps to 128 channels.
                "rpn_features": 128 if paper else (8 if smoke else 32),
                "levels": ("P2", "P3", "P4", "P5") if paper else ("P2",),
                # Anchor sizes in units of each level's stride (paper: 2, 4, 8; here
                # sizes that fit the (3, 10, 10)-voxel puncta on P2 at IoU > 0.7).
                "anchor_scales": (2.0, 4.0, 8.0) if paper else (2.5, 3.5, 5.0),
                # ROIAlign sizes (z, y, x) of the box and mask heads; the mask head
                # up-samples 2x: the paper's 7x7x3 box ROI.
                "box_roi_size": (3, 7, 7),
                "box_features": 1024 if paper else (16 if smoke else 64),
                "mask_roi_size": (4, 14, 14) if paper else (2, 7, 7),
                "mask_features": 256 if paper else (8 if smoke else 16),
                "mask_convs": 4 if paper else 2,
                "head_norm_groups": 32 if paper else 0,
                # RPN matcher (low, high) IoU: the paper's 0.3 / 0.7; on the P2 grid of
                # stride 4 in x-y few anchors reach 0.7 on 10-voxel puncta (the best is
                # up to 2 voxels off-centre), so the default counts 0.5 as foreground.
                "rpn_iou": (0.3, 0.7) if paper else (0.3, 0.5),
                "rpn_samples": 256,
                "roi_samples": 128,
                "roi_positive_fraction": 0.25 if paper else 0.5,
                "train_pre_nms": 2000 if paper else 512,
                "train_post_nms": 1000 if paper else 256,
                "test_pre_nms": 1000,
                "test_post_nms": 1000 if paper else 512,
                # A box of this size (voxels, cube root of its volume) pools on the
                # first level, each doubling one level coarser.
                "roi_canonical_size": 16.0,
                "max_instances": 48 if smoke else 192,
                "detections": 64 if smoke else 256,
                # Final NMS IoU of the detections (the paper's 0.2).
                "final_nms": 0.2,
            },
            "train": {
                # Non-overlapping training patches (z, y, x): the paper's 96x96x32 (x-y-z).
                "patch": (16, 64, 64) if smoke else (32, 96, 96),
                "steps": 3 if smoke else (20000 if paper else 800),
                "batch_size": 2,
                "learning_rate": 2e-3,
                "optimizer": "adamw",
                "schedule": "warmup_cosine",
                "warmup_steps": 1 if smoke else 50,
                "weight_decay": 1e-4,
                "grad_clip_norm": 5.0,
                "log_every": 1 if smoke else 50,
                "eval_every": 0,
                "checkpoint_every": 3 if smoke else 400,
                "keep_checkpoints": 1,
                # One in ten patches replaced by an empty black one (negatives).
                "negative_fraction": 0.1,
                # One-voxel shifts in x and y, rotations about z, x and y.
                "augment": True,
                "num_devices": config_dict.placeholder(int),
            },
            "predict": {
                # Overlap (z, y, x) of the inference patches: the paper's 34 px in
                # x-y and 17 in z.
                "overlap": (8, 34, 34) if smoke else (17, 34, 34),
                # Chosen on the training volume by F1 at IoU 0.5 (paper: 0.99).
                "score_thresholds": (0.0,)
                if smoke
                else ((0.99,) if paper else (0.3, 0.5, 0.7, 0.9, 0.95, 0.99)),
                "batch_size": 1,
                # Pasted masks sharing this many voxels are copies (paper: 10).
                "min_overlap": 10,
                # A volume of your own (with --config.mode=predict; see the docstring
                # of synjax.pipelines.fluorescence_volume): the cells (z, y, x) in
                # voxels whose patches one block detects (memory: the raw voxels the
                # patches of one cell cover, and their masks), the output folder,
                # region, reuse of blocks and retries (see
                # synjax.configlib.volume_predict_fields; executor: "local" or "dask").
                "block": (16, 64, 64) if smoke else (32, 512, 512),
                "input": "",
                "output": "",
                "roi": "",
                "resume": "auto",
                "retries": 2,
                "executor": "local",
                "scheduler": "",
            },
            "baseline": {
                # Ilastik-like pixel forest.
                "n_trees": 10 if smoke else 50,
                "max_depth": 8 if smoke else 12,
                "samples_per_class": 2000 if smoke else 20000,
                # Watershed grid searched on the training volume.
                "thresholds": (0.5,) if smoke else (0.3, 0.5, 0.7, 0.9),
                "hs_nm": (50.0,) if smoke else (10.0, 25.0, 50.0, 100.0, 200.0),
                "min_sizes": (0,) if smoke else (0, 10, 20, 40),
            },
            "evaluation": {"plot_slices": 3},
        }
    )
    return config
