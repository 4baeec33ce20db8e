r"""EM synapse instances: the end-to-end 3D instance network against U-Net + components.

The real ssTEM stack of the Drosophila larva VNC (Gerhard et al. 2013, left
half: 20 x 1024 x 512 voxels of 50 x 4.6 x 4.6 nm, 33 synapses labelled as
clefts), cut along y: train on y < 640, choose every threshold on the
validation slab 640 <= y < 768 (inside the training part, never trained on),
test on y >= 768 (each run scores it once; README says how often it has been
scored while the protocol changed). The networks read the stack at (1, 2, 2)
(50 x 9.2 x 9.2 nm); metrics are computed on the native grid.

    python -m synjax.main --config=configs/vnc.py --workdir=workdir/vnc
    python -m synjax.main --config=configs/vnc.py:synthetic --workdir=workdir/vnc_synthetic
    python -m synjax.main --config=configs/vnc.py:smoke --workdir=/tmp/vnc_smoke

default:   the VNC stack; U-Net of base width 8 (8, 16, 32, 64, 128 channels),
           pools (1, 2, 2) x 3 then (2, 2, 2); the RPN on the (1, 4, 4) decoder
           map (nine anchor shapes), box and mask heads on the (1, 2, 2) map,
           a semantic (cleft probability) head on the finest map. The
           painting of the detections (score and mask thresholds, use of the
           semantic head, smallest instance) is chosen on the validation slab.
           Sized for 2 CPU cores (at most 45 minutes in all): measured whole
           at 9e491e5 in 35.1 min with other jobs sharing the cores (network
           training 24.4 min, baseline 9.5 min, validation grid, test
           prediction and scoring about 1 min); a training step of 2 crops
           takes 0.85 s on the quiet machine, 2-4 s shared
           (benchmarks/bench_instance_unet.py).
synthetic: the same protocol on a synthetic EM volume of the same shape and
           voxel size (`synjax.data.synthetic`), for the demo.
smoke:     a tiny synthetic volume and network that run end to end in seconds
           (plus compilation).
"""

from ml_collections import config_dict

from synjax import configlib

VARIANTS = ("default", "synthetic", "smoke")


def get_config(arg: str | None = None):
    variant = configlib.variant(arg, VARIANTS, "configs/vnc.py")
    smoke = variant == "smoke"
    synthetic = variant != "default"
    config = configlib.config_dict(
        {
            "pipeline": "instances",
            # train, predict, evaluate, or all three in turn.
            "mode": "all",
            # Seed of parameter initialisation and crop sampling.
            "seed": 0,
            "distributed": False,
            "data": {
                # "file" (a CREMI-layout HDF5 file) or "synthetic".
                "source": "synthetic" if synthetic else "file",
                "path": "../shared/data/vnc-larva-left.h5",
                "raw_key": "volumes/raw",
                # Cleft instances; CREMI's background 0xFFFFFFFFFFFFFFFF becomes 0.
                "clefts_key": "volumes/labels/clefts",
                # The synthetic volume (source "synthetic"): shape (z, y, x),
                # voxel size in nm, seed, synapses placed.
                "synthetic": {
                    "shape": (8, 128, 64) if smoke else (20, 1024, 512),
                    "resolution": (40.0, 8.0, 8.0) if smoke else (50.0, 4.6, 4.6),
                    "seed": 1,
                    "n_synapses": 6 if smoke else 33,
                },
                # The networks read the volume down-sampled by these factors (z, y, x).
                "downsample": (1, 2, 2),
                # Native y rows [start, stop) of each slab.
                "splits": {
                    "train": (0, 64) if smoke else (0, 640),
                    "validation": (64, 96) if smoke else (640, 768),
                    "test": (96, 128) if smoke else (768, 1024),
                },
                # The training slab's 1st and 99th percentiles map to 0 and 1.
                "intensity": {"method": "percentiles", "low_percent": 1.0, "high_percent": 99.0},
            },
            "model": {
                # U-Net backbone (shared with the baseline): width of the finest level,
                # growth per level, pools (z, y, x) finest first: (1, 2, 2) first for ssTEM.
                "base_features": 4 if smoke else 8,
                "feature_growth": 2,
                "pool_factors": ((1, 2, 2), (1, 2, 2))
                if smoke
                else ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2)),
                "neck_features": 8 if smoke else 32,
                # Decoder levels of the RPN (stride (1, 4, 4): anchor centres close
                # enough for clefts 10 read voxels across) and of the box and mask
                # heads (stride (1, 2, 2)).
                "rpn_level": 1 if smoke else 2,
                "roi_level": 0 if smoke else 1,
                # Anchor sizes (z, y, x) in read voxels: the VNC clefts span 1-9
                # sections (median 3) and 9-58 read voxels across (median 25). With
                # these nine, 31 of its 33 clefts have an anchor at IoU >= 0.4 (21 at
                # >= 0.5; median best IoU 0.52).
                "anchor_sizes": ((2.0, 8.0, 8.0), (3.0, 16.0, 16.0))
                if smoke
                else tuple((z, s, s) for z in (1.5, 3.0, 6.0) for s in (12.0, 24.0, 40.0)),
                "rpn_features": 8 if smoke else 32,
                "box_roi_size": (3, 7, 7),
                "box_features": 16 if smoke else 64,
                "mask_roi_size": (2, 7, 7) if smoke else (4, 14, 14),
                "mask_features": 8 if smoke else 16,
                "mask_convs": 1 if smoke else 2,
                # The mask head up-samples y and x only (clefts are a few sections thick).
                "mask_upsample": (1, 2, 2),
                "rpn_iou": (0.3, 0.5),
                "rpn_samples": 128 if smoke else 256,
                "roi_samples": 32 if smoke else 64,
                "roi_positive_fraction": 0.5,
                "train_pre_nms": 256 if smoke else 512,
                "train_post_nms": 64 if smoke else 128,
                "test_pre_nms": 256 if smoke else 512,
                "test_post_nms": 64 if smoke else 128,
                "max_instances": 8 if smoke else 16,
                "detections": 8 if smoke else 32,
                "final_nms": 0.3,
                # The semantic head (cleft probability per voxel, a 1x1x1 convolution
                # on the finest decoder map) trained with the detector: its loss
                # weight and the weight of a cleft voxel in it (as the baseline's).
                "semantic_weight": 1.0,
                "semantic_positive_weight": 10.0,
            },
            "train": {
                # Random crops (z, y, x) of the training slab in read voxels.
                "patch": (4, 32, 32) if smoke else (8, 128, 128),
                # Share of crops centred on a cleft voxel.
                "positive_fraction": 0.7,
                # Flips of z, y, x and 90-degree turns in y-x.
                "augment": True,
                "steps": 3 if smoke else 650,
                "batch_size": 2,
                "learning_rate": 1e-3,
                "optimizer": "adamw",
                "schedule": "warmup_cosine",
                "warmup_steps": 1 if smoke else 30,
                "weight_decay": 1e-4,
                "grad_clip_norm": 5.0,
                "log_every": 1 if smoke else 50,
                "eval_every": 0,
                "checkpoint_every": 3 if smoke else 400,
                "keep_checkpoints": 1,
                "num_devices": config_dict.placeholder(int),
            },
            "baseline": {
                # The same U-Net as a binary cleft segmenter, on the same crops.
                "steps": 3 if smoke else 350,
                "learning_rate": 1e-3,
                # Cleft voxels weighted in the cross-entropy (~1% of the voxels).
                "positive_weight": 10.0,
                # Probability thresholds and smallest components (read voxels)
                # tried on the validation slab.
                "thresholds": (0.5,) if smoke else (0.3, 0.5, 0.7, 0.9),
                "min_sizes": (0,) if smoke else (0, 50, 200, 500),
            },
            "predict": {
                # Blocks (z, y, x) in read voxels, their overlap, blocks per call.
                "block": (4, 32, 32) if smoke else (12, 128, 128),
                "overlap": (2, 8, 8) if smoke else (4, 32, 32),
                "batch_size": 1,
                # Native y rows before a slab read as image context.
                "context": 16 if smoke else 256,
                # Grids searched on the validation slab.
                "score_thresholds": (0.0,) if smoke else (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
                "mask_thresholds": (0.3,) if smoke else (0.3, 0.5),
                # A mask voxel reads (1 - mix) * mask head + mix * semantic head; and
                # scores times the mean semantic probability of the mask, or not.
                "semantic_mixes": (0.0, 0.5),
                "semantic_rescoring": (False, True),
                # Fused instances of fewer read voxels dropped (the baseline's grid).
                "min_sizes": (0,) if smoke else (0, 50, 200, 500),
                # A detection with under half of its mask free when painted is
                # dropped (detectron2's panoptic overlap threshold).
                "min_free_fraction": 0.5,
                # Instances of neighbouring blocks with IoU above this (within the
                # shared margin) become one.
                "fusion_iou": 0.5,
                # A volume of your own (with --config.mode=predict), its output folder,
                # region, reuse of blocks and retries: see
                # synjax.configlib.volume_predict_fields (executor: "local" or "dask").
                "input": "",
                "output": "",
                "roi": "",
                "resume": "auto",
                "retries": 2,
                "executor": "local",
                "scheduler": "",
            },
            "evaluation": {
                # Example slices drawn; detections given a Grad-CAM attention PNG.
                "plot_slices": 3,
                "attention_instances": 2 if smoke else 4,
            },
        }
    )
    return config
