"""PyTorch twins of synjax's networks, for like-for-like timings.

The same layers, shapes and parameter counts as the Flax modules (checked by
the harness), channels first (NCDHW) as PyTorch builds them; `time_torch`
times them in a chosen layout (channels_last_3d) and precision (bfloat16
autocast). This module imports neither jax nor synjax at import time, so that
a fresh process timing PyTorch's cold start loads PyTorch alone. torch itself
is imported inside the functions: the benchmarks run without it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def build_torch_unet(cfg):
    """The partner U-Net (`synjax.models.UNet3D`) in PyTorch, modules created in Flax's order.

    Args:
      cfg: `UNet3DSettings`, or any object with its fields (`depth`,
        `features(level)`, `conv_kernels`, `pool_factors`, `padding`,
        `upsample`, `out_channels`).
    """
    import torch
    from torch import nn

    def conv_block(c_in, c_out, kernel):
        pad = 0 if cfg.padding == "VALID" else tuple(k // 2 for k in kernel)
        return nn.Sequential(
            nn.Conv3d(c_in, c_out, kernel, padding=pad),
            nn.PReLU(c_out, init=0.25),
            nn.Conv3d(c_out, c_out, kernel, padding=pad),
            nn.PReLU(c_out, init=0.25),
        )

    def upsample(c_in, c_out, factors):
        if cfg.upsample == "transpose":
            conv = nn.ConvTranspose3d(c_in, c_out, factors, stride=factors)
            return nn.Sequential(conv, nn.PReLU(c_out, init=0.25))
        return nn.Sequential(
            nn.Upsample(scale_factor=factors, mode="nearest"),
            nn.Conv3d(c_in, c_out, factors, padding="same"),
            nn.PReLU(c_out, init=0.25),
        )

    def crop(x, shape):
        starts = [(h - w) // 2 for h, w in zip(x.shape[2:], shape, strict=True)]
        return x[
            :,
            :,
            starts[0] : starts[0] + shape[0],
            starts[1] : starts[1] + shape[1],
            starts[2] : starts[2] + shape[2],
        ]

    class TorchUNet3D(nn.Module):
        def __init__(self):
            super().__init__()
            depth, feats = cfg.depth, cfg.features
            blocks = [
                conv_block(1 if lv == 0 else feats(lv - 1), feats(lv), cfg.conv_kernels[lv])
                for lv in range(depth + 1)
            ]
            ups = []
            for lv in reversed(range(depth)):
                ups.append(upsample(feats(lv + 1), feats(lv), cfg.pool_factors[lv]))
                blocks.append(conv_block(2 * feats(lv), feats(lv), cfg.conv_kernels[lv]))
            self.blocks = nn.ModuleList(blocks)
            self.ups = nn.ModuleList(ups)
            self.pools = nn.ModuleList(nn.MaxPool3d(p, stride=p) for p in cfg.pool_factors)
            self.output = nn.Conv3d(feats(0), cfg.out_channels, 1)

        def forward(self, x):
            skips = []
            for lv in range(cfg.depth):
                x = self.blocks[lv](x)
                skips.append(x)
                x = self.pools[lv](x)
            x = self.blocks[cfg.depth](x)
            for i, lv in enumerate(reversed(range(cfg.depth))):
                x = self.ups[i](x)
                x = torch.cat([x, crop(skips[lv], x.shape[2:])], dim=1)
                x = self.blocks[cfg.depth + 1 + i](x)
            return self.output(x)

    return TorchUNet3D()


def load_flax_params(model, params, cfg):
    """Copies Flax U-Net parameters into `build_torch_unet`'s model (in place)."""
    import torch

    def conv_weight(kernel, transpose=False):
        kernel = np.asarray(kernel, np.float32)
        if transpose:
            # Flax's ConvTranspose does not flip the kernel, PyTorch's does.
            return kernel[::-1, ::-1, ::-1].transpose(3, 4, 0, 1, 2)
        return kernel.transpose(4, 3, 0, 1, 2)

    def put(module, tensor):
        module.data.copy_(torch.from_numpy(np.array(tensor, np.float32, copy=True)))

    def put_conv(module, flax_conv, transpose=False):
        put(module.weight, conv_weight(flax_conv["kernel"], transpose))
        put(module.bias, np.asarray(flax_conv["bias"], np.float32))

    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            flax_block = params[f"ConvBlock_{i}"]
            for j in range(2):
                put_conv(block[2 * j], flax_block[f"Conv_{j}"])
                put(block[2 * j + 1].weight, np.asarray(flax_block[f"PReLU_{j}"]["slope"]))
        for i, up in enumerate(model.ups):
            flax_up = params[f"Upsample_{i}"]
            if cfg.upsample == "transpose":
                put_conv(up[0], flax_up["ConvTranspose_0"], transpose=True)
            else:
                put_conv(up[1], flax_up["Conv_0"])
            put(up[-1].weight, np.asarray(flax_up["PReLU_0"]["slope"]))
        put_conv(model.output, params["output"])


def build_torch_pruning(window: tuple[int, int, int], in_channels: int, features, pools, dense):
    """The candidate-pruning CNN (`synjax.models.pruning.PruningCNN`) in PyTorch.

    Args:
      window: (z, y, x) input window (fixes the first dense layer's width).
      in_channels: input channels (4: EM, proximity, pre mask, post mask).
      features, pools, dense: the Flax module's fields.
    """
    from torch import nn

    layers, c_in, shape = [], in_channels, np.array(window)
    for i, width in enumerate(features):
        layers += [nn.Conv3d(c_in, width, 3, padding=1), nn.ReLU()]
        if i < len(pools):
            layers.append(nn.MaxPool3d(tuple(pools[i]), stride=tuple(pools[i])))
            shape = shape // np.array(pools[i])
        c_in = width
    flat = int(np.prod(shape)) * c_in
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(flat, dense), nn.ReLU(), nn.Linear(dense, 1)
    )


def build_torch_deepem3d(settings):
    """DeepEM3D-Net (`synjax.models.deepem3d.DeepEM3DNet`) in PyTorch, same layers and counts.

    Padding is PyTorch's symmetric padding where Flax's "SAME" pads a stride-2
    convolution asymmetrically: the shapes and the arithmetic are the same.

    Args:
      settings: `DeepEM3DSettings` (slices, num_classes, width, blocks,
        side_features, dilations).
    """
    import torch
    from torch import nn

    def w(features: int) -> int:
        return max(1, round(features * settings.width))

    residual_scale = 0.1  # synjax.models.deepem3d.RESIDUAL_SCALE

    def conv_relu(c_in, c_out, kernel=(3, 3), stride=1):
        pad = tuple(k // 2 for k in kernel)
        return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, pad), nn.ReLU())

    class Inception(nn.Module):
        def __init__(self, c_in, branches):
            super().__init__()
            self.branches = nn.ModuleList()
            out = 0
            for branch in branches:
                layers, c = [], c_in
                for features, kernel in branch:
                    layers.append(conv_relu(c, features, kernel))
                    c = features
                self.branches.append(nn.Sequential(*layers))
                out += c
            self.mix = nn.Conv2d(out, c_in, 1)
            self.norm = nn.BatchNorm2d(c_in)

        def forward(self, x):
            mixed = self.mix(torch.cat([b(x) for b in self.branches], 1))
            return torch.relu(self.norm(x + residual_scale * mixed))

    class Reduction(nn.Module):
        def __init__(self, c_in, branches):
            super().__init__()
            self.pool = nn.MaxPool2d(3, 2, padding=1)
            self.branches = nn.ModuleList()
            out = c_in
            for branch in branches:
                layers, c = [], c_in
                for i, features in enumerate(branch):
                    last = i == len(branch) - 1
                    kernel = (1, 1) if (i == 0 and len(branch) > 1) else (3, 3)
                    layers.append(conv_relu(c, features, kernel, 2 if last else 1))
                    c = features
                self.branches.append(nn.Sequential(*layers))
                out += c
            self.out_channels = out
            self.norm = nn.BatchNorm2d(out)

        def forward(self, x):
            outs = [self.pool(x)] + [b(x) for b in self.branches]
            return torch.relu(self.norm(torch.cat(outs, 1)))

    class Pyramid(nn.Module):
        def __init__(self, c_in, factor):
            super().__init__()
            side = w(settings.side_features)
            self.reduce = nn.Sequential(nn.Conv2d(c_in, side, 1), nn.ReLU())
            kernel = 2 * factor
            # Output y * factor: 2 * padding = d * (kernel - 1) + 1 - factor.
            self.deconvs = nn.ModuleList(
                nn.ConvTranspose2d(
                    side,
                    settings.num_classes,
                    kernel,
                    stride=factor,
                    dilation=d,
                    padding=(d * (kernel - 1) + 1 - factor) // 2,
                )
                for d in settings.dilations
            )

        def forward(self, x):
            h = self.reduce(x)
            return sum(deconv(h) for deconv in self.deconvs)

    class TorchDeepEM3D(nn.Module):
        def __init__(self):
            super().__init__()
            kz1 = settings.slices // 2 + 1
            kz2 = settings.slices - kz1 + 1
            self.fusion = nn.Sequential(
                nn.Conv3d(1, w(32), (kz1, 3, 3), (1, 2, 2), (0, 1, 1)),
                nn.ReLU(),
                nn.Conv3d(w(32), w(64), (kz2, 3, 3), padding=(0, 1, 1)),
                nn.ReLU(),
            )
            self.stem = conv_relu(w(64), w(64))
            self.left = nn.Sequential(conv_relu(w(64), w(64), (1, 1)), conv_relu(w(64), w(96)))
            self.right = nn.Sequential(
                conv_relu(w(64), w(64), (1, 1)),
                conv_relu(w(64), w(64), (7, 1)),
                conv_relu(w(64), w(64), (1, 7)),
                conv_relu(w(64), w(96)),
            )
            c2 = 2 * w(96)
            self.reduce_stem = Reduction(c2, ((w(192),),))
            c4 = self.reduce_stem.out_channels
            a = (((w(32), (1, 1)),), ((w(32), (1, 1)), (w(32), (3, 3))))
            a = (*a, ((w(32), (1, 1)), (w(48), (3, 3)), (w(64), (3, 3))))
            self.blocks_a = nn.Sequential(*(Inception(c4, a) for _ in range(settings.blocks[0])))
            self.reduce_a = Reduction(c4, ((w(384),), (w(256), w(256), w(384))))
            c8 = self.reduce_a.out_channels
            b = (((w(192), (1, 1)),), ((w(128), (1, 1)), (w(160), (1, 7)), (w(192), (7, 1))))
            self.blocks_b = nn.Sequential(*(Inception(c8, b) for _ in range(settings.blocks[1])))
            reduction_b = ((w(256), w(384)), (w(256), w(288)), (w(256), w(288), w(320)))
            self.reduce_b = Reduction(c8, reduction_b)
            c16 = self.reduce_b.out_channels
            c = (((w(192), (1, 1)),), ((w(192), (1, 1)), (w(224), (1, 3)), (w(256), (3, 1))))
            self.blocks_c = nn.Sequential(*(Inception(c16, c) for _ in range(settings.blocks[2])))
            self.pyramids = nn.ModuleList(
                Pyramid(ch, f) for ch, f in ((c2, 2), (c4, 4), (c8, 8), (c16, 16))
            )

        def forward(self, x):
            h = self.fusion(x)[:, :, 0]
            h = self.stem(h)
            skip2 = torch.cat([self.left(h), self.right(h)], 1)
            skip4 = self.blocks_a(self.reduce_stem(skip2))
            skip8 = self.blocks_b(self.reduce_a(skip4))
            h = self.blocks_c(self.reduce_b(skip8))
            return sum(p(f) for p, f in zip(self.pyramids, (skip2, skip4, skip8, h), strict=True))

    return TorchDeepEM3D()


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def to_channels_last(model, x):
    """(model, x) with every 5D tensor channels_last_3d and every 4D one channels_last."""
    import torch

    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    for p in model.parameters():
        if p.dim() in formats:
            p.data = p.data.contiguous(memory_format=formats[p.dim()])
    return model, x.contiguous(memory_format=formats.get(x.dim(), torch.contiguous_format))


def time_torch(
    model,
    x_numpy: np.ndarray,
    loss,
    repeats: int,
    *,
    channels_last: bool,
    bf16: bool,
    device: str,
    threads: int | None = None,
    learning_rate: float = 1e-4,
) -> dict[str, Any]:
    """Times inference and one Adam training step of a PyTorch model.

    Args:
      model: `torch.nn.Module` (moved to `device`; its parameters are trained
        in place by the timed steps).
      x_numpy: `[batch, c, ...]` float32 input, channels first.
      loss: `(output) -> scalar tensor`.
      repeats: timed calls after one warm-up call.
      channels_last: run in channels_last(_3d) memory format.
      bf16: bfloat16 autocast (float32 master weights and accumulation).
      device: "cpu" or "cuda".
      threads: CPU threads (None: PyTorch's default).

    Returns:
      {"infer", "train" (common.Timing), "layout", "dtype", "threads", "device"}.
    """
    import torch

    try:
        from benchmarks import common
    except ImportError:  # run as a script: benchmarks/ itself is on sys.path
        import common

    if threads:
        torch.set_num_threads(threads)
    model = model.to(device)
    x = torch.from_numpy(np.array(x_numpy, np.float32, order="C", copy=True)).to(device)
    if channels_last:
        model, x = to_channels_last(model, x)

    def sync(result):
        # CUDA kernels run asynchronously: a timing ends when the device is done.
        if device == "cuda":
            torch.cuda.synchronize()
        return result

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16)

    def infer():
        with torch.inference_mode(), autocast():
            return model(x)

    model.eval()
    infer_timing = common.time_calls(infer, repeats, sync=sync)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            value = loss(model(x).float())
        value.backward()
        opt.step()
        return value

    train_timing = common.time_calls(train_step, repeats, sync=lambda r: r.item())
    return {
        "infer": infer_timing,
        "train": train_timing,
        "layout": "channels_last" if channels_last else "channels_first",
        "dtype": "bfloat16-autocast" if bf16 else "float32",
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "version": torch.__version__,
    }
