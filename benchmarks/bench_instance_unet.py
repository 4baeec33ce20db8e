"""Benchmark of the EM instance network: training steps, block inference, axis-wise fusion.

The networks of a `configs/vnc.py` variant ("default": the CPU-sized U-Net on
the VNC stack read at (1, 2, 2); "smoke": the tiny test network on its
synthetic volume). Rows:

- "train step" / "baseline step": the training loop's own jit step
  (`synjax.train.loop.make_train_step`: forward, target assignment, losses,
  gradients, optimizer update) of the instance network and of the baseline
  segmenter on a batch of `train.batch_size` crops of the training slab;
- "block inference": the detection forward pass on one `predict.block`;
- "fusion per block": painting and fusing every block of the test region
  (`synjax.inference.instance_blocks.fuse_detections`, untrained network at
  score threshold 0, so the blocks hold their full `detections` each)
  divided by the number of blocks.

Compile time (ahead of time, `lower().compile()`) is reported apart from the
steady-state time. Run from the repository root:

    .venv/bin/python benchmarks/bench_instance_unet.py [--variant default] [--repeats 5]
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

from synjax.data.intensity import normalize_intensity
from synjax.inference.instance_blocks import Painting, detect_blocks, fuse_detections
from synjax.models.instance_unet import build_instance_unet
from synjax.models.losses import positive_weighted_sigmoid_cross_entropy
from synjax.pipelines.instance_data import load_volume, split_rows
from synjax.stages import cleft_segmenter, instance_unet
from synjax.train.loop import make_train_step
from synjax.train.parallel import make_mesh
from synjax.train.state import create_train_state

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "vnc.py"
COLUMNS = ("variant", "what", "batch", "compile_s", "step_s", "min_s")


def _config(variant: str):
    spec = importlib.util.spec_from_file_location("vnc_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def _time_step(model, loss_fn, batch, train_settings, repeats):
    """(compile seconds, Timing, final params, FLOPs) of the loop's train step on a fixed batch."""
    mesh = make_mesh(1)
    state = jax.jit(lambda key: create_train_state(model, batch["input"], train_settings, key))(
        jax.random.key(0)
    )
    device_batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = make_train_step(loss_fn, mesh)
    compiled, compile_s = common.compile_jax(step, state, device_batch)

    def call():
        nonlocal state
        # The step donates its state: keep the new one for the next call.
        state, metrics = compiled(state, device_batch)
        return metrics

    flops = common.flops(compiled)
    return compile_s, common.time_calls(call, repeats), state.params, flops


def _row(variant, what, batch, compile_s, timing, flops=None, shape=None) -> dict:
    return {
        "flops": flops,
        "input_shape": None if shape is None else list(shape),
        "variant": variant,
        "what": what,
        "batch": batch,
        "compile_s": compile_s,
        "step_s": timing.median,
        "min_s": timing.min,
        "timing": timing.as_dict(),
    }


def bench(variant: str, repeats: int) -> list[dict]:
    config = _config(variant)
    volume = load_volume(config)
    factor = volume.factors[1]
    t0, t1 = split_rows(config, volume, "train")
    image = volume.image[:, t0 // factor : t1 // factor]
    labels = volume.read_labels[:, t0 // factor : t1 // factor]
    intensity = instance_unet.fit_intensity(config, image, "benchmark image")
    crops = instance_unet.training_crops(config, image, labels, intensity)
    train_settings = instance_unet.train_block(config)
    size = train_settings.batch_size
    rows = []

    settings = instance_unet.network_settings(instance_unet.network_block(config))
    model = build_instance_unet(settings, training=True)
    batch = crops.instance_batch(0, size)
    compile_s, timing, params, flops = _time_step(
        model,
        lambda out, _: (out["loss"], {}),
        batch,
        train_settings,
        repeats,
    )
    rows.append(_row(variant, "train step", size, compile_s, timing, flops, batch["input"].shape))

    segmenter = cleft_segmenter.build_segmenter(config)
    weight = float(cleft_segmenter.baseline_block(config).positive_weight)
    batch = crops.segmenter_batch(0, size)
    compile_s, timing, _, flops = _time_step(
        segmenter,
        lambda logits, batch: (
            positive_weighted_sigmoid_cross_entropy(logits, batch["target"], weight),
            {},
        ),
        batch,
        train_settings,
        repeats,
    )
    rows.append(
        _row(variant, "baseline step", size, compile_s, timing, flops, batch["input"].shape)
    )

    predict = config.predict
    detector = build_instance_unet(settings)
    apply = jax.jit(lambda p, x: detector.apply({"params": p}, x))
    block = jnp.zeros((1, *predict.block, 1), jnp.float32)
    compiled, compile_s = common.compile_jax(apply, params, block)
    timing = common.time_calls(functools.partial(compiled, params, block), repeats)
    flops = common.flops(compiled)
    rows.append(_row(variant, "block inference", 1, compile_s, timing, flops, block.shape))

    y0, y1 = split_rows(config, volume, "test")
    region = normalize_intensity(
        volume.image[:, y0 // factor : y1 // factor], intensity, "benchmark region"
    )
    detector_fn = instance_unet.block_detector(config, params)
    # Compile the block function first: the end-to-end row is steady state.
    detector_fn(np.zeros((1, *predict.block), np.float32))
    start = time.perf_counter()
    found = detect_blocks(detector_fn, region, predict.block, predict.overlap)
    detect_s = time.perf_counter() - start
    blocks = len(found.boxes)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        labels, _ = fuse_detections(found, Painting(0.0, 0.4), float(predict.fusion_iou))
        times.append((time.perf_counter() - start) / blocks)
    row = _row(variant, "fusion per block", 1, 0.0, common.Timing(times))
    row["blocks"] = blocks
    row["detections_per_block"] = float(np.mean([len(d["scores"]) for d in found.detections]))
    row["fused_instances"] = int(labels.max())
    rows.append(row)
    # The pipeline's prediction of the test region: block detections, then fusion.
    seconds = detect_s + row["step_s"] * blocks
    end_to_end = _row(variant, "prediction end to end", 1, 0.0, common.Timing([seconds]))
    end_to_end["region_shape"] = list(region.shape)
    end_to_end["voxels_per_s"] = float(region.size / seconds)
    rows.append(end_to_end)
    return rows


def main(argv=None):
    common.variant_main(
        argv,
        __doc__.splitlines()[0],
        ("default", "smoke"),
        bench,
        "EM instance network, configs/vnc.py:{variant}:",
        COLUMNS,
        os.path.join(os.path.dirname(__file__), "results", "bench_instance_unet.json"),
    )


if __name__ == "__main__":
    main()
