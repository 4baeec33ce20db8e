r"""Synaptic partners on CREMI (fly ssTEM, 40x4x4 nm), the set-up of Parag et al.

Paper-sized networks: the U-Net of the authors' code (input 32x316x316, output
4x228x228, valid padding) with sigma = 14 for fly TEM, and the pruning CNN on
16x160x160 windows. Download the CREMI samples (https://cremi.org/data/) and
point the paths at them:

    python -m synjax.main --config=configs/cremi.py --workdir=workdir/cremi \
        --config.data.train_path=sample_A_20160501.hdf \
        --config.data.test_path=sample_B_20160501.hdf

`:smoke` keeps the paths but shrinks networks and steps (a check of the files).
"""

from synjax import configlib

VARIANTS = ("default", "smoke")


def get_config(arg: str | None = None):
    variant = configlib.variant(arg, VARIANTS, "configs/cremi.py")
    config = configlib.config_dict(
        {
            # pipeline, mode, seed, distributed, compilation_cache (see configlib.job_fields).
            **configlib.job_fields("partners"),
            "data": {
                # CREMI-layout HDF5 files with raw, neuron_ids, clefts, annotations.
                "source": "cremi",
                "train_path": "sample_A_20160501.hdf",
                "test_path": "sample_B_20160501.hdf",
                # Unused for CREMI files (kept so every config has one schema).
                "shape": (0, 0, 0),
                "resolution": (40.0, 4.0, 4.0),
                "train_seed": 0,
                "test_seed": 0,
                "n_synapses": 0,
                "polyadic_fraction": 0.0,
                # Raw intensities -> [0, 1] (see synjax.configlib.intensity_block).
                "intensity": configlib.intensity_block(),
            },
            # "groundtruth": candidates on the file's neuron_ids.
            "segmentation": {"source": "groundtruth"},
            "targets": {
                # The paper's values for fly TEM (distance unit: in-plane voxels).
                "alpha": 5.0,
                "sigma": 14.0,
                # Partner voxels within this distance of a cleft are labelled.
                "radius_nm": 160.0,
            },
            "unet": {
                # The authors' network: 3 poolings of (1, 2, 2), features doubling.
                "depth": 3,
                "base_features": 24,
                "feature_growth": 2,
                "pool_factors": ((1, 2, 2), (1, 2, 2), (1, 2, 2)),
                "conv_kernels": ((3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                "padding": "VALID",
                # Wanted output of a training patch: 4x228x228 as in the paper.
                "train_output": (4, 228, 228),
                # Output block of block-wise prediction.
                "predict_output": (4, 228, 228),
                # Only for SAME padding: context read around each block.
                "predict_context": (0, 0, 0),
            },
            "train": configlib.train_block(
                steps=100000,
                batch_size=1,
                learning_rate=1e-4,
                optimizer="adam",
                schedule="constant",
                warmup_steps=0,
                log_every=100,
                checkpoint_every=2000,
                keep_checkpoints=3,
                # Share of patches centred on a synapse.
                positive_fraction=0.5,
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
            "candidates": {"tau": 0.3, "omega": 100, "max_gap_nm": 200.0, "nms_radius_nm": 400.0},
            "pruner": {
                # The paper's 16x160x160 window and five 3x3x3 convolutions.
                "window": (16, 160, 160),
                "features": (16, 32, 64, 64, 128),
                "pools": ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                "dense_features": 256,
                "train": configlib.train_block(
                    steps=20000,
                    # Also the batch of windows scored at once.
                    batch_size=32,
                    learning_rate=1e-4,
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
            "evaluation": {"cremi_distance_nm": 400.0, "same_ids_distance_nm": 400.0},
        }
    )
    if variant == "smoke":
        # The same files, with small networks and few steps: a check of the files.
        config.unet.base_features = 4
        config.train.update(steps=10, log_every=5, checkpoint_every=10)
        config.pruner.features = (4, 4, 4, 4, 4)
        config.pruner.dense_features = 8
        config.pruner.train.update(steps=10, batch_size=8)
    return config
