"""One command for every benchmark: networks, detection ops, host stages, pipelines, cold start.

Runs in one process (the cold-start rows in fresh subprocesses, since they
time an import) and writes one JSON plus a markdown table:

- `peak`: a square matmul at float32 and at bfloat16 inputs with float32
  accumulation, the device's practical peak in this run; every network row's
  FLOP/s is given as a fraction of the peak of its compute dtype;
- `conv`: one 3x3x3 convolution (XLA's own), the arithmetic the networks are
  made of;
- networks, inference and one Adam training step each, compile time apart
  from steady state (after `block_until_ready`), FLOPs from XLA's cost
  analysis of the compiled program: the partner U-Net regressor at the
  paper's size (float32 and bfloat16 compute), the pruning CNN, DeepEM3D-Net,
  the 3D Mask R-CNN and the EM instance U-Net; PyTorch twins of the U-Net, the
  pruning CNN and DeepEM3D-Net in the same process when torch is importable
  (channels first and channels_last_3d at float32, channels_last_3d with
  bfloat16 autocast), with JAX's speed-up over the best PyTorch row printed;
- ops and host stages: NMS, ROIAlign, the sparse mask merge, the watershed,
  partner candidate generation;
- pipelines: prediction throughput in voxels per second (partners: the block
  runner on a synthetic zarr volume; neurons: slice-wise DeepEM3D; instances:
  block detection and fusion);
- `cold_start`: import -> first U-Net prediction in a fresh process, JAX
  (parameters initialised with JAX's default PRNG and with "unsafe_rbg")
  against PyTorch.

Run from the repository root (about 5 minutes on a 2-core CPU; `--quick`
runs tiny sizes in a minute or two and writes no README unless asked):

  .venv/bin/python benchmarks/run_all.py [--quick] [--out benchmarks/results/all.json]
  .venv/bin/python benchmarks/run_all.py --sections peak unet --no-readme

The sections live in `harness_networks.py` (networks) and `harness_host.py`
(ops, host stages, pipelines, cold start); `harness_base.py` holds the sizes
and rows they share, `harness_report.py` the markdown table; this file runs
them and writes the results.

Nothing here assumes a CPU: on a GPU the same command times the GPU (PyTorch
on CUDA when it has it), and the table names the device.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import sys
import time
import traceback
from collections.abc import Callable

from synjax import runtime
from synjax.models.conv import IMPLEMENTATIONS, auto_implementation

try:
    from benchmarks import common, harness_host, harness_networks
    from benchmarks.harness_base import FULL, QUICK, Context, Sizes, with_rates
    from benchmarks.harness_report import TABLE, markdown, versions
except ImportError:  # run as a script: benchmarks/ itself is on sys.path
    import common
    import harness_host
    import harness_networks
    from harness_base import FULL, QUICK, Context, Sizes, with_rates
    from harness_report import TABLE, markdown, versions

DEFAULT_OUT = "benchmarks/results/all.json"
DEFAULT_README = "benchmarks/README.md"


SECTIONS: dict[str, Callable[[Context], list[dict]]] = {
    "peak": harness_networks.section_peak,
    "conv": harness_networks.section_conv,
    "unet": harness_networks.section_unet,
    "pruning": harness_networks.section_pruning,
    "deepem3d": harness_networks.section_deepem3d,
    "nms": harness_host.section_nms,
    "roi_align": harness_host.section_roi_align,
    "merge": harness_host.section_merge,
    "watershed": harness_host.section_watershed,
    "candidates": harness_host.section_candidates,
    "pipelines": harness_host.section_pipelines,
    "cold_start": harness_host.section_cold_start,
    # Last: their compilations are the longest (minutes on a 2-core CPU).
    "instance_unet": harness_networks.section_instance_unet,
    "mask_rcnn": harness_networks.section_mask_rcnn,
}


def run(
    sections,
    sizes: Sizes,
    use_torch: bool,
    threads: int,
    keep_going: bool,
    save: Callable[[dict], None] = lambda result: None,
) -> dict:
    """Runs `sections` in order; returns rows, peaks and per-section errors.

    `save(result)` is called after each section with the result so far, so
    that a run stopped part way still leaves the sections it finished.
    """
    ctx = Context(sizes, use_torch, threads)
    rows, errors = [], {}

    def result(pending):
        return {
            "rows": rows,
            "errors": errors,
            "not_run": pending,
            "peaks_gflop_per_s": {k: v / 1e9 for k, v in ctx.peaks.items() if v},
            "torch": ctx.torch_reason,
        }

    if "peak" not in sections:
        # Every rate is a fraction of the peak: measure it even when not asked for.
        sections = ["peak", *sections]
    for i, name in enumerate(sections):
        start = time.perf_counter()
        print(f"[run_all] {name} ...", file=sys.stderr, flush=True)
        try:
            new = with_rates(SECTIONS[name](ctx), ctx)
        except Exception as error:  # noqa: BLE001 - one broken section must not lose the rest
            if not keep_going:
                raise
            traceback.print_exc()
            errors[name] = f"{type(error).__name__}: {(str(error) or '-').splitlines()[0][:200]}"
        else:
            rows += new
            print(
                f"[run_all] {name}: {len(new)} rows in {time.perf_counter() - start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        save(result(list(sections[i + 1 :])))
    return result([])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--sections", nargs="+", choices=tuple(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON results path")
    parser.add_argument(
        "--readme",
        default=None,
        help=f"markdown table path (default {DEFAULT_README} for a full run, none for --quick)",
    )
    parser.add_argument("--no-readme", action="store_true", help="write no markdown table")
    parser.add_argument("--repeats", type=int, help="timed calls per case (default by size)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch rows")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    parser.add_argument(
        "--fail-fast", action="store_true", help="stop at the first failing section"
    )
    parser.add_argument(
        "--conv",
        default="auto",
        choices=IMPLEMENTATIONS,
        help='Conv3D implementation of every network whose convolutions say "auto" '
        '(synjax.models.conv; "auto" is the default of the configs)',
    )
    parser.add_argument(
        "--host-memory",
        default="retain",
        choices=("retain", "system"),
        help="retain: glibc's malloc keeps freed memory for reuse, as the main job does "
        "(synjax.runtime.retain_freed_memory; PyTorch in this process too); system: "
        "glibc's default (large buffers unmapped when freed, faulted in again per call)",
    )
    args = parser.parse_args(argv)
    # Before the first JAX computation: XLA's threads take their arenas then.
    retained = args.host_memory == "retain" and runtime.retain_freed_memory()
    sizes = QUICK if args.quick else FULL
    if args.repeats:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    load_before = common.load_average()
    start = time.perf_counter()
    commit = common.git_commit()
    readme = None if args.no_readme else args.readme or (None if args.quick else DEFAULT_README)

    def payload_of(result: dict) -> dict:
        return {
            "benchmark": "run_all",
            "command": " ".join(["python benchmarks/run_all.py", *(argv or sys.argv[1:])]),
            "out": args.out,
            "quick": args.quick,
            "conv_implementation": args.conv,
            "host_memory": "retain" if retained else "system",
            "commit": commit,
            "environment": common.environment(),
            "versions": versions(),
            "load_average": {"before": load_before, "after": common.load_average()},
            "sizes": dataclasses.asdict(sizes),
            "wall_s": time.perf_counter() - start,
            **result,
        }

    def save(result: dict) -> None:
        payload = payload_of(result)
        common.write_json(args.out, payload)
        if readme:
            path = pathlib.Path(readme)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown(payload))

    # At trace time: every network jitted in this process takes the implementation.
    conv_choice = (
        contextlib.nullcontext() if args.conv == "auto" else auto_implementation(args.conv)
    )
    with conv_choice:
        result = run(
            list(args.sections), sizes, not args.no_torch, args.threads, not args.fail_fast, save
        )
    payload = payload_of(result)
    print(common.format_table(payload["rows"], [k for k, _ in TABLE]))
    for r in payload["rows"]:
        if "jax_speedup_vs_torch" in r:
            print(
                f"{r['name']} {r['mode']} {r['dtype']}: JAX {r['median_s']:.4g} s, best PyTorch "
                f"{r['best_torch_s']:.4g} s -> JAX speed-up {r['jax_speedup_vs_torch']:.2f}x"
            )
    save(result)
    print(f"wrote {args.out}" + (f" and {readme}" if readme else ""))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
