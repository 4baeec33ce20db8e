r"""Demo: synaptic partner detection on synthetic EM, no downloads.

Trains the signed-proximity U-Net and the pruning CNN on one synthetic volume
and detects partners on another (a different seed), then scores them.

    python -m synjax.main --config=configs/demo.py --workdir=workdir/demo
    python -m synjax.main --config=configs/demo.py:smoke --workdir=/tmp/smoke
    python -m synjax.main --config=configs/demo.py:predicted_segmentation \
        --workdir=workdir/demo_predicted
"""

from ml_collections import config_dict

from synjax import configlib

VARIANTS = ("default", "smoke", "predicted_segmentation")


def get_config(arg: str | None = None):
    variant = configlib.variant(arg, VARIANTS, "configs/demo.py")
    config = configlib.config_dict(
        {
            # pipeline, mode, seed, distributed, compilation_cache (see configlib.job_fields).
            **configlib.job_fields("partners"),
            "data": {
                # "synthetic" (generated here) or "cremi" (files below).
                "source": "synthetic",
                # CREMI-layout HDF5 files, used when source == "cremi".
                "train_path": "",
                "test_path": "",
                # Synthetic volumes: shape z-y-x in voxels, voxel size in nm.
                "shape": (32, 384, 384),
                "resolution": (40.0, 4.0, 4.0),
                # Seeds of the training and the held-out test volume.
                "train_seed": 1,
                "test_seed": 2,
                # Synapses per synthetic volume and the share with several posts.
                "n_synapses": 24,
                "polyadic_fraction": 0.5,
                # Raw intensities -> [0, 1] (see synjax.configlib.intensity_block).
                "intensity": configlib.intensity_block(),
            },
            # Neuron segmentation that candidates are built on: "predicted"
            # (DeepEM3D + watershed of `neurons`, trained on the training
            # volume) or "groundtruth" (the volume's own neuron_ids).
            # The default and `smoke` use the ground truth; the
            # `predicted_segmentation` variant trains DeepEM3D first.
            "segmentation": {"source": "groundtruth"},
            # The neuron segmentation (synjax.pipelines.neurons; fields as in
            # configs/fib25.py), used when segmentation.source == "predicted".
            "neurons": {
                "seed": 0,
                # The segmentation models' own intensity settings (as data.intensity).
                "data": {"intensity": configlib.intensity_block()},
                # One DeepEM3D-Net: 3 input slices, 3x3x3 boundary kernel.
                "models": (
                    {
                        "name": "deepem3d_s3",
                        "slices": 3,
                        "kernel": "c3",
                        "width": 0.125,
                        "side_features": 16,
                        "steps": 500,
                        "seed": 0,
                    },
                ),
                "train": configlib.train_block(
                    batch_size=4,
                    learning_rate=1e-3,
                    optimizer="adam",
                    schedule="warmup_cosine",
                    warmup_steps=50,
                    log_every=100,
                    checkpoint_every=500,
                    keep_checkpoints=1,
                    # yx size of the training patches (a multiple of 16).
                    patch_yx=128,
                    # Flips, yx rotations, z flip, intensity jitter.
                    augment=True,
                ),
                "predict": {
                    # Test-time augmentation over this many of the 16 transforms.
                    "tta": True,
                    "tta_transforms": 4,
                    "batch_size": 4,
                    "progress": True,
                    "max_tile": config_dict.placeholder(int),
                    # Slicing axes (anisotropic sections: z only).
                    "orientations": ("z",),
                },
                "watershed": {
                    # Anisotropic sections: smooth each slice on its own.
                    "smoothing": "2d",
                    # Grid searched on the training volume's boundary map.
                    "sigmas": (1.0, 2.0),
                    "hs": (0.1, 0.2, 0.3),
                    # Mean-boundary agglomeration thresholds (empty: watershed
                    # alone, as in the README's measured figures; smoke runs
                    # one threshold so that tests cover the path).
                    "thresholds": (),
                },
            },
            "targets": {
                # Signed proximity f(d) = exp(-d^2/2s^2) (2/(1+exp(-a d)) - 1).
                "alpha": 5.0,
                "sigma": 10.0,
                # Partner voxels within this distance of a cleft are labelled.
                "radius_nm": 120.0,
            },
            "unet": {
                "depth": 2,
                "base_features": 8,
                "feature_growth": 2,
                "pool_factors": ((1, 2, 2), (1, 2, 2)),
                # Finest level in-plane only: z voxels are 10x thicker than xy.
                "conv_kernels": ((1, 3, 3), (3, 3, 3), (3, 3, 3)),
                # "SAME" keeps patches small on a CPU; "VALID" is the paper's.
                "padding": "SAME",
                # Wanted output of a training patch (z, y, x).
                "train_output": (8, 64, 64),
                # Output block of block-wise prediction (z, y, x).
                "predict_output": (16, 192, 192),
                # SAME padding: real context read around each block (z, y, x).
                "predict_context": (2, 16, 16),
                # Recompute conv-block activations in the backward pass: less
                # memory for large training patches, same results.
                "remat": False,
            },
            "train": configlib.train_block(
                steps=500,
                batch_size=4,
                # 2e-3 trained a U-Net that found no candidate on the training
                # volume once the convolutions' rounding changed (oneDNN);
                # 1e-3 reached training F 0.955 / 0.894 with oneDNN / "folded"
                # (chosen on the training volume: README, Results).
                learning_rate=1e-3,
                optimizer="adam",
                schedule="warmup_cosine",
                warmup_steps=50,
                log_every=50,
                checkpoint_every=200,
                keep_checkpoints=2,
                # Share of patches centred on a synapse (targets are sparse).
                positive_fraction=0.7,
                # Batches sampled ahead in a background thread (same batches); 0: none.
                prefetch=2,
                # PRNG of the initialisation: "threefry2x32" (the README's
                # parameters), or the faster "rbg" / "unsafe_rbg".
                prng_impl="threefry2x32",
            ),
            "predict": {
                "batch_size": 1,
                # executor, scheduler, resume, retries, input, output, roi (see
                # synjax.configlib.volume_predict_fields).
                **configlib.volume_predict_fields(),
                # With `input`: the neuron segmentation of that volume (any
                # synjax.io source, of the input's or the roi's shape) that
                # candidates pair sites on; "" stops at the proximity.
                "segmentation": "",
                # With `input`: blocks (z, y, x) of the block-wise candidates.
                "candidate_block": (32, 384, 384),
            },
            "candidates": {
                # Site threshold |p| > tau and minimum site/segment overlap (voxels).
                "tau": 0.3,
                "omega": 100,
                # Largest gap between a pre and a post site of one candidate.
                "max_gap_nm": 200.0,
                # Same-pair candidates closer than this are one synapse: keep the best.
                "nms_radius_nm": 400.0,
            },
            "pruner": {
                # Window (z, y, x) around a candidate; the paper uses 16x160x160.
                "window": (8, 64, 64),
                "features": (8, 16, 16, 32, 32),
                "pools": ((1, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)),
                "dense_features": 64,
                "train": configlib.train_block(
                    steps=300,
                    # Also the batch of windows scored at once.
                    batch_size=16,
                    learning_rate=1e-3,
                    optimizer="adam",
                    schedule="constant",
                    warmup_steps=0,
                    log_every=10,
                    checkpoint_every=100,
                    keep_checkpoints=2,
                    # Candidate within this distance of a true pair can be positive.
                    label_distance_nm=400.0,
                ),
            },
            "evaluation": {
                # CREMI partner metric: matched pairs lie within this distance.
                "cremi_distance_nm": 400.0,
                # Looser rule reported beside the paper's criterion (which has no
                # distance): same ids in order, midpoints within this distance.
                "same_ids_distance_nm": 400.0,
            },
        }
    )
    if variant == "smoke":
        # A few seconds on a CPU, for tests: small volumes and networks, few steps.
        config.data.shape = (24, 160, 160)
        config.data.n_synapses = 4
        neurons = config.neurons
        neurons.models[0].update(width=1 / 32, side_features=4, steps=4)
        neurons.train.update(
            patch_yx=64, batch_size=2, warmup_steps=1, log_every=2, checkpoint_every=4
        )
        neurons.predict.tta = False
        neurons.watershed.update(sigmas=(1.0,), hs=(0.2,), thresholds=(0.5,))
        config.unet.base_features = 4
        config.unet.train_output = (8, 48, 48)
        config.unet.predict_output = (24, 160, 160)
        config.train.update(steps=8, batch_size=2, warmup_steps=2, log_every=4, checkpoint_every=8)
        config.candidates.omega = 20
        config.pruner.window = (8, 32, 32)
        config.pruner.features = (4, 4, 8, 8, 8)
        config.pruner.dense_features = 16
        config.pruner.train.update(steps=6, batch_size=4)
    if variant == "predicted_segmentation":
        config.segmentation.source = "predicted"
    return config
