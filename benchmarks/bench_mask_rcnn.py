"""Benchmark of the 3D Mask R-CNN: one training step and inference on one patch.

The model of a `configs/fluorescence.py` variant ("default": the CPU-sized
ResNet-18; "paper": Chen et al.'s ResNet-101 + FPN, meant for a GPU; "smoke":
the tiny test network) on synthetic puncta patches of the config's size
(96 x 96 x 32 x-y-z, except smoke). The training step is the training loop's
own (`synjax.train.loop.make_train_step`: forward, target assignment, losses,
gradients and the optimizer update in one jit program) on a batch of
`train.batch_size` patches; inference is the detection forward pass on one
patch (proposals, box head, final NMS, mask head). Compile time (ahead of
time, `lower().compile()`) is reported apart from steady-state time.

Run from the repository root:

    .venv/bin/python benchmarks/bench_mask_rcnn.py [--variant default] [--repeats 5]
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.data.intensity import IntensityNormalization, normalize_intensity
from synjax.data.synthetic_fluorescence import make_fluorescence_volume
from synjax.detection.mask_rcnn3d import build_mask_rcnn
from synjax.inference.instances import detect_patches, merge_detections
from synjax.stages.mask_rcnn import TrainingPatches, mask_rcnn_settings, patch_detector
from synjax.train.loop import TrainSettings, make_train_step
from synjax.train.parallel import make_mesh
from synjax.train.state import create_train_state

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "fluorescence.py"
COLUMNS = ("variant", "what", "batch", "compile_s", "step_s", "min_s", "patches_per_s")


def _config(variant: str):
    spec = importlib.util.spec_from_file_location("fluorescence_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def bench(variant: str, repeats: int) -> list[dict]:
    config = _config(variant)
    d = config.data
    patch = tuple(config.train.patch)

    def volume(shape, seed):
        return make_fluorescence_volume(
            shape=shape,
            resolution=tuple(d.resolution),
            seed=seed,
            density=float(d.density),
            punctum_diameter_nm=tuple(d.punctum_diameter_nm),
            punctum_z_stretch=tuple(d.punctum_z_stretch),
            min_separation=float(d.min_separation),
            psf_fwhm_nm=tuple(d.psf_fwhm_nm),
        )

    image, labels = volume(patch, 0)
    intensity = IntensityNormalization.from_config(d.intensity).fit([image], "benchmark image")
    settings = mask_rcnn_settings(config.model)
    patches = TrainingPatches(
        image, labels, patch, intensity, settings.max_instances, 0.0, False, seed=0
    )
    train_settings = TrainSettings.from_config(config.train, seed=0)
    batch = patches.batch(0, train_settings.batch_size)
    mesh = make_mesh(1)
    model = build_mask_rcnn(settings, training=True)
    state = jax.jit(lambda key: create_train_state(model, batch["input"], train_settings, key))(
        jax.random.key(0)
    )
    device_batch = {"input": jnp.asarray(batch["input"])}
    step = make_train_step(lambda out, _: (out["loss"], {}), mesh)
    compiled_step, step_compile = common.compile_jax(step, state, device_batch)

    def train_call():
        nonlocal state
        # The step donates its state: keep the new one for the next call.
        state, metrics = compiled_step(state, device_batch)
        return metrics

    train_timing = common.time_calls(train_call, repeats)
    params = state.params

    detector = build_mask_rcnn(settings)
    apply = jax.jit(lambda p, x: detector.apply({"params": p}, x))
    one = device_batch["input"][:1, ..., :1]
    compiled_apply, apply_compile = common.compile_jax(apply, params, one)
    infer_timing = common.time_calls(functools.partial(compiled_apply, params, one), repeats)
    rows = [_end_to_end(config, settings, params, intensity, volume, variant)]
    for what, size, compile_s, timing, compiled in (
        ("train step", train_settings.batch_size, step_compile, train_timing, compiled_step),
        ("inference", 1, apply_compile, infer_timing, compiled_apply),
    ):
        rows.append(
            {
                "variant": variant,
                "what": what,
                "batch": size,
                "compile_s": compile_s,
                "step_s": timing.median,
                "min_s": timing.min,
                "patches_per_s": size / timing.median,
                "flops": common.flops(compiled),
                "input_shape": list(one.shape if what == "inference" else batch["input"].shape),
                "timing": timing.as_dict(),
            }
        )
    return rows[1:] + rows[:1]


def _end_to_end(config, settings, params, intensity, volume, variant) -> dict:
    """The pipeline's prediction of a volume of 2 x 2 overlapping patches: detect, merge.

    The patch function is compiled first, so the row is steady state. The
    untrained network's detections above score 0.5 are merged.
    """
    patch = tuple(int(p) for p in config.train.patch)
    overlap = tuple(int(o) for o in config.predict.overlap)
    shape = (patch[0], 2 * patch[1] - overlap[1], 2 * patch[2] - overlap[2])
    image, _ = volume(shape, 1)
    normalised = normalize_intensity(image, intensity, "benchmark volume")
    batch_size = int(config.predict.batch_size)
    detector = patch_detector(settings, params)
    detector(np.zeros((batch_size, *patch), np.float32))
    start = time.perf_counter()
    found = detect_patches(detector, normalised, patch, overlap, 0.0, batch_size)
    merged = merge_detections(found, 0.5, int(config.predict.min_overlap))
    seconds = time.perf_counter() - start
    return {
        "variant": variant,
        "what": "prediction end to end",
        "batch": batch_size,
        "compile_s": 0.0,
        "step_s": seconds,
        "min_s": seconds,
        "region_shape": list(shape),
        "voxels_per_s": float(np.prod(shape) / seconds),
        "patches": found.num_patches,
        "instances": int(merged.labels.max()),
        "timing": common.Timing([seconds]).as_dict(),
    }


def main(argv=None):
    common.variant_main(
        argv,
        __doc__.splitlines()[0],
        ("default", "paper", "smoke"),
        bench,
        "3D Mask R-CNN, configs/fluorescence.py:{variant}, patch of the config:",
        COLUMNS,
        os.path.join(os.path.dirname(__file__), "results", "bench_mask_rcnn.json"),
    )


if __name__ == "__main__":
    main()
