"""What every section of `run_all.py` shares: problem sizes, the run context, result rows."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax

try:
    from benchmarks import bench_detection, bench_unet
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import bench_detection
    import bench_unet

SEED = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the full run's, or `--quick`'s tiny ones."""

    repeats: int
    matmul: int  # square matmul side on a CPU
    matmul_accelerator: int  # on a GPU/TPU, whose peak a small matmul does not reach
    conv: tuple[tuple[int, ...], int]  # input [b, z, y, x, c], output channels
    unet_output: tuple[int, int, int] | None  # None: the tiny U-Net below
    pruning_window: tuple[int, int, int]
    pruning_batch: int
    pruning_features: tuple[int, ...]
    deepem3d_size: int
    deepem3d_width: float
    variant: str  # of configs/fluorescence.py and configs/vnc.py
    nms_boxes: tuple[int, ...]
    roi_cases: tuple
    merge_masks: int
    watershed_shape: tuple[int, int, int] | None  # None: the real FIB-SEM volume
    candidates_shape: tuple[int, int, int]
    partners_volume: tuple[int, int, int]
    partners_block: tuple[int, int, int]
    neurons_volume: tuple[int, int, int]
    cold_start_output: tuple[int, int, int] | None


FULL = Sizes(
    repeats=2,
    matmul=2048,
    matmul_accelerator=8192,
    conv=((1, 10, 74, 74, 72), 72),
    unet_output=(4, 64, 64),
    pruning_window=(16, 160, 160),
    pruning_batch=4,
    pruning_features=(16, 32, 64, 64, 128),
    deepem3d_size=256,
    deepem3d_width=1.0,
    variant="default",
    nms_boxes=(1000, 10000),
    roi_cases=bench_detection.ROI_CASES,
    merge_masks=20000,
    watershed_shape=None,
    candidates_shape=(32, 256, 256),
    partners_volume=(32, 192, 192),
    partners_block=(16, 96, 96),
    neurons_volume=(8, 256, 256),
    cold_start_output=(4, 64, 64),
)
QUICK = Sizes(
    repeats=2,
    matmul=128,
    matmul_accelerator=128,
    conv=((1, 4, 8, 8, 2), 3),
    unet_output=None,
    pruning_window=(4, 16, 16),
    pruning_batch=2,
    pruning_features=(2, 2, 2, 2, 2),
    deepem3d_size=32,
    deepem3d_width=1 / 32,
    variant="smoke",
    nms_boxes=(300,),
    roi_cases=(("box head", (4, 8, 8, 4), 8, (3, 3, 3), (0.5, 0.25, 0.25)),),
    merge_masks=500,
    watershed_shape=(8, 48, 48),
    candidates_shape=(8, 64, 64),
    partners_volume=(8, 32, 32),
    partners_block=(8, 16, 16),
    neurons_volume=(3, 32, 32),
    cold_start_output=None,
)
# The quick U-Net: same layers as the paper's, two levels, few features.
TINY_UNET = dict(
    depth=1,
    base_features=2,
    feature_growth=2,
    pool_factors=((1, 2, 2),),
    conv_kernels=((1, 3, 3), (1, 3, 3)),
)


class Context:
    """What every section shares: sizes, the measured peaks, torch's availability."""

    def __init__(self, sizes: Sizes, use_torch: bool, threads: int):
        self.sizes = sizes
        self.peaks: dict[str, float] = {}
        self.threads = threads
        self.torch_reason = None
        if use_torch:
            try:
                import torch  # noqa: F401
            except ImportError:
                self.torch_reason = "torch is not installed (pip install -e .[bench])"
        else:
            self.torch_reason = "--no-torch"
        if self.torch_reason is None and jax.default_backend() != "cpu":
            if bench_unet.torch_device() == "cpu":
                self.torch_reason = "JAX runs on an accelerator, PyTorch has none"
        if self.torch_reason:
            print(f"PyTorch rows skipped: {self.torch_reason}", file=sys.stderr)

    @property
    def torch(self) -> bool:
        return self.torch_reason is None


def shape_text(shape) -> str:
    return "x".join(str(int(v)) for v in shape) if shape is not None else None


def row(section: str, name: str, **fields) -> dict[str, Any]:
    """One result row; `timing` (common.Timing) fills median, min and repeats."""
    timing = fields.pop("timing", None)
    out = {"section": section, "name": name, "framework": "jax", **fields}
    if timing is not None:
        out.update(median_s=timing.median, min_s=timing.min, repeats=len(timing.times))
        out["timing"] = timing.as_dict()
    return out


def with_rates(rows: list[dict], ctx: Context) -> list[dict]:
    """Adds GFLOP/s (from FLOPs and the median) and the fraction of the dtype's matmul peak."""
    for r in rows:
        flops, seconds = r.get("flops"), r.get("median_s")
        if flops and seconds:
            r["gflop_per_s"] = flops / seconds / 1e9
            peak = ctx.peaks.get("bfloat16" if r.get("dtype") == "bfloat16" else "float32")
            r["peak_fraction"] = flops / seconds / peak if peak else None
    return rows
