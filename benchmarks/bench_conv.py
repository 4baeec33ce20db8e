"""Benchmark of `Conv3D`'s implementations: single layers and whole U-Nets.

XLA's CPU 3D convolutions, and above all their gradients, are slow. `Conv3D`
can run a kz x ky x kx convolution as 2D convolutions with z folded into the
batch ("folded": one conv over the kz z-shifted copies stacked along channels;
"folded_sum": the sum of kz 2D convs), or as matrix products over the kernel's
taps with a hand-written backward pass ("taps", `models/conv_taps.py`), or
call oneDNN's convolutions through an FFI call ("onednn",
`models/conv_onednn.py`, what "auto" and "fastest" take on CPU where it could
be built); without oneDNN, "fastest" is the measured choice per backend among
the XLA paths (the JSON in benchmarks/results predates "onednn"). This times, after
`jax.block_until_ready` and with compile time reported apart:

- layers: forward, and gradient w.r.t. params and input, of one Conv3D;
- U-Nets: inference and one train step (forward + backward + Adam) of
  `UNet3D` with every Conv3D set to the implementation ("native" = XLA 3D
  convs and transposed convs, as `nn.Conv` and `nn.ConvTranspose`; the others
  also run `Upsample`'s transposed conv as an einsum), at float32 and
  optionally bfloat16 compute; the paper U-Net at the paper's configuration
  (output 4x68x68 from input 32x156x156). GFLOP/s use the forward FLOPs of
  XLA's cost analysis of the "native" network (the same arithmetic for all).
  The PyTorch twin of `bench_unet.py` runs in the same process when torch is
  installed (float32, NCDHW).

Run:

  .venv/bin/python benchmarks/bench_conv.py --repeats 3
  .venv/bin/python benchmarks/bench_conv.py --skip-layers --dtypes float32 bfloat16
  .venv/bin/python benchmarks/bench_conv.py --network-layers --repeats 3

The last times the Conv3D layers of every synjax network (`NETWORK_LAYERS`), in
turn per layer, with what "fastest" picks for each, and the max pooling
(`POOL_CASES`), into results/bench_conv_layers.json: the measurements behind
`conv.resolve_implementation`'s rule and the "blocks" max pool.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

try:
    from benchmarks import bench_unet, common
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import bench_unet
    import common

from synjax.models import UNet3D, UNet3DSettings, weighted_mse
from synjax.models.conv import Conv3D, auto_implementation, resolve_implementation
from synjax.models.layers import max_pool3d

IMPLEMENTATIONS = ("native", "folded", "folded_sum", "folded_taps", "taps", "onednn", "fastest")
SEED = 0
LEARNING_RATE = 1e-4
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# (input [batch, z, y, x, c], features, kernel, padding): small-channel SAME
# layers, and the VALID 3x3x3 layers of the paper U-Net at its x-y sizes
# (z cut to 10 to keep the benchmark short).
LAYER_CASES = (
    ((2, 8, 64, 64, 8), 8, (1, 3, 3), "SAME"),
    ((2, 8, 64, 64, 8), 8, (3, 3, 3), "SAME"),
    ((2, 8, 64, 64, 8), 8, (3, 1, 1), "SAME"),
    ((1, 10, 156, 156, 1), 24, (3, 3, 3), "VALID"),
    ((1, 10, 154, 154, 24), 24, (3, 3, 3), "VALID"),
    ((1, 10, 74, 74, 72), 72, (3, 3, 3), "VALID"),
    ((1, 10, 34, 34, 216), 216, (3, 3, 3), "VALID"),
    ((1, 10, 14, 14, 648), 648, (3, 3, 3), "VALID"),
    ((1, 10, 48, 48, 144), 72, (3, 3, 3), "VALID"),
)
SMALL_UNET = UNet3DSettings(
    depth=2,
    base_features=8,
    pool_factors=((1, 2, 2), (1, 2, 2)),
    conv_kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
    padding="SAME",
)
# The paper's regressor (depth 3, 24 features, valid 3x3x3) in the paper's
# configuration: input 32x156x156 -> output 4x68x68 (87 GFLOP forward).
PAPER_UNET = UNet3DSettings()
PAPER_MIN_OUTPUT = (4, 64, 64)
# Conv3D layers (stride 1) of every synjax 3D network, as traced (jax.eval_shape of the train
# steps of bench_mask_rcnn.py and bench_instance_unet.py, the configs' model settings) in their
# default configurations: (network, input [batch, z, y, x, c], features, kernel, padding,
# count in one forward pass). Train-step batches; inference runs the same layers at batch 1.
NETWORK_LAYERS = (
    # Mask R-CNN, configs/fluorescence.py "default" (ResNet-18 + FPN, patch 32x96x96, batch 2).
    ("mask_rcnn", (2, 32, 24, 24, 8), 8, (3, 3, 3), "SAME", 4),
    ("mask_rcnn", (2, 32, 12, 12, 16), 16, (3, 3, 3), "SAME", 3),
    ("mask_rcnn", (2, 16, 6, 6, 32), 32, (3, 3, 3), "SAME", 4),
    ("mask_rcnn", (2, 8, 3, 3, 64), 64, (3, 3, 3), "SAME", 3),
    ("mask_rcnn", (2, 32, 24, 24, 32), 32, (3, 3, 3), "SAME", 2),
    ("mask_rcnn", (2, 32, 12, 12, 32), 32, (3, 3, 3), "SAME", 1),
    ("mask_rcnn", (2, 32, 24, 24, 8), 32, (1, 1, 1), "SAME", 1),
    ("mask_rcnn", (2, 32, 24, 24, 32), 18, (1, 1, 1), "SAME", 1),
    ("mask_rcnn", (256, 3, 7, 7, 32), 64, (3, 7, 7), "VALID", 1),
    ("mask_rcnn", (256, 1, 1, 1, 64), 64, (1, 1, 1), "VALID", 1),
    ("mask_rcnn", (128, 2, 7, 7, 32), 16, (3, 3, 3), "SAME", 1),
    ("mask_rcnn", (128, 4, 14, 14, 16), 1, (3, 3, 3), "SAME", 1),
    # Instance U-Net, configs/vnc.py "default" (8 features, pools (1,2,2)x3 + (2,2,2),
    # crops 8x128x128, batch 2).
    ("instance_unet", (2, 8, 128, 128, 1), 8, (3, 3, 3), "SAME", 1),
    ("instance_unet", (2, 8, 128, 128, 8), 8, (3, 3, 3), "SAME", 2),
    ("instance_unet", (2, 8, 64, 64, 16), 16, (3, 3, 3), "SAME", 2),
    ("instance_unet", (2, 8, 32, 32, 32), 32, (3, 3, 3), "SAME", 3),
    ("instance_unet", (2, 8, 16, 16, 64), 64, (3, 3, 3), "SAME", 2),
    ("instance_unet", (2, 4, 8, 8, 128), 128, (3, 3, 3), "SAME", 1),
    ("instance_unet", (2, 8, 128, 128, 16), 8, (3, 3, 3), "SAME", 1),
    ("instance_unet", (2, 8, 128, 128, 8), 1, (1, 1, 1), "SAME", 1),
    ("instance_unet", (128, 3, 7, 7, 32), 64, (3, 7, 7), "VALID", 1),
    ("instance_unet", (64, 4, 28, 28, 16), 1, (3, 3, 3), "SAME", 1),
    # Pruning CNN, configs/demo.py (window 8x64x64, 4 channels, batch 16).
    ("pruning", (16, 8, 64, 64, 4), 16, (3, 3, 3), "SAME", 1),
    ("pruning", (16, 8, 32, 32, 16), 32, (3, 3, 3), "SAME", 1),
    ("pruning", (16, 8, 16, 16, 32), 64, (3, 3, 3), "SAME", 1),
    ("pruning", (16, 4, 8, 8, 64), 64, (3, 3, 3), "SAME", 1),
    ("pruning", (16, 2, 4, 4, 64), 128, (3, 3, 3), "SAME", 1),
    # Partner U-Net, configs/demo.py (depth 2, 8 features, kernels 1x3x3 then
    # 3x3x3, SAME, 8x64x64, batch 4).
    ("unet_demo", (4, 8, 64, 64, 1), 8, (1, 3, 3), "SAME", 1),
    ("unet_demo", (4, 8, 64, 64, 8), 8, (1, 3, 3), "SAME", 2),
    ("unet_demo", (4, 8, 32, 32, 16), 16, (3, 3, 3), "SAME", 3),
    ("unet_demo", (4, 8, 16, 16, 32), 32, (3, 3, 3), "SAME", 2),
    # Partner U-Net, paper (VALID 3x3x3; z cut to 10 to keep the benchmark short).
    ("unet_paper", (1, 10, 156, 156, 1), 24, (3, 3, 3), "VALID", 1),
    ("unet_paper", (1, 10, 154, 154, 24), 24, (3, 3, 3), "VALID", 1),
    ("unet_paper", (1, 10, 74, 74, 72), 72, (3, 3, 3), "VALID", 1),
    ("unet_paper", (1, 10, 34, 34, 216), 216, (3, 3, 3), "VALID", 1),
    ("unet_paper", (1, 10, 14, 14, 648), 648, (3, 3, 3), "VALID", 1),
)
# "fastest" is not timed apart: per layer it is the implementation it resolves to.
NETWORK_IMPLEMENTATIONS = ("native", "folded", "folded_taps", "taps", "onednn")
# Max-pool inputs (window = stride) of the networks: paper U-Net, instance U-Net,
# pruning CNN.
POOL_CASES = (
    ((1, 28, 152, 152, 24), (1, 2, 2)),
    ((1, 24, 72, 72, 72), (1, 2, 2)),
    ((2, 8, 128, 128, 8), (1, 2, 2)),
    ((2, 8, 16, 16, 64), (2, 2, 2)),
    ((16, 8, 64, 64, 16), (1, 2, 2)),
)
LAYER_COLUMNS = ("case", "impl", "fwd_s", "grad_s", "grad_compile_s", "fwd_speedup", "grad_speedup")
UNET_COLUMNS = (
    "case",
    "dtype",
    "impl",
    "infer_compile_s",
    "infer_s",
    "infer_gflops",
    "train_compile_s",
    "train_step_s",
    "infer_speedup",
    "train_speedup",
)


def bench_layer(shape, features, kernel, padding, impl, repeats):
    """Times the forward pass and grad of sum(conv(x)^2) w.r.t. params and input."""
    x = jnp.asarray(np.random.default_rng(SEED).random(shape, np.float32))
    module = Conv3D(features, kernel, padding=padding, implementation=impl)
    params = jax.jit(module.init)(jax.random.key(SEED), x)
    forward, _ = common.compile_jax(jax.jit(module.apply), params, x)
    grad = jax.jit(jax.grad(lambda p, v: jnp.sum(module.apply(p, v) ** 2), argnums=(0, 1)))
    compiled, compile_s = common.compile_jax(grad, params, x)
    return {
        "fwd_s": common.time_calls(lambda: forward(params, x), repeats).median,
        "grad_s": common.time_calls(lambda: compiled(params, x), repeats).median,
        "grad_compile_s": compile_s,
    }


def _interleaved(calls: dict, repeats: int) -> dict:
    """Fastest of `repeats` timed calls of each callable, taken in turn (A, B, A, B, ...).

    On a shared machine the load changes from second to second; taking the
    candidates in turn exposes them to the same load, and the minimum is the
    least disturbed call.
    """
    times = {name: [] for name in calls}
    for call in calls.values():
        jax.block_until_ready(call())  # warm-up
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def bench_network_layers(impls, repeats, networks=None):
    """Forward and grad (w.r.t. params and input) of every network's Conv3D layers.

    Returns:
      One row per layer: its shape, the implementation "fastest" resolves to,
      and `{impl}_fwd_s` / `{impl}_grad_s`, the implementations timed in turn.
    """
    rows = []
    for network, shape, features, kernel, padding, count in NETWORK_LAYERS:
        if networks and network not in networks:
            continue
        x = jnp.asarray(np.random.default_rng(SEED).random(shape, np.float32))
        calls = {}
        for impl in impls:
            module = Conv3D(features, kernel, padding=padding, implementation=impl)
            params = jax.jit(module.init)(jax.random.key(SEED), x)
            forward = jax.jit(module.apply).lower(params, x).compile()
            loss = functools.partial(lambda m, p, v: jnp.sum(m.apply(p, v) ** 2), module)
            grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
            calls[f"{impl}_fwd_s"] = functools.partial(forward, params, x)
            calls[f"{impl}_grad_s"] = functools.partial(grad, params, x)
        row = {
            "network": network,
            "input": list(shape),
            "features": features,
            "kernel": list(kernel),
            "padding": padding,
            "count": count,
            "fastest_is": resolve_implementation(
                "fastest", shape[-1], input_shape=shape, kernel_size=kernel, padding=padding
            ),
            **_interleaved(calls, repeats),
        }
        rows.append(row)
        print(
            f"{network} {shape}->{features} {kernel} {padding}: "
            + ", ".join(f"{i} {row[i + '_fwd_s']:.4f}/{row[i + '_grad_s']:.4f}" for i in impls)
            + f" s (fwd/grad); fastest = {row['fastest_is']}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def network_totals(rows, impls):
    """Per network and implementation: the layers' times weighted by their counts.

    The "fastest" row sums, per layer, the time of the implementation it
    resolves to ("n/a" when that one was not timed).
    """
    totals = []
    for network in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == network]
        for impl in (*impls, "fastest"):
            row = {"network": network, "impl": impl}
            for what in ("fwd_s", "grad_s"):
                keys = [f"{r['fastest_is'] if impl == 'fastest' else impl}_{what}" for r in mine]
                known = all(k in r for k, r in zip(keys, mine, strict=True))
                row[what] = (
                    sum(r["count"] * r[k] for k, r in zip(keys, mine, strict=True))
                    if known
                    else None
                )
            totals.append(row)
    return totals


def bench_pooling(repeats):
    """Max pooling forward and grad of sum(pool(x)^2): nn.max_pool against max_pool_blocks."""
    rows = []
    for shape, factors in POOL_CASES:
        x = jnp.asarray(np.random.default_rng(SEED).random(shape, np.float32))
        calls = {}
        for impl in ("xla", "blocks"):
            pool = functools.partial(max_pool3d, factors=factors, implementation=impl)
            forward = jax.jit(pool).lower(x).compile()
            grad = jax.jit(jax.grad(lambda v, f=pool: jnp.sum(f(v) ** 2))).lower(x).compile()
            calls[f"{impl}_fwd_s"] = functools.partial(forward, x)
            calls[f"{impl}_grad_s"] = functools.partial(grad, x)
        row = {"input": list(shape), "factors": list(factors), **_interleaved(calls, repeats)}
        rows.append(row)
        print(f"pool {shape} {factors}: {row}", file=sys.stderr, flush=True)
    return rows


def _flops(compiled) -> float | None:
    """Floating-point operations of a compiled executable (XLA's cost analysis)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def bench_unet(cfg, in_shape, impl, repeats):
    """Times inference and one Adam train step of UNet3D with every Conv3D set to `impl`.

    Returns:
      Timings, compile seconds, the forward FLOPs of XLA's cost analysis and
      what `bench_unet.bench_torch` needs to run the PyTorch twin.
    """
    model = UNet3D(cfg)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.random(in_shape, np.float32))
    out_shape = cfg.output_shape(x.shape)
    target = jnp.asarray(rng.uniform(-1, 1, out_shape).astype(np.float32))
    weights = jnp.ones(out_shape, jnp.float32)
    tx = optax.adam(LEARNING_RATE)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, opt_state, v, t, w):
        loss, grads = jax.value_and_grad(
            lambda q: weighted_mse(model.apply({"params": q}, v), t, w)
        )(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    # The implementation is picked at trace time, so compile inside the block
    # ("auto" is each backend's default: no override).
    override = auto_implementation(impl) if impl != "auto" else contextlib.nullcontext()
    with override:
        params = jax.jit(model.init)(jax.random.key(SEED), x)["params"]
        infer, infer_compile_s = common.compile_jax(
            jax.jit(lambda p, v: model.apply({"params": p}, v)), params, x
        )
        state = [jax.tree.map(jnp.copy, params), tx.init(params)]
        step, train_compile_s = common.compile_jax(train_step, *state, x, target, weights)

    def run_step():
        state[0], state[1], loss = step(*state, x, target, weights)
        return loss

    return {
        "infer_compile_s": infer_compile_s,
        "infer": common.time_calls(lambda: infer(params, x), repeats),
        "train_compile_s": train_compile_s,
        "train": common.time_calls(run_step, repeats),
        "flops": common.flops(infer),
        "params": params,
        "x": x,
        "output_shape": out_shape,
        "y": np.asarray(infer(params, x), np.float32),
    }


def add_speedups(rows, keys):
    """Speed-up of each row over the "native" row of its case (and dtype), per timed key."""
    for key, speedup in keys:
        native = {
            (r["case"], r.get("dtype")): r[key] for r in rows if r["impl"] == "native" and r[key]
        }
        for row in rows:
            base = native.get((row["case"], row.get("dtype")))
            row[speedup] = base / row[key] if base and row[key] else None
    return rows


def torch_rows(cfg, case, result, repeats, threads):
    """The PyTorch twin (float32, NCDHW) timed like `bench_unet.py`; [] without torch."""
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: no PyTorch reference", file=sys.stderr)
        return []
    tres = bench_unet.bench_torch(cfg, result, repeats, threads)
    if tres["max_rel_diff"] > bench_unet.MAX_RELATIVE_DIFF:
        raise RuntimeError(f"PyTorch and JAX outputs differ: {tres['max_rel_diff']}")
    return [
        {
            "case": case,
            "dtype": "float32",
            "impl": f"torch-{tres['version']}-{tres['threads']}thr",
            "infer_s": tres["infer"].median,
            "train_step_s": tres["train"].median,
        }
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["float32"])
    parser.add_argument("--skip-layers", action="store_true", help="skip the single layers")
    parser.add_argument("--skip-small", action="store_true", help="skip the small U-Net")
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-size U-Net")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "bench_conv.json"),
    )
    parser.add_argument(
        "--network-layers",
        action="store_true",
        help="time every network's Conv3D layers (NETWORK_LAYERS) and the max pooling only",
    )
    parser.add_argument("--networks", nargs="+", help="with --network-layers: only these")
    args = parser.parse_args(argv)
    if args.network_layers:
        _main_network_layers(args)
        return

    layer_rows = []
    for shape, features, kernel, padding in () if args.skip_layers else LAYER_CASES:
        case = f"{'x'.join(map(str, kernel))} {padding} {'x'.join(map(str, shape))}->{features}"
        for impl in args.impls:
            row = {
                "case": case,
                "impl": impl,
                **bench_layer(shape, features, kernel, padding, impl, args.repeats),
            }
            layer_rows.append(row)
            print(
                f"layer {case} {impl}: fwd {row['fwd_s']:.4f} s, grad {row['grad_s']:.4f} s",
                file=sys.stderr,
                flush=True,
            )
    add_speedups(layer_rows, (("fwd_s", "fwd_speedup"), ("grad_s", "grad_speedup")))

    unets = [] if args.skip_small else [("small SAME 2x8x64x64", SMALL_UNET, (2, 8, 64, 64, 1))]
    if not args.skip_paper:
        in_zyx = PAPER_UNET.valid_input_shape(PAPER_MIN_OUTPUT)
        unets.append((f"paper VALID 1x{'x'.join(map(str, in_zyx))}", PAPER_UNET, (1, *in_zyx, 1)))
    unet_rows = []
    for case, base_cfg, in_shape in unets:
        flops = None
        for dtype_name in args.dtypes:
            cfg = dataclasses.replace(base_cfg, dtype=DTYPES[dtype_name])
            for impl in args.impls:
                res = bench_unet(cfg, in_shape, impl, args.repeats)
                flops = res["flops"] if impl == "native" and dtype_name == "float32" else flops
                unet_rows.append(
                    {
                        "case": case,
                        "dtype": dtype_name,
                        "impl": impl,
                        "infer_compile_s": res["infer_compile_s"],
                        "infer_s": res["infer"].median,
                        "train_compile_s": res["train_compile_s"],
                        "train_step_s": res["train"].median,
                        "infer": res["infer"].as_dict(),
                        "train": res["train"].as_dict(),
                    }
                )
                print(
                    f"unet {case} {dtype_name} {impl}: infer {res['infer'].median:.3f} s, "
                    f"train {res['train'].median:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
                if impl == "native" and dtype_name == "float32" and not args.no_torch:
                    unet_rows += torch_rows(base_cfg, case, res, args.repeats, args.threads)
        for row in unet_rows:
            if row["case"] == case:
                row["forward_flops"] = flops
                row["infer_gflops"] = flops / row["infer_s"] / 1e9 if flops else None
    add_speedups(unet_rows, (("infer_s", "infer_speedup"), ("train_step_s", "train_speedup")))

    if layer_rows:
        print("Conv3D layer (float32): forward; grad w.r.t. params and input:")
        print(common.format_table(layer_rows, LAYER_COLUMNS))
    if unet_rows:
        print("\nUNet3D inference and train step (forward + backward + Adam):")
        print(common.format_table(unet_rows, UNET_COLUMNS))
    path = common.write_json(
        args.out,
        {
            "benchmark": "bench_conv",
            "environment": common.environment(),
            "command": " ".join(sys.argv),
            "repeats": args.repeats,
            "layers": layer_rows,
            "unet": unet_rows,
        },
    )
    print(f"\nwrote {path}")


def _main_network_layers(args):
    """--network-layers: per-layer times of every network, their weighted sums, pooling."""
    impls = [i for i in args.impls if i in NETWORK_IMPLEMENTATIONS] or NETWORK_IMPLEMENTATIONS
    rows = bench_network_layers(impls, args.repeats, args.networks)
    totals = network_totals(rows, impls)
    pool_rows = bench_pooling(args.repeats)
    print("Conv3D layers of each network, weighted by their counts (float32, seconds):")
    print(common.format_table(totals, ("network", "impl", "fwd_s", "grad_s")))
    print("\nMax pooling, window = stride (float32, seconds):")
    pool_columns = ("xla_fwd_s", "blocks_fwd_s", "xla_grad_s", "blocks_grad_s")
    print(common.format_table(pool_rows, ("input", "factors", *pool_columns)))
    out = args.out
    if out.endswith("bench_conv.json"):
        out = out.replace("bench_conv.json", "bench_conv_layers.json")
    path = common.write_json(
        out,
        {
            "benchmark": "bench_conv --network-layers",
            "environment": common.environment(),
            "load_average": os.getloadavg(),
            "command": " ".join(sys.argv),
            "repeats": args.repeats,
            "layers": rows,
            "network_totals": totals,
            "pooling": pool_rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
