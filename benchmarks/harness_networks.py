"""`run_all.py`'s network sections: the matmul peak, one convolution, the U-Net,
the pruning CNN and DeepEM3D-Net against their PyTorch twins, the 3D Mask
R-CNN and the EM instance U-Net."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

try:
    from benchmarks import bench_unet, common, torch_nets
    from benchmarks.harness_base import SEED, TINY_UNET, Context, row, shape_text
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import bench_unet
    import common
    import torch_nets
    from harness_base import SEED, TINY_UNET, Context, row, shape_text


def section_peak(ctx: Context) -> list[dict]:
    rows = []
    cpu = jax.default_backend() == "cpu"
    size = ctx.sizes.matmul if cpu else ctx.sizes.matmul_accelerator
    for dtype in ("float32", "bfloat16"):
        # The best of many calls: on a shared machine a few calls may all be slowed down.
        res = common.matmul_peak(dtype, size, max(ctx.sizes.repeats, 10))
        ctx.peaks[dtype] = res["flop_per_s"]
        n = res["size"]
        rows.append(
            row(
                "peak",
                f"matmul {n}x{n}x{n}" + (" (f32 accumulation)" if dtype == "bfloat16" else ""),
                mode="op",
                dtype=dtype,
                shape=f"{n}x{n}",
                compile_s=res["compile_s"],
                timing=res["timing"],
                flops=res["flops"],
                # The peak is the best call: the fraction of a row is against this.
                peak_flop_per_s=res["flop_per_s"],
            )
        )
    return rows


def section_conv(ctx: Context) -> list[dict]:
    """One VALID 3x3x3 convolution, no bias: 2 * output voxels * 27 * c_in * c_out FLOPs."""
    shape, features = ctx.sizes.conv
    rng = np.random.default_rng(SEED)
    rows = []
    for dtype in ("float32", "bfloat16"):
        x = jnp.asarray(rng.random(shape, np.float32), dtype)
        kernel = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], features)), dtype)

        def conv(v, k):
            return jax.lax.conv_general_dilated(
                v,
                k,
                (1, 1, 1),
                "VALID",
                dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                preferred_element_type=jnp.float32,
            )

        compiled, compile_s = common.compile_jax(jax.jit(conv), x, kernel)
        timing = common.time_calls(lambda c=compiled, v=x, k=kernel: c(v, k), ctx.sizes.repeats)
        rows.append(
            row(
                "conv",
                f"conv 3x3x3 VALID {shape[-1]}->{features}",
                mode="infer",
                dtype=dtype,
                shape=shape_text(shape),
                compile_s=compile_s,
                timing=timing,
                flops=common.flops(compiled),
                output_shape=list(compiled(x, kernel).shape),
            )
        )
    return rows


def _torch_rows(section, name, ctx, build, x_numpy, loss, jax_rows, shape) -> list[dict]:
    """PyTorch rows of one network (three layouts/precisions) and JAX's speed-up over the best.

    `build()` makes a fresh model for each variant (the train steps change its
    weights). The speed-up (best PyTorch median / JAX median, > 1: JAX faster)
    is written on the JAX rows of the same mode and precision: float32 against
    the best float32 PyTorch layout, bfloat16 against bfloat16 autocast.
    """
    if not ctx.torch:
        return []
    device = bench_unet.torch_device()
    rows = []
    for channels_last, bf16 in ((False, False), (True, False), (True, True)):
        res = torch_nets.time_torch(
            build(),
            x_numpy,
            loss,
            ctx.sizes.repeats,
            channels_last=channels_last,
            bf16=bf16,
            device=device,
            threads=ctx.threads if device == "cpu" else None,
        )
        for mode in ("infer", "train"):
            rows.append(
                row(
                    section,
                    name,
                    framework=f"torch-{res['version']}",
                    mode=mode,
                    dtype="bfloat16" if bf16 else "float32",
                    layout=res["layout"],
                    shape=shape,
                    timing=res[mode],
                    threads=res["threads"],
                    device=res["device"],
                )
            )
    for jrow in jax_rows:
        same = [
            r["median_s"] for r in rows if r["mode"] == jrow["mode"] and r["dtype"] == jrow["dtype"]
        ]
        if same:
            jrow["best_torch_s"] = min(same)
            jrow["jax_speedup_vs_torch"] = min(same) / jrow["median_s"]
    # The PyTorch rows' FLOP/s: the same arithmetic as JAX's row of the mode.
    flops = {r["mode"]: r.get("flops") for r in jax_rows if r["dtype"] == "float32"}
    for r in rows:
        r["flops"] = flops.get(r["mode"])
    return rows


def _network_rows(section, name, res, dtype, shape, output_voxels=None) -> list[dict]:
    rows = []
    for mode in ("infer", "train"):
        rows.append(
            row(
                section,
                name,
                mode=mode,
                dtype=dtype,
                shape=shape,
                compile_s=res[f"{mode}_compile_s"],
                timing=res[mode],
                flops=res[f"{mode}_flops"],
            )
        )
    if output_voxels:
        rows[0]["voxels_per_s"] = output_voxels / rows[0]["median_s"]
    return rows


def section_unet(ctx: Context) -> list[dict]:
    from synjax.models import UNet3DSettings

    if ctx.sizes.unet_output is None:
        cfg = UNet3DSettings(**TINY_UNET)
        in_shape = cfg.valid_input_shape((2, 8, 8))
        name = "partner U-Net (tiny)"
    else:
        cfg = UNet3DSettings()
        in_shape = cfg.valid_input_shape(ctx.sizes.unet_output)
        name = "partner U-Net (paper)"
    rows, jax_rows, f32 = [], [], None
    for dtype, jdtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
        res = bench_unet.bench_jax(
            dataclasses.replace(cfg, dtype=jdtype), in_shape, 1, ctx.sizes.repeats, jnp.float32
        )
        f32 = f32 or res
        out = res["output_shape"]
        jax_rows += _network_rows(
            "unet", name, res, dtype, shape_text((1, *in_shape, 1)), int(np.prod(out[:4]))
        )
    rows += jax_rows
    if ctx.torch:
        torch_rows = []
        device = bench_unet.torch_device()
        for channels_last, bf16 in ((False, False), (True, False), (True, True)):
            tres = bench_unet.bench_torch(
                cfg, f32, ctx.sizes.repeats, ctx.threads, channels_last, bf16
            )
            if tres["n_params"] != int(
                sum(np.prod(p.shape) for p in jax.tree.leaves(f32["params"]))
            ):
                raise RuntimeError(f"U-Net parameter counts differ: torch {tres['n_params']}")
            tolerance = (
                bench_unet.MAX_RELATIVE_DIFF
                if device == "cpu"
                else bench_unet.MAX_RELATIVE_DIFF_TF32
            )
            if tres["max_rel_diff"] > tolerance:
                raise RuntimeError(
                    f"U-Net outputs differ: max relative diff {tres['max_rel_diff']}"
                )
            for mode in ("infer", "train"):
                torch_rows.append(
                    row(
                        "unet",
                        name,
                        framework=f"torch-{tres['version']}",
                        mode=mode,
                        dtype="bfloat16" if bf16 else "float32",
                        layout=tres["layout"],
                        shape=shape_text((1, *in_shape, 1)),
                        timing=tres[mode],
                        threads=tres["threads"],
                        device=tres["device"],
                        max_rel_diff_vs_jax=tres["max_rel_diff"],
                    )
                )
        out_voxels = int(np.prod(f32["output_shape"][:4]))
        for r in torch_rows:
            r["flops"] = f32[f"{r['mode']}_flops"]
            if r["mode"] == "infer":
                r["voxels_per_s"] = out_voxels / r["median_s"]
        for jrow in jax_rows:
            same = [
                r["median_s"]
                for r in torch_rows
                if r["mode"] == jrow["mode"] and r["dtype"] == jrow["dtype"]
            ]
            jrow["best_torch_s"] = min(same)
            jrow["jax_speedup_vs_torch"] = min(same) / jrow["median_s"]
        rows += torch_rows
    return rows


def section_pruning(ctx: Context) -> list[dict]:
    from synjax.models.pruning import DEFAULT_DENSE, DEFAULT_POOLS, PruningCNN, sigmoid_bce

    s = ctx.sizes
    channels = 4
    model = PruningCNN(features=s.pruning_features)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.random((s.pruning_batch, *s.pruning_window, channels), np.float32))
    labels = jnp.asarray(rng.integers(0, 2, s.pruning_batch), jnp.float32)
    params = jax.jit(model.init)(jax.random.key(SEED), x)["params"]
    res = common.time_jax_network(
        lambda p, v: model.apply({"params": p}, v),
        lambda p, v: sigmoid_bce(model.apply({"params": p}, v), labels),
        params,
        x,
        s.repeats,
    )
    shape = shape_text(x.shape)
    rows = _network_rows("pruning", "pruning CNN", res, "float32", shape)
    for r in rows:
        r["windows_per_s"] = s.pruning_batch / r["median_s"]

    def build():
        return torch_nets.build_torch_pruning(
            s.pruning_window, channels, s.pruning_features, DEFAULT_POOLS, DEFAULT_DENSE
        )

    if ctx.torch:
        jax_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
        if torch_nets.count_parameters(build()) != jax_params:
            raise RuntimeError("pruning CNN: PyTorch and Flax parameter counts differ")
        import torch

        target = torch.from_numpy(np.asarray(labels))

        def loss(logits):
            return torch.nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], target.to(logits.device)
            )

        x_numpy = np.asarray(x).transpose(0, 4, 1, 2, 3)
        rows += _torch_rows("pruning", "pruning CNN", ctx, build, x_numpy, loss, rows, shape)
    return rows


def section_deepem3d(ctx: Context) -> list[dict]:
    from synjax.models.deepem3d import DeepEM3DNet, DeepEM3DSettings

    s = ctx.sizes
    settings = DeepEM3DSettings(slices=5, width=s.deepem3d_width)
    model = DeepEM3DNet(settings)
    rng = np.random.default_rng(SEED)
    x = jnp.asarray(rng.random((1, 5, s.deepem3d_size, s.deepem3d_size, 1), np.float32))
    labels = jnp.asarray(rng.integers(0, 2, (1, s.deepem3d_size, s.deepem3d_size)))
    variables = jax.jit(model.init)(jax.random.key(SEED), x)
    stats = variables["batch_stats"]

    def loss(p, v):
        logits, _ = model.apply(
            {"params": p, "batch_stats": stats}, v, train=True, mutable=["batch_stats"]
        )
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))

    res = common.time_jax_network(
        lambda p, v: model.apply({"params": p, "batch_stats": stats}, v),
        loss,
        variables["params"],
        x,
        s.repeats,
    )
    shape = shape_text(x.shape)
    name = f"DeepEM3D-Net s5 width {s.deepem3d_width:g}"
    rows = _network_rows("deepem3d", name, res, "float32", shape, s.deepem3d_size**2)

    def build():
        return torch_nets.build_torch_deepem3d(settings)

    if ctx.torch:
        jax_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(variables["params"])))
        if torch_nets.count_parameters(build()) != jax_params:
            raise RuntimeError(
                f"DeepEM3D: PyTorch {torch_nets.count_parameters(build())} and Flax "
                f"{jax_params} parameter counts differ"
            )
        import torch

        target = torch.from_numpy(np.asarray(labels, np.int64))

        def torch_loss(logits):
            return torch.nn.functional.cross_entropy(logits, target.to(logits.device))

        x_numpy = np.asarray(x).transpose(0, 4, 1, 2, 3)
        rows += _torch_rows("deepem3d", name, ctx, build, x_numpy, torch_loss, rows, shape)
        for r in rows:
            if r["framework"] != "jax" and r["mode"] == "infer":
                r["voxels_per_s"] = s.deepem3d_size**2 / r["median_s"]
    return rows


def _variant_rows(section, name, bench_rows, modes) -> list[dict]:
    rows = []
    for r in bench_rows:
        mode = modes.get(r["what"])
        if mode is None:
            continue
        out = row(
            section,
            f"{name}: {r['what']}",
            mode=mode,
            dtype="float32",
            shape=shape_text(r.get("input_shape") or r.get("region_shape")),
            compile_s=r.get("compile_s"),
            flops=r.get("flops"),
            median_s=r["step_s"],
            min_s=r["min_s"],
            repeats=r["timing"]["repeats"],
            timing_summary=r["timing"],
        )
        if r.get("voxels_per_s"):
            out["voxels_per_s"] = r["voxels_per_s"]
        rows.append(out)
    return rows


def _variant_section(ctx: Context, bench_module, section, title, modes, pipeline) -> list[dict]:
    """Rows of a `bench_*.bench(variant, repeats)` script; its end-to-end row
    goes to the "pipeline" section under the name `pipeline` (with {variant})."""
    variant = ctx.sizes.variant
    out = _variant_rows(
        section, f"{title} ({variant})", bench_module.bench(variant, ctx.sizes.repeats), modes
    )
    for r in out:
        if r["mode"] == "pipeline":
            r["section"] = "pipeline"
            r["name"] = pipeline.format(variant=variant)
    return out


def section_mask_rcnn(ctx: Context) -> list[dict]:
    try:
        from benchmarks import bench_mask_rcnn
    except ImportError:
        import bench_mask_rcnn

    modes = {"train step": "train", "inference": "infer", "prediction end to end": "pipeline"}
    return _variant_section(
        ctx,
        bench_mask_rcnn,
        "mask_rcnn",
        "3D Mask R-CNN",
        modes,
        "fluorescence: patches + sparse merge ({variant} network, untrained)",
    )


def section_instance_unet(ctx: Context) -> list[dict]:
    try:
        from benchmarks import bench_instance_unet
    except ImportError:
        import bench_instance_unet

    modes = {
        "train step": "train",
        "baseline step": "train",
        "block inference": "infer",
        "prediction end to end": "pipeline",
    }
    return _variant_section(
        ctx,
        bench_instance_unet,
        "instance_unet",
        "EM instance U-Net",
        modes,
        "instances: blocks + fusion ({variant} network)",
    )
