"""Benchmark of the signed-proximity 3D U-Net: JAX/Flax against PyTorch.

Measures, per output patch size, inference throughput (output voxels / s) and
the time of one training step (forward + backward + Adam update), with JAX's
compile time reported apart from steady state. The same network is built in
PyTorch (same layers, shapes and parameter count; weights copied and outputs
compared) and timed in the same process on the same CPU threads, so the
JAX / PyTorch ratio is like for like. Without torch installed, only JAX runs.

Run (CPU-sized patch; the paper's patch is 4x228x228 output = 32x316x316 input):

  .venv/bin/python benchmarks/bench_unet.py --sizes 4x64x64 --repeats 5
  .venv/bin/python benchmarks/bench_unet.py --sizes 4x228x228 --repeats 2
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from benchmarks import common
    from benchmarks.torch_nets import build_torch_unet, load_flax_params, time_torch
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common
    from torch_nets import build_torch_unet, load_flax_params, time_torch

from synjax.models import UNet3D, UNet3DSettings, weighted_mse

LEARNING_RATE = 1e-4
# Inputs are normalised EM intensities; the exact values do not change timing.
SEED = 0
# Outputs of the two frameworks must agree to this (float32, relative to max |y|).
MAX_RELATIVE_DIFF = 1e-3
# On a GPU both frameworks compute float32 convolutions in TF32 by default
# (10-bit mantissa), each with its own kernels: agreement is looser.
MAX_RELATIVE_DIFF_TF32 = 2e-2
COLUMNS = (
    "framework",
    "input",
    "output",
    "infer_compile_s",
    "infer_s",
    "voxels_per_s",
    "train_compile_s",
    "train_step_s",
)


def parse_size(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.lower().split("x"))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"size {text!r}; expected ZxYxX")
    return parts


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def bench_jax(cfg, in_shape, batch, repeats, dtype):
    """Times inference and one Adam train step of the Flax U-Net."""
    model = UNet3D(cfg)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.random((batch, *in_shape, 1), np.float32), dtype)
    out_shape = cfg.output_shape(x.shape)
    target = jnp.asarray(rng.uniform(-1, 1, out_shape).astype(np.float32))
    weights = jnp.ones(out_shape, jnp.float32)
    params = jax.jit(model.init)(jax.random.key(SEED), x)["params"]

    infer, infer_compile = common.compile_jax(
        jax.jit(lambda p, v: model.apply({"params": p}, v)), params, x
    )
    infer_timing = common.time_calls(lambda: infer(params, x), repeats)

    tx = optax.adam(LEARNING_RATE)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, v, t, w):
        loss, grads = jax.value_and_grad(
            lambda q: weighted_mse(model.apply({"params": q}, v), t, w)
        )(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    state = [jax.tree.map(jnp.copy, params), tx.init(params)]
    step, train_compile = common.compile_jax(train_step, *state, x, target, weights)

    def run_step():
        state[0], state[1], loss = step(*state, x, target, weights)
        return loss

    train_timing = common.time_calls(run_step, repeats)
    return {
        "params": params,
        "x": x,
        "output_shape": out_shape,
        "infer_compile_s": infer_compile,
        "infer": infer_timing,
        "infer_flops": common.flops(infer),
        "train_compile_s": train_compile,
        "train": train_timing,
        "train_flops": common.flops(step),
        "n_params": count_params(params),
        "y": np.asarray(infer(params, x), np.float32),
    }


def torch_device() -> str:
    """PyTorch's device for a like-for-like comparison: CUDA when JAX runs on a GPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def bench_torch(cfg, jax_result, repeats, threads, channels_last=False, bf16=False):
    """Times the PyTorch twin with the Flax weights copied in (same device kind as JAX).

    Args:
      channels_last: run in channels_last_3d memory format (PyTorch's fastest
        3D layout on CPU) rather than NCDHW.
      bf16: bfloat16 autocast (float32 weights and accumulation).
    """
    import torch

    torch.set_num_threads(threads)
    device = torch_device()
    model = build_torch_unet(cfg)
    load_flax_params(model, jax_result["params"], cfg)
    model = model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    x_numpy = np.asarray(jax_result["x"], np.float32).transpose(0, 4, 1, 2, 3)
    with torch.inference_mode():
        y = model(torch.from_numpy(x_numpy.copy()).to(device)).cpu().numpy()
    y_jax = jax_result["y"]
    y = y.transpose(0, 2, 3, 4, 1)
    rel_diff = float(np.abs(y - y_jax).max() / max(np.abs(y_jax).max(), 1e-12))
    out_shape = jax_result["output_shape"]
    target = torch.rand(out_shape[0], 1, *out_shape[1:4], device=device) * 2 - 1
    weights = torch.ones_like(target)

    def loss(output):
        return (weights * (output - target) ** 2).sum() / weights.sum()

    timed = time_torch(
        model,
        x_numpy,
        loss,
        repeats,
        channels_last=channels_last,
        bf16=bf16,
        device=device,
        threads=threads,
        learning_rate=LEARNING_RATE,
    )
    return {**timed, "n_params": n_params, "max_rel_diff": rel_diff}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4x64x64", help="comma-separated ZxYxX minimum outputs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--base-features", type=int, default=24)
    parser.add_argument("--feature-growth", type=int, default=2)
    parser.add_argument("--upsample", choices=("transpose", "resize_conv"), default="transpose")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-torch", action="store_true", help="time JAX only")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/bench_unet.json")
    args = parser.parse_args(argv)

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    cfg = UNet3DSettings(
        base_features=args.base_features,
        feature_growth=args.feature_growth,
        upsample=args.upsample,
    )
    torch_available = not args.no_torch
    if torch_available:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch is not installed: timing JAX only", file=sys.stderr)
            torch_available = False
    if torch_available and jax.default_backend() != "cpu" and torch_device() == "cpu":
        print("JAX runs on an accelerator, PyTorch has none: PyTorch is skipped", file=sys.stderr)
        torch_available = False

    env = common.environment()
    rows, records = [], []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        in_shape = cfg.valid_input_shape(size)
        res = bench_jax(cfg, in_shape, args.batch, args.repeats, dtype)
        out = res["output_shape"]
        voxels = int(np.prod(out[:4]))
        row = {
            "framework": f"jax-{env['backend']}",
            "input": "x".join(map(str, in_shape)),
            "output": "x".join(map(str, out[1:4])),
            "infer_compile_s": res["infer_compile_s"],
            "infer_s": res["infer"].median,
            "voxels_per_s": voxels / res["infer"].median,
            "train_compile_s": res["train_compile_s"],
            "train_step_s": res["train"].median,
        }
        rows.append(row)
        record = {
            **row,
            "n_params": res["n_params"],
            "infer": res["infer"].as_dict(),
            "train": res["train"].as_dict(),
        }
        if torch_available:
            tres = bench_torch(cfg, res, args.repeats, args.threads)
            if tres["n_params"] != res["n_params"]:
                raise RuntimeError(f"parameter counts differ: {tres['n_params']} vs jax")
            tolerance = MAX_RELATIVE_DIFF if tres["device"] == "cpu" else MAX_RELATIVE_DIFF_TF32
            if args.dtype == "float32" and tres["max_rel_diff"] > tolerance:
                raise RuntimeError(f"outputs differ: max relative diff {tres['max_rel_diff']}")
            trow = {
                **row,
                "framework": f"torch-{tres['version']}-"
                + (f"{tres['threads']}thr" if tres["device"] == "cpu" else "cuda"),
                "infer_compile_s": None,
                "infer_s": tres["infer"].median,
                "voxels_per_s": voxels / tres["infer"].median,
                "train_compile_s": None,
                "train_step_s": tres["train"].median,
            }
            rows.append(trow)
            record["torch"] = {
                **trow,
                "n_params": tres["n_params"],
                "max_rel_diff_vs_jax": tres["max_rel_diff"],
                "infer": tres["infer"].as_dict(),
                "train": tres["train"].as_dict(),
            }
            record["ratio_jax_over_torch"] = {
                "infer_time": row["infer_s"] / trow["infer_s"],
                "train_step_time": row["train_step_s"] / trow["train_step_s"],
            }
        records.append(record)

    print(common.format_table(rows, COLUMNS))
    for rec in records:
        if "ratio_jax_over_torch" in rec:
            r = rec["ratio_jax_over_torch"]
            print(
                f"output {rec['output']}: time JAX / PyTorch = {r['infer_time']:.2f} (inference), "
                f"{r['train_step_time']:.2f} (train step); <1 means JAX is faster; "
                f"params {rec['n_params']} both, max rel. output diff "
                f"{rec['torch']['max_rel_diff_vs_jax']:.1e}"
            )
    payload = {
        "benchmark": "bench_unet",
        "environment": env,
        "config": {
            "base_features": cfg.base_features,
            "feature_growth": cfg.feature_growth,
            "depth": cfg.depth,
            "pool_factors": cfg.pool_factors,
            "conv_kernels": cfg.conv_kernels,
            "padding": cfg.padding,
            "upsample": cfg.upsample,
            "dtype": args.dtype,
            "batch": args.batch,
            "repeats": args.repeats,
        },
        "torch": torch_available,
        "results": records,
    }
    print(f"wrote {common.write_json(args.out, payload)}")


if __name__ == "__main__":
    main()
