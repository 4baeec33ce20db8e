"""`run_all.py` sections beyond the networks: detection ops, host stages, pipelines, cold start."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import bench_detection, bench_merge, common
    from benchmarks.harness_base import SEED, TINY_UNET, Context, row, shape_text
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import bench_detection
    import bench_merge
    import common
    from harness_base import SEED, TINY_UNET, Context, row, shape_text


def section_nms(ctx: Context) -> list[dict]:
    rows = []
    for r in bench_detection.bench_nms(ctx.sizes.repeats, 1, ctx.sizes.nms_boxes):
        rows.append(
            row(
                "ops",
                f"NMS {r['setting']}",
                framework="jax" if r["impl"] == "jax_nms" else r["impl"],
                mode="op",
                dtype="float32",
                shape=f"{r['boxes']} boxes",
                compile_s=r["compile_s"],
                median_s=r["step_s"],
                min_s=r["min_s"],
                repeats=r["repeats"],
                flops=r.get("flops"),
                kept=r["kept"],
                speedup_vs_best_numpy=r["speedup"],
            )
        )
    return rows


def section_roi_align(ctx: Context) -> list[dict]:
    rows = []
    for r in bench_detection.bench_roi_align(ctx.sizes.repeats, ctx.sizes.roi_cases):
        rows.append(
            row(
                "ops",
                f"ROIAlign {r['case']} ({r['impl']})",
                mode="op",
                dtype="float32",
                shape=r["case"].split(" from ")[-1],
                compile_s=r["compile_s"],
                median_s=r["step_s"],
                min_s=r["min_s"],
                repeats=r["repeats"],
                flops=r.get("flops"),
                boxes_per_s=r["boxes_per_s"],
            )
        )
    return rows


def section_merge(ctx: Context) -> list[dict]:
    r = bench_merge.bench_size(ctx.sizes.merge_masks, ctx.sizes.repeats, None)
    if not r["loop_equal"] or not r["overlaps_scipy_equal"]:
        raise RuntimeError("sparse merge: the reference implementations disagree")
    base = dict(mode="op", shape=f"{r['masks']} masks in {r['volume']}")
    return [
        row(
            "ops",
            "sparse mask merge (merge_masks)",
            framework="numpy/scipy",
            median_s=r["merge_s"],
            min_s=r["merge_min_s"],
            repeats=ctx.sizes.repeats,
            cpu_s=r["merge_cpu_s"],
            kept=r["kept"],
            speedup_vs_python_loop=r["speedup"],
            **base,
        ),
        row(
            "ops",
            "sparse mask merge, Python-loop reference",
            framework="python",
            median_s=r["loop_s"],
            repeats=1,
            **base,
        ),
    ]


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, common.Timing]:
    """(last result, Timing of `repeats` calls): host code needs no warm-up or sync."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, common.Timing(times)


def _synthetic_em(shape, seed=SEED):
    from synjax.data.synthetic import make_em_volume

    return make_em_volume(shape=shape, resolution=(40.0, 4.0, 4.0), seed=seed)


def section_watershed(ctx: Context) -> list[dict]:
    from synjax.postprocess.watershed import segment

    try:
        from benchmarks import bench_segmentation
    except ImportError:
        import bench_segmentation

    if ctx.sizes.watershed_shape is None:
        image, _, _ = bench_segmentation._load(bench_segmentation.DEFAULT_DATA)
        source = bench_segmentation.DEFAULT_DATA.name
    else:
        raw = _synthetic_em(ctx.sizes.watershed_shape).raw
        image = (255.0 - raw.astype(np.float64)) / 255.0  # membranes dark: invert
        source = "synthetic EM"
    labels, timing = _timed(
        lambda: segment(image, bench_segmentation.SIGMA, bench_segmentation.H), ctx.sizes.repeats
    )
    return [
        row(
            "host",
            f"watershed segment() on {source}",
            framework="numpy/scipy/skimage",
            mode="op",
            shape=shape_text(image.shape),
            timing=timing,
            voxels_per_s=image.size / timing.median,
            regions=int(labels.max()),
        )
    ]


def section_candidates(ctx: Context) -> list[dict]:
    from synjax.data.synthetic_em import smooth_noise
    from synjax.postprocess.candidates import generate_candidates

    volume = _synthetic_em(ctx.sizes.candidates_shape)
    resolution = (40.0, 4.0, 4.0)
    # A proximity-like map: smooth blobs, a few percent of voxels beyond +-0.3.
    noise = smooth_noise(np.random.default_rng(SEED), volume.raw.shape, np.array(resolution), 80.0)
    proximity = np.tanh(noise / 2.0).astype(np.float32)
    found, timing = _timed(
        lambda: generate_candidates(proximity, volume.neuron_ids, resolution), ctx.sizes.repeats
    )
    return [
        row(
            "host",
            "partner candidates (generate_candidates)",
            framework="numpy/scipy/cc3d",
            mode="op",
            shape=shape_text(proximity.shape),
            timing=timing,
            voxels_per_s=proximity.size / timing.median,
            candidates=int(len(found.pre_segment)),
        )
    ]


def section_pipelines(ctx: Context) -> list[dict]:
    """Prediction throughput of the partner and neuron pipelines on synthetic volumes."""
    try:
        from benchmarks import bench_blockwise_predict
    except ImportError:
        import bench_blockwise_predict

    from synjax.inference.slicewise import predict_slices
    from synjax.models.deepem3d import TOTAL_STRIDE, DeepEM3DNet, DeepEM3DSettings, make_apply_fn

    s = ctx.sizes
    rows = []
    r = bench_blockwise_predict.run_one(s.partners_volume, s.partners_block)
    rows.append(
        row(
            "pipeline",
            "partners: proximity U-Net, block runner (demo network, zarr in/out)",
            mode="pipeline",
            dtype="float32",
            shape=shape_text(r["shape"]),
            compile_s=r["compile_seconds"],
            median_s=r["seconds"] - r["compile_seconds"],
            repeats=1,
            voxels_per_s=float(np.prod(r["shape"])) / (r["seconds"] - r["compile_seconds"]),
            blocks=r["blocks"],
            runner_overhead=r["overhead"],
        )
    )
    settings = DeepEM3DSettings(slices=5, width=s.deepem3d_width)
    model = DeepEM3DNet(settings)
    init_x = jnp.zeros((1, 5, 32, 32, 1))
    apply_fn = make_apply_fn(model, jax.jit(model.init)(jax.random.key(SEED), init_x))
    raw = _synthetic_em(s.neurons_volume).raw

    def predict():
        return predict_slices(
            apply_fn, raw, slices=5, batch_size=2, tta=False, progress=False, stride=TOTAL_STRIDE
        )

    _, first = _timed(predict, 1)  # compiles the slice function
    _, timing = _timed(predict, 1)
    rows.append(
        row(
            "pipeline",
            f"neurons: DeepEM3D width {s.deepem3d_width:g} slice-wise, no TTA",
            mode="pipeline",
            dtype="float32",
            shape=shape_text(raw.shape),
            compile_s=first.median - timing.median,
            timing=timing,
            voxels_per_s=raw.size / timing.median,
        )
    )
    return rows


COLD_START_JAX = """
import time, json, sys
start = time.perf_counter()
import jax, jax.numpy as jnp, numpy as np
from synjax.models import UNet3D, UNet3DSettings
cfg = UNet3DSettings(**json.loads(sys.argv[1]))
x = jnp.asarray(np.random.default_rng(0).random((1, *json.loads(sys.argv[2]), 1), np.float32))
model = UNet3D(cfg)
params = jax.jit(model.init)(jax.random.key(0, impl=sys.argv[3]), x)["params"]
y = jax.block_until_ready(jax.jit(model.apply)({"params": params}, x))
print(json.dumps({"seconds": time.perf_counter() - start, "output": list(y.shape)}))
"""
# PRNG of the JAX cold start's parameter initialisation -> row name.
COLD_START_PRNGS = {
    "threefry2x32": "import -> first U-Net prediction",
    "unsafe_rbg": "import -> first U-Net prediction (unsafe_rbg init)",
}
COLD_START_TORCH = """
import time, json, sys
start = time.perf_counter()
import numpy as np, torch
sys.path.insert(0, sys.argv[3])
from torch_nets import build_torch_unet
fields = json.loads(sys.argv[1])
class Settings:
    depth = fields["depth"]; conv_kernels = fields["conv_kernels"]
    pool_factors = fields["pool_factors"]; padding = fields["padding"]
    upsample = fields["upsample"]; out_channels = fields["out_channels"]
    def features(self, level):
        return fields["features"][level]
model = build_torch_unet(Settings())
device = "cuda" if fields["cuda"] and torch.cuda.is_available() else "cpu"
model = model.to(device)
x = torch.from_numpy(np.random.default_rng(0).random((1, 1, *json.loads(sys.argv[2])), np.float32))
with torch.inference_mode():
    y = model(x.to(device)).cpu()
print(json.dumps({"seconds": time.perf_counter() - start, "output": list(y.shape)}))
"""


def section_cold_start(ctx: Context) -> list[dict]:
    """Import -> first U-Net prediction, each in a fresh Python process, JAX against PyTorch."""
    from synjax.models import UNet3DSettings

    if ctx.sizes.cold_start_output is None:
        fields = TINY_UNET
        cfg = UNet3DSettings(**fields)
        in_shape = cfg.valid_input_shape((2, 8, 8))
    else:
        fields = {}
        cfg = UNet3DSettings()
        in_shape = cfg.valid_input_shape(ctx.sizes.cold_start_output)
    env = {**os.environ, "PYTHONPATH": str(common.REPO_ROOT)}

    def run(script, *args):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", script, *args],
            cwd=common.REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"cold start child failed: {done.stderr.strip()[-500:]}")
        return json.loads(done.stdout.strip().splitlines()[-1]), wall

    shape = shape_text((1, *in_shape, 1))

    def cold_row(name, result, wall, **fields_):
        return row(
            "cold_start",
            name,
            mode="cold_start",
            dtype="float32",
            shape=shape,
            median_s=result["seconds"],
            repeats=1,
            process_wall_s=wall,
            **fields_,
        )

    rows = []
    # JAX's default PRNG (threefry, what config.train.prng_impl defaults to) and
    # the hardware-generator one: XLA:CPU compiles the paper U-Net's threefry
    # initialisation in ~5 s, its unsafe_rbg one in ~1 s.
    for impl, name in COLD_START_PRNGS.items():
        args = (json.dumps(fields), json.dumps(list(in_shape)), impl)
        rows.append(cold_row(name, *run(COLD_START_JAX, *args)))
    if ctx.torch:
        torch_fields = {
            "depth": cfg.depth,
            "conv_kernels": [list(k) for k in cfg.conv_kernels],
            "pool_factors": [list(p) for p in cfg.pool_factors],
            "padding": cfg.padding,
            "upsample": cfg.upsample,
            "out_channels": cfg.out_channels,
            "features": [cfg.features(lv) for lv in range(cfg.depth + 1)],
            "cuda": jax.default_backend() == "gpu",
        }
        script_dir = str(pathlib.Path(__file__).resolve().parent)
        tres, twall = run(
            COLD_START_TORCH, json.dumps(torch_fields), json.dumps(list(in_shape)), script_dir
        )
        import torch

        framework = f"torch-{torch.__version__}"
        name = "import -> first U-Net prediction"
        rows.append(cold_row(name, tres, twall, framework=framework))
        for jax_row in rows[: len(COLD_START_PRNGS)]:
            jax_row["best_torch_s"] = tres["seconds"]
            jax_row["jax_speedup_vs_torch"] = tres["seconds"] / jax_row["median_s"]
    return rows
