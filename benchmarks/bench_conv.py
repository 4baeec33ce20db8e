"""Benchmark of `Conv3D`'s implementations: single layers and whole U-Net train steps.

XLA's CPU 3D convolutions are slow; `Conv3D` can run a kz x ky x kx
convolution as 2D convolutions with z folded into the batch, either one conv
over the kz z-shifted copies stacked along channels ("folded") or the sum of
kz separate 2D convs ("folded_sum"). This times, after
`jax.block_until_ready` and with compile time reported apart:

- layers: gradient (w.r.t. input and params) of one Conv3D, per implementation;
- U-Nets: one train step (forward + backward + Adam) of `UNet3D`, per
  implementation ("native" = before: XLA 3D convs and transposed convs, as
  `nn.Conv` and `nn.ConvTranspose`; the others also run `Upsample`'s
  transposed conv as an einsum).

Run:

  .venv/bin/python benchmarks/bench_conv.py --repeats 5
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
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common

from synjax.models import UNet3D, UNet3DSettings, weighted_mse
from synjax.models.conv import Conv3D, auto_implementation

IMPLEMENTATIONS = ("native", "folded", "folded_sum")
SEED = 0
LEARNING_RATE = 1e-4
# (input [batch, z, y, x, c], features, kernel): the shapes of /tmp/prof_conv.py
# and wider layers like the U-Net's deeper levels.
LAYER_CASES = (
    ((2, 8, 64, 64, 8), 8, (1, 3, 3)),
    ((2, 8, 64, 64, 8), 8, (3, 3, 3)),
    ((2, 8, 64, 64, 16), 16, (3, 3, 3)),
    ((2, 8, 32, 32, 32), 32, (3, 3, 3)),
    ((2, 8, 64, 64, 8), 8, (3, 1, 1)),
)
SMALL_UNET = UNet3DSettings(
    depth=2,
    base_features=8,
    pool_factors=((1, 2, 2), (1, 2, 2)),
    conv_kernels=((1, 3, 3), (3, 3, 3), (3, 3, 3)),
    padding="SAME",
)
# The paper's regressor (depth 3, 24 features, valid 3x3x3) at a CPU-sized
# patch: the smallest valid input with an output of at least 4x16x16.
PAPER_UNET = UNet3DSettings()
PAPER_MIN_OUTPUT = (4, 16, 16)
COLUMNS = ("case", "impl", "compile_s", "step_s", "min_s", "speedup")


def bench_layer(shape, features, kernel, impl, repeats):
    """Times grad of sum(conv(x)^2) w.r.t. params and input."""
    x = jnp.asarray(np.random.default_rng(SEED).random(shape, np.float32))
    module = Conv3D(features, kernel, padding="SAME", implementation=impl)
    params = module.init(jax.random.key(SEED), x)
    grad = jax.jit(jax.grad(lambda p, v: jnp.sum(module.apply(p, v) ** 2), argnums=(0, 1)))
    compiled, compile_s = common.compile_jax(grad, params, x)
    return compile_s, common.time_calls(lambda: compiled(params, x), repeats)


def bench_unet_step(cfg, in_shape, impl, repeats):
    """Times one Adam train step of UNet3D with every Conv3D set to `impl`."""
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

    # The implementation is picked at trace time, so compile inside the block.
    with auto_implementation(impl):
        params = jax.jit(model.init)(jax.random.key(SEED), x)["params"]
        state = [params, tx.init(params)]
        step, compile_s = common.compile_jax(train_step, *state, x, target, weights)

    def run_step():
        state[0], state[1], loss = step(*state, x, target, weights)
        return loss

    return compile_s, common.time_calls(run_step, repeats)


def _summary(timing):
    return {"step_s": timing.median, "min_s": timing.min, "mean_s": timing.mean}


def add_speedups(rows):
    """Speed-up of each row over the "native" row of its case."""
    native = {r["case"]: r["step_s"] for r in rows if r["impl"] == "native"}
    for row in rows:
        row["speedup"] = native[row["case"]] / row["step_s"] if row["case"] in native else None
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS))
    parser.add_argument("--skip-paper", action="store_true", help="skip the paper-size U-Net")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "bench_conv.json"),
    )
    args = parser.parse_args(argv)

    layer_rows = []
    for shape, features, kernel in LAYER_CASES:
        case = f"{'x'.join(map(str, kernel))} {'x'.join(map(str, shape))}->{features}"
        for impl in args.impls:
            compile_s, timing = bench_layer(shape, features, kernel, impl, args.repeats)
            layer_rows.append(
                {"case": case, "impl": impl, "compile_s": compile_s, **_summary(timing)}
            )
            print(f"layer {case} {impl}: {timing.median:.4f} s", file=sys.stderr, flush=True)
    add_speedups(layer_rows)

    unets = [("small SAME 2x8x64x64", SMALL_UNET, (2, 8, 64, 64, 1))]
    if not args.skip_paper:
        in_zyx = PAPER_UNET.valid_input_shape(PAPER_MIN_OUTPUT)
        unets.append((f"paper VALID 1x{'x'.join(map(str, in_zyx))}", PAPER_UNET, (1, *in_zyx, 1)))
    unet_rows = []
    for case, cfg, in_shape in unets:
        for impl in args.impls:
            compile_s, timing = bench_unet_step(cfg, in_shape, impl, args.repeats)
            unet_rows.append(
                {"case": case, "impl": impl, "compile_s": compile_s, **_summary(timing)}
            )
            print(f"unet {case} {impl}: {timing.median:.4f} s", file=sys.stderr, flush=True)
    add_speedups(unet_rows)

    print("Conv3D layer, grad w.r.t. params and input (SAME):")
    print(common.format_table(layer_rows, COLUMNS))
    print("\nUNet3D train step (forward + backward + Adam):")
    print(common.format_table(unet_rows, COLUMNS))
    path = common.write_json(
        args.out,
        {
            "environment": common.environment(),
            "repeats": args.repeats,
            "layers": layer_rows,
            "unet_train_step": unet_rows,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
